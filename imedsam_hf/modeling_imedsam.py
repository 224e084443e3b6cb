"""I-MedSAM: a frozen SAM with a coordinate-based (implicit) mask decoder refined where it is most uncertain.

The model keeps `SamModel`'s submodule names (`shared_image_embedding`, `vision_encoder`, `prompt_encoder`,
`mask_decoder`), so SAM checkpoints load by name, and adds `implicit_decoder`. The parameter-efficient branches
(LoRA and the frequency adapter) are added with PEFT (`imedsam_hf.imedsam_peft_config`) or, in a published
checkpoint, built in from `config.adapter_config`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from torch import nn
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPreTrainedModel,
    SamPromptEncoder,
    SamVisionEncoder,
)
from transformers.utils import ModelOutput

from .configuration_imedsam import TINYVIT_MODEL_TYPE, IMedSamConfig, unknown_arguments_message
from .frequency_adapter_layers import inject_frequency_adapter
from .modeling_tinyvit import IMedSamTinyViTEncoder, fold_batchnorm
from .processing_imedsam import processor_for_config


@dataclass
class IMedSamOutput(ModelOutput):
    r"""
    logits (`torch.FloatTensor` of shape `(batch_size, num_classes, height, width)`):
        Final mask logits on the requested output grid: the coarse prediction with the refined points replaced
        by the fine prediction (or SAM's own upsampled mask when the implicit decoder is switched off).
    coarse_logits (`torch.FloatTensor` of shape `(batch_size, num_classes, height, width)`):
        The coarse implicit decoder's logits at every output point.
    uncertainty (`torch.FloatTensor` of shape `(batch_size, height, width)`):
        Per-point uncertainty: variance of the Monte-Carlo dropout probabilities, averaged over classes.
    refined (`torch.BoolTensor` of shape `(batch_size, height, width)`):
        Which output points the fine implicit decoder predicted.
    sam_logits (`torch.FloatTensor` of shape `(batch_size, 1, 4 * embedding_size, 4 * embedding_size)`):
        SAM's own low-resolution mask logits (single-mask output) for the same prompt.
    iou_scores (`torch.FloatTensor` of shape `(batch_size, 1)`):
        SAM's predicted IoU of `sam_logits`.
    image_embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size, embedding_size, embedding_size)`):
        The image encoder's output.
    """

    logits: torch.FloatTensor | None = None
    coarse_logits: torch.FloatTensor | None = None
    uncertainty: torch.FloatTensor | None = None
    refined: torch.BoolTensor | None = None
    sam_logits: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    image_embeddings: torch.FloatTensor | None = None


# The adaptive base grid's default side: half the decoder features' (twice the image embedding's), at most this cap.
# Measured on LiteMedSAM (256x256 features), the 28 EndoTect test images: base 128 is within 0.006 (512 output) and
# 0.14 (1024) Dice points of dense querying at 5-14x its speed; base 64 (the embedding's own side) loses 0.22 and
# 0.31 points. See docs/adaptive_querying.md.
DEFAULT_ADAPTIVE_BASE_SIZE = 128
# `query_region="box"`: the least base-grid side of a region of interest (smaller regions are queried at every point).
MIN_REGION_BASE_SIZE = 32
# Points per block of the blockwise top-k selection (see IMedSamImplicitDecoder._select).
TOPK_BLOCK = 1 << 18
# `decoder_precision="bf16"`: the implicit decoder's point counts are padded to a multiple of this (see
# `IMedSamImplicitDecoder._query_chunked`). Decoding BTCV case0001 (2 threads, SAM's transformer in bf16 too): 256 ->
# 19.8 s, 512 -> 20.9 s, 1024 -> 22.0 s; fp32 26.6 s; everything under autocast without padding 34 s.
BF16_POINT_BUCKET = 256
# SAM's mask logits outside a prompt's upscaling window (`FeatureWindows`): background, finite (bilinear resizing
# mixes it with the window's own logits at its edge).
SAM_WINDOW_FLOOR = -30.0


@dataclass
class FeatureWindows:
    """
    The mask decoder's upscaled features of each prompt over a window of the frame only (box prompts decoded in
    their regions of interest, `IMedSamModel.forward`): what the implicit decoder samples there.

    features: each row's `(1, channels, 4 * (row1 - row0), 4 * (column1 - column0))` window.
    windows: `(rows, 4)` integer (row0, row1, column0, column1) of the image-embedding grid each covers.
    frame_size: `(fh, fw)`, the whole frame's feature grid.
    """

    features: list[torch.Tensor]
    windows: torch.Tensor
    frame_size: tuple[int, int]

    def region(self, row: int) -> torch.Tensor:
        """`(1, 4)` normalised (x0, y0, x1, y1) of the frame that row's window covers."""
        r0, r1, c0, c1 = self.windows[row].tolist()
        height, width = self.frame_size
        return torch.tensor([[4 * c0 / width, 4 * r0 / height, 4 * c1 / width, 4 * r1 / height]])


@dataclass(frozen=True)
class IMedSamQuerySettings:
    """
    The run-time settings of the implicit decoder, read from the model's config at every forward and passed
    explicitly (the decoder keeps no copy: PEFT trains a deep copy of it, whose own config would go stale). Field
    names are `IMedSamConfig`'s.
    """

    query_mode: str
    query_region: str
    query_margin: float
    refine_ratio: float
    query_chunk_size: int
    mc_passes: int
    mc_seed: int
    adaptive_base_size: int | None
    decoder_precision: str

    @classmethod
    def from_config(cls, config: IMedSamConfig) -> IMedSamQuerySettings:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class _QueryContext:
    """What every query of one forward shares: decoder features, SAM's positional embedding, SAM's logits, settings."""

    features: torch.Tensor
    positional_embedding: nn.Module
    sam_logits: torch.Tensor | None
    settings: IMedSamQuerySettings
    maps: tuple[torch.Tensor, ...]  # IMedSamImplicitDecoder.sampling_maps(features, sam_logits): what points sample
    class_index: torch.Tensor | None = None  # (rows,) zero-based: class-aware prompts, one class channel per row
    map_region: torch.Tensor | None = None  # (1, 4) normalised part of the frame the maps cover; default all of it


class IMedSamMaskDecoder(SamMaskDecoder):
    """SAM's mask decoder (same parameter names) that also returns the upscaled image features, over the whole frame
    or over a window of it per prompt."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor | None,
        dense_prompt_embeddings: torch.Tensor,
        windows: torch.Tensor | None = None,
        bf16: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | FeatureWindows]:
        """
        Args:
            image_embeddings: `(batch_size, hidden_size, h, w)`, encoded once per image.
            image_positional_embeddings: `(batch_size, hidden_size, h, w)`.
            sparse_prompt_embeddings: `(batch_size, num_prompts, num_tokens, hidden_size)` or `None` (no prompt).
            dense_prompt_embeddings: `(batch_size or 1, hidden_size, h, w)`.
            windows: `(batch_size * num_prompts, 4)` integer (row0, row1, column0, column1) of the `h x w` embedding
                grid: upscale only that window of each prompt's image tokens (`upscale_windows`); default the frame.
            bf16: run the two-way transformer and its heads (`attend`) under bf16 autocast.

        Returns, prompt-major (row `b * num_prompts + p` is prompt p of image b, as `SamMaskDecoder` lays them out):
            masks `(batch_size * num_prompts, 1, 4h, 4w)` (single-mask output), iou `(batch_size * num_prompts, 1)`
            and upscaled features `(batch_size * num_prompts, hidden_size // 8, 4h, 4w)` (with `windows`, a
            `FeatureWindows`, and the masks `SAM_WINDOW_FLOOR` outside the windows).
        """
        hyper_in, iou, image_tokens = self.attend(
            image_embeddings, image_positional_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings, bf16
        )
        if windows is not None:
            masks, features = self.upscale_windows(hyper_in, image_tokens, windows)
            return masks, iou, features
        upscaled = self.upscale(image_tokens)
        return self.mask_logits(hyper_in, upscaled), iou, upscaled

    def attend(
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor | None,
        dense_prompt_embeddings: torch.Tensor,
        bf16: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The two-way transformer and the heads on its tokens (arguments as `forward`): the mask token's hypernetwork
        output `(rows, hidden_size // 8)`, iou `(rows, 1)` and the image tokens `(rows, hidden_size, h, w)` (a view,
        not copied to that layout). With `bf16`, computed under bf16 autocast (its shapes repeat from call to call,
        so oneDNN's bf16 kernels are made once), the outputs in the inputs' dtype.
        """
        if bf16:
            with torch.autocast(image_embeddings.device.type, dtype=torch.bfloat16):
                outputs = self.attend(
                    image_embeddings, image_positional_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings
                )
            return tuple(output.to(image_embeddings.dtype) for output in outputs)
        batch_size, num_channels, height, width = image_embeddings.shape
        num_prompts = sparse_prompt_embeddings.shape[1] if sparse_prompt_embeddings is not None else 1
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = output_tokens.repeat(batch_size, num_prompts, 1, 1)
        if sparse_prompt_embeddings is not None:
            tokens = torch.cat((tokens, sparse_prompt_embeddings.to(tokens.dtype)), dim=2)
        # Only the two-way transformer and what follows run per prompt; the image was encoded once, and what of the
        # transformer does not depend on the prompt runs once per image.
        rows = batch_size * num_prompts
        point_embedding, image_tokens = shared_image_two_way_transformer(
            self.transformer,
            tokens.reshape(rows, *tokens.shape[2:]),
            (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2).contiguous(),
            image_positional_embeddings.flatten(2).transpose(1, 2).contiguous(),
        )
        # Single-mask output: mask token 0 and its hypernetwork, as SamModel(multimask_output=False).
        hyper_in = self.output_hypernetworks_mlps[0](point_embedding[:, 1, :])
        iou = self.iou_prediction_head(point_embedding[:, 0, :])[..., :1]
        return hyper_in, iou, image_tokens.mT.unflatten(-1, (height, width))

    def upscale(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """SAM's upscaling: `(rows, hidden_size, h, w)` -> `(rows, hidden_size // 8, 4h, 4w)`. Each 4x4 output block
        depends on one image token only, so a window of tokens gives exactly that window of the output."""
        upscaled = self.activation(self.upscale_layer_norm(self.upscale_conv1(image_tokens)))
        return self.activation(self.upscale_conv2(upscaled))

    @staticmethod
    def mask_logits(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """`(rows, channels)` . `(rows, channels, H, W)` -> SAM's mask logits `(rows, 1, H, W)`."""
        return torch.einsum("bc,bchw->bhw", hyper_in, upscaled).unsqueeze(1)

    def upscale_windows(
        self, hyper_in: torch.Tensor, image_tokens: torch.Tensor, windows: torch.Tensor
    ) -> tuple[torch.Tensor, FeatureWindows]:
        """
        Each row's upscaled features and mask logits over its window of the token grid only (`forward`'s
        `windows`): masks `(rows, 1, 4h, 4w)`, `SAM_WINDOW_FLOOR` outside the windows, and a `FeatureWindows`.
        """
        rows, _, height, width = image_tokens.shape
        masks = hyper_in.new_full((rows, 1, 4 * height, 4 * width), SAM_WINDOW_FLOOR)
        parts = []
        for row, (r0, r1, c0, c1) in enumerate(windows.tolist()):
            part = self.upscale(image_tokens[row : row + 1, :, r0:r1, c0:c1])
            masks[row, :, 4 * r0 : 4 * r1, 4 * c0 : 4 * c1] = self.mask_logits(hyper_in[row : row + 1], part)[0]
            parts.append(part)
        return masks, FeatureWindows(parts, windows.clone(), (4 * height, 4 * width))


def _head_blocks(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """
    `(rows, length, heads * head_size)` -> `(rows, heads * length, heads * head_size)` block-diagonal: row
    `h * length + t` holds token t's head-h channels and zeros elsewhere, so one matrix product with it computes every
    head's dot products at once, in the layout the projections use (no per-head transposed copies).
    """
    rows, length, channels = values.shape
    eye = torch.eye(num_heads, dtype=values.dtype, device=values.device)
    blocks = eye.repeat_interleave(length, 0).repeat_interleave(channels // num_heads, 1)
    return values.repeat(1, num_heads, 1) * blocks


def _image_to_token(
    attention: nn.Module, image_queries: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """
    A `SamAttention` (its projections, heads and scaling) of image tokens attending to a few prompt tokens, computed
    with the prompt tokens as the middle axis: the softmax runs over `(rows, heads, num_tokens, h * w)` scores whose
    last axis is the long one (a softmax over a last axis of 7 took 25 ms on a 12-prompt CT slice, this one 1 ms),
    and no per-head copy of the `(h * w)`-long maps is made. The same result as the module, to float rounding.

    Args:
        image_queries: `(batch_size or rows, h * w, hidden_size)`: the image side, shared by an image's prompts when
            it has `batch_size` rows (the first block, where the image tokens are still the image's own).
        tokens: `(rows, num_tokens, hidden_size)` the keys, `values` the values; rows prompt-major per image.

    Returns:
        `(rows, h * w, hidden_size)`.
    """
    rows, num_tokens, _ = tokens.shape
    heads = attention.num_attention_heads
    queries = attention.q_proj(image_queries)  # (B or rows, hw, internal)
    keys = _head_blocks(attention.k_proj(tokens) * attention.scaling, heads)  # (rows, heads * T, internal)
    scores = torch.matmul(keys.reshape(queries.shape[0], -1, keys.shape[-1]), queries.mT)  # (B or rows, ., hw)
    weights = scores.reshape(rows, heads, num_tokens, -1).softmax(2, dtype=torch.float32).to(queries.dtype)
    attended = torch.matmul(
        weights.reshape(rows, heads * num_tokens, -1).mT, _head_blocks(attention.v_proj(values), heads)
    )
    return attention.out_proj(attended)


def _standard_attention(attention: nn.Module) -> bool:
    """Whether a `SamAttention` computes plain softmax attention (eager or SDPA), which `_image_to_token` equals."""
    return getattr(attention.config, "_attn_implementation", None) in (None, "eager", "sdpa")


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A `SamAttention` module on `(rows, length, hidden_size)` inputs, each row on its own (it takes a point-batch
    axis: one here): `(rows, query length, hidden_size)`."""
    return attention(query=query.unsqueeze(1), key=key.unsqueeze(1), value=value.unsqueeze(1))[0].squeeze(1)


def shared_image_two_way_transformer(
    transformer: nn.Module, tokens: torch.Tensor, image: torch.Tensor, positional: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `SamTwoWayTransformer.forward` (its weights, the same result to float rounding) for several prompts of each
    image, computing once per image what does not depend on the prompt. In the first block the image tokens are
    still the image's own, so the projections of the image side (the keys and values the prompt tokens attend to,
    the queries of the image attending back to them) are computed once per image and every prompt of the image
    attends to them in one call; from the first block's image-to-token attention on, the image tokens are the
    prompt's own. The transformer's `(1, 4096, 256)` image map of a 64x64 embedding is not copied per prompt.

    Args:
        transformer: a `SamTwoWayTransformer` (or a PEFT wrapper around one: its attributes are the active copy's).
        tokens: `(rows, num_tokens, hidden_size)` output and prompt tokens, rows prompt-major per image
            (`rows = batch_size * num_prompts`).
        image: `(batch_size, h * w, hidden_size)` image embedding plus dense prompt embedding, flattened.
        positional: `(batch_size or 1, h * w, hidden_size)` the image's positional embedding.

    Returns:
        tokens `(rows, num_tokens, hidden_size)` and image tokens `(rows, h * w, hidden_size)`.
    """
    rows, num_tokens, hidden = tokens.shape
    batch_size = image.shape[0]
    num_prompts = rows // batch_size
    per_image = (batch_size, num_prompts * num_tokens, hidden)  # every prompt's tokens of an image, one sequence
    per_row = positional if positional.shape[0] == 1 else positional.repeat_interleave(num_prompts, 0)
    image_keys = image + positional  # the image side's keys (and queries), with the positional embedding
    queries, keys = tokens, None  # keys None: still the image's own (`image`)
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries)
        else:
            query = queries + tokens
            queries = queries + _attend(layer.self_attn, query, query, queries)
        queries = layer.layer_norm1(queries)
        cross = layer.cross_attn_token_to_image
        if keys is None:  # the image's own keys: one attention per image over all its prompts' tokens
            attended = _attend(cross, (queries + tokens).reshape(per_image), image_keys, image)
            queries = queries + attended.reshape(rows, num_tokens, hidden)
        else:
            keyed = keys + per_row  # the same for both cross attentions: the keys change at the block's end
            queries = queries + _attend(cross, queries + tokens, keyed, keys)
        queries = layer.layer_norm2(queries)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        back = layer.cross_attn_image_to_token
        if keys is None:  # the image's queries once per image, attending to each prompt's own tokens
            attended = _image_to_token(back, image_keys, queries + tokens, queries)
            keys = layer.layer_norm4((image[:, None] + attended.unflatten(0, (batch_size, num_prompts))).flatten(0, 1))
        elif _standard_attention(back):
            keys = layer.layer_norm4(keys + _image_to_token(back, keyed, queries + tokens, queries))
        else:
            keys = layer.layer_norm4(keys + _attend(back, keyed, queries + tokens, queries))
    keys = image.repeat_interleave(num_prompts, 0) if keys is None else keys
    final = transformer.final_attn_token_to_image
    queries = transformer.layer_norm_final_attn(queries + _attend(final, queries + tokens, keys + per_row, keys))
    return queries, keys


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear + BatchNorm + ReLU for each consecutive pair of `sizes`."""
    layers: list[nn.Module] = []
    for in_size, out_size in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(in_size, out_size), nn.BatchNorm1d(out_size), nn.ReLU()]
    return nn.Sequential(*layers)


def pick_classes(values: torch.Tensor, class_index: torch.Tensor | None) -> torch.Tensor:
    """
    Class-aware prompts: logits `(..., rows, num_points, num_classes)` -> `(..., rows, num_points, 1)`, each row's
    own class (`class_index` `(rows,)`, zero-based); unchanged without `class_index`.
    """
    if class_index is None:
        return values
    index = class_index.to(values.device).reshape(-1, 1, 1).expand(*values.shape[-3:-1], 1)
    return values.gather(-1, index.expand(*values.shape[:-1], 1))


class IMedSamImplicitDecoder(nn.Module):
    """
    Coarse-to-fine implicit decoder with uncertainty-guided sampling (I-MedSAM, section 3.3).

    A query point at normalised coordinate (x, y) in [0, 1]^2 of the model's input frame is described by the
    bilinear sample of the mask decoder's upscaled features, SAM's random-Fourier positional encoding of the
    coordinate and a NeRF-style encoding with `num_frequencies` octaves. The coarse MLP predicts a logit per
    class and a coarse feature for every point; the fine MLP re-predicts the most uncertain points from the
    point's input feature and its coarse feature.

    Uncertainty is the variance over `mc_passes` Monte-Carlo dropout passes of the coarse head's probabilities.
    Dropout sits on the head's input (not its output: dropping the logit itself would make the variance grow
    with the logit's magnitude, i.e. with confidence). In training the passes use fresh random masks; at
    inference they use fixed channel masks drawn from `mc_seed`, so the selection stays uncertainty-driven yet
    deterministic and independent of the batch composition.
    """

    def __init__(self, config: IMedSamConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_frequencies = config.num_frequencies
        # Coarse-to-fine coordinate annealing in training (`set_frequency_fraction`): the share of octaves on.
        self.frequency_fraction = 1.0
        feature_size = config.mask_decoder_config.hidden_size // 8
        position_size = 2 * config.vision_config.num_pos_feats
        self.use_sam_prior = config.implicit_sam_prior
        self.input_size = feature_size + position_size + 2 + 4 * config.num_frequencies + int(self.use_sam_prior)
        coarse_sizes = [self.input_size, *config.coarse_hidden_sizes]
        self.coarse_mlp = _mlp(coarse_sizes)
        self.coarse_dropout = nn.Dropout(config.implicit_dropout)
        self.coarse_head = nn.Linear(coarse_sizes[-1], config.num_classes + config.coarse_feature_size)
        fine_sizes = [self.input_size + config.coarse_feature_size, *config.fine_hidden_sizes]
        self.fine_mlp = _mlp(fine_sizes)
        self.fine_head = nn.Linear(fine_sizes[-1], config.num_classes)
        self.__dict__["_dropout_masks"] = {}  # (mc_passes, mc_seed, device) -> masks; derived, never saved
        self.__dict__["_folded_layers"] = {}  # id(linear) -> (the tensors' identities and versions, folded pair)

    def inference_dropout_masks(self, settings: IMedSamQuerySettings, device=None) -> torch.Tensor:
        """
        The fixed Monte-Carlo dropout masks of inference, `(mc_passes, hidden)`, scaled like `nn.Dropout`: drawn on
        the CPU from `mc_seed` (the same masks on every device), cached per settings and device.
        """
        key = (settings.mc_passes, settings.mc_seed, str(device))
        if key not in self._dropout_masks:
            generator = torch.Generator(device="cpu").manual_seed(settings.mc_seed)
            hidden, rate = self.config.coarse_hidden_sizes[-1], self.config.implicit_dropout
            keep = torch.rand(settings.mc_passes, hidden, generator=generator, device="cpu") >= rate
            self._dropout_masks[key] = (keep.float() / (1 - rate)).to(device)
        return self._dropout_masks[key]

    def encode_coordinates(self, coordinates: torch.Tensor) -> torch.Tensor:
        """
        NeRF positional encoding: `(..., 2)` in [0, 1] -> `(..., 2 + 4 * num_frequencies)`. In training with a
        `frequency_fraction` F < 1 (coordinate annealing), only the lowest ceil(F * num_frequencies) octaves are on
        (at least one); the others are 0. Outside training every octave is on.
        """
        centred = 2 * coordinates - 1
        octaves = 2.0 ** torch.arange(self.num_frequencies, device=coordinates.device, dtype=coordinates.dtype)
        angles = math.pi * centred[..., None] * octaves
        sines, cosines = angles.sin(), angles.cos()
        if self.training and self.frequency_fraction < 1:
            kept = max(1, math.ceil(self.frequency_fraction * self.num_frequencies))
            on = (torch.arange(self.num_frequencies, device=coordinates.device) < kept).to(coordinates.dtype)
            sines, cosines = sines * on, cosines * on
        return torch.cat([centred, sines.flatten(-2), cosines.flatten(-2)], dim=-1)

    def sampling_maps(self, features: torch.Tensor, sam_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """
        What `point_features` samples: the upscaled decoder features `(batch_size, channels, fh, fw)`, and SAM's mask
        logits `(batch_size, 1, fh, fw)` under `implicit_sam_prior`. Kept as separate maps sampled at the same points:
        one map with the logits as one more channel would copy the whole feature map (a quarter of the implicit
        decoder's time on a 12-organ CT slice).
        """
        if self.use_sam_prior:
            return features, sam_logits.to(features.dtype)
        return (features,)

    def point_features(
        self,
        maps: tuple[torch.Tensor, ...],
        positional_embedding: nn.Module,
        coordinates: torch.Tensor,
        map_region: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            maps: `sampling_maps(features, sam_logits)`, covering the input frame (or `map_region` of it).
            positional_embedding: SAM's `SamPositionalEmbedding` (coordinates in [0, 1] -> 2 * num_pos_feats).
            coordinates: `(batch_size, num_points, 2)` as (x, y) in [0, 1] of the frame.
            map_region: `(1, 4)` normalised (x0, y0, x1, y1) of the frame that the maps cover, aligned to their
                pixels (a `FeatureWindows` window): the same bilinear samples as the whole frame's maps wherever a
                point's neighbouring pixels lie inside it.

        Returns:
            `(batch_size, num_points, input_size)`: the bilinear sample of the features, the two positional
            encodings and, with `implicit_sam_prior`, SAM's logit last.
        """
        features = maps[0]
        local = coordinates
        if map_region is not None:
            low, high = map_region[:, :2].to(coordinates), map_region[:, 2:].to(coordinates)
            local = (coordinates - low) / (high - low)
        grid = (2 * local - 1).unsqueeze(1).to(features.dtype)
        sampled = [
            F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False).squeeze(2).mT
            for values in maps
        ]
        position = positional_embedding(coordinates.unsqueeze(1)).squeeze(1)
        coordinate_code = self.encode_coordinates(coordinates)
        parts = [sampled[0], position.to(features.dtype), coordinate_code.to(features.dtype), *sampled[1:]]
        return torch.cat(parts, dim=-1)

    def _prior(self, point_inputs: torch.Tensor) -> torch.Tensor | float:
        """SAM's logit at each point `(batch_size, num_points, 1)` with `implicit_sam_prior`, else 0."""
        return point_inputs[..., -1:] if self.use_sam_prior else 0.0

    def _flat(self, mlp: nn.Sequential, inputs: torch.Tensor) -> torch.Tensor:
        """
        Apply an `_mlp` to `(batch_size, num_points, channels)` points through a flat batch (BatchNorm1d).

        Outside training each BatchNorm is folded into its Linear (the same affine map, computed once per call):
        one matrix product and an in-place ReLU per layer instead of three passes over `N x hidden` activations.
        """
        batch_size, num_points, _ = inputs.shape
        # Explicit sizes: `-1` is ambiguous for zero points (refine_ratio 0).
        hidden = inputs.reshape(batch_size * num_points, inputs.shape[-1])
        if self.training:
            hidden = mlp(hidden)
        else:
            for linear, norm in zip(mlp[0::3], mlp[1::3]):
                hidden = F.linear(hidden, *self._folded(linear, norm)).relu_()
        return hidden.reshape(batch_size, num_points, hidden.shape[-1])

    def _folded(self, linear: nn.Linear, norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
        """`fold_batchnorm(norm, linear.weight, linear.bias)`, kept while none of the six tensors changes (their
        storage and in-place version counters are the key: an optimizer step or `load_state_dict` refolds). A region
        query calls `_flat` a few times per prompt: folding the 1024 x 331 weight each time cost ~10% of decoding.
        Computed afresh when gradients may flow to the weights."""
        tensors = (linear.weight, linear.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return fold_batchnorm(norm, linear.weight, linear.bias)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
        cached = self._folded_layers.get(id(linear))
        if cached is None or cached[0] != key:
            cached = (key, fold_batchnorm(norm, linear.weight, linear.bias))
            self._folded_layers[id(linear)] = cached
        return cached[1]

    def _coarse_logits(self, hidden: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
        """The coarse head's class logits only `(..., num_classes)`: its first rows, skipping the coarse features."""
        head = self.coarse_head
        return pick_classes(
            F.linear(hidden, head.weight[: self.num_classes], head.bias[: self.num_classes]), class_index
        )

    def coarse(
        self,
        point_inputs: torch.Tensor,
        settings: IMedSamQuerySettings,
        with_features: bool = True,
        class_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """
        Coarse prediction and uncertainty (over `settings.mc_passes` Monte-Carlo passes) of
        `(batch_size, num_points, input_size)` point inputs.

        Returns logits `(batch_size, num_points, num_classes)`, coarse features
        `(batch_size, num_points, coarse_feature_size)` (None without `with_features`: points the fine decoder
        will not see skip that part of the head) and uncertainty `(batch_size, num_points)`. With `class_index`
        `(batch_size,)` (class-aware prompts) each row keeps only its class's channel: logits `(..., 1)`, and the
        uncertainty is that class's.
        """
        hidden = self._flat(self.coarse_mlp, point_inputs)
        prior = self._prior(point_inputs)
        if with_features:
            head = self.coarse_head(self.coarse_dropout(hidden))
            logits = pick_classes(head[..., : self.num_classes], class_index) + prior
            coarse_features = head[..., self.num_classes :]
        else:
            logits, coarse_features = self._coarse_logits(self.coarse_dropout(hidden), class_index) + prior, None
        with torch.no_grad():
            # The passes only need the logits: the head's class rows, not its coarse-feature rows.
            if self.training:
                passes = [F.dropout(hidden, self.coarse_dropout.p, training=True) for _ in range(settings.mc_passes)]
                pass_logits = torch.stack([self._coarse_logits(h, class_index) for h in passes])
            else:
                # Fixed channel masks fold into the head's rows, (h * m) @ w.T == h @ (w * m).T: every pass in
                # one matrix product, without a masked copy of the hidden activations per pass.
                weight, bias = self.coarse_head.weight[: self.num_classes], self.coarse_head.bias[: self.num_classes]
                masks = self.inference_dropout_masks(settings, weight.device).to(weight.dtype)
                stacked = (masks[:, None, :] * weight[None]).flatten(0, 1)
                pass_logits = F.linear(hidden, stacked, bias.repeat(len(masks)))
                pass_logits = pass_logits.unflatten(-1, (len(masks), self.num_classes)).movedim(-2, 0)
                pass_logits = pick_classes(pass_logits, class_index)
            probabilities = (pass_logits + prior).sigmoid()
            uncertainty = probabilities.float().var(dim=0).mean(dim=-1)
        return logits, coarse_features, uncertainty

    def fine(
        self, point_inputs: torch.Tensor, coarse_features: torch.Tensor, class_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fine logits `(batch_size, num_points, num_classes)` (or `(..., 1)`, see `coarse`) of the points."""
        hidden = self._flat(self.fine_mlp, torch.cat([point_inputs, coarse_features], dim=-1))
        return pick_classes(self.fine_head(hidden), class_index) + self._prior(point_inputs)

    @staticmethod
    def num_refined_points(num_points: int, settings: IMedSamQuerySettings) -> int:
        """Points the fine decoder predicts per image: round(refine_ratio * num_points)."""
        return int(round(settings.refine_ratio * num_points))

    def forward(
        self,
        features: torch.Tensor | FeatureWindows,
        positional_embedding: nn.Module,
        output_size: tuple[int, int],
        output_region: torch.Tensor | None = None,
        sam_logits: torch.Tensor | None = None,
        query_coordinates: torch.Tensor | None = None,
        *,
        settings: IMedSamQuerySettings,
        class_index: torch.Tensor | None = None,
        regions_of_interest: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Query every point of an `output_size` grid covering the input frame (or each image's `output_region`), or
        the given `query_coordinates`.

        Args:
            features: upscaled decoder features `(batch_size, channels, fh, fw)`, or each row's window of them
                (`FeatureWindows`, with `regions_of_interest` inside the windows: region queries only).
            positional_embedding: SAM's shared positional embedding module.
            output_size: `(height, width)` of the output grid.
            output_region: `(batch_size, 4)` normalised (x0, y0, x1, y1) of the input frame the grid spans, e.g.
                the unpadded image area; default the whole frame.
            sam_logits: SAM's low-resolution mask logits `(batch_size, 1, fh, fw)`, used with `implicit_sam_prior`.
            query_coordinates: `(batch_size, num_points, 2)` (x, y) in [0, 1] of the input frame: predict these
                points instead of a grid (e.g. sampled training points); outputs are then `(..., 1, num_points)`.
            settings: the run-time settings (query mode, refine ratio, chunk size, MC passes); required.
            class_index: `(batch_size,)` zero-based class of each row (class-aware prompts): only that class's
                last layers are used, and the outputs have one channel.
            regions_of_interest: `(batch_size, 4)` normalised (x0, y0, x1, y1) of the input frame where each row's
                structure can be (adaptive inference with one output channel): queried there only, SAM's own
                logits elsewhere (`_query_regions`). `IMedSamModel.forward` derives them from the box prompts.

        Returns:
            logits, coarse logits `(batch_size, num_classes, height, width)`, uncertainty
            `(batch_size, height, width)` and refined `(batch_size, height, width)` bool.
        """
        if isinstance(features, FeatureWindows):
            region_query = not self.training and settings.query_mode == "adaptive" and query_coordinates is None
            if not (region_query and regions_of_interest is not None and sam_logits is not None):
                raise ValueError(
                    "Upscaled features over windows (`FeatureWindows`) are for box prompts queried in their regions "
                    "of interest only (adaptive inference with `regions_of_interest` and `sam_logits`)."
                )
            if class_index is None and self.num_classes != 1:
                raise ValueError("`FeatureWindows` need one output channel: pass `class_index` (class-aware prompts).")
            context = _QueryContext(features, positional_embedding, sam_logits, settings, (), class_index)
            base_size = self.adaptive_base_size(sam_logits, settings)
            return self._query_regions(context, output_size, output_region, regions_of_interest, base_size)
        maps = self.sampling_maps(features, sam_logits)
        context = _QueryContext(features, positional_embedding, sam_logits, settings, maps, class_index)
        if query_coordinates is not None:
            height, width = 1, query_coordinates.shape[1]
            coordinates = query_coordinates.to(features.device, torch.float32)
        else:
            height, width = output_size
            if not self.training and settings.query_mode == "adaptive":
                base_size = self.adaptive_base_size(features, settings)
                channels = 1 if class_index is not None else self.num_classes
                if regions_of_interest is not None and sam_logits is not None and channels == 1:
                    return self._query_regions(context, output_size, output_region, regions_of_interest, base_size)
                if height * width > base_size[0] * base_size[1]:
                    return self._query_adaptive(context, output_size, base_size, output_region)
            coordinates = region_coordinates(height, width, features.shape[0], output_region, features.device)
        query = self._query_train if self.training else self._query_eval
        coarse_logits, uncertainty, fine_logits, selected = query(context, coordinates)
        logits = coarse_logits.scatter(1, selected[..., None].expand(-1, -1, coarse_logits.shape[-1]), fine_logits)
        refined = torch.zeros_like(uncertainty, dtype=torch.bool).scatter(1, selected, True)
        return self._to_grids(logits, coarse_logits, uncertainty, refined, (height, width))

    def _to_grids(self, logits, coarse_logits, uncertainty, refined, size):
        """Point-major `(B, N, C)` / `(B, N)` results -> `(B, C, H, W)` / `(B, H, W)` grids."""
        batch_size = logits.shape[0]

        def to_grid(values: torch.Tensor) -> torch.Tensor:
            return values.transpose(1, 2).reshape(batch_size, values.shape[-1], *size)

        return (
            to_grid(logits),
            to_grid(coarse_logits),
            uncertainty.reshape(batch_size, *size),
            refined.reshape(batch_size, *size),
        )

    def _select(self, uncertainty: torch.Tensor, settings: IMedSamQuerySettings, k: int | None = None) -> torch.Tensor:
        """
        Indices `(batch_size, k)` of each image's k most uncertain points (k: refine_ratio of them).

        A few k out of millions of points (a large adaptive output) are chosen block by block: the top k of each
        block, then the top k of those candidates, the same set as one `topk`. One CPU `topk` over N points holds
        N (value, index) pairs at once, 64 MB at 2048x2048; a block holds `TOPK_BLOCK`.
        """
        num_points = uncertainty.shape[1]
        k = self.num_refined_points(num_points, settings) if k is None else k
        if num_points <= TOPK_BLOCK or 2 * k > TOPK_BLOCK:
            return uncertainty.topk(k, dim=1, sorted=False).indices
        values, indices = [], []
        for start in range(0, num_points, TOPK_BLOCK):
            block = uncertainty[:, start : start + TOPK_BLOCK]
            best = block.topk(min(k, block.shape[1]), dim=1, sorted=False)
            values.append(best.values)
            indices.append(best.indices + start)
        winners = torch.cat(values, dim=1).topk(k, dim=1, sorted=False).indices
        return torch.cat(indices, dim=1).gather(1, winners)

    def _query_train(self, context, coordinates):
        # Every point keeps its activations for backward anyway, so there is nothing to gain from chunking;
        # BatchNorm also wants one set of statistics per step.
        point_inputs = self.point_features(context.maps, context.positional_embedding, coordinates)
        coarse_logits, coarse_features, uncertainty = self.coarse(
            point_inputs, context.settings, class_index=context.class_index
        )
        selected = self._select(uncertainty, context.settings)
        gather = selected[..., None]
        fine_logits = self.fine(
            point_inputs.gather(1, gather.expand(-1, -1, point_inputs.shape[-1])),
            coarse_features.gather(1, gather.expand(-1, -1, coarse_features.shape[-1])),
            context.class_index,
        )
        return coarse_logits, uncertainty, fine_logits, selected

    def _query_chunked(self, context, coordinates, with_fine: bool):
        """
        Coarse logits `(B, N, C)`, uncertainty `(B, N)` and, `with_fine`, fine logits `(B, N, C)` (else None) of
        many points, `query_chunk_size` at a time: only these outputs are kept, never `N x hidden` activations.

        With `decoder_precision="bf16"` (inference) the points run under bf16 autocast, their number padded to a
        multiple of `BF16_POINT_BUCKET` (the last point repeated, its results dropped): oneDNN makes a bf16 kernel for
        each new matrix shape, ~3 ms each, and regions of interest give a new point count at nearly every call.
        Outputs float32.
        """
        if context.settings.decoder_precision == "bf16" and not self.training:
            count = coordinates.shape[1]
            padded = -(-count // BF16_POINT_BUCKET) * BF16_POINT_BUCKET
            if padded > count:
                coordinates = torch.cat([coordinates, coordinates[:, -1:].expand(-1, padded - count, -1)], dim=1)
            fp32 = replace(context, settings=replace(context.settings, decoder_precision="fp32"))
            with torch.autocast(coordinates.device.type, dtype=torch.bfloat16):
                outputs = self._query_chunked(fp32, coordinates, with_fine)
            return tuple(None if output is None else output[:, :count].float() for output in outputs)
        chunk = context.settings.query_chunk_size
        coarse, uncertainty, fine = [], [], []
        for start in range(0, coordinates.shape[1], chunk):
            point_inputs = self.point_features(
                context.maps, context.positional_embedding, coordinates[:, start : start + chunk], context.map_region
            )
            chunk_logits, coarse_features, chunk_uncertainty = self.coarse(
                point_inputs, context.settings, with_features=with_fine, class_index=context.class_index
            )
            coarse.append(chunk_logits)
            uncertainty.append(chunk_uncertainty)
            if with_fine:
                fine.append(self.fine(point_inputs, coarse_features, context.class_index))
        if not coarse:  # no points (refine_ratio 0)
            channels = self.num_classes if context.class_index is None else 1
            empty = coordinates.new_zeros(coordinates.shape[0], 0, channels)
            return empty, empty[..., 0], empty if with_fine else None
        fine_logits = torch.cat(fine, dim=1) if with_fine else None
        return torch.cat(coarse, dim=1), torch.cat(uncertainty, dim=1), fine_logits

    def _query_eval(self, context, coordinates):
        coarse_logits, uncertainty, _ = self._query_chunked(context, coordinates, with_fine=False)
        selected = self._select(uncertainty, context.settings)
        selected_coordinates = coordinates.gather(1, selected[..., None].expand(-1, -1, 2))
        _, _, fine_logits = self._query_chunked(context, selected_coordinates, with_fine=True)
        return coarse_logits, uncertainty, fine_logits, selected

    @staticmethod
    def adaptive_base_size(features: torch.Tensor, settings: IMedSamQuerySettings) -> tuple[int, int]:
        """Side of the bounded grid the coarse decoder always evaluates in adaptive mode (square)."""
        half = max(1, max(features.shape[-2:]) // 2)
        side = settings.adaptive_base_size or min(half, DEFAULT_ADAPTIVE_BASE_SIZE)
        return side, side

    def _query_regions(self, context, output_size, output_region, regions, base_size):
        """
        Each row queried in its region of interest only (`query_region="box"`): the output pixels covering the
        region are predicted as a grid of their own, with the adaptive base density of the whole output (at least
        `MIN_REGION_BASE_SIZE` points a side, so small structures get more points, and every point exactly when the
        region has no more pixels than that); the other pixels take SAM's own logits on the output grid, which the
        region (it holds SAM's mask) leaves at background. Cost follows each structure's area.
        """
        device = context.sam_logits.device
        height, width = output_size
        rows = context.sam_logits.shape[0]
        sam_grid = sam_mask_on_grid(context.sam_logits.float(), self.config.image_size, output_size, output_region)
        logits, coarse_logits = sam_grid.clone(), sam_grid
        uncertainty = sam_grid.new_zeros(rows, height, width)
        refined = torch.zeros(rows, height, width, dtype=torch.bool, device=sam_grid.device)
        coarse_logits = coarse_logits.clone()
        pixels, sub_regions = region_pixels(regions, output_size, output_region)
        for row, (r0, r1, c0, c1) in enumerate(pixels):
            if c1 <= c0 or r1 <= r0:
                continue  # the region lies outside the output grid: SAM's logits (background) everywhere
            sub = (r1 - r0, c1 - c0)
            sub_region = sub_regions[row : row + 1]
            row_context = self._row_context(context, row)
            side = max(MIN_REGION_BASE_SIZE, round(base_size[0] * max(sub) / max(height, width)))
            if sub[0] * sub[1] > side * side:
                parts = self._query_adaptive(row_context, sub, (side, side), sub_region)
            else:  # every point of a small region, exactly
                coordinates = region_coordinates(*sub, 1, sub_region, device)
                coarse, point_uncertainty, fine, selected = self._query_eval(row_context, coordinates)
                merged = coarse.scatter(1, selected[..., None].expand(-1, -1, coarse.shape[-1]), fine)
                chosen = torch.zeros_like(point_uncertainty, dtype=torch.bool).scatter(1, selected, True)
                parts = self._to_grids(merged, coarse, point_uncertainty, chosen, sub)
            for full, part in zip((logits, coarse_logits, uncertainty, refined), parts):
                full[row, ..., r0:r1, c0:c1] = part[0].to(full.dtype)
        return logits, coarse_logits, uncertainty, refined

    def _row_context(self, context: _QueryContext, row: int) -> _QueryContext:
        """One row's share of a region query's context: its features (its window of them with `FeatureWindows`)."""
        class_index = None if context.class_index is None else context.class_index[row : row + 1]
        sam_logits = context.sam_logits[row : row + 1]
        if not isinstance(context.features, FeatureWindows):
            maps = tuple(values[row : row + 1] for values in context.maps)
            return _QueryContext(
                context.features[row : row + 1],
                context.positional_embedding,
                sam_logits,
                context.settings,
                maps,
                class_index,
            )
        features = context.features.features[row]
        r0, r1, c0, c1 = (4 * v for v in context.features.windows[row].tolist())
        window_logits = sam_logits[..., r0:r1, c0:c1]
        maps = self.sampling_maps(features, window_logits)
        map_region = context.features.region(row).to(features.device)
        return _QueryContext(
            features, context.positional_embedding, window_logits, context.settings, maps, class_index, map_region
        )

    def _query_adaptive(self, context, output_size, base_size, output_region):
        """
        Resolution-free inference at nearly constant cost (see docs/adaptive_querying.md):

        1. the coarse decoder runs on a bounded base grid (longest side `adaptive_base_size`, by default half the
           decoder features' resolution, at most 128) over the same region;
        2. its uncertainty and logits are upsampled bilinearly to the output grid;
        3. only the most uncertain output points, as many as the base grid's refine budget scaled by the
           upsampling factor (uncertain points lie along boundaries, whose length grows with the side, not the
           area), are predicted exactly: coarse and fine decoder at their own coordinates.

        Full-size maps are made only when needed and written in place, so that the peak memory at a large
        output is a few output-size maps plus one chunk of activations.
        """
        features = context.features
        height, width = output_size
        batch_size = features.shape[0]
        scale = base_size[0] / max(height, width)
        base_h, base_w = max(1, round(height * scale)), max(1, round(width * scale))
        base_coordinates = region_coordinates(base_h, base_w, batch_size, output_region, features.device)
        base_logits, base_uncertainty, _ = self._query_chunked(context, base_coordinates, with_fine=False)
        uncertainty = F.interpolate(
            base_uncertainty.reshape(batch_size, 1, base_h, base_w),
            size=output_size,
            mode="bilinear",
            align_corners=False,
        ).flatten(1)
        factor = max(height / base_h, width / base_w)
        k = min(height * width, int(round(context.settings.refine_ratio * base_h * base_w * factor)))
        selected = self._select(uncertainty, context.settings, k)
        coordinates = region_coordinates(height, width, batch_size, output_region, features.device, selected)
        exact_coarse, exact_uncertainty, fine_logits = self._query_chunked(context, coordinates, with_fine=True)
        grid = base_logits.transpose(1, 2).reshape(batch_size, base_logits.shape[-1], base_h, base_w)
        coarse_logits = F.interpolate(grid, size=output_size, mode="bilinear", align_corners=False)
        coarse_logits = coarse_logits.flatten(2).transpose(1, 2)
        expand = selected[..., None].expand(-1, -1, base_logits.shape[-1])
        # Under autocast the upsampled maps are float32 and the MLP outputs half precision: write in float32. The
        # upsampled maps are fresh tensors, written in place: at large outputs every full-size copy is peak memory.
        coarse_logits = coarse_logits.float().scatter_(1, expand, exact_coarse.float())
        uncertainty = uncertainty.float().scatter_(1, selected, exact_uncertainty.float())
        logits = coarse_logits.clone().scatter_(1, expand, fine_logits.float())
        refined = torch.zeros_like(uncertainty, dtype=torch.bool).scatter(1, selected, True)
        return self._to_grids(logits, coarse_logits, uncertainty, refined, output_size)


def region_coordinates(
    height: int,
    width: int,
    batch_size: int,
    output_region: torch.Tensor | None,
    device=None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Pixel-centre coordinates `(batch_size, N, 2)` (x, y) in [0, 1] of a `height x width` grid spanning each
    image's `output_region` (default the whole frame); only the flat grid `indices` `(batch_size, N)` if given.
    """
    if indices is None:
        coordinates = grid_coordinates(height, width, device).reshape(1, -1, 2).expand(batch_size, -1, -1)
    else:
        rows = torch.div(indices, width, rounding_mode="floor")
        columns = indices - rows * width
        coordinates = torch.stack([(columns + 0.5) / width, (rows + 0.5) / height], dim=-1).float()
    if output_region is None:
        return coordinates
    region = output_region.to(coordinates.device, torch.float32)
    return region[:, None, :2] + coordinates * (region[:, None, 2:] - region[:, None, :2])


def region_pixels(
    regions: torch.Tensor, output_size: tuple[int, int], output_region: torch.Tensor | None
) -> tuple[list[list[int]], torch.Tensor]:
    """
    The output-grid pixels covering each region of interest: `(row0, row1, column0, column1)` per row of `regions`
    `(rows, 4)` (normalised (x0, y0, x1, y1) of the frame), on an `output_size` grid spanning each row's
    `output_region` (default the frame), and the frame part `(rows, 4)` those pixels cover.
    """
    height, width = output_size
    rows, device = regions.shape[0], regions.device
    frame = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand(rows, 4)
    region = frame if output_region is None else output_region.to(device, torch.float32).expand(rows, 4)
    span = (region[:, 2:] - region[:, :2]).clamp_min(1e-8)
    low = ((regions[:, :2].to(region) - region[:, :2]) / span).clamp(0, 1)
    high = ((regions[:, 2:].to(region) - region[:, :2]) / span).clamp(0, 1)
    size = torch.tensor([width, height], device=device, dtype=region.dtype)
    first, last = (low * size).floor(), (high * size).ceil()
    pixels = torch.stack([first[:, 1], last[:, 1], first[:, 0], last[:, 0]], 1).long().tolist()
    covered = torch.cat([region[:, :2] + first / size * span, region[:, :2] + last / size * span], 1)
    return pixels, covered


def sam_mask_extents(sam_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Where SAM's mask (logits > 0) lies: whether each row has one `(rows,)` and its bounding box `(rows, 4)` in pixels
    of the logit map, (x0, y0, x1, y1) with the ends exclusive, on the map's device; rows without a mask get a
    meaningless box. `sam_logits`: `(rows, 1, h, w)`.
    """
    positive = sam_logits.reshape(-1, *sam_logits.shape[-2:]) > 0  # (rows, h, w)
    height, width = positive.shape[-2:]
    rows_with_mask, columns_with_mask = positive.any(dim=2), positive.any(dim=1)  # (rows, h), (rows, w)
    first_column = torch.argmax(columns_with_mask.int(), dim=1)
    last_column = width - torch.argmax(columns_with_mask.flip(1).int(), dim=1)
    first_row = torch.argmax(rows_with_mask.int(), dim=1)
    last_row = height - torch.argmax(rows_with_mask.flip(1).int(), dim=1)
    return rows_with_mask.any(dim=1), torch.stack([first_column, first_row, last_column, last_row], dim=1)


def sam_mask_on_grid(
    sam_logits: torch.Tensor, image_size: int, output_size: tuple[int, int], output_region: torch.Tensor | None
) -> torch.Tensor:
    """
    SAM's own mask post-processing: low-resolution logits `(B, 1, h, w)` upsampled to the input frame, cropped
    to `output_region` (the unpadded image) and resized to `output_size` -> `(B, 1, height, width)`.
    """
    frame = F.interpolate(sam_logits, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if output_region is None:
        return F.interpolate(frame, size=output_size, mode="bilinear", align_corners=False)
    masks = []
    for logits, region in zip(frame, output_region.tolist()):
        x0, y0, x1, y1 = (int(round(v * image_size)) for v in region)
        crop = logits[None, :, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        masks.append(F.interpolate(crop, size=output_size, mode="bilinear", align_corners=False))
    return torch.cat(masks)


def grid_coordinates(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates `(height, width, 2)` as (x, y) in [0, 1] of a grid covering the input frame."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


class IMedSamPreTrainedModel(SamPreTrainedModel):
    config: IMedSamConfig
    config_class = IMedSamConfig
    base_model_prefix = "i_medsam"
    _no_split_modules = ["SamVisionLayer", "IMedSamImplicitDecoder"]

    def _init_weights(self, module: nn.Module):
        # A TinyViT vision encoder is a sub-model (`IMedSamTinyViTPreTrainedModel`): transformers hands its modules to
        # its own `_init_weights` (which also re-creates its non-persistent buffers), never to this method.
        if isinstance(module, SamPositionalEmbedding):
            # SamPreTrainedModel reads `self.config.use_abs_pos`, a vision-config field; handle it here.
            nn.init.normal_(module.positional_embedding, std=module.scale)
        elif isinstance(module, SamVisionEncoder):
            if module.pos_embed is not None:
                nn.init.zeros_(module.pos_embed)
        else:
            super()._init_weights(module)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """
        Whether activation checkpointing is on. peft's `PeftModel` reads this older name of
        `is_activation_checkpointing` when it wraps a model; answering it here spares every PEFT run transformers'
        deprecation warning.
        """
        return self.is_activation_checkpointing


class IMedSamModel(IMedSamPreTrainedModel):
    """
    I-MedSAM: frozen SAM encoder, SAM's prompt encoder and two-way mask decoder, and an implicit decoder that
    predicts masks at any output resolution.
    """

    _tied_weights_keys = {
        "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"
    }

    def __init__(self, config: IMedSamConfig):
        super().__init__(config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = build_vision_encoder(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        config.mask_decoder_config._attn_implementation = config._attn_implementation
        self.mask_decoder = IMedSamMaskDecoder(config.mask_decoder_config)
        self.implicit_decoder = IMedSamImplicitDecoder(config) if config.use_implicit_decoder else None
        self.post_init()
        if config.adapter_config is not None:
            inject_frequency_adapter(self, config.adapter_config)

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_encoder.patch_embed

    def train(self, mode: bool = True) -> IMedSamModel:
        """Like `nn.Module.train`, but BatchNorm layers whose parameters are all frozen stay in eval mode.

        A frozen backbone with BatchNorm (LiteMedSAM's TinyViT) must keep its running statistics: in train mode
        they would be replaced by the statistics of the current, often single-image, batch.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    parameters = list(module.parameters())
                    if parameters and not any(p.requires_grad for p in parameters):
                        module.eval()
        return self

    def image_positional_embeddings(self, batch_size: int) -> torch.Tensor:
        """SAM's dense positional encoding of the embedding grid, `(batch_size, hidden_size, h, w)`."""
        size = self.config.embedding_size
        coordinates = grid_coordinates(size, size, self.shared_image_embedding.positional_embedding.device)
        embedding = self.shared_image_embedding(coordinates.to(self.shared_image_embedding.positional_embedding.dtype))
        return embedding.permute(2, 0, 1).unsqueeze(0).expand(batch_size, -1, -1, -1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, 3, S, S)` normalised pixels -> image embeddings `(batch_size, hidden_size, h, w)`."""
        outputs = self.vision_encoder(pixel_values)
        return outputs if isinstance(outputs, torch.Tensor) else outputs.last_hidden_state

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_boxes: torch.FloatTensor | None = None,
        input_points: torch.FloatTensor | None = None,
        input_labels: torch.LongTensor | None = None,
        output_size: tuple[int, int] | int | None = None,
        output_region: torch.FloatTensor | None = None,
        query_coordinates: torch.FloatTensor | None = None,
        image_embeddings: torch.FloatTensor | None = None,
        input_classes: torch.LongTensor | None = None,
        full_sam_logits: bool = False,
        **kwargs,
    ) -> IMedSamOutput:
        r"""
        Args:
            pixel_values (`(batch_size, 3, image_size, image_size)`): normalised, padded input images.
            input_boxes (`(batch_size, 4)` or `(batch_size, num_prompts, 4)`, *optional*): boxes (x0, y0, x1, y1)
                in input-frame pixels: one per image, or `num_prompts` per image (`SamModel`'s prompt batch).
            input_points (`(batch_size, num_points, 2)` or `(batch_size, num_prompts, num_points, 2)`, *optional*):
                point prompts (x, y) in input-frame pixels, with `input_labels` (`(batch_size, [num_prompts,]
                num_points)`, 1 foreground, 0 background, -10 padding).
            output_size (`(height, width)` or `int`, *optional*): grid of the returned masks, covering the input
                frame; defaults to `(image_size, image_size)`.
            output_region (`(batch_size, 4)` or `(4,)`, *optional*): normalised (x0, y0, x1, y1) part of the input
                frame that the output grid spans, e.g. the unpadded image (see `IMedSamProcessor`), so masks come
                out at the original image size directly; default the whole frame.
            query_coordinates (`(batch_size, num_points, 2)` or `(batch_size, num_prompts, num_points, 2)`,
                *optional*): (x, y) in [0, 1] of the input frame to predict instead of a grid (training on sampled
                points), the same for every prompt of an image or each prompt's own; outputs are then
                `(..., 1, num_points)`.
            image_embeddings (`(batch_size, hidden_size, h, w)`, *optional*): precomputed encoder output, instead
                of `pixel_values`.
            input_classes (`(batch_size,)` or `(batch_size, num_prompts)`, *optional*): class-aware prompts, for a
                model with `num_classes > 1`: the class id (1..num_classes) each prompt is for. Only that class's last
                layers (coarse and fine heads) predict the prompt's mask and its uncertainty, and the outputs have one
                class channel.
            full_sam_logits (`bool`, defaults to `False`): SAM's own mask logits (`sam_logits`) over the whole frame
                for every prompt. By default, when box prompts are decoded in their regions of interest (inference,
                `query_region="box"`, adaptive querying, one output channel), SAM's decoder upscales each prompt only
                in the window its region needs (`_decode_in_windows`), and `sam_logits` are `SAM_WINDOW_FLOOR`
                (background) outside it; `logits` are the same either way, unless SAM's mask has a part outside the
                window that does not reach its edge. Ask for them to use SAM's mask itself.

        Several prompts per image: the image encoder runs once per image, the mask decoder and the implicit decoder
        once for all prompts together, and every output gains a prompt axis after the batch axis: `logits`
        `(batch_size, num_prompts, num_classes, height, width)`, `uncertainty` `(batch_size, num_prompts, height,
        width)`, `sam_logits` `(batch_size, num_prompts, 1, 4h, 4w)`, `iou_scores` `(batch_size, num_prompts, 1)`.
        Each prompt's masks equal those of a call with that prompt alone. Prompts without that axis (`(batch_size,
        4)` boxes) give the outputs documented on `IMedSamOutput`.

        With neither boxes nor points the call is prompt-free (SAM's no-prompt embedding). Any other keyword is an
        error (a misspelt `input_box=` must not run prompt-free). Run-time settings (`query_mode`, `refine_ratio`,
        `query_chunk_size`, `mc_passes`, `mc_seed`, `adaptive_base_size`) are read from `self.config` at each call.
        """
        if kwargs:
            raise TypeError(unknown_arguments_message(f"{type(self).__name__}.forward", kwargs, FORWARD_ARGUMENTS))
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_embeddings`.")
        if image_embeddings is None:
            self._check_pixel_values(pixel_values)
            image_embeddings = self.encode_image(pixel_values)
        batch_size = image_embeddings.shape[0]
        prompt_axis = (input_boxes is not None and input_boxes.ndim == 3) or (
            input_points is not None and input_points.ndim == 4
        )
        input_boxes, input_points, input_labels = self._check_prompts(
            batch_size, input_boxes, input_points, input_labels
        )
        num_prompts = next((p.shape[1] for p in (input_boxes, input_points) if p is not None), 1)
        class_index = self._class_index(input_classes, batch_size, num_prompts)
        sparse, dense = self.prompt_encoder(
            input_points=input_points, input_labels=input_labels, input_boxes=input_boxes, input_masks=None
        )
        output_size = self._output_size(output_size)
        output_region = self._output_region(output_region, batch_size)
        if num_prompts > 1:  # every prompt is a row of its own from here on
            output_region = None if output_region is None else output_region.repeat_interleave(num_prompts, 0)
        if query_coordinates is not None:
            query_coordinates = self._prompt_coordinates(query_coordinates, batch_size, num_prompts)
        settings = IMedSamQuerySettings.from_config(self.config)
        region_query = input_boxes is not None and query_coordinates is None and not self.training
        region_query = region_query and settings.query_region == "box"
        decoder_inputs = {
            "image_embeddings": image_embeddings,
            "image_positional_embeddings": self.image_positional_embeddings(batch_size),
            "sparse_prompt_embeddings": sparse,
            "dense_prompt_embeddings": dense,
            "bf16": settings.decoder_precision == "bf16" and not self.training,
        }
        windowed = region_query and not full_sam_logits and settings.query_mode == "adaptive"
        windowed = (
            windowed and self.implicit_decoder is not None and (class_index is not None or self.config.num_classes == 1)
        )
        regions = None
        if windowed:
            sam_logits, iou_scores, upscaled, regions = self._decode_in_windows(
                decoder_inputs, input_boxes, settings.query_margin, output_size, output_region
            )
        else:
            sam_logits, iou_scores, upscaled = self.mask_decoder(**decoder_inputs)
            if region_query:
                regions = self.regions_of_interest(input_boxes, sam_logits, settings.query_margin)
        fields = {"sam_logits": sam_logits, "iou_scores": iou_scores}
        if self.implicit_decoder is None:
            fields["logits"] = sam_mask_on_grid(sam_logits, self.config.image_size, output_size, output_region)
        else:
            decoded = self.implicit_decoder(
                upscaled,
                self.shared_image_embedding,
                output_size,
                output_region,
                sam_logits,
                query_coordinates,
                settings=settings,
                class_index=class_index,
                regions_of_interest=regions,
            )
            fields.update(zip(("logits", "coarse_logits", "uncertainty", "refined"), decoded))
        if prompt_axis:
            fields = {name: value.unflatten(0, (batch_size, num_prompts)) for name, value in fields.items()}
        return IMedSamOutput(**fields, image_embeddings=image_embeddings)

    def _decode_in_windows(self, decoder_inputs, input_boxes, margin, output_size, output_region):
        """
        SAM's mask decoder with each box prompt's upscaling (two transposed convolutions, a LayerNorm and two GELUs
        over `(32, 256, 256)` values per prompt: a quarter of its time) computed only in the window of the frame its
        region of interest can need: the box widened by `margin`, the pixels the implicit decoder samples there,
        and one more image token on every side. Where SAM's mask reaches the window's edge, or the region (box and
        SAM's mask, widened) needs features outside the window, that prompt is upscaled over the whole frame: the
        outputs equal the whole frame's unless SAM's mask has a part outside the window that does not reach its
        edge (SAM's logits there are `SAM_WINDOW_FLOOR`, background, and the region does not grow to hold it).

        Returns SAM's logits `(rows, 1, 4h, 4w)`, iou `(rows, 1)`, the `FeatureWindows` and the regions `(rows, 4)`.
        """
        decoder = self.mask_decoder
        hyper_in, iou_scores, image_tokens = decoder.attend(**decoder_inputs)
        rows, _, height, width = image_tokens.shape
        frame_window = torch.tensor([0, height, 0, width])
        boxes = self.regions_of_interest(input_boxes, None, margin)
        windows = self._token_windows(boxes, output_size, output_region, (height, width), pad=1)
        sam_logits, features = decoder.upscale_windows(hyper_in, image_tokens, windows)
        regions = self.regions_of_interest(input_boxes, sam_logits, margin)
        needed = self._token_windows(regions, output_size, output_region, (height, width), pad=0)
        outside = (needed[:, 0] < windows[:, 0]) | (needed[:, 1] > windows[:, 1])
        outside |= (needed[:, 2] < windows[:, 2]) | (needed[:, 3] > windows[:, 3])
        redo = (outside | self._mask_at_window_edge(sam_logits, windows, (height, width))).nonzero()[:, 0].tolist()
        if redo:
            full_logits, full_features = decoder.upscale_windows(
                hyper_in[redo], image_tokens[redo], frame_window.expand(len(redo), 4)
            )
            sam_logits[redo] = full_logits
            for index, row in enumerate(redo):
                features.features[row] = full_features.features[index]
                features.windows[row] = frame_window
            regions = self.regions_of_interest(input_boxes, sam_logits, margin)
        return sam_logits, iou_scores, features, regions

    @staticmethod
    def _token_windows(regions, output_size, output_region, grid: tuple[int, int], pad: int) -> torch.Tensor:
        """
        `(rows, 4)` integer (row0, row1, column0, column1) of the `grid` of image tokens whose upscaled features the
        implicit decoder samples when querying `regions` on the output grid (`region_pixels`: the output pixels
        covering each region; bilinear samples at their centres need the feature pixels around them), widened by
        `pad` tokens and clipped to the grid.
        """
        height, width = grid
        _, covered = region_pixels(regions, output_size, output_region)
        scale = torch.tensor([4 * width, 4 * height], dtype=covered.dtype, device=covered.device)
        first = (covered[:, :2] * scale - 0.5).floor()  # the feature pixel left of (above) the first centre
        last = (covered[:, 2:] * scale - 0.5).floor() + 2  # one past the pixel right of (below) the last centre
        first = torch.div(first, 4, rounding_mode="floor") - pad
        last = torch.div(last + 3, 4, rounding_mode="floor") + pad
        windows = torch.stack([first[:, 1], last[:, 1], first[:, 0], last[:, 0]], 1).long().cpu()
        limits = torch.tensor([height, height, width, width])
        return torch.minimum(windows.clamp_min(0), limits)

    @staticmethod
    def _mask_at_window_edge(sam_logits: torch.Tensor, windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`(rows,)` whether SAM's mask `(rows, 1, 4h, 4w)`, positive inside its window only (`upscale_windows`),
        reaches the window's outermost pixels on a side within the frame (there it may go on outside the window)."""
        has_mask, extents = sam_mask_extents(sam_logits)
        extents = extents.cpu()
        r0, r1, c0, c1 = (4 * windows).unbind(1)
        height, width = 4 * grid[0], 4 * grid[1]
        edges = (r0 > 0) & (extents[:, 1] == r0)
        edges |= (r1 < height) & (extents[:, 3] == r1)
        edges |= (c0 > 0) & (extents[:, 0] == c0)
        edges |= (c1 < width) & (extents[:, 2] == c1)
        return has_mask.cpu() & edges

    def regions_of_interest(
        self, input_boxes: torch.Tensor, sam_logits: torch.Tensor | None, margin: float
    ) -> torch.Tensor:
        """
        Where each box-prompted structure can be, `(rows, 4)` normalised (x0, y0, x1, y1) of the input frame: the
        box and SAM's own mask (its logits > 0), together, widened by `margin` of their width and height (at least
        2 input pixels) on every side, clipped to the frame.

        Args:
            input_boxes: `(batch_size, num_prompts, 4)` boxes in input-frame pixels.
            sam_logits: `(batch_size * num_prompts, 1, h, w)` SAM's low-resolution logits covering the frame, or None:
                the boxes alone.
        """
        size = float(self.config.image_size)
        union = boxes = input_boxes.reshape(-1, 4).float() / size
        if sam_logits is not None:
            has_mask, extents = sam_mask_extents(sam_logits)
            height, width = sam_logits.shape[-2:]
            scale = torch.tensor([width, height, width, height], device=extents.device)
            mask_box = (extents.float() / scale).to(boxes.device)
            union = torch.where(
                has_mask[:, None].to(boxes.device),
                torch.cat(
                    [torch.minimum(boxes[:, :2], mask_box[:, :2]), torch.maximum(boxes[:, 2:], mask_box[:, 2:])], 1
                ),
                boxes,
            )
        widen = torch.clamp((union[:, 2:] - union[:, :2]) * margin, min=2.0 / size)
        return torch.cat([union[:, :2] - widen, union[:, 2:] + widen], dim=1).clamp(0.0, 1.0)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """
        `PreTrainedModel.save_pretrained`, writing a complete, self-contained folder whatever made the model
        (conversion, training, `from_pretrained`): the modeling files and `auto_map` (so `AutoModel` loads it with
        `trust_remote_code=True` where this package is not installed, and without it where it is), the processor
        (`preprocessor_config.json`, unless one is there already) and, with the package installed, the project's
        model card `README.md` (unless one is there already: a training run writes a fuller one).
        """
        self.config.register_for_auto_class()
        self.register_for_auto_class("AutoModel")
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        folder = Path(save_directory)
        if not (folder / "preprocessor_config.json").is_file():
            processor_for_config(self.config).save_pretrained(folder)
        # The project's card where the package is loaded. Looked up, never imported: a checkpoint's own copy of this
        # file, loaded with `trust_remote_code`, must run the same without pulling the package in.
        card_module = sys.modules.get("imedsam_hf.model_card")
        if card_module is not None and not (folder / "README.md").is_file():
            card_module.write_default_model_card(folder, self.config, total_parameters=self.num_parameters())

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        commit_description: str | None = None,
    ):
        """
        Upload the folder `save_pretrained` writes (code, `auto_map`, processor, the project's model card) to
        `repo_id`. transformers' own `push_to_hub` would replace the card with its blank template.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message or "Upload I-MedSAM model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    def _output_size(self, output_size: tuple[int, int] | int | None) -> tuple[int, int]:
        if output_size is None:
            return (self.config.image_size, self.config.image_size)
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        output_size = tuple(int(s) for s in output_size)
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"`output_size` must be a positive (height, width), got {output_size}.")
        return output_size

    @staticmethod
    def _prompt_coordinates(coordinates: torch.Tensor, batch_size: int, num_prompts: int) -> torch.Tensor:
        """`query_coordinates` `(B, N, 2)` (shared by an image's prompts) or `(B, P, N, 2)` -> `(B * P, N, 2)`."""
        if coordinates.ndim == 4 and tuple(coordinates.shape[:2]) == (batch_size, num_prompts):
            return coordinates.flatten(0, 1)
        if coordinates.ndim == 3 and coordinates.shape[0] == batch_size:
            return coordinates.repeat_interleave(num_prompts, 0) if num_prompts > 1 else coordinates
        raise ValueError(
            f"`query_coordinates` must have shape ({batch_size}, num_points, 2) or ({batch_size}, {num_prompts}, "
            f"num_points, 2), got {tuple(coordinates.shape)}."
        )

    @staticmethod
    def _output_region(output_region, batch_size: int) -> torch.Tensor | None:
        if output_region is None:
            return None
        region = torch.as_tensor(output_region, dtype=torch.float32)
        if region.ndim == 1:
            region = region.expand(batch_size, 4)
        valid = region.shape == (batch_size, 4) and bool(((region >= 0) & (region <= 1)).all())
        if not valid or bool((region[:, 2:] <= region[:, :2]).any()):
            raise ValueError(
                f"`output_region` must be ({batch_size}, 4) normalised (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and "
                f"0 <= y0 < y1 <= 1, got {output_region!r}."
            )
        return region

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, 3, {size}, {size}), got {tuple(pixel_values.shape)}. "
                "Use IMedSamProcessor to resize and pad images to the model's input size."
            )

    def _class_index(self, input_classes, batch_size: int, num_prompts: int) -> torch.Tensor | None:
        """`input_classes` `(B,)` / `(B, P)` 1-based -> `(B * P,)` zero-based class of each prompt row, checked."""
        if input_classes is None:
            return None
        num_classes = self.config.num_classes
        if self.implicit_decoder is None or num_classes < 2:
            raise ValueError(
                f"`input_classes` selects one of a multi-class implicit decoder's heads; this model has "
                f"num_classes={num_classes}{'' if self.implicit_decoder is not None else ' and no implicit decoder'}."
            )
        classes = torch.as_tensor(input_classes).long()
        classes = classes.reshape(batch_size, -1) if classes.numel() == batch_size * num_prompts else classes
        if tuple(classes.shape) != (batch_size, num_prompts):
            raise ValueError(
                f"`input_classes` must have shape ({batch_size},) or ({batch_size}, {num_prompts}): one class per "
                f"prompt, got {tuple(torch.as_tensor(input_classes).shape)}."
            )
        if bool(((classes < 1) | (classes > num_classes)).any()):
            raise ValueError(f"`input_classes` must be class ids 1..{num_classes}, got {classes.unique().tolist()}.")
        return classes.flatten() - 1

    @staticmethod
    def _check_prompts(batch_size, input_boxes, input_points, input_labels):
        """Bring prompts to SAM's shapes: boxes `(B, P, 4)`, points `(B, P, N, 2)`, labels `(B, P, N)`."""
        if input_boxes is not None:
            if input_boxes.ndim == 2:
                input_boxes = input_boxes[:, None]
            if input_boxes.ndim != 3 or input_boxes.shape[-1] != 4 or input_boxes.shape[:1] != (batch_size,):
                raise ValueError(
                    f"`input_boxes` must have shape ({batch_size}, 4) (one box per image) or ({batch_size}, "
                    f"num_prompts, 4), got {tuple(input_boxes.shape)}."
                )
            if input_boxes.shape[1] < 1:
                raise ValueError("`input_boxes` has no box (num_prompts is 0).")
        if input_points is not None:
            if input_points.ndim == 3:
                input_points = input_points[:, None]
            if input_points.ndim != 4 or input_points.shape[0] != batch_size or input_points.shape[-1] != 2:
                raise ValueError(
                    f"`input_points` must have shape ({batch_size}, num_points, 2) or ({batch_size}, num_prompts, "
                    f"num_points, 2), got {tuple(input_points.shape)}."
                )
            if input_boxes is not None and input_boxes.shape[1] != input_points.shape[1]:
                raise ValueError(
                    f"`input_boxes` has {input_boxes.shape[1]} prompts per image and `input_points` "
                    f"{input_points.shape[1]}: give both for every prompt."
                )
            if input_labels is None:
                input_labels = torch.ones(input_points.shape[:-1], dtype=torch.long, device=input_points.device)
            if input_labels.ndim == 2:
                input_labels = input_labels[:, None]
            if tuple(input_labels.shape) != tuple(input_points.shape[:-1]):
                raise ValueError(
                    f"`input_labels` must have shape {tuple(input_points.shape[:-1])} to match `input_points`, "
                    f"got {tuple(input_labels.shape)}."
                )
        elif input_labels is not None:
            raise ValueError("`input_labels` was given without `input_points`.")
        return input_boxes, input_points, input_labels


FORWARD_ARGUMENTS = (
    "pixel_values",
    "input_boxes",
    "input_points",
    "input_labels",
    "output_size",
    "output_region",
    "query_coordinates",
    "image_embeddings",
    "input_classes",
    "full_sam_logits",
)


def build_vision_encoder(vision_config) -> nn.Module:
    """SAM's ViT or LiteMedSAM's TinyViT, chosen by the vision config's `model_type`."""
    if vision_config.model_type == TINYVIT_MODEL_TYPE:
        return IMedSamTinyViTEncoder(vision_config)
    return SamVisionEncoder(vision_config)


__all__ = [
    "IMedSamImplicitDecoder",
    "IMedSamMaskDecoder",
    "IMedSamModel",
    "IMedSamOutput",
    "IMedSamPreTrainedModel",
    "IMedSamQuerySettings",
    "FeatureWindows",
    "SAM_WINDOW_FLOOR",
    "fold_batchnorm",
    "grid_coordinates",
    "region_coordinates",
    "region_pixels",
    "sam_mask_extents",
    "sam_mask_on_grid",
]
