#!/usr/bin/env python
"""Training-step time and peak memory: I-MedSAM vs LoRA-only (SAMed-style) on the same backbone.

    python benchmarks/training_step.py --backbone litemedsam --batch_size 4 --json benchmarks/results/train_step_litemedsam.json
    python benchmarks/training_step.py --backbone vit-b-384 --batch_size 1 --mixed_precision bf16   # on a GPU

One optimizer step (forward, Dice+BCE loss, backward, AdamW) with box prompts. I-MedSAM: LoRA + frequency adapter +
implicit decoder trained on `--train_points` sampled points per image (0: the whole frame, the paper's way).
LoRA-only: LoRA on q/v with SAM's own mask output and the same trainable prompt/upscaling modules. I-MedSAM with
the image encoder frozen (`training/train.py --freeze-image-encoder --no-augment`): the step on embeddings encoded
once (the steady state after the first epoch); only the prompt side trains. All variants are measured in the same
run; their ratios are the headline numbers.
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

from imedsam_hf.training import FrozenImageEncoder, forward_and_loss, parameter_groups

VARIANTS = {
    "i-medsam": dict(config=dict(), recipe=dict()),
    "lora-only": dict(config=dict(use_implicit_decoder=False, use_frequency_adapter=False), recipe=dict()),
    "i-medsam, frozen encoder": dict(config=dict(), recipe=dict(), frozen_encoder=True),
}


def make_step(model, batch, device, train_points: int, autocast_dtype, frozen_encoder: bool = False):
    """One optimizer step of `training/train.py`'s recipe: its forward and loss (`forward_and_loss`), backward, AdamW.
    `frozen_encoder`: on the batch's embeddings, encoded once beforehand (`FrozenImageEncoder`)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4, 1e-3, 0.01))
    pixel_values, boxes, labels, sizes = batch
    inputs = {"pixel_values": pixel_values, "input_boxes": boxes, "labels": labels, "reshaped_size": sizes}
    if frozen_encoder:
        inputs = FrozenImageEncoder(model, cache=False)(inputs)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = forward_and_loss(model, inputs, model.config.num_classes, train_points=train_points)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="litemedsam", choices=BACKBONES)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_points", type=int, default=4096, help="0 = every pixel of the frame")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, autocast_dtype = setup_run(args)
    rows = []
    for name, variant in progress(VARIANTS.items(), "variants", total=len(VARIANTS)):
        model = adapted(build_model(args.backbone, **variant["config"]), **variant["recipe"]).to(device).train()
        size = model.config.image_size
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.rand(args.batch_size, 3, size, size, generator=generator).to(device)
        boxes = torch.tensor([[0.2, 0.25, 0.7, 0.8]]).repeat(args.batch_size, 1).to(device) * size
        labels = torch.zeros(args.batch_size, size, size, dtype=torch.long, device=device)
        labels[:, size // 4 : size * 3 // 4, size // 5 : size * 7 // 10] = 1
        sizes = torch.tensor([[size, size]]).repeat(args.batch_size, 1).to(device)
        frozen = variant.get("frozen_encoder", False)
        step = make_step(model, (pixel_values, boxes, labels, sizes), device, args.train_points, autocast_dtype, frozen)
        with peak_memory(device) as memory:
            timing = time_call(step, device, repeats=args.repeats)
        trainable = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and not (frozen and "vision_encoder" in n)
        )
        rows.append(
            {
                "variant": name,
                "trainable_params": trainable,
                "step_s": timing["median_s"],
                "images_per_s": args.batch_size / timing["median_s"],
                "peak_mib": memory["peak_mib"],
            }
        )
        del model, step
    rows[0]["time_vs_lora_only"] = rows[0]["step_s"] / rows[1]["step_s"]
    rows[2]["time_vs_i_medsam"] = rows[2]["step_s"] / rows[0]["step_s"]
    result = {
        "benchmark": "training_step",
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "train_points": args.train_points,
        "mixed_precision": args.mixed_precision,
        "device": machine_description(device),
        "rows": rows,
    }
    columns = [
        "variant", "trainable_params", "step_s", "images_per_s", "peak_mib", "time_vs_lora_only", "time_vs_i_medsam"
    ]  # fmt: skip
    return report(result, f"{args.backbone}, batch {args.batch_size}, {result['device']}", columns, args.json)


if __name__ == "__main__":
    main()
