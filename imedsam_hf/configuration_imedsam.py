"""Configuration of I-MedSAM: a SAM configuration plus the frequency-adapter and implicit-decoder settings."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

QUERY_MODES = ("adaptive", "dense")
UNCERTAINTY_MODES = ("mc_dropout",)
SPECTRUM_MODES = ("amplitude", "phase")


@strict
class IMedSamConfig(SamConfig):
    r"""
    Configuration of [`IMedSamModel`]: SAM's three sub-configurations (vision encoder, prompt encoder, mask
    decoder) plus the settings of the I-MedSAM additions.

    vision_config (`dict` or `SamVisionConfig` or `IMedSamTinyViTConfig`):
        The frozen image encoder: SAM's ViT (default) or LiteMedSAM's TinyViT (`model_type="i_medsam_tinyvit"`).
    use_implicit_decoder (`bool`, defaults to `True`):
        Predict masks with the coordinate-based implicit decoder. When `False`, SAM's own mask output (upsampled)
        is returned as `logits` (the "LoRA only" and "+FA" rows of the paper's ablation).
    use_lora (`bool`), use_frequency_adapter (`bool`):
        Ablation switches read by [`imedsam_peft_config`]: which parameter-efficient branches the recipe adds.
    lora_rank (`int`), lora_alpha (`float`), frequency_adapter_dim (`int`), frequency_fusion_scale (`float`),
    frequency_fusion_gate (`bool`), spectrum (`str`), spectrum_log_scale (`bool`):
        Defaults of the recipe's adapter (see [`FrequencyAdapterConfig`]).
    num_classes (`int`, defaults to 1):
        Logits per query point. 1 for binary segmentation; C for C foreground classes (one sigmoid each).
    num_frequencies (`int`, defaults to 10):
        NeRF-style positional-encoding frequencies L of the query coordinate.
    coarse_hidden_sizes (`tuple[int, ...]`, defaults to `(1024, 512)`), coarse_feature_size (`int`, defaults to 256):
        Hidden widths of the coarse implicit MLP and the size of the coarse feature passed to the fine MLP.
    fine_hidden_sizes (`tuple[int, ...]`, defaults to `(256, 256, 128)`):
        Hidden widths of the fine implicit MLP.
    implicit_dropout (`float`, defaults to 0.5):
        Dropout before the coarse head; also the Monte-Carlo dropout of the uncertainty estimate.
    mc_passes (`int`, defaults to 2):
        Monte-Carlo passes T of the coarse head used to estimate per-point uncertainty.
    refine_ratio (`float`, defaults to 0.125):
        Share of each image's query points (the most uncertain ones) that the fine MLP predicts.
    mc_seed (`int`, defaults to 0):
        Seed of the fixed dropout masks used at inference, which keeps predictions deterministic.
    query_chunk_size (`int`, defaults to 4096):
        Query points evaluated at once at inference: bounds the decoder's activations (about 30 MB in float32 at
        the default widths) whatever the output size.
    query_mode (`str`, defaults to `"adaptive"`):
        How the output grid is queried at inference. `"dense"` runs the coarse decoder at every output point and
        refines `refine_ratio` of them (the paper's protocol; cost grows with the output area). `"adaptive"` runs
        the coarse decoder on a bounded base grid, upsamples it, and predicts exactly only the most uncertain
        output points (cost nearly independent of the output size). Identical to dense up to the base grid size.
    adaptive_base_size (`int`, *optional*):
        Longest side of the adaptive base grid; default half the mask decoder's feature resolution (twice the
        image embedding's: 48 for ViT-B at 384 px, 128 for LiteMedSAM and 1024-px SAM), capped at 128. See
        docs/adaptive_querying.md for the measurements behind it.
    implicit_sam_prior (`bool`, defaults to `False`):
        Beyond the paper: feed SAM's own mask logit at each query point to both implicit MLPs and predict a
        residual on it, so a fresh implicit decoder starts from the backbone's zero-shot mask instead of from
        nothing (binary tasks only). Useful when fine-tuning budgets are small.
    adapter_config (`dict`, *optional*):
        Set on published checkpoints: the [`FrequencyAdapterConfig`] whose layers are built into the model so that
        `AutoModel.from_pretrained` returns the trained model complete. Leave `None` otherwise.
    """

    model_type = "i_medsam"

    use_implicit_decoder: bool = True
    use_lora: bool = True
    use_frequency_adapter: bool = True
    lora_rank: int = 4
    lora_alpha: float = 4.0
    frequency_adapter_dim: int = 4
    frequency_fusion_scale: float = 0.5
    frequency_fusion_gate: bool = False
    spectrum: str = "amplitude"
    spectrum_log_scale: bool = True
    num_classes: int = 1
    num_frequencies: int = 10
    coarse_hidden_sizes: list[int] | tuple[int, ...] = (1024, 512)
    coarse_feature_size: int = 256
    fine_hidden_sizes: list[int] | tuple[int, ...] = (256, 256, 128)
    implicit_dropout: float = 0.5
    mc_passes: int = 2
    refine_ratio: float = 0.125
    mc_seed: int = 0
    query_chunk_size: int = 4096
    query_mode: str = "adaptive"
    adaptive_base_size: int | None = None
    implicit_sam_prior: bool = False
    adapter_config: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == "i_medsam_tinyvit":
            from .modeling_tinyvit import IMedSamTinyViTConfig

            self.vision_config = IMedSamTinyViTConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        self.coarse_hidden_sizes = list(self.coarse_hidden_sizes)
        self.fine_hidden_sizes = list(self.fine_hidden_sizes)
        self._check_values()

    def _check_values(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {self.num_classes}.")
        if not 0.0 <= self.refine_ratio <= 1.0:
            raise ValueError(f"`refine_ratio` must be in [0, 1], got {self.refine_ratio}.")
        if self.mc_passes < 2:
            raise ValueError(f"`mc_passes` must be >= 2 to estimate a variance, got {self.mc_passes}.")
        if not 0.0 < self.implicit_dropout < 1.0:
            raise ValueError(f"`implicit_dropout` must be in (0, 1) for MC dropout, got {self.implicit_dropout}.")
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"`query_mode` must be one of {QUERY_MODES}, got {self.query_mode!r}.")
        if self.spectrum not in SPECTRUM_MODES:
            raise ValueError(f"`spectrum` must be one of {SPECTRUM_MODES}, got {self.spectrum!r}.")
        if not self.use_implicit_decoder and self.num_classes != 1:
            raise ValueError(
                f"`num_classes={self.num_classes}` needs the implicit decoder: SAM's own mask output has one "
                "channel. Set `use_implicit_decoder=True`."
            )
        if self.implicit_sam_prior and self.num_classes != 1:
            raise ValueError("`implicit_sam_prior` needs `num_classes=1`: SAM's mask output has one channel.")
        vision_size = self.vision_config.image_size
        prompt_size = self.prompt_encoder_config.image_size
        if vision_size != prompt_size:
            raise ValueError(
                f"`vision_config.image_size` ({vision_size}) and `prompt_encoder_config.image_size` "
                f"({prompt_size}) must match."
            )

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.vision_config.image_size

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (e.g. 24 for a ViT-B at 384 px, 64 for LiteMedSAM)."""
        return self.prompt_encoder_config.image_embedding_size

    @classmethod
    def from_sam_config(cls, sam_config: SamConfig, image_size: int | None = None, **kwargs) -> IMedSamConfig:
        """Build an I-MedSAM config around an existing SAM config, optionally at another input size."""
        vision = sam_config.vision_config.to_dict()
        prompt = sam_config.prompt_encoder_config.to_dict()
        if image_size is not None:
            patch_size = vision.get("patch_size", prompt["patch_size"])
            if image_size % patch_size:
                raise ValueError(f"`image_size` ({image_size}) must be a multiple of the patch size ({patch_size}).")
            vision["image_size"] = image_size
            prompt["image_size"] = image_size
        for sub in (vision, prompt):
            sub.pop("image_embedding_size", None)
        return cls(
            vision_config=vision,
            prompt_encoder_config=prompt,
            mask_decoder_config=sam_config.mask_decoder_config.to_dict(),
            **kwargs,
        )


__all__ = ["IMedSamConfig", "SamMaskDecoderConfig", "SamPromptEncoderConfig", "SamVisionConfig"]
