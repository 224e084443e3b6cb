"""Layers of the frequency-adapter PEFT type: rank-r LoRA on q and v, and the frequency adapter (FA) chain.

This module holds the layers and the one function that places them (`inject_frequency_adapter`), used both by the
PEFT tuner (`imedsam_hf.frequency_adapter`, peft's `layer.py`) and by `IMedSamModel` when a published checkpoint
carries its adapter. It is flat (no sub-package) so that `trust_remote_code` checkpoints can ship it beside the
modeling file. The settings it reads are the one schema, `FrequencyAdapterSettings`.

How the frequency stream flows (I-MedSAM, section 3.2):
- the tokenizer (wrapping the encoder's frozen patch embedding) turns the image spectrum into tokens with the same
  frozen embedding (plus the ViT's absolute position embedding) and starts the stream;
- fusion layer i (wrapping block i's MLP) computes `f_{i+1} = f_i + FA_i(f_i)` (`chain="residual"`) or
  `f_{i+1} = LN_i(f_i) + FA_i(f_i)` (`chain="normalized"`, the released code's form; FA_i starts with that LayerNorm)
  and adds `scale * f_{i+1}` to the MLP's output, i.e. after the block's MLP; the chain never passes through
  attention;
- on a hierarchical encoder (TinyViT) the stream goes through each stage's own frozen downsampling, so it follows
  the token grid and width of the spatial path without new parameters.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .configuration_imedsam import FrequencyAdapterSettings

ADAPTER_PREFIX = "freq_"


class FrequencyStream:
    """The frequency tokens of the current forward pass: position i holds f_i, channels-last `(B, h, w, C)`."""

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []

    def read(self, position: int) -> torch.Tensor:
        if position >= len(self.tokens):
            raise RuntimeError(
                "The frequency stream was not started: the encoder's patch embedding must run (through the "
                "frequency tokenizer) before the adapted blocks."
            )
        return self.tokens[position]

    def write(self, position: int, tokens: torch.Tensor) -> None:
        # Truncating keeps a re-run of block i (gradient checkpointing) consistent with the first run.
        del self.tokens[position:]
        self.tokens.append(tokens)


def image_spectrum(pixel_values: torch.Tensor, mode: str = "amplitude", log_scale: bool = True) -> torch.Tensor:
    """
    Centred 2-D spectrum of each channel, standardised per image and channel.

    Computed in float32 outside autocast: cuFFT has no bfloat16 and takes float16 only for power-of-two sizes.

    Args:
        pixel_values: `(batch_size, channels, height, width)`.
        mode: `"amplitude"` (log1p-compressed if `log_scale`, so the DC peak does not dwarf the rest) or `"phase"`.

    Returns:
        `(batch_size, channels, height, width)` in `pixel_values.dtype`.
    """
    with torch.autocast(device_type=pixel_values.device.type, enabled=False):
        values = pixel_values.float()
        spectrum = torch.fft.fftshift(torch.fft.fft2(values, norm="ortho"), dim=(-2, -1))
        if mode == "amplitude":
            image = spectrum.abs()
            image = torch.log1p(image) if log_scale else image
        elif mode == "phase":
            image = spectrum.angle() / math.pi
        else:
            raise ValueError(f"`spectrum` must be 'amplitude' or 'phase', got {mode!r}.")
        mean = image.mean(dim=(-2, -1), keepdim=True)
        std = image.std(dim=(-2, -1), keepdim=True)
        image = (image - mean) / (std + 1e-6)
    return image.to(pixel_values.dtype)


class FrequencyAdapterLayer(BaseTunerLayer):
    """Common state of the frequency-adapter wrappers (PEFT tuner-layer protocol)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"
        # Plain dict, not a submodule: the stream is shared by several wrappers and holds no parameters.
        self.__dict__["streams"] = {}

    def _adapters_on(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.streams]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot be merged into the base weights: the frequency adapter is a separate "
            "branch. Keep the adapter (save the full model with `imedsam_hf.save_pretrained_full`) or `unload()`."
        )

    def unmerge(self) -> None:
        pass


class FrequencyTokenizer(nn.Module, FrequencyAdapterLayer):
    """Wraps the encoder's frozen patch embedding; also embeds the image spectrum to start the stream."""

    other_param_names = ("spectrum", "log_scale", "streams")

    def __init__(self, base_layer: nn.Module, position_owner: nn.Module | None = None) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.__dict__["position_owner"] = position_owner  # the encoder (its `pos_embed`), not a submodule
        self.spectrum: dict[str, str] = {}
        self.log_scale: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: Any, stream: FrequencyStream) -> None:
        self.spectrum[adapter_name] = config.spectrum
        self.log_scale[adapter_name] = config.spectrum_log_scale
        self.streams[adapter_name] = stream
        self.set_adapter(self.active_adapters)

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`(batch_size, 3, S, S)` -> the wrapped embedding's output (the spatial tokens)."""
        output = self.base_layer(pixel_values, *args, **kwargs)
        for name in self._adapters_on():
            spectrum = image_spectrum(pixel_values, self.spectrum[name], self.log_scale[name])
            tokens = self.base_layer(spectrum)
            position = getattr(self.position_owner, "pos_embed", None)
            if position is not None:
                tokens = tokens + position
            self.streams[name].write(0, tokens)
        return output


class FrequencyFusionLayer(nn.Module, FrequencyAdapterLayer):
    """Wraps block i's MLP (or a whole convolutional block): adds `scale * f_{i+1}`, `f_{i+1} = f_i + FA_i(f_i)`
    (or `LN_i(f_i) + FA_i(f_i)` with `chain="normalized"`)."""

    adapter_layer_names = ("freq_adapter", "freq_gate")
    # Per-adapter state only (peft's delete_adapter removes each name's entry); `position` is the layer's own.
    other_param_names = ("fusion_scale", "chain_form", "streams")

    def __init__(self, base_layer: nn.Module, position: int) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.position = position
        self.freq_adapter = nn.ModuleDict()
        # Optional learnable fusion gate: weight = fusion_scale * tanh(gate), gate starting at 0, so the adapted
        # encoder starts exactly as the pretrained one (the paper's fixed 0.5 perturbs every block at step 0).
        self.freq_gate = nn.ParameterDict()
        self.fusion_scale: dict[str, float] = {}
        self.chain_form: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: Any, stream: FrequencyStream, width: int) -> None:
        self.freq_adapter[adapter_name] = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, config.adapter_dim),
            nn.GELU(),
            nn.Linear(config.adapter_dim, width),
        )
        self.fusion_scale[adapter_name] = config.fusion_scale
        self.chain_form[adapter_name] = config.chain
        if config.fusion_gate:
            self.freq_gate[adapter_name] = nn.Parameter(torch.zeros(1))
        self.streams[adapter_name] = stream
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.base_layer(hidden_states, *args, **kwargs)
        for name in self._adapters_on():
            stream = self.streams[name]
            previous = stream.read(self.position)
            adapter = self.freq_adapter[name]
            if self.chain_form.get(name, "residual") == "normalized":  # LN f + FA(LN f), FA's own LayerNorm
                normed = adapter[0](previous.to(adapter[1].weight.dtype))
                current = (normed + adapter[1:](normed)).to(previous.dtype)
            else:
                current = previous + adapter(previous.to(adapter[1].weight.dtype)).to(previous.dtype)
            stream.write(self.position + 1, current)
            weight = self.fusion_scale[name]
            if name in self.freq_gate:
                weight = weight * torch.tanh(self.freq_gate[name]).to(output.dtype)
            output = output + weight * current.reshape(output.shape).to(output.dtype)
        return output


class FrequencyDownsample(nn.Module, FrequencyAdapterLayer):
    """Wraps a stage's frozen downsampling: the stream goes through it too, following the spatial path."""

    other_param_names = ("streams",)

    def __init__(self, base_layer: nn.Module, position: int) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.position = position

    def update_layer(self, adapter_name: str, config: Any, stream: FrequencyStream) -> None:
        self.streams[adapter_name] = stream
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.base_layer(hidden_states, *args, **kwargs)
        for name in self._adapters_on():
            stream = self.streams[name]
            stream.write(self.position, self.base_layer(stream.read(self.position)))
        return output


def qkv_output_indices(attention: nn.Module, linear: nn.Linear) -> dict[str, torch.Tensor]:
    """Output features of a fused qkv projection that belong to q, k and v.

    SAM's ViT lays them out in blocks `[q | k | v]`; an attention module with another layout says so through its
    own `qkv_output_indices()` (TinyViT interleaves them per head).
    """
    with torch.device("cpu"):  # also when the model is being built on the meta device
        if hasattr(attention, "qkv_output_indices"):
            return attention.qkv_output_indices()
        width = linear.out_features // 3
        return {name: torch.arange(i * width, (i + 1) * width) for i, name in enumerate("qkv")}


class QVLoRALinear(nn.Module, FrequencyAdapterLayer):
    """Rank-r LoRA on the q and v output features of a fused qkv `nn.Linear` (k untouched)."""

    adapter_layer_names = ("freq_lora_q_A", "freq_lora_q_B", "freq_lora_v_A", "freq_lora_v_B", "freq_lora_gate")
    other_param_names = ("lora_scaling", "lora_dropout", "streams")

    def __init__(self, base_layer: nn.Linear, output_indices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        # Plain CPU tensors, not buffers: `from_pretrained` builds models on the meta device and would leave
        # non-persistent buffers uninitialised. Copies on the compute device are cached by `_index`.
        self.__dict__["output_indices"] = {part: output_indices[part].cpu() for part in ("q", "v")}
        self.__dict__["_device_indices"] = {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self.lora_dropout = nn.ModuleDict()
        self.lora_scaling: dict[str, float] = {}
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: Any) -> None:
        rank = config.lora_rank
        for part in ("q", "v"):
            down = nn.Linear(self.in_features, rank, bias=False)
            up = nn.Linear(rank, self.output_indices[part].numel(), bias=False)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)  # the adapted model starts as the base model
            getattr(self, f"freq_lora_{part}_A")[adapter_name] = down
            getattr(self, f"freq_lora_{part}_B")[adapter_name] = up
        if config.lora_gate:  # the released code's gate: nn.Linear's own initialisation
            self.freq_lora_gate[adapter_name] = nn.Linear(self.in_features, 1, bias=False)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.lora_scaling[adapter_name] = config.lora_alpha / rank
        self.streams[adapter_name] = None  # registers the adapter name; LoRA does not read the stream
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _index(self, part: str, device: torch.device) -> torch.Tensor:
        key = (part, device)
        if key not in self._device_indices:
            self._device_indices[key] = self.output_indices[part].to(device)
        return self._device_indices[key]

    def _delta_weight(self, adapter_name: str, part: str) -> torch.Tensor:
        down = getattr(self, f"freq_lora_{part}_A")[adapter_name].weight
        up = getattr(self, f"freq_lora_{part}_B")[adapter_name].weight
        return (up @ down) * self.lora_scaling[adapter_name]

    def _updated_weight(self, weight: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """A new `weight` with each adapter's low-rank update B @ A added to its q and v rows."""
        for name in adapter_names:
            for part in ("q", "v"):
                delta = self._delta_weight(name, part).to(weight.dtype)
                weight = weight.index_add(0, self._index(part, weight.device), delta)
        return weight

    def _gated(self, names: list[str]) -> bool:
        return any(name in self.freq_lora_gate for name in names)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self._gated(adapter_names or self.active_adapters):
            raise ValueError(
                "A gated LoRA (`lora_gate=True`) depends on each input: it cannot be merged into the weight."
            )
        for name in adapter_names or self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_scaling:
                continue
            weight = self.base_layer.weight
            merged = self._updated_weight(weight.data, [name])
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}.")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            for part in ("q", "v"):
                weight.data[self._index(part, weight.device)] -= self._delta_weight(name, part).to(weight.dtype)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        plain = isinstance(self.base_layer, nn.Linear) and not args and not kwargs
        if not self.merged and not self.training and plain and not self._gated(self._adapters_on()):
            # Inference (no LoRA dropout): add the low-rank updates to the q/v rows of the weight, then one matrix
            # product, instead of two small products and an index_add over every token's qkv output.
            weight = self._updated_weight(self.base_layer.weight, self._adapters_on())
            return F.linear(hidden_states, weight, self.base_layer.bias)
        output = self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            return output
        for name in self._adapters_on():
            inputs = self.lora_dropout[name](hidden_states)
            for part in ("q", "v"):
                index = self._index(part, output.device)
                down = getattr(self, f"freq_lora_{part}_A")[name]
                up = getattr(self, f"freq_lora_{part}_B")[name]
                delta = up(down(inputs.to(down.weight.dtype))) * self.lora_scaling[name]
                if name in self.freq_lora_gate:  # g(mean of the image's or window's tokens), one per batch entry
                    tokens = inputs.to(down.weight.dtype).mean(dim=tuple(range(1, inputs.ndim - 1)), keepdim=True)
                    delta = delta * self.freq_lora_gate[name](tokens)
                output = output.index_add(output.ndim - 1, index, delta.to(output.dtype))
        return output


def adapter_settings(config: FrequencyAdapterSettings | dict) -> FrequencyAdapterSettings:
    """The settings of a `FrequencyAdapterConfig` or of a stored dict (`IMedSamConfig.adapter_config`), checked."""
    return FrequencyAdapterSettings.from_mapping(config if isinstance(config, dict) else config.settings_dict())


def module_role(name: str, config: Any) -> str | None:
    """Which wrapper a module gets: 'tokenizer', 'fusion', 'downsample', 'lora' or None."""
    patterns = (
        ("tokenizer", config.tokenizer_module if config.use_frequency_adapter else None),
        ("fusion", config.fusion_target_modules if config.use_frequency_adapter else None),
        ("downsample", config.downsample_target_modules if config.use_frequency_adapter else None),
        ("lora", config.lora_target_modules if config.use_lora else None),
    )
    for role, pattern in patterns:
        if pattern and re.fullmatch(pattern, name):
            return role
    return None


def _module_width(module: nn.Module) -> int:
    """Channel width of a fusion target's output: its last Linear's / Conv's output size."""
    width = None
    for child in module.modules():
        if isinstance(child, nn.Linear):
            width = child.out_features
        elif isinstance(child, nn.Conv2d):
            width = child.out_channels
    if width is None:
        raise ValueError(f"Cannot infer the width of fusion target {type(module).__name__}.")
    return width


class FrequencyAdapterPlacer:
    """Creates or updates the wrapper of each targeted module, keeping the stream positions in order.

    Targets must be visited in the model's module order (as `named_modules()` yields them).
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        self.model = model
        self.config = adapter_settings(config)
        self.adapter_name = adapter_name
        self.stream = FrequencyStream()
        self.position = 0

    def wrap(self, name: str, target: nn.Module) -> nn.Module | None:
        """Return a new wrapper for `target`, or None when `target` already was one and was updated."""
        role = module_role(name, self.config)
        config, adapter = self.config, self.adapter_name
        is_wrapper = isinstance(target, FrequencyAdapterLayer)
        base = target.get_base_layer() if is_wrapper else target
        if role == "tokenizer":
            new = target if is_wrapper else FrequencyTokenizer(base, self.model.get_submodule(name.rpartition(".")[0]))
            new.update_layer(adapter, config, self.stream)
        elif role == "fusion":
            new = target if is_wrapper else FrequencyFusionLayer(base, self.position)
            new.update_layer(adapter, config, self.stream, _module_width(base))
            self.position += 1
        elif role == "downsample":
            new = target if is_wrapper else FrequencyDownsample(base, self.position)
            new.update_layer(adapter, config, self.stream)
        elif role == "lora":
            parent = self.model.get_submodule(name.rpartition(".")[0])
            new = target if is_wrapper else QVLoRALinear(base, qkv_output_indices(parent, base))
            new.update_layer(adapter, config)
        else:
            raise ValueError(f"Module {name!r} matches no role of the frequency-adapter config.")
        return None if is_wrapper else new


def inject_frequency_adapter(model: nn.Module, config: Any, adapter_name: str = "default") -> None:
    """Build the adapter's layers into `model` in place (the published-checkpoint form, no PeftModel)."""
    placer = FrequencyAdapterPlacer(model, config, adapter_name)
    for name, _ in list(model.named_modules()):
        if module_role(name, placer.config) is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = placer.wrap(name, getattr(parent, child_name))
        if new is not None:
            setattr(parent, child_name, new)


__all__ = [
    "ADAPTER_PREFIX",
    "FrequencyAdapterLayer",
    "FrequencyAdapterPlacer",
    "FrequencyDownsample",
    "FrequencyFusionLayer",
    "FrequencyStream",
    "FrequencyTokenizer",
    "QVLoRALinear",
    "image_spectrum",
    "inject_frequency_adapter",
]
