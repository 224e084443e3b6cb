"""The FREQ_ADAPTER PEFT type beyond one adapter: several named adapters on one model, deleting one, merging the
LoRA-only recipe (merge / unmerge / safe_merge / merge_and_unload), and the publishing form on TinyViT."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_adapters, tiny_model, tiny_tinyvit_model
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoProcessor

import imedsam_hf
from imedsam_hf import IMedSamModel, IMedSamTinyViTConfig, imedsam_peft_config, save_pretrained_full
from imedsam_hf.frequency_adapter_layers import FrequencyDownsample, FrequencyFusionLayer, QVLoRALinear


def predict(model, inputs, **kwargs):
    pixel_values, boxes = inputs
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_boxes=boxes, output_size=(24, 20), **kwargs).logits


def perturb(model: torch.nn.Module, adapter_name: str, seed: int) -> int:
    """Move every tensor of one named adapter (its layers and its `modules_to_save` copies) away from its start."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
                count += 1
    return count


def adapter_parameter_names(model: torch.nn.Module, adapter_name: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")]


# ----------------------------------------------------------------------------------------------------------------------
# several adapters on one model


@pytest.fixture
def two_adapters(inputs):
    """A model with adapters "a" (the recipe) and "b" (the recipe at rank 2), both moved from their start, and the
    reference outputs: the base model's and those of a model that only ever had adapter "a"."""
    base = tiny_model()
    reference = predict(base, inputs)
    other = tiny_model()
    torch.manual_seed(10)  # LoRA A and the frequency adapters are initialised from the global generator
    only_a = get_peft_model(other, imedsam_peft_config(base.config), adapter_name="a")
    assert perturb(only_a, "a", seed=1) > 0
    expected_a = predict(only_a.eval(), inputs)

    torch.manual_seed(10)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config), adapter_name="a")
    peft_model.add_adapter("b", imedsam_peft_config(base.config, lora_rank=2))
    perturb(peft_model, "a", seed=1)
    assert perturb(peft_model, "b", seed=2) > 0
    return peft_model.eval(), reference, expected_a


def test_each_named_adapter_gives_its_own_outputs(two_adapters, inputs):
    peft_model, reference, expected_a = two_adapters
    assert sorted(peft_model.peft_config) == ["a", "b"] and peft_model.active_adapter == "a"
    # Adding (and changing) "b" leaves "a" exactly as a model that only ever had "a".
    torch.testing.assert_close(predict(peft_model, inputs), expected_a, atol=0, rtol=0)
    peft_model.set_adapter("b")
    assert peft_model.active_adapter == "b"
    output_b = predict(peft_model, inputs)
    assert not torch.allclose(output_b, expected_a, atol=1e-4)
    assert not torch.allclose(output_b, reference, atol=1e-4)
    # Training "b" trains only "b": no tensor of "a" is trainable.
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(adapter_parameter_names(peft_model, "b"))
    assert any("freq_lora_q_B.b" in n for n in trainable) and any(
        "implicit_decoder.modules_to_save.b" in n for n in trainable
    )
    # Switching back and forth is exact.
    peft_model.set_adapter("a")
    torch.testing.assert_close(predict(peft_model, inputs), expected_a, atol=0, rtol=0)
    peft_model.set_adapter("b")
    torch.testing.assert_close(predict(peft_model, inputs), output_b, atol=0, rtol=0)


def test_disable_adapter_with_two_adapters_gives_the_base_model(two_adapters, inputs):
    peft_model, reference, expected_a = two_adapters
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        with peft_model.disable_adapter():
            torch.testing.assert_close(predict(peft_model, inputs), reference, atol=0, rtol=0)
    peft_model.set_adapter("a")  # and the adapter is back on after the context
    torch.testing.assert_close(predict(peft_model, inputs), expected_a, atol=0, rtol=0)


def test_deleting_an_adapter_with_the_frequency_branch_keeps_the_other(two_adapters, inputs):
    peft_model, reference, _ = two_adapters
    peft_model.set_adapter("b")
    output_b = predict(peft_model, inputs)
    peft_model.delete_adapter("a")
    assert list(peft_model.peft_config) == ["b"] and peft_model.active_adapter == "b"
    assert adapter_parameter_names(peft_model, "a") == []
    torch.testing.assert_close(predict(peft_model, inputs), output_b, atol=0, rtol=0)
    with peft_model.disable_adapter():
        torch.testing.assert_close(predict(peft_model, inputs), reference, atol=0, rtol=0)


def test_deleting_a_lora_only_adapter_keeps_the_other(inputs):
    base = tiny_model(use_frequency_adapter=False)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config), adapter_name="a")
    peft_model.add_adapter("b", imedsam_peft_config(base.config))
    perturb(peft_model, "a", seed=1)
    perturb(peft_model, "b", seed=2)
    peft_model.eval().set_adapter("b")
    output_b = predict(peft_model, inputs)
    peft_model.delete_adapter("a")
    assert list(peft_model.peft_config) == ["b"] and peft_model.active_adapter == "b"
    assert adapter_parameter_names(peft_model, "a") == []
    torch.testing.assert_close(predict(peft_model, inputs), output_b, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# merging the LoRA-only recipe


@pytest.fixture
def lora_only(inputs):
    base = tiny_model(use_frequency_adapter=False)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    reference = predict(base, inputs)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config, use_frequency_adapter=False))
    randomize_adapters(peft_model)
    peft_model.eval()
    layers = [m for m in peft_model.modules() if isinstance(m, QVLoRALinear)]
    assert len(layers) == 2 and not any(isinstance(m, FrequencyFusionLayer) for m in peft_model.modules())
    return peft_model, layers, base_weights, reference


def qkv_weights(layers):
    return [layer.base_layer.weight.detach().clone() for layer in layers]


def test_merge_then_unmerge_keeps_outputs_and_restores_the_base_weights(lora_only, inputs):
    peft_model, layers, base_weights, reference = lora_only
    expected = predict(peft_model, inputs)
    assert not torch.allclose(expected, reference, atol=1e-4)
    before = qkv_weights(layers)
    peft_model.merge_adapter()
    assert all(layer.merged for layer in layers)
    assert not any(torch.equal(layer.base_layer.weight, w) for layer, w in zip(layers, before))  # really merged
    torch.testing.assert_close(predict(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
    peft_model.merge_adapter()  # a second merge adds nothing
    torch.testing.assert_close(predict(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)

    peft_model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    for layer, weight in zip(layers, before):
        torch.testing.assert_close(layer.base_layer.weight.detach(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(predict(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(predict(peft_model, inputs), reference, atol=1e-5, rtol=1e-5)


def test_disable_adapter_on_a_merged_model_gives_the_base_outputs(lora_only, inputs):
    peft_model, layers, _, reference = lora_only
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        torch.testing.assert_close(predict(peft_model, inputs), reference, atol=1e-5, rtol=1e-5)


def test_layer_safe_merge_matches_the_unmerged_layer(lora_only):
    _, layers, _, _ = lora_only
    layer = layers[0]
    x = torch.randn(3, 4, layer.in_features, generator=torch.Generator().manual_seed(0))
    expected = layer(x)
    layer.merge(safe_merge=True)
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), expected, atol=1e-5, rtol=1e-5)  # the update is in the weight
    layer.train()  # the training-mode path of a merged layer must not add the low-rank update a second time
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer.base_layer(x), expected, atol=1e-4)


def test_safe_merge_with_a_nan_raises_and_leaves_the_base_weights(lora_only):
    peft_model, layers, _, _ = lora_only
    before = qkv_weights(layers)
    with torch.no_grad():
        layers[0].freq_lora_q_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layers[0].merge(safe_merge=True)
    with pytest.raises(ValueError, match="NaN"):
        peft_model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaN"):
        peft_model.merge_and_unload(safe_merge=True)
    assert not any(layer.merged for layer in layers)
    for layer, weight in zip(layers, before):
        assert torch.equal(layer.base_layer.weight, weight)
    assert all(torch.isfinite(layer.base_layer.weight).all() for layer in layers)


def test_merge_and_unload_gives_a_plain_model_with_the_trained_modules(lora_only, inputs):
    peft_model, _, base_weights, _ = lora_only
    expected = predict(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    assert type(merged) is IMedSamModel
    assert not any(isinstance(m, QVLoRALinear) for m in merged.modules())
    assert merged.state_dict().keys() == base_weights.keys()  # no adapter or modules_to_save keys left
    # The trained modules_to_save copies (implicit decoder, upscaling, prompt embeddings) replace the originals.
    assert not torch.equal(
        merged.state_dict()["implicit_decoder.coarse_head.weight"], base_weights["implicit_decoder.coarse_head.weight"]
    )
    torch.testing.assert_close(predict(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_merge_is_refused_with_the_frequency_adapter_and_the_model_is_unchanged(inputs):
    base = tiny_model()
    peft_model = get_peft_model(base, imedsam_peft_config(base.config))
    randomize_adapters(peft_model)
    peft_model.eval()
    expected = predict(peft_model, inputs)
    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(ValueError, match="frequency adapter"):
            merge()
    fusion = next(m for m in peft_model.modules() if isinstance(m, FrequencyFusionLayer))
    with pytest.raises(ValueError, match="cannot be merged"):
        fusion.merge(safe_merge=True)
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, QVLoRALinear))
    torch.testing.assert_close(predict(peft_model, inputs), expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# publishing on TinyViT (LiteMedSAM's encoder)


def test_the_tiny_tinyvit_model_has_a_16x16_embedding():
    model = tiny_tinyvit_model()
    assert isinstance(model.config.vision_config, IMedSamTinyViTConfig) and model.config.embedding_size == 16


@pytest.fixture
def tinyvit_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=generator), torch.tensor(
        [[10.0, 12.0, 40.0, 50.0], [5.0, 5.0, 60.0, 30.0]]
    )


@pytest.fixture
def published_tinyvit(tmp_path, tinyvit_inputs):
    model = tiny_tinyvit_model()
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, lora_rank=3))
    modules = list(peft_model.modules())
    assert sum(isinstance(m, FrequencyDownsample) for m in modules) == 3
    assert sum(isinstance(m, QVLoRALinear) for m in modules) == 3
    randomize_adapters(peft_model)
    peft_model.eval()
    final = tmp_path / "final"
    save_pretrained_full(peft_model, final)
    return peft_model, final


def test_published_tinyvit_model_reloads_with_identical_outputs(published_tinyvit, tinyvit_inputs):
    peft_model, final = published_tinyvit
    expected = predict(peft_model, tinyvit_inputs)
    with peft_model.disable_adapter():
        assert not torch.allclose(predict(peft_model, tinyvit_inputs), expected, atol=1e-4)  # the adapter matters
    reloaded = AutoModel.from_pretrained(final).eval()
    assert type(reloaded) is IMedSamModel and reloaded.config.is_tinyvit
    assert sum(isinstance(m, FrequencyDownsample) for m in reloaded.modules()) == 3
    torch.testing.assert_close(predict(reloaded, tinyvit_inputs), expected, atol=0, rtol=0)
    # The adapter-only form in adapter/ loads onto the same base with the same outputs.
    adapter = PeftModel.from_pretrained(tiny_tinyvit_model(), final / "adapter").eval()
    torch.testing.assert_close(predict(adapter, tinyvit_inputs), expected, atol=0, rtol=0)


def test_published_tinyvit_folder_is_complete(published_tinyvit):
    _, final = published_tinyvit
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_imedsam.IMedSamConfig",
        "AutoModel": "modeling_imedsam.IMedSamModel",
    }
    assert config["vision_config"]["model_type"] == "i_medsam_tinyvit"
    assert config["adapter_config"]["lora_rank"] == 3
    assert config["adapter_config"]["downsample_target_modules"]
    assert (final / "model.safetensors").is_file() and (final / "modeling_tinyvit.py").is_file()
    assert not (final / "adapter_config.json").exists()

    assert (final / "preprocessor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(final)
    assert isinstance(processor, imedsam_hf.IMedSamProcessor)
    assert processor.image_size == 64 and processor.normalization == "minmax"  # LiteMedSAM's preprocessing

    card = (final / "README.md").read_text()
    assert "rank-3 LoRA" in card and "`lora_rank=3`" in card
    assert "rank-4" not in card and "lora_rank=4" not in card
    assert "per-image min-max" in card

    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["lora_rank"] == 3
    assert adapter_config["peft_type"].startswith("FREQ_ADAPTER")
    name = adapter_config["base_model_name_or_path"]
    assert name is None or not os.path.isabs(name)
    assert "rank-3 LoRA" in (final / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("loader", ["load_model", "AutoModel"])
def test_publishing_a_base_loaded_from_a_local_folder_records_no_machine_path(tmp_path, loader):
    tiny_tinyvit_model().save_pretrained(tmp_path / "tiny-litemedsam")
    if loader == "load_model":
        base, _ = imedsam_hf.load_model(tmp_path / "tiny-litemedsam", eval_mode=False)
    else:
        base = AutoModel.from_pretrained(tmp_path / "tiny-litemedsam")
    peft_model = get_peft_model(base, imedsam_peft_config(base.config))
    final = tmp_path / "final"
    save_pretrained_full(peft_model, final)
    name = json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name is None or not os.path.isabs(name), name
    for path in (final / "config.json", final / "README.md", final / "adapter" / "adapter_config.json"):
        assert str(tmp_path) not in path.read_text(), path.name
