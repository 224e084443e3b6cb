#!/usr/bin/env python
"""One CT volume end to end: seconds per volume (with and without start-up), the image encoder's share, peak
memory and the 3D scores, for several models, encoder backends and prompt protocols in one run.

    python benchmarks/volume.py --volume ../shared/data/BTCV-Synapse-CT/volumes/case0001.nii.gz \
        --labels ../shared/data/BTCV-Synapse-CT/labels/case0001.nii.gz --model litemedsam \
        --model imedsam-litemedsam-btcv --backend torch --backend openvino --protocol labels boxes3d \
        --num_threads 2 --json benchmarks/results/volume_case0001_cpu.json

Protocols: `labels`, every structure prompted on every slice where it appears (all of a slice's boxes in one call,
`imedsam predict --boxes-from-masks`); `boxes3d`, one tight 3-D box per structure, propagated from its middle slice
(`imedsam predict --boxes`, MedSAM's stop rule; each slice encoded once for all structures); `boxes3d_continue`, the
same continuing through empty slices in the box's z range (both cut each mask to its prompt box);
`boxes3d_unconfined`, MedSAM's rule as it is (`imedsam predict --no-confine`); `keyslice`, one 2-D box per structure on
the slice where it is largest with its z range, propagated from there (`--boxes` entries with `key_slice`). Start-up is loading the model and, for a runtime backend,
exporting or loading its compiled encoder (`--clear_cache` measures a first start). The encoder's share is the time
spent in `encode_image`; peak memory is the resident-set (CPU) or allocator (CUDA) peak above the loaded model. 3D
Dice and HD95 (mm) per organ from `volume_scores` with the header's spacing.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import nibabel as nib
import numpy as np
from common import (
    VOLUME_PROTOCOLS,
    add_run_arguments,
    backend_variant,
    machine_description,
    peak_memory,
    report,
    setup_run,
    synchronize,
    volume_prompts,
)

from imedsam_hf import load_model
from imedsam_hf.volumes import PLANES, Volume, read_volume, segment_volume, volume_scores

COMMON_8 = (8, 4, 3, 2, 6, 11, 1, 7)


def timed_encoder(model, device):
    """Wrap `model.encode_image` to add up its wall time (synchronised on CUDA); returns the running totals."""
    original = model.encode_image
    totals = {"seconds": 0.0, "calls": 0, "original": original}

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


def stored_as(volume: Volume, codes: str) -> Volume:
    """`volume` stored in the orientation `codes` (``"RAS"``): its voxels moved, each keeping its world position."""
    if len(codes) != 3 or not set(codes.upper()) <= set("LRAPSI"):
        raise SystemExit(f"--stored-as: {codes!r} is not three axis codes such as RAS or LPS")
    start = nib.orientations.io_orientation(volume.affine)
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(codes.upper())))
    data = nib.orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.data.shape)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine, header=volume.header)  # zooms follow the axes
    return dataclasses.replace(volume, data=image.dataobj, affine=affine, header=image.header)


def every_nth_slice(volume: Volume, step: int) -> Volume:
    """Every `step`-th slice of `volume` (its slicing axis, the stored third), the spacing between them `step` times."""
    data = np.ascontiguousarray(np.asarray(volume.data)[:, :, ::step])
    affine = volume.affine.copy()
    affine[:3, 2] *= step
    image = nib.Nifti1Image(data, affine, header=volume.header)
    return dataclasses.replace(volume, data=image.dataobj, affine=affine, header=image.header)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", required=True, help="NIfTI volume (8-bit windowed, or HU with --window)")
    parser.add_argument("--labels", required=True, help="its label volume (class ids): the prompts and the truth")
    parser.add_argument("--model", action="append", help="model spec(s); default litemedsam (SAM mask)")
    parser.add_argument(
        "--backend",
        action="append",
        help="encoder backend(s): torch (default), openvino, onnx; BACKEND:PRECISION for another precision "
        "(openvino:bf16)",
    )
    parser.add_argument("--protocol", nargs="+", default=["labels"], choices=list(VOLUME_PROTOCOLS))
    parser.add_argument("--clear_cache", action="store_true", help="start runtime backends without a compiled cache")
    parser.add_argument("--window", default=None, help="LEVEL,WIDTH or a preset, for volumes in HU")
    parser.add_argument(
        "--stored-as",
        default=None,
        metavar="CODES",
        help="store the volume and its labels in this orientation first (nibabel's axis codes: RAS, LPS, ...; the "
        "voxels moved, their world positions kept): what a scan stored another way gets",
    )
    parser.add_argument(
        "--keep-every",
        type=int,
        default=1,
        metavar="N",
        help="then keep every N-th slice of the (stored) slicing axis, its spacing N times: a coronal reformat's "
        "thicker planes (with --stored-as LSA)",
    )
    parser.add_argument(
        "--plane", choices=PLANES, default="stored", help="segment_volume's plane: 'axial' reslices a coronal stack"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device, _ = setup_run(args)
    volume, labels = read_volume(args.volume), read_volume(args.labels)
    if args.stored_as:
        volume, labels = stored_as(volume, args.stored_as), stored_as(labels, args.stored_as)
    if args.keep_every > 1:
        volume, labels = every_nth_slice(volume, args.keep_every), every_nth_slice(labels, args.keep_every)
    truth = labels.data.astype(np.int64)
    classes = [int(c) for c in np.unique(truth) if c > 0]
    prompts = {protocol: volume_prompts(protocol, labels) for protocol in args.protocol}  # once for every model
    rows = []
    for spec in args.model or ["litemedsam"]:
        for variant in args.backend or ["torch"]:
            backend, options = backend_variant(variant)
            if args.clear_cache and backend != "torch":
                options["cache_dir"] = tempfile.mkdtemp(prefix="imedsam-runtime-")
            start = time.perf_counter()
            model, processor = load_model(spec, device=device, backend=backend, backend_options=options)
            startup = time.perf_counter() - start
            for protocol in args.protocol:
                encoder = timed_encoder(model, device)
                with peak_memory(device) as memory:
                    start = time.perf_counter()
                    predicted = segment_volume(
                        model, volume, processor=processor, window=args.window, progress=False, plane=args.plane,
                        **prompts[protocol], **VOLUME_PROTOCOLS[protocol],
                    )  # fmt: skip
                    synchronize(device)
                    seconds = time.perf_counter() - start
                model.encode_image = encoder["original"]
                scores = volume_scores(predicted, truth, volume.spacing, classes)
                dice = {c: s["dice"] for c, s in scores.items()}
                hd95 = {c: s["hd95"] for c, s in scores.items()}
                rows.append(
                    {
                        "model": spec,
                        "backend": variant,
                        "protocol": protocol,
                        "slices": int(volume.data.shape[2]),
                        "slices_encoded": encoder["calls"],
                        "startup_s": startup,
                        "seconds": seconds,
                        "seconds_with_startup": seconds + startup,
                        "encoder_s": encoder["seconds"],
                        "encoder_share": encoder["seconds"] / seconds,
                        "peak_mib": memory["peak_mib"],
                        "dice_13": float(np.nanmean(list(dice.values()))),
                        "dice_8": float(np.nanmean([dice[c] for c in COMMON_8 if c in dice])),
                        "hd95_13_mm": float(np.nanmean(list(hd95.values()))),
                        "per_class": {str(c): scores[c] for c in classes},
                    }
                )
                print(f"{spec} {variant} {protocol}: {seconds:.1f} s, 3D Dice {rows[-1]['dice_13']:.4f}", flush=True)
    columns = ["model", "backend", "protocol", "slices_encoded", "startup_s", "seconds", "encoder_share", "peak_mib"]
    columns += ["dice_13", "dice_8", "hd95_13_mm"]
    header = f"{args.volume} on {machine_description(device)} ({args.num_threads or 'default'} threads)"
    return report(
        {
            "volume": args.volume,
            "stored_as": "".join(volume.axcodes),
            "keep_every": args.keep_every,
            "plane": args.plane,
            "machine": machine_description(device),
            "rows": rows,
        },
        header,
        columns,
        args.json,
    )


if __name__ == "__main__":
    main()
