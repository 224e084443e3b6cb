#!/usr/bin/env python
"""Fine-tune I-MedSAM on a folder of images and masks (or a Hub dataset) with Accelerate.

    accelerate launch training/train.py --config training/configs/litemedsam_polyp.yaml \
        [--data-dir DIR] [--output-dir DIR] [--epochs 3] [--refine-ratio 0.25] ...

The options are typed dataclasses, one per section of the `--config` YAML (`train_arguments.py`); `--help` lists
every one with its type and default. Precedence: defaults < `--config` YAML < command line.

The recipe, in the order of `main`: the model (a backbone wrapped in the I-MedSAM PEFT adapter, or a trained
I-MedSAM with the adapters and heads it was trained with), the data (checked pairs, splits by scan, samples), the
optimizer and schedule, Accelerate's `prepare`, the training loop (validation on the validation split selects the
model, never the test split), and the finish: `final/` (the publishing form), its evaluation and model card.

The run writes into `output_dir`: `config.yaml` (the resolved options; it loads again as a `--config`; never the
Hub token), `splits.json`, `data_problems.txt`, `logs/train_log.jsonl` (+ the `--report-to` trackers),
`checkpoints/checkpoint-<step>/` (trainable weights, optimizer, scheduler, RNG and data position, with a
`manifest.json`; `--resume-from-checkpoint latest` continues a killed run exactly), `best/`, `final/` (AutoModel-
loadable full model, processor, adapter in `final/adapter/`, model card) and `eval_results.json`.
"""

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate.utils
import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, LoggerType, set_seed
from huggingface_hub import HfApi
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

# train_arguments.py beside this script, imported without leaving this folder on sys.path (its evaluate.py would
# shadow the `evaluate` library for whatever imports it later in the process).
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from train_arguments import SECTIONS, Arguments, DataArguments, ModelArguments, parse_args  # noqa: E402, F401
finally:
    sys.path.pop(0)

import imedsam_hf  # noqa: E402, F401  (registers the model and the PEFT type)
import imedsam_hf.runtime as runtime  # noqa: E402  (looked up at call time: tests replace the allocator tuning)
from imedsam_hf import imedsam_peft_config, save_pretrained_full  # noqa: E402
from imedsam_hf.commands.common import flag_message  # noqa: E402
from imedsam_hf.configuration_imedsam import MR_WINDOW, trained_prompts, training_window, window_text  # noqa: E402
from imedsam_hf.convert_sam import load_checked_state  # noqa: E402
from imedsam_hf.data import (  # noqa: E402
    SPLITS,
    DataConfig,
    SegmentationDataset,
    SegmentationPair,
    case_folder_group,
    class_file,
    class_prompting,
    collate,
    dataset_class_names,
    discover_pairs,
    folder_window,
    load_hub_dataset,
    load_splits,
    make_splits,
    parse_mask_values,
    read_class_names,
    record_pairs,
    records_from_pairs,
    resolve_split_names,
    split_metadata,
    ungrouped_slices,
    validate_pairs,
    validate_records,
    write_splits,
)
from imedsam_hf.evaluation import EvaluationProtocol, evaluate_model, load_baseline  # noqa: E402
from imedsam_hf.files import MANIFEST, atomic_write, manifest_problem, write_manifest  # noqa: E402
from imedsam_hf.loading import (  # noqa: E402
    LITEMEDSAM,
    load_model,
    load_peft_model,
)
from imedsam_hf.metrics import NSD_TOLERANCE, dice  # noqa: E402
from imedsam_hf.model_card import hub_id_or_none, write_model_card  # noqa: E402
from imedsam_hf.processing_imedsam import IMedSamProcessor, check_rescale_intercept  # noqa: E402
from imedsam_hf.publishing import portable_model_name, trainable_state  # noqa: E402
from imedsam_hf.training import (  # noqa: E402
    FrozenImageEncoder,
    LossWeights,
    anneal_coordinates,
    fine_weight_at,
    forward_and_loss,
    image_inputs,
    model_config,
    parameter_groups,
    prompt_rows,
)
from imedsam_hf.volumes import is_mr_window, parse_window, window_csv  # noqa: E402

logger = get_logger(__name__)
TRAINING_FLAGS = {
    name: f"--{name.replace('_', '-')}" for section in SECTIONS.values() for name in section.__annotations__
}


def die(error: BaseException | str) -> SystemExit:
    """A SystemExit with the message in this command's words (`--mask-values`, not `` `mask_values` ``)."""
    return SystemExit(f"error: {flag_message(error, TRAINING_FLAGS)}")


# ------------------------------------------------------------------------------------------------------ trackers

TRACKER_PACKAGES = {"comet_ml": "comet-ml"}  # pip names that differ from the tracker's


def tracker_installed(name: str) -> bool:
    """Accelerate's own check (`is_wandb_available`, ...); a tracker it has no check for is left to Accelerate."""
    available = getattr(accelerate.utils, f"is_{name}_available", None)
    return available is None or available()


def resolve_trackers(report_to: str) -> list[str]:
    """`--report-to` as Accelerate's `log_with`: known names only, each with its package installed."""
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
            f"error: --report-to {report_to!r}: {problem}; use 'auto', 'none', 'all' or a comma-separated list of "
            f"{[k for k in known if k != 'all']}."
        )
    missing = [name for name in names if not tracker_installed(name)]
    if missing:
        packages = " ".join(TRACKER_PACKAGES.get(name, name) for name in missing)
        what = f"the {missing[0]} package is" if len(missing) == 1 else f"the {', '.join(missing)} packages are"
        raise SystemExit(f"error: --report-to {report_to}: {what} not installed; pip install {packages}")
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


# ---------------------------------------------------------------------------------------------------------- data


def load_pairs(data: DataArguments, num_classes: int, output_dir: Path, accelerator: Accelerator) -> dict[str, Any]:
    """The train/validation/test records, with problems reported and splits written next to the run."""
    own: dict[str, list[str]] = {}
    if data.dataset and data.data_dir:
        raise SystemExit(f"error: --data-dir {data.data_dir} and --dataset {data.dataset}: train on one of them.")
    if data.dataset:
        items, own = load_hub_dataset(
            data.dataset, data.dataset_split, data.image_column, data.mask_column, data.stem_column, data.dataset_config
        )
        items, problems = validate_records(
            items, data.mask_classes or num_classes, data.on_error, mask_values(data), f"--dataset {data.dataset}"
        )
        stems = list(items["stem"])
        if not stems:
            raise SystemExit(f"error: --dataset {data.dataset}: no usable image/mask rows.")
        kept = set(stems)
        own = {name: [stem for stem in names if stem in kept] for name, names in own.items()}
        own = {name: names for name, names in own.items() if names}  # none usable: cut from the training split
        groups = None
    else:
        if not data.data_dir:
            raise SystemExit("error: set --data-dir (a folder with images/ and masks/) or --dataset (a Hub id).")
        pairs, problems = discover_pairs(data.data_dir)
        items, problems = validate_pairs(
            pairs, data.mask_classes or num_classes, data.on_error, problems, mask_values(data)
        )
        if not items:
            raise SystemExit(f"error: --data-dir {data.data_dir}: no usable image/mask pairs.")
        stems = [pair.stem for pair in items]
        # Slices kept in a folder per case (Kaggle's LGG MRI: `TCGA_.../TCGA_..._12.tif`): one split per case.
        groups = {pair.stem: case for pair in items if (case := case_folder_group(pair.image, pair.stem))}
    splits = choose_splits(stems, data, own, groups)
    index = {stem: i for i, stem in enumerate(stems)}
    if data.dataset:
        result = {name: items.select([index[s] for s in names]) for name, names in splits.items()}
    else:
        result = {name: [items[index[s]] for s in names] for name, names in splits.items()}
    if accelerator.is_main_process:
        source = {"source": data_source(data)}
        if own and not data.split_file:  # which held-out splits are the dataset's own (the others: cut from train)
            source["dataset_splits"] = [name for name in SPLITS if name in own]
        if data.dataset:  # how its rows are read and named, for `imedsam evaluate --dataset ... --split test`
            columns = {"image_column": data.image_column, "mask_column": data.mask_column}
            columns |= {"stem_column": data.stem_column, "dataset_config": data.dataset_config}
            source |= {key: value for key, value in columns.items() if value is not None}
        write_splits(splits, output_dir / "splits.json", seed=data.split_seed, **source)
        for name in sorted(own) if not data.split_file else ():
            accelerator.print(
                f"{name} split: the dataset's own ({len(splits[name])} rows), not cut from --dataset-split"
            )
        if problems:
            (output_dir / "data_problems.txt").write_text("\n".join(str(p) for p in problems) + "\n")
            for problem in problems:
                logger.warning(f"skipped {flag_message(problem, TRAINING_FLAGS)}", main_process_only=True)
    if not len(result["train"]):
        raise SystemExit("error: the train split is empty.")
    return result


def data_source(data: DataArguments) -> str:
    """What the data is called in `splits.json`, the config and the card: a Hub dataset's id, else the data
    folder's name (never its path: these files go to the Hub)."""
    return hub_id_or_none(data.dataset, bare=True) or Path(data.data_dir or data.dataset).resolve().name


def mask_values(data: DataArguments) -> dict[int, int] | None:
    try:
        return parse_mask_values(data.mask_values) if data.mask_values else None
    except ValueError as error:
        raise die(error) from error


def choose_splits(
    stems: list[str],
    data: DataArguments,
    own: dict[str, list[str]] | None = None,
    groups: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """
    `--split-file`'s stems (a scan's name for its slices; a MONAI datalist, nnU-Net's `splits_final.json` with
    `--split-fold`, TransUNet's lists: `data.load_splits`; names of nothing in the data left out with a warning),
    else a seeded split of the stems, by `--group-pattern` and else by `groups` (`data.case_folder_group`). `own`:
    the held-out splits the dataset has itself (`{"validation": [stems], "test": [stems]}`, either or both), kept as
    they are; the others are cut from the rest with their shares of `--split-fractions`.
    """
    if not data.split_file:
        if caveat := ungrouped_slices(stems, data.group_pattern, groups):
            logger.warning(flag_message(caveat, TRAINING_FLAGS), main_process_only=True)
        if not own:
            return make_splits(stems, data.split_seed, data.split_fractions, data.group_pattern, groups)
        taken = {stem for names in own.values() for stem in names}
        rest = [stem for stem in stems if stem not in taken]
        shares = [0.0 if name in own else share for name, share in zip(SPLITS, data.split_fractions)]
        fractions = [share / sum(shares) for share in shares] if sum(shares) else [1.0, 0.0, 0.0]
        cut = make_splits(rest, data.split_seed, fractions, data.group_pattern, groups)
        for name in own:  # a rounding remainder of a split the dataset has goes back to training
            cut["train"] = sorted(cut["train"] + cut[name])
        return {**cut, **own}
    try:
        splits = load_splits(data.split_file, data.split_fold)
        source = f"--split-file {data.split_file}"
        resolved = resolve_split_names(splits, stems, data.group_pattern, source, absent="warn")
        if not resolved["train"]:
            raise ValueError(f"{source}: names no image of the data for training (`data_dir` {data.data_dir}).")
        return resolved
    except ValueError as error:
        raise die(error) from None


def as_records(split):
    return records_from_pairs(split) if isinstance(split, list) else split


def read_propagated_boxes(path: str | None, train_split) -> dict[str, dict[int, list[list[float]]]] | None:
    """`--propagated-boxes`: `{stem: {class id: [box, ...]}}`, checked against the training stems."""
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text())
        boxes = {
            str(stem): {int(c): [[float(v) for v in box] for box in found] for c, found in classes.items()}
            for stem, classes in raw.items()
        }
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise die(
            f"--propagated-boxes {path}: not a JSON file of {{stem: {{class id: [[x0, y0, x1, y1], ...]}}}} ({error}); "
            "training/propagated_boxes.py writes one"
        ) from error
    bad = [stem for stem, classes in boxes.items() for found in classes.values() for box in found if len(box) != 4]
    if bad:
        raise die(f"--propagated-boxes {path}: boxes of {bad[0]!r} are not [x0, y0, x1, y1]")
    train = {str(stem) for stem in as_records(train_split)["stem"]}
    if not train & set(boxes):
        raise die(
            f"--propagated-boxes {path}: none of its {len(boxes)} stems is a training stem (e.g. "
            f"{next(iter(boxes), None)!r}): write it for this data set's training split"
        )
    return boxes


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """The indices of at most `limit` of `count` items, evenly spaced (--max-eval-samples; None: all of them)."""
    if not limit or count <= limit:
        return list(range(count))
    return np.linspace(0, count - 1, limit).round().astype(int).tolist()


def build_loaders(args: Arguments, splits: dict, processor, num_classes: int, window=None):
    """Training and validation datasets and loaders; images still in HU windowed by `window` (`data_window`), as
    `imedsam predict` will window them."""
    data, run = args.data, args.training
    data_config = DataConfig(
        num_classes=num_classes,
        augment=DataConfig().augment if data.augment else None,
        box_jitter=data.box_jitter,
        box_jitter_probability=data.box_jitter_probability,
        prompt=data.prompt,
        class_prompts=data.class_prompts,
        mask_classes=data.mask_classes,
        all_classes_per_sample=data.all_classes_per_sample,
        max_prompts_per_sample=data.max_prompts_per_sample,
        mask_values=mask_values(data),
        max_clicks=data.max_clicks,
        neighbour_box_probability=data.neighbour_box_probability,
        neighbour_box_distance=data.neighbour_box_distance,
        neighbour_box_margin=data.neighbour_box_margin,
        neighbour_box_jitter=data.neighbour_box_jitter,
        extent_box_probability=data.extent_box_probability,
        propagated_box_probability=data.propagated_box_probability,
        propagated_boxes=read_propagated_boxes(data.propagated_boxes, splits["train"]),
        group_pattern=data.group_pattern,
        window=window,
        rescale_intercept=data.rescale_intercept,
    )
    try:
        train_set = SegmentationDataset(as_records(splits["train"]), processor, data_config, train=True, seed=run.seed)
    except ValueError as error:  # stems without slice numbers for --neighbour- / --extent-box-probability
        which = "--neighbour-box-probability" if data.neighbour_box_probability > 0 else "--extent-box-probability"
        raise die(f"{which}: {error}") from error
    val_set = SegmentationDataset(as_records(splits["validation"]), processor, data_config, train=False)
    if run.max_eval_samples and len(val_set) > run.max_eval_samples:
        val_set = torch.utils.data.Subset(val_set, evenly_spaced(len(val_set), run.max_eval_samples))
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


def record_data(config, args: Arguments, train_set: SegmentationDataset, n_pairs: int, window=None) -> None:
    """
    What the model is, from the data actually used, into its config (and so its card): the class names of the
    folder's `classes.json`, whether its prompts are class-aware, and the data's name, licence and citation.
    A recipe's value that contradicts the data (class heads for another class count, provenance written for another
    folder) is an error naming both, unless the option was given on the command line.
    """
    data = args.data
    try:
        names = data_class_names(data)
    except ValueError as error:
        raise die(error) from error
    if names:
        config.id2label = {int(i): name for i, name in sorted(names.items())}
        config.label2id = {name: int(i) for i, name in sorted(names.items())}
        if config.num_classes > 1 and config.num_classes != max(names) and "num_classes" not in args.given:
            raise SystemExit(
                f"error: the model has {config.num_classes} class heads (--num-classes, from the --config recipe or the "
                f"backbone), but {class_file(data.data_dir) if data.data_dir else 'the id2label.json of ' + data.dataset} "
                f"lists {len(names)} classes (ids up to "
                f"{max(names)}): pass --num-classes {max(names)} (and --mask-classes {max(names)}) for this data, or "
                "give --num-classes on the command line to keep it."
            )
    config.class_aware = bool(data.class_prompts and data.all_classes_per_sample and config.num_classes > 1)
    folder_name = data_source(data)
    given = {"name", "license", "citation"} & args.given
    if data.provenance_for and folder_name != data.provenance_for and not given:
        raise SystemExit(
            f"error: the recipe's data name, licence and citation ({data.name!r}, {data.license!r}) describe the "
            f"folder {data.provenance_for!r}, not {f'--data-dir {data.data_dir}' if data.data_dir else f'--dataset {data.dataset}'}"
            ": give --name, --license and --citation for this data (they go into the model card)."
        )
    untrained = (
        sorted(set(range(1, config.num_classes + 1)) - set(train_set.class_counts)) if config.class_aware else []
    )
    for class_id in untrained:
        label = (names or {}).get(class_id, str(class_id))
        logger.warning(
            f"class {class_id} ({label}) is in no training image: its heads keep their initial weights; the card says so.",
            main_process_only=True,
        )
    base_window = training_window(config)  # a trained model fine-tuned again: the window its own images had
    config.training_data = {
        "name": data.name if (data.provenance_for in (None, folder_name) or given) else None,
        "license": data.license,
        "citation": data.citation,
        "source": folder_name,
        "num_pairs": n_pairs,
        "prompts": trained_prompts(data.prompt, data.max_clicks, args.training.click_probability),
        **({"untrained_classes": untrained} if untrained else {}),
    }
    if window is not None:  # `data_window`: the one the loaders window images in HU with
        config.training_data["window"] = window
    elif base_window is not None:
        logger.warning(
            f"the model fine-tuned here was trained on slices windowed at {window_text(base_window)}, and this data "
            "records no window (no --window, no window column in its cases.csv): the new model records none, so "
            "`imedsam predict` will rescale raw CT min-max instead of windowing it. If these slices were made with "
            f"that window, pass --window {window_csv(base_window)} (imedsam convert volumes --window records it in cases.csv).",
            main_process_only=True,
        )
    if not config.training_data["name"]:
        config.training_data["name"] = folder_name


def data_window(data, folder_name: str, given: frozenset) -> list[float] | str | None:
    """
    The intensity window the training images were made with, as `config.training_data["window"]` records it
    (`[level, width]` in HU or "mr"): `--window` on the command line; else the data folder's `cases.csv` (`imedsam
    convert volumes --window` writes it); else the recipe's `window`, when the recipe describes this folder
    (`provenance_for`, as its name and licence). None: not known (images that came 8-bit).
    """
    if "window" in given:
        spec = data.window
    else:
        try:
            spec = folder_window(data.data_dir) if data.data_dir else None
        except ValueError as error:
            raise die(error) from error
        if spec is None and data.provenance_for in (None, folder_name):
            spec = data.window
    if spec is None:
        return None
    return MR_WINDOW if is_mr_window(spec) else list(parse_window(spec))


def report_empty_masks(train_set: SegmentationDataset, output_dir: Path, accelerator: Accelerator) -> None:
    """Masks with no foreground make no box-prompted sample: say which, beside the other data problems."""
    if not train_set.empty_stems or not accelerator.is_main_process:
        return
    stems = train_set.empty_stems
    logger.warning(f"{len(stems)} training mask(s) have no foreground and make no sample (data_problems.txt)")
    with (output_dir / "data_problems.txt").open("a") as handle:
        handle.writelines(f"{stem}: empty mask (no foreground), no box prompt: not trained on\n" for stem in stems)


# --------------------------------------------------------------------------------------------------------- model


def build_model(model_args: ModelArguments):
    """
    `(model, processor, published)`: a trained I-MedSAM (a run's `final/` or a shipped model) comes back as the
    PEFT model it was trained as (`published` true), the backbone frozen and exactly its adapters and heads
    trainable, its settings kept; any other backbone is wrapped in the I-MedSAM adapter with only the config keys
    that were set changed.
    """
    spec = model_args.backbone
    if spec == LITEMEDSAM and model_args.image_size not in (None, 256):
        raise SystemExit(f"error: --image-size {model_args.image_size}: LiteMedSAM's encoder takes 256 px only.")
    try:
        published = load_peft_model(spec, model_args.config_changes(), model_args.peft_overrides)
        if published is not None:
            return (*published, True)
        base, processor = load_model(
            spec, image_size=model_args.image_size, config_overrides=model_args.config_changes(), eval_mode=False
        )
    except (OSError, ValueError) as error:
        raise die(f"--backbone {spec}: {error}") from error
    # A fine-tuned checkpoint keeps the backbone it was trained from; never a path of this machine.
    if not base.config.base_model:
        base.config.base_model = portable_model_name(spec)
    try:
        model = get_peft_model(base, imedsam_peft_config(base.config, **model_args.peft_overrides))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: --peft-overrides {model_args.peft_overrides}: {error}") from error
    return model, processor, False


# --------------------------------------------------------------------------------------------------- checkpoints


def load_trainable(model, path: Path) -> None:
    """Trainable weights saved by this script into `model`: every one of them, and nothing the model lacks."""
    try:
        state = load_file(str(path))
    except Exception as error:  # a truncated or foreign file
        raise SystemExit(f"error: {path}: not a readable safetensors file ({error}).") from error
    try:
        load_checked_state(model, state, str(path), expected=set(trainable_state(model)))
    except ValueError as error:
        raise SystemExit(
            f"error: {error}. Build it with the run's own model options (--config <run>/config.yaml)."
        ) from error


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """`save_state` writes only trainable weights (a few MB instead of the whole backbone)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                tensors = trainable_state(accelerator.unwrap_model(model))  # umask's permissions, not 0600
                target = Path(output_dir) / f"trainable_{i}.safetensors"
                atomic_write(target, lambda path, tensors=tensors: save_file(tensors, path))
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            load_trainable(accelerator.unwrap_model(model), Path(input_dir) / f"trainable_{len(models)}.safetensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a missing, truncated or changed file), or None when its manifest holds."""
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (it is written last: the save did not finish)"
    problem = manifest_problem(path)
    if problem is not None:
        return problem
    for state in sorted(path.glob("random_states_*.pkl")):  # Accelerate would skip an unloadable one silently
        try:
            accelerate.utils.load(state)
        except Exception as error:
            return f"{state} does not load ({type(error).__name__}: {error}); an exact resume needs it"
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


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validation_dice(model, loader, accelerator: Accelerator, frozen_encoder: FrozenImageEncoder | None = None) -> float:
    """Mean Dice over the validation split, on the input frame's unpadded area (exact boxes). `frozen_encoder`:
    the images' embeddings from it (--freeze-image-encoder: each validation image encoded once per run)."""
    model.eval()
    scores = []
    for batch in tqdm(loader, desc="validate", leave=False, disable=not accelerator.is_local_main_process):
        if frozen_encoder is not None:
            batch = frozen_encoder(batch)
        classes, num_classes = batch.get("prompt_classes"), model_config(model).num_classes
        aware = classes is not None and num_classes > 1  # class-aware prompts: each its own class's heads
        outputs = model(
            **image_inputs(batch),
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


def evaluation_pairs(split) -> Sequence[SegmentationPair]:
    """A split as `evaluate_model`'s pairs: folder splits are SegmentationPairs already; Hub-dataset rows carry
    decoded images, which work the same way (each decoded when it is scored)."""
    return split if isinstance(split, list) else record_pairs(split)


def evaluation_protocol(
    args: Arguments, model, output_sizes: list[str], box_jitter: float = 0.0, jitter_draws: int = 1
) -> EvaluationProtocol:
    """`imedsam evaluate`'s protocol for this run's data options (the final evaluation's and, with
    --selection-box-jitter, model selection's)."""
    try:
        return EvaluationProtocol.resolve(
            model.get_base_model().config,
            args.data.data_dir,
            prompt=args.data.prompt,
            output_sizes=output_sizes,
            class_aware=None,  # what training recorded in the config
            class_prompts=args.data.class_prompts,
            mask_classes=args.data.mask_classes if args.data.class_prompts else None,
            classes=None,
            mask_values=mask_values(args.data),
            box_jitter=box_jitter,
            jitter_seed=0,
            jitter_draws=jitter_draws,
            num_clicks=1,
            group_pattern=args.data.group_pattern,
            spacing=None,
            tta="none",  # the run's own numbers, as its validation measured them: no test-time mirroring
            nsd_tolerance=NSD_TOLERANCE,
            nsd_definition="voxels",
            dataset=args.data.dataset,
            rescale_intercept=args.data.rescale_intercept,
        )
    except ValueError as error:
        raise die(error) from error


@dataclass
class Selection:
    """--selection-box-jitter F: the validation images (at most --max-eval-samples, evenly spaced) and the two
    protocols they are scored by, `imedsam evaluate`'s at native size with exact boxes and with every box side moved
    by up to F (jitter seed 0); the model's config does not change during a run, so both are resolved once."""

    processor: Any
    pairs: list
    protocols: tuple[EvaluationProtocol, EvaluationProtocol]

    @classmethod
    def of(cls, args: Arguments, model, processor, split) -> "Selection":
        pairs = evaluation_pairs(split)
        pairs = [pairs[i] for i in evenly_spaced(len(pairs), args.training.max_eval_samples)]
        jitter, draws = args.training.selection_box_jitter, args.training.selection_jitter_draws
        protocols = (
            evaluation_protocol(args, model, ["native"]),
            evaluation_protocol(args, model, ["native"], box_jitter=jitter, jitter_draws=draws),
        )
        return cls(processor, pairs, protocols)


@torch.no_grad()
def selection_dice(run: "Run") -> tuple[float, float]:
    """--selection-box-jitter: the mean Dice over `run.selection`'s images by its two protocols, `(exact,
    jittered)`. The images are shared out between the processes and the rows gathered, so every process returns the
    same numbers."""
    accelerator, model, selection = run.accelerator, run.accelerator.unwrap_model(run.model), run.selection
    model.eval()
    scores = []
    with accelerator.split_between_processes(selection.pairs) as shard:
        for protocol in selection.protocols:
            rows = evaluate_model(model, selection.processor, shard, protocol, progress=False).rows if shard else []
            values = accelerate.utils.gather_object([r["dice"] for r in rows if r.get("dice") is not None])
            scores.append(float(np.mean(values)) if values else float("nan"))
    run.model.train()
    return scores[0], scores[1]


def final_evaluation(run: "Run", model, processor, splits: dict) -> dict[str, Any]:
    """The selected model on `--split` by the one evaluation protocol (`imedsam evaluate`'s), with the zero-shot
    backbone on the same prompts when `--baseline`."""
    args, evaluation = run.args, run.args.evaluation
    split = splits.get(evaluation.split) if evaluation.split != "all" else [p for s in splits.values() for p in s]
    if not evaluation.final_evaluation or split is None or not len(split):
        return {}
    pairs = evaluation_pairs(split)[: evaluation.max_test_samples]
    protocol = evaluation_protocol(args, model, evaluation.output_sizes)
    backbone = None
    if evaluation.baseline:
        backbone = (model, processor)  # adapters disabled: the backbone it was trained from
        if run.published_backbone:  # adapters of an earlier fine-tune are no zero-shot backbone: load it by name
            try:
                backbone = load_baseline(model.get_base_model(), processor, args.model.backbone)
            except ValueError as error:
                logger.warning(f"no zero-shot baseline: {error}")
                backbone = None
    report = evaluate_model(model, processor, pairs, protocol, backbone=backbone, model_name="imedsam")
    with (run.output_dir / "eval_per_image.jsonl").open("w") as handle:
        for row in report.rows:
            handle.write(json.dumps({k: v for k, v in row.items() if not (k == "model" and v == "imedsam")}) + "\n")
    results = {"n_images": len(pairs), "split": evaluation.split, **report.as_dict()}
    if evaluation.max_test_samples and len(pairs) < len(split):
        results["limit"] = evaluation.max_test_samples
    return results


# ---------------------------------------------------------------------------------------------------------- loop


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
    val_set: Any
    train_loader: Any
    val_loader: Any
    num_classes: int
    max_steps: int
    epochs: int
    log: RunLog
    hub_api: Any = None
    deadline: float | None = None  # clock() past which training stops (--max-train-minutes)
    card_sections: dict[str, dict[str, Any]] | None = None  # the trained run's options (--finish-only)
    published_backbone: bool = False  # fine-tuning a trained I-MedSAM again
    selection: Selection | None = None  # --selection-box-jitter: what model selection scores
    # --freeze-image-encoder: the training and validation batches' embeddings (None: the encoder trains)
    frozen_encoder: FrozenImageEncoder | None = None
    frozen_val_encoder: FrozenImageEncoder | None = None
    started: float = field(default_factory=time.monotonic)
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
                f"error: --resume-from-checkpoint {choice}: {problem}; use 'latest' for the newest good one."
            )
    state = json.loads((path / "training_state.json").read_text())
    planned = state.get("max_steps")
    if planned is not None and planned != run.max_steps:
        raise SystemExit(
            f"error: --resume-from-checkpoint {path}: the run was planned for {planned} steps and its learning rate "
            f"decays to 0 there; now {run.max_steps} are asked for. Resume with the run's own --max-train-steps / "
            f"--epochs, or train further from its model in a new run (--backbone {run.output_dir / 'final'})."
        )
    run.accelerator.load_state(str(path))
    run.state = state
    run.accelerator.print(f"resumed from {path} (epoch {run.state['epoch']}, step {run.state['global_step']})")


def prepare_finish_only(run: Run) -> None:
    """`--finish-only`: the run's best weights and bookkeeping (best/), and the options it was trained with."""
    best = run.output_dir / "best"
    if not (best / "trainable.safetensors").is_file():
        raise SystemExit(
            f"error: --finish-only: {best / 'trainable.safetensors'} not found; it is written at each validation that "
            "improves on the best Dice (train first, or point --output-dir at the run's folder)."
        )
    if (best / "state.json").is_file():
        run.state = json.loads((best / "state.json").read_text())
    saved = run.output_dir / "config.yaml"
    if saved.is_file():
        run.card_sections = yaml.safe_load(saved.read_text())
        # The prompts the run trained (clicks or not) are its options', not this finishing call's.
        data, training = run.card_sections.get("data") or {}, run.card_sections.get("training") or {}
        config = run.accelerator.unwrap_model(run.model).get_base_model().config
        config.training_data["prompts"] = trained_prompts(
            data.get("prompt", "box"), data.get("max_clicks") or 0, training.get("click_probability") or 0.0
        )
    run.accelerator.print(f"finishing from {best} (step {run.state.get('best_step')}), no training")


def save_checkpoint(run: Run) -> None:
    """A resumable checkpoint (trainable weights, optimizer, scheduler, RNG, data position), uploaded if pushing."""
    path = run.output_dir / "checkpoints" / f"checkpoint-{run.state['global_step']}"
    run.accelerator.wait_for_everyone()
    run.accelerator.save_state(str(path))
    run.accelerator.wait_for_everyone()  # every process's RNG file is written before the manifest lists them
    if run.accelerator.is_main_process:
        (path / "training_state.json").write_text(json.dumps({**run.state, "max_steps": run.max_steps}))
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
        if run.frozen_encoder is not None:
            with accelerator.autocast():
                batch = run.frozen_encoder(batch)
        # forward, loss and the optimizer step (accumulated over --gradient-accumulation-steps batches)
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
        # bookkeeping of a completed optimizer step: progress, log, checkpoint, time budget
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
            progress.write(
                f"--max-train-minutes {config.max_train_minutes} reached: stopping at step {state['global_step']}"
            )
            run.max_steps = state["global_step"]
            state["stopped_by_time"] = True
        if state["global_step"] >= run.max_steps or state["global_step"] == config.stop_after_steps:
            break


clock = time.monotonic  # the clock of --max-train-minutes (tests replace it)


def time_is_up(run: Run) -> bool:
    """Whether `--max-train-minutes` has passed, decided by the main process so that every process stops together."""
    if run.deadline is None:
        return False
    flag = torch.tensor([int(clock() >= run.deadline)], device=run.accelerator.device)
    return bool(accelerate.utils.broadcast(flag, from_process=0).item())


def end_epoch(run: Run, progress) -> None:
    """Validation (model selection on the validation split only) and the epoch's checkpoint."""
    accelerator, state, config = run.accelerator, run.state, run.args.training
    state["epoch"] += 1
    state["batches_done"] = 0
    last = state["global_step"] >= run.max_steps
    validate = config.eval_every_epochs > 0 and (state["epoch"] % config.eval_every_epochs == 0 or last)
    if validate or (config.eval_every_epochs == 0 and last):
        score = float("nan")
        if validate and run.selection is not None and run.selection.pairs:
            exact, jittered = selection_dice(run)
            score = (exact + jittered) / 2
            run.log(
                {"val_dice": score, "val_dice_exact": exact, "val_dice_jittered": jittered, "epoch": state["epoch"]},
                state["global_step"],
            )
            progress.write(
                f"epoch {state['epoch']}: validation Dice {exact:.4f} with exact boxes, {jittered:.4f} with boxes "
                f"moved by up to {config.selection_box_jitter:.0%}"
                + (f" (mean of {config.selection_jitter_draws} draws)" if config.selection_jitter_draws > 1 else "")
                + f", mean {score:.4f} ({len(run.selection.pairs)} images, `imedsam evaluate`'s protocol)"
            )
        elif validate and len(run.val_set):
            score = validation_dice(run.model, run.val_loader, accelerator, run.frozen_val_encoder)
            run.log({"val_dice": score, "epoch": state["epoch"]}, state["global_step"])
            progress.write(f"epoch {state['epoch']}: validation Dice {score:.4f} ({len(run.val_set)} samples)")
        if (not math.isnan(score) and score > state["best_val_dice"]) or state["best_step"] is None or not validate:
            state["best_val_dice"], state["best_step"] = score, state["global_step"]
            if accelerator.is_main_process:
                (run.output_dir / "best").mkdir(exist_ok=True)
                tensors = trainable_state(accelerator.unwrap_model(run.model))  # umask's permissions, not 0600
                atomic_write(run.output_dir / "best" / "trainable.safetensors", lambda path: save_file(tensors, path))
                (run.output_dir / "best" / "state.json").write_text(json.dumps(state))
    if config.checkpoint_every == "epoch":
        save_checkpoint(run)


def train(run: Run) -> bool:
    """The training loop; False when it stopped at `--stop-after-steps` (as if killed)."""
    state, config = run.state, run.args.training
    progress = tqdm(
        total=run.max_steps,
        initial=state["global_step"],
        disable=not run.accelerator.is_local_main_process,
        desc="train",
        unit="step",
    )
    run.model.train()
    try:
        while state["epoch"] < run.epochs and state["global_step"] < run.max_steps:
            train_epoch(run, progress)
            if state["global_step"] >= run.max_steps or state["batches_done"] >= len(run.train_loader):
                end_epoch(run, progress)
            if state["global_step"] == config.stop_after_steps:
                progress.write(f"stopping after step {state['global_step']} (--stop-after-steps), as if killed")
                return False
    finally:
        progress.close()
        for images, frozen in (("training", run.frozen_encoder), ("validation", run.frozen_val_encoder)):
            if frozen is not None and frozen.cache_dir is not None and frozen.hits + frozen.encoded:
                run.accelerator.print(
                    f"--embedding-cache-dir: {frozen.hits} {images} images' embeddings read from {frozen.cache_dir}, "
                    f"{frozen.encoded} encoded (this process)"
                )
    return True


def finish(run: Run, processor, splits: dict, parameters: tuple[int, int]) -> dict[str, Any]:
    """The best checkpoint (by validation Dice, never by test) becomes `final/`, evaluated, carded and pushed."""
    accelerator, state = run.accelerator, run.state
    minutes = (time.monotonic() - run.started) / 60
    steps_per_epoch = max(1, math.ceil(len(run.train_loader) / run.args.training.gradient_accumulation_steps))
    results: dict[str, Any] = {
        "best_val_dice": state["best_val_dice"],
        "best_step": state["best_step"],
        # The card's facts come from the run, never from the recipe's planned values.
        "training": {
            "steps": state["global_step"],
            "epochs": round(state["global_step"] / steps_per_epoch, 2),
            "training_samples": len(run.train_set),
            "minutes": round(minutes, 1),
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "stopped_by_time": bool(state.get("stopped_by_time")),
        },
    }
    if not accelerator.is_main_process:
        return results
    peft_model = accelerator.unwrap_model(run.model)
    best = run.output_dir / "best" / "trainable.safetensors"
    if best.is_file():
        load_trainable(peft_model, best)
    peft_model.eval()
    final_dir = run.output_dir / "final"
    save_pretrained_full(peft_model, final_dir, processor=processor)
    results.update(final_evaluation(run, peft_model, processor, splits))
    sections = run.card_sections or run.args.sections(mixed_precision=accelerator.mixed_precision)
    results["mixed_precision"] = sections["training"].get("mixed_precision") or accelerator.mixed_precision
    write_model_card(
        final_dir,
        config=sections,
        results=results,
        splits={k: len(v) for k, v in splits.items()},
        trainable_parameters=parameters[0],
        total_parameters=parameters[1],
        dataset_splits=split_metadata(run.output_dir / "splits.json").get("dataset_splits", []),
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


def data_class_names(data: DataArguments) -> dict[int, str] | None:
    """The class names the data gives: its folder's classes.json, or a Hub dataset's id2label.json; None without."""
    if data.data_dir:
        return read_class_names(data.data_dir)
    return dataset_class_names(data.dataset) if data.dataset else None


def resolve_class_prompts(args: Arguments, num_classes: int) -> None:
    """`--class-prompts` and `--mask-classes` as evaluation reads the same data (`data.class_prompting`): class-id
    masks (a folder `convert volumes` or `convert npz` wrote, with its classes.json) train one prompt per class
    without flags. `--mask-classes N` with class prompts off would train the union of N classes as one structure,
    which no evaluation scores: refused, naming what to give."""
    data = args.data
    try:
        names = data_class_names(data)
        one_per_class = num_classes == 1 or bool(data.all_classes_per_sample)
        data.class_prompts, data.mask_classes = class_prompting(
            data.class_prompts, data.mask_classes, names, one_per_class
        )
    except ValueError as error:
        raise die(error) from error
    count = data.mask_classes or 1
    if not data.class_prompts and num_classes == 1 and count > 1:
        union = ",".join(f"{c}:1" for c in range(1, count + 1))
        raise SystemExit(
            f"error: --mask-classes {count} with --class-prompts false trains the {count} classes as one structure, "
            "which the evaluation cannot score: leave --class-prompts on (a prompt per class), or make them one "
            f"class with --mask-values {union}."
        )


def check_options(args: Arguments, num_classes: int) -> None:
    """Combinations of options that cannot work, refused before any data is read."""
    data, run = args.data, args.training
    if data.class_prompts and num_classes != 1 and not data.all_classes_per_sample:
        raise SystemExit(
            "error: --class-prompts makes one binary sample per class and box: use --num-classes 1, or add "
            "--all-classes-per-sample true for class-aware prompts (one head per class)."
        )
    if run.selection_box_jitter > 0 and data.prompt != "box":
        raise SystemExit(
            f"error: --selection-box-jitter {run.selection_box_jitter} moves box prompts; with --prompt {data.prompt} "
            "there are none: leave it at 0."
        )
    if run.click_probability > 0 and not data.max_clicks:
        raise SystemExit("error: --click-probability needs clicks in the samples: set --max-clicks N (e.g. 3).")
    if data.max_clicks and data.all_classes_per_sample:
        raise SystemExit(
            "error: --max-clicks takes one structure per sample; it does not combine with --all-classes-per-sample."
        )


def main(argv: list[str] | None = None, hub_api: HfApi | None = None) -> dict[str, Any]:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    run_args = args.training
    trackers = resolve_trackers(run_args.report_to)
    if run_args.num_threads:
        torch.set_num_threads(run_args.num_threads)
    accelerator, log = start(args, trackers)
    output_dir = Path(run_args.output_dir)
    tuned = runtime.tune_cpu_allocator(run_args.cpu_allocator, accelerator.device)
    if tuned:
        accelerator.print(tuned)

    # the model: its config is the truth from here on (a checkpoint keeps its own num_classes and switches)
    model, processor, published = build_model(args.model)
    num_classes = model.config.num_classes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    resolve_class_prompts(args, num_classes)
    check_options(args, num_classes)

    # the data: checked pairs, splits by scan, samples; what the model is recorded from it
    try:
        splits = load_pairs(args.data, num_classes, output_dir, accelerator)
        window = data_window(args.data, data_source(args.data), args.given)
        check_rescale_intercept(args.data.rescale_intercept)
        if args.data.rescale_intercept is not None and window in (None, MR_WINDOW):
            raise ValueError(
                f"`rescale_intercept` {args.data.rescale_intercept:g} reads the pictures as HU: give the CT `window` to "
                "window them with (e.g. btcv), which the model then records for imedsam predict."
            )
        train_set, val_set, train_loader, val_loader = build_loaders(args, splits, processor, num_classes, window)
    except ValueError as error:  # bad data: one clear message naming the files, nothing half-written
        raise die(error) from error
    report_empty_masks(train_set, output_dir, accelerator)
    if not len(train_set):
        raise SystemExit(
            f"error: no training samples: every mask of the train split is empty ({output_dir / 'data_problems.txt'})."
        )
    record_data(model.get_base_model().config, args, train_set, sum(len(s) for s in splits.values()), window)

    # the optimizer and the schedule, prepared by Accelerate
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
        published_backbone=published,
    )
    if run_args.selection_box_jitter > 0:
        run.selection = Selection.of(args, accelerator.unwrap_model(model), processor, splits["validation"])
    if run_args.freeze_image_encoder:
        # keyed by image: samples of one image (one per class) share its embeddings
        val_items = getattr(val_set, "dataset", val_set).items
        cache_dir = run_args.embedding_cache_dir  # with --no-augment (parse_args checks)
        run.frozen_encoder = FrozenImageEncoder(
            model, cache=not args.data.augment, key=lambda index: train_set.items[index][0], cache_dir=cache_dir
        )
        run.frozen_val_encoder = FrozenImageEncoder(
            model, cache=True, key=lambda index: val_items[index][0], cache_dir=cache_dir
        )
    if run_args.finish_only:
        prepare_finish_only(run)
    else:
        resume(run)
    if args.hub.push_to_hub and accelerator.is_main_process:
        run.hub_api = hub_api or HfApi(token=args.hub.hub_token)
        run.hub_api.create_repo(args.hub.hub_model_id, private=args.hub.hub_private, exist_ok=True)

    # the training loop
    if not run_args.finish_only:
        logger.info("***** Running training *****", main_process_only=True)
        logger.info(f"  Samples (train / validation) = {len(train_set)} / {len(val_set)}", main_process_only=True)
        logger.info(f"  Trainable parameters = {trainable:,} of {total:,}", main_process_only=True)
        logger.info(
            f"  Batch size per process = {run_args.batch_size}, processes = {accelerator.num_processes}, gradient "
            f"accumulation = {run_args.gradient_accumulation_steps}",
            main_process_only=True,
        )
        logger.info(f"  Optimization steps = {max_steps} ({run.epochs} epochs)", main_process_only=True)
        accelerator.print(f"trainable parameters: {trainable:,} of {total:,}")
        if run_args.freeze_image_encoder:
            encoder = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "vision_encoder" in n)
            accelerator.print(
                f"--freeze-image-encoder: the image encoder's {encoder:,} of them stay as they are; "
                + (
                    "each image is encoded once (--no-augment)"
                    if not args.data.augment
                    else "images are encoded every step (augmented); --no-augment encodes each once"
                )
            )
            if encoder and not published:
                accelerator.print(
                    "note: this adapter is new, so its encoder part stays at its initialisation; to train the "
                    "decoders on the backbone's own features, add --use-lora false --use-frequency-adapter false"
                )
    if run_args.max_train_minutes:
        run.deadline = clock() + 60 * run_args.max_train_minutes
    if not run_args.finish_only and not train(run):
        accelerator.end_training()
        return {"stopped_at_step": run.state["global_step"]}

    # the finish: final/, its evaluation and card
    accelerator.wait_for_everyone()
    results = finish(run, processor, splits, (trainable, total))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        summary = {k: results[k] for k in ("results", "volume", "baseline_sam") if k in results}
        if summary:
            accelerator.print(json.dumps(summary, indent=1))
        final = output_dir / "final"
        accelerator.print(
            f"model written to {final}\nuse it: imedsam predict --model {final} IMAGES --boxes-from-masks MASKS --out "
            f"predictions   (or imedsam_hf.load_model({str(final)!r}))"
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
