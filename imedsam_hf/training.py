"""Pieces of the training recipe shared by `training/train.py`, the tests and the benchmarks: losses, point
sampling, parameter groups and the training step's forward and loss. No model loading here (see `loading`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_write
from .modeling_imedsam import IMedSamOutput
from .runtime import encoder_fingerprint


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids `(B, H, W)` -> float targets `(B, C, H, W)` for classes 1..C."""
    classes = torch.arange(1, num_classes + 1, device=labels.device)
    return (labels[:, None] == classes[None, :, None, None]).float()


def dice_bce(
    logits: torch.Tensor, targets: torch.Tensor, dice_weight: float = 0.8, bce_weight: float = 0.2
) -> torch.Tensor:
    """Soft Dice (per image and class, then averaged) + BCE, on `(B, C, N)` or `(B, C, H, W)` tensors."""
    logits, targets = logits.flatten(2).float(), targets.flatten(2).float()
    probabilities = logits.sigmoid()
    intersection = (probabilities * targets).sum(-1)
    dice = 1 - (2 * intersection + 1) / (probabilities.sum(-1) + targets.sum(-1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    return dice_weight * dice.mean() + bce_weight * bce


def segmentation_loss(
    outputs: IMedSamOutput,
    labels: torch.Tensor,
    num_classes: int,
    fine_weight: float = 1.0,
    dice_weight: float = 0.8,
    bce_weight: float = 0.2,
    composition: str = "project",
) -> tuple[torch.Tensor, dict[str, float]]:
    """
    The training loss. Without the implicit decoder: `dice_weight` Dice + `bce_weight` BCE on SAM's upsampled mask.
    With it, by `composition`:

    - `"project"` (this project's default): Dice + BCE on the coarse prediction (every point, weight 1) plus
      `fine_weight` times Dice + BCE on the fine prediction at the refined points only.
    - `"released"` (the released I-MedSAM code's `main.py`): Dice only (its cross-entropy term is exactly 0 in the
      MONAI it pins, for one channel), `(1 - a) Dice(coarse) + a Dice(output)` where the output is the coarse map
      with the refined points overwritten and `a` is `fine_weight` (`fine_weight_at`, 5 warm-up epochs there), so the
      coarse term drops out once the warm-up ends. `dice_weight` and `bce_weight` are not used.

    Args:
        outputs: model outputs on the `(S, S)` frame. labels: `(B, S, S)` class ids.
    """
    if composition not in LOSS_COMPOSITIONS:
        raise ValueError(f"`composition` must be one of {LOSS_COMPOSITIONS}, got {composition!r}.")
    targets = one_hot_targets(labels, num_classes)
    if outputs.coarse_logits is not None and composition == "released":
        coarse = dice_bce(outputs.coarse_logits, targets, 1.0, 0.0)
        merged = dice_bce(outputs.logits, targets, 1.0, 0.0)
        loss = (1 - fine_weight) * coarse + fine_weight * merged
        return loss, {"loss": loss.item(), "coarse_loss": coarse.item(), "fine_loss": merged.item()}
    if outputs.coarse_logits is None:
        loss = dice_bce(outputs.logits, targets, dice_weight, bce_weight)
        return loss, {"loss": loss.item()}
    coarse = dice_bce(outputs.coarse_logits, targets, dice_weight, bce_weight)
    refined = outputs.refined.flatten(1)
    if not refined.any():  # refine_ratio 0 (an ablation): the coarse prediction is the output
        return coarse, {"loss": coarse.item(), "coarse_loss": coarse.item(), "fine_loss": 0.0}
    # Every image has the same number of refined points (per-image top-k), so they stack into (B, C, k).
    index = refined.nonzero()[:, 1].reshape(refined.shape[0], -1)
    gather = index[:, None].expand(-1, num_classes, -1)
    fine_logits = outputs.logits.flatten(2).gather(2, gather)
    fine_targets = targets.flatten(2).gather(2, gather)
    fine = dice_bce(fine_logits, fine_targets, dice_weight, bce_weight)
    loss = coarse + fine_weight * fine
    return loss, {"loss": loss.item(), "coarse_loss": coarse.item(), "fine_loss": fine.item()}


def sample_points(
    labels: torch.Tensor,
    reshaped_sizes: torch.Tensor,
    num_points: int,
    generator: torch.Generator | None = None,
    boxes: torch.Tensor | None = None,
    box_fraction: float = 0.0,
    box_margin: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Random query points inside each image's unpadded area, with their labels (nearest pixel).

    An implicit decoder can be trained on sampled coordinates instead of the whole grid: the cost of a step no
    longer grows with the frame's area, and points fall between pixels, which is what a resolution-free decoder
    must learn. Uniform points over the image give a structure points in proportion to its area: an adrenal gland
    of 15x15 pixels in a 256x256 frame gets about 7 of 2048. With `boxes` and `box_fraction` f > 0, round(f * N) of
    each prompt's points are drawn uniformly inside its box widened by `box_margin` of the box's size on each side
    (clipped to the image), where the structure and its boundary are, and the rest over the whole image.

    Args:
        labels: `(B, S, S)` class ids in the frame. reshaped_sizes: `(B, 2)` (h, w) of each image in the frame.
        boxes: `(B, 4)` or `(B, P, 4)` prompt boxes (x0, y0, x1, y1) in frame pixels (with `box_fraction`).

    Returns:
        coordinates `(B, N, 2)` (x, y) in [0, 1] of the frame and labels `(B, 1, N)`; with `(B, P, 4)` boxes and
        `box_fraction` > 0, each prompt's own: `(B, P, N, 2)` and `(B, P, 1, N)`.
    """
    batch_size, size = labels.shape[0], labels.shape[-1]
    extent = reshaped_sizes.flip(-1).to(torch.float32).cpu() / size  # (w, h) / S
    per_prompt = boxes is not None and box_fraction > 0 and boxes.ndim == 3
    prompts = boxes.shape[1] if per_prompt else 1
    unit = torch.rand(batch_size, prompts, num_points, 2, generator=generator)
    coordinates = unit * extent[:, None, None, :]
    in_box = int(round(box_fraction * num_points)) if boxes is not None else 0
    if in_box:
        frame_boxes = boxes.detach().float().cpu().reshape(batch_size, -1, 4)[:, :prompts] / size
        low, high = frame_boxes[..., :2], frame_boxes[..., 2:]
        widen = box_margin * (high - low)
        low = torch.maximum(low - widen, torch.zeros(()))
        high = torch.minimum(high + widen, extent[:, None, :].expand_as(high))
        high = torch.maximum(high, low)  # a degenerate box: its corner
        coordinates[:, :, :in_box] = low[:, :, None] + unit[:, :, :in_box] * (high - low)[:, :, None]
    pixels = (coordinates * size).long().clamp(0, size - 1)
    flat = (pixels[..., 1] * size + pixels[..., 0]).to(labels.device)
    point_labels = labels.flatten(1).gather(1, flat.flatten(1)).reshape(batch_size, prompts, 1, num_points)
    coordinates = coordinates.to(labels.device)
    if per_prompt:
        return coordinates, point_labels
    return coordinates[:, 0], point_labels[:, 0]


LOSS_COMPOSITIONS = ("project", "released")


def anneal_coordinates(model: torch.nn.Module, epoch: float, annealing_epochs: float) -> float:
    """
    Coordinate annealing (the released code's `epoch_T`): over the first `annealing_epochs` epochs the implicit
    decoders' positional code switches its octaves on from low to high, a fraction min((epoch + 1) / N, 1) of them
    (every copy, e.g. PEFT's trained copy of the decoder); 0 epochs: all on. Returns the fraction.
    """
    fraction = 1.0 if annealing_epochs <= 0 else min((epoch + 1) / annealing_epochs, 1.0)
    for module in model.modules():
        if hasattr(module, "frequency_fraction") and hasattr(module, "encode_coordinates"):
            module.frequency_fraction = fraction
    return fraction


def fine_weight_at(epoch: float, warmup_epochs: float) -> float:
    """The fine term's weight: min((epoch + 1) / warmup, 1), as the released code (0 warm-up: always 1)."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


@dataclass
class LossWeights:
    """Weights of the loss terms (see `segmentation_loss`)."""

    dice_weight: float = 0.8
    bce_weight: float = 0.2
    fine_weight: float = 1.0
    composition: str = "project"  # or "released" (see `segmentation_loss`)


def unwrapped(model: torch.nn.Module, attribute: str) -> torch.nn.Module | None:
    """The outermost of `model` and the models it wraps (DDP's `.module`, `torch.compile`'s `._orig_mod`) that has
    `attribute` (a PEFT model has its base model's), or None."""
    while not hasattr(model, attribute):
        inner = getattr(model, "module", None)
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model


def model_config(model: torch.nn.Module):
    """A model's config, through the wrappers that hide it (DDP's `.module`, `torch.compile`'s `._orig_mod`)."""
    model = unwrapped(model, "config")
    return None if model is None else model.config


def forward_and_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    num_classes: int,
    weights: LossWeights | None = None,
    train_points: int | None = None,
    use_box_prompts: bool = True,
    generator: torch.Generator | None = None,
    click_probability: float = 0.0,
    box_point_fraction: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """
    The training step's forward and loss, shared by `training/train.py` and `benchmarks/training_step.py` (the
    caller does backward and the optimizer step, e.g. under `accelerator.accumulate`).

    Args:
        batch: `pixel_values` `(B, 3, S, S)` (or `image_embeddings`, `FrozenImageEncoder`), `labels` `(B, S, S)` class ids, `reshaped_size` `(B, 2)` and, for box
            prompts, `input_boxes` `(B, 4)` (as `imedsam_hf.data.collate` gives them). Samples with every class as a
            prompt carry `input_boxes` `(B, P, 4)` and `prompt_classes` `(B, P)` (0: padding): each prompt's target
            is its class's mask, and the loss is averaged over the real prompts (one encoder pass per image). With
            `num_classes > 1` the prompts are class-aware (`input_classes`): each uses its own class's heads.
        train_points: with an implicit decoder, train on this many random points per image inside its unpadded
            area (`sample_points`) instead of the whole frame; `None`/0: the whole frame.
        use_box_prompts: `False` trains prompt-free.
        click_probability: with batches that carry clicks (`DataConfig.max_clicks`), the chance that this step is
            prompted with the clicks instead of the boxes (one coin per step, from `generator` or the global RNG).
        box_point_fraction: with `train_points` and box prompts, the share of each prompt's points drawn inside its
            (widened) box instead of over the whole image (`sample_points`), so small structures get their share.
    """
    weights = weights or LossWeights()
    labels, coordinates = batch["labels"], None
    per_prompt = "prompt_classes" in batch and use_box_prompts
    if train_points and getattr(model_config(model), "use_implicit_decoder", False):
        boxes = batch.get("input_boxes") if use_box_prompts and box_point_fraction > 0 else None
        coordinates, labels = sample_points(
            labels, batch["reshaped_size"], train_points, generator, boxes=boxes, box_fraction=box_point_fraction
        )
    # A multi-class model trained on prompts of one class each is class-aware: each prompt uses its class's heads.
    class_aware = per_prompt and num_classes > 1
    clicks = {}
    if use_box_prompts and "input_points" in batch and click_probability > 0:
        if torch.rand(1, generator=generator).item() < click_probability:
            clicks = {"input_points": batch["input_points"], "input_labels": batch["input_labels"]}
    outputs = model(
        **image_inputs(batch),
        input_boxes=batch["input_boxes"] if use_box_prompts and not clicks else None,
        query_coordinates=coordinates,
        input_classes=batch["prompt_classes"].clamp(1, num_classes) if class_aware else None,
        **clicks,
    )
    if per_prompt:
        outputs, labels = prompt_rows(outputs, labels, batch["prompt_classes"], labels_per_prompt=labels.ndim == 4)
        num_classes = 1  # each prompt's target is its own class's mask
    return segmentation_loss(
        outputs, labels, num_classes, weights.fine_weight, weights.dice_weight, weights.bce_weight, weights.composition
    )


def image_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's image input of a batch: its `image_embeddings` (`FrozenImageEncoder`) or its `pixel_values`."""
    if "image_embeddings" in batch:
        return {"image_embeddings": batch["image_embeddings"]}
    return {"pixel_values": batch["pixel_values"]}


class FrozenImageEncoder:
    """
    Batches with the image encoder frozen (`training/train.py --freeze-image-encoder`): the encoder, with its
    adapters as they are, runs in eval mode without gradients, so a step trains the prompt side only (the prompt
    encoder, SAM's mask decoder where it is trained, the implicit decoder) and skips the encoder's backward.

    With `cache`, each image's embeddings are computed once and kept, under `key(sample index)` (samples of one
    image may share a key): right only when a sample's pixels are the same every time (no augmentation), which the
    caller guarantees. The encoder's parameters get no gradient, so AdamW leaves them as they are.

    With `cache_dir` (and `cache`), the embeddings are also kept on disk, one safetensors file per image, in a
    folder named by `runtime.encoder_fingerprint` (the encoder's weights, adapters and their settings) and files named
    by a hash of the image's pixels (and autocast's dtype), written with `files.atomic_write`, so a resumed run or
    another run on the same encoder and images reads them instead of encoding again; a file that does not read is
    encoded again and rewritten. `hits` and `encoded` count images read from disk and encoded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: bool,
        key: Callable[[int], Hashable] = int,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if cache_dir is not None and not cache:
            raise ValueError("an embedding cache on disk needs cache=True (the same pixels every time)")
        self.model, self.key = model, key
        self.cache: dict[Hashable, torch.Tensor] | None = {} if cache else None
        self._cache_root = None if cache_dir is None else Path(cache_dir)
        self._cache_dir: Path | None = None
        self.hits = self.encoded = 0

    @property
    def cache_dir(self) -> Path | None:
        """The folder of this encoder's files, named on first use (after a resumed run has loaded its weights)."""
        if self._cache_root is not None and self._cache_dir is None:
            self._cache_dir = self._cache_root / encoder_fingerprint(unwrapped(self.model, "encode_image"))[:16]
        return self._cache_dir

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = unwrapped(self.model, "encode_image")
        encoder = model.vision_encoder
        modes = {module: module.training for module in encoder.modules()}  # frozen BatchNorm stays in eval
        encoder.eval()
        try:
            with torch.no_grad():
                return model.encode_image(pixel_values)
        finally:
            for module, training in modes.items():
                module.training = training

    def _file(self, pixels: torch.Tensor) -> Path:
        """The cache file of one image's pixels `(3, S, S)`."""
        device = pixels.device.type
        autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "none"
        digest = hashlib.sha256(f"{tuple(pixels.shape)} {pixels.dtype} {autocast}".encode())
        digest.update(pixels.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return self.cache_dir / f"{digest.hexdigest()[:32]}.safetensors"

    def _read(self, file: Path, device: torch.device) -> torch.Tensor | None:
        try:
            return load_file(file, device=str(device))["image_embeddings"]
        except (OSError, SafetensorError, KeyError):  # absent or damaged: encode again
            return None

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        `batch` with `pixel_values` `(B, 3, S, S)` and `index` `(B,)` -> the same batch with `image_embeddings`
        `(B, hidden_size, h, w)` in place of `pixel_values`.
        """
        batch = dict(batch)
        pixel_values = batch.pop("pixel_values")
        if self.cache is None:
            batch["image_embeddings"] = self._encode(pixel_values)
            return batch
        keys = [self.key(int(i)) for i in batch["index"].tolist()]
        missing: dict[Hashable, int] = {}  # key -> the first row holding it
        for row, key in enumerate(keys):
            if key not in self.cache:
                missing.setdefault(key, row)
        files: dict[Hashable, Path] = {}
        if self.cache_dir is not None:
            for key, row in list(missing.items()):
                files[key] = self._file(pixel_values[row])
                embedding = self._read(files[key], pixel_values.device)
                if embedding is not None:
                    self.cache[key] = embedding
                    self.hits += 1
                    del missing[key]
        if missing:
            rows = list(missing.values())
            for key, embedding in zip(missing, self._encode(pixel_values[rows])):
                self.cache[key] = embedding
                if key in files:
                    tensors = {"image_embeddings": embedding.detach().contiguous().cpu()}
                    atomic_write(files[key], lambda path, tensors=tensors: save_file(tensors, path))
            self.encoded += len(rows)
        batch["image_embeddings"] = torch.stack([self.cache[key] for key in keys])
        return batch


def prompt_rows(
    outputs: IMedSamOutput, labels: torch.Tensor, prompt_classes: torch.Tensor, labels_per_prompt: bool = False
) -> tuple[IMedSamOutput, torch.Tensor]:
    """
    Outputs with a prompt axis `(B, P, ...)` and class-id labels `(B, ...)` (or each prompt's own, `(B, P, ...)`,
    with `labels_per_prompt`) -> one row per real prompt (class id not 0) with its binary target `(rows, ...)`:
    what `segmentation_loss` takes for a one-class model.
    """
    real = prompt_classes.flatten() != 0
    if not labels_per_prompt:
        labels = labels[:, None]
    classes = prompt_classes.reshape(*prompt_classes.shape, *[1] * (labels.ndim - 2))
    targets = (labels == classes).long()
    rows = {
        name: getattr(outputs, name).flatten(0, 1)[real]
        for name in ("logits", "coarse_logits", "refined")
        if getattr(outputs, name) is not None
    }
    return IMedSamOutput(**rows), targets.flatten(0, 1)[real]


def parameter_groups(
    model: torch.nn.Module,
    learning_rate: float,
    implicit_learning_rate: float,
    weight_decay: float,
    mask_decoder_learning_rate: float | None = None,
):
    """
    AdamW groups: the implicit decoder at its own (higher) learning rate, every other trainable tensor at
    `learning_rate`; with `mask_decoder_learning_rate`, the trained parts of SAM's mask decoder other than its output
    upscaling (the two-way transformer, tokens, hypernetworks) at that (usually lower) rate.
    """
    implicit, decoder, other = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "implicit_decoder" in name:
            implicit.append(parameter)
        elif mask_decoder_learning_rate is not None and "mask_decoder" in name and ".upscale_" not in name:
            decoder.append(parameter)
        else:
            other.append(parameter)
    groups = [{"params": other, "lr": learning_rate, "weight_decay": weight_decay}]
    if decoder:
        groups.append({"params": decoder, "lr": mask_decoder_learning_rate, "weight_decay": weight_decay})
    if implicit:
        groups.append({"params": implicit, "lr": implicit_learning_rate, "weight_decay": weight_decay})
    return groups


__all__ = [
    "FrozenImageEncoder",
    "LossWeights",
    "dice_bce",
    "fine_weight_at",
    "forward_and_loss",
    "model_config",
    "one_hot_targets",
    "prompt_rows",
    "parameter_groups",
    "sample_points",
    "segmentation_loss",
]
