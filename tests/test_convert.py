"""Conversion of SAM checkpoints (transformers SamModel folders and Meta's .pth files) into IMedSamModel."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_VISION
from transformers import AutoModel, SamConfig, SamModel

from imedsam_hf import IMedSamModel
from imedsam_hf.cli import main as cli_main
from imedsam_hf.convert_sam import (
    META_TO_HF_RULES,
    meta_state_dict_to_hf,
    resize_position_embedding,
    resize_relative_positions,
    sam_to_imedsam,
)

# Meta's decoder uses 8 heads; keep that so the .pth round trip can infer everything from the weights.
TINY_SAM = dict(
    vision_config=dict(TINY_VISION),
    prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8),
    mask_decoder_config=dict(
        hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=8, iou_head_hidden_dim=24
    ),
)


@pytest.fixture
def sam_dir(tmp_path):
    torch.manual_seed(0)
    model = SamModel(SamConfig(**TINY_SAM))
    with torch.no_grad():  # make every tensor informative (SAM zero-initialises its position tables)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = tmp_path / "sam"
    model.save_pretrained(path)
    return path


def sam_masks(sam: SamModel, pixel_values, **prompts):
    """SamModel's single-mask logits `(B, P, 1, h, w)` (P prompts per image; prompt-free: P = 1)."""
    with torch.no_grad():
        return sam(pixel_values=pixel_values, multimask_output=False, **prompts).pred_masks


def test_conversion_at_own_size_reproduces_sam_masks(sam_dir, tmp_path):
    assert cli_main(["convert", "sam", "--checkpoint", str(sam_dir), "--output", str(tmp_path / "out")]) == 0
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, IMedSamModel) and model.config.image_size == 64
    sam = SamModel.from_pretrained(sam_dir).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 8.0, 40.0, 60.0]], [[20.0, 2.0, 63.0, 30.0]]])
    points = torch.tensor([[[[10.0, 20.0], [40.0, 44.0]]], [[[3.0, 50.0], [33.0, 8.0]]]])
    labels = torch.tensor([[[1, 0]], [[1, 1]]])
    with torch.no_grad():
        ours_box = model(pixel_values, input_boxes=boxes).sam_logits
        ours_points = model(pixel_values, input_points=points, input_labels=labels).sam_logits
        ours_free = model(pixel_values).sam_logits
    # Prompts with a prompt axis keep it, as SamModel's do: (B, P, 1, h, w).
    torch.testing.assert_close(ours_box, sam_masks(sam, pixel_values, input_boxes=boxes), atol=1e-5, rtol=1e-5)
    expected_points = sam_masks(sam, pixel_values, input_points=points, input_labels=labels)
    torch.testing.assert_close(ours_points, expected_points, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_free, sam_masks(sam, pixel_values)[:, 0], atol=1e-5, rtol=1e-5)
    # Several boxes per image in one call: SamModel's prompt batch, mask for mask.
    several = torch.cat([boxes, boxes.flip(0) * 0.5], dim=1)  # (2, 2, 4)
    with torch.no_grad():
        ours_several = model(pixel_values, input_boxes=several)
    assert ours_several.logits.shape[:3] == (2, 2, 1) and ours_several.iou_scores.shape == (2, 2, 1)
    expected_several = sam_masks(sam, pixel_values, input_boxes=several)
    torch.testing.assert_close(ours_several.sam_logits, expected_several, atol=1e-5, rtol=1e-5)


def test_conversion_with_implicit_decoder_off_returns_the_sam_mask(sam_dir):
    sam = SamModel.from_pretrained(sam_dir).eval()
    model = sam_to_imedsam(sam.config, sam.state_dict(), use_implicit_decoder=False)
    pixel_values, boxes = torch.randn(1, 3, 64, 64), torch.tensor([[4.0, 8.0, 40.0, 60.0]])
    with torch.no_grad():
        logits = model(pixel_values, input_boxes=boxes, output_size=(64, 64)).logits
    expected = torch.nn.functional.interpolate(
        sam_masks(sam, pixel_values, input_boxes=boxes[:, None])[:, 0],
        size=(64, 64),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_conversion_to_another_size_loads_every_tensor(sam_dir, tmp_path):
    assert (
        cli_main(
            ["convert", "sam", "--checkpoint", str(sam_dir), "--image-size", "96", "--output", str(tmp_path / "out")]
        )
        == 0
    )
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.image_size == 96 and model.config.embedding_size == 6
    source = SamModel.from_pretrained(sam_dir).state_dict()
    converted = model.state_dict()
    for key, value in source.items():
        if key.endswith("pos_embed"):
            expected = resize_position_embedding(value, 6)
        elif converted[key].shape != value.shape:
            assert re.search(r"layers\.1\.attn\.rel_pos_[hw]$", key), key  # the global layer only
            expected = resize_relative_positions(value, 11)
        else:
            expected = value
        assert converted[key].shape == expected.shape, key
        torch.testing.assert_close(converted[key], expected, atol=0, rtol=0, msg=key)
    assert converted["vision_encoder.pos_embed"].abs().sum() > 0
    with torch.no_grad():
        outputs = model.eval()(torch.randn(1, 3, 96, 96), input_boxes=torch.tensor([[10.0, 10.0, 80.0, 70.0]]))
    assert outputs.logits.shape == (1, 1, 96, 96)


def hf_to_meta_key(key: str) -> str:
    """The inverse renaming, written out independently of META_TO_HF_RULES."""
    replacements = [
        ("vision_encoder.", "image_encoder."),
        (".layers.", ".blocks."),
        ("patch_embed.projection", "patch_embed.proj"),
        ("neck.conv1", "neck.0"),
        ("neck.layer_norm1", "neck.1"),
        ("neck.conv2", "neck.2"),
        ("neck.layer_norm2", "neck.3"),
        ("mask_embed.conv1", "mask_downscaling.0"),
        ("mask_embed.layer_norm1", "mask_downscaling.1"),
        ("mask_embed.conv2", "mask_downscaling.3"),
        ("mask_embed.layer_norm2", "mask_downscaling.4"),
        ("mask_embed.conv3", "mask_downscaling.6"),
        (".point_embed.", ".point_embeddings."),
        ("shared_embedding.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
        ("upscale_conv1", "output_upscaling.0"),
        ("upscale_layer_norm", "output_upscaling.1"),
        ("upscale_conv2", "output_upscaling.3"),
        (".layer_norm", ".norm"),
    ]
    if key.startswith("mask_decoder.transformer"):
        replacements = [(a, b) for a, b in replacements if a != ".layers."]
    for old, new in replacements:
        key = key.replace(old, new)
    key = re.sub(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.blocks\.0\.", r"\1.layers.1.", key)
    key = re.sub(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.layers.1.", key)
    key = re.sub(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_in\.", r"\1.layers.0.", key)
    key = re.sub(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_out\.", r"\1.layers.2.", key)
    return key


def test_meta_pth_checkpoint_converts_like_the_transformers_one(sam_dir, tmp_path):
    sam = SamModel.from_pretrained(sam_dir)
    meta = {hf_to_meta_key(k): v for k, v in sam.state_dict().items() if not k.startswith("shared_image_embedding")}
    assert "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" in meta
    assert "image_encoder.blocks.0.norm1.weight" in meta
    assert meta_state_dict_to_hf(meta).keys() == sam.state_dict().keys()
    torch.save(meta, tmp_path / "sam_vit_tiny.pth")
    assert (
        cli_main(
            ["convert", "sam", "--checkpoint", str(tmp_path / "sam_vit_tiny.pth"), "--output", str(tmp_path / "a")]
        )
        == 0
    )
    assert cli_main(["convert", "sam", "--checkpoint", str(sam_dir), "--output", str(tmp_path / "b")]) == 0
    a = AutoModel.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModel.from_pretrained(tmp_path / "b").state_dict()
    for key, value in b.items():
        if not key.startswith("implicit_decoder."):
            torch.testing.assert_close(a[key], value, atol=0, rtol=0, msg=key)


def test_rules_are_anchored():
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in META_TO_HF_RULES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sam", "--checkpoint", "missing.pth", "--output", "x"], "no such file"),
        (["sam", "--checkpoint", "{bad}", "--image-size", "100", "--output", "x"], "error"),
    ],
)
def test_bad_checkpoints_give_clear_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["convert", *argv]) == 2
    assert message in capsys.readouterr().err


def test_image_size_must_fit_the_patch_grid(sam_dir, tmp_path, capsys):
    assert (
        cli_main(
            ["convert", "sam", "--checkpoint", str(sam_dir), "--image-size", "100", "--output", str(tmp_path / "o")]
        )
        == 2
    )
    assert "multiple of the patch size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_garbage_pth_is_reported(tmp_path, capsys):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    assert (
        cli_main(["convert", "sam", "--checkpoint", str(tmp_path / "broken.pth"), "--output", str(tmp_path / "o")]) == 2
    )
    assert "broken.pth" in capsys.readouterr().err


def test_written_weights_are_as_readable_as_the_folders_other_files(sam_dir, tmp_path):
    """safetensors 0.8 writes every file 0600 (safetensors#782): a converted or trained model folder written by one
    user, or as root in a container image, could not be loaded by another, though its config.json could. The weights
    `convert`, `export` and training write get the umask's permissions, as the JSON beside them."""
    import stat

    out = tmp_path / "converted"
    assert cli_main(["convert", "sam", "--checkpoint", str(sam_dir), "--output", str(out)]) == 0
    mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    weights = sorted(out.rglob("*.safetensors"))
    assert weights and all(stat.S_IMODE(path.stat().st_mode) == mode for path in weights)
    assert cli_main(["export", "--model", str(out), "--output", str(tmp_path / "hub")]) == 0
    exported = sorted((tmp_path / "hub").rglob("*.safetensors"))
    assert exported and all(stat.S_IMODE(path.stat().st_mode) == mode for path in exported)
