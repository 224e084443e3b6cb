#!/usr/bin/env python
"""Whole BTCV scans with realistic prompts: 3-D Dice per organ, seconds per volume, for several models in one run.

    python benchmarks/btcv_volumes.py --data_dir ../shared/data/BTCV-Synapse-CT --split_file MODEL/splits.json \
        --split test --model litemedsam --model imedsam-litemedsam-btcv \
        --protocol labels boxes3d boxes3d_continue --num_threads 2 --json out.json

Each scan of the split is a volume: the staged NIfTI (`volumes/<case>.nii.gz`) when there is one, else its PNG
slices stacked by slice index (`images/`, `masks/`, the slices with an organ; `cases.csv` gives the spacing). Prompts:
- `labels`: every organ on every slice where it appears, its exact box (`imedsam predict --boxes-from-masks`);
- `boxes3d`: one tight 3-D box per organ per scan, propagated from the middle slice outwards, MedSAM's rule (a
  direction stops at the first empty mask; `imedsam predict --boxes`);
- `boxes3d_continue`: the same boxes, propagation continuing through empty slices inside the box's z range;
- `boxes3d_unconfined`: `boxes3d` without cutting each mask to its prompt box (MedSAM's rule as it is);
- `keyslice`: one 2-D box per organ, drawn on the slice where its box is largest, with its first and last slice
  (MedSAM2's CT prompts), propagated from that slice by the `boxes3d` rule (`imedsam predict --boxes` with
  `key_slice` entries).
- `keyslice_middle`: the same, the box drawn on the organ's slice nearest the middle of its z range (the CVPR 2025
  interactive challenge's `z_mid`).
- `keyslice_middle_whole`: the same box, its z range the whole scan's (a reader who gives no first and last slice).
Per organ: 3-D Dice and HD95 (mm) per scan, then the mean over scans; `dice_13`, `dice_8` the means over organs.
Where a protocol loses (`where_lost`, per organ, summed over scans): `missed_slices` the fraction of the organ's slices
left empty (a propagation that stopped early, or a middle slice that came out empty), `dice_ends` / `dice_middle`
the Dice over the outer quarter of the organ's slices at either end of its z range / over the rest.
`--overlays DIR`: per model, protocol and scan, `DIR/<model>/<protocol>/<case>.png`, a montage of slices with the
predicted organs in their colours, the true ones outlined and every box the protocol prompted with on each slice
(`volumes.volume_overlay`): where a propagation drifted, stopped or grew onto a neighbour.
Times: seconds per volume (segmentation only) and the model's load time, on `--num_threads` CPU threads. The
protocols of a scan share its slices' embeddings (`volumes.SliceEmbeddings`: each slice encoded once, the masks
unchanged); each protocol is still charged the encoding of every slice it visited, as a call of its own would be.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from common import VOLUME_PROTOCOLS, add_run_arguments, machine_description, report, setup_run, volume_prompts

from imedsam_hf import load_model
from imedsam_hf.data import load_splits, read_class_names, read_scan_spacing, slice_index
from imedsam_hf.processing_imedsam import TTA_MIRRORS
from imedsam_hf.volumes import (
    SliceEmbeddings,
    read_volume,
    segment_volume,
    stack_slices,
    volume_overlay,
    volume_scores,
)

COMMON_8 = (8, 4, 3, 2, 6, 11, 1, 7)


def scan_volume(data_dir: Path, case: str, stems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A scan's 8-bit image and label arrays `(X, Y, Z)`: the staged NIfTI pair, or its PNG slices stacked."""
    nifti = data_dir / "volumes" / f"{case}.nii.gz"
    if nifti.is_file():
        return read_volume(nifti).data, read_volume(data_dir / "labels" / f"{case}.nii.gz").data
    files = {
        slice_index(stem): (data_dir / "images" / f"{stem}.png", data_dir / "masks" / f"{stem}.png") for stem in stems
    }
    images, labels, _ = stack_slices(files)
    return images, labels


def where_lost(predicted: np.ndarray, labels: np.ndarray, class_id: int) -> dict[str, int]:
    """Voxel and slice counts of one organ in one scan: which slices a protocol left empty, overlap at the ends and
    in the middle of the organ's z range (the outer quarter of its slices on either side count as ends)."""
    truth, pred = labels == class_id, predicted == class_id
    slices = np.flatnonzero(truth.any(axis=(0, 1)))
    quarter = max(1, len(slices) // 4)
    ends = np.zeros(truth.shape[2], bool)
    ends[slices[:quarter]] = ends[slices[-quarter:]] = True
    counts = {"slices": len(slices), "missed": int((~pred[:, :, slices].any(axis=(0, 1))).sum())}
    for part, where in (("ends", ends), ("middle", ~ends)):
        t, p = truth[:, :, where], pred[:, :, where]
        counts[f"{part}_overlap"], counts[f"{part}_total"] = int((t & p).sum()), int(t.sum() + p.sum())
    return counts


def summarize_losses(counts: list[dict[str, int]]) -> dict[str, float]:
    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    return {
        "missed_slices": total["missed"] / max(total["slices"], 1),
        "dice_ends": 2 * total["ends_overlap"] / max(total["ends_total"], 1),
        "dice_middle": 2 * total["middle_overlap"] / max(total["middle_total"], 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split_file", default=None, help="splits.json (default: every scan of the folder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", nargs="*", default=None, help="these scans only")
    parser.add_argument("--model", action="append", help="model spec(s); default litemedsam (SAM mask)")
    parser.add_argument("--protocol", nargs="+", default=list(VOLUME_PROTOCOLS), choices=list(VOLUME_PROTOCOLS))
    parser.add_argument(
        "--tta", default="none", choices=list(TTA_MIRRORS), help="test-time mirroring of every slice (segment's tta)"
    )
    parser.add_argument("--overlays", default=None, help="folder for a montage PNG per model, protocol and scan")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, _ = setup_run(args)
    data_dir = Path(args.data_dir)
    stems = [p.stem for p in sorted((data_dir / "images").glob("*.png"))]
    if args.split_file:
        wanted = set(load_splits(args.split_file)[args.split])
        stems = [s for s in stems if s in wanted]
    by_case: dict[str, list[str]] = {}
    for stem in stems:
        by_case.setdefault(stem.split("_slice")[0], []).append(stem)
    cases = sorted(c for c in by_case if args.cases is None or c in args.cases)
    spacing = read_scan_spacing(data_dir / "cases.csv")
    names = read_class_names(data_dir) or {}  # None without a classes.json: the ids name the organs
    volumes = {case: scan_volume(data_dir, case, by_case[case]) for case in cases}
    # Each protocol's prompts of each scan, made once for every model.
    prompts = {(p, case): volume_prompts(p, volumes[case][1]) for p in args.protocol for case in cases}
    rows = []
    for spec in args.model or ["litemedsam"]:
        start = time.perf_counter()
        model, processor = load_model(spec, device=device)
        load_seconds = time.perf_counter() - start
        per_class: dict[str, dict[int, list[tuple[float, float]]]] = {p: {} for p in args.protocol}
        losses: dict[str, dict[int, list[dict[str, int]]]] = {p: {} for p in args.protocol}
        seconds: dict[str, list[float]] = {p: [] for p in args.protocol}
        for case in cases:
            images, labels = volumes[case]
            classes = [int(c) for c in np.unique(labels) if c > 0]
            # One scan's slice embeddings at a time, shared by the protocols: each slice encoded once.
            shared = SliceEmbeddings(model, images, processor=processor, tta=args.tta)
            for protocol in args.protocol:
                shared.visited.clear()
                encoding_before = sum(shared.seconds.values())
                given: list = []
                start = time.perf_counter()
                predicted = segment_volume(
                    model, images, processor=processor, progress=False, **prompts[protocol, case],
                    **VOLUME_PROTOCOLS[protocol], tta=args.tta, slice_embeddings=shared, prompts_given=given,
                )  # fmt: skip
                # Charged as a call of its own: the encoding of every slice it visited, whenever that was done.
                decoding = time.perf_counter() - start - (sum(shared.seconds.values()) - encoding_before)
                seconds[protocol].append(decoding + sum(shared.seconds[z] for z in shared.visited))
                if args.overlays:
                    folder = Path(args.overlays) / re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name) / protocol
                    folder.mkdir(parents=True, exist_ok=True)
                    volume_overlay(images, predicted, truth=labels, prompts=given).save(folder / f"{case}.png")
                for class_id, score in volume_scores(predicted, labels, spacing[case], classes).items():
                    per_class[protocol].setdefault(class_id, []).append((score["dice"], score["hd95"]))
                    losses[protocol].setdefault(class_id, []).append(where_lost(predicted, labels, class_id))
        for protocol in args.protocol:
            dice = {c: float(np.mean([d for d, _ in v])) for c, v in sorted(per_class[protocol].items())}
            hd95 = {c: float(np.mean([h for _, h in v])) for c, v in sorted(per_class[protocol].items())}
            rows.append(
                {
                    "model": spec,
                    "protocol": protocol,
                    "tta": args.tta,
                    "scans": len(cases),
                    "load_s": load_seconds,
                    "seconds_per_volume": float(np.mean(seconds[protocol])),
                    "dice_13": float(np.mean(list(dice.values()))),
                    "dice_8": float(np.mean([dice[c] for c in COMMON_8 if c in dice])),
                    "hd95_13_mm": float(np.mean(list(hd95.values()))),
                    "per_class": {
                        str(c): {"name": names.get(c, str(c)), "dice": dice[c], "hd95": hd95[c]} for c in dice
                    },
                    "where_lost": {str(c): summarize_losses(losses[protocol][c]) for c in dice},
                }
            )
            print(f"{spec} {protocol}: 13-organ 3-D Dice {rows[-1]['dice_13']:.4f}", flush=True)
    columns = ["model", "protocol", "scans", "load_s", "seconds_per_volume", "dice_13", "dice_8", "hd95_13_mm"]
    header = (
        f"BTCV {args.split} scans {cases} on {machine_description(device)} ({args.num_threads or 'default'} threads)"
    )
    return report({"cases": cases, "machine": machine_description(device), "rows": rows}, header, columns, args.json)


if __name__ == "__main__":
    main()
