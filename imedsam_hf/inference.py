"""Inference: `segment(model, image, box=...)` (the three-line Python API), overlays and the output budget.

Library code: errors name the image and the argument (`ValueError`), nothing is printed; `imedsam predict` (the
`commands` room) adds files, flags and exit codes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from .configuration_imedsam import is_class_aware, training_window
from .data import class_id_of, is_volume
from .loading import load_model
from .modeling_imedsam import sam_mask_on_grid
from .processing_imedsam import (
    ImageInput,
    IMedSamProcessor,
    describe,
    dicom_kind,
    hu_windowed,
    is_dicom_file,
    mirrored_inputs,
    mirrored_mean,
    probability_logits,
    processor_for_config,
    resize_labels,
    tta_mirrors,
)
from .publishing import implicit_decoder_trained

MAX_PIXELS = 20000 * 20000  # larger images and masks are refused (PIL also stops at about 179M pixels)
# The output budget: a mask grid over this many points is predicted on the largest grid of the same aspect within
# it and resized (nearest neighbour) to the size asked for. Masks of any allowed size then need the model's memory
# of a 4096 x 4096 grid (a few hundred MB), not 8 GB for 20000 x 20000.
MAX_OUTPUT_PIXELS = 4096 * 4096
# One `segment` call's masks may hold this many output budgets in all (several prompts); beyond, it is refused.
MAX_CALL_OUTPUTS = 16
PREDICTION_COLOUR = (255.0, 0.0, 0.0)
TRUTH_COLOUR = (0.0, 255.0, 0.0)
PROMPT_COLOUR = (0, 255, 255)
BACKGROUND_CLICK_COLOUR = (255, 0, 255)
# Class c of a label map is drawn in CLASS_COLOURS[(c - 1) % 18]: matplotlib's tab20 without its two greys, which
# a CT's own grey levels would hide.
CLASS_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


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


def windowed_slice(image: ImageInput, config, rescale_intercept: float | None = None) -> ImageInput:
    """
    A CT slice in Hounsfield units (an array, or a 2-D NIfTI / NRRD / MetaImage file of them), for a model that
    records the CT window of its training images (`training_window`): windowed to 8-bit grey as those images were, as
    volumes are (`volumes.resolve_window`; `processing_imedsam.hu_windowed`). Anything else is returned as it is
    (files, 8-bit and colour images, arrays that do not look like HU; an MR window). `rescale_intercept`: the image is
    a 16-bit picture of HU minus it (DeepLesion's PNGs: -32768; `processing_imedsam.stored_hu`), windowed so.
    """
    return hu_windowed(image, training_window(config), rescale_intercept)


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
    image_embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
    tta: str = "none",
    rescale_intercept: float | None = None,
) -> Segmentation:
    """
    Segment one image (path, PIL image or array of any mode) with an I-MedSAM model.

    Args:
        model: an `IMedSamModel` (or PeftModel around one), a checkpoint folder or hub id, a shipped model's name
            (`imedsam-litemedsam-btcv`), or `"litemedsam"`.
        box: (x0, y0, x1, y1) in original-image pixels, or a list of such boxes (one mask per box, from one pass
            of the image encoder). points: `(N, 2)` (x, y) with `labels` (1 fg, 0 bg). Neither: prompt-free.
            NaN, points off the image and boxes outside it are errors naming the argument and value.
        output_size: `(height, width)` of the returned mask; default the image's own size. The implicit decoder
            is queried on that grid directly, up to `max_output_pixels` points.
        processor: defaults to the checkpoint's (or the one matching the model's config).
        device: where a model given by name is loaded (`"cuda"`, `"cpu"`, ...); a model object stays where it is.
        max_output_pixels: the output budget. A larger mask is predicted on the largest grid of the same aspect
            within it and resized nearest-neighbour (`Segmentation.grid`), which bounds memory. Several boxes are
            decoded a few at a time, each group within the budget, so memory is bounded for the whole call; a call
            whose masks alone would exceed `MAX_CALL_OUTPUTS` budgets is refused with its estimate.
        classes: with a multi-class (class-aware) model, one class id per box (1..num_classes) or a structure name
            of its id2label (`"liver"`): each box is decoded by its class's heads (`input_classes`) and gets one
            binary mask, as with a one-class model.
        image_embeddings: `model.encode_image` of this image `(1, hidden, h, w)`, computed earlier (a volume's
            slice prompted several times): the encoder is not run again. With `tta`, one per mirror of
            `TTA_MIRRORS[tta]`, in that order (`volumes.encode_slice(..., tta=tta)`).
        tta: test-time mirroring, `"none"` (default), `"h"`, `"v"` or `"hv"` (`TTA_MIRRORS`): the image is also
            segmented mirrored left-right and/or up-down (prompts mirrored with it), each prediction is mirrored
            back and the probabilities are averaged (nnU-Net's test-time augmentation), at 2 or 4 times the cost.
        rescale_intercept: `image` is a 16-bit grey picture storing CT as HU minus this (DeepLesion's PNGs: -32768):
            read as HU and windowed with the model's recorded CT window (`windowed_slice`; a model recording none is
            a ValueError naming the argument).

    A CT slice given as an array in Hounsfield units is windowed as the model's training images were when the model
    records that window (`windowed_slice`; the shipped BTCV model: -125..275 HU); other images go in as they are.

    A model whose implicit decoder was never trained (a conversion: `config.implicit_decoder_trained` false) gives
    SAM's own mask, with a warning once per model (`mask_source="sam"`); a multi-class one is an error. Logits that
    are not finite (damaged weights or input) are an error, never an empty mask.

    Example:
        >>> from imedsam_hf import segment
        >>> result = segment("imedsam-litemedsam-polyp", "polyp.jpg", box=[120, 80, 410, 330])
        >>> result.mask.shape  # the image's (H, W)
    """
    if labels is not None and points is None:
        raise ValueError("`labels` were given without `points`: they label each point (1 foreground, 0 background).")
    path_given = isinstance(image, (str, os.PathLike))
    kind = dicom_kind(image) if path_given and os.path.isfile(image) and is_dicom_file(image) else ""
    if path_given and (is_volume(image) or os.path.isdir(image) or kind in ("slice", "volume")):
        what = "a 3-D image file" if is_volume(image) else "a folder" if os.path.isdir(image) else "a DICOM slice"
        what = "a multi-frame DICOM scan" if kind == "volume" else what
        raise ValueError(
            f"{image}: {what}, and segment() takes one 2-D image: use imedsam_hf.volumes.segment_volume(model, "
            "read_volume(path), label_volume=... or boxes_3d=...) for a scan (a NIfTI, NRRD or MetaImage file or a "
            "DICOM series' folder), or `imedsam predict` (a label volume out)."
        )
    mirrors = tta_mirrors(tta)
    if isinstance(model, str):
        model, default_processor = _load(model, None if device is None else str(device))
        processor = processor or default_processor
    if processor is None:
        processor = processor_for_config(model.config)
    image = windowed_slice(image, model.config, rescale_intercept)
    if points is not None and (caveat := clicks_caveat(model, with_box=box is not None)):
        warnings.warn(caveat, UserWarning, stacklevel=1)  # once per model and prompt kind: the same text
    if box is not None and classes is None and (caveat := classes_caveat(model)):
        warnings.warn(caveat, UserWarning, stacklevel=1)
    if len(mirrors) > 1:
        return _segment_mirrored(
            model, image, mirrors, box, points, labels, output_size, processor, max_output_pixels, classes,
            image_embeddings,
        )  # fmt: skip
    if isinstance(image_embeddings, (list, tuple)):
        image_embeddings = _one_embedding(image_embeddings)
    use_sam_mask = sam_mask_fallback(model)
    inputs = processor(image, input_boxes=box, input_points=points, input_labels=labels)
    input_classes = checked_input_classes(model, classes, inputs.get("input_boxes"))
    size = checked_output_size(output_size or tuple(inputs["original_sizes"][0].tolist()))
    grid = fitted_grid(*size, max_output_pixels)
    parameter = next(model.parameters())
    prompts = {
        key: inputs[key].to(parameter.device)
        for key in ("input_boxes", "input_points", "input_labels")
        if key in inputs
    }
    several = next(
        (p.ndim == (3 if k == "input_boxes" else 4) for k, p in prompts.items() if k != "input_labels"), False
    )
    count = next((p.shape[1] for k, p in prompts.items() if k != "input_labels"), 1) if several else 1
    if count * grid[0] * grid[1] > MAX_CALL_OUTPUTS * max_output_pixels:
        gib = count * grid[0] * grid[1] * 4 * (1 + int(getattr(model.config, "num_classes", 1))) / 2**30
        raise ValueError(
            f"{describe(image)}: {count} prompts of {grid[1]}x{grid[0]} masks would hold about {gib:.1f} GiB of "
            "results; segment fewer prompts per call, or ask for a smaller `output_size`."
        )
    embeddings = image_embeddings
    if embeddings is None:
        embeddings = model.encode_image(inputs["pixel_values"].to(parameter.device, parameter.dtype))
    # Prompts a few at a time, each group's query points within the output budget: memory stays bounded.
    step = max(1, max_output_pixels // (grid[0] * grid[1])) if several else 1
    chunks = []
    for start in range(0, count, step):
        part = {k: v[:, start : start + step] for k, v in prompts.items()} if several else prompts
        part_classes = input_classes
        if input_classes is not None and several:
            part_classes = input_classes[:, start : start + step].to(parameter.device)
        elif input_classes is not None:
            part_classes = input_classes.to(parameter.device)
        outputs = model(
            image_embeddings=embeddings,
            output_size=grid,
            output_region=inputs["output_region"],
            input_classes=part_classes,
            full_sam_logits=use_sam_mask,
            **part,
        )
        if use_sam_mask:
            chunk = sam_mask_logits(outputs.sam_logits[0], model.config.image_size, grid, inputs["output_region"])
        else:
            chunk = outputs.logits.float().cpu()[0]
        chunks.append(chunk if several else chunk[None])
    logits = torch.cat(chunks) if several else chunks[0][0]  # (C, h, w), or (P, C, h, w) for several prompts
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"{describe(image)}: the model's output holds NaN or infinite values (damaged weights or input); no mask."
        )
    batch = logits if several else logits[None]
    masks = IMedSamProcessor.post_process_masks(batch).numpy()
    if grid != size:
        masks = np.stack([resize_labels(mask, size) for mask in masks])
    return Segmentation(
        mask=masks if several else masks[0],
        probabilities=logits.sigmoid().numpy(),
        grid=grid,
        mask_source="implicit_decoder"
        if getattr(model.config, "use_implicit_decoder", False) and not use_sam_mask
        else "sam",
    )


def _one_embedding(embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(embeddings) != 1:
        raise ValueError(
            f"`image_embeddings`: {len(embeddings)} were given for `tta='none'`, which takes one (the image's own)."
        )
    return embeddings[0]


def _segment_mirrored(
    model, image, mirrors, box, points, labels, output_size, processor, max_output_pixels, classes, image_embeddings
) -> Segmentation:
    """`segment` with test-time mirroring: each mirror segmented with its prompts mirrored, the probabilities
    mirrored back and averaged (`mirrored_mean`), the mask made from the average as from one prediction."""
    if image_embeddings is not None and (
        not isinstance(image_embeddings, (list, tuple)) or len(image_embeddings) != len(mirrors)
    ):
        raise ValueError(
            f"`image_embeddings`: with test-time mirroring give one per mirror {list(mirrors)} (in that order, "
            "`volumes.encode_slice(..., tta=...)`), or none."
        )
    results, size = [], None
    # The image as it is first: its prompts are checked as given.
    for index, (_, mirrored, shape, mirrored_box, mirrored_points) in enumerate(
        mirrored_inputs(image, mirrors, box, points)
    ):
        size = size or checked_output_size(output_size or shape)
        results.append(
            segment(
                model,
                mirrored,
                box=mirrored_box,
                points=mirrored_points,
                labels=labels,
                output_size=size,
                processor=processor,
                max_output_pixels=max_output_pixels,
                classes=classes,
                image_embeddings=None if image_embeddings is None else image_embeddings[index],
            )
        )
    probability = mirrored_mean([torch.from_numpy(result.probabilities) for result in results], mirrors)
    several = probability.ndim == 4  # (P, C, h, w)
    masks = IMedSamProcessor.post_process_masks(probability_logits(probability if several else probability[None]))
    masks = masks.numpy()
    if results[0].grid != size:
        masks = np.stack([resize_labels(mask, size) for mask in masks])
    return Segmentation(
        mask=masks if several else masks[0],
        probabilities=probability.numpy(),
        grid=results[0].grid,
        mask_source=results[0].mask_source,
    )


def checked_input_classes(model, classes, boxes: torch.Tensor | None) -> torch.Tensor | None:
    """
    `classes` (one id per box, as `segment(classes=...)` and class-aware evaluation give them; a structure name of
    the model's id2label, such as `"liver"`, stands for its id) as the model's `input_classes`, `(1, P)` for boxes
    `(1, P, 4)` or `(1,)` for `(1, 4)`: one whole id in 1..num_classes per box, checked.
    """
    if classes is None:
        return None
    num_classes = int(getattr(model.config, "num_classes", 1))
    values = np.asarray(classes, dtype=object).reshape(-1)
    if any(isinstance(v, str) for v in values):  # structure names (`"liver"`) or ids as text: the model's id2label
        values = np.asarray([structure_id(model.config, v) if isinstance(v, str) else v for v in values], dtype=object)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        raise ValueError(f"`classes` {values.tolist()}: class ids are whole numbers (1..{num_classes}), one per box.")
    ids = torch.as_tensor([int(v) for v in values], dtype=torch.long)
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


def clicks_caveat(model, with_box: bool) -> str | None:
    """
    What clicks do to `model` when it never learned them (`config.learned_clicks` false: LiteMedSAM, MedSAM and
    their box-trained fine-tunes), as `segment`, `imedsam evaluate` and the demo say it; None when it did. Measured
    on the 28 polyp validation images: one click alone gives Dice 0.05 with `imedsam-litemedsam-polyp` (0.96 with a
    box), and adding one click to the box 0.953 instead of 0.961 (zero-shot LiteMedSAM 0.817 instead of 0.961).
    """
    if getattr(model.config, "learned_clicks", True):
        return None
    name = getattr(model, "name_or_path", "") or type(model).__name__
    effect = (
        "clicks added to a box can cut its mask short"
        if with_box
        else "clicks without a box give nearly empty masks (Dice 0.05 with one click on polyps, 0.96 with a box)"
    )
    return (
        f"`{name}` learned box prompts only (LiteMedSAM and MedSAM were trained with boxes): {effect}. Give a box; "
        "to teach a model clicks, fine-tune it with `max_clicks` and `click_probability` (docs/results.md, 'Clicks')."
    )


def structure_id(config, structure: str | int, argument: str = "`classes`") -> int:
    """
    The class id of `structure` for a class-aware model's `config`: a whole number in 1..num_classes, or a name of
    its `id2label` (`data.class_id_of`: case, spaces and underscores ignored). Anything else is a ValueError listing
    the model's structures, starting with `argument` (as `data.class_id_of`).
    """
    num_classes = int(getattr(config, "num_classes", 1))
    if not is_class_aware(config):
        raise ValueError(
            f"{argument} {structure!r}: this model is not class-aware (one prompt gives its {num_classes} class "
            "channel(s)): name its structures by class id, or leave them out."
        )
    recorded = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = {i: recorded.get(i, f"class {i}") for i in range(1, num_classes + 1)}
    return class_id_of(structure, names, argument)


def classes_caveat(model) -> str | None:
    """
    What boxes without `classes` give a class-aware model (`config.class_aware`: each box decoded by its class's
    heads), as `segment` warns it; None for other models. Measured on 63 organ boxes of the BTCV validation slices
    with `imedsam-litemedsam-btcv`: with its class Dice 0.912; without, the union of the masks 0.905, but the class
    id covering most of the mask is the box's own for 8% of the boxes.
    """
    config = model.config
    if not is_class_aware(config):
        return None
    name = getattr(model, "name_or_path", "") or type(model).__name__
    return (
        f"`{name}` is class-aware: a box is decoded by the heads of the structure it is for (`classes`, ids "
        f"1..{config.num_classes} of its id2label). Without them every structure's heads decode it: the mask's "
        "union is close to the boxed structure, but its class ids do not say which structure that is. Give `classes`."
    )


def sam_mask_logits(
    sam_logits: torch.Tensor, image_size: int, grid: tuple[int, int], region: torch.Tensor
) -> torch.Tensor:
    """
    SAM's own mask of one image on `grid` (SAM's post-processing: upsample, crop to `region`, resize):
    `sam_logits` `(1, h, w)` -> `(1, H, W)`, or `(P, 1, h, w)` for several prompts -> `(P, 1, H, W)`.
    """
    rows = sam_logits.float().cpu()
    several = rows.ndim == 4
    rows = rows if several else rows[None]
    logits = sam_mask_on_grid(rows, image_size, grid, region.float().cpu().reshape(-1, 4)[:1].expand(len(rows), 4))
    return logits if several else logits[0]


def checked_output_size(size, name: str = "`output_size`") -> tuple[int, int]:
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


def overlay(
    image: np.ndarray | Image.Image,
    mask: np.ndarray,
    truth: np.ndarray | None = None,
    boxes=None,
    points=None,
    labels=None,
    class_colours: bool = False,
) -> Image.Image:
    """
    The one overlay: the image (resized to the mask's grid if needed) with the predicted `mask` tinted red and,
    when given, the ground truth `truth` (same grid) tinted green over it, and the prompts the mask came from, as
    `segment` takes them (in the image's own pixels, scaled here to the mask's grid): `boxes` `(4,)` or `(P, 4)`
    (x0, y0, x1, y1) outlined in cyan, `points` `(N, 2)` (x, y) as rings, cyan or, where `labels` is 0
    (background clicks), magenta.

    `class_colours=True` reads `mask` (and `truth`) as label maps of class ids (`label_map`): each class is tinted
    in its own colour (`CLASS_COLOURS`) and the truth drawn as each class's outline in that colour.
    """
    picture = (
        image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    )
    picture = picture.convert("RGB")
    scale = np.array([mask.shape[1] / picture.size[0], mask.shape[0] / picture.size[1]])
    if picture.size != (mask.shape[1], mask.shape[0]):
        picture = picture.resize((mask.shape[1], mask.shape[0]), Image.BILINEAR)
    array = np.asarray(picture).astype(np.float32)
    mask = np.asarray(mask)
    if class_colours:
        for class_id in np.unique(mask[mask > 0]):
            tinted = mask == class_id
            array[tinted] = 0.55 * array[tinted] + 0.45 * np.array(class_colour(class_id))
        truth = np.zeros(mask.shape, np.int64) if truth is None else np.asarray(truth)
        for class_id in np.unique(truth[truth > 0]):
            region = truth == class_id
            array[region & ~ndimage.binary_erosion(region)] = class_colour(class_id)  # the class's outline
    else:
        predicted = mask > 0
        array[predicted] = 0.55 * array[predicted] + 0.45 * np.array(PREDICTION_COLOUR)
        if truth is not None:
            true = np.asarray(truth) > 0
            array[true] = 0.7 * array[true] + 0.3 * np.array(TRUTH_COLOUR)
    boxes = overlay_prompts(boxes, 4, "boxes") * np.tile(scale, 2)
    points = overlay_prompts(points, 2, "points") * scale
    labels = [1] * len(points) if labels is None else list(labels)
    if len(labels) != len(points):
        raise ValueError(f"`labels`: {len(labels)} labels for {len(points)} points; give one per point.")
    picture = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(mask.shape) / 256))  # visible on a 1000-pixel image, not blotting a 64-pixel one
    for box in boxes:
        draw.rectangle(list(box), outline=PROMPT_COLOUR, width=width)
    for (x, y), label in zip(points, labels):
        colour = PROMPT_COLOUR if label else BACKGROUND_CLICK_COLOUR
        radius = 3 * width
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)
    return picture


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The colour of class `class_id` >= 1 in `overlay(..., class_colours=True)`."""
    return CLASS_COLOURS[(int(class_id) - 1) % len(CLASS_COLOURS)]


def label_map(probabilities: np.ndarray, class_ids: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """
    Several structures' probabilities `(P, h, w)` -> one uint8 label map of `size` (H, W): each pixel the class of
    the most probable prompt whose mask holds it (`IMedSamProcessor.merge_prompt_masks`), resized nearest-neighbour.
    """
    scores = np.where(probabilities > 0.5, probabilities, 0.0)  # probability > 0.5 is logit > 0: the masks
    merged = IMedSamProcessor.merge_prompt_masks(torch.from_numpy(scores)[:, None], list(class_ids)).numpy()
    return resize_labels(merged.astype(np.uint8), tuple(size))


def overlay_prompts(values, size: int, name: str) -> np.ndarray:
    """`overlay`'s `boxes` (size 4) or `points` (size 2) as a float array `(N, size)`; `(0, size)` for None."""
    try:
        array = np.zeros((0, size)) if values is None else np.asarray(values, dtype=float)
        if array.ndim not in (1, 2) or array.shape[-1] != size or not np.isfinite(array).all():
            raise ValueError
        array = array.reshape(-1, size)
        if size == 4 and ((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])).any():
            raise ValueError
    except (TypeError, ValueError):
        shape = "(x0, y0, x1, y1) with x0 <= x1, y0 <= y1, or a list of them" if size == 4 else "a list of (x, y)"
        raise ValueError(f"`{name}` must be {shape}, finite, in the image's pixels, got {values!r}.") from None
    return array


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


__all__ = [
    "MAX_OUTPUT_PIXELS",
    "MAX_PIXELS",
    "Segmentation",
    "check_output_budget",
    "checked_input_classes",
    "checked_output_size",
    "class_colour",
    "classes_caveat",
    "clicks_caveat",
    "fitted_grid",
    "label_map",
    "overlay",
    "sam_mask_fallback",
    "sam_mask_logits",
    "segment",
    "structure_id",
]
