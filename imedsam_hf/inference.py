"""Inference: `segment(model, image, box=...)` (the three-line Python API), overlays, and what `imedsam predict`
does with its files (the command line's parsing is in `cli`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, mask_box, read_mask
from .loading import load_model
from .processing_imedsam import ImageInput, IMedSamProcessor, open_image, processor_for_config, to_rgb_array

MAX_PIXELS = 20000 * 20000  # larger images are refused (PIL also stops at about 179M pixels)
MAX_OUTPUT_PIXELS = 4096 * 4096  # beyond this the mask is predicted on a reduced grid and resized to the image
PREDICTION_COLOUR = (255.0, 0.0, 0.0)
TRUTH_COLOUR = (0.0, 255.0, 0.0)


@dataclass
class Segmentation:
    """
    `mask` `(H, W)` bool (class ids for multi-class models) and `probabilities` `(C, H, W)` float32; with several
    boxes, one of each per box: `mask` `(P, H, W)`, `probabilities` `(P, C, H, W)`.
    """

    mask: np.ndarray
    probabilities: np.ndarray


@lru_cache(maxsize=4)
def _load(name: str, device: str | None):
    return load_model(name, device=device)


@torch.no_grad()
def segment(
    model,
    image: ImageInput,
    box=None,
    points=None,
    labels=None,
    output_size: tuple[int, int] | None = None,
    processor: IMedSamProcessor | None = None,
    device: str | torch.device | None = None,
) -> Segmentation:
    """
    Segment one image (path, PIL image or array of any mode) with an I-MedSAM model.

    Args:
        model: an `IMedSamModel` (or PeftModel around one), a checkpoint folder or hub id, or `"litemedsam"`.
        box: (x0, y0, x1, y1) in original-image pixels, or a list of such boxes (one mask per box, from one pass
            of the image encoder). points: `(N, 2)` (x, y) with `labels` (1 fg, 0 bg). Neither: prompt-free.
        output_size: `(height, width)` of the returned mask; default the image's own size. The implicit decoder
            is queried on that grid directly.
        processor: defaults to the checkpoint's (or the one matching the model's config).
        device: where a model given by name is loaded (`"cuda"`, `"cpu"`, ...); a model object stays where it is.

    Example:
        >>> from imedsam_hf import segment
        >>> result = segment("outputs/litemedsam_polyp/final", "polyp.jpg", box=[120, 80, 410, 330])
        >>> result.mask.shape  # the image's (H, W)
    """
    if isinstance(model, str):
        model, default_processor = _load(model, None if device is None else str(device))
        processor = processor or default_processor
    if processor is None:
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
    logits = outputs.logits.float().cpu()[0]  # (C, H, W), or (P, C, H, W) for several boxes
    batch = logits if logits.ndim == 4 else logits[None]
    masks = IMedSamProcessor.post_process_masks(batch).numpy()
    return Segmentation(mask=masks if logits.ndim == 4 else masks[0], probabilities=logits.sigmoid().numpy())


def overlay(image: np.ndarray | Image.Image, mask: np.ndarray, truth: np.ndarray | None = None) -> Image.Image:
    """
    The one overlay: the image (resized to the mask's grid if needed) with the predicted `mask` tinted red and,
    when given, the ground truth `truth` (same grid) tinted green over it.
    """
    picture = (
        image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    )
    picture = picture.convert("RGB")
    if picture.size != (mask.shape[1], mask.shape[0]):
        picture = picture.resize((mask.shape[1], mask.shape[0]), Image.BILINEAR)
    array = np.asarray(picture).astype(np.float32)
    predicted = np.asarray(mask) > 0
    array[predicted] = 0.55 * array[predicted] + 0.45 * np.array(PREDICTION_COLOUR)
    if truth is not None:
        true = np.asarray(truth) > 0
        array[true] = 0.7 * array[true] + 0.3 * np.array(TRUTH_COLOUR)
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def collect_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise ValueError("No input images given.")
    return files


def fitted_grid(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The image's own grid, or the largest grid of the same aspect within `max_pixels` points."""
    if max_pixels < 1:
        raise ValueError(f"--max-output-pixels must be >= 1, got {max_pixels}.")
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"--box {text!r}: expected four comma-separated numbers x0,y0,x1,y1.")
    return box


def parse_output_size(text: str | None) -> tuple[int, int] | None:
    """`WxH` -> (H, W)."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise ValueError(f"--output-size {text!r}: expected WIDTHxHEIGHT, e.g. 512x384.")
    return height, width


@dataclass
class PromptSource:
    """Where `imedsam predict` takes each image's prompt from: exactly one of these, or `no_prompt`."""

    box: str | None = None
    boxes: dict | None = None
    boxes_from_masks: str | None = None
    no_prompt: bool = False

    def box_for(self, path: Path) -> list[float] | None:
        if self.no_prompt:
            return None
        if self.box:
            return parse_box(self.box)
        if self.boxes:
            if path.name not in self.boxes and path.stem not in self.boxes:
                raise ValueError(f"{path}: no box in --boxes for {path.name}.")
            return [float(v) for v in self.boxes.get(path.name, self.boxes.get(path.stem))]
        if self.boxes_from_masks:
            candidates = sorted(Path(self.boxes_from_masks).glob(f"{path.stem}.*"))
            if not candidates:
                raise ValueError(f"{path}: no mask named {path.stem}.* in {self.boxes_from_masks}.")
            box = mask_box(read_mask(candidates[0]))
            if box is None:
                raise ValueError(f"{candidates[0]}: the mask is empty, so it gives no box.")
            return box.tolist()
        raise ValueError("Give a prompt: --box, --boxes, --boxes-from-masks, or --no-prompt.")


def predict_files(
    model_spec: str,
    inputs: Sequence[str],
    out: str,
    prompts: PromptSource,
    output_size: str | None = None,
    write_overlays: bool = False,
    max_output_pixels: int = MAX_OUTPUT_PIXELS,
    device: str | None = None,
) -> int:
    """
    `imedsam predict`: one 0/255 PNG mask per input, named after it (and `<name>_overlay.png`). An input that
    cannot be used is reported by name and the others go on. Returns the exit code: 0 all segmented, 1 some
    inputs failed, 2 nothing could start (bad arguments, no model).
    """
    try:
        files = collect_inputs(inputs)
        grid = parse_output_size(output_size)
        model, processor = load_model(model_spec, device=device)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for path in tqdm(files, desc="predict", disable=len(files) < 2):
        try:
            image = open_image(path)
            width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS} pixels.")
            size = grid or fitted_grid(height, width, max_output_pixels)
            result = segment(model, image, box=prompts.box_for(path), output_size=size, processor=processor)
        except ValueError as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            failures.append(message)
            print(f"skipped {message}", file=sys.stderr)
            continue
        mask = Image.fromarray((result.mask > 0).astype(np.uint8) * 255)
        if grid is None and mask.size != (width, height):
            print(f"{path}: mask predicted at {mask.size[0]}x{mask.size[1]} and resized to {width}x{height}")
            mask = mask.resize((width, height), Image.NEAREST)
        mask.save(folder / f"{path.stem}.png")
        if write_overlays:
            picture = image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image).astype(np.uint8))
            overlay(picture, result.mask).save(folder / f"{path.stem}_overlay.png")
    done = len(files) - len(failures)
    print(f"{done} of {len(files)} images segmented into {folder}" + (f"; {len(failures)} failed:" if failures else ""))
    for message in failures:
        print(f"  {message}")
    return 1 if failures else 0


def read_boxes_file(path: str | None) -> dict | None:
    """`--boxes` JSON `{image name or stem: [x0, y0, x1, y1]}`."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--boxes {path}: cannot read it as JSON ({error}).") from error


__all__ = [
    "PromptSource",
    "Segmentation",
    "collect_inputs",
    "fitted_grid",
    "overlay",
    "predict_files",
    "read_boxes_file",
    "segment",
]
