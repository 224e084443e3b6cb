#!/usr/bin/env python
"""Adaptive vs dense querying of a trained model: Dice, HD95 and time on the same images at the same output sizes.

    python benchmarks/adaptive_accuracy.py --model outputs/litemedsam_polyp/final \
        --data_dir ../shared/data/EndoTect2020-polyp --split test --output_sizes 512 1024 --limit 8 \
        --json benchmarks/results/adaptive_accuracy_litemedsam.json

Sizes are longest sides (aspect kept); ground truth resized with nearest neighbour (the evaluation protocol of
`imedsam_hf.evaluation`). Both modes score the same model in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine_description, model_and_split, progress, report

from imedsam_hf.evaluation import evaluate_pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_sizes", nargs="+", default=["512", "1024"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--base_sizes", nargs="+", type=int, default=[0], help="adaptive base grid sides to compare (0: the default)"
    )
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model, processor, pairs = model_and_split(args.model, args.data_dir, args.split, args.num_threads)
    pairs = pairs[: args.limit]
    rows = []
    for size in progress(args.output_sizes, "output sizes"):
        variants = [("dense", None)] + [("adaptive", base or None) for base in args.base_sizes]
        size_rows = []
        for mode, base in variants:
            model.config.query_mode, model.config.adaptive_base_size = mode, base
            start = time.perf_counter()
            _, summary = evaluate_pairs(model, processor, pairs, output_sizes=[size], progress=True)
            elapsed = time.perf_counter() - start
            values = summary[str(size)]
            size_rows.append(
                {
                    "output": size,
                    "mode": mode if base is None else f"{mode} (base {base})",
                    "dice": values["dice"],
                    "hd95": values["hd95"],
                    "seconds_per_image": elapsed / len(pairs),
                }
            )
        for row in size_rows[1:]:
            row["dice_minus_dense_points"] = 100 * (row["dice"] - size_rows[0]["dice"])
            row["speedup_vs_dense"] = size_rows[0]["seconds_per_image"] / row["seconds_per_image"]
        rows += size_rows
    result = {
        "benchmark": "adaptive_accuracy",
        "model": args.model,
        "n_images": len(pairs),
        "device": machine_description(torch.device("cpu")),
        "rows": rows,
    }
    columns = ["output", "mode", "dice", "hd95", "seconds_per_image", "dice_minus_dense_points", "speedup_vs_dense"]
    return report(result, f"{args.model}: {len(pairs)} {args.split} images, {result['device']}", columns, args.json)


if __name__ == "__main__":
    main()
