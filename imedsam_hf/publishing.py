"""The publishing form: a trained PEFT model saved as one complete, self-contained checkpoint."""

from __future__ import annotations

import copy
import os
import re

from peft import PeftModel

from .modeling_imedsam import IMedSamModel
from .processing_imedsam import IMedSamProcessor, processor_for_config

ADAPTER_SETTINGS = (
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_frequency_adapter",
    "adapter_dim",
    "fusion_scale",
    "fusion_gate",
    "spectrum",
    "spectrum_log_scale",
    "tokenizer_module",
    "fusion_target_modules",
    "lora_target_modules",
    "downsample_target_modules",
)
PUBLISHED_ADAPTER_NAME = "default"


def export_full_model(peft_model: PeftModel) -> IMedSamModel:
    """
    A standalone `IMedSamModel` equal to `peft_model` (active adapter): the adapter layers built in from
    `config.adapter_config` and the trained `modules_to_save` copies in place of the originals. Its outputs are
    identical to the PEFT model's, and `save_pretrained` / `AutoModel.from_pretrained` round-trip it.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}.")
    adapter_name = peft_model.active_adapter
    peft_config = peft_model.peft_config[adapter_name]
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    config.adapter_config = {key: getattr(peft_config, key) for key in ADAPTER_SETTINGS}
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


def save_pretrained_full(
    peft_model: PeftModel,
    save_directory: str | os.PathLike,
    processor: IMedSamProcessor | None = None,
    **kwargs,
) -> IMedSamModel:
    """
    Save the publishing form of a trained model into `save_directory`:

    - at the root, the complete model (config.json with `auto_map`, model.safetensors and the modeling files):
      `AutoModel.from_pretrained(dir)` after `import imedsam_hf`, or with `trust_remote_code=True` without it;
    - `preprocessor_config.json` (the given processor, or the one matching the model config), loadable with
      `AutoProcessor` in the same two ways;
    - in `adapter/`, the adapter-only form (`PeftModel.from_pretrained(base, dir, subfolder="adapter")`). It is
      never at the root: an `adapter_config.json` there would make AutoModel load the base model instead.

    Extra keyword arguments go to `save_pretrained` (e.g. `safe_serialization`, `max_shard_size`).
    """
    model = export_full_model(peft_model)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(save_directory, **kwargs)
    save_processor(processor or processor_for_config(model.config), save_directory)
    peft_model.save_pretrained(os.path.join(save_directory, "adapter"))
    return model


def save_processor(processor: IMedSamProcessor, save_directory: str | os.PathLike) -> None:
    """Save the processor with its code and `auto_map`, so `AutoProcessor` loads it with or without the package."""
    processor.register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(save_directory)
