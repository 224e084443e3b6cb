#!/usr/bin/env python
"""SAM's upscaling in each box's window against the whole frame: paired per-structure Dice, and decoding time.

    python benchmarks/upscale_window.py --model imedsam-litemedsam-btcv \
        --data_dir ../shared/data/BTCV-Synapse-CT --split test --num_threads 2 \
        --json benchmarks/results/upscale_window_btcv_cpu.json

One model, the same images and image embeddings, the same (seeded) boxes: the default forward, whose mask decoder
upscales each box prompt only in the window its region of interest needs (`IMedSamModel._decode_in_windows`),
against `full_sam_logits=True` (the whole frame for every prompt, as before). The two differ only where SAM's mask
has a part outside a box's window that does not reach the window's edge. Per box protocol (exact boxes, boxes
jittered by `--jitter`): per-structure Dice of both (every structure of an image in one call, class-aware for a
multi-class model), the mean difference, how many structures differ at all, how often the window is higher, the
Wilcoxon signed-rank p-value (`compare_runs.compare`), and the decoding seconds per image of each (the encoder runs
once per image, outside the timing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import add_paired_arguments, machine_description, model_and_split, report
from compare_runs import compare

from imedsam_hf.data import mask_box, read_mask
from imedsam_hf.evaluation import jittered_boxes, score_mask
from imedsam_hf.processing_imedsam import IMedSamProcessor, to_rgb_array

VARIANTS = {"window": False, "frame": True}  # full_sam_logits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_paired_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="the first N images of the split only")
    args = parser.parse_args(argv)
    model, processor, pairs = model_and_split(args.model, args.data_dir, args.split, args.num_threads)
    pairs = pairs[: args.limit] if args.limit else pairs
    multi_class = model.config.num_classes > 1
    dice = {(jitter, name): {} for jitter in args.jitter for name in VARIANTS}
    seconds = {(jitter, name): 0.0 for jitter in args.jitter for name in VARIANTS}
    for pair in pairs:
        labels = read_mask(pair.mask, 255 if multi_class else 1)
        classes = [int(c) for c in np.unique(labels) if c > 0]
        if not classes:
            continue
        image = to_rgb_array(pair.image)
        exact = [mask_box(labels == c) for c in classes]
        with torch.inference_mode():
            embeddings = model.encode_image(processor(image)["pixel_values"])
        for jitter in args.jitter:
            boxes = exact
            if jitter > 0:  # the same boxes as `imedsam evaluate --box-jitter` (seeded by the image's stem)
                boxes = jittered_boxes(exact, jitter, labels.shape, pair.stem)
            inputs = processor(image, input_boxes=[np.stack(boxes).tolist()])
            size = tuple(inputs["original_sizes"][0].tolist())
            extra = {"input_classes": torch.tensor([classes])} if multi_class else {}
            for name, full in VARIANTS.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    logits = model(
                        image_embeddings=embeddings,
                        input_boxes=inputs["input_boxes"],
                        output_size=size,
                        output_region=inputs["output_region"],
                        full_sam_logits=full,
                        **extra,
                    ).logits[0]
                seconds[jitter, name] += time.perf_counter() - start
                masks = IMedSamProcessor.post_process_masks(logits.float()).numpy()
                for class_id, mask in zip(classes, masks):
                    target = (labels == class_id).astype(np.int64)
                    dice[jitter, name][("native", f"{pair.stem}#{class_id}")] = score_mask(mask, target, 1)["dice"]
    rows = []
    for jitter in args.jitter:
        window, frame = dice[jitter, "window"], dice[jitter, "frame"]
        (paired,) = compare(window, frame)
        differing = sum(window[key] != frame[key] for key in window)
        rows.append(
            {
                "boxes": "exact" if jitter == 0 else f"jittered {jitter:g}",
                "structures": paired["n"],
                "dice_window": paired["mean_a"],
                "dice_frame": paired["mean_b"],
                "mean_difference": paired["mean_difference"],
                "structures_differing": differing,
                "window_higher": paired["a_higher"],
                "wilcoxon_p": paired["wilcoxon_p"],
                "decode_s_per_image_window": seconds[jitter, "window"] / len(pairs),
                "decode_s_per_image_frame": seconds[jitter, "frame"] / len(pairs),
            }
        )
    result = {
        "benchmark": "upscale_window",
        "model": args.model,
        "data_dir": args.data_dir,
        "split": args.split,
        "images": len(pairs),
        "threads": torch.get_num_threads(),
        "machine": machine_description(torch.device("cpu")),
        "rows": rows,
    }
    columns = [
        "boxes",
        "structures",
        "dice_window",
        "dice_frame",
        "mean_difference",
        "structures_differing",
        "window_higher",
        "wilcoxon_p",
        "decode_s_per_image_window",
        "decode_s_per_image_frame",
    ]
    return report(
        result, f"{args.model} on {args.data_dir} ({args.split}): upscaling window vs frame", columns, args.json
    )


if __name__ == "__main__":
    main()
