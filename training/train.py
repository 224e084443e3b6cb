#!/usr/bin/env python
"""Fine-tune I-MedSAM on a folder of images and masks (or a Hub dataset) with Accelerate.

    accelerate launch training/train.py --config training/configs/litemedsam_polyp.yaml \
        [--data_dir DIR] [--output_dir DIR] [--epochs 3] [--refine_ratio 0.25] ...

Options are typed dataclasses (`ModelArguments`, `DataArguments`, `RunArguments`, `EvaluationArguments`,
`HubArguments`) parsed by `transformers.HfArgumentParser`; `--help` lists every one with its type and default.
Precedence: defaults < `--config` YAML (sections model/data/training/evaluation/hub) < command line. Flags are
`--key value` (`--augment false`, `--output_sizes native 128`, `--config_overrides '{"refine_ratio": 0.25}'`); the
older `--section.key value` spelling and YAML list values (`--split_fractions "[0.6, 0.2, 0.2]"`) still work, and
`null` sets an optional value to None.

Model switches (`--use_lora`, `--refine_ratio`, `--num_classes`, ...) left unset keep what the backbone's config
says: fine-tuning a trained I-MedSAM checkpoint keeps its own settings. `--mixed_precision` left unset takes the
Accelerate config's (`accelerate launch --mixed_precision`, `accelerate config`, ACCELERATE_MIXED_PRECISION). One
process on CPU without an Accelerate config; `accelerate launch --multi_gpu --num_processes N` for DDP (see
training/accelerate_configs/).

The run writes into `output_dir`: `config.yaml` (the resolved options with the effective mixed precision, never
`hub_token`; it loads again as a `--config`), `splits.json`,
`data_problems.txt` (files skipped, with the reason), `logs/train_log.jsonl` (+ the `--report_to` trackers;
TensorBoard by default when installed), `checkpoints/checkpoint-<step>/` (trainable weights, optimizer, scheduler,
RNG and data position; `--resume_from_checkpoint latest` continues a killed run exactly), `best/` (trainable
weights of the best validation Dice), `final/` (the publishing form: AutoModel-loadable full model, processor,
adapter in `final/adapter/`, model card README.md) and `eval_results.json`. `--push_to_hub --hub_model_id ORG/NAME`
uploads checkpoints in the background and the final model with its card at the end.
"""

import argparse
import difflib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import accelerate.utils
import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, LoggerType, set_seed
from huggingface_hub import HfApi
from huggingface_hub.utils.sha import sha_fileobj
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_linear_schedule_with_warmup
from transformers.hf_argparser import string_to_bool

import imedsam_hf  # noqa: F401  (registers the model and the PEFT type)
from imedsam_hf import imedsam_peft_config, save_pretrained_full
from imedsam_hf.data import (
    DEFAULT_GROUP_PATTERN,
    DataConfig,
    SegmentationDataset,
    SegmentationPair,
    collate,
    default_scan_spacing,
    discover_pairs,
    load_hub_dataset,
    load_splits,
    make_splits,
    parse_mask_values,
    read_class_names,
    records_from_pairs,
    validate_pairs,
    write_splits,
)
from imedsam_hf.evaluation import NATIVE, evaluate_with_volumes, parse_size
from imedsam_hf.loading import load_model, portable_model_name
from imedsam_hf.metrics import dice
from imedsam_hf.model_card import write_model_card
from imedsam_hf.processing_imedsam import IMedSamProcessor
from imedsam_hf.training import (
    LossWeights,
    anneal_coordinates,
    fine_weight_at,
    forward_and_loss,
    model_config,
    parameter_groups,
    prompt_rows,
)

# No `from __future__ import annotations` here: the tests and benchmarks load this file without registering it in
# sys.modules, where string annotations of the argument dataclasses could not be resolved.


def option(default: Any, help: str) -> Any:
    """A dataclass field with its `--help` text (lists and dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    """The backbone and the I-MedSAM config keys to change. `None` keeps what the backbone's config says."""

    _argument_group_name = "model"

    backbone: str = option(
        "litemedsam", "'litemedsam', an I-MedSAM or SAM checkpoint (folder or Hub id) or Meta's SAM .pth file."
    )
    image_size: int | None = option(None, "Input size of a SAM checkpoint's conversion (None: its own).")
    use_lora: bool | None = option(None, "LoRA on q and v of the encoder (None: the backbone's setting).")
    use_frequency_adapter: bool | None = option(None, "The frequency-adapter chain (None: the backbone's setting).")
    use_implicit_decoder: bool | None = option(
        None, "The implicit (INR) decoder; false: SAM's own mask output (None: the backbone's setting)."
    )
    frequency_fusion_gate: bool | None = option(
        None, "Learned zero-initialised gates on the frequency fusion (None: the backbone's setting)."
    )
    implicit_sam_prior: bool | None = option(
        None, "The implicit decoder predicts a residual on SAM's mask logit (None: the backbone's setting)."
    )
    refine_ratio: float | None = option(
        None, "Fraction of points the fine decoder refines, in [0, 1] (None: the backbone's setting)."
    )
    mc_passes: int | None = option(None, "MC-dropout passes of the uncertainty estimate, >= 2 (None: the backbone's).")
    num_classes: int | None = option(None, "Output channels, one per foreground class (None: the backbone's).")
    base_model_license: str | None = option(
        None, "Licence of the backbone's weights, recorded in config.yaml (the card names known backbones' own)."
    )
    config_overrides: dict | str | None = option(
        {}, "Further IMedSamConfig fields to set, a JSON object (a mapping in YAML); wins over the switches above."
    )
    peft_overrides: dict | str | None = option(
        {}, "FrequencyAdapterConfig fields (lora_rank, adapter_dim, ...), a JSON object (a mapping in YAML)."
    )

    def __post_init__(self) -> None:
        self.config_overrides = parse_mapping(self.config_overrides)
        self.peft_overrides = parse_mapping(self.peft_overrides)

    def config_changes(self) -> dict[str, Any]:
        """Only the keys that were set (YAML or command line): the rest stays as the backbone's config has it."""
        switches = {name: getattr(self, name) for name in MODEL_SWITCHES if getattr(self, name) is not None}
        return {**switches, **self.config_overrides}


MODEL_SWITCHES = (
    "use_lora",
    "use_frequency_adapter",
    "use_implicit_decoder",
    "frequency_fusion_gate",
    "implicit_sam_prior",
    "refine_ratio",
    "mc_passes",
    "num_classes",
)


@dataclass
class DataArguments:
    """Where the images and masks come from, how they are split, and how samples are made."""

    _argument_group_name = "data"

    data_dir: str | None = option(None, "Folder with images/ and masks/ (or image/ + mask/, TrainDataset/...).")
    dataset: str | None = option(None, "A Hub dataset id (or a local dataset folder) instead of --data_dir.")
    dataset_split: str = option("train", "Split of --dataset to load; it is then cut into train/validation/test.")
    image_column: str = option("image", "Image column of --dataset.")
    mask_column: str = option("mask", "Mask column of --dataset.")
    split_file: str | None = option(None, "JSON {train: [stems], validation: [...], test: [...]} instead of a split.")
    split_seed: int = option(0, "Seed of the train/validation/test shuffle.")
    split_fractions: list[float] = option([0.6, 0.2, 0.2], "Train, validation and test fractions (sum 1).")
    group_pattern: str = option(
        DEFAULT_GROUP_PATTERN,
        "Regex whose first group is a stem's scan or patient: splits keep each group whole (the default takes the "
        "stem before `_slice`; other stems are their own group).",
    )
    on_error: Literal["skip", "fail"] = option("skip", "Unusable image/mask files: skip them (listed) or stop.")
    augment: bool = option(True, "Random affine, flip, colour and blur augmentation in training.")
    box_jitter: float = option(0.1, "Training boxes: each side moves by up to this fraction of the box size.")
    prompt: Literal["box", "none"] = option("box", "Prompt: the mask's box, or none (prompt-free).")
    class_prompts: bool = option(False, "Multi-class masks: one binary sample per class present, with its own box.")
    all_classes_per_sample: bool = option(
        False,
        "With --class_prompts: one sample per image carrying every class present as a prompt (one encoder pass "
        "per image, the loss averaged over its prompts) instead of one sample per class.",
    )
    max_prompts_per_sample: int | None = option(
        None,
        "With --all_classes_per_sample: at most N structures of an image prompt its training sample, rarer classes "
        "drawn more often (None: all).",
    )
    mask_classes: int | None = option(None, "Foreground class ids in the masks (None: the model's num_classes).")
    max_clicks: int = option(
        0,
        "Training samples also carry 1..N random positive clicks inside their structure (0: none; see click_probability).",
    )
    mask_values: str | None = option(
        None,
        "Stored mask value -> class id, e.g. '38:1,75:1' (two values, one foreground) or '38:1,75:2' (None: a binary "
        "mask's one non-zero value is the foreground, class-id masks as they are; anything else is an error).",
    )
    name: str | None = option(None, "Dataset name for the model card.")
    license: str | None = option(None, "Dataset licence for the model card.")
    citation: str | None = option(None, "Dataset citation for the model card.")


@dataclass
class RunArguments:
    """The training recipe and the run's bookkeeping (YAML section `training`)."""

    _argument_group_name = "training"

    output_dir: str = option("outputs/imedsam", "Folder the run writes into.")
    epochs: int = option(10, "Training epochs (unless --max_train_steps).")
    max_train_steps: int | None = option(None, "Optimizer steps in total; overrides --epochs.")
    max_train_minutes: float | None = option(
        None,
        "Wall-clock budget of the training loop: past it, the run stops after the current step, validates and "
        "finishes as at its last step (the learning-rate schedule keeps the planned --max_train_steps length).",
    )
    finish_only: bool = option(
        False,
        "Train nothing: build final/ from output_dir/best/ (a run killed after a validation, or trained on another "
        "machine), evaluate it and write its card. config.yaml and logs of the run are kept.",
    )
    batch_size: int = option(1, "Training batch size per process.")
    eval_batch_size: int = option(4, "Validation batch size per process.")
    gradient_accumulation_steps: int = option(1, "Batches per optimizer step.")
    learning_rate: float = option(5.0e-5, "AdamW learning rate of the adapters and SAM's trainable modules.")
    implicit_learning_rate: float = option(1.0e-3, "AdamW learning rate of the implicit decoder.")
    mask_decoder_learning_rate: float | None = option(
        None,
        "AdamW learning rate of SAM's mask decoder when it is trained (--peft_overrides '{\"train_mask_decoder\": "
        '"transformer"}\'), apart from its output upscaling (None: --learning_rate).',
    )
    weight_decay: float = option(0.01, "AdamW weight decay.")
    warmup_steps: int = option(0, "Linear learning-rate warm-up steps (then linear decay to 0).")
    fine_weight_warmup_epochs: float = option(5, "Epochs over which the fine loss's weight ramps up to 1.")
    coordinate_annealing_epochs: float = option(
        0,
        "Epochs over which the implicit decoder's coordinate octaves switch on from low to high (the released code: "
        "20); 0: all on from the start.",
    )
    train_points: int | None = option(
        None, "With the implicit decoder, train on this many random points per image (None/0: every pixel)."
    )
    box_point_fraction: float = option(
        0.0,
        "With --train_points and box prompts: the share of each prompt's points drawn inside its box (widened by "
        "10%) instead of over the whole image, so small structures get their share.",
    )
    dice_weight: float = option(0.8, "Weight of the Dice term of the loss.")
    bce_weight: float = option(0.2, "Weight of the BCE term of the loss.")
    click_probability: float = option(
        0.0, "With --max_clicks: the chance that a training step is prompted with the clicks instead of the boxes."
    )
    loss_composition: Literal["project", "released"] = option(
        "project",
        "'project': Dice+BCE on the coarse map plus the fine term on the refined points; 'released': the released "
        "code's Dice-only (1-a) Dice(coarse) + a Dice(output), a the fine weight (--fine_weight_warmup_epochs).",
    )
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = option(
        None, "Overrides the Accelerate config's mixed precision (None: accelerate launch / accelerate config decide)."
    )
    seed: int = option(0, "Seed of weights initialisation, augmentation, shuffling and point sampling.")
    num_workers: int = option(0, "DataLoader worker processes.")
    num_threads: int | None = option(None, "torch CPU threads (None: torch's default).")
    eval_every_epochs: int = option(1, "Validate (and select the best model) every this many epochs.")
    max_eval_samples: int | None = option(
        None, "Validate on at most N samples, evenly spaced over the validation split (None: all of it)."
    )
    checkpointing_steps: str = option("epoch", "Save a resumable checkpoint every N steps, each 'epoch', or 'no'.")
    checkpoints_total_limit: int | None = option(2, "Keep this many newest checkpoints (None: all).")
    resume_from_checkpoint: str | None = option(None, "A checkpoint folder, or 'latest' in output_dir/checkpoints.")
    stop_after_steps: int | None = option(None, "Stop after this step as if killed (to test resumption).")
    report_to: str = option(
        "auto",
        "Trackers: 'auto' (tensorboard if installed), 'none', 'all', or a comma-separated list of "
        + ", ".join(t.value for t in LoggerType if t != LoggerType.ALL)
        + ".",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_point_fraction <= 1.0:
            raise ValueError(f"--box_point_fraction {self.box_point_fraction}: a fraction in [0, 1].")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples {self.max_eval_samples}: at least 1 (or null for all).")
        if not 0.0 <= self.click_probability <= 1.0:
            raise ValueError(f"--click_probability {self.click_probability}: a probability in [0, 1].")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max_train_minutes {self.max_train_minutes}: expected a positive number of minutes.")
        if self.checkpointing_steps not in ("epoch", "no") and not str(self.checkpointing_steps).isdigit():
            raise ValueError(f"--checkpointing_steps {self.checkpointing_steps!r}: expected N, 'epoch' or 'no'.")

    @property
    def checkpoint_every(self) -> int | str:
        return int(self.checkpointing_steps) if str(self.checkpointing_steps).isdigit() else self.checkpointing_steps


@dataclass
class EvaluationArguments:
    """The final test-split evaluation of the selected model."""

    _argument_group_name = "evaluation"

    output_sizes: list[str] = option([NATIVE], "Output resolutions: native, a factor like 0.5x or 2x, or pixels.")
    baseline: bool = option(True, "Also score the zero-shot backbone (SAM's mask, adapters off).")
    split: Literal["train", "validation", "test"] = option("test", "Split to score.")

    def __post_init__(self) -> None:
        for size in self.output_sizes:
            try:
                parse_size(size)
            except ValueError as error:
                raise ValueError(f"--output_sizes: {error}") from error


@dataclass
class HubArguments:
    """Publishing to the Hugging Face Hub."""

    _argument_group_name = "hub"

    push_to_hub: bool = option(False, "Upload checkpoints while training and the final model with its card.")
    hub_model_id: str | None = option(None, "Repository id ORG/NAME to push to.")
    hub_private: bool = option(False, "Create the repository private.")
    hub_token: str | None = option(
        None, "Hub token (None: the stored login or HF_TOKEN); never written to config.yaml."
    )

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME.")


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "training": RunArguments,
    "evaluation": EvaluationArguments,
    "hub": HubArguments,
}


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    training: RunArguments
    evaluation: EvaluationArguments
    hub: HubArguments

    def sections(self, mixed_precision: str | None = None) -> dict[str, dict[str, Any]]:
        """Plain dicts per section (config.yaml, the model card, trackers), never with the Hub token."""
        sections = {name: asdict(getattr(self, name)) for name in SECTIONS}
        sections["hub"]["hub_token"] = None
        if mixed_precision is not None:
            sections["training"]["mixed_precision"] = mixed_precision
        return sections


# ---------------------------------------------------------------------------------------------- parsing


def parse_mapping(value: Any) -> dict[str, Any]:
    """A dict option: a mapping (YAML) or its JSON text (command line; YAML flow style works too)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise argparse.ArgumentTypeError(f"not a JSON object: {error}") from error
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"refine_ratio\": 0.25}}', got {value!r}")
    return value


def field_types() -> dict[str, tuple[str, Any]]:
    """Every option's name -> (section, type); names are unique across sections (flat `--key` flags)."""
    types: dict[str, tuple[str, Any]] = {}
    for section, dtype in SECTIONS.items():
        for name, hint in get_type_hints(dtype).items():
            if name in types:
                raise RuntimeError(f"option {name!r} is in sections {types[name][0]!r} and {section!r}")
            types[name] = (section, hint)
    return types


def split_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); dict-or-str options count as `dict`."""
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (dict if dict in args else args[0]), type(None) in get_args(hint)
    return hint, False


def type_label(hint: Any) -> str | None:
    hint, _ = split_optional(hint)
    if get_origin(hint) is Literal:
        return None  # argparse shows the choices
    if get_origin(hint) is list:
        return type_label(get_args(hint)[0])
    return {dict: "JSON", bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(hint, "VALUE")


def nullable(convert: Any) -> Any:
    """`null` on the command line sets an optional value to None (as in YAML)."""

    def parse(text: str) -> Any:
        return None if text == "null" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def build_parser(defaults: dict[str, Any] | None = None) -> HfArgumentParser:
    """HfArgumentParser over the sections, with `--config`, type names in `--help` and YAML values as defaults."""
    parser = HfArgumentParser(
        tuple(SECTIONS.values()), description=__doc__.split("\n\n")[0], allow_abbrev=False, prog="train.py"
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file with model/data/training/evaluation/hub sections.")
    if defaults:
        parser.set_defaults(**defaults)
    types = field_types()
    for action in parser._actions:
        if action.dest not in types:
            continue
        if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's complement of a true boolean
            action.help, action.default = f"Same as --{action.dest} false.", argparse.SUPPRESS
            continue
        hint, optional = split_optional(types[action.dest][1])
        action.metavar = type_label(hint)
        if hint is dict:
            action.type = parse_mapping
        elif hint is bool and optional:  # `--use_lora` alone means true, as for the plain booleans
            action.nargs, action.const = "?", True
        if optional and hint is not dict and get_origin(hint) is not list:
            action.type = nullable(action.type or str)
    return parser


def coerce(value: Any, hint: Any) -> Any:
    """A YAML value as the option's type (ints for floats, scalars for strings); ValueError if it does not fit."""
    hint, optional = split_optional(hint)
    if value is None and optional:
        return None
    if hint is dict:
        return parse_mapping(value)
    if get_origin(hint) is list:
        return [coerce(item, get_args(hint)[0]) for item in (value if isinstance(value, list) else [value])]
    if get_origin(hint) is Literal:
        if str(value) not in get_args(hint):
            raise ValueError(f"expected one of {list(get_args(hint))}, got {value!r}")
        return str(value)
    if hint is bool:
        return value if isinstance(value, bool) else string_to_bool(str(value))
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected {type_label(hint) or hint}, got {value!r}")


def yaml_defaults(path: Path) -> dict[str, Any]:
    """The `--config` file's values, checked and typed; unknown sections and keys name the file."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"error: --config {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: --config {path}: expected sections {list(SECTIONS)}, got {type(loaded).__name__}.")
    types = field_types()
    values: dict[str, Any] = {}
    for section, keys in loaded.items():
        keys = {} if keys is None else keys  # an empty section
        if section not in SECTIONS or not isinstance(keys, dict):
            raise SystemExit(f"error: --config {path}: unknown section {section!r}; expected {list(SECTIONS)}.")
        for key, value in keys.items():
            if key not in types or types[key][0] != section:
                raise SystemExit(f"error: --config {path}: unknown key {section}.{key}{did_you_mean(key, types)}")
            try:
                values[key] = coerce(value, types[key][1])
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise SystemExit(f"error: --config {path}: {section}.{key}: {error}") from error
    return values


def did_you_mean(name: str, types: dict[str, tuple[str, Any]]) -> str:
    close = difflib.get_close_matches(name, list(types), n=1)
    return f" (did you mean {types[close[0]][0]}.{close[0]}?)" if close else "."


def modernize(argv: list[str]) -> list[str]:
    """The 0.1 spellings: `--section.key value` -> `--key value`, and a YAML list value `"[a, b]"` -> `a b`."""
    types = field_types()
    result: list[str] = []
    list_value_next = False
    for token in argv:
        if list_value_next and token.startswith("["):
            result.extend(yaml_list(token))
            list_value_next = False
            continue
        list_value_next = False
        if token.startswith("--"):
            name, equals, value = token[2:].partition("=")
            if "." in name:
                section, _, key = name.partition(".")
                if key not in types or types[key][0] != section:
                    raise SystemExit(f"error: unknown option --{name}{did_you_mean(key, types)}")
                name = key
            key = name.replace("-", "_")
            is_list = key in types and get_origin(split_optional(types[key][1])[0]) is list
            if is_list and equals and value.startswith("["):
                result.extend([f"--{name}", *yaml_list(value)])
                continue
            list_value_next = is_list and not equals
            token = f"--{name}{equals}{value}"
        result.append(token)
    return result


def yaml_list(text: str) -> list[str]:
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        return [text]  # argparse reports it
    return [str(item) for item in items] if isinstance(items, list) else [text]


def parse_args(argv: list[str] | None = None) -> Arguments:
    """Dataclass defaults < the `--config` YAML < the command line."""
    argv = modernize(list(sys.argv[1:] if argv is None else argv))
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("--config")
    config_path = config_parser.parse_known_args(argv)[0].config
    parser = build_parser(yaml_defaults(Path(config_path)) if config_path else None)
    try:
        *sections, _, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a __post_init__ check
        raise SystemExit(f"error: {error}") from error
    if unknown:
        types = field_types()
        names = [t for t in unknown if t.startswith("-")] or unknown
        hints = "".join(did_you_mean(t.lstrip("-").partition("=")[0], types) for t in names[:1])
        raise SystemExit(f"error: unknown option(s) {' '.join(unknown)}{hints} See --help.")
    return Arguments(*sections)


# --------------------------------------------------------------------------------------------- trackers

TRACKER_PACKAGES = {"comet_ml": "comet-ml"}  # pip names that differ from the tracker's


def tracker_installed(name: str) -> bool:
    """Accelerate's own check (`is_wandb_available`, ...); a tracker it has no check for is left to Accelerate."""
    available = getattr(accelerate.utils, f"is_{name}_available", None)
    return available is None or available()


def resolve_trackers(report_to: str) -> list[str]:
    """`--report_to` as Accelerate's `log_with`: known names only, each with its package installed."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    known = [t.value for t in LoggerType]
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if accelerate.utils.is_tensorboard_available() else []
    unknown = [name for name in names if name not in known]
    if unknown or (len(names) > 1 and "all" in names):
        problem = f"unknown tracker(s) {unknown}" if unknown else "'all' cannot be combined with other trackers"
        raise SystemExit(
            f"error: --report_to {report_to!r}: {problem}; use 'auto', 'none', 'all' or a comma-separated list of "
            f"{[k for k in known if k != 'all']}."
        )
    missing = [name for name in names if not tracker_installed(name)]
    if missing:
        packages = " ".join(TRACKER_PACKAGES.get(name, name) for name in missing)
        what = f"the {missing[0]} package is" if len(missing) == 1 else f"the {', '.join(missing)} packages are"
        raise SystemExit(f"error: --report_to {report_to}: {what} not installed; pip install {packages}")
    return names


class RunLog:
    """JSONL log on the main process, mirrored to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path, use_trackers: bool) -> None:
        self.accelerator = accelerator
        self.path = path
        self.use_trackers = use_trackers

    def __call__(self, record: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.accelerator.device.type == "cuda":  # the peak so far, to size batches and input sizes
            record = {**record, "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


# ----------------------------------------------------------------------------------------------------- data


def load_pairs(data: DataArguments, num_classes: int, output_dir: Path, accelerator: Accelerator) -> dict[str, Any]:
    """The train/validation/test records, with problems reported and splits written next to the run."""
    problems: list = []
    if data.dataset:
        items = load_hub_dataset(data.dataset, data.dataset_split, data.image_column, data.mask_column)
        stems = list(items["stem"])
    else:
        if not data.data_dir:
            raise SystemExit("error: set --data_dir (a folder with images/ and masks/) or --dataset (a Hub id).")
        pairs, problems = discover_pairs(data.data_dir)
        items, problems = validate_pairs(
            pairs, data.mask_classes or num_classes, data.on_error, problems, mask_values(data)
        )
        if not items:
            raise SystemExit(f"error: --data_dir {data.data_dir}: no usable image/mask pairs.")
        stems = [pair.stem for pair in items]
    splits = choose_splits(stems, data)
    index = {stem: i for i, stem in enumerate(stems)}
    if data.dataset:
        result = {name: items.select([index[s] for s in names]) for name, names in splits.items()}
    else:
        result = {name: [items[index[s]] for s in names] for name, names in splits.items()}
    if accelerator.is_main_process:
        write_splits(splits, output_dir / "splits.json", seed=data.split_seed, source=data.dataset or data.data_dir)
        if problems:
            (output_dir / "data_problems.txt").write_text("\n".join(str(p) for p in problems) + "\n")
            for problem in problems:
                accelerator.print(f"skipped {problem}")
    if not len(result["train"]):
        raise SystemExit("error: the train split is empty.")
    return result


def mask_values(data: DataArguments) -> dict[int, int] | None:
    try:
        return parse_mask_values(data.mask_values) if data.mask_values else None
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def report_empty_masks(train_set: SegmentationDataset, output_dir: Path, accelerator: Accelerator) -> None:
    """Masks with no foreground make no box-prompted sample: say which, beside the other data problems."""
    if not train_set.empty_stems or not accelerator.is_main_process:
        return
    stems = train_set.empty_stems
    accelerator.print(f"{len(stems)} training mask(s) have no foreground and make no sample (data_problems.txt)")
    with (output_dir / "data_problems.txt").open("a") as handle:
        handle.writelines(f"{stem}: empty mask (no foreground), no box prompt: not trained on\n" for stem in stems)


def record_class_names(config, data: DataArguments) -> None:
    """A multi-class folder's `classes.json` names go into the config (`id2label`, `label2id`) and so the card."""
    if not data.data_dir:
        return
    try:
        names = read_class_names(data.data_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if names:
        config.id2label = {int(i): name for i, name in sorted(names.items())}
        config.label2id = {name: int(i) for i, name in sorted(names.items())}


def choose_splits(stems: list[str], data: DataArguments) -> dict[str, list[str]]:
    """`--split_file`'s stems (all present in the data) or a seeded split of the stems."""
    if not data.split_file:
        return make_splits(stems, data.split_seed, data.split_fractions, data.group_pattern)
    splits = load_splits(data.split_file)
    known = set(stems)
    unknown = [s for names in splits.values() for s in names if s not in known]
    if unknown:
        raise SystemExit(f"error: --split_file {data.split_file}: stems not in the data: {unknown[:5]}")
    return splits


def as_records(split):
    return records_from_pairs(split) if isinstance(split, list) else split


def build_loaders(args: Arguments, splits: dict, processor, num_classes: int):
    """Training and validation datasets and loaders."""
    data, run = args.data, args.training
    data_config = DataConfig(
        num_classes=num_classes,
        augment=DataConfig().augment if data.augment else None,
        box_jitter=data.box_jitter,
        prompt=data.prompt,
        class_prompts=data.class_prompts,
        mask_classes=data.mask_classes,
        all_classes_per_sample=data.all_classes_per_sample,
        max_prompts_per_sample=data.max_prompts_per_sample,
        mask_values=mask_values(data),
        max_clicks=data.max_clicks,
    )
    train_set = SegmentationDataset(as_records(splits["train"]), processor, data_config, train=True, seed=run.seed)
    val_set = SegmentationDataset(as_records(splits["validation"]), processor, data_config, train=False)
    if run.max_eval_samples and len(val_set) > run.max_eval_samples:
        kept = np.linspace(0, len(val_set) - 1, run.max_eval_samples).round().astype(int).tolist()
        val_set = torch.utils.data.Subset(val_set, kept)
    # Loaders draw their worker seeds from their own generators: starting an iterator (as a resume does at a
    # different moment than the original run) must not consume the global RNG that dropout uses.
    loader_kwargs = dict(collate_fn=collate, num_workers=run.num_workers)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=run.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(run.seed),
        **loader_kwargs,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=run.eval_batch_size, generator=torch.Generator(), **loader_kwargs
    )
    return train_set, val_set, train_loader, val_loader


# ---------------------------------------------------------------------------------------------------- model


def build_model(model_args: ModelArguments):
    """The backbone with only the config keys that were set changed, wrapped in the I-MedSAM adapter."""
    spec = model_args.backbone
    try:
        base, processor = load_model(
            spec, image_size=model_args.image_size, config_overrides=model_args.config_changes(), eval_mode=False
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --backbone {spec}: {error}") from error
    # A fine-tuned checkpoint keeps the backbone it was trained from; never a path of this machine.
    if not base.config.base_model:
        base.config.base_model = portable_model_name(spec)
    try:
        model = get_peft_model(base, imedsam_peft_config(base.config, **model_args.peft_overrides))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: --peft_overrides {model_args.peft_overrides}: {error}") from error
    return model, processor


# ---------------------------------------------------------------------------------------------- checkpoints


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights (and the running statistics of trainable BatchNorm layers)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    modules = {n.rpartition(".")[0] for n in names}
    state = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key in names or (
            owner in modules and key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        ):
            state[key] = value.detach().cpu().contiguous()
    return state


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """`save_state` writes only trainable weights (a few MB instead of the whole backbone)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(
                    trainable_state(accelerator.unwrap_model(model)),
                    os.path.join(output_dir, f"trainable_{i}.safetensors"),
                )
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            state = load_file(os.path.join(input_dir, f"trainable_{len(models)}.safetensors"))
            result = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"{input_dir}: checkpoint keys not in the model: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


MANIFEST = "manifest.json"


def write_manifest(path: Path) -> None:
    """Every file of a checkpoint with its size and sha256, written last: a checkpoint without it is incomplete."""
    files = {f.name: {"size": f.stat().st_size, "sha256": sha256(f)} for f in sorted(path.iterdir()) if f.is_file()}
    temporary = path / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps({"files": files}, indent=1))
    os.replace(temporary, path / MANIFEST)


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return sha_fileobj(handle).hex()


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a missing, truncated or changed file), or None when its manifest holds."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (it is written last: the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({error})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} has {file.stat().st_size} bytes, {expected['size']} when saved (truncated?)"
        if sha256(file) != expected["sha256"]:
            return f"{file} changed since it was saved (sha256 differs)"
    return None


def latest_checkpoint(output_dir: Path, report=print) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer one skipped is reported with its reason."""
    checkpoints = sorted(
        (p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        report(f"skipping checkpoint {path}: {problem}")
    return None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def validation_dice(model, loader, accelerator: Accelerator) -> float:
    """Mean Dice over the validation split, on the input frame's unpadded area (exact boxes)."""
    model.eval()
    scores = []
    for batch in loader:
        classes, num_classes = batch.get("prompt_classes"), model_config(model).num_classes
        aware = classes is not None and num_classes > 1  # class-aware prompts: each its own class's heads
        outputs = model(
            pixel_values=batch["pixel_values"],
            input_boxes=batch["input_boxes"],
            input_classes=classes.clamp(1, num_classes) if aware else None,
        )
        labels, sizes = batch["labels"], batch["reshaped_size"]
        if "prompt_classes" in batch:  # one row per real prompt, its class's mask as the target
            outputs, labels = prompt_rows(outputs, labels, batch["prompt_classes"])
            sizes = sizes.repeat_interleave(batch["prompt_classes"].shape[1], 0)[batch["prompt_classes"].flatten() != 0]
        predicted = IMedSamProcessor.post_process_masks(outputs.logits)
        values = []
        for pred, target, (h, w) in zip(predicted, labels, sizes.tolist()):
            if not target[:h, :w].any():  # nothing to find (prompt-free samples only): no Dice, never a free 1.0
                continue
            values.append(dice(pred[:h, :w] > 0, target[:h, :w] > 0))
        scores.append(torch.tensor(values, device=accelerator.device))
    model.train()
    if not scores:
        return float("nan")
    return accelerator.gather_for_metrics(torch.cat(scores)).mean().item()


def final_evaluation(
    args: Arguments, model, processor, splits: dict, num_classes: int, output_dir: Path
) -> dict[str, Any]:
    """Test-split scores of the selected model and, with `--baseline`, of the zero-shot backbone."""
    evaluation = args.evaluation
    split = splits.get(evaluation.split)
    if split is None or not len(split):
        return {}
    # Folder splits are SegmentationPairs already; Hub-dataset rows carry decoded images, which work the same way.
    pairs = split if isinstance(split, list) else [SegmentationPair(r["stem"], r["image"], r["mask"]) for r in split]
    kwargs = dict(
        output_sizes=evaluation.output_sizes,
        prompt=args.data.prompt,
        num_classes=num_classes,
        class_prompts=args.data.class_prompts,
        mask_classes=args.data.mask_classes,
    )
    class_names = read_class_names(args.data.data_dir) if args.data.data_dir and args.data.class_prompts else None
    if class_names:
        kwargs["class_names"] = class_names
    # Per scan too (3D Dice; HD95 with a cases.csv), when the slices of scans were class-prompted.
    kwargs.update(
        group_pattern=args.data.group_pattern,
        spacing=default_scan_spacing(args.data.data_dir) if args.data.data_dir else None,
        progress=True,
    )
    rows, summary, volume = evaluate_with_volumes(model, processor, pairs, **kwargs)
    results = {"n_images": len(pairs), "split": evaluation.split, "results": summary}
    if volume is not None:
        results["volume"] = volume
    if evaluation.baseline:
        base_rows, base_summary, base_volume = evaluate_with_volumes(model, processor, pairs, **kwargs, baseline=True)
        results["baseline_sam"] = base_summary
        if base_volume is not None:
            base_summary["volume"] = base_volume
        rows += [{**r, "model": "baseline_sam"} for r in base_rows]
    with (output_dir / "eval_per_image.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(json.dumps({"test": summary, "baseline_sam": results.get("baseline_sam")}, indent=1))
    return results


# ---------------------------------------------------------------------------------------------------- main


def make_accelerator(args: Arguments, trackers: list[str]) -> Accelerator:
    output_dir = Path(args.training.output_dir)
    return Accelerator(
        gradient_accumulation_steps=args.training.gradient_accumulation_steps,
        # None: the value of `accelerate launch` / `accelerate config` / ACCELERATE_MIXED_PRECISION.
        mixed_precision=args.training.mixed_precision,
        log_with=trackers or None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


@dataclass
class Run:
    """What the training loop works with, prepared by Accelerate."""

    args: Arguments
    accelerator: Accelerator
    model: Any
    optimizer: Any
    scheduler: Any
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    train_loader: Any
    val_loader: Any
    num_classes: int
    max_steps: int
    epochs: int
    log: RunLog
    hub_api: Any = None
    deadline: float | None = None  # clock() past which training stops (--max_train_minutes)
    card_sections: dict[str, dict[str, Any]] | None = None  # the trained run's options (--finish_only)
    futures: list = field(default_factory=list)
    state: dict[str, Any] = field(
        default_factory=lambda: {
            "epoch": 0,
            "batches_done": 0,
            "global_step": 0,
            "best_val_dice": -1.0,
            "best_step": None,
        }
    )

    @property
    def output_dir(self) -> Path:
        return Path(self.args.training.output_dir)


def resume(run: Run) -> None:
    choice = run.args.training.resume_from_checkpoint
    if not choice:
        return
    if choice == "latest":
        path = latest_checkpoint(run.output_dir, run.accelerator.print)
        if path is None:
            run.accelerator.print(f"no complete checkpoint in {run.output_dir / 'checkpoints'}: starting from scratch")
            return
    else:
        path = Path(choice)
        problem = checkpoint_problem(path) if path.is_dir() else "not a folder"
        if problem is not None:
            raise SystemExit(
                f"error: --resume_from_checkpoint {choice}: {problem}; use 'latest' for the newest good one."
            )
    run.accelerator.load_state(str(path))
    run.state = json.loads((path / "training_state.json").read_text())
    run.accelerator.print(f"resumed from {path} (epoch {run.state['epoch']}, step {run.state['global_step']})")


def prepare_finish_only(run: Run) -> None:
    """`--finish_only`: the run's best weights and bookkeeping (best/), and the options it was trained with."""
    best = run.output_dir / "best"
    if not (best / "trainable.safetensors").is_file():
        raise SystemExit(
            f"error: --finish_only: {best / 'trainable.safetensors'} not found; it is written at each validation that "
            "improves on the best Dice (train first, or point --output_dir at the run's folder)."
        )
    if (best / "state.json").is_file():
        run.state = json.loads((best / "state.json").read_text())
    saved = run.output_dir / "config.yaml"
    if saved.is_file():
        run.card_sections = yaml.safe_load(saved.read_text())
    run.accelerator.print(f"finishing from {best} (step {run.state.get('best_step')}), no training")


def save_checkpoint(run: Run) -> None:
    """A resumable checkpoint (trainable weights, optimizer, scheduler, RNG, data position), uploaded if pushing."""
    path = run.output_dir / "checkpoints" / f"checkpoint-{run.state['global_step']}"
    run.accelerator.wait_for_everyone()
    run.accelerator.save_state(str(path))
    run.accelerator.wait_for_everyone()  # every process's RNG file is written before the manifest lists them
    if run.accelerator.is_main_process:
        (path / "training_state.json").write_text(json.dumps(run.state))
        write_manifest(path)
        prune_checkpoints(run.output_dir, run.args.training.checkpoints_total_limit)
        if run.hub_api is not None:
            run.futures.append(
                run.hub_api.upload_folder(
                    repo_id=run.args.hub.hub_model_id,
                    folder_path=str(path),
                    path_in_repo=f"checkpoints/{path.name}",
                    commit_message=f"checkpoint {path.name}",
                    run_as_future=True,
                )
            )
    run.accelerator.wait_for_everyone()


def train_epoch(run: Run, progress) -> None:
    """One epoch's steps from the data position in `run.state` (a resumed run skips the batches already done)."""
    accelerator, state, config = run.accelerator, run.state, run.args.training
    epoch = state["epoch"]
    run.train_loader.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    loader = (
        accelerator.skip_first_batches(run.train_loader, state["batches_done"])
        if state["batches_done"]
        else run.train_loader
    )
    weights = LossWeights(
        dice_weight=config.dice_weight,
        bce_weight=config.bce_weight,
        fine_weight=fine_weight_at(epoch, config.fine_weight_warmup_epochs),
        composition=config.loss_composition,
    )
    fraction = anneal_coordinates(accelerator.unwrap_model(run.model), epoch, config.coordinate_annealing_epochs)
    for batch in loader:
        with accelerator.accumulate(run.model):
            loss, parts = forward_and_loss(
                run.model,
                batch,
                run.num_classes,
                weights,
                train_points=config.train_points,
                use_box_prompts=run.args.data.prompt == "box",
                click_probability=config.click_probability,
                box_point_fraction=config.box_point_fraction,
            )
            accelerator.backward(loss)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
        state["batches_done"] += 1
        if not accelerator.sync_gradients:
            continue
        state["global_step"] += 1
        progress.update(1)
        progress.set_postfix(loss=f"{parts['loss']:.3f}")
        record = {**parts, "epoch": epoch, "fine_weight": weights.fine_weight, "lr": run.scheduler.get_last_lr()[0]}
        if config.coordinate_annealing_epochs:
            record["coordinate_fraction"] = fraction
        run.log(record, state["global_step"])
        every = config.checkpoint_every
        if isinstance(every, int) and every > 0 and state["global_step"] % every == 0:
            save_checkpoint(run)
        if state["global_step"] < run.max_steps and time_is_up(run):
            accelerator.print(
                f"--max_train_minutes {config.max_train_minutes} reached: stopping at step {state['global_step']}"
            )
            run.max_steps = state["global_step"]
            state["stopped_by_time"] = True
        if state["global_step"] >= run.max_steps or state["global_step"] == config.stop_after_steps:
            break


clock = time.monotonic  # the clock of --max_train_minutes (tests replace it)


def time_is_up(run: Run) -> bool:
    """Whether `--max_train_minutes` has passed, decided by the main process so that every process stops together."""
    if run.deadline is None:
        return False
    flag = torch.tensor([int(clock() >= run.deadline)], device=run.accelerator.device)
    return bool(accelerate.utils.broadcast(flag, from_process=0).item())


def end_epoch(run: Run) -> None:
    """Validation (model selection on the validation split only) and the epoch's checkpoint."""
    accelerator, state, config = run.accelerator, run.state, run.args.training
    state["epoch"] += 1
    state["batches_done"] = 0
    if state["epoch"] % config.eval_every_epochs == 0 or state["global_step"] >= run.max_steps:
        score = validation_dice(run.model, run.val_loader, accelerator) if len(run.val_set) else float("nan")
        run.log({"val_dice": score, "epoch": state["epoch"]}, state["global_step"])
        accelerator.print(f"epoch {state['epoch']}: validation Dice {score:.4f}")
        if not math.isnan(score) and score > state["best_val_dice"] or state["best_step"] is None:
            state["best_val_dice"], state["best_step"] = score, state["global_step"]
            if accelerator.is_main_process:
                (run.output_dir / "best").mkdir(exist_ok=True)
                save_file(
                    trainable_state(accelerator.unwrap_model(run.model)),
                    str(run.output_dir / "best" / "trainable.safetensors"),
                )
                (run.output_dir / "best" / "state.json").write_text(json.dumps(state))
    if config.checkpoint_every == "epoch":
        save_checkpoint(run)


def train(run: Run) -> bool:
    """The training loop; False when it stopped at `--stop_after_steps` (as if killed)."""
    state, config = run.state, run.args.training
    progress = tqdm(
        total=run.max_steps,
        initial=state["global_step"],
        disable=not run.accelerator.is_local_main_process,
        desc="train",
    )
    run.model.train()
    try:
        while state["epoch"] < run.epochs and state["global_step"] < run.max_steps:
            train_epoch(run, progress)
            if state["global_step"] >= run.max_steps or state["batches_done"] >= len(run.train_loader):
                end_epoch(run)
            if state["global_step"] == config.stop_after_steps:
                run.accelerator.print(f"stopping after step {state['global_step']} (stop_after_steps), as if killed")
                return False
    finally:
        progress.close()
    return True


def load_trainable(model, path: Path) -> None:
    """Trainable weights saved by this script into `model`: every one of them, and nothing the model lacks."""
    try:
        state = load_file(str(path))
    except Exception as error:  # a truncated or foreign file
        raise SystemExit(f"error: {path}: not a readable safetensors file ({error}).") from error
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SystemExit(
            f"error: {path} does not fit this model ({len(missing)} trainable weights missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unknown, e.g. {unexpected[:2]}): build it with the run's own model options "
            "(--config <run>/config.yaml)."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes, e.g. another --num_classes
        raise SystemExit(f"error: {path} does not fit this model: {str(error).splitlines()[-1].strip()}") from error


def finish(run: Run, processor, splits: dict, parameters: tuple[int, int]) -> dict[str, Any]:
    """The best checkpoint (by validation Dice, never by test) becomes `final/`, evaluated, carded and pushed."""
    accelerator, state = run.accelerator, run.state
    results: dict[str, Any] = {"best_val_dice": state["best_val_dice"], "best_step": state["best_step"]}
    if not accelerator.is_main_process:
        return results
    peft_model = accelerator.unwrap_model(run.model)
    best = run.output_dir / "best" / "trainable.safetensors"
    if best.is_file():
        load_trainable(peft_model, best)
    peft_model.eval()
    final_dir = run.output_dir / "final"
    save_pretrained_full(peft_model, final_dir, processor=processor)
    results.update(final_evaluation(run.args, peft_model, processor, splits, run.num_classes, run.output_dir))
    sections = run.card_sections or run.args.sections(mixed_precision=accelerator.mixed_precision)
    results["mixed_precision"] = sections["training"].get("mixed_precision") or accelerator.mixed_precision
    write_model_card(
        final_dir,
        config=sections,
        results=results,
        splits={k: len(v) for k, v in splits.items()},
        trainable_parameters=parameters[0],
        total_parameters=parameters[1],
    )
    shutil.copy(run.output_dir / "splits.json", final_dir / "splits.json")
    for folder in (run.output_dir, final_dir):
        (folder / "eval_results.json").write_text(json.dumps(results, indent=1))
    if run.hub_api is not None:
        for future in run.futures:
            future.result()
        run.hub_api.upload_folder(
            repo_id=run.args.hub.hub_model_id, folder_path=str(final_dir), commit_message="final model and model card"
        )
    return results


def start(args: Arguments, trackers: list[str]) -> tuple[Accelerator, RunLog]:
    """The Accelerator, `config.yaml` (effective mixed precision, no token) and the run log."""
    output_dir = Path(args.training.output_dir)
    accelerator = make_accelerator(args, trackers)
    set_seed(args.training.seed)
    sections = args.sections(mixed_precision=accelerator.mixed_precision)
    keep = args.training.finish_only and (output_dir / "config.yaml").is_file()  # the trained run's, not ours
    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not keep:
            (output_dir / "config.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.init_trackers(
            "imedsam", config={f"{s}.{k}": str(v) for s, d in sections.items() for k, v in d.items()}
        )
    return accelerator, RunLog(accelerator, output_dir / "logs" / "train_log.jsonl", bool(trackers))


def main(argv: list[str] | None = None, hub_api: HfApi | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run_args = args.training
    trackers = resolve_trackers(run_args.report_to)
    if run_args.num_threads:
        torch.set_num_threads(run_args.num_threads)
    accelerator, log = start(args, trackers)
    output_dir = Path(run_args.output_dir)

    model, processor = build_model(args.model)
    # From here on the loaded model's config is the truth (a checkpoint keeps its own num_classes and switches).
    num_classes = model.config.num_classes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,}")
    if args.data.class_prompts and num_classes != 1 and not args.data.all_classes_per_sample:
        raise SystemExit(
            "error: --class_prompts makes one binary sample per class and box: use --num_classes 1, or add "
            "--all_classes_per_sample true for class-aware prompts (one head per class)."
        )
    if run_args.click_probability > 0 and not args.data.max_clicks:
        raise SystemExit("error: --click_probability needs clicks in the samples: set --max_clicks N (e.g. 3).")
    if args.data.max_clicks and args.data.all_classes_per_sample:
        raise SystemExit(
            "error: --max_clicks takes one structure per sample; it does not combine with --all_classes_per_sample."
        )
    record_class_names(model.get_base_model().config, args.data)

    try:
        splits = load_pairs(args.data, num_classes, output_dir, accelerator)
    except ValueError as error:  # bad data: one clear message naming the files, nothing half-written
        raise SystemExit(f"error: {error}") from error
    try:  # a Hub dataset's masks are first read here (a folder's were checked in load_pairs)
        train_set, val_set, train_loader, val_loader = build_loaders(args, splits, processor, num_classes)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    report_empty_masks(train_set, output_dir, accelerator)
    if not len(train_set):
        raise SystemExit(
            f"error: no training samples: every mask of the train split is empty ({output_dir / 'data_problems.txt'})."
        )

    optimizer = torch.optim.AdamW(
        parameter_groups(
            model,
            run_args.learning_rate,
            run_args.implicit_learning_rate,
            run_args.weight_decay,
            run_args.mask_decoder_learning_rate,
        )
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / run_args.gradient_accumulation_steps)
    max_steps = run_args.max_train_steps or run_args.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(
        optimizer, run_args.warmup_steps * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    register_checkpoint_hooks(accelerator)
    run = Run(
        args=args,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_set=train_set,
        val_set=val_set,
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=num_classes,
        max_steps=max_steps,
        epochs=math.ceil(max_steps / steps_per_epoch),
        log=log,
    )
    if run_args.finish_only:
        prepare_finish_only(run)
    else:
        resume(run)
    if args.hub.push_to_hub and accelerator.is_main_process:
        run.hub_api = hub_api or HfApi(token=args.hub.hub_token)
        run.hub_api.create_repo(args.hub.hub_model_id, private=args.hub.hub_private, exist_ok=True)

    if run_args.max_train_minutes:
        run.deadline = clock() + 60 * run_args.max_train_minutes
    if not run_args.finish_only and not train(run):
        accelerator.end_training()
        return {"stopped_at_step": run.state["global_step"]}
    accelerator.wait_for_everyone()
    results = finish(run, processor, splits, (trainable, total))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
