"""Convert SAM checkpoints into `IMedSamModel`s, at the checkpoint's own or another input size.

    imedsam convert sam --checkpoint facebook/sam-vit-base --image-size 384 --output DIR
    imedsam convert sam --checkpoint sam_vit_b_01ec64.pth --image-size 384 --output DIR

A transformers `SamModel` (hub id or local folder) or Meta's original `.pth` file is read; SAM's weights are
copied by name. At another input size, the absolute position embedding and the relative-position tables of the
global-attention layers are interpolated (never re-initialised); only the implicit decoder starts fresh.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import SamConfig, SamModel

from .configuration_imedsam import IMedSamConfig
from .modeling_imedsam import IMedSamModel

# Meta's segment-anything parameter names -> transformers' SamModel names (applied in order).
META_TO_HF_RULES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.blocks\.", ".layers."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    # SamFeedForward: layers.0 -> proj_in, layers.1..n-2 -> layers.0.., last -> proj_out (3-layer heads in SAM).
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.proj_in."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1\.", r"\1.layers.0."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2\.", r"\1.proj_out."),
    (r"\.norm(\d|_final_attn)\.", r".layer_norm\1."),
)


def meta_to_hf_key(key: str) -> str:
    """One Meta segment-anything parameter name in transformers' SamModel naming."""
    for pattern, replacement in META_TO_HF_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def meta_state_dict_to_hf(
    state_dict: dict[str, torch.Tensor], prefixes=("prompt_encoder.", "mask_decoder.", "image_encoder.")
) -> dict[str, torch.Tensor]:
    """Rename the entries of a Meta-style SAM state dict whose names start with `prefixes`."""
    converted = {meta_to_hf_key(k): v for k, v in state_dict.items() if k.startswith(prefixes)}
    shared = converted.get("prompt_encoder.shared_embedding.positional_embedding")
    if shared is not None:
        converted["shared_image_embedding.positional_embedding"] = shared
    return converted


def _count_indexed(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of `prefix<N>.` entries (e.g. transformer blocks) in a state dict."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict for m in [pattern.match(k)] if m})


def prompt_and_decoder_configs(state_dict: dict[str, torch.Tensor], image_size: int, patch_size: int) -> dict:
    """SamConfig keyword arguments of a Meta-style prompt encoder and mask decoder, read off their weights."""
    hidden = state_dict["mask_decoder.iou_token.weight"].shape[1]
    prompt = dict(
        hidden_size=hidden,
        image_size=image_size,
        patch_size=patch_size,
        mask_input_channels=state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        num_point_embeddings=_count_indexed(state_dict, "prompt_encoder.point_embeddings."),
    )
    internal_dim = state_dict["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"].shape[0]
    decoder = dict(
        hidden_size=hidden,
        mlp_dim=state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        num_hidden_layers=_count_indexed(state_dict, "mask_decoder.transformer.layers."),
        num_multimask_outputs=state_dict["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_hidden_dim=state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        iou_head_depth=_count_indexed(state_dict, "mask_decoder.iou_prediction_head.layers."),
        attention_downsample_rate=hidden // internal_dim,
        # segment-anything's two-way transformer uses nn.LayerNorm's default eps (transformers defaults to 1e-6).
        layer_norm_eps=1e-5,
    )
    return dict(prompt_encoder_config=prompt, mask_decoder_config=decoder)


def sam_vit_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """SamVisionConfig keyword arguments of a Meta-style SAM ViT, read off its weights.

    SAM's released checkpoints use 8 decoder heads and 64-dim encoder heads; heads are not visible in the weights
    except through the relative-position tables (head_dim), which is what is used here.
    """
    patch = state_dict["image_encoder.patch_embed.proj.weight"]
    grid = state_dict["image_encoder.pos_embed"].shape[1]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    num_layers = _count_indexed(state_dict, "image_encoder.blocks.")
    rel_lengths = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(num_layers)]
    global_layers = [i for i, length in enumerate(rel_lengths) if length == 2 * grid - 1]
    window_lengths = [length for length in rel_lengths if length != 2 * grid - 1]
    head_dim = state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    return dict(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch_size,
        patch_size=patch_size,
        output_channels=state_dict["image_encoder.neck.0.weight"].shape[0],
        num_pos_feats=state_dict["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1],
        window_size=(window_lengths[0] + 1) // 2 if window_lengths else 14,
        global_attn_indexes=global_layers,
        mlp_dim=state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
    )


def load_meta_sam(path: str | os.PathLike) -> tuple[SamConfig, dict[str, torch.Tensor]]:
    """Read Meta's original `sam_vit_*.pth` (weights only) into a SamConfig and a SamModel-named state dict."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise ValueError(f"Cannot read SAM checkpoint {path}: {error}") from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    key = "image_encoder.patch_embed.proj.weight"
    if not isinstance(state_dict, dict) or key not in state_dict:
        raise ValueError(f"{path} is not a segment-anything checkpoint: no `{key}` entry.")
    vision = sam_vit_config(state_dict)
    config = SamConfig(
        vision_config=vision, **prompt_and_decoder_configs(state_dict, vision["image_size"], vision["patch_size"])
    )
    return config, meta_state_dict_to_hf(state_dict)


def load_sam(checkpoint: str) -> tuple[SamConfig, dict[str, torch.Tensor]]:
    """A transformers SamModel (hub id or folder) or a Meta `.pth` file -> (SamConfig, state dict)."""
    if checkpoint.endswith((".pth", ".pt")):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"`checkpoint` {checkpoint}: no such file.")
        return load_meta_sam(checkpoint)
    try:
        model, info = SamModel.from_pretrained(checkpoint, output_loading_info=True)
    except (OSError, ValueError):
        raise
    except Exception as error:  # safetensors, torch and transformers raise many types for damaged weights
        raise OSError(f"`{checkpoint}`: cannot load the SAM weights ({error}).") from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"`{checkpoint}`: its weights are not a SamModel's ({len(missing)} tensors missing, e.g. "
            f"{', '.join(missing[:3])}); transformers would initialise them at random."
        )
    return model.config, model.state_dict()


def resize_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """`(1, g, g, C)` absolute position embedding -> `(1, grid, grid, C)` by bicubic interpolation."""
    if pos_embed.shape[1] == grid:
        return pos_embed
    resized = F.interpolate(
        pos_embed.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False
    )
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_relative_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """`(2g - 1, head_dim)` relative-position table -> `(length, head_dim)` by linear interpolation (as SAM does)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype)


def adapt_sam_state_dict(state_dict: dict[str, torch.Tensor], model: IMedSamModel) -> dict[str, torch.Tensor]:
    """Interpolate the size-dependent SAM tensors to `model`'s shapes; every other tensor is copied unchanged."""
    targets = model.state_dict()
    adapted = {}
    for key, value in state_dict.items():
        target = targets.get(key)
        if target is not None and target.shape != value.shape:
            if key.endswith("pos_embed"):
                value = resize_position_embedding(value, target.shape[1])
            elif key.endswith(("rel_pos_h", "rel_pos_w")):
                value = resize_relative_positions(value, target.shape[0])
            else:
                raise ValueError(f"Cannot adapt `{key}` from shape {tuple(value.shape)} to {tuple(target.shape)}.")
        adapted[key] = value
    return adapted


def load_checked_state(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    expected: set[str] | None = None,
    may_miss: tuple[str, ...] = (),
) -> None:
    """
    The one checked state-dict load: `state` into `model`, every tensor the model needs present (`expected`, default
    all of the model's state; keys starting with a `may_miss` prefix may be absent), none it does not know, and every
    shape fitting. A `ValueError` naming `source` (a file, a checkpoint) says which keys or which shape otherwise.
    """
    needed = set(model.state_dict()) if expected is None else set(expected)
    missing = sorted(k for k in needed - set(state) if not k.startswith(may_miss))
    unexpected = sorted(set(state) - needed)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: {len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unknown (e.g. {unexpected[:3]}); it belongs to another model or configuration."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes, e.g. another num_classes or lora_rank
        reason = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise ValueError(f"{source} does not fit this model: {reason}") from None


def sam_to_imedsam(
    sam_config: SamConfig, state_dict: dict[str, torch.Tensor], image_size: int | None = None, **config_kwargs
) -> IMedSamModel:
    """
    Build an `IMedSamModel` at `image_size` from SAM weights; only the implicit decoder is newly initialised (its
    config says `implicit_decoder_trained=False`).
    """
    config_kwargs.setdefault("implicit_decoder_trained", False)
    config = IMedSamConfig.from_sam_config(sam_config, image_size=image_size, **config_kwargs)
    model = IMedSamModel(config)
    load_checked_state(
        model, adapt_sam_state_dict(state_dict, model), "the SAM weights", may_miss=("implicit_decoder.",)
    )
    return model.eval()


__all__ = [
    "META_TO_HF_RULES",
    "adapt_sam_state_dict",
    "load_checked_state",
    "load_meta_sam",
    "load_sam",
    "meta_state_dict_to_hf",
    "meta_to_hf_key",
    "prompt_and_decoder_configs",
    "resize_position_embedding",
    "resize_relative_positions",
    "sam_to_imedsam",
    "sam_vit_config",
]
