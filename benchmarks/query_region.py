#!/usr/bin/env python
"""Querying the implicit decoder in the box's region of interest against the whole image: paired Dice, and time.

    python benchmarks/query_region.py --model imedsam-litemedsam-polyp --data_dir ../shared/data/EndoTect2020-polyp \
        --split test --jitter 0 0.1 --num_threads 2 --json benchmarks/results/query_region_polyp_cpu.json

One model, the same images, the same (seeded) boxes: `query_region="box"` (the default: dense queries only in the
box widened by `roi_margin`, SAM's logits elsewhere) against `"image"` (the whole grid, as before). Per box
protocol: the per-image Dice of both, their mean difference, how often the box region is higher and the Wilcoxon
signed-rank p-value (`compare_runs.compare`), and the seconds per image of each. Binary (one box per image) data.
"""

from __future__ import annotations

import argparse
import time

from common import add_paired_arguments, model_and_split, report
from compare_runs import compare

from imedsam_hf.evaluation import evaluate_pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_paired_arguments(parser)
    args = parser.parse_args(argv)
    model, processor, pairs = model_and_split(args.model, args.data_dir, args.split, args.num_threads)
    rows = []
    for jitter in args.jitter:
        scores, seconds = {}, {}
        for region in ("box", "image"):
            model.config.query_region = region
            start = time.perf_counter()
            per_image, _ = evaluate_pairs(model, processor, pairs, box_jitter=jitter, progress=True)
            seconds[region] = (time.perf_counter() - start) / len(pairs)
            scores[region] = {(str(r["size"]), r["stem"]): float(r["dice"]) for r in per_image if "dice" in r}
        (paired,) = compare(scores["box"], scores["image"])
        rows.append(
            {
                "boxes": "exact" if jitter == 0 else f"jitter {jitter}",
                "n": paired["n"],
                "dice_box": paired["mean_a"],
                "dice_image": paired["mean_b"],
                "difference_points": 100 * paired["mean_difference"],
                "box_higher": paired["a_higher"],
                "wilcoxon_p": paired["wilcoxon_p"],
                "s_per_image_box": seconds["box"],
                "s_per_image_image": seconds["image"],
            }
        )
    header = f"{args.model} on {args.data_dir} ({args.split}): query_region box vs image, paired per image"
    return report({"model": args.model, "split": args.split, "rows": rows}, header, list(rows[0]), args.json)


if __name__ == "__main__":
    main()
