#!/usr/bin/env python
"""Record the boxes a model is prompted with when it propagates through the training scans, to train on them.

    python training/propagated_boxes.py --model outputs/litemedsam_btcv_prompts_cpu/final \
        --data_dir ../shared/data/BTCV-Synapse-CT --split_file imedsam_hf/shipped/imedsam-litemedsam-btcv/splits.json \
        --out outputs/propagated_boxes.json

Each scan of the split (its slices stacked by number, scans told apart by `--group_pattern`) is segmented as a user
would with one 3-D box per structure (`segment_volume(boxes_3d=...)`, the default propagation) and with a key slice
per structure (`key_slices`), the prompts made from its masks; every box the model is given on a slice (the starting
box and each propagated one, which drift onto neighbouring structures where the model's masks do) is written as
`{stem: {class id: [[x0, y0, x1, y1], ...]}}` in the slices' pixels. `train.py --propagated-boxes FILE
--propagated-box-probability P` then prompts that share of the training samples with them (DAgger's idea: train
on the states the model's own rollouts reach). Use the model the next stage starts from; for a second round, the
model that stage gave and `--add_to` the first round's file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import imedsam_hf.runtime as runtime  # looked up at call time: tests replace the allocator tuning
from imedsam_hf import load_model
from imedsam_hf.data import DEFAULT_GROUP_PATTERN, compile_group_pattern, discover_pairs, load_splits, volume_slice_key
from imedsam_hf.files import atomic_write
from imedsam_hf.volumes import (
    VOLUME_PROTOCOLS,
    SliceEmbeddings,
    segment_volume,
    stack_slices,
    volume_prompts,
    volume_scores,
)

PROTOCOLS = ("boxes3d", "keyslice")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model to propagate with (a run's final/, a shipped name)")
    parser.add_argument("--data_dir", "--data-dir", required=True, help="slices of volumes: images/ and masks/")
    parser.add_argument("--split_file", "--split-file", required=True, help="the training run's splits.json")
    parser.add_argument("--split", default="train", help="whose scans (default train)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument(
        "--add_to", "--add-to", default=None,
        help="a file of earlier rounds' boxes: written out with this round's added (DAgger keeps every round's)",
    )  # fmt: skip
    parser.add_argument("--group_pattern", "--group-pattern", default=DEFAULT_GROUP_PATTERN)
    parser.add_argument("--num_threads", "--num-threads", type=int, default=None)
    parser.add_argument(
        "--cpu_allocator", "--cpu-allocator", default="keep", choices=["keep", "default"],
        help="on a CPU under glibc: 'keep' freed memory in the process, as imedsam predict does (a CT volume 1 min 41 s "
        "-> 1 min 18 s); 'default' leaves malloc as it is",
    )  # fmt: skip
    return parser.parse_args(argv)


def scans_of(stems: list[str], pattern: str) -> dict[str, dict[int, str]]:
    """`{scan: {slice number: stem}}`; a stem without its scan and slice number is an error naming it."""
    compiled = compile_group_pattern(pattern)
    scans: dict[str, dict[int, str]] = {}
    for stem in stems:
        key = volume_slice_key(stem, compiled)
        if key is None:
            raise SystemExit(
                f"error: {stem!r} is not a slice of a volume (the scan by --group_pattern {pattern!r}, then the slice "
                "number, like case0001_slice061)"
            )
        scans.setdefault(key[0], {})[key[1]] = stem
    return scans


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[list[float]]]]:
    args = parse_args(argv)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    try:
        pairs = {p.stem: p for p in discover_pairs(args.data_dir)[0]}
        wanted = load_splits(args.split_file).get(args.split) or []
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    missing = [stem for stem in wanted if stem not in pairs]
    if not wanted or missing:
        raise SystemExit(
            f"error: --split_file {args.split_file}: split {args.split!r} "
            + (f"has stems not in --data_dir {args.data_dir}: {missing[:3]}" if missing else "is empty")
        )
    recorded: dict[str, dict[str, list[list[float]]]] = {}
    if args.add_to:
        try:
            recorded = json.loads(Path(args.add_to).read_text())
            if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
                raise ValueError("not {stem: {class id: [box, ...]}}")
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: --add_to {args.add_to}: not a file this script wrote ({error})") from error
    model, processor = load_model(args.model)
    done = runtime.tune_cpu_allocator(args.cpu_allocator, next(model.parameters()).device)
    if done:
        print(done)
    for scan, stems in sorted(scans_of(wanted, args.group_pattern).items()):
        start = time.time()
        images, labels, first = stack_slices({z: (pairs[s].image, pairs[s].mask) for z, s in stems.items()})
        classes = [int(c) for c in np.unique(labels) if c]
        scores = []
        shared = SliceEmbeddings(model, images, processor=processor)  # the protocols encode each slice once
        for protocol in args.protocol:
            given: list[tuple[int, int, list[float]]] = []
            predicted = segment_volume(
                model, images, processor=processor, progress=False, prompts_given=given, slice_embeddings=shared,
                **volume_prompts(protocol, labels), **VOLUME_PROTOCOLS[protocol],
            )  # fmt: skip
            for z, class_id, box in given:
                stem = stems.get(first + z)
                if stem is not None:  # a gap in the slices: nothing to train on
                    boxes = recorded.setdefault(stem, {}).setdefault(str(class_id), [])
                    boxes.append([round(float(v), 2) for v in box])
            dice = np.mean([s["dice"] for s in volume_scores(predicted, labels, (1.0, 1.0, 1.0), classes).values()])
            scores.append(f"{protocol} {dice:.3f}")
        print(
            f"{scan}: {len(stems)} slices, mean 3-D Dice {', '.join(scores)} ({time.time() - start:.0f} s)", flush=True
        )
    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(recorded)))
    count = sum(len(b) for classes in recorded.values() for b in classes.values())
    print(f"{count} boxes on {len(recorded)} slices written to {args.out}")
    return recorded


if __name__ == "__main__":
    main()
