"""Evaluation of I-MedSAM (and of its backbone's own SAM mask) at native and cross resolutions.

One implementation shared by `training/train.py`, `imedsam evaluate` (and `training/evaluate.py`), the demo and
the benchmarks: output grids, predictions, scoring, and the reports (JSON, CSV, overlays) of `imedsam evaluate`.

Protocol: the prompt is the exact ground-truth box (or none); an image whose mask is empty has no box, is never
scored with Dice (see `metrics`: both-empty would be a free 1.0) and is counted apart (`n_empty`); prompt-free
runs report the foreground predicted on it (`false_positive_fraction`). The model's implicit decoder is queried directly
on the target grid over the unpadded image: at `"native"` size the original image grid, at size `s` a grid
whose longest side is `s` (aspect ratio kept). Ground truth is compared at native size as is, and resized with
nearest neighbour to other grids. The backbone baseline uses SAM's own mask post-processing (upsample, crop,
resize) on the same images and prompts.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .configuration_imedsam import MR_WINDOW, is_class_aware, training_window
from .data import (
    DEFAULT_GROUP_PATTERN,
    SegmentationPair,
    case_folder_group,
    class_id_of,
    class_prompting,
    compile_group_pattern,
    dataset_class_names,
    default_scan_spacing,
    group_of,
    jitter_box,
    label_classes,
    mask_box,
    mask_clicks,
    read_class_names,
    read_mask,
    slice_index,
)
from .inference import checked_input_classes, clicks_caveat, label_map, overlay, sam_mask_fallback
from .loading import load_model
from .metrics import (
    NSD_TOLERANCE,
    aggregate,
    boundary_scores,
    check_nsd_options,
    dice_from_counts,
    false_positive_area,
    multiclass_scores,
    nanmean,
    overlap_counts,
    segmentation_scores,
)
from .modeling_imedsam import sam_mask_on_grid
from .processing_imedsam import (
    IMedSamProcessor,
    check_rescale_intercept,
    grid_image_spacing,
    hu_windowed,
    mirrored_inputs,
    mirrored_mean,
    probability_logits,
    resize_labels,
    to_rgb_array,
    tta_mirrors,
)

NATIVE = "native"
PROMPTS = ("box", "points", "none")
CLASS_METRICS = ("dice", "iou", "hd95", "nsd")
VOLUME_DISTANCES = ("hd95", "nsd")  # per scan, from the stacked slices' masks (`scan_distances`)


def parse_size(size: str | int) -> str | int:
    """An output size: `"native"`, a multiple of native such as `"2x"` or `"0.5x"`, or a longest side in pixels."""
    text = str(size).strip().lower()
    if text == NATIVE:
        return NATIVE
    if text.endswith("x"):
        try:
            factor = float(text[:-1])
        except ValueError:
            factor = 0.0
        if factor > 0:
            return text
    elif text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"Output size {size!r} is not 'native', a factor like '2x' or '0.5x', or a positive integer.")


def grid_size(original: tuple[int, int], size: str | int) -> tuple[int, int]:
    """
    The output grid for an image of `original` (H, W): native, `"<f>x"` (native scaled by f), or longest side
    `size`, aspect ratio kept.
    """
    size = parse_size(size)
    if size == NATIVE:
        return tuple(original)
    if isinstance(size, str):
        factor = float(size[:-1])
        return max(1, int(round(original[0] * factor))), max(1, int(round(original[1] * factor)))
    scale = size / max(original)
    return max(1, int(round(original[0] * scale))), max(1, int(round(original[1] * scale)))


def adapters_disabled(model) -> contextlib.AbstractContextManager:
    """The backbone alone: a PeftModel's `disable_adapter()`, or nothing for a plain model."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@torch.no_grad()
def predict_logits(
    model,
    processor: IMedSamProcessor,
    image,
    box: Sequence[float] | None = None,
    output_sizes: Iterable[str | int] = (NATIVE,),
    baseline: bool = False,
    classes: Sequence[int] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    tta: str = "none",
) -> dict[str | int, torch.Tensor]:
    """
    Logits `(C, h, w)` of one image at each requested output size, from one encoder pass; `box` may be a list of
    boxes `(P, 4)` (every prompt decoded together), giving `(P, C, h, w)`. `points` `(N, 2)` are positive clicks
    (x, y) of one structure, instead of a box.

    `baseline=True` returns the backbone's own SAM mask (adapters disabled, SAM post-processing) instead. `classes`
    (one id per box) makes the prompts class-aware (`input_classes`: each box uses its class's heads, one channel).
    `tta` mirrors the image at test time as `inference.segment` does (one encoder pass per mirror): the logits of the
    mirrors' mean probability.
    """
    mirrors = tta_mirrors(tta)
    if len(mirrors) > 1:
        by_mirror = [
            predict_logits(model, processor, mirrored, mirrored_box, output_sizes, baseline, classes, mirrored_points)
            for _, mirrored, _, mirrored_box, mirrored_points in mirrored_inputs(image, mirrors, box, points)
        ]
        return {
            size: probability_logits(mirrored_mean([logits[size].sigmoid() for logits in by_mirror], mirrors))
            for size in by_mirror[0]
        }
    device = next(model.parameters()).device
    clicks = {} if points is None else {"input_points": points, "input_labels": [1] * len(points)}
    inputs = processor(image, input_boxes=None if box is None else box, **clicks)
    original = tuple(inputs["original_sizes"][0].tolist())
    region = inputs["output_region"].to(device)
    boxes = inputs["input_boxes"].to(device) if box is not None else None
    prompts = {key: inputs[key].to(device) for key in ("input_points", "input_labels") if key in inputs}
    input_classes = None if baseline else checked_input_classes(model, classes, boxes)
    input_classes = None if input_classes is None else input_classes.to(device)
    context = adapters_disabled(model) if baseline else contextlib.nullcontext()
    results = {}
    with context:
        embeddings = model.encode_image(inputs["pixel_values"].to(device, next(model.parameters()).dtype))
        if baseline:
            # SAM's mask does not depend on the output grid: one decoder pass, the implicit decoder queried at 1x1.
            outputs = model(
                image_embeddings=embeddings, input_boxes=boxes, output_size=(1, 1), full_sam_logits=True, **prompts
            )
        for size in output_sizes:
            shape = grid_size(original, size)
            if baseline:
                sam = outputs.sam_logits  # (1, 1, h, w), or (1, P, 1, h, w) for several boxes
                rows = sam.reshape(-1, 1, *sam.shape[-2:])  # one row per prompt, all of this one image
                grid = sam_mask_on_grid(rows, processor.image_size, shape, region.expand(len(rows), 4))
                logits = grid.reshape(*sam.shape[:-2], *shape)
            else:
                logits = model(
                    image_embeddings=embeddings,
                    input_boxes=boxes,
                    output_size=shape,
                    output_region=region,
                    input_classes=input_classes,
                    **prompts,
                ).logits
            results[size] = logits[0].float().cpu()
    return results


def score(
    logits: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    nsd_tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
) -> dict[str, float]:
    """Scores of one prediction `(C, h, w)` logits against a class-id map of the same grid."""
    predicted = IMedSamProcessor.post_process_masks(logits[None])[0].numpy()
    return score_mask(predicted, labels, num_classes, nsd_tolerance, nsd_definition)


def score_mask(
    predicted: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    nsd_tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
    spacing: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Scores of a post-processed prediction (bool mask, or class ids for C > 1) against a class-id map; distances
    in pixels, or in mm with the grid's pixel size `spacing` `(row, column)`; NSD at `nsd_tolerance` in that unit, by
    `nsd_definition` (`metrics.NSD_DEFINITIONS`)."""
    nsd = {"spacing": spacing, "tolerance": nsd_tolerance, "nsd_definition": nsd_definition}
    if num_classes == 1:
        return segmentation_scores(predicted, labels > 0, **nsd)
    return multiclass_scores(predicted.astype(np.int64), labels, num_classes + 1, **nsd)


def truth_pixel_sizes(pairs: Sequence[SegmentationPair]) -> dict[str, tuple[float, float]] | None:
    """`{mask path: (row, column) pixel size in mm}` when every pair's mask is a 2-D NIfTI / NRRD / MetaImage whose
    header gives one (`processing_imedsam.grid_image_spacing`): distances are then measured in mm, as `imedsam score`
    measures them against such a truth; None when any mask has none (PNG, JPEG, DICOM): distances in pixels."""
    sizes = {str(pair.mask): grid_image_spacing(pair.mask) for pair in pairs}
    return sizes if sizes and all(size is not None for size in sizes.values()) else None


def grid_pixel_size(pixel_size: tuple[float, float], truth_shape: Sequence[int], grid_shape: Sequence[int]):
    """The pixel size `(row, column)` of an output grid of shape `grid_shape` `(h, w)` covering the truth's
    `truth_shape` `(H, W)` with pixels of `pixel_size` (mm): a grid half the size has pixels twice as large."""
    return tuple(float(size) * int(n) / int(m) for size, n, m in zip(pixel_size, truth_shape[:2], grid_shape[:2]))


def evaluate_pairs(
    model,
    processor: IMedSamProcessor,
    pairs: Sequence[SegmentationPair],
    output_sizes: Sequence[str | int] = (NATIVE,),
    prompt: str = "box",
    baseline: bool = False,
    num_classes: int = 1,
    progress: bool = False,
    class_prompts: bool = False,
    mask_classes: int | None = None,
    classes: Sequence[int] | None = None,
    class_names: dict[int, str] | None = None,
    label_classes: Mapping[int, int] | None = None,
    box_jitter: float = 0.0,
    jitter_seed: int = 0,
    jitter_draw: int = 0,
    mask_values: Mapping[int, int] | None = None,
    slice_masks: dict | None = None,
    num_clicks: int = 1,
    tta: str = "none",
    overlays: Path | None = None,
    nsd_tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
    window: tuple[float, float] | str | None = None,
    rescale_intercept: float | None = None,
) -> tuple[list[dict], dict[str, dict]]:
    """
    Score every pair at every output size (masks read with `read_mask(..., mask_values)`), the NSD at
    `nsd_tolerance` pixels, by `nsd_definition`; images in HU windowed by `window` (`processing_imedsam.hu_windowed`;
    16-bit pictures storing HU plus an offset read with `rescale_intercept`, `processing_imedsam.stored_hu`).
    When every mask is a 2-D NIfTI / NRRD / MetaImage with a pixel size (`truth_pixel_sizes`), HD95, HD and the NSD's
    tolerance are in mm instead (each output grid's pixel size scaled from the mask's), and each size's summary says
    so: its `unit` is `"mm"` (else `"px"`).

    `prompt="points"` prompts each image with `num_clicks` positive clicks on its mask (`data.mask_clicks`: the most
    interior point first) instead of its box.

    `slice_masks`, a dict, receives the predicted and true masks of class-prompted rows at the first output size,
    `{(stem, class_id): SliceMasks}`, for `volume_summary`'s per-scan distances; given, binary rows (a binary mask,
    or a binary model's) carry overlap counts and their masks too, as class 1.

    A pair whose mask is empty (with class prompts: holds none of the classes scored) gets rows with `empty: 1` and
    no Dice, IoU or HD: with box prompts it is not run at all (there is no box), prompt-free it is run and its
    rows carry `false_positive_pixels` and `false_positive_fraction` (`metrics.false_positive_area`). The summary
    counts them in `n_empty` (`n` counts the scored images only) and, prompt-free, adds their mean
    `empty_false_positive_fraction` and `n_empty_with_false_positives`.

    With `class_prompts`, masks hold class ids 1..`mask_classes` and every class present (of `classes`, when given)
    is segmented with its exact box (all of an image's classes in one pass: one prompt each) and scored as a binary
    mask (rows carry `class`, and the overlap counts `volume_summary` stacks into scans). The summary of each size
    then also has `per_class` (`{"<id>": {"name", "dice", "iou", "hd95", "nsd", "n"}}`) and `class_mean` (the mean over
    classes of those).

    `tta` mirrors each image at test time (`predict_logits`; `processing_imedsam.TTA_MIRRORS`).

    `label_classes` (class prompts, a class-aware model): `{mask id: the model's class}` whose heads decode each
    structure of a folder numbered otherwise than the model (`EvaluationProtocol.label_classes`); rows keep the
    masks' ids.

    `overlays`, a folder, receives `<stem>.png` for every image run (`save_overlay`): the very masks scored at the
    first output size, the ground truth and the prompts they came from (the jittered boxes when jittered, the
    clicks); with class prompts, every prompted class in its colour (one label map, as `imedsam predict` writes it:
    where two masks overlap, the more probable) and its truth outlined in that colour.

    `box_jitter` F > 0 moves each side of every box by up to F of the box's width/height (clipped to the image),
    as a user's imperfect box would: seeded by `jitter_seed` and the image's stem, so the model and the baseline (and
    any two runs) get the same boxes for an image, whatever the order or the subset of images. `jitter_draw` d picks
    the d-th independent draw of those boxes (`jittered_boxes`; `evaluate_model` averages several).

    Returns per-image rows (`stem`, `size`, scores) and a summary `{size: aggregate(...)}` with `dice`,
    `dice_std`, `iou`, `hd95`, `hd`, `nsd` (and their std) and `n`.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"`prompt` must be one of {PROMPTS}, got {prompt!r}.")
    tta_mirrors(tta)
    if prompt == "points" and class_prompts:
        raise ValueError("`prompt='points'` scores one structure per image; class-prompted folders take boxes.")
    sizes = [parse_size(s) for s in output_sizes]
    if overlays is not None:
        Path(overlays).mkdir(parents=True, exist_ok=True)
    rows = []
    iterator = pairs
    if progress:
        label = ("baseline" if baseline else "evaluate") + (f", jitter draw {jitter_draw + 1}" if jitter_draw else "")
        iterator = tqdm(pairs, desc=label)
    wanted = None if classes is None else {int(c) for c in classes}
    pixel_sizes = truth_pixel_sizes(pairs)
    for pair in iterator:
        labels = read_mask(pair.mask, mask_classes or num_classes, mask_values)
        image = to_rgb_array(hu_windowed(pair.image, window, rescale_intercept))
        targets = [(None, labels)]
        if class_prompts:
            present = [int(c) for c in np.unique(labels) if c > 0 and (wanted is None or int(c) in wanted)]
            targets = [(c, (labels == c).astype(np.int64)) for c in present]
        if not any(target.any() for _, target in targets):
            rows.extend(empty_mask_rows(model, processor, pair.stem, image, sizes, prompt, baseline, overlays))
            continue
        several = class_prompts and prompt == "box"
        boxes = [mask_box(target) for _, target in targets] if prompt == "box" else [None]
        clicks = mask_clicks(labels > 0, num_clicks).tolist() if prompt == "points" else None
        if box_jitter > 0 and prompt == "box":
            boxes = jittered_boxes(boxes, box_jitter, labels.shape, pair.stem, jitter_seed, jitter_draw)
        # A multi-class model is class-aware: each box by its class's heads (`label_classes`: the class of its name).
        aware = [(label_classes or {}).get(c, c) for c, _ in targets] if several and num_classes > 1 else None
        logits = predict_logits(
            model, processor, image, np.stack(boxes) if several else boxes[0], sizes, baseline, classes=aware,
            points=clicks, tta=tta,
        )  # fmt: skip
        shown = []  # the first size's (logits, predicted, target) of each prompt, for the overlay
        for index, (class_id, target_labels) in enumerate(targets):
            extra = {} if class_id is None else {"class": class_id}
            for size in sizes:
                prediction = logits[size][index] if several else logits[size]
                predicted = IMedSamProcessor.post_process_masks(prediction[None])[0].numpy()
                target = resize_labels(target_labels, predicted.shape)
                classes_scored = 1 if class_prompts else num_classes
                spacing = None
                if pixel_sizes is not None:
                    spacing = grid_pixel_size(pixel_sizes[str(pair.mask)], target_labels.shape, predicted.shape)
                scored = score_mask(predicted, target, classes_scored, nsd_tolerance, nsd_definition, spacing)
                row = {"stem": pair.stem, "size": str(size), **extra, **scored}
                if size == sizes[0]:
                    shown.append((prediction, predicted, target))
                # What volume_summary stacks into scans: class-prompted rows, and a binary mask's where slices are
                # stacked (`slice_masks` asked for), its foreground as class 1.
                if class_id is not None or (classes_scored == 1 and slice_masks is not None):
                    row.update(zip(COUNT_KEYS, overlap_counts(predicted > 0, target > 0)))
                    if slice_masks is not None and size == sizes[0]:
                        slice_masks[(pair.stem, class_id or 1)] = SliceMasks.of(predicted > 0, target > 0)
                rows.append(row)
        if overlays is not None:
            shown_prompts = dict(boxes=boxes if prompt == "box" else None, points=clicks)
            if several:  # one label map, as `imedsam predict` writes: where masks overlap, the most probable
                ids = [class_id for class_id, _ in targets]
                probabilities = np.stack([scores[0].sigmoid().numpy() for scores, _, _ in shown])
                predicted = label_map(probabilities, ids, probabilities.shape[-2:])
                truth = np.sum([c * (t > 0) for c, (_, _, t) in zip(ids, shown)], axis=0)
                save_overlay(overlays, pair.stem, image, predicted, truth, **shown_prompts, class_colours=True)
            else:
                _, predicted, truth = shown[0]
                many = num_classes > 1 and not class_prompts  # class-id maps
                save_overlay(overlays, pair.stem, image, predicted, truth, **shown_prompts, class_colours=many)
    summary = {}
    for size in sizes:
        skip = ("stem", "size", "class", *COUNT_KEYS)
        size_rows = [r for r in rows if r["size"] == str(size) and not r.get("empty")]
        summary[str(size)] = aggregate([{k: v for k, v in r.items() if k not in skip} for r in size_rows])
        summary[str(size)].update(empty_summary([r for r in rows if r["size"] == str(size) and r.get("empty")]))
        summary[str(size)]["unit"] = "px" if pixel_sizes is None else "mm"
        if class_prompts:
            summary[str(size)].update(per_class_summary(size_rows, class_names or {}))
    return rows, summary


def jittered_boxes(
    boxes: Sequence[np.ndarray | None],
    fraction: float,
    size: tuple[int, int],
    stem: str,
    seed: int = 0,
    draw: int = 0,
) -> list[np.ndarray | None]:
    """`evaluate_pairs`' `box_jitter`: each box's sides moved by up to `fraction` of its size (`data.jitter_box`),
    seeded by `seed` and the image's `stem`, so every run and model gets the same boxes for an image. `draw` d > 0
    gives the d-th of several independent draws for the same seed and image (draw 0 is the single draw of a run
    without `jitter_draws`: its boxes do not change when more draws are asked for)."""
    rng = np.random.default_rng([seed, zlib.crc32(stem.encode())] + ([draw] if draw else []))
    return [None if box is None else jitter_box(box, fraction, size, rng) for box in boxes]


# Per-row pixel counts of class-prompted rows, `metrics.overlap_counts`'s order.
COUNT_KEYS = ("overlap", "predicted_pixels", "true_pixels")


@dataclass(frozen=True)
class SliceMasks:
    """A slice's predicted and true masks of one class, bit-packed (8 pixels a byte) until scans are stacked."""

    predicted: np.ndarray
    true: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, predicted: np.ndarray, true: np.ndarray) -> SliceMasks:
        return cls(np.packbits(predicted), np.packbits(true), tuple(predicted.shape))

    def unpack(self) -> tuple[np.ndarray, np.ndarray]:
        count = self.shape[0] * self.shape[1]
        return tuple(
            np.unpackbits(m, count=count).reshape(self.shape).astype(bool) for m in (self.predicted, self.true)
        )


def scan_distances(
    slice_masks: Mapping[tuple[str, int], SliceMasks],
    spacing: Mapping[str, Sequence[float]],
    pattern: re.Pattern,
    nsd_tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
    groups: Mapping[str, str] | None = None,
) -> dict[tuple[str, int], dict[str, float]]:
    """
    `{"hd95", "nsd"}` (HD95 in mm, NSD at `nsd_tolerance` mm) of each class in each scan: its slices stacked by slice
    index (`data.slice_index`; slices missing from the folder hold no structure and count as empty in both),
    distances with the scan's spacing `(x, y, z)` (`metrics.boundary_scores` in 3-D, as `volumes.volume_scores`).
    Scans without a spacing or slice numbers, or with slices of different sizes, are left out. `groups`: each
    stem's scan (:func:`slice_scans`) where `pattern` does not name them all.
    """
    by_scan: dict[str, dict[int, list[tuple[int, SliceMasks]]]] = {}
    for (stem, class_id), masks in slice_masks.items():
        z = slice_index(stem)
        scan = groups.get(stem) if groups is not None else group_of(stem, pattern)
        if z is None or scan not in spacing:
            continue
        by_scan.setdefault(scan, {}).setdefault(class_id, []).append((z, masks))
    distances = {}
    for scan, classes in by_scan.items():
        zs = [z for entries in classes.values() for z, _ in entries]
        shapes = {m.shape for entries in classes.values() for _, m in entries}
        if len(shapes) != 1:
            continue
        (height, width), first = shapes.pop(), min(zs)
        x, y, z_step = (float(v) for v in spacing[scan])
        for class_id, entries in classes.items():
            predicted = np.zeros((max(zs) - first + 1, height, width), bool)
            true = np.zeros_like(predicted)
            for z, masks in entries:
                predicted[z - first], true[z - first] = masks.unpack()
            scores = boundary_scores(*cropped(predicted, true), (z_step, y, x), nsd_tolerance, nsd_definition)
            distances[(scan, class_id)] = {key: scores[key] for key in VOLUME_DISTANCES}
    return distances


def cropped(*masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """The masks cut to their union's bounding box plus one voxel (within the array): the same surface distances."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return masks
    where = np.nonzero(union)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in where)
    return tuple(m[box] for m in masks)


def empty_mask_rows(
    model,
    processor: IMedSamProcessor,
    stem: str,
    image: np.ndarray,
    sizes: Sequence,
    prompt: str,
    baseline: bool,
    overlays: Path | None = None,
) -> list[dict]:
    """
    The rows of an image whose mask is empty: `empty: 1` at each size, and prompt-free the foreground predicted
    there (`metrics.false_positive_area`; with `overlays`, its overlay at the first size). With box prompts nothing
    is run: no box can be made from an empty mask.
    """
    if prompt != "none":  # box or click prompts: an empty mask gives neither
        return [{"stem": stem, "size": str(size), "empty": 1} for size in sizes]
    logits = predict_logits(model, processor, image, None, sizes, baseline)
    rows = []
    for size in sizes:
        predicted = IMedSamProcessor.post_process_masks(logits[size][None])[0].numpy()
        rows.append({"stem": stem, "size": str(size), "empty": 1, **false_positive_area(predicted)})
        if overlays is not None and size == sizes[0]:
            save_overlay(overlays, stem, image, predicted > 0, None)
    return rows


def save_overlay(
    folder: Path,
    stem: str,
    image: np.ndarray,
    predicted: np.ndarray,
    truth: np.ndarray | None,
    boxes: Sequence[np.ndarray | None] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    class_colours: bool = False,
) -> None:
    """`<folder>/<stem>.png`: `inference.overlay` of a scored mask (red) or label map (`class_colours`: a colour per
    class), its ground truth and its prompts (boxes, clicks: in pixels of the `image`)."""
    boxes = None if boxes is None else [b for b in boxes if b is not None] or None
    picture = overlay(image, predicted, truth=truth, boxes=boxes, points=points, class_colours=class_colours)
    picture.save(Path(folder) / f"{stem}.png")


def empty_summary(rows: Sequence[dict]) -> dict:
    """`n_empty`, and for prompt-free rows the mean `empty_false_positive_fraction` and how many have any."""
    summary = {"n_empty": len(rows)}
    fractions = [r["false_positive_fraction"] for r in rows if "false_positive_fraction" in r]
    if fractions:
        summary["empty_false_positive_fraction"] = float(np.mean(fractions))
        summary["n_empty_with_false_positives"] = sum(1 for f in fractions if f > 0)
    return summary


def per_class_summary(rows: Sequence[dict], class_names: dict[int, str]) -> dict:
    """`per_class` (mean Dice, IoU, HD95, NSD and n of each class's rows) and `class_mean` (their mean over classes)."""
    per_class = {}
    for class_id in sorted({r["class"] for r in rows}):
        values = aggregate([{k: r[k] for k in CLASS_METRICS} for r in rows if r["class"] == class_id])
        per_class[str(class_id)] = {
            "name": class_names.get(class_id, str(class_id)),
            **{k: values[k] for k in CLASS_METRICS},
            "n": values["n"],
        }
    class_mean = {k: nanmean([v[k] for v in per_class.values()]) for k in CLASS_METRICS}
    return {"per_class": per_class, "class_mean": {**class_mean, "n_classes": len(per_class)}}


def volume_summary(
    rows: Sequence[dict],
    size: str,
    class_names: dict[int, str] | None,
    group_pattern: str = DEFAULT_GROUP_PATTERN,
    slice_masks: Mapping[tuple[str, int], SliceMasks] | None = None,
    spacing: Mapping[str, Sequence[float]] | None = None,
    nsd_tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
    groups: Mapping[str, str] | None = None,
) -> dict:
    """
    Per-volume scores of the rows carrying overlap counts (class-prompted rows; a binary mask's, as class 1
    ``foreground``, where `evaluate_pairs` stacked them) at one output size: slices grouped into scans by
    `group_pattern` (its first group names the scan), or by `groups` (each stem's scan, :func:`slice_scans`: the
    rows of other stems left out), the 3D Dice of each class in each scan from the slices' overlap counts
    (exact: the sums over slices are the volume's), averaged over scans per class, then over classes. With the
    rows' `slice_masks` and the scans' `spacing` (mm, `data.read_scan_spacing`), also the 3D HD95 in mm and the NSD
    at `nsd_tolerance` mm (`scan_distances`), averaged the same way; else `"hd95"` and `"nsd"` are None. `per_scan`
    keeps each scan's own scores (for per-case tables and paired tests), the distances where they were measured.

    Returns `{"dice", "hd95", "nsd", "n_volumes", "size", "per_class": {"<id>": {"name", "dice", "hd95", "nsd",
    "n"}}, "per_scan": {"<scan>": {"<id>": {"dice", "hd95", "nsd"}}}}`.
    """
    pattern = compile_group_pattern(group_pattern)
    totals: dict[tuple[str, int], np.ndarray] = {}
    binary: set[bool] = set()
    for row in rows:
        if row["size"] != size or COUNT_KEYS[0] not in row:
            continue
        scan = groups.get(row["stem"]) if groups is not None else group_of(row["stem"], pattern)
        if scan is None:
            continue
        binary.add("class" not in row)
        key = (scan, row.get("class", 1))
        totals[key] = totals.get(key, 0) + np.array([row[k] for k in COUNT_KEYS], dtype=np.int64)
    distances = (
        scan_distances(slice_masks, spacing, pattern, nsd_tolerance, nsd_definition, groups)
        if slice_masks and spacing
        else {}
    )
    per_scan: dict[str, dict[str, dict]] = {}
    for (scan, class_id), counts in sorted(totals.items()):
        per_scan.setdefault(scan, {})[str(class_id)] = {
            "dice": dice_from_counts(*counts),
            **distances.get((scan, class_id), {}),
        }
    per_class = {}
    for c in sorted({class_id for _, class_id in totals}):
        scans = [scores[str(c)] for scores in per_scan.values() if str(c) in scores]
        per_class[str(c)] = {
            "name": (class_names or {}).get(c, "foreground" if binary == {True} else str(c)),
            "dice": nanmean([s["dice"] for s in scans]),
            **{
                k: nanmean([s[k] for s in scans if k in s]) if any(k in s for s in scans) else None
                for k in VOLUME_DISTANCES
            },
            "n": len(scans),
        }
    means = {
        k: nanmean([v[k] for v in per_class.values() if v[k] is not None]) if distances else None
        for k in VOLUME_DISTANCES
    }
    return {
        "dice": nanmean([v["dice"] for v in per_class.values()]),
        **means,
        "n_volumes": len(per_scan),
        "size": size,
        "per_class": per_class,
        "per_scan": per_scan,
    }


@dataclass(frozen=True)
class EvaluationProtocol:
    """
    How a model is scored: the one description `imedsam evaluate` and `training/train.py` both build (every field is
    a constructor argument, with no default: a caller that forgets one fails at once instead of scoring silently
    another way) and `evaluate_model` runs. `EvaluationProtocol.resolve` builds it from a model's config and a data
    folder, checking what does not fit.

    Fields:
        prompt: `"box"` (each mask's box), `"points"` (`num_clicks` positive clicks on it) or `"none"`.
        output_sizes: `"native"`, factors such as `"2x"`, or longest sides in pixels.
        num_classes: the model's output channels.
        class_prompts: class-id masks, every structure prompted with its own box (all of an image's in one pass) and
            scored as a binary mask, per class and per scan.
        class_aware: with `class_prompts` and a multi-class model, each box decoded by its class's heads.
        mask_classes: foreground class ids in the masks (None: `num_classes`).
        classes: report only these class ids (None: all present).
        class_names: class id -> name (a folder's `classes.json`), for the reports.
        label_classes: class id of the masks -> the class-aware model's class whose heads decode it, for a folder
            numbered otherwise than the model (`data.label_classes`, by name); ids it leaves out are not scored.
            None: the masks' ids are the model's.
        mask_values: stored mask value -> class id (`data.read_mask`), or None.
        box_jitter, jitter_seed: every box side moved by up to `box_jitter` of the box size, seeded per image.
        jitter_draws: K independent draws of those jittered boxes per image (1: the single draw); every number
            reported is then the mean over the K draws' numbers (`evaluate_model`).
        num_clicks: clicks per mask with `prompt="points"`.
        group_pattern: regex whose first group names a slice's scan (per-volume scores of class-prompted rows).
        spacing: scan -> voxel spacing `(x, y, z)` in mm for the per-volume HD95 and NSD, or None.
        tta: test-time mirroring, `"none"`, `"h"`, `"v"` or `"hv"` (`processing_imedsam.TTA_MIRRORS`), for the model
            and its zero-shot backbone alike.
        nsd_tolerance: the NSD's tolerance, in pixels per image (mm for 2-D images with a pixel size:
            `truth_pixel_sizes`) and mm per scan (`metrics.NSD_TOLERANCE`: 2).
        nsd_definition: `"voxels"` (each boundary voxel once) or `"surfels"` (the CVPR 2024 challenge script's,
            through MONAI; `metrics.NSD_DEFINITIONS`).
        window: the window the model records (`training_window`: `(level, width)` in HU, "mr" or None), applied to
            images in HU (a 2-D CT `.mha`: `processing_imedsam.hu_windowed`) for the model and its backbone alike.
        rescale_intercept: the images are 16-bit pictures storing CT as HU minus it (DeepLesion's PNGs: -32768;
            `processing_imedsam.stored_hu`), windowed by `window`, which must then be a CT window; None: as they are.
    """

    prompt: str
    output_sizes: tuple[str | int, ...]
    num_classes: int
    class_prompts: bool
    class_aware: bool
    mask_classes: int | None
    classes: tuple[int, ...] | None
    class_names: Mapping[int, str] | None
    label_classes: Mapping[int, int] | None
    mask_values: Mapping[int, int] | None
    box_jitter: float
    jitter_seed: int
    jitter_draws: int
    num_clicks: int
    group_pattern: str
    spacing: Mapping[str, Sequence[float]] | None
    tta: str
    nsd_tolerance: float
    nsd_definition: str
    window: tuple[float, float] | str | None = None
    rescale_intercept: float | None = None

    def __post_init__(self) -> None:
        check_nsd_options(self.nsd_tolerance, self.nsd_definition, load=False)
        tta_mirrors(self.tta, "`tta`")
        if self.prompt not in PROMPTS:
            raise ValueError(f"`prompt` must be one of {PROMPTS}, got {self.prompt!r}.")
        for size in self.output_sizes:
            parse_size(size)
        if not 0 <= self.box_jitter < 1:
            raise ValueError(f"`box_jitter` {self.box_jitter}: a fraction of the box size in [0, 1).")
        if self.jitter_draws < 1:
            raise ValueError(f"`jitter_draws` {self.jitter_draws}: at least 1 draw of jittered boxes per image.")
        if self.jitter_draws > 1 and not (self.box_jitter > 0 and self.prompt == "box"):
            raise ValueError(
                f"`jitter_draws` {self.jitter_draws} draws jittered boxes again: it needs box prompts and `box_jitter` "
                f"> 0 (here prompt={self.prompt!r}, box_jitter={self.box_jitter}); every draw would give the same scores."
            )
        if self.num_clicks < 1:
            raise ValueError(f"`num_clicks` {self.num_clicks}: at least 1 click per mask.")
        if self.class_aware and not (self.class_prompts and self.num_classes > 1):
            raise ValueError("`class_aware` needs class prompts (a class-id folder) and a multi-class model.")
        check_rescale_intercept(self.rescale_intercept)
        if self.rescale_intercept is not None and self.window in (None, MR_WINDOW):
            raise ValueError(
                f"`rescale_intercept` {self.rescale_intercept:g} gives the pictures' HU, but the model records no CT "
                "window to window them with (as its training images were): evaluate a model trained on windowed CT."
            )

    @classmethod
    def resolve(
        cls,
        model_config,
        data_dir: str | None,
        *,
        prompt: str,
        output_sizes: Sequence[str | int],
        class_aware: bool | None,
        class_prompts: bool | None,
        mask_classes: int | None,
        classes: Sequence[int | str] | None,
        mask_values: Mapping[int, int] | None,
        box_jitter: float,
        jitter_seed: int,
        jitter_draws: int,
        num_clicks: int,
        group_pattern: str,
        spacing: Mapping[str, Sequence[float]] | None,
        tta: str,
        nsd_tolerance: float,
        nsd_definition: str,
        dataset: str | None = None,
        rescale_intercept: float | None = None,
    ) -> EvaluationProtocol:
        """
        The protocol for a model (its `config`: its output classes, whether it is class-aware, its class names) on
        the folder `data_dir` (None: the dataset `dataset`, whose class names are `data.dataset_class_names`), with
        what the model records as defaults: `class_aware` None
        takes the model's `class_aware` (a class-aware model is scored class-aware unless asked otherwise);
        `class_prompts` None is true for class-id masks (a folder with a `classes.json`, or `mask_classes` given)
        scored by a one-class or class-aware model; `mask_classes` None the largest id of `classes.json`; `spacing`
        None the folder's `cases.csv`. Raises `ValueError` naming the argument that does not fit (a class-aware run
        of a one-class model, classes not in `classes.json`, more classes in the masks than a class-aware model has).
        """
        num_classes = int(getattr(model_config, "num_classes", 1) or 1)
        class_names = read_class_names(data_dir) if data_dir else dataset_class_names(dataset) if dataset else None
        named = class_names is not None  # the data names its classes
        where = f"a classes.json in {data_dir}" if data_dir else f"an id2label.json of {dataset}"
        recorded = getattr(model_config, "id2label", None) or {}
        if class_names is None and num_classes > 1 and len(recorded) == num_classes:
            class_names = {int(k): v for k, v in recorded.items()}
        if class_aware is None:
            class_aware = is_class_aware(model_config)
        if class_aware and num_classes < 2:
            raise ValueError(f"`class_aware` needs a multi-class model; this one has num_classes={num_classes}.")
        # Whether prompts go by class is the data's to say (not the names a model records); their count, any names'.
        deciding = class_names if class_prompts is not None or data_dir is not None or named else None
        one_per_class = num_classes == 1 or class_aware
        class_prompts, mask_classes = class_prompting(class_prompts, mask_classes, deciding, one_per_class)
        if (classes is not None or class_aware) and not class_prompts:
            raise ValueError(
                f"`classes` and `class_aware` need a multi-class folder or dataset ({where}) and a one-class "
                "or class-aware model."
            )
        ids = [int(c) for c in classes or () if str(c).strip().isdigit()]
        unknown = sorted(set(ids) - set(class_names or ())) if class_names else []
        if unknown:
            raise ValueError(f"`classes` {unknown}: not in the classes of {where} ({sorted(class_names)}).")
        if classes is not None and len(ids) < len(classes):  # names (`liver`): the folder's classes.json's
            if not class_names:
                raise ValueError(f"`classes` {list(classes)}: names need {where}; give ids.")
            classes = [class_id_of(c, class_names, "`classes`") for c in classes]
        label_ids = None
        if class_aware and named and recorded:  # a folder numbered otherwise than the model: its classes by name
            model_names = {int(k): str(v) for k, v in recorded.items()}
            label_ids = label_classes(sorted(class_names), class_names, model_names, str(data_dir or dataset))
            if label_ids is not None and classes is None:
                classes = sorted(label_ids)
            elif label_ids is not None:
                classes = [c for c in classes if c in label_ids]
        if class_aware and mask_classes > num_classes and label_ids is None:
            raise ValueError(
                f"{data_dir or dataset}: class ids up to {mask_classes}, but the model has {num_classes} classes."
            )
        if spacing is None and data_dir and class_prompts:
            spacing = default_scan_spacing(data_dir)
        return cls(
            prompt=prompt,
            output_sizes=tuple(output_sizes),
            num_classes=num_classes,
            class_prompts=bool(class_prompts),
            class_aware=bool(class_aware),
            mask_classes=mask_classes,
            classes=None if classes is None else tuple(int(c) for c in classes),
            class_names=class_names,
            label_classes=label_ids,
            mask_values=mask_values,
            box_jitter=float(box_jitter),
            jitter_seed=int(jitter_seed),
            jitter_draws=int(jitter_draws),
            num_clicks=int(num_clicks),
            group_pattern=group_pattern,
            spacing=spacing,
            tta=tta,
            nsd_tolerance=float(nsd_tolerance),
            nsd_definition=nsd_definition,
            window=training_window(model_config),  # images in HU windowed as the model's training images were
            rescale_intercept=rescale_intercept,
        )

    @property
    def read_classes(self) -> int:
        """The class count masks are read with (`data.read_mask`)."""
        return self.mask_classes or self.num_classes

    def pair_options(self) -> dict:
        """Every field `evaluate_pairs` takes, from this protocol (none left to its defaults)."""
        return dict(
            output_sizes=self.output_sizes,
            prompt=self.prompt,
            # Class-prompted rows of a class-agnostic multi-class model are read as one binary mask each.
            num_classes=self.num_classes if (self.class_aware or not self.class_prompts) else 1,
            class_prompts=self.class_prompts,
            mask_classes=self.mask_classes,
            classes=self.classes,
            class_names=dict(self.class_names) if self.class_names else None,
            label_classes=dict(self.label_classes) if self.label_classes else None,
            box_jitter=self.box_jitter,
            jitter_seed=self.jitter_seed,
            mask_values=self.mask_values,
            num_clicks=self.num_clicks,
            tta=self.tta,
            nsd_tolerance=self.nsd_tolerance,
            nsd_definition=self.nsd_definition,
            window=self.window,
            rescale_intercept=self.rescale_intercept,
        )

    def as_dict(self) -> dict:
        """The protocol as the JSON reports record it."""
        return {
            "prompt": self.prompt,
            **({"clicks": self.num_clicks} if self.prompt == "points" else {}),
            "box_jitter": self.box_jitter,
            "jitter_seed": self.jitter_seed,
            **({"jitter_draws": self.jitter_draws} if self.jitter_draws > 1 else {}),
            "class_aware": self.class_aware,
            **({"classes": list(self.classes)} if self.classes else {}),
            **({"label_classes": {str(k): v for k, v in self.label_classes.items()}} if self.label_classes else {}),
            **({"tta": self.tta} if self.tta != "none" else {}),
            "nsd_tolerance": self.nsd_tolerance,
            **({"nsd_definition": self.nsd_definition} if self.nsd_definition != "voxels" else {}),
            **({"rescale_intercept": self.rescale_intercept} if self.rescale_intercept is not None else {}),
        }


@dataclass
class EvaluationReport:
    """What `evaluate_model` measured: per-image rows (with `model`), the summary per output size, per scan."""

    protocol: EvaluationProtocol
    rows: list[dict]
    results: dict[str, dict]
    volume: dict | None
    mask_source: str
    baseline: dict | None = None  # the backbone's own SAM mask: its `results` per size, with its `volume` inside

    def as_dict(self) -> dict:
        """`results`, `volume`, `baseline_sam` and `mask_source`, as the JSON reports and model cards hold them."""
        result = {**self.protocol.as_dict(), "mask_source": self.mask_source, "results": self.results}
        if self.volume is not None:
            result["volume"] = self.volume
        if self.baseline is not None:
            result["baseline_sam"] = self.baseline
        return result


def _scored(
    model, processor, pairs, protocol: EvaluationProtocol, baseline: bool, progress: bool, overlays: Path | None = None
):
    """Rows, summary and volume summary (None unless the images are slices of scans, :func:`slice_scans`) of one
    model, over the protocol's jitter draws: with K > 1 draws each row carries its `jitter_draw` and the summaries are
    `mean_over_draws` of the K draws'.
    `overlays` shows the first draw's masks (`evaluate_pairs`)."""
    options = protocol.pair_options()
    first = str(parse_size(protocol.output_sizes[0]))
    names = dict(protocol.class_names) if protocol.class_names else None
    # Per-scan scores where the images are slices of scans (BTCV's `case0001_slice061`, the LGG set's case folders),
    # not for 2-D data sets.
    groups = slice_scans(pairs, protocol.group_pattern)
    scans = bool(groups)
    draws = []
    for draw in range(protocol.jitter_draws):
        masks = {} if scans else None
        rows, summary = evaluate_pairs(
            model, processor, pairs, **options, jitter_draw=draw, baseline=baseline, progress=progress,
            slice_masks=masks, overlays=overlays if draw == 0 else None,
        )  # fmt: skip
        volume = None
        if masks is not None and any(COUNT_KEYS[0] in row for row in rows):  # not a multi-class map's rows
            volume = volume_summary(
                rows, first, names, protocol.group_pattern, masks, protocol.spacing, protocol.nsd_tolerance,
                protocol.nsd_definition, groups,
            )  # fmt: skip
        draws.append((rows, summary, volume))
    if len(draws) == 1:
        return draws[0]
    rows = [{**row, "jitter_draw": draw} for draw, (draw_rows, _, _) in enumerate(draws) for row in draw_rows]
    summary = mean_over_draws([summary for _, summary, _ in draws])
    volume = mean_over_draws([volume for _, _, volume in draws]) if draws[0][2] is not None else None
    return rows, summary, volume


def slice_scans(pairs: Sequence[SegmentationPair], group_pattern: str | None) -> dict[str, str]:
    """``{stem: scan}`` of the pairs that are slices of scans: named so by `group_pattern`'s first group (BTCV's
    `case0001_slice061`), else kept in a folder of their case (the LGG set's `TCGA_CS_4941_19960909/
    TCGA_CS_4941_19960909_12.tif`: `data.case_folder_group`); ``{}`` for a 2-D data set."""
    pattern = compile_group_pattern(group_pattern)
    groups = {}
    for pair in pairs:
        match = pattern.match(pair.stem)
        scan = match.group(1) if match and match.groups() else case_folder_group(pair.image, pair.stem)
        if scan is not None:
            groups[pair.stem] = scan
    return groups


def mean_over_draws(draws: Sequence[Any]) -> Any:
    """
    One summary from the summaries of K jitter draws of the same images (`_scored`): every float the mean over the
    draws (NaNs ignored), counts and names as they are (the same in every draw: the images do not change, only
    their boxes). Each dict holding a `"dice"` also gets `"dice_per_draw"`, the K draws' values, so the spread
    that a single draw would have shown stays in the report.
    """
    first = draws[0]
    if isinstance(first, dict):
        merged = {key: mean_over_draws([d.get(key) for d in draws]) for key in first}
        if isinstance(first.get("dice"), float):
            merged["dice_per_draw"] = [d["dice"] for d in draws]
        return merged
    if any(isinstance(d, float) for d in draws):  # a distance may be None (undefined) in some draws only
        return nanmean([math.nan if d is None else float(d) for d in draws])
    return first


def evaluate_model(
    model,
    processor: IMedSamProcessor,
    pairs: Sequence[SegmentationPair],
    protocol: EvaluationProtocol,
    *,
    backbone: tuple | None = None,
    progress: bool = True,
    model_name: str = "imedsam",
    overlays: Path | None = None,
) -> EvaluationReport:
    """
    Score `model` on `pairs` by `protocol` and, with `backbone` `(model, processor)` (`load_baseline`), the
    backbone's own SAM mask zero-shot on the same images and prompts. A model whose implicit decoder was never
    trained (a conversion) is scored with its SAM mask, with a warning, never with random logits.
    Per scan (3D Dice; HD95 and NSD with the protocol's spacing) when the rows are class-prompted. `overlays`, a folder,
    receives the model's scored masks as PNGs (`evaluate_pairs`; the first jitter draw's), and the backbone's in its
    `baseline_sam/` sub-folder, for the same images and prompts side by side.
    """
    sam_mask_only = sam_mask_fallback(model)
    if protocol.prompt == "points" and (caveat := clicks_caveat(model, with_box=False)):
        warnings.warn(caveat, UserWarning, stacklevel=2)
    rows, results, volume = _scored(model, processor, pairs, protocol, sam_mask_only, progress, overlays)
    uses_implicit = getattr(model.config, "use_implicit_decoder", False) and not sam_mask_only
    report = EvaluationReport(
        protocol=protocol,
        rows=[{"model": model_name, **row} for row in rows],
        results=results,
        volume=volume,
        mask_source="implicit_decoder" if uses_implicit else "sam",
    )
    if backbone is not None:
        base_overlays = None if overlays is None else Path(overlays) / "baseline_sam"
        base_rows, base_results, base_volume = _scored(*backbone, pairs, protocol, True, progress, base_overlays)
        report.baseline = {**base_results, **({"volume": base_volume} if base_volume is not None else {})}
        report.rows += [{"model": "baseline_sam", **row} for row in base_rows]
    return report


def load_baseline(model, processor, model_spec: str, baseline_model: str | None = None, device=None):
    """
    The untouched backbone for `--baseline sam`. A trained I-MedSAM checkpoint has its adapters and trained prompt
    and upscaling modules built in, so its own SAM head is not the backbone's: load the backbone it was trained
    from (`config.base_model`, or `baseline_model`). A model that is the backbone already is used as it is.
    """
    name = baseline_model or model.config.base_model
    if name is None:
        if model.config.adapter_config is None:
            return model, processor  # not fine-tuned: its SAM head is the backbone's
        raise ValueError("`baseline`: the model does not record its backbone; give `baseline_model`.")
    if name == model_spec:
        return model, processor
    overrides = {"use_implicit_decoder": False}
    try:
        return load_model(name, image_size=model.config.image_size, config_overrides=overrides, device=device)
    except (OSError, ValueError) as error:
        raise ValueError(f"`baseline`: cannot load the backbone {name!r} ({error}); give `baseline_model`.") from error


def write_rows_csv(rows: Sequence[dict], path: Path) -> None:
    """Per-image rows as CSV, `model`, `stem`, `size` first."""
    with path.open("w", newline="") as handle:
        fields = sorted({key for row in rows for key in row}, key=lambda k: (k not in ("model", "stem", "size"), k))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def summary_lines(result: dict) -> list[str]:
    """One line per model and output size (n, Dice ± std, IoU, HD95, HD, NSD), with per-class and per-volume lines."""
    lines = []
    tables = (
        ("model", result.get("results"), result.get("volume")),
        ("baseline_sam", result.get("baseline_sam"), None),
    )
    for name, table, volume in tables:
        table = dict(table or {})
        volume = volume or table.pop("volume", None)
        for size, values in table.items():
            unit = values.get("unit", "px")
            lines.append(
                f"{name:12s} {size:>7s}  n={values['n']:3d}  Dice {values['dice']:.4f} ± {values['dice_std']:.4f}  "
                f"IoU {values['iou']:.4f}  HD95 {values['hd95']:.2f} {unit}  HD {values['hd']:.2f} {unit}"
                + nsd_text(values)
            )
            if values.get("dice_per_draw"):
                lines.append(f"{'':12s} {size:>7s}  {draws_line(values['dice_per_draw'])}")
            if values.get("n_empty"):
                lines.append(f"{'':12s} {size:>7s}  {empty_line(values)}")
            for class_id, scores in values.get("per_class", {}).items():
                lines.append(
                    f"{'':12s} {size:>7s}    {class_id:>3s} {scores['name']:28s} n={scores['n']:4d}  "
                    f"Dice {scores['dice']:.4f}  IoU {scores['iou']:.4f}  HD95 {scores['hd95']:.2f} {unit}"
                    + nsd_text(scores)
                )
            if "class_mean" in values:
                lines.append(
                    f"{'':12s} {size:>7s}    mean over {values['class_mean']['n_classes']} classes: "
                    f"Dice {values['class_mean']['dice']:.4f}"
                )
        if volume:
            tolerance = result.get("nsd_tolerance", NSD_TOLERANCE)
            surfels = ", surfels" if result.get("nsd_definition") == "surfels" else ""
            unit = (
                f"3D Dice, HD95 (mm) and NSD ({tolerance:g} mm{surfels})"
                if volume.get("hd95") is not None
                else "3D Dice"
            )
            lines.append(f"{name:12s} {'volume':>7s}  {volume['n_volumes']} scans, {unit} per class:")
            for class_id, scores in volume["per_class"].items():
                lines.append(
                    f"{'':12s} {'volume':>7s}    {class_id:>3s} {scores['name']:28s} Dice {scores['dice']:.4f}"
                    + (f"  HD95 {scores['hd95']:.2f} mm" if scores.get("hd95") is not None else "")
                    + nsd_text(scores)
                )
            lines.append(
                f"{'':12s} {'volume':>7s}    mean over classes: 3D Dice {volume['dice']:.4f}"
                + (f"  HD95 {volume['hd95']:.2f} mm" if volume.get("hd95") is not None else "")
                + nsd_text(volume)
            )
            if volume.get("dice_per_draw"):
                lines.append(f"{'':12s} {'volume':>7s}    {draws_line(volume['dice_per_draw'])}")
    return lines


def nsd_text(scores: Mapping) -> str:
    """`"  NSD 0.9123"`, or nothing for scores without one (a report written before NSD was scored, or a scan
    without a spacing)."""
    return f"  NSD {scores['nsd']:.4f}" if scores.get("nsd") is not None else ""


def draws_line(dice: Sequence[float]) -> str:
    """The report's line on `--jitter-draws`: how far one draw of jittered boxes moves the mean Dice."""
    values = " ".join(f"{d:.4f}" for d in dice)
    return f"{len(dice)} jitter draws, the numbers above their mean; Dice per draw {values} (range {max(dice) - min(dice):.4f})"


def empty_line(values: dict) -> str:
    """The report's line on the images with an empty mask (never in Dice, IoU or HD)."""
    text = f"n_empty={values['n_empty']:3d}  empty masks (no foreground): not in Dice, IoU or HD"
    if "empty_false_positive_fraction" in values:
        return (
            f"{text}; predicted foreground on them {100 * values['empty_false_positive_fraction']:.2f} % of the "
            f"image (false positives on {values['n_empty_with_false_positives']} of {values['n_empty']})"
        )
    return f"{text} (no box to prompt with)"


__all__ = [
    "NATIVE",
    "EvaluationProtocol",
    "EvaluationReport",
    "evaluate_model",
    "evaluate_pairs",
    "grid_size",
    "jittered_boxes",
    "load_baseline",
    "mean_over_draws",
    "parse_size",
    "predict_logits",
    "resize_labels",
    "save_overlay",
    "score",
    "summary_lines",
    "volume_summary",
]
