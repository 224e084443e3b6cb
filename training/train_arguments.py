"""The options of `training/train.py`: typed dataclasses, one per section of a `--config` YAML, parsed by
`transformers.HfArgumentParser`.

Precedence: dataclass defaults < the `--config` YAML < the command line. YAML values become the parser's defaults,
checked with the parser's own types (an unknown section or key, or a value of the wrong type, names the file and
the key). Options are spelled with dashes (`--data-dir`); the underscore spelling (`--data_dir`) is accepted too.
"""

import argparse
import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from accelerate.utils import LoggerType
from transformers import HfArgumentParser

from imedsam_hf.data import DEFAULT_GROUP_PATTERN
from imedsam_hf.evaluation import NATIVE, parse_size
from imedsam_hf.volumes import check_window

# No `from __future__ import annotations`: HfArgumentParser reads the dataclass fields' real types, and the tests
# load train.py without registering it in sys.modules.


def option(default: Any, help: str) -> Any:
    """A dataclass field with its `--help` text (lists and dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    """The backbone and the I-MedSAM config keys to change. `None` keeps what the backbone's config says."""

    _argument_group_name = "model"

    backbone: str = option(
        "litemedsam",
        "'litemedsam', a shipped model's name, an I-MedSAM folder (a run's final/: fine-tuned again with the adapters "
        "and heads it was trained with), a SAM checkpoint (folder or Hub id) or Meta's SAM .pth file.",
    )
    image_size: int | None = option(
        None, "Input size of a SAM checkpoint's conversion (None: its own; LiteMedSAM is 256 px and takes no other)."
    )
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
    num_classes: int | None = option(
        None, "Output channels, one per foreground class (None: the backbone's, or the data's classes.json)."
    )
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
    dataset: str | None = option(
        None, "A Hub dataset id, or a local dataset folder (parquet files, save_to_disk), instead of --data-dir."
    )
    dataset_config: str | None = option(None, "Configuration (subset) of --dataset, for datasets that have several.")
    dataset_split: str = option(
        "train",
        "Split of --dataset to train on; the dataset's own validation and test splits (with masks) are kept, the "
        "missing ones cut from this one.",
    )
    image_column: str = option("image", "Image column of --dataset.")
    mask_column: str = option("mask", "Mask column of --dataset.")
    stem_column: str | None = option(
        None,
        "Column of --dataset naming each row (a file name such as case0001_slice061.png), so that a scan's slices "
        "stay in one split (the group pattern); default: a `stem` column, else <split>-<row>.",
    )
    split_file: str | None = option(
        None,
        "JSON {train: [...], validation: [...], test: [...]} instead of a split: image stems or scans' names (case0001 "
        "for its slices); or a MONAI datalist (training, validation), or nnU-Net's splits_final.json (--split-fold).",
    )
    split_fold: int | None = option(None, "The fold (0..4) of nnU-Net's splits_final.json as the split file.")
    split_seed: int = option(0, "Seed of the train/validation/test shuffle.")
    split_fractions: list[float] = option([0.6, 0.2, 0.2], "Train, validation and test fractions (sum 1).")
    group_pattern: str = option(
        DEFAULT_GROUP_PATTERN,
        "Regex whose first group is a stem's scan or patient: splits keep each group whole (the default takes the "
        "stem before `_slice`; a stem it does not match, kept in a folder per case and named <folder>_<n> as Kaggle's "
        "LGG MRI slices, is its folder's; other stems are their own group).",
    )
    on_error: Literal["skip", "fail"] = option("skip", "Unusable image/mask files: skip them (listed) or stop.")
    augment: bool = option(True, "Random affine, flip, colour and blur augmentation in training.")
    box_jitter: float = option(0.1, "Training boxes: each side moves by up to this fraction of the box size.")
    box_jitter_probability: float = option(
        1.0, "The share of training boxes jittered by --box-jitter; the others stay exact (tight boxes still seen)."
    )
    neighbour_box_probability: float = option(
        0.0,
        "Volume slices (stems ending in the slice number, scans by --group-pattern): the share of training samples "
        "whose boxes come from a slice up to --neighbour-box-distance away, widened by --neighbour-box-margin pixels "
        "(the boxes 3-D box propagation gives; such samples keep only photometric augmentation).",
    )
    neighbour_box_distance: int = option(2, "Neighbour boxes: the largest slice distance of the neighbour.")
    neighbour_box_margin: float = option(3.0, "Neighbour boxes: pixels added on each side (propagation's 3).")
    neighbour_box_jitter: float = option(
        0.0,
        "Neighbour boxes: then each side moves by up to this fraction of the box's size, either way (the drift of "
        "boxes propagated from imperfect masks; 0: none).",
    )
    extent_box_probability: float = option(
        0.0,
        "Volume slices, as the neighbour boxes: the share of training samples whose boxes are each structure's "
        "in-plane extent over its scan (what a 3-D box prompts its middle slice with; loose for winding structures). "
        "Drawn after the neighbour boxes: the two shares add up to at most 1.",
    )
    propagated_box_probability: float = option(
        0.0,
        "Volume slices, drawn after the neighbour and extent boxes: the share of training samples whose boxes are ones "
        "a model was prompted with when it propagated a 3-D box or a key slice through the sample's scan "
        "(--propagated-boxes; one drawn per structure, the others keep their own box).",
    )
    propagated_boxes: str | None = option(
        None,
        "JSON file {stem: {class id: [[x0, y0, x1, y1], ...]}} (stored pixels) of the propagated boxes, as "
        "training/propagated_boxes.py writes it.",
    )
    prompt: Literal["box", "none"] = option("box", "Prompt: the mask's box, or none (prompt-free).")
    class_prompts: bool | None = option(
        None,
        "Multi-class masks: one binary sample per class present, with its own box (default: on for class-id masks, a "
        "classes.json beside masks/ or --mask-classes, with a one-class model or --all-classes-per-sample).",
    )
    all_classes_per_sample: bool = option(
        False,
        "With --class-prompts: one sample per image carrying every class present as a prompt (one encoder pass "
        "per image, the loss averaged over its prompts) instead of one sample per class.",
    )
    max_prompts_per_sample: int | None = option(
        None,
        "With --all-classes-per-sample: at most N structures of an image prompt its training sample, rarer classes "
        "drawn more often (None: all).",
    )
    mask_classes: int | None = option(None, "Foreground class ids in the masks (None: the model's num_classes).")
    max_clicks: int = option(
        0,
        "Training samples also carry 1..N random positive clicks inside their structure (0: none; see "
        "--click-probability).",
    )
    mask_values: str | None = option(
        None,
        "Stored mask value -> class id, e.g. '38:1,75:1' (two values, one foreground) or '38:1,75:2' (None: a binary "
        "mask's one non-zero value is the foreground, class-id masks as they are; anything else is an error).",
    )
    name: str | None = option(
        None, "The data's name for the config and the model card (None: the folder's name or the Hub id)."
    )
    license: str | None = option(None, "The data's licence or terms, for the config and the model card.")
    citation: str | None = option(None, "The data's citation, for the config and the model card.")
    window: str | None = option(
        None,
        "The intensity window the training images were made with from raw volumes: a preset (btcv, abdomen, ...), "
        "'level,width' in HU or 'mr'. Recorded in the model (config.training_data['window']), so that imedsam predict "
        "and segment_volume apply it to raw volumes (default: the data folder's cases.csv, as imedsam convert volumes "
        "--window writes it). Training images still in HU (2-D CT .mha / .nii.gz) are windowed with it.",
    )
    rescale_intercept: float | None = option(
        None,
        "16-bit grey pictures (PNG, TIFF) storing CT as HU plus an offset: HU = stored value + this (DICOM's "
        "RescaleIntercept; DeepLesion's PNGs: -32768), then windowed with --window (needed with it), as imedsam predict "
        "--rescale-intercept reads them (default: pictures as they are, 16-bit ones rescaled min-max).",
    )
    provenance_for: str | None = option(
        None,
        "The data folder (its name) that name, license and citation describe, as a recipe records them; training "
        "on another folder with them is an error unless name, license and citation are given for it.",
    )

    def __post_init__(self) -> None:
        if self.window is not None:
            try:
                check_window(self.window)
            except ValueError as error:
                raise ValueError(f"--window: {error}") from None
        if not 0.0 <= self.box_jitter_probability <= 1.0:
            raise ValueError(f"--box-jitter-probability {self.box_jitter_probability}: a probability in [0, 1].")
        if not 0.0 <= self.neighbour_box_probability <= 1.0:
            raise ValueError(f"--neighbour-box-probability {self.neighbour_box_probability}: a probability in [0, 1].")
        if not 0.0 <= self.extent_box_probability <= 1.0 - self.neighbour_box_probability:
            raise ValueError(
                f"--extent-box-probability {self.extent_box_probability}: a probability in [0, 1] that, with "
                f"--neighbour-box-probability {self.neighbour_box_probability}, adds up to at most 1."
            )
        borrowed = self.neighbour_box_probability + self.extent_box_probability
        if not 0.0 <= self.propagated_box_probability <= 1.0 - borrowed:
            raise ValueError(
                f"--propagated-box-probability {self.propagated_box_probability}: a probability in [0, 1] that, with "
                f"--neighbour-box-probability and --extent-box-probability ({borrowed:g}), adds up to at most 1."
            )
        if (self.propagated_box_probability > 0) != (self.propagated_boxes is not None):
            raise ValueError(
                "--propagated-box-probability and --propagated-boxes go together: the share of samples and the JSON "
                "file of the boxes (training/propagated_boxes.py writes it)."
            )
        if not 0.0 <= self.neighbour_box_jitter < 1.0:
            raise ValueError(
                f"--neighbour-box-jitter {self.neighbour_box_jitter}: a fraction of the box's size in [0, 1)."
            )
        if self.neighbour_box_distance < 1 or self.neighbour_box_margin < 0:
            raise ValueError(
                f"--neighbour-box-distance {self.neighbour_box_distance} / --neighbour-box-margin "
                f"{self.neighbour_box_margin}: a distance >= 1 slice and a margin >= 0 pixels."
            )


@dataclass
class RunArguments:
    """The training recipe and the run's bookkeeping (YAML section `training`)."""

    _argument_group_name = "training"

    output_dir: str = option("outputs/imedsam", "Folder the run writes into.")
    epochs: int = option(10, "Training epochs (unless --max-train-steps).")
    max_train_steps: int | None = option(None, "Optimizer steps in total; overrides --epochs.")
    max_train_minutes: float | None = option(
        None,
        "Wall-clock budget of the training loop: past it, the run stops after the current step, validates and "
        "finishes as at its last step (the learning-rate schedule keeps the planned --max-train-steps length).",
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
        "AdamW learning rate of SAM's mask decoder when it is trained (--peft-overrides "
        '\'{"train_mask_decoder": "transformer"}\'), apart from its output upscaling (None: --learning-rate).',
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
        "With --train-points and box prompts: the share of each prompt's points drawn inside its box (widened by "
        "a tenth of its size) instead of over the whole image, so small structures get their share.",
    )
    freeze_image_encoder: bool = option(
        False,
        "Train the prompt side only (prompt encoder, mask decoder, implicit decoder): the image encoder, with its "
        "LoRA and frequency adapter as they are, runs without gradients; with --no-augment each image is encoded "
        "once and its embeddings kept in memory (about 4 MB per 256-px image), ~25x faster steps on a CPU. For "
        "fine-tuning a trained model's decoders, e.g. on new kinds of prompts.",
    )
    embedding_cache_dir: str | None = option(
        None,
        "With --freeze-image-encoder --no-augment: also keep each image's embeddings on disk in this folder (a "
        "subfolder per encoder, named by a hash of its weights; a file per image, named by a hash of its pixels), "
        "so a resumed run, or another run on the same images and encoder, reads them instead of encoding again "
        "(about 4 MB per 256-px image; the folder can be shared by runs and deleted at any time).",
    )
    dice_weight: float = option(0.8, "Weight of the Dice term of the loss.")
    bce_weight: float = option(0.2, "Weight of the BCE term of the loss.")
    click_probability: float = option(
        0.0, "With --max-clicks: the chance that a training step is prompted with the clicks instead of the boxes."
    )
    loss_composition: Literal["project", "released"] = option(
        "project",
        "'project': Dice+BCE on the coarse map plus the fine term on the refined points; 'released': the released "
        "code's Dice-only (1-a) Dice(coarse) + a Dice(output), a the fine weight (--fine-weight-warmup-epochs).",
    )
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = option(
        None, "Overrides the Accelerate config's mixed precision (None: accelerate launch / accelerate config decide)."
    )
    seed: int = option(0, "Seed of weights initialisation, augmentation, shuffling and point sampling.")
    num_workers: int = option(0, "DataLoader worker processes.")
    num_threads: int | None = option(None, "torch CPU threads (None: torch's default).")
    cpu_allocator: Literal["keep", "default"] = option(
        "keep",
        "On a CPU under glibc (Linux): 'keep' freed memory in the process instead of one mmap per large block "
        "(faster steps, more peak memory: docs/training.md); 'default' leaves malloc as it is. Allocator variables "
        "set by you (LD_PRELOAD of another malloc, MALLOC_*_, GLIBC_TUNABLES) always win.",
    )
    eval_every_epochs: int = option(
        1, "Validate (and select the best model) every this many epochs; 0: never (the last step is the model)."
    )
    max_eval_samples: int | None = option(
        None, "Validate on at most N samples, evenly spaced over the validation split (None: all of it)."
    )
    selection_box_jitter: float = option(
        0.0,
        "Select the model by the mean of two validation Dice scores, both by the protocol of `imedsam evaluate` at "
        "native size: with exact boxes and with every box side moved by up to this fraction of the box size (the "
        "boxes its box jitter draws with jitter seed 0). 0: by the exact-box validation Dice in the model's input "
        "frame (faster).",
    )
    selection_jitter_draws: int = option(
        1,
        "With --selection-box-jitter: score the jittered validation with K independent draws of the jittered boxes "
        "and take their mean (`imedsam evaluate --jitter-draws K`), a steadier selection signal at K times the cost "
        "of that scoring.",
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
            raise ValueError(f"--box-point-fraction {self.box_point_fraction}: a fraction in [0, 1].")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max-eval-samples {self.max_eval_samples}: at least 1 (or null for all).")
        if self.eval_every_epochs < 0:
            raise ValueError(f"--eval-every-epochs {self.eval_every_epochs}: 0 (never) or more.")
        if not 0.0 <= self.selection_box_jitter < 1.0:
            raise ValueError(
                f"--selection-box-jitter {self.selection_box_jitter}: a fraction of the box's size in [0, 1) "
                "(e.g. 0.1; 0 selects by exact boxes only)."
            )
        if self.selection_jitter_draws < 1:
            raise ValueError(f"--selection-jitter-draws {self.selection_jitter_draws}: at least 1 draw.")
        if self.selection_jitter_draws > 1 and not self.selection_box_jitter:
            raise ValueError(
                f"--selection-jitter-draws {self.selection_jitter_draws} draws the boxes of --selection-box-jitter "
                "again: set --selection-box-jitter F (e.g. 0.1), or leave the draws at 1."
            )
        if not 0.0 <= self.click_probability <= 1.0:
            raise ValueError(f"--click-probability {self.click_probability}: a probability in [0, 1].")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max-train-minutes {self.max_train_minutes}: expected a positive number of minutes.")
        if self.embedding_cache_dir is not None and not self.freeze_image_encoder:
            raise ValueError(
                "--embedding-cache-dir keeps a frozen encoder's embeddings: add --freeze-image-encoder (and "
                "--no-augment), or leave --embedding-cache-dir out."
            )
        if self.checkpointing_steps not in ("epoch", "no") and not str(self.checkpointing_steps).isdigit():
            raise ValueError(f"--checkpointing-steps {self.checkpointing_steps!r}: expected N, 'epoch' or 'no'.")

    @property
    def checkpoint_every(self) -> int | str:
        return int(self.checkpointing_steps) if str(self.checkpointing_steps).isdigit() else self.checkpointing_steps


@dataclass
class EvaluationArguments:
    """The final evaluation of the selected model."""

    _argument_group_name = "evaluation"

    final_evaluation: bool = option(True, "Score the selected model on --split at the end (false: skip it).")
    max_test_samples: int | None = option(
        None, "Score at most the first N pairs of --split (None: all; per-volume scores then cover those slices)."
    )
    output_sizes: list[str] = option([NATIVE], "Output resolutions: native, a factor like 0.5x or 2x, or pixels.")
    baseline: bool = option(True, "Also score the zero-shot backbone (its own SAM mask) on the same prompts.")
    split: Literal["train", "validation", "test", "all"] = option("test", "Split to score.")

    def __post_init__(self) -> None:
        for size in self.output_sizes:
            try:
                parse_size(size)
            except ValueError as error:
                raise ValueError(f"--output-sizes: {error}") from error
        if self.max_test_samples is not None and self.max_test_samples < 1:
            raise ValueError(f"--max-test-samples {self.max_test_samples}: at least 1 (or null for all).")


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
            raise ValueError("--push-to-hub needs --hub-model-id ORG/NAME.")


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
    given: frozenset = frozenset()  # option names set on the command line (not from the YAML or a default)

    def sections(self, mixed_precision: str | None = None) -> dict[str, dict[str, Any]]:
        """Plain dicts per section (config.yaml, the model card, trackers), never with the Hub token."""
        sections = {name: asdict(getattr(self, name)) for name in SECTIONS}
        sections["hub"]["hub_token"] = None
        if mixed_precision is not None:
            sections["training"]["mixed_precision"] = mixed_precision
        return sections


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


def _optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); dict-or-str options count as `dict`."""
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (dict if dict in args else args[0]), type(None) in get_args(hint)
    return hint, False


def _metavar(hint: Any) -> str | None:
    hint, _ = _optional(hint)
    if get_origin(hint) is Literal:
        return None  # argparse shows the choices
    if get_origin(hint) is list:
        return _metavar(get_args(hint)[0])
    return {dict: "JSON", bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(hint, "VALUE")


def _nullable(convert: Any) -> Any:
    """`null` on the command line sets an optional value to None (as in YAML)."""

    def parse(text: str) -> Any:
        return None if text == "null" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def build_parser(defaults: dict[str, Any] | None = None) -> HfArgumentParser:
    """
    HfArgumentParser over the sections, with `--config`, type names in `--help`, the dashed spelling shown (the
    underscore one accepted) and the YAML values as defaults.
    """
    parser = HfArgumentParser(
        tuple(SECTIONS.values()), description=__doc__.split("\n\n")[0], allow_abbrev=False, prog="train.py"
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file with model/data/training/evaluation/hub sections.")
    types = field_types()
    for action in parser._actions:
        if action.dest not in types:
            continue
        if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's complement of a true boolean
            action.help, action.default = f"Same as --{action.dest.replace('_', '-')} false.", argparse.SUPPRESS
            action.option_strings = [f"--no-{action.dest.replace('_', '-')}"]
            parser._option_string_actions[action.option_strings[0]] = action
            continue
        hint, optional = _optional(types[action.dest][1])
        action.metavar = _metavar(hint)
        if hint is dict:
            action.type = parse_mapping
        elif hint is bool and optional:  # `--use-lora` alone means true, as for the plain booleans
            action.nargs, action.const = "?", True
        if optional and hint is not dict and get_origin(hint) is not list:
            action.type = _nullable(action.type or str)
        dashed = f"--{action.dest.replace('_', '-')}"
        action.option_strings = [dashed]  # `--help` shows the dashed spelling; `--data_dir` still parses
        parser._option_string_actions[dashed] = action
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value through the option's own parser type (and choices), or a SystemExit naming `where`."""
    if value is None:
        return None
    convert = action.type or str
    try:
        if isinstance(value, Mapping) or convert is parse_mapping:
            converted = convert(value)
        elif isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ValueError(f"expected one {action.metavar or 'value'}, got a list")
            converted = [convert(str(item)) for item in value]
        else:
            converted = convert(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        if convert is parse_mapping:
            raise SystemExit(f"error: {where}: {error}") from None
        expected = action.metavar or f"one of {action.choices}"
        raise SystemExit(f"error: {where}: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise SystemExit(f"error: {where}: expected one of {list(action.choices)}, got {value!r}")
    if action.nargs in ("+", "*") and not isinstance(converted, list):
        converted = [converted]
    return converted


def yaml_defaults(path: Path, parser: HfArgumentParser) -> dict[str, Any]:
    """The `--config` file's values, checked with the parser's types; unknown sections and keys name the file."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"error: --config {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: --config {path}: expected sections {list(SECTIONS)}, got {type(loaded).__name__}.")
    types = field_types()
    actions = {action.dest: action for action in parser._actions}
    values: dict[str, Any] = {}
    for section, keys in loaded.items():
        keys = {} if keys is None else keys  # an empty section
        if section not in SECTIONS or not isinstance(keys, dict):
            raise SystemExit(f"error: --config {path}: unknown section {section!r}; expected {list(SECTIONS)}.")
        for key, value in keys.items():
            if key not in types or types[key][0] != section:
                raise SystemExit(f"error: --config {path}: unknown key {section}.{key}{did_you_mean(key, types)}")
            values[key] = _typed(actions[key], value, f"--config {path}: {section}.{key}")
    return values


def did_you_mean(name: str, types: dict[str, tuple[str, Any]]) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), list(types), n=1)
    return f" (did you mean {types[close[0]][0]}.{close[0]}?)" if close else "."


def parse_args(argv: list[str]) -> Arguments:
    """Dataclass defaults < the `--config` YAML < the command line."""
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("--config")
    config_path = config_parser.parse_known_args(argv)[0].config
    parser = build_parser()
    if config_path:
        parser.set_defaults(**yaml_defaults(Path(config_path), parser))
    try:
        *sections, _, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a __post_init__ check
        raise SystemExit(f"error: {error}") from error
    if unknown:
        types = field_types()
        names = [t for t in unknown if t.startswith("-")] or unknown
        hints = "".join(did_you_mean(t.lstrip("-").partition("=")[0], types) for t in names[:1])
        raise SystemExit(f"error: unknown option(s) {' '.join(unknown)}{hints} See --help.")
    given = frozenset(
        token[2:].partition("=")[0].replace("-", "_") for token in argv if token.startswith("--") and token != "--"
    )
    arguments = Arguments(*sections, given=given)
    cache_dir = arguments.training.embedding_cache_dir
    if cache_dir is not None and arguments.data.augment:
        raise SystemExit(
            f"error: --embedding-cache-dir {cache_dir}: augmented images differ at every step, so their embeddings "
            "cannot be kept; add --no-augment, or leave --embedding-cache-dir out."
        )
    return arguments


__all__ = [
    "Arguments",
    "DataArguments",
    "EvaluationArguments",
    "HubArguments",
    "MODEL_SWITCHES",
    "ModelArguments",
    "RunArguments",
    "SECTIONS",
    "build_parser",
    "field_types",
    "parse_args",
    "parse_mapping",
]
