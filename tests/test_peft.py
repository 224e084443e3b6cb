"""The FREQ_ADAPTER PEFT type: recipe, save/load in a fresh process, disable_adapter, unload, publishing form."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT, randomize_adapters, tiny_config, tiny_model
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModel

import imedsam_hf  # noqa: F401
from imedsam_hf import FrequencyAdapterConfig, IMedSamConfig, IMedSamModel, imedsam_peft_config, save_pretrained_full
from imedsam_hf.frequency_adapter_layers import FrequencyFusionLayer, FrequencyTokenizer, QVLoRALinear, image_spectrum


def adapted(seed: int = 0, **config_overrides):
    model = tiny_model(seed, **config_overrides)
    peft_model = get_peft_model(model, imedsam_peft_config(model.config))
    randomize_adapters(peft_model)
    return peft_model.eval()


def predict(model, inputs, **kwargs):
    pixel_values, boxes = inputs
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_boxes=boxes, output_size=(24, 20), **kwargs).logits


def test_recipe_places_every_branch_and_trains_only_it():
    peft_model = adapted()
    modules = dict(peft_model.named_modules())
    assert sum(isinstance(m, QVLoRALinear) for m in modules.values()) == 2
    assert sum(isinstance(m, FrequencyFusionLayer) for m in modules.values()) == 2
    assert sum(isinstance(m, FrequencyTokenizer) for m in modules.values()) == 1
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("freq_lora_q_A" in n for n in trainable) and any("freq_adapter" in n for n in trainable)
    assert any("implicit_decoder" in n for n in trainable) and any("upscale_conv1" in n for n in trainable)
    assert any("point_embed" in n for n in trainable)
    assert not any("vision_encoder" in n and "freq_" not in n for n in trainable)
    assert not any("mask_decoder.transformer" in n or ".mask_embed." in n for n in trainable)


def test_ablation_switches_select_branches():
    lora_only = get_peft_model(tiny_model(), imedsam_peft_config(tiny_config(use_frequency_adapter=False)))
    assert not any(isinstance(m, FrequencyFusionLayer) for m in lora_only.modules())
    fa_only = get_peft_model(tiny_model(), imedsam_peft_config(tiny_config(use_lora=False)))
    assert not any(isinstance(m, QVLoRALinear) for m in fa_only.modules())
    # Neither branch: no adapter layer; only the modules to save train (with `train_mask_decoder`, a MedSAM-style
    # fine-tune of the whole mask decoder on the frozen encoder).
    neither = imedsam_peft_config(tiny_config(use_lora=False, use_frequency_adapter=False), train_mask_decoder=True)
    decoder_only = get_peft_model(tiny_model(), neither)
    assert not any(isinstance(m, (FrequencyFusionLayer, QVLoRALinear)) for m in decoder_only.modules())
    trained = {n for n, p in decoder_only.named_parameters() if p.requires_grad}
    assert trained and not any("vision_encoder" in n for n in trained)
    assert any(n.startswith("base_model.model.mask_decoder.") and ".transformer." in n for n in trained)
    with pytest.raises(ValueError, match="shared with the image"):
        imedsam_peft_config(tiny_config(), modules_to_save=["prompt_encoder"])


def test_gradients_reach_both_branches(inputs):
    peft_model = adapted().train()
    pixel_values, boxes = inputs
    peft_model(pixel_values=pixel_values, input_boxes=boxes).logits.square().mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for key in ("freq_lora_q_B", "freq_lora_v_A", "freq_adapter", "implicit_decoder", "point_embed"):
        assert any(key in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), key


def test_lora_touches_only_q_and_v(inputs):
    model = tiny_model()
    qkv = model.vision_encoder.layers[0].attn.qkv
    peft_model = get_peft_model(model, imedsam_peft_config(tiny_config(use_frequency_adapter=False)))
    randomize_adapters(peft_model)
    x = torch.randn(5, qkv.in_features)
    wrapped = peft_model.base_model.model.vision_encoder.layers[0].attn.qkv
    delta = wrapped(x) - wrapped.base_layer(x)
    width = qkv.out_features // 3
    assert delta[:, :width].abs().sum() > 0 and delta[:, 2 * width :].abs().sum() > 0
    assert torch.equal(delta[:, width : 2 * width], torch.zeros_like(delta[:, width : 2 * width]))


def test_lora_inference_path_equals_the_training_path():
    """Eval mode adds the low-rank updates to the weight's q/v rows; training mode adds them to the outputs."""
    model = tiny_model()
    peft_model = get_peft_model(model, imedsam_peft_config(tiny_config(use_frequency_adapter=False)))
    randomize_adapters(peft_model)
    wrapped = peft_model.base_model.model.vision_encoder.layers[0].attn.qkv
    x = torch.randn(2, 5, wrapped.in_features, generator=torch.Generator().manual_seed(0))
    wrapped.eval()
    inference = wrapped(x)
    wrapped.train()
    for name in list(wrapped.lora_dropout):
        wrapped.lora_dropout[name] = torch.nn.Identity()
    torch.testing.assert_close(wrapped(x), inference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(inference, wrapped.base_layer(x))


def test_disable_adapter_gives_base_outputs_and_unload_restores_base_exactly(inputs):
    base = tiny_model()
    reference_state = {k: v.clone() for k, v in base.state_dict().items()}
    reference = predict(base, inputs)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config))
    randomize_adapters(peft_model)
    peft_model.eval()
    assert not torch.allclose(predict(peft_model, inputs), reference)
    with peft_model.disable_adapter():
        torch.testing.assert_close(predict(peft_model, inputs), reference, atol=0, rtol=0)
    unloaded = peft_model.unload()
    assert type(unloaded) is IMedSamModel
    assert unloaded.state_dict().keys() == reference_state.keys()
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    torch.testing.assert_close(predict(unloaded, inputs), reference, atol=0, rtol=0)


def test_merge_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="cannot be merged"):
        adapted().merge_and_unload()


def test_lora_only_adapter_merges_exactly(inputs):
    model = tiny_model(use_frequency_adapter=False)
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, modules_to_save=None))
    randomize_adapters(peft_model)
    peft_model.eval()
    expected = predict(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(predict(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_adapter_save_and_load(tmp_path, inputs):
    peft_model = adapted()
    expected = predict(peft_model, inputs)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    peft_model.get_base_model()  # the base keeps its own weights; save an untouched copy of it
    tiny_model().save_pretrained(base_dir)
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (
        saved["peft_type"].startswith("FREQ_ADAPTER")
        and "pip install git+https://github.com/imedsam-hf/imedsam-hf" in saved["peft_type"]
    )
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), FrequencyAdapterConfig)
    # Loading it in a fresh process after `import imedsam_hf`: tests/test_layout.py (one interpreter for all such).
    base = tiny_model()
    torch.testing.assert_close(predict(PeftModel.from_pretrained(base, adapter_dir).eval(), inputs), expected)


def test_publishing_form_round_trips_through_both_automodel_paths(tmp_path, inputs):
    peft_model = adapted()
    expected = predict(peft_model, inputs)
    out = tmp_path / "published"
    full = save_pretrained_full(peft_model, out)
    torch.testing.assert_close(predict(full, inputs), expected, atol=0, rtol=0)
    assert not (out / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file() and (out / "modeling_imedsam.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_imedsam.IMedSamModel"
    assert config["adapter_config"]["lora_rank"] == 4

    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is IMedSamModel
    torch.testing.assert_close(predict(reloaded, inputs), expected, atol=0, rtol=0)

    # Loading with trust_remote_code where the package is absent: tests/test_layout.py.


def test_adapter_from_published_subfolder_matches(tmp_path, inputs):
    peft_model = adapted()
    expected = predict(peft_model, inputs)
    save_pretrained_full(peft_model, tmp_path / "published")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "published" / "adapter").eval()
    torch.testing.assert_close(predict(loaded, inputs), expected, atol=0, rtol=0)


def test_spectrum_is_float32_under_autocast_and_standardised():
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spectrum = image_spectrum(pixel_values.bfloat16())
    assert spectrum.dtype == torch.bfloat16
    plain = image_spectrum(pixel_values)
    torch.testing.assert_close(plain.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert not torch.allclose(image_spectrum(pixel_values, "phase"), plain)


def test_bf16_autocast_forward_runs(inputs):
    peft_model = adapted().train()
    pixel_values, boxes = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = peft_model(pixel_values=pixel_values, input_boxes=boxes)
    outputs.logits.float().mean().backward()
    assert torch.isfinite(outputs.logits.float()).all()


def test_repo_root_is_importable_for_subprocesses():
    assert (REPO_ROOT / "imedsam_hf" / "__init__.py").is_file()


def test_default_vit_b_at_384_trains_the_papers_budget():
    from transformers import SamConfig

    model = IMedSamModel(IMedSamConfig.from_sam_config(SamConfig(), image_size=384))
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, imedsam_peft_config(model.config))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 92e6 <= total <= 95e6
    assert 1.4e6 <= trainable <= 1.8e6


def test_fusion_gate_starts_as_the_base_model_and_learns(inputs):
    base = tiny_model()
    reference = predict(base, inputs)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config, fusion_gate=True))
    peft_model.eval()
    torch.testing.assert_close(predict(peft_model, inputs), reference, atol=0, rtol=0)
    peft_model.train()
    pixel_values, boxes = inputs
    peft_model(pixel_values=pixel_values, input_boxes=boxes).logits.square().mean().backward()
    gates = [p for n, p in peft_model.named_parameters() if "freq_gate" in n]
    assert len(gates) == 2 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_config_changes_reach_the_trained_implicit_decoder_copy(inputs):
    """Regression: modules_to_save deep-copies the implicit decoder with its config; run-time settings set on the
    model's config after wrapping (query mode, refine ratio) must still apply."""
    peft_model = adapted()
    pixel_values, boxes = inputs
    config = peft_model.get_base_model().config
    config.refine_ratio = 0.25
    with torch.no_grad():
        outputs = peft_model(pixel_values=pixel_values, input_boxes=boxes, output_size=(16, 16))
    assert outputs.refined.flatten(1).sum(1).tolist() == [64, 64]
    config.query_mode, config.adaptive_base_size, config.query_region = "adaptive", 8, "image"
    with torch.no_grad():
        adaptive = peft_model(pixel_values=pixel_values, input_boxes=boxes, output_size=(32, 32))
    assert adaptive.refined.flatten(1).sum(1).tolist() == [round(0.25 * 8 * 8 * 4)] * 2


def test_publishing_a_named_adapter_with_fusion_gates(tmp_path, inputs):
    model = tiny_model()
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, fusion_gate=True), adapter_name="polyps")
    randomize_adapters(peft_model)
    peft_model.eval()
    expected = predict(peft_model, inputs)
    save_pretrained_full(peft_model, tmp_path / "published")
    reloaded = AutoModel.from_pretrained(tmp_path / "published").eval()
    assert reloaded.config.adapter_config["fusion_gate"] is True
    torch.testing.assert_close(predict(reloaded, inputs), expected, atol=0, rtol=0)


def test_normalized_chain_is_the_released_form(inputs):
    """`chain="normalized"`: f(i+1) = LN f(i) + FA(LN f(i)) at every fusion layer; "residual": f(i) + FA(LN f(i))."""
    for form in ("residual", "normalized"):
        base = tiny_model()
        peft_model = get_peft_model(base, imedsam_peft_config(base.config, chain=form))
        randomize_adapters(peft_model)
        layers = [m for m in peft_model.modules() if isinstance(m, FrequencyFusionLayer)]
        seen = []

        def record(module, args, output, seen=seen):
            stream = module.streams["default"]
            seen.append((stream.read(module.position), stream.read(module.position + 1)))

        for layer in layers:
            layer.register_forward_hook(record)
        predict(peft_model.eval(), inputs)
        assert len(seen) == len(layers) == 2
        for layer, (before, after) in zip(layers, seen):
            adapter = layer.freq_adapter["default"]
            skip = adapter[0](before) if form == "normalized" else before
            torch.testing.assert_close(after, skip + adapter(before))
    with pytest.raises(ValueError, match="chain"):
        imedsam_peft_config(tiny_config(), chain="normalised")
    # --peft_overrides takes a setting by its IMedSamConfig name too (it once failed deep in a dataclass __init__),
    # and names a misspelt one with the valid names.
    assert imedsam_peft_config(tiny_config(), frequency_chain="normalized").chain == "normalized"
    with pytest.raises(ValueError, match=r"unknown adapter setting\(s\) \['frequency_chian'\].*'chain'"):
        imedsam_peft_config(tiny_config(), frequency_chian="normalized")


@pytest.mark.slow
def test_at_initialisation_only_the_fusion_gate_keeps_the_pretrained_encoder():
    """
    LiteMedSAM on a real polyp, adapters freshly added. Measured: with the fusion gate off the image embedding moves by
    about 1.5x its RMS whatever the chain form (residual 1.48, normalized 1.43): the fixed 0.5 fusion outweighs the
    blocks' own MLP outputs (RMS 0.3-0.5) even when the stream stays at a LayerNorm's scale (normalized: fused term
    RMS 0.5-0.6 at every block; residual: 2, then 9, then 107 in the last stage). The zero-initialised gate keeps it
    exactly.
    """
    from conftest import SHARED_DATA

    from imedsam_hf import load_model
    from imedsam_hf.data import discover_pairs
    from imedsam_hf.processing_imedsam import to_rgb_array

    model, processor = load_model("litemedsam", eval_mode=False)
    pair = discover_pairs(SHARED_DATA / "Kvasir-SEG-sample")[0][0]
    pixel_values = processor(to_rgb_array(pair.image))["pixel_values"]
    with torch.no_grad():
        frozen = model.eval().encode_image(pixel_values)
    moved, fused = {}, {}
    for form, gate in (("residual", False), ("normalized", False), ("residual", True)):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, imedsam_peft_config(model.config, fusion_gate=gate, chain=form)).eval()
        sizes = []
        for layer in peft_model.modules():
            if isinstance(layer, FrequencyFusionLayer):
                layer.register_forward_hook(
                    lambda m, a, o, sizes=sizes: sizes.append(
                        m.streams["default"].read(m.position + 1).square().mean().sqrt().item()
                    )
                )
        with torch.no_grad():
            adapted = peft_model.base_model.model.encode_image(pixel_values)
        moved[(form, gate)] = ((adapted - frozen).square().mean() / frozen.square().mean()).sqrt().item()
        fused[(form, gate)] = [0.5 * size for size in sizes]
        model = peft_model.unload()
    assert moved[("residual", True)] == 0.0
    assert moved[("residual", False)] > 1.0 and moved[("normalized", False)] > 1.0, moved
    assert max(fused[("normalized", False)]) < 1.0 < 50.0 < fused[("residual", False)][-1], fused


def test_gated_lora_scales_each_inputs_update_and_publishes(tmp_path, inputs):
    """`lora_gate`: delta = g(mean of the tokens) * B A x per batch entry (the released LoRA_qkv); never merged."""
    model = tiny_model(use_frequency_adapter=False)
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, lora_gate=True))
    randomize_adapters(peft_model)
    wrapped = peft_model.base_model.model.vision_encoder.layers[0].attn.qkv
    assert "default" in wrapped.freq_lora_gate and any(
        "freq_lora_gate" in n for n, p in peft_model.named_parameters() if p.requires_grad
    )
    x = torch.randn(2, 3, 5, wrapped.in_features, generator=torch.Generator().manual_seed(0))  # (windows, h, w, d)
    gate = wrapped.freq_lora_gate["default"](x.mean(dim=(1, 2), keepdim=True))  # (2, 1, 1, 1)
    expected = wrapped.base_layer(x)
    for part in ("q", "v"):
        index = wrapped.output_indices[part]
        update = getattr(wrapped, f"freq_lora_{part}_B")["default"](
            getattr(wrapped, f"freq_lora_{part}_A")["default"](x)
        )
        expected[..., index] += gate * update * wrapped.lora_scaling["default"]
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gate[0], gate[1])  # one gate per image or window
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapped.merge()
    peft_model.eval()
    before = predict(peft_model, inputs)
    published = save_pretrained_full(peft_model, tmp_path / "gated")
    assert json.loads((tmp_path / "gated" / "config.json").read_text())["adapter_config"]["lora_gate"] is True
    torch.testing.assert_close(predict(AutoModel.from_pretrained(tmp_path / "gated").eval(), inputs), before)
    torch.testing.assert_close(predict(published, inputs), before)


def test_box_windows_decode_with_the_trained_copy_of_the_mask_decoder(inputs):
    """`train_mask_decoder=True` wraps the whole mask decoder (PEFT's modules_to_save): in eval mode the windowed
    decoding (`attend`, `upscale_windows`) must run the trained copy, as the whole-frame path does."""
    pixel_values, _ = inputs
    base = tiny_model(query_mode="adaptive")
    last = base.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)  # SAM's logits 0: the windows hold
    peft_model = get_peft_model(base, imedsam_peft_config(base.config, train_mask_decoder=True)).eval()
    trained = peft_model.base_model.model.mask_decoder.modules_to_save["default"]
    with torch.no_grad():
        trained.upscale_conv2.weight.mul_(3.0)  # the trained copy differs from the frozen original
        kwargs = {"pixel_values": pixel_values[:1], "input_boxes": torch.tensor([[[4.0, 6.0, 14.0, 14.0]]])}
        windowed = peft_model(**kwargs, output_size=(40, 40))
        full = peft_model(**kwargs, output_size=(40, 40), full_sam_logits=True)
        with peft_model.disable_adapter():
            original = peft_model(**kwargs, output_size=(40, 40))
    assert (windowed.sam_logits == -30.0).any()  # decoded in a window
    torch.testing.assert_close(windowed.logits > 0, full.logits > 0)
    inside = windowed.refined[0, 0] | (windowed.uncertainty[0, 0] > 0)
    torch.testing.assert_close(windowed.logits[0, 0, 0][inside], full.logits[0, 0, 0][inside])
    assert not torch.allclose(windowed.logits, original.logits)  # not the frozen original's
