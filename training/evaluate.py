#!/usr/bin/env python
"""Evaluate an I-MedSAM model (and, with --baseline sam, its backbone zero-shot) on a folder of images and masks.

    python training/evaluate.py --model DIR_OR_HUB_ID --data_dir DIR [--split test|validation|train|all]
        [--output_sizes native 128 896] [--prompt box|none] [--baseline sam] --json OUT.json
        [--csv OUT.csv] [--overlays DIR]

`--model litemedsam` evaluates LiteMedSAM itself (SAM mask output, no implicit decoder). The split comes from
`--split_file` or, by default, from the `splits.json` saved next to a trained model (`<model>/splits.json`);
`--split all` scores every pair in the folder. Metrics: Dice, IoU, HD95 and the maximum Hausdorff distance (HD),
in pixels of the scored grid (`imedsam_hf.metrics`); mean and population std per output size.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import imedsam_hf  # noqa: F401
from imedsam_hf import processor_for_config
from imedsam_hf.cli import load_model_and_processor
from imedsam_hf.data import discover_pairs, load_splits, read_mask, validate_pairs
from imedsam_hf.evaluation import NATIVE, evaluate_pairs, parse_size, predict_logits
from imedsam_hf.processing_imedsam import IMedSamProcessor
from imedsam_hf.training import load_backbone


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="IMedSamModel folder or hub id, or 'litemedsam'")
    parser.add_argument("--data_dir", required=True, help="folder with images/ and masks/")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    parser.add_argument("--split_file", default=None, help="JSON splits (default: <model>/splits.json)")
    parser.add_argument(
        "--output_sizes", nargs="+", default=[NATIVE], help="'native', factors of native ('2x', '0.5x'), longest sides"
    )
    parser.add_argument("--prompt", default="box", choices=["box", "none"])
    parser.add_argument("--baseline", default=None, choices=["sam"], help="also score the backbone's SAM mask")
    parser.add_argument(
        "--baseline_model",
        default=None,
        help="the backbone for --baseline sam (default: the `base_model` a training run records in the config)",
    )
    parser.add_argument("--num_classes", type=int, default=None, help="default: the model's")
    parser.add_argument("--json", required=True, help="where to write the summary JSON")
    parser.add_argument("--csv", default=None, help="per-image CSV (default: next to --json)")
    parser.add_argument("--overlays", default=None, help="folder for overlay PNGs of the native predictions")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args(argv)
    for size in args.output_sizes:
        try:
            parse_size(size)
        except ValueError as error:
            parser.error(f"--output_sizes: {error}")
    return args


def load_baseline(args, model, processor):
    """
    The untouched backbone for `--baseline sam`. A trained I-MedSAM checkpoint has its adapters and trained prompt
    and upscaling modules built in, so its own SAM head is not the backbone's: load the backbone it was trained
    from (`config.base_model`, or `--baseline_model`). A model that is the backbone already is used as it is.
    """
    name = args.baseline_model or getattr(model.config, "base_model", None)
    if name is None:
        if model.config.adapter_config is None:
            return model, processor  # not fine-tuned: its SAM head is the backbone's
        raise SystemExit("error: --baseline sam: the model does not record its backbone; pass --baseline_model.")
    if name == args.model:
        return model, processor
    backbone = load_backbone(name, model.config.image_size, use_implicit_decoder=False).eval()
    return backbone, processor_for_config(backbone.config)


def select_pairs(args, pairs):
    if args.split == "all":
        return pairs
    split_file = Path(args.split_file) if args.split_file else Path(args.model) / "splits.json"
    if not split_file.is_file():
        raise SystemExit(f"error: --split {args.split} needs --split_file (no {split_file}); or use --split all.")
    stems = set(load_splits(split_file)[args.split])
    return [p for p in pairs if p.stem in stems]


def write_overlays(model, processor, pairs, folder: Path, num_classes: int, prompt: str) -> None:
    """Ground truth in green, prediction in red, over the image."""
    from imedsam_hf.data import mask_box

    folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        labels = read_mask(pair.mask, num_classes)
        image = np.asarray(Image.open(pair.image).convert("RGB")).astype(np.float32)
        logits = predict_logits(model, processor, image, mask_box(labels) if prompt == "box" else None)[NATIVE]
        predicted = IMedSamProcessor.post_process_masks(logits[None])[0].numpy() > 0
        overlay = image.copy()
        overlay[predicted] = 0.5 * overlay[predicted] + 0.5 * np.array([255, 0, 0])
        overlay[labels > 0] = 0.7 * overlay[labels > 0] + 0.3 * np.array([0, 255, 0])
        Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(folder / f"{pair.stem}.png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        model, processor = load_model_and_processor(args.model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --model {args.model}: {error}") from error
    num_classes = args.num_classes or model.config.num_classes
    try:
        pairs, problems = discover_pairs(args.data_dir)
        pairs, problems = validate_pairs(pairs, num_classes, "skip", problems)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    pairs = select_pairs(args, pairs)[: args.limit]
    if not pairs:
        raise SystemExit(f"error: no pairs to evaluate in --data_dir {args.data_dir} (split {args.split}).")
    kwargs = dict(output_sizes=args.output_sizes, prompt=args.prompt, num_classes=num_classes, progress=True)
    rows, summary = evaluate_pairs(model, processor, pairs, **kwargs)
    rows = [{"model": "imedsam" if args.model != "litemedsam" else "litemedsam", **row} for row in rows]
    result = {
        "model": args.model,
        "data_dir": str(args.data_dir),
        "split": args.split,
        "prompt": args.prompt,
        "n_images": len(pairs),
        "results": summary,
    }
    if args.baseline == "sam":
        backbone, backbone_processor = load_baseline(args, model, processor)
        baseline_rows, result["baseline_sam"] = evaluate_pairs(
            backbone, backbone_processor, pairs, **kwargs, baseline=True
        )
        rows += [{**row, "model": "baseline_sam"} for row in baseline_rows]
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    csv_path = Path(args.csv) if args.csv else json_path.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        fields = sorted({key for row in rows for key in row}, key=lambda k: (k not in ("model", "stem", "size"), k))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if args.overlays:
        write_overlays(model, processor, pairs, Path(args.overlays), num_classes, args.prompt)
    for name, table in (("model", summary), ("baseline_sam", result.get("baseline_sam"))):
        for size, values in (table or {}).items():
            print(
                f"{name:12s} {size:>7s}  n={values['n']:3d}  Dice {values['dice']:.4f} ± {values['dice_std']:.4f}  "
                f"IoU {values['iou']:.4f}  HD95 {values['hd95']:.2f}  HD {values['hd']:.2f}"
            )
    return result


if __name__ == "__main__":
    main()
