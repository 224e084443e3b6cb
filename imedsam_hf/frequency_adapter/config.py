"""`FrequencyAdapterConfig`: the PEFT configuration of I-MedSAM's two parameter-efficient branches."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft import PeftConfig

from ..modeling_frequency_adapter import TINYVIT_TARGETS, VIT_TARGETS


class IMedSamPeftType(str, enum.Enum):
    """PEFT types added by imedsam_hf (peft's own `PeftType` cannot be extended)."""

    FREQ_ADAPTER = "FREQ_ADAPTER"


@dataclass
class FrequencyAdapterConfig(PeftConfig):
    """
    Configuration of the frequency-adapter PEFT type: rank-r LoRA on q and v of every fused `qkv` projection and a
    chained frequency adapter (FA) per encoder block fed by the image spectrum (I-MedSAM, section 3.2). PEFT allows
    one adapter type per model, so both branches live in this one type.
    """

    use_lora: bool = field(default=True, metadata={"help": "Add LoRA on q and v of each fused qkv projection."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA scaling numerator (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    use_frequency_adapter: bool = field(default=True, metadata={"help": "Add the frequency-adapter chain."})
    adapter_dim: int = field(default=4, metadata={"help": "Bottleneck width of each frequency adapter."})
    fusion_scale: float = field(default=0.5, metadata={"help": "Weight of the frequency tokens added to each block."})
    fusion_gate: bool = field(
        default=False,
        metadata={"help": "Learn a per-block gate (tanh, starting at 0) on the fusion weight instead of fixing it."},
    )
    spectrum: str = field(default="amplitude", metadata={"help": "'amplitude' or 'phase' of the centred FFT."})
    spectrum_log_scale: bool = field(default=True, metadata={"help": "log1p-compress the amplitude spectrum."})
    tokenizer_module: str = field(
        default=VIT_TARGETS["tokenizer_module"], metadata={"help": "Full name of the encoder's patch embedding."}
    )
    fusion_target_modules: str = field(
        default=VIT_TARGETS["fusion_target_modules"],
        metadata={"help": "Regex (full match) of the modules after whose output the frequency tokens are added."},
    )
    lora_target_modules: str = field(
        default=VIT_TARGETS["lora_target_modules"], metadata={"help": "Regex of the fused qkv projections."}
    )
    downsample_target_modules: str | None = field(
        default=None, metadata={"help": "Regex of a hierarchical encoder's downsampling modules (TinyViT)."}
    )
    target_modules: str | None = field(
        default=None, metadata={"help": "Derived from the four role patterns above; leave unset."}
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
        if not (self.use_lora or self.use_frequency_adapter):
            raise ValueError("`use_lora` and `use_frequency_adapter` are both False: the adapter would be empty.")
        if self.spectrum not in ("amplitude", "phase"):
            raise ValueError(f"`spectrum` must be 'amplitude' or 'phase', got {self.spectrum!r}.")
        if self.lora_rank < 1 or self.adapter_dim < 1:
            raise ValueError(f"`lora_rank` ({self.lora_rank}) and `adapter_dim` ({self.adapter_dim}) must be >= 1.")
        patterns = []
        if self.use_frequency_adapter:
            patterns += [self.tokenizer_module, self.fusion_target_modules, self.downsample_target_modules]
        if self.use_lora:
            patterns.append(self.lora_target_modules)
        self.target_modules = "|".join(f"(?:{p})" for p in patterns if p)


def imedsam_peft_config(model_config, **overrides) -> FrequencyAdapterConfig:
    """
    The I-MedSAM recipe for a model configuration: LoRA (rank `lora_rank`) on q and v, the frequency adapter,
    and full training of the prompt encoder's point/box embeddings, the mask decoder's output upscaling and the
    implicit decoder. The ablation switches of `model_config` (`use_lora`, `use_frequency_adapter`) are honoured.

    `peft.get_peft_model(model, imedsam_peft_config(model.config))` is the whole set-up.
    """
    targets = TINYVIT_TARGETS if model_config.vision_config.model_type == "i_medsam_tinyvit" else VIT_TARGETS
    num_point_embeddings = model_config.prompt_encoder_config.num_point_embeddings
    modules_to_save = [f"prompt_encoder.point_embed.{i}" for i in range(num_point_embeddings)] + [
        "prompt_encoder.not_a_point_embed",
        "prompt_encoder.no_mask_embed",
        "mask_decoder.upscale_conv1",
        "mask_decoder.upscale_layer_norm",
        "mask_decoder.upscale_conv2",
    ]
    if model_config.use_implicit_decoder:
        modules_to_save.append("implicit_decoder")
    settings = dict(
        use_lora=model_config.use_lora,
        lora_rank=model_config.lora_rank,
        lora_alpha=model_config.lora_alpha,
        use_frequency_adapter=model_config.use_frequency_adapter,
        adapter_dim=model_config.frequency_adapter_dim,
        fusion_scale=model_config.frequency_fusion_scale,
        fusion_gate=model_config.frequency_fusion_gate,
        spectrum=model_config.spectrum,
        spectrum_log_scale=model_config.spectrum_log_scale,
        modules_to_save=modules_to_save,
        **targets,
    )
    settings.update(overrides)
    return FrequencyAdapterConfig(**settings)
