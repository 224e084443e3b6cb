#!/usr/bin/env python
"""Several structures of one slice: one call with every box (one encoder pass) against one call per box.

    python benchmarks/multi_prompt.py --image ../shared/data/BTCV-Synapse-CT/images/case0039_slice068.png \
        --mask ../shared/data/BTCV-Synapse-CT/masks/case0039_slice068.png --json benchmarks/results/multi_prompt.json

Every organ present in the class-id mask is prompted with its exact box, at the image's own size. The model is
LiteMedSAM with a fresh implicit decoder (random decoder weights time like trained ones) or any `--model` spec;
both rows give the same masks (checked: the largest probability difference is reported).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import add_run_arguments, backend_variant, machine_description, peak_memory, report, setup_run, time_call

from imedsam_hf import load_model, segment
from imedsam_hf.data import mask_box, read_mask


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--mask", required=True, help="class-id mask of the image: one box per class present")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument(
        "--sam_mask_only", action="store_true", help="the backbone's SAM mask output (no implicit decoder)"
    )
    parser.add_argument("--query_region", default=None, choices=["box", "image"], help="default: the model's")
    parser.add_argument(
        "--backend", default="torch", help="the image encoder's backend (torch, openvino, onnx; openvino:bf16 for bf16)"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, _ = setup_run(args)
    overrides = {"use_implicit_decoder": not args.sam_mask_only}
    if args.query_region:
        overrides["query_region"] = args.query_region
    backend, options = backend_variant(args.backend)
    model, processor = load_model(
        args.model, device=device, config_overrides=overrides, backend=backend, backend_options=options
    )
    labels = read_mask(args.mask, num_classes=255)
    classes = [int(c) for c in np.unique(labels) if c > 0]
    boxes = [mask_box(labels == c).tolist() for c in classes]
    aware = model.config.num_classes > 1  # a class-aware model: each box with its class

    def together():
        return segment(model, args.image, box=boxes, processor=processor, classes=classes if aware else None)

    def one_by_one():
        return [
            segment(model, args.image, box=box, processor=processor, classes=[c] if aware else None)
            for box, c in zip(boxes, classes)
        ]

    difference = max(
        float(np.abs(several - alone.probabilities).max())
        for several, alone in zip(together().probabilities, one_by_one())
    )
    pixel_values = processor(args.image)["pixel_values"].to(device)

    def encoder_alone():
        with torch.no_grad():
            return model.encode_image(pixel_values)

    rows = []
    for name, run in (("one call, all boxes", together), ("one call per box", one_by_one), ("encoder", encoder_alone)):
        with peak_memory(device) as memory:
            timing = time_call(run, device, repeats=args.repeats)
        prompts = 0 if run is encoder_alone else len(boxes)
        rows.append(
            {"variant": name, "prompts": prompts, "seconds": timing["median_s"], "peak_mib": memory["peak_mib"]}
        )
    rows[1]["vs_one_call"] = rows[1]["seconds"] / rows[0]["seconds"]
    result = {
        "benchmark": "multi_prompt",
        "model": args.model,
        "implicit_decoder": not args.sam_mask_only,
        "query_region": model.config.query_region,
        "backend": args.backend,
        "image": args.image,
        "classes": classes,
        "max_probability_difference": difference,
        "device": machine_description(device),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    decoder = "SAM mask" if args.sam_mask_only else "implicit decoder"
    header = f"{args.model} ({decoder}), {len(boxes)} boxes on {args.image}, {result['device']}; max |p1 - p2| = {difference:.2e}"
    return report(result, header, ["variant", "prompts", "seconds", "peak_mib", "vs_one_call"], args.json)


if __name__ == "__main__":
    main()
