"""`FrequencyAdapterConfig`: the PEFT configuration of I-MedSAM's two parameter-efficient branches."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from peft import PeftConfig
from peft.utils.constants import DUMMY_TARGET_MODULES

from ..configuration_imedsam import ADAPTER_SETTINGS, RECIPE_FIELDS, FrequencyAdapterSettings

# The `peft_type` written into adapter_config.json. peft looks it up in a plain dict, so without this package the
# load fails with `KeyError: '<this string>'`: the string itself says what to do. Adapters saved before carry
# "FREQ_ADAPTER"; both are registered.
SAVED_PEFT_TYPE = "FREQ_ADAPTER (the I-MedSAM adapter type: pip install git+https://github.com/imedsam-hf/imedsam-hf, then import imedsam_hf)"


class IMedSamPeftType(str, enum.Enum):
    """PEFT types added by imedsam_hf (peft's own `PeftType` cannot be extended)."""

    FREQ_ADAPTER = "FREQ_ADAPTER"


@dataclass
class FrequencyAdapterConfig(FrequencyAdapterSettings, PeftConfig):
    """
    Configuration of the frequency-adapter PEFT type: the settings of the one schema, `FrequencyAdapterSettings`
    (inherited, never copied), plus PEFT's own fields. PEFT allows one adapter type per model, so both branches
    (LoRA on q/v and the frequency adapter) live in this one type.
    """

    target_modules: str | None = field(
        default=None, metadata={"help": "Derived from the four role patterns; leave unset."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter (I-MedSAM: prompt encoder, "
            "mask-decoder upscaling, implicit decoder)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = IMedSamPeftType.FREQ_ADAPTER
        self.check_settings()
        patterns = []
        if self.use_frequency_adapter:
            patterns += [self.tokenizer_module, self.fusion_target_modules, self.downsample_target_modules]
        if self.use_lora:
            patterns.append(self.lora_target_modules)
        # Both branches off: no adapter layer, only `modules_to_save` train (e.g. a MedSAM-style decoder fine-tune);
        # PEFT's dummy target says so instead of failing on a pattern that matches nothing.
        self.target_modules = "|".join(f"(?:{p})" for p in patterns if p) or DUMMY_TARGET_MODULES

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["peft_type"] = SAVED_PEFT_TYPE
        return values


def imedsam_peft_config(
    model_config, train_mask_decoder: bool | str = False, **overrides: Any
) -> FrequencyAdapterConfig:
    """
    The I-MedSAM recipe for a model configuration: the adapter of `model_config.adapter_recipe()` (LoRA on q and
    v, the frequency adapter, honouring the ablation switches), and full training of the prompt encoder's
    point/box embeddings, the mask decoder's output upscaling and the implicit decoder.

    `train_mask_decoder=True` trains the whole mask decoder instead of its upscaling; with `use_lora` and
    `use_frequency_adapter` off that is a MedSAM-style fine-tune (frozen image encoder, no adapter layer).
    `train_mask_decoder="transformer"` adds the two-way transformer (the part that reads the box) to the upscaling.
    `overrides` are schema settings (`lora_rank=8`) or PEFT fields (`modules_to_save=[...]`).
    `peft.get_peft_model(model, imedsam_peft_config(model.config))` is the whole set-up.
    """
    num_point_embeddings = model_config.prompt_encoder_config.num_point_embeddings
    modules_to_save = [f"prompt_encoder.point_embed.{i}" for i in range(num_point_embeddings)] + [
        "prompt_encoder.not_a_point_embed",
        "prompt_encoder.no_mask_embed",
    ]
    if train_mask_decoder not in (False, True, "transformer"):
        raise ValueError(f"train_mask_decoder: true, false or 'transformer', got {train_mask_decoder!r}.")
    if train_mask_decoder is True:
        modules_to_save.append("mask_decoder")
    else:
        if train_mask_decoder == "transformer":
            modules_to_save.append("mask_decoder.transformer")
        modules_to_save += [
            "mask_decoder.upscale_conv1",
            "mask_decoder.upscale_layer_norm",
            "mask_decoder.upscale_conv2",
        ]
    if model_config.use_implicit_decoder:
        modules_to_save.append("implicit_decoder")
    # A recipe field's IMedSamConfig name (frequency_chain) is accepted for its schema name (chain).
    overrides = {RECIPE_FIELDS.get(key, key): value for key, value in overrides.items()}
    known = {f.name for f in fields(FrequencyAdapterConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown adapter setting(s) {unknown}: use the schema's names {list(ADAPTER_SETTINGS)} (or their "
            f"IMedSamConfig names {list(RECIPE_FIELDS)}), a PEFT field such as modules_to_save, or train_mask_decoder."
        )
    settings = {k: v for k, v in overrides.items() if k in ADAPTER_SETTINGS}
    peft_fields = {
        "modules_to_save": modules_to_save,
        **{k: v for k, v in overrides.items() if k not in ADAPTER_SETTINGS},
    }
    tied = [name for name in peft_fields["modules_to_save"] or () if "prompt_encoder.shared_embedding".startswith(name)]
    if tied:
        raise ValueError(
            f"modules_to_save {tied}: the prompt encoder's positional embedding is shared with the image's "
            "(`shared_image_embedding`); a trained copy would no longer match it. List the prompt encoder's "
            "embeddings instead (prompt_encoder.point_embed.0, ..., prompt_encoder.no_mask_embed)."
        )
    recipe = model_config.adapter_recipe(**settings).settings_dict()
    return FrequencyAdapterConfig(**recipe, **peft_fields)


__all__ = ["FrequencyAdapterConfig", "IMedSamPeftType", "SAVED_PEFT_TYPE", "imedsam_peft_config"]
