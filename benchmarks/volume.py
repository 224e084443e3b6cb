#!/usr/bin/env python
"""One CT volume end to end: seconds per volume, the image encoder's share, peak memory, and the 3D scores.

    python benchmarks/volume.py --volume ../shared/data/BTCV-Synapse-CT/volumes/case0001.nii.gz \
        --labels ../shared/data/BTCV-Synapse-CT/labels/case0001.nii.gz --model litemedsam --model DIR \
        --num_threads 2 --json benchmarks/results/volume_case0001_cpu.json

Each `--model` (in one run, one after the other) segments the volume with `segment_volume` and the label volume's
prompts (every structure on every slice where it appears, all of a slice's boxes in one call), the protocol of
`imedsam predict --boxes-from-masks`. The encoder's share is the time spent in `encode_image` over the whole run;
peak memory is the resident-set (CPU) or allocator (CUDA) peak above the loaded model. 3D Dice and HD95 (mm) per
organ from `volume_scores` with the header's spacing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import add_run_arguments, machine_description, peak_memory, report, setup_run, synchronize

from imedsam_hf import load_model
from imedsam_hf.volumes import read_volume, segment_volume, volume_scores

COMMON_8 = (8, 4, 3, 2, 6, 11, 1, 7)


def timed_encoder(model, device):
    """Wrap `model.encode_image` to add up its wall time (synchronised on CUDA); returns the running totals."""
    totals = {"seconds": 0.0, "calls": 0}
    original = model.encode_image

    def encode_image(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        result = original(*args, **kwargs)
        synchronize(device)
        totals["seconds"] += time.perf_counter() - start
        totals["calls"] += 1
        return result

    model.encode_image = encode_image
    return totals


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", required=True, help="NIfTI volume (8-bit windowed, or HU with --window)")
    parser.add_argument("--labels", required=True, help="its label volume (class ids): the prompts and the truth")
    parser.add_argument("--model", action="append", help="model spec(s); default litemedsam (SAM mask)")
    parser.add_argument("--window", default=None, help="LEVEL,WIDTH or a preset, for volumes in HU")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, _ = setup_run(args)
    volume, labels = read_volume(args.volume), read_volume(args.labels)
    truth = labels.data.astype(np.int64)
    classes = [int(c) for c in np.unique(truth) if c > 0]
    rows = []
    for spec in args.model or ["litemedsam"]:
        model, processor = load_model(spec, device=device)
        encoder = timed_encoder(model, device)
        with peak_memory(device) as memory:
            start = time.perf_counter()
            predicted = segment_volume(
                model, volume, processor=processor, label_volume=labels, window=args.window, progress=False
            )
            synchronize(device)
            seconds = time.perf_counter() - start
        scores = volume_scores(predicted, truth, volume.spacing, classes)
        dice = {c: s["dice"] for c, s in scores.items()}
        hd95 = {c: s["hd95"] for c, s in scores.items()}
        rows.append(
            {
                "model": spec,
                "slices": int(volume.data.shape[2]),
                "slices_run": encoder["calls"],
                "seconds": seconds,
                "encoder_s": encoder["seconds"],
                "encoder_share": encoder["seconds"] / seconds,
                "peak_mib": memory["peak_mib"],
                "dice_13": float(np.nanmean(list(dice.values()))),
                "dice_8": float(np.nanmean([dice[c] for c in COMMON_8 if c in dice])),
                "hd95_13_mm": float(np.nanmean(list(hd95.values()))),
                "per_class": {str(c): scores[c] for c in classes},
            }
        )
    columns = ["model", "slices", "slices_run", "seconds", "encoder_s", "encoder_share", "peak_mib", "dice_13"]
    columns += ["dice_8", "hd95_13_mm"]
    header = f"{args.volume} on {machine_description(device)} ({args.num_threads or 'default'} threads)"
    return report(
        {"volume": args.volume, "machine": machine_description(device), "rows": rows}, header, columns, args.json
    )


if __name__ == "__main__":
    main()
