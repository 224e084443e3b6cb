"""The publishing form: a trained PEFT model saved as one complete, self-contained checkpoint."""

from __future__ import annotations

import copy
import os
import re

from peft import PeftModel

from .loading import implicit_decoder_trained, portable_model_name
from .model_card import write_adapter_card
from .modeling_imedsam import IMedSamModel
from .processing_imedsam import IMedSamProcessor

PUBLISHED_ADAPTER_NAME = "default"


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
    return model


def save_processor(processor: IMedSamProcessor, save_directory: str | os.PathLike) -> None:
    """`processor.save_pretrained(save_directory)` (which writes its code and `auto_map`), under its 0.1 name."""
    processor.save_pretrained(save_directory)


__all__ = ["PUBLISHED_ADAPTER_NAME", "export_full_model", "save_pretrained_full", "save_processor"]
