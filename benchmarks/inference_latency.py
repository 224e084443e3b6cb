#!/usr/bin/env python
"""Inference latency and peak memory: I-MedSAM (dense vs adaptive querying) vs the backbone's own SAM forward.

    python benchmarks/inference_latency.py --backbone litemedsam --output_sizes 256 512 1024 2048 \
        --json benchmarks/results/latency_litemedsam.json
    python benchmarks/inference_latency.py --backbone vit-b-384 --mixed_precision bf16     # on a GPU

Same image, same box, same output size for every row. "sam" is the backbone alone (encoder, prompt encoder, mask
decoder, SAM's upsample to the output size); "i-medsam-*" adds the frequency adapter, LoRA and the implicit
decoder. Ratios to the SAM row of the same size are the headline numbers (this machine is noisy). Random ViT-B
weights are fine for timing; LiteMedSAM uses its real weights.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    BACKBONES,
    adapted,
    add_run_arguments,
    build_model,
    machine_description,
    peak_memory,
    progress,
    report,
    setup_run,
    time_call,
)

from imedsam_hf.modeling_imedsam import sam_mask_on_grid


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="litemedsam", choices=BACKBONES)
    parser.add_argument("--output_sizes", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--modes", nargs="+", default=["adaptive", "dense"], choices=["adaptive", "dense"])
    parser.add_argument("--max_dense_points", type=int, default=1100 * 1100, help="skip larger dense grids (slow)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = setup_run(args)
    model = adapted(build_model(args.backbone)).to(device).eval()
    base = model.get_base_model()
    size = base.config.image_size
    pixel_values = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    boxes = torch.tensor([[0.2, 0.25, 0.7, 0.8]], device=device) * size

    def run_sam(output_size):
        with model.disable_adapter():
            outputs = model(pixel_values=pixel_values, input_boxes=boxes, output_size=(16, 16), full_sam_logits=True)
        return sam_mask_on_grid(outputs.sam_logits, size, output_size, None)

    def run_imedsam(output_size):
        return model(pixel_values=pixel_values, input_boxes=boxes, output_size=output_size).logits

    # Warm every variant once first (allocator, oneDNN primitive caches): otherwise the first row pays for it.
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        smallest = (min(args.output_sizes),) * 2
        run_sam(smallest)
        for mode in args.modes:
            base.config.query_mode = mode
            run_imedsam(smallest)
    rows = []
    for output in progress(args.output_sizes, "output sizes"):
        shape = (output, output)
        variants = [("sam", run_sam)] + [(f"i-medsam-{mode}", (mode, run_imedsam)) for mode in args.modes]
        sam_time = None
        for name, runner in variants:
            if isinstance(runner, tuple):
                mode, runner = runner
                if mode == "dense" and output * output > args.max_dense_points:
                    rows.append({"output": output, "variant": name, "note": "skipped (--max_dense_points)"})
                    continue
                base.config.query_mode = mode
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with peak_memory(device) as memory:
                    timing = time_call(lambda: runner(shape), device, repeats=args.repeats)  # noqa: B023
            row = {"output": output, "variant": name, "latency_s": timing["median_s"], "peak_mib": memory["peak_mib"]}
            if name == "sam":
                sam_time = timing["median_s"]
            row["vs_sam"] = timing["median_s"] / sam_time
            rows.append(row)
    for mode in args.modes:
        times = {r["output"]: r["latency_s"] for r in rows if r["variant"] == f"i-medsam-{mode}" and "latency_s" in r}
        if min(args.output_sizes) in times:
            for row in rows:
                if row["variant"] == f"i-medsam-{mode}" and "latency_s" in row:
                    row["vs_smallest_output"] = row["latency_s"] / times[min(args.output_sizes)]
    result = {
        "benchmark": "inference_latency",
        "backbone": args.backbone,
        "mixed_precision": args.mixed_precision,
        "device": machine_description(device),
        "rows": rows,
    }
    columns = ["output", "variant", "latency_s", "peak_mib", "vs_sam", "vs_smallest_output", "note"]
    return report(result, f"{args.backbone}, {result['device']}", columns, args.json)


if __name__ == "__main__":
    main()
