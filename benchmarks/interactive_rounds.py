#!/usr/bin/env python
"""The CVPR 2025 interactive 3-D challenge's protocol on BTCV scans: a box round, then refinement rounds that add per
structure one click at the centre of its largest error, each round given the round before's labels.

    python benchmarks/interactive_rounds.py --data_dir ../shared/data/BTCV-Synapse-CT --case case0001 case0002 \
        --model litemedsam --num_threads 2 --json benchmarks/results/interactive_rounds_btcv.json

Each scan (`volumes/<case>.nii.gz` with `labels/<case>.nii.gz`, else its PNG slices stacked by slice index as
`btcv_volumes.py` stacks them, `cases.csv` giving the spacing) is laid out as a challenge case: `imgs` `(D, H, W)`
as `volumes.slice_image` shows the slices, one box dict per organ (its z range, and the 2-D box of the labelled slice
nearest the middle of the range as `z_mid`). Round 0 segments the boxes (`volumes.segment_npz_case`); rounds 1..5
(`--rounds`) place the clicks as the challenge's `CVPR25_iter_eval.py` does (per organ the largest 26-connected
error component, the voxel of largest distance to its edge, ties broken by a generator seeded 42: foreground where
the organ was missed, background where it was claimed wrongly) and correct the labels
(`volumes.refine_with_clicks`, every click so far, the round before's labels), what `imedsam predict` does with a
round's `.npz`. Per round: mean 3-D Dice over the organs, mean NSD at 2 mm (the challenge's: DeepMind's surface
elements weighted by area, `metrics.surfel_surface_dice`, the scan's spacing; MONAI needed), seconds; `dsc_auc` /
`nsd_auc` the area under the Dice / NSD of the click rounds (the challenge's `DSC_AUC`, `NSD_AUC`); the edits per action (`grow`, `extend`, `remove`, `cut`, `trim`; those whose
answer still disagreed with the click counted in `refused`). `--no_boxes`: the challenge's cases without boxes,
clicks only from round 1 (round 0 scores nothing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from btcv_volumes import scan_volume
from common import report
from scipy import ndimage

from imedsam_hf import load_model
from imedsam_hf.configuration_imedsam import is_class_aware
from imedsam_hf.data import read_scan_spacing
from imedsam_hf.metrics import dice_from_counts, surfel_surface_dice
from imedsam_hf.volumes import read_volume, refine_with_clicks, segment_npz_case, segment_volume, slice_image


def scan_arrays(data_dir: Path, case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A scan's 8-bit image and labels `(X, Y, Z)` and its spacing `(x, y, z)` in mm: the staged NIfTI pair, or its
    PNG slices stacked (the slices with an organ; `cases.csv`'s spacing)."""
    nifti = data_dir / "volumes" / f"{case}.nii.gz"
    if nifti.is_file():
        volume = read_volume(nifti)
        return volume.data, read_volume(data_dir / "labels" / f"{case}.nii.gz").data, volume.spacing
    stems = [p.stem for p in sorted((data_dir / "images").glob(f"{case}_*.png"))]
    if not stems:
        raise SystemExit(f"{case}: neither {nifti} nor {data_dir / 'images'}/{case}_*.png")
    image, labels = scan_volume(data_dir, case, stems)
    return image, labels, read_scan_spacing(data_dir / "cases.csv")[case]


def challenge_case(
    data_dir: Path, case: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray, tuple[float, float, float]]:
    """`(imgs, gts, boxes, key_slices, image, spacing)` of a BTCV scan laid out as a challenge case; boxes `(N, 6)`
    as `read_npz_case` gives the dicts, one per organ present (label ``i + 1`` is the ``i``-th id, sorted); `image`
    the scan `(X, Y, Z)`, `spacing` `(z, y, x)` of `imgs`' `(D, H, W)`."""
    image, labels, (sx, sy, sz) = scan_arrays(data_dir, case)
    imgs = np.stack([slice_image(image, z) for z in range(image.shape[2])])
    gts = np.stack([slice_image(labels, z) for z in range(labels.shape[2])])
    boxes, key_slices = [], []
    for class_id in np.unique(gts)[1:]:
        slices = np.flatnonzero((gts == class_id).any(axis=(1, 2)))
        middle = int(slices[np.argmin(abs(slices - (slices[0] + slices[-1]) / 2))])
        ys, xs = np.nonzero(gts[middle] == class_id)
        boxes.append([xs.min(), ys.min(), slices[0], xs.max(), ys.max(), slices[-1]])
        key_slices.append(middle)
    return imgs, gts, np.asarray(boxes, dtype=np.int64), key_slices, image, (sz, sy, sx)


def error_centre(component: np.ndarray) -> tuple[int, int, int]:
    """The challenge's click in an error component: the voxel farthest from its edge (distance transform of its
    bounding box padded by a quarter of its size), the first draw of a generator seeded 42 among ties."""
    coords = np.argwhere(component)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    crop = component[tuple(slice(a, b) for a, b in zip(low, high))]
    pad = np.maximum((np.array(crop.shape) * 0.25).astype(int), 1)
    distance = ndimage.distance_transform_edt(np.pad(crop, [(p, p) for p in pad]))
    distance = distance[tuple(slice(p, p + n) for p, n in zip(pad, crop.shape))]
    best = np.argwhere(distance == distance.max())
    return tuple(int(v) for v in best[np.random.RandomState(42).choice(len(best))] + low)


def next_clicks(segs: np.ndarray, gts: np.ndarray, clicks: dict[int, list]) -> None:
    """Add each organ's click for the next round to `clicks` (none for an organ segmented exactly)."""
    for index, class_id in enumerate(np.unique(gts)[1:]):
        error = (segs == index + 1) != (gts == class_id)
        if not error.any():
            continue
        pieces, _ = ndimage.label(error, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        z, y, x = error_centre(pieces == sizes.argmax())
        clicks.setdefault(index, []).append((z, y, x, bool(gts[z, y, x] == class_id)))


def class_aware_box_round(model, processor, image: np.ndarray, case: str, gts, boxes, key_slices) -> np.ndarray:
    """Round 0 for a class-aware model: the same boxes (the key slice's 2-D box, the organ's z range) propagated by
    `segment_volume`, each decoded by its organ's heads (label ``i + 1`` the model's class ``i + 1``)."""
    ids = np.unique(gts)[1:]
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)) or len(ids) > model.config.num_classes:
        raise SystemExit(f"{case}: organs {ids.tolist()}: a class-aware model needs them numbered 1..N as its classes")
    height = gts.shape[1]
    boxes_3d = {  # rows of imgs[z] are the volume's y reversed (segment_npz_case's conversion)
        index + 1: [x0, height - 1 - y1, z0, x1, height - 1 - y0, z1]
        for index, (x0, y0, z0, x1, y1, z1) in enumerate(boxes.tolist())
    }
    keys = {index + 1: int(z) for index, z in enumerate(key_slices)}
    labels = segment_volume(model, image, processor=processor, boxes_3d=boxes_3d, key_slices=keys, progress=False)
    return np.stack([slice_image(labels, z) for z in range(labels.shape[2])]).astype(np.uint16)


def mean_nsd(segs: np.ndarray, gts: np.ndarray, spacing: tuple[float, float, float], tolerance: float = 2.0) -> float:
    """The mean over organs of the NSD at `tolerance` mm (the challenge's `compute_multi_class_nsd`) of label ``i + 1``
    against the ``i``-th id, `spacing` that of the ``(D, H, W)`` axes."""
    ids = np.unique(gts)[1:]
    return float(np.mean([surfel_surface_dice(segs == i + 1, gts == c, spacing, tolerance) for i, c in enumerate(ids)]))


def click_auc(per_round: list[float]) -> float:
    """The area under a score over the click rounds (round 0, the boxes, left out when there are clicks after it;
    the challenge's `DSC_AUC` / `NSD_AUC`)."""
    clicked = per_round[1:] if len(per_round) > 2 else per_round
    return float(np.trapezoid(clicked, dx=1))


def mean_dice(segs: np.ndarray, gts: np.ndarray) -> float:
    """The mean over organs of the 3-D Dice (`metrics.dice_from_counts`) of label ``i + 1`` against the ``i``-th id."""
    scores = []
    for index, class_id in enumerate(np.unique(gts)[1:]):
        truth, predicted = gts == class_id, segs == index + 1
        scores.append(dice_from_counts(int((truth & predicted).sum()), int(predicted.sum()), int(truth.sum())))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--case", nargs="+", required=True)
    parser.add_argument(
        "--model",
        default="litemedsam",
        help="a one-class model (the challenge's boxes name no organ), or a class-aware one (imedsam-litemedsam-btcv: "
        "each box and click decoded by its organ's heads, the scan's organs numbered 1..N as its classes)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="click rounds after the box round (the challenge: 5)")
    parser.add_argument("--no_boxes", action="store_true", help="the challenge's cases without boxes: clicks only")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, processor = load_model(args.model, device="cpu")
    rows = []
    for case in args.case:
        imgs, gts, boxes, key_slices, image, spacing = challenge_case(Path(args.data_dir), case)
        start = time.perf_counter()
        if args.no_boxes:  # the challenge scores such a case's box round 0
            segs = np.zeros(imgs.shape, dtype=np.uint16)
        elif is_class_aware(model.config):
            segs = class_aware_box_round(model, processor, image, case, gts, boxes, key_slices)
        else:
            segs = segment_npz_case(model, imgs, boxes, processor=processor, key_slices=key_slices, progress=False)
        seconds = [time.perf_counter() - start]
        dice, nsd, clicks, actions = [mean_dice(segs, gts)], [mean_nsd(segs, gts, spacing)], {}, {}
        given = None if args.no_boxes else boxes
        for _ in range(args.rounds):
            next_clicks(segs, gts, clicks)
            start = time.perf_counter()
            refinement = refine_with_clicks(model, imgs, segs, clicks, boxes=given, processor=processor)
            seconds.append(time.perf_counter() - start)
            segs = refinement.segs
            dice.append(mean_dice(segs, gts))
            nsd.append(mean_nsd(segs, gts, spacing))
            for edit in refinement.edits:
                counts = actions.setdefault(edit.action, {"edits": 0, "refused": 0})
                counts["edits"] += 1
                counts["refused"] += not edit.slices
        rows.append(
            {
                "case": case,
                "organs": len(boxes),
                "dice_boxes": dice[0],
                "dice_final": dice[-1],
                "dsc_auc": click_auc(dice),
                "nsd_boxes": nsd[0],
                "nsd_final": nsd[-1],
                "nsd_auc": click_auc(nsd),
                "seconds_boxes": seconds[0],
                "seconds_per_click_round": float(np.mean(seconds[1:])) if len(seconds) > 1 else None,
                "dice_per_round": dice,
                "nsd_per_round": nsd,
                "seconds_per_round": seconds,
                "edits": actions,
            }
        )
    first = "no box round" if args.no_boxes else "box round"
    header = f"{args.model}: {first} then {args.rounds} click rounds (CVPR 2025 protocol), mean 3-D Dice and NSD (2 mm)"
    columns = ["case", "organs", "dice_boxes", "dice_final", "dsc_auc", "nsd_boxes", "nsd_final", "nsd_auc"]
    columns += ["seconds_boxes", "seconds_per_click_round"]
    result = {"model": args.model, "rounds": args.rounds, "boxes": not args.no_boxes, "rows": rows}
    report(result, header, columns, args.json)


if __name__ == "__main__":
    main()
