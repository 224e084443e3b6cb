"""Evaluation of I-MedSAM (and of its backbone's own SAM mask) at native and cross resolutions.

One implementation shared by `training/train.py`, `training/evaluate.py`, the CLI and the benchmarks.

Protocol: the prompt is the exact ground-truth box (or none); the model's implicit decoder is queried directly
on the target grid over the unpadded image: at `"native"` size the original image grid, at size `s` a grid
whose longest side is `s` (aspect ratio kept). Ground truth is compared at native size as is, and resized with
nearest neighbour to other grids. The backbone baseline uses SAM's own mask post-processing (upsample, crop,
resize) on the same images and prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import SegmentationPair, mask_box, read_mask
from .metrics import aggregate, multiclass_scores, segmentation_scores
from .modeling_imedsam import sam_mask_on_grid
from .processing_imedsam import IMedSamProcessor, to_rgb_array

NATIVE = "native"


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


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-id map (never bilinear: that thins the foreground)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    tensor = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="nearest-exact")[0, 0].numpy().astype(labels.dtype)


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
) -> dict[str | int, torch.Tensor]:
    """
    Logits `(C, h, w)` of one image at each requested output size, from one encoder pass.

    `baseline=True` returns the backbone's own SAM mask (adapters disabled, SAM post-processing) instead.
    """
    device = next(model.parameters()).device
    inputs = processor(image, input_boxes=None if box is None else box)
    original = tuple(inputs["original_sizes"][0].tolist())
    region = inputs["output_region"].to(device)
    boxes = inputs["input_boxes"].to(device) if box is not None else None
    context = adapters_disabled(model) if baseline else contextlib.nullcontext()
    results = {}
    with context:
        embeddings = model.encode_image(inputs["pixel_values"].to(device, next(model.parameters()).dtype))
        if baseline:
            # SAM's mask does not depend on the output grid: one decoder pass, the implicit decoder queried at 1x1.
            outputs = model(image_embeddings=embeddings, input_boxes=boxes, output_size=(1, 1))
        for size in output_sizes:
            shape = grid_size(original, size)
            if baseline:
                logits = sam_mask_on_grid(outputs.sam_logits, processor.image_size, shape, region)
            else:
                logits = model(
                    image_embeddings=embeddings, input_boxes=boxes, output_size=shape, output_region=region
                ).logits
            results[size] = logits[0].float().cpu()
    return results


def score(logits: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Scores of one prediction against a class-id map of the same grid."""
    predicted = IMedSamProcessor.post_process_masks(logits[None])[0].numpy()
    if num_classes == 1:
        return segmentation_scores(predicted, labels > 0)
    return multiclass_scores(predicted.astype(np.int64), labels, num_classes + 1)


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
) -> tuple[list[dict], dict[str, dict]]:
    """
    Score every pair at every output size.

    With `class_prompts`, masks hold class ids 1..`mask_classes` and every class present is segmented on its own,
    prompted with its exact box, and scored as a binary mask (rows carry `class`); the summary averages them.

    Returns per-image rows (`stem`, `size`, scores) and a summary `{size: aggregate(...)}` with `dice`,
    `dice_std`, `iou`, `hd95`, `hd` (and their std) and `n`.
    """
    if prompt not in ("box", "none"):
        raise ValueError(f"`prompt` must be 'box' or 'none', got {prompt!r}.")
    sizes = [parse_size(s) for s in output_sizes]
    rows = []
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc="baseline" if baseline else "evaluate")
    for pair in iterator:
        labels = read_mask(pair.mask, mask_classes or num_classes)
        image = to_rgb_array(pair.image)
        targets = [(None, labels)]
        if class_prompts:
            targets = [(int(c), (labels == c).astype(np.int64)) for c in np.unique(labels) if c > 0]
        for class_id, target_labels in targets:
            box = mask_box(target_labels) if prompt == "box" else None
            logits = predict_logits(model, processor, image, box, sizes, baseline=baseline)
            extra = {} if class_id is None else {"class": class_id}
            for size in sizes:
                target = resize_labels(target_labels, tuple(logits[size].shape[-2:]))
                rows.append({"stem": pair.stem, "size": str(size), **extra, **score(logits[size], target, num_classes)})
    summary = {}
    for size in sizes:
        skip = ("stem", "size", "class")
        metrics = [{k: v for k, v in r.items() if k not in skip} for r in rows if r["size"] == str(size)]
        summary[str(size)] = aggregate(metrics)
    return rows, summary


__all__ = ["NATIVE", "evaluate_pairs", "grid_size", "parse_size", "predict_logits", "resize_labels", "score"]
