"""`imedsam evaluate` (and `training/evaluate.py`): score a model, and optionally its backbone zero-shot, on a
labelled folder or dataset; write the summary JSON, the per-image CSV and overlays; print the summary.

The protocol is `evaluation.EvaluationProtocol`, the one `training/train.py` builds for its final evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data import (
    dataset_records,
    discover_pairs,
    find_layouts,
    labelled_splits,
    open_dataset,
    read_scan_spacing,
    record_pairs,
    select_split,
    select_split_records,
    split_metadata,
    validate_pairs,
    validate_records,
)
from ..evaluation import (
    EvaluationProtocol,
    evaluate_model,
    load_baseline,
    summary_lines,
    write_rows_csv,
)
from ..loading import LITEMEDSAM, load_model
from ..metrics import check_nsd_options
from ..runtime import require_backend
from ..shipped import is_shipped, shipped_folder
from .common import EXIT_OK, fail, flag_message


def run(args: argparse.Namespace, device: str | None) -> int:
    """`imedsam evaluate` with parsed arguments."""
    try:
        report = evaluate_folder(args, device)
    except (OSError, ValueError, ImportError) as error:
        return fail(error)
    print("\n".join(summary_lines(report)))
    if args.limit:
        print(
            f"note: --limit {args.limit} scored the first {report['n_images']} pairs only"
            + ("; per-volume scores stack only those slices, not whole scans." if "volume" in report else ".")
        )
    return EXIT_OK


# How a dataset's rows are read and named, when neither the command nor the model's splits.json says.
DATASET_READING = {"dataset_config": None, "image_column": "image", "mask_column": "mask", "stem_column": None}


def evaluate_folder(args: argparse.Namespace, device: str | None) -> dict:
    """Check the options, load the model, build the protocol, score, write the reports; the JSON summary."""
    split = args.split or ("test" if args.data_dir is not None else "all")
    given = [key for key in DATASET_READING if getattr(args, key) is not None]
    if args.data_dir is not None and given:
        raise ValueError(f"`{given[0]}` reads the rows of `dataset`; a `data_dir` folder has images and masks.")
    if args.split_file is not None and not Path(args.split_file).exists():
        raise ValueError(f"--split-file {args.split_file}: no such file (or folder of TransUNet's lists).")
    split_file = args.split_file
    if split_file is None and split != "all":
        split_file = (shipped_folder(args.model) if is_shipped(args.model) else Path(args.model)) / "splits.json"
        if not split_file.is_file():
            raise ValueError(
                f"--split {split}: the model records no splits.json ({split_file}); pass --split-file, or "
                f"--split all for {'a folder' if args.data_dir is not None else 'a dataset'} it was not trained on."
            )
    if args.data_dir is not None:
        find_layouts(args.data_dir)  # a missing or unrecognised folder, before the model is loaded
    else:  # the dataset and its columns, before the model is loaded
        # With --split, rows read and named as the training run did (its splits.json says how), unless told
        recorded = split_metadata(split_file) if split_file is not None else {}
        for key, default in DATASET_READING.items():
            if getattr(args, key) is None:
                setattr(args, key, recorded.get(key, default))
        splits = open_dataset(args.dataset, args.dataset_config)
        names = [args.dataset_split] if split == "all" else labelled_splits(splits, args.image_column, args.mask_column)
        records = dataset_records(args.dataset, splits, names, args.image_column, args.mask_column, args.stem_column)
    require_backend(args.backend, args.precision)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: at least 1 pair.")
    if args.overlays and Path(args.overlays).exists() and not Path(args.overlays).is_dir():
        raise ValueError(f"--overlays {args.overlays}: a file, not a folder; name a folder for the overlay PNGs.")
    spacing = read_scan_spacing(args.scan_spacing) if args.scan_spacing else None
    # Option values that need no model, checked before loading one: a bad one is named at once.
    EvaluationProtocol(
        prompt=args.prompt, output_sizes=tuple(args.output_sizes), num_classes=1, class_prompts=False,
        class_aware=False, mask_classes=None, classes=None, class_names=None, label_classes=None, mask_values=None,
        box_jitter=args.box_jitter, jitter_seed=args.jitter_seed, jitter_draws=args.jitter_draws, num_clicks=args.clicks,
        group_pattern=args.group_pattern, spacing=None, tta=args.tta, nsd_tolerance=args.nsd_tolerance,
        nsd_definition=args.nsd_definition,
    )  # fmt: skip
    check_nsd_options(None, args.nsd_definition)  # without MONAI, surfels stop here, before the model loads
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, processor = load_model(
        args.model, device=device, backend=args.backend, backend_options={"precision": args.precision}
    )
    protocol = EvaluationProtocol.resolve(
        model.config,
        args.data_dir,
        prompt=args.prompt,
        output_sizes=args.output_sizes,
        class_aware=args.class_aware,
        class_prompts=None,
        mask_classes=args.mask_classes,
        classes=args.classes,
        mask_values=args.mask_values,
        box_jitter=args.box_jitter,
        jitter_seed=args.jitter_seed,
        jitter_draws=args.jitter_draws,
        num_clicks=args.clicks,
        group_pattern=args.group_pattern,
        spacing=spacing,
        tta=args.tta,
        nsd_tolerance=args.nsd_tolerance,
        nsd_definition=args.nsd_definition,
        dataset=args.dataset,
        rescale_intercept=args.rescale_intercept,
    )
    if args.data_dir is not None:
        pairs, problems = discover_pairs(args.data_dir)
        pairs, problems = validate_pairs(pairs, protocol.read_classes, "skip", problems, protocol.mask_values)
        pairs = select_split(pairs, split, split_file, args.group_pattern, args.split_fold)[: args.limit]
    else:  # only the rows scored are read, each once to check it and once to score it
        example = records["stem"][0] if len(records) else None
        records = select_split_records(records, split, split_file, args.group_pattern, args.split_fold)
        if not len(records) and example is not None:
            raise ValueError(
                f"--split {split}: no stem {split_file} lists names a row of --dataset {args.dataset} (its rows are "
                f"named like {example!r}): name them as the training run did (--stem-column), or use --split all."
            )
        records = records.select(range(min(len(records), args.limit))) if args.limit else records
        records, problems = validate_records(
            records, protocol.read_classes, "skip", protocol.mask_values, f"--dataset {args.dataset}"
        )
        pairs = record_pairs(records)
    for problem in problems:
        print(f"skipped {flag_message(problem)}", file=sys.stderr)
    if not len(pairs):
        where = f"--data-dir {args.data_dir}" if args.data_dir is not None else f"--dataset {args.dataset}"
        raise ValueError(f"no pairs to evaluate in {where} (split {split}).")
    backbone = load_baseline(model, processor, args.model, args.baseline_model, device) if args.baseline else None
    name = LITEMEDSAM if args.model == LITEMEDSAM else "imedsam"
    overlays = Path(args.overlays) if args.overlays else None
    report = evaluate_model(model, processor, pairs, protocol, backbone=backbone, model_name=name, overlays=overlays)
    result = {
        "model": args.model,
        **(
            {"data_dir": str(args.data_dir)}
            if args.data_dir is not None
            else {
                "dataset": args.dataset,
                **({"dataset_config": args.dataset_config} if args.dataset_config else {}),
                **({"dataset_split": args.dataset_split} if split == "all" else {}),
            }
        ),
        "split": split,
        "n_images": len(pairs),
        "backend": args.backend,
        "precision": args.precision,
        **({"limit": args.limit} if args.limit else {}),
        **report.as_dict(),
    }
    output = Path(args.json)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    write_rows_csv(report.rows, Path(args.csv) if args.csv else output.with_suffix(".csv"))
    return result


__all__ = ["evaluate_folder", "run"]
