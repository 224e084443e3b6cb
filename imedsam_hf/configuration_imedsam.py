"""Every configuration of I-MedSAM, with no torch: the model (`IMedSamConfig`), LiteMedSAM's TinyViT encoder
(`IMedSamTinyViTConfig`) and the one schema of the adapter settings (`FrequencyAdapterSettings`), from which the PEFT
config, the published `adapter_config`, the model card and the training recipe all derive.
"""

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

QUERY_MODES = ("adaptive", "dense")
QUERY_REGIONS = ("box", "image")
DECODER_PRECISIONS = ("fp32", "bf16")
UNCERTAINTY_MODES = ("mc_dropout",)
SPECTRUM_MODES = ("amplitude", "phase")
# How the frequency-adapter chain carries its stream (see FrequencyAdapterSettings.chain).
CHAIN_FORMS = ("residual", "normalized")
TINYVIT_MODEL_TYPE = "i_medsam_tinyvit"
#: The window of MR (and of any scan whose values are not Hounsfield units): MedSAM's MR preprocessing (`pre_CT_MR.py`):
#: the 0.5th and 99.5th percentiles of the scan's positive voxels map to 0 and 255, clipped beyond, and voxels that are
#: 0 (background) stay 0. Per scan, so a hot voxel cannot compress the rest as min-max would (`volumes.mr_window`).
MR_WINDOW = "mr"

# Module-name patterns of the adapter's roles, per encoder family (matched with re.fullmatch on the full module name).
VIT_TARGETS = {
    "tokenizer_module": r"vision_encoder\.patch_embed",
    "fusion_target_modules": r"vision_encoder\.layers\.\d+\.mlp",
    "lora_target_modules": r"vision_encoder\.layers\.\d+\.attn\.qkv",
    "downsample_target_modules": None,
}
TINYVIT_TARGETS = {
    "tokenizer_module": r"vision_encoder\.patch_embed",
    # Fusion after the MLP of every attention block (stages 1-3, where LoRA also lives). Stage 0 is convolutional
    # and runs at 4x SAM's token grid (256x256 tokens at 256 px): fusing there would force backpropagation through
    # the encoder's most expensive stage for 1.4K adapter parameters (measured on 2 CPU cores, batch 4: peak memory
    # 8.9 GB -> 5.8 GB, step 18.7 s -> 17.4 s). The stream still starts at the patch embedding and follows stage
    # 0's downsampling.
    "fusion_target_modules": r"vision_encoder\.stages\.[1-9]\d*\.blocks\.\d+\.mlp",
    "lora_target_modules": r"vision_encoder\.stages\.\d+\.blocks\.\d+\.attention\.qkv",
    "downsample_target_modules": r"vision_encoder\.stages\.\d+\.downsample",
}


def _setting(default: Any, help: str, recipe: str | None = None) -> Any:
    """A schema field; `recipe` names the `IMedSamConfig` field that sets it in the training recipe."""
    metadata = {"help": help}
    if recipe is not None:
        metadata["recipe"] = recipe
    return field(default=default, metadata=metadata)


@dataclass
class FrequencyAdapterSettings:
    """
    The one schema of I-MedSAM's adapter: rank-r LoRA on q and v of every fused `qkv` projection and a chained
    frequency adapter (FA) per encoder block fed by the image spectrum (I-MedSAM, section 3.2).

    Everything else derives from these fields: the PEFT config `FrequencyAdapterConfig` subclasses it, a published
    checkpoint stores `asdict(settings)` as `IMedSamConfig.adapter_config`, the layers read it, the model card
    prints it, and `IMedSamConfig`'s recipe fields are the fields whose metadata names them (`recipe`).
    """

    use_lora: bool = _setting(True, "Add LoRA on q and v of each fused qkv projection.", recipe="use_lora")
    lora_rank: int = _setting(4, "LoRA rank r.", recipe="lora_rank")
    lora_alpha: float = _setting(4.0, "LoRA scaling numerator (scaling = alpha / r).", recipe="lora_alpha")
    lora_dropout: float = _setting(0.0, "Dropout on the LoRA input.")
    lora_gate: bool = _setting(
        False,
        "Scale each image's (or window's) q/v LoRA update by g = Linear(d, 1)(mean of its tokens), trainable, as the "
        "released code's LoRA_qkv does; the update then depends on the input and cannot be merged into the weight.",
        recipe="lora_gate",
    )
    use_frequency_adapter: bool = _setting(True, "Add the frequency-adapter chain.", recipe="use_frequency_adapter")
    adapter_dim: int = _setting(4, "Bottleneck width of each frequency adapter.", recipe="frequency_adapter_dim")
    fusion_scale: float = _setting(
        0.5, "Weight of the frequency tokens added to each block.", recipe="frequency_fusion_scale"
    )
    fusion_gate: bool = _setting(
        False,
        "Learn a per-block gate (tanh, starting at 0) on the fusion weight instead of fixing it.",
        recipe="frequency_fusion_gate",
    )
    chain: str = _setting(
        "residual",
        "The FA chain's step: 'residual', f(i+1) = f(i) + FA(LN f(i)) (this project's first form; the stream grows "
        "block after block), or 'normalized', f(i+1) = LN f(i) + FA(LN f(i)) (the released code's: the stream stays "
        "at a LayerNorm's scale, so with the fusion gate off the pretrained encoder is barely moved at step 0).",
        recipe="frequency_chain",
    )
    spectrum: str = _setting("amplitude", "'amplitude' or 'phase' of the centred FFT.", recipe="spectrum")
    spectrum_log_scale: bool = _setting(True, "log1p-compress the amplitude spectrum.", recipe="spectrum_log_scale")
    tokenizer_module: str = _setting(VIT_TARGETS["tokenizer_module"], "Full name of the encoder's patch embedding.")
    fusion_target_modules: str = _setting(
        VIT_TARGETS["fusion_target_modules"],
        "Regex (full match) of the modules after whose output the frequency tokens are added.",
    )
    lora_target_modules: str = _setting(VIT_TARGETS["lora_target_modules"], "Regex of the fused qkv projections.")
    downsample_target_modules: str | None = _setting(
        None, "Regex of a hierarchical encoder's downsampling modules (TinyViT)."
    )

    def check_settings(self) -> None:
        """Raise `ValueError` naming the first invalid setting."""
        if self.spectrum not in SPECTRUM_MODES:
            raise ValueError(f"`spectrum` must be one of {SPECTRUM_MODES}, got {self.spectrum!r}.")
        if self.chain not in CHAIN_FORMS:
            raise ValueError(f"`chain` must be one of {CHAIN_FORMS}, got {self.chain!r}.")
        if self.lora_rank < 1 or self.adapter_dim < 1:
            raise ValueError(f"`lora_rank` ({self.lora_rank}) and `adapter_dim` ({self.adapter_dim}) must be >= 1.")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "FrequencyAdapterSettings":
        """The settings of a stored `adapter_config` dict (keys outside the schema, e.g. PEFT's own, are ignored)."""
        settings = cls(**{name: values[name] for name in ADAPTER_SETTINGS if name in values})
        settings.check_settings()
        return settings

    def settings_dict(self) -> dict[str, Any]:
        """Only the schema's fields (a subclass such as the PEFT config has more)."""
        return {name: getattr(self, name) for name in ADAPTER_SETTINGS}


ADAPTER_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(FrequencyAdapterSettings))
# IMedSamConfig field -> schema field, for the settings the training recipe exposes on the model config.
RECIPE_FIELDS: dict[str, str] = {
    f.metadata["recipe"]: f.name for f in fields(FrequencyAdapterSettings) if "recipe" in f.metadata
}
_ADAPTER_DEFAULTS = FrequencyAdapterSettings()


@strict
class IMedSamTinyViTConfig(PreTrainedConfig):
    r"""
    Configuration of the TinyViT image encoder used by LiteMedSAM. The defaults reproduce LiteMedSAM's encoder
    (5,726,740 parameters, 256x256 input, 256x64x64 embedding).

    Args:
        image_size (`int`, *optional*, defaults to 256):
            Side of the square input image.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        embed_dims (`list[int]`, *optional*, defaults to `[64, 128, 160, 320]`):
            Channels of each stage. Stage 0 is convolutional (MBConv), the others are windowed attention.
        depths (`list[int]`, *optional*, defaults to `[2, 2, 6, 2]`):
            Number of blocks per stage.
        num_heads (`list[int]`, *optional*, defaults to `[2, 4, 5, 10]`):
            Attention heads per stage (the entry of stage 0 is unused: that stage has no attention).
        window_sizes (`list[int]`, *optional*, defaults to `[7, 7, 14, 7]`):
            Attention window side per stage (the entry of stage 0 is unused).
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden size of the attention blocks' MLP relative to the stage width.
        mbconv_expand_ratio (`float`, *optional*, defaults to 4.0):
            Expansion of the MBConv blocks of stage 0.
        local_conv_size (`int`, *optional*, defaults to 3):
            Kernel of the depthwise convolution between attention and MLP in attention blocks.
        patch_embed_kernel_size (`int`, *optional*, defaults to 1):
            Kernel of both conv+BN units of the patch embedding. LiteMedSAM uses 1 (MobileSAM uses 3).
        patch_embed_stride (`int`, *optional*, defaults to 1):
            Stride of each of the two conv+BN units of the patch embedding. LiteMedSAM uses 1, so stage 0 runs at the
            full input resolution (MobileSAM uses 2, i.e. a total stride of 4).
        downsample_strides (`list[int]`, *optional*, defaults to `[2, 2, 1]`):
            Stride of the patch-merging layer at the end of every stage but the last (one entry per stage - 1).
        output_channels (`int`, *optional*, defaults to 256):
            Channels of the neck, i.e. of the image embedding.
        num_pos_feats (`int`, *optional*, defaults to 128):
            Read by SAM's positional embedding (`output_channels // 2`).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation used everywhere in the encoder (exact GELU in LiteMedSAM).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the neck's channels-first layer norms.
        attention_layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the pre-norms of the attention and MLP sub-blocks (PyTorch's default in the original).
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the BatchNorm layers.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Maximum stochastic-depth rate, increased linearly over all blocks.

    Derived attributes (set in `__post_init__`, not arguments): `hidden_size` (`embed_dims[-1]`), `scale`
    (`output_channels // 2`, read by SAM's positional embedding), `total_stride` (patch embedding x patch merging
    strides), `patch_size` (`image_size // embedding grid`, 4 for LiteMedSAM, so that a SAM prompt encoder with
    the same `image_size` / `patch_size` sees a 64x64 embedding) and `image_embedding_size` (64).
    """

    model_type = TINYVIT_MODEL_TYPE
    base_config_key = "vision_config"

    image_size: int = 256
    num_channels: int = 3
    embed_dims: list[int] | tuple[int, ...] = (64, 128, 160, 320)
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: list[int] | tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float | int = 4.0
    mbconv_expand_ratio: float | int = 4.0
    local_conv_size: int = 3
    patch_embed_kernel_size: int = 1
    patch_embed_stride: int = 1
    downsample_strides: list[int] | tuple[int, ...] = (2, 2, 1)
    output_channels: int = 256
    num_pos_feats: int = 128
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs):
        # Lists (not tuples) so that to_dict() -> JSON -> from_dict() gives back an equal config.
        self.embed_dims = list(self.embed_dims)
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        self.window_sizes = list(self.window_sizes)
        self.downsample_strides = list(self.downsample_strides)

        num_stages = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == num_stages):
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes need one entry per stage, got lengths "
                f"{len(self.embed_dims)}, {len(self.depths)}, {len(self.num_heads)}, {len(self.window_sizes)}."
            )
        if len(self.downsample_strides) != num_stages - 1:
            raise ValueError(
                f"downsample_strides needs {num_stages - 1} entries (one per stage but the last), "
                f"got {self.downsample_strides}."
            )
        for stage in range(1, num_stages):
            if self.embed_dims[stage] % self.num_heads[stage] != 0:
                raise ValueError(
                    f"embed_dims[{stage}]={self.embed_dims[stage]} is not divisible by "
                    f"num_heads[{stage}]={self.num_heads[stage]}."
                )
        total_stride = self.patch_embed_stride**2 * math.prod(self.downsample_strides)
        if self.image_size % total_stride != 0:
            raise ValueError(f"image_size={self.image_size} is not divisible by the total stride {total_stride}.")

        # Derived attributes come back as kwargs from to_dict()/config.json: drop them so they are always recomputed.
        for derived in ("hidden_size", "scale", "total_stride", "image_embedding_size", "patch_size"):
            kwargs.pop(derived, None)
        self.hidden_size = self.embed_dims[-1]
        self.scale = self.output_channels // 2
        self.total_stride = total_stride
        self.image_embedding_size = self.image_size // total_stride
        self.patch_size = self.image_size // self.image_embedding_size
        super().__post_init__(**kwargs)


def is_class_aware(config) -> bool:
    """
    Whether a model's `config` decodes each box with the heads of the structure it is for (`class_aware` and more
    than one class): the one test `segment`, `imedsam predict --classes`, evaluation and the demo share. Any config
    works (a plain SAM's, or one without the attribute: False).
    """
    return bool(getattr(config, "class_aware", False)) and int(getattr(config, "num_classes", 1) or 1) > 1


def training_window(config: Any) -> tuple[float, float] | str | None:
    """
    The intensity window a model's training images were made with from raw volumes, as training records it in
    `training_data["window"]` (`training/train.py --window`, or the data folder's `cases.csv` that `imedsam convert
    volumes --window` writes): `(level, width)` in HU, :data:`MR_WINDOW`, or None when none was recorded (images that
    came 8-bit, or data windowed upstream without saying how). `segment_volume` and `imedsam predict` apply it to a
    volume that is not 8-bit when no window is given (`volumes.resolve_window`). `config`: an `IMedSamConfig` or its
    `config.json` as a dict (any other config: None).

    Raises:
        ValueError: naming the key, when the recorded value is neither a pair (level, width > 0) nor "mr".
    """
    data = config.get("training_data") if isinstance(config, dict) else getattr(config, "training_data", None)
    value = (data or {}).get("window") if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == MR_WINDOW:
        return MR_WINDOW
    numbers = isinstance(value, (list, tuple)) and len(value) == 2
    if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        level, width = float(value[0]), float(value[1])
        if math.isfinite(level) and math.isfinite(width) and width > 0:
            return level, width
    raise ValueError(
        f"the model's config.json records training_data['window'] = {value!r}: it must be [level, width] in HU "
        f"(width > 0) or {MR_WINDOW!r}: correct it, or remove it and give the window when predicting."
    )


def window_text(window: tuple[float, float] | str) -> str:
    """A window for people: `"level 75, width 400 (-125..275 HU)"`, or MR's percentile rule."""
    if isinstance(window, str):
        return "MR's per-scan rule (the 0.5th-99.5th percentiles of its positive voxels to 0..255)"
    level, width = window
    return f"level {level:g}, width {width:g} ({level - width / 2:g}..{level + width / 2:g} HU)"


def trained_prompts(prompt: str, max_clicks: int, click_probability: float) -> list[str]:
    """
    The prompt kinds a run trains, as `config.training_data["prompts"]` records them: `["box"]`, `["box",
    "points"]` when samples carry clicks (`max_clicks`) and steps use them (`click_probability` > 0, see
    `training.forward_and_loss`), or `["none"]` (prompt-free training).
    """
    if prompt != "box":
        return [prompt]
    return ["box", "points"] if max_clicks > 0 and click_probability > 0 else ["box"]


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
    lora_rank (`int`), lora_alpha (`float`), lora_gate (`bool`), frequency_adapter_dim (`int`), frequency_fusion_scale (`float`),
    frequency_fusion_gate (`bool`), frequency_chain (`str`), spectrum (`str`), spectrum_log_scale (`bool`):
        The adapter the training recipe adds (`adapter_recipe()`): each is a field of the one schema,
        [`FrequencyAdapterSettings`], under the name `RECIPE_FIELDS` gives it, with the schema's default.
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
    query_region (`str`, defaults to `"box"`):
        Where adaptive querying spends its points at inference. `"box"`: a box-prompted structure lies in its box
        (plus what jitter or propagation can add), so each prompt queries the implicit decoder only in its region of
        interest, the box and SAM's own mask widened by `query_margin` of their size (at least 2 input pixels) on
        every side, at the adaptive base density (denser for small structures: at least 32 points a side, every
        point exactly below that), and takes SAM's own (background) logits outside it: decoding time follows the
        structure's area, not the image's. `"image"`: the whole output grid, as prompt-free calls always are.
    query_margin (`float`, defaults to 0.2):
        With `query_region="box"`: how far, as a fraction of the box's width and height, the region of interest
        reaches beyond the box on every side.
    decoder_precision (`str`, defaults to `"fp32"`):
        What SAM's two-way transformer and the implicit decoder's MLPs compute in at inference. `"bf16"` runs them
        under `torch.autocast` in bfloat16 (matrix products in bf16; normalisations, softmax, SAM's upscaling and the
        outputs in float32): decoding a CT volume 1.3x faster on a CPU with AVX512-BF16 or AMX, where `--backend
        openvino --precision bf16` sets it with the encoder's bf16 (docs/results.md has what it moves). Training
        always computes in the precision it is given.
    adaptive_base_size (`int`, *optional*):
        Longest side of the adaptive base grid; default half the mask decoder's feature resolution (twice the
        image embedding's: 48 for ViT-B at 384 px, 128 for LiteMedSAM and 1024-px SAM), capped at 128. See
        docs/adaptive_querying.md for the measurements behind it.
    implicit_sam_prior (`bool`, defaults to `False`):
        Beyond the paper: feed SAM's own mask logit at each query point to both implicit MLPs and predict a
        residual on it, so a fresh implicit decoder starts from the backbone's zero-shot mask instead of from
        nothing. Useful when fine-tuning budgets are small. SAM's mask is one channel per prompt: with several
        classes each class's logit is a residual on the prompt's SAM logit, which suits class-aware prompts (one
        structure per box, `input_classes`).
    base_model (`str`, *optional*):
        The backbone a fine-tuned model was trained from, as a portable name (`"litemedsam"` or a Hub id, never a
        machine path): the model card's `base_model` and the zero-shot baseline of `imedsam evaluate --baseline sam`.
    adapter_config (`dict`, *optional*):
        Set on published checkpoints: the [`FrequencyAdapterSettings`] (as a dict) whose layers are built into the
        model so that `AutoModel.from_pretrained` returns the trained model complete. Leave `None` otherwise.
    implicit_decoder_trained (`bool`, *optional*):
        Whether the implicit decoder's weights were trained. `False` for a conversion (`imedsam convert`, a SAM
        checkpoint or `"litemedsam"` loaded as a model), whose decoder is freshly initialised; `True` once training
        saved it (`save_pretrained_full`). `None`, as in configs written before this field: a published checkpoint
        (one with `adapter_config`) counts as trained, anything else as untrained. `segment` (and so `imedsam
        predict` and the demo) uses SAM's own mask instead of an untrained decoder; see `has_trained_implicit_decoder`.
    class_aware (`bool`, defaults to `False`):
        With `num_classes > 1`: the model was trained with one box per structure, each box decoded by its class's
        heads (`input_classes`), as the BTCV recipe trains it. Training records it; `imedsam evaluate`, `imedsam
        predict`, `segment_volume` and the demo read it as their default. `False`: one prompt gives all C channels.
    trained_modules (`list[str]`, *optional*):
        Set on published checkpoints with `adapter_config`: the modules the fine-tune trained in full (PEFT's
        `modules_to_save`), so that fine-tuning the checkpoint again trains exactly those.
    training_data (`dict`, *optional*):
        What the model was trained on, recorded by training from the data actually used: `name`, `license`,
        `citation` (the model card's data section), `num_pairs`, `prompts` (the prompt kinds trained: `"box"`,
        `"points"`, or `"none"`; see `learned_clicks`), `window` (the intensity window its images were made with from
        raw volumes, see `training_window`), and the folder's class names in `id2label`.
    """

    model_type = "i_medsam"

    use_implicit_decoder: bool = True
    # The recipe's adapter (see RECIPE_FIELDS): defaults read from the schema, never written twice.
    use_lora: bool = _ADAPTER_DEFAULTS.use_lora
    use_frequency_adapter: bool = _ADAPTER_DEFAULTS.use_frequency_adapter
    lora_rank: int = _ADAPTER_DEFAULTS.lora_rank
    lora_alpha: float = _ADAPTER_DEFAULTS.lora_alpha
    lora_gate: bool = _ADAPTER_DEFAULTS.lora_gate
    frequency_adapter_dim: int = _ADAPTER_DEFAULTS.adapter_dim
    frequency_fusion_scale: float = _ADAPTER_DEFAULTS.fusion_scale
    frequency_fusion_gate: bool = _ADAPTER_DEFAULTS.fusion_gate
    frequency_chain: str = _ADAPTER_DEFAULTS.chain
    spectrum: str = _ADAPTER_DEFAULTS.spectrum
    spectrum_log_scale: bool = _ADAPTER_DEFAULTS.spectrum_log_scale
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
    query_region: str = "box"
    query_margin: float = 0.2
    adaptive_base_size: int | None = None
    decoder_precision: str = "fp32"
    implicit_sam_prior: bool = False
    adapter_config: dict | None = None
    base_model: str | None = None
    implicit_decoder_trained: bool | None = None
    class_aware: bool = False
    trained_modules: list[str] | None = None
    training_data: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == TINYVIT_MODEL_TYPE:
            self.vision_config = IMedSamTinyViTConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        self.coarse_hidden_sizes = list(self.coarse_hidden_sizes)
        self.fine_hidden_sizes = list(self.fine_hidden_sizes)
        self.check_values()

    def check_values(self) -> None:
        """Raise `ValueError` naming the first inconsistent field (also after `from_pretrained(..., **overrides)`)."""
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
        if self.query_region not in QUERY_REGIONS:
            raise ValueError(f"`query_region` must be one of {QUERY_REGIONS}, got {self.query_region!r}.")
        if self.decoder_precision not in DECODER_PRECISIONS:
            raise ValueError(
                f"`decoder_precision` must be one of {DECODER_PRECISIONS}, got {self.decoder_precision!r}."
            )
        if not self.query_margin >= 0:
            raise ValueError(f"`query_margin` must be >= 0, got {self.query_margin}.")
        if self.spectrum not in SPECTRUM_MODES:
            raise ValueError(f"`spectrum` must be one of {SPECTRUM_MODES}, got {self.spectrum!r}.")
        if self.query_chunk_size < 1:
            raise ValueError(f"`query_chunk_size` must be >= 1, got {self.query_chunk_size}.")
        if self.adapter_config is not None:
            FrequencyAdapterSettings.from_mapping(self.adapter_config)
        training_window(self)  # a recorded window is a pair (level, width > 0) or "mr"
        if self.class_aware and self.num_classes < 2:
            raise ValueError("`class_aware=True` needs `num_classes` > 1: one head per class for the boxes to pick.")
        if not self.use_implicit_decoder and self.num_classes != 1:
            raise ValueError(
                f"`num_classes={self.num_classes}` needs the implicit decoder: SAM's own mask output has one "
                "channel. Set `use_implicit_decoder=True`."
            )
        vision_size = self.vision_config.image_size
        prompt_size = self.prompt_encoder_config.image_size
        if vision_size != prompt_size:
            raise ValueError(
                f"`vision_config.image_size` ({vision_size}) and `prompt_encoder_config.image_size` "
                f"({prompt_size}) must match."
            )

    @property
    def has_trained_implicit_decoder(self) -> bool:
        """
        Whether `logits` come from a trained implicit decoder: `implicit_decoder_trained` where it is recorded; for
        configs written before it was, only published checkpoints (`adapter_config` set: the training recipe's
        output) count as trained, and conversions, which never had an adapter, as untrained.
        """
        if not self.use_implicit_decoder:
            return False
        if self.implicit_decoder_trained is not None:
            return self.implicit_decoder_trained
        return self.adapter_config is not None

    @property
    def learned_clicks(self) -> bool:
        """
        Whether the model has learned click prompts: its fine-tune did (`training_data["prompts"]` names
        `"points"`), or its backbone did. SAM did; LiteMedSAM and MedSAM were trained with boxes only, so a TinyViT
        encoder, or a backbone (`base_model`, else the checkpoint's own name) named `*medsam*`, knows boxes only.
        """
        if "points" in (self.training_data or {}).get("prompts", []):
            return True
        backbone = str(self.base_model or self._name_or_path or "").lower()
        return not (self.is_tinyvit or "medsam" in backbone)

    @property
    def is_tinyvit(self) -> bool:
        """Whether the image encoder is LiteMedSAM's TinyViT (else SAM's ViT)."""
        return self.vision_config.model_type == TINYVIT_MODEL_TYPE

    def adapter_recipe(self, **overrides: Any) -> "FrequencyAdapterSettings":
        """
        The adapter the training recipe adds to this model: the recipe fields of this config (`RECIPE_FIELDS`),
        the module patterns of its encoder family, then `overrides` (schema field names).
        """
        values = {setting: getattr(self, name) for name, setting in RECIPE_FIELDS.items()}
        values.update(TINYVIT_TARGETS if self.is_tinyvit else VIT_TARGETS)
        unknown = sorted(set(overrides) - set(ADAPTER_SETTINGS))
        if unknown:
            raise ValueError(f"Unknown adapter settings {unknown}; the settings are {list(ADAPTER_SETTINGS)}.")
        values.update(overrides)
        settings = FrequencyAdapterSettings(**values)
        settings.check_settings()
        return settings

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.vision_config.image_size

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (e.g. 24 for a ViT-B at 384 px, 64 for LiteMedSAM)."""
        return self.prompt_encoder_config.image_embedding_size

    @classmethod
    def from_sam_config(cls, sam_config: SamConfig, image_size: int | None = None, **kwargs) -> "IMedSamConfig":
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


def unknown_arguments_message(function: str, unknown: dict, valid: tuple[str, ...]) -> str:
    """`function` got keyword arguments it does not take: name each, with the closest valid one."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"`{name}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    return f"{function}() got unknown argument(s) {', '.join(parts)}; it takes {', '.join(valid)}."


__all__ = [
    "ADAPTER_SETTINGS",
    "FrequencyAdapterSettings",
    "IMedSamConfig",
    "IMedSamTinyViTConfig",
    "MR_WINDOW",
    "RECIPE_FIELDS",
    "SamMaskDecoderConfig",
    "SamPromptEncoderConfig",
    "SamVisionConfig",
    "TINYVIT_TARGETS",
    "VIT_TARGETS",
    "is_class_aware",
    "trained_prompts",
    "training_window",
    "unknown_arguments_message",
    "window_text",
]
