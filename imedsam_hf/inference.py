"""The three-line Python API: `segment(model, image, box=...)` -> mask at the image's size."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .processing_imedsam import ImageInput, IMedSamProcessor


@dataclass
class Segmentation:
    """`mask` `(H, W)` bool (class ids for multi-class models) and `probabilities` `(C, H, W)` float32."""

    mask: np.ndarray
    probabilities: np.ndarray


@lru_cache(maxsize=4)
def _load(name: str):
    from .cli import load_model_and_processor

    return load_model_and_processor(name)


@torch.no_grad()
def segment(
    model,
    image: ImageInput,
    box=None,
    points=None,
    labels=None,
    output_size: tuple[int, int] | None = None,
    processor: IMedSamProcessor | None = None,
) -> Segmentation:
    """
    Segment one image (path, PIL image or array of any mode) with an I-MedSAM model.

    Args:
        model: an `IMedSamModel` (or PeftModel around one), a checkpoint folder or hub id, or `"litemedsam"`.
        box: (x0, y0, x1, y1) in original-image pixels. points: `(N, 2)` (x, y) with `labels` (1 fg, 0 bg).
            Neither: prompt-free.
        output_size: `(height, width)` of the returned mask; default the image's own size. The implicit decoder
            is queried on that grid directly.
        processor: defaults to the checkpoint's (or the one matching the model's config).

    Example:
        >>> from imedsam_hf import segment
        >>> result = segment("outputs/litemedsam_polyp/final", "polyp.jpg", box=[120, 80, 410, 330])
        >>> result.mask.shape  # the image's (H, W)
    """
    if isinstance(model, str):
        model, default_processor = _load(model)
        processor = processor or default_processor
    if processor is None:
        from .processing_imedsam import processor_for_config

        processor = processor_for_config(model.config)
    inputs = processor(image, input_boxes=box, input_points=points, input_labels=labels)
    size = output_size or tuple(inputs["original_sizes"][0].tolist())
    parameter = next(model.parameters())
    prompts = {
        key: inputs[key].to(parameter.device)
        for key in ("input_boxes", "input_points", "input_labels")
        if key in inputs
    }
    outputs = model(
        pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
        output_size=size,
        output_region=inputs["output_region"],
        **prompts,
    )
    logits = outputs.logits.float().cpu()
    return Segmentation(
        mask=IMedSamProcessor.post_process_masks(logits)[0].numpy(), probabilities=logits.sigmoid()[0].numpy()
    )


__all__ = ["Segmentation", "segment"]
