"""The publishing form: a trained PEFT model saved as one complete, self-contained checkpoint."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from .convert_litemedsam import LITEMEDSAM
from .files import share_weights
from .frequency_adapter import imedsam_peft_config
from .model_card import hub_id_or_none, write_adapter_card
from .modeling_imedsam import IMedSamModel
from .processing_imedsam import IMedSamProcessor

PUBLISHED_ADAPTER_NAME = "default"


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


def export_full_model(peft_model: PeftModel) -> IMedSamModel:
    """
    A standalone `IMedSamModel` equal to `peft_model` (active adapter): the adapter layers built in from
    `config.adapter_config` (the adapter's settings, `FrequencyAdapterSettings`) and the trained `modules_to_save`
    copies in place of the originals. Its outputs are identical to the PEFT model's, and `save_pretrained` /
    `AutoModel.from_pretrained` round-trip it. Its config's `implicit_decoder_trained` says whether the decoder was
    trained (`implicit_decoder_trained(peft_model)`), so that a training run's output is used as trained.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}.")
    adapter_name = peft_model.active_adapter
    peft_config = peft_model.peft_config[adapter_name]
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    config.adapter_config = peft_config.settings_dict()
    config.trained_modules = list(peft_config.modules_to_save or [])
    # Training's one save path records whether the decoder it publishes was trained (or came trained).
    config.implicit_decoder_trained = implicit_decoder_trained(peft_model)
    if config.base_model is None and peft_config.base_model_name_or_path:
        config.base_model = portable_model_name(peft_config.base_model_name_or_path)
    model = IMedSamModel(config).to(device=base.device, dtype=base.dtype)
    state = {}
    for key, value in base.state_dict().items():
        if ".original_module." in key:
            continue
        key = key.replace(f".modules_to_save.{adapter_name}.", ".")
        # Adapter tensors are keyed by adapter name: `...freq_adapter.<name>.0.weight`, `...freq_gate.<name>`.
        key = re.sub(rf"(\.freq_[A-Za-z_]+)\.{re.escape(adapter_name)}(\.|$)", rf"\1.{PUBLISHED_ADAPTER_NAME}\2", key)
        state[key] = value
    model.load_state_dict(state, strict=True)
    model.train(base.training)
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """
    What a fine-tune trained, the shipped and checkpointed form: every trainable parameter of `model` (a PEFT model)
    and the running statistics of trainable BatchNorm layers, on the CPU, by their PEFT names.
    """
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    modules = {n.rpartition(".")[0] for n in names}
    state = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key in names or (
            owner in modules and key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        ):
            state[key] = value.detach().cpu().contiguous()
    return state


def _published_key(key: str, adapter_name: str) -> str:
    """A PEFT model's state key -> the key of its published full model (`export_full_model`'s renaming)."""
    key = key.removeprefix("base_model.model.")
    key = key.replace(f".modules_to_save.{adapter_name}.", ".").replace(".original_module.", ".")
    return re.sub(rf"(\.freq_[A-Za-z_]+)\.{re.escape(adapter_name)}(\.|$)", rf"\1.{PUBLISHED_ADAPTER_NAME}\2", key)


def wrap_for_training(base: IMedSamModel, adapter_settings: dict, trained_modules: list[str] | None) -> PeftModel:
    """`base` wrapped in the I-MedSAM adapter with the given settings and trained modules (none by default)."""
    recipe = imedsam_peft_config(base.config, **adapter_settings)
    if trained_modules is not None:
        recipe.modules_to_save = list(trained_modules)
    return get_peft_model(base, recipe)


def peft_model_from_full(full: IMedSamModel) -> PeftModel:
    """
    The inverse of `export_full_model`: the PEFT model a published full model (one with `adapter_config`) was
    exported from, its backbone frozen and exactly the adapters and modules the fine-tune trained trainable
    (`config.trained_modules`), every weight as published. Fine-tuning it trains what the first fine-tune trained.
    The frozen copies PEFT keeps of the trained modules (`original_module`) hold the published weights too: for the
    zero-shot backbone load `config.base_model` (`evaluation.load_baseline`), not `disable_adapter()`.
    """
    config = copy.deepcopy(full.config)
    settings = dict(config.adapter_config or {})
    if not settings:
        raise ValueError("the model has no `adapter_config`: it is not a published fine-tune.")
    config.adapter_config = None
    base = IMedSamModel(config).to(device=full.device, dtype=full.dtype)
    peft_model = wrap_for_training(base, settings, config.trained_modules)
    published = full.state_dict()
    name = peft_model.active_adapter
    state = {key: published[_published_key(key, name)] for key in peft_model.state_dict()}
    peft_model.load_state_dict(state, strict=True)
    return peft_model


def save_pretrained_full(
    peft_model: PeftModel,
    save_directory: str | os.PathLike,
    processor: IMedSamProcessor | None = None,
    **kwargs,
) -> IMedSamModel:
    """
    Save the publishing form of a trained model into `save_directory`:

    - at the root, the complete model as `IMedSamModel.save_pretrained` writes it (config.json with `auto_map`,
      model.safetensors, the modeling files, the processor and the model card): `AutoModel.from_pretrained(dir)`
      after `import imedsam_hf`, or with `trust_remote_code=True` without it;
    - in `adapter/`, the adapter-only form (`PeftModel.from_pretrained(base, dir, subfolder="adapter")`) with its
      own card. It is never at the root: an `adapter_config.json` there would make AutoModel load the base model.

    Extra keyword arguments go to `save_pretrained` (e.g. `max_shard_size`).
    """
    model = export_full_model(peft_model)
    if processor is not None:
        processor.save_pretrained(save_directory)
    model.save_pretrained(save_directory, **kwargs)
    adapter_dir = os.path.join(save_directory, "adapter")
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    recorded = peft_config.base_model_name_or_path
    # A portable name (`litemedsam`, a Hub id), never this machine's path.
    peft_config.base_model_name_or_path = model.config.base_model or recorded
    try:
        # No embedding layer is adapted; "auto" would look the base model's name up on the Hub.
        peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    finally:
        peft_config.base_model_name_or_path = recorded
    write_adapter_card(adapter_dir, model.config)
    share_weights(save_directory)
    return model


__all__ = [
    "PUBLISHED_ADAPTER_NAME",
    "export_full_model",
    "implicit_decoder_trained",
    "peft_model_from_full",
    "portable_model_name",
    "save_pretrained_full",
    "trainable_state",
    "wrap_for_training",
]
