"""Inference: `segment(model, image, box=...)` (the three-line Python API), overlays, and what `imedsam predict`
does with its files (the command line's parsing is in `cli`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, mask_box, mask_clicks, read_mask
from .loading import implicit_decoder_trained, load_model
from .modeling_imedsam import sam_mask_on_grid
from .processing_imedsam import (
    ImageInput,
    IMedSamProcessor,
    describe,
    open_image,
    processor_for_config,
    resize_labels,
    to_rgb_array,
)

MAX_PIXELS = 20000 * 20000  # larger images and masks are refused (PIL also stops at about 179M pixels)
# The output budget: a mask grid over this many points is predicted on the largest grid of the same aspect within
# it and resized (nearest neighbour) to the size asked for. Masks of any allowed size then need the model's memory
# of a 4096 x 4096 grid (a few hundred MB), not 8 GB for 20000 x 20000.
MAX_OUTPUT_PIXELS = 4096 * 4096
PREDICTION_COLOUR = (255.0, 0.0, 0.0)
TRUTH_COLOUR = (0.0, 255.0, 0.0)


@dataclass
class Segmentation:
    """
    `mask` `(H, W)` bool (class ids for multi-class models) and `probabilities` `(C, h, w)` float32; with several
    boxes, one of each per box: `mask` `(P, H, W)`, `probabilities` `(P, C, h, w)`.

    `grid` `(h, w)` is where the model was queried: the mask's own size, or for a mask over the output budget
    (`max_output_pixels`) the bounded grid, from which the mask is resized and on which `probabilities` stay.
    `mask_source` is `"implicit_decoder"`, or `"sam"` where the model's implicit decoder was never trained and
    SAM's own mask was used instead.
    """

    mask: np.ndarray
    probabilities: np.ndarray
    grid: tuple[int, int] | None = None
    mask_source: str = "implicit_decoder"


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
    max_output_pixels: int = MAX_OUTPUT_PIXELS,
    classes=None,
) -> Segmentation:
    """
    Segment one image (path, PIL image or array of any mode) with an I-MedSAM model.

    Args:
        model: an `IMedSamModel` (or PeftModel around one), a checkpoint folder or hub id, or `"litemedsam"`.
        box: (x0, y0, x1, y1) in original-image pixels, or a list of such boxes (one mask per box, from one pass
            of the image encoder). points: `(N, 2)` (x, y) with `labels` (1 fg, 0 bg). Neither: prompt-free.
            NaN, points off the image and boxes outside it are errors naming the argument and value.
        output_size: `(height, width)` of the returned mask; default the image's own size. The implicit decoder
            is queried on that grid directly, up to `max_output_pixels` points.
        processor: defaults to the checkpoint's (or the one matching the model's config).
        device: where a model given by name is loaded (`"cuda"`, `"cpu"`, ...); a model object stays where it is.
        max_output_pixels: the output budget. A larger mask is predicted on the largest grid of the same aspect
            within it and resized nearest-neighbour (`Segmentation.grid`), which bounds memory.
        classes: with a multi-class (class-aware) model, one class id per box (1..num_classes): each box is decoded
            by its class's heads (`input_classes`) and gets one binary mask, as with a one-class model.

    A model whose implicit decoder was never trained (a conversion: `config.implicit_decoder_trained` false) gives
    SAM's own mask, with a warning once per model (`mask_source="sam"`); a multi-class one is an error. Logits that
    are not finite (damaged weights or input) are an error, never an empty mask.

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
    use_sam_mask = sam_mask_fallback(model)
    inputs = processor(image, input_boxes=box, input_points=points, input_labels=labels)
    input_classes = checked_input_classes(model, classes, inputs.get("input_boxes"))
    size = _checked_output_size(output_size or tuple(inputs["original_sizes"][0].tolist()))
    grid = fitted_grid(*size, max_output_pixels)
    parameter = next(model.parameters())
    prompts = {
        key: inputs[key].to(parameter.device)
        for key in ("input_boxes", "input_points", "input_labels")
        if key in inputs
    }
    outputs = model(
        pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
        output_size=grid,
        output_region=inputs["output_region"],
        input_classes=None if input_classes is None else input_classes.to(parameter.device),
        **prompts,
    )
    logits = _sam_mask(model, outputs.sam_logits, grid, inputs) if use_sam_mask else outputs.logits.float().cpu()[0]
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"{describe(image)}: the model's output holds NaN or infinite values (damaged weights or input); no mask."
        )
    batch = logits if logits.ndim == 4 else logits[None]  # (C, h, w), or (P, C, h, w) for several boxes
    masks = IMedSamProcessor.post_process_masks(batch).numpy()
    if grid != size:
        masks = np.stack([resize_labels(mask, size) for mask in masks])
    return Segmentation(
        mask=masks if logits.ndim == 4 else masks[0],
        probabilities=logits.sigmoid().numpy(),
        grid=grid,
        mask_source="implicit_decoder"
        if getattr(model.config, "use_implicit_decoder", False) and not use_sam_mask
        else "sam",
    )


def checked_input_classes(model, classes, boxes: torch.Tensor | None) -> torch.Tensor | None:
    """
    `classes` (one id per box, as `segment(classes=...)` and class-aware evaluation give them) as the model's
    `input_classes`, `(1, P)` for boxes `(1, P, 4)` or `(1,)` for `(1, 4)`: one id in 1..num_classes per box, checked.
    """
    if classes is None:
        return None
    num_classes = int(getattr(model.config, "num_classes", 1))
    ids = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if boxes is None:
        raise ValueError("`classes` name the class of each box: give `box` too.")
    count = boxes.shape[1] if boxes.ndim == 3 else 1
    if len(ids) != count:
        raise ValueError(f"`classes`: {len(ids)} class ids for {count} boxes; give one per box.")
    if num_classes < 2 or bool(((ids < 1) | (ids > num_classes)).any()):
        raise ValueError(f"`classes` {ids.tolist()}: class ids must be in 1..{num_classes} (a class-aware model).")
    return ids.reshape(1, -1) if boxes.ndim == 3 else ids.reshape(1)


def sam_mask_fallback(model) -> bool:
    """Whether `model` has an implicit decoder that was never trained (then SAM's mask is used, with a warning)."""
    config = model.config
    if not getattr(config, "use_implicit_decoder", False) or implicit_decoder_trained(model):
        return False
    name = getattr(model, "name_or_path", "") or type(model).__name__
    untrained = f"`{name}`: its implicit decoder was never trained (a conversion; its config does not say `implicit_decoder_trained: true`)"
    if getattr(config, "num_classes", 1) != 1:
        raise ValueError(
            f"{untrained}, and SAM's own mask has one channel, not num_classes={config.num_classes}: fine-tune it "
            "first (training/train.py)."
        )
    # The same text from the same line: Python shows it once per model name.
    warnings.warn(
        f"{untrained}, so SAM's own mask is used. Fine-tune it (training/train.py) to use the implicit decoder.",
        UserWarning,
        stacklevel=1,
    )
    return True


def _sam_mask(model, sam_logits: torch.Tensor, grid: tuple[int, int], inputs) -> torch.Tensor:
    """SAM's own mask of one image on `grid`: `(1, h, w)`, or `(P, 1, h, w)` for several prompts."""
    rows = sam_logits[0].float().cpu()  # (1, 4h', 4w') or (P, 1, 4h', 4w')
    several = rows.ndim == 4
    rows = rows if several else rows[None]
    region = inputs["output_region"].expand(len(rows), 4)
    logits = sam_mask_on_grid(rows, model.config.image_size, grid, region)
    return logits if several else logits[0]


def _checked_output_size(size, name: str = "`output_size`") -> tuple[int, int]:
    """`(height, width)` as positive ints within `MAX_PIXELS`; a `ValueError` naming `name` otherwise."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be a positive (height, width), got {size!r}.")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{name} {width}x{height} is over the limit of {MAX_PIXELS} pixels.")
    return height, width


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
    return [file for file, _ in _inputs_with_roots(paths)]


def _inputs_with_roots(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """Each input file with the folder it was given in: the folder named on the command line, or its own parent."""
    files: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            files.extend((file, path) for file in found)
        else:
            files.append((path, path.parent))
    if not files:
        raise ValueError("No input images given.")
    return files


def plan_outputs(paths: Sequence[str], out: str | os.PathLike, overlays: bool = False) -> dict[Path, list[Path]]:
    """
    `imedsam predict`'s output files: for each input image, `<out>/<relative path>.png` (and `..._overlay.png`),
    the path relative to the common folder of all inputs, so `a/x.jpg` and `b/x.jpg` give `a/x.png` and `b/x.png`
    and inputs from one folder give flat names. Two inputs that would write one file (`x.jpg` and `x.png`) are an
    error naming both, before anything is written.
    """
    inputs = _inputs_with_roots(paths)
    sources = list(dict.fromkeys(Path(os.path.abspath(file)) for file, _ in inputs))
    roots = {Path(os.path.abspath(root)) for _, root in inputs}
    common = Path(os.path.commonpath([str(root) for root in roots]))
    folder = Path(out)
    plan: dict[Path, list[Path]] = {}
    writers: dict[Path, Path] = {}
    for source in sources:
        name = source.relative_to(common).with_suffix("")
        targets = [folder / f"{name}.png"] + ([folder / f"{name}_overlay.png"] if overlays else [])
        for target in targets:
            if target in writers:
                raise ValueError(
                    f"{writers[target]} and {source} would both be written to {target}; rename one of them or "
                    "predict them separately."
                )
            writers[target] = source
        plan[source] = targets
    return plan


def refuse_existing(targets: Sequence[Path], out: str | os.PathLike, overwrite: bool) -> None:
    """Files to write that already exist are an error naming them, unless `overwrite` (`--overwrite`)."""
    existing = [target for target in targets if target.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(path) for path in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ValueError(
            f"--out {out}: {len(existing)} of the files to write already exist ({shown}); pass --overwrite to "
            "replace them."
        )


def check_output_folder(out: str | os.PathLike, inputs: Sequence[str], masks_folder: str | None = None) -> None:
    """
    `--out` must be a folder (or not exist yet) outside every input folder and the `--boxes-from-masks` folder:
    masks written there would overwrite inputs or ground truth, or be read as inputs by the next run.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder.")
    target = folder.resolve()
    guarded = []  # (folder, what it is, whether its subfolders are refused too)
    for raw in inputs:
        path = Path(raw)
        guarded.append(
            (path, f"the input folder {path}", True) if path.is_dir() else (path.parent, f"the folder of {path}", False)
        )
    if masks_folder:
        guarded.append((Path(masks_folder), f"the --boxes-from-masks folder {masks_folder}", True))
    for path, role, subfolders in guarded:
        place = path.resolve()
        if target == place or (subfolders and place in target.parents):
            raise ValueError(
                f"--out {out}: is {role if target == place else 'inside ' + role}; masks written there could "
                "overwrite its files or be read as inputs. Choose a folder outside it."
            )


def check_writable(out: str | os.PathLike) -> None:
    """Create `out` if needed and write a probe file into it, so a read-only folder fails once, before any image."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write into it ({error.strerror or error}).") from None


def save_atomically(image: Image.Image, target: Path) -> None:
    """
    Write `image` as a PNG into a temporary file next to `target` and rename it into place: a reader (or a killed
    run) never sees a half-written mask, and a failed write leaves the old file as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fitted_grid(height: int, width: int, max_pixels: int = MAX_OUTPUT_PIXELS) -> tuple[int, int]:
    """
    The one output budget: `(height, width)` itself, or the largest grid of the same aspect within `max_pixels`
    points (`segment` predicts there and resizes the mask).
    """
    check_output_budget(max_pixels)
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def check_output_budget(max_pixels: int) -> int:
    """`max_output_pixels` / `--max-output-pixels`: a whole number of pixels >= 1."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"`max_output_pixels` must be a whole number of pixels >= 1, got {max_pixels!r}.")
    return int(max_pixels)


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
    return _checked_output_size((height, width), "--output-size")


@dataclass
class PromptSource:
    """Where `imedsam predict` takes each image's prompt from: exactly one of these, or `no_prompt`."""

    box: str | None = None
    boxes: dict | None = None
    boxes_from_masks: str | None = None
    no_prompt: bool = False
    points: str | None = None
    points_from_masks: str | None = None
    clicks: int = 1

    @property
    def masks_folder(self) -> str | None:
        return self.boxes_from_masks or self.points_from_masks

    def prompt_for(self, path: Path) -> dict[str, Any]:
        """`segment`'s prompt arguments for one image: `box`, or `points` with `labels`, or nothing."""
        if self.points:
            points, labels = parse_points(self.points)
            return {"points": points, "labels": labels}
        if self.points_from_masks:
            clicks = mask_clicks(read_mask(self._mask_of(path, self.points_from_masks)), self.clicks)
            if clicks is None:
                raise ValueError(
                    f"{self._mask_of(path, self.points_from_masks)}: the mask is empty, so it gives no click."
                )
            return {"points": clicks.tolist(), "labels": [1] * len(clicks)}
        return {"box": self.box_for(path)}

    @staticmethod
    def _mask_of(path: Path, folder: str) -> Path:
        candidates = sorted(Path(folder).glob(f"{path.stem}.*"))
        if not candidates:
            raise ValueError(f"{path}: no mask named {path.stem}.* in {folder}.")
        return candidates[0]

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
            mask = self._mask_of(path, self.boxes_from_masks)
            box = mask_box(read_mask(mask))
            if box is None:
                raise ValueError(f"{mask}: the mask is empty, so it gives no box.")
            return box.tolist()
        raise ValueError(
            "Give a prompt: --box, --boxes, --boxes-from-masks, --points, --points-from-masks, or --no-prompt."
        )


def parse_points(text: str) -> tuple[list[list[float]], list[int]]:
    """`--points "x,y[,label];x,y[,label]"` (label 1 foreground, the default, or 0 background) -> points, labels."""
    points, labels = [], []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        values = item.split(",")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or (len(numbers) == 3 and numbers[2] not in (0, 1)):
            raise ValueError(f"--points {text!r}: {item!r} is not x,y or x,y,label (label 1 or 0).")
        points.append(numbers[:2])
        labels.append(int(numbers[2]) if len(numbers) == 3 else 1)
    if not points:
        raise ValueError(f"--points {text!r}: give at least one x,y.")
    return points, labels


def predict_files(
    model_spec: str,
    inputs: Sequence[str],
    out: str,
    prompts: PromptSource,
    output_size: str | None = None,
    write_overlays: bool = False,
    max_output_pixels: int = MAX_OUTPUT_PIXELS,
    device: str | None = None,
    overwrite: bool = False,
) -> int:
    """
    `imedsam predict`: one 0/255 PNG mask per input, named after it (`plan_outputs`; and `<name>_overlay.png`),
    each written atomically. Files already in `out` are replaced only with `overwrite`. An input that cannot be
    segmented or written is reported by name and the others go on. Returns the exit code: 0 all segmented, 1 some
    inputs failed, 2 nothing could start (bad arguments, no model, an unusable `out`).
    """
    try:
        check_output_budget(max_output_pixels)
        grid = parse_output_size(output_size)
        check_output_folder(out, inputs, prompts.masks_folder)
        plan = plan_outputs(inputs, out, write_overlays)
        refuse_existing([target for targets in plan.values() for target in targets], out, overwrite)
        check_writable(out)
        model, processor = load_model(model_spec, device=device)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failures = []
    for path, targets in tqdm(plan.items(), desc="predict", disable=len(plan) < 2):
        try:
            image = open_image(path)
            width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS} pixels.")
            result = segment(
                model,
                image,
                **prompts.prompt_for(path),
                output_size=grid or (height, width),
                processor=processor,
                max_output_pixels=max_output_pixels,
            )
            mask = Image.fromarray((result.mask > 0).astype(np.uint8) * 255)
            if result.grid is not None and result.grid != (mask.size[1], mask.size[0]):
                print(
                    f"{path}: mask predicted at {result.grid[1]}x{result.grid[0]} and resized to {mask.size[0]}x{mask.size[1]}"
                )
            save_atomically(mask, targets[0])
            if write_overlays:
                picture = (
                    image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image).astype(np.uint8))
                )
                save_atomically(overlay(picture, result.mask), targets[1])
        except ValueError as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            failures.append(message)
            print(f"skipped {message}", file=sys.stderr)
        except OSError as error:
            message = (
                f"{path}: cannot write {getattr(error, 'filename', None) or targets[0]} ({error.strerror or error})"
            )
            failures.append(message)
            print(f"failed {message}", file=sys.stderr)
    done = len(plan) - len(failures)
    print(f"{done} of {len(plan)} images segmented into {out}" + (f"; {len(failures)} failed:" if failures else ""))
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
    "MAX_OUTPUT_PIXELS",
    "PromptSource",
    "Segmentation",
    "check_output_budget",
    "check_output_folder",
    "check_writable",
    "collect_inputs",
    "fitted_grid",
    "overlay",
    "plan_outputs",
    "predict_files",
    "read_boxes_file",
    "refuse_existing",
    "sam_mask_fallback",
    "save_atomically",
    "segment",
]
