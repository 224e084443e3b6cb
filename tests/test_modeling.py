"""IMedSamModel: prompts, output sizes, batching, uncertainty-guided refinement, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_batchnorm, tiny_config, tiny_model

from imedsam_hf import IMedSamModel, load_model
from imedsam_hf.modeling_imedsam import SAM_WINDOW_FLOOR, IMedSamQuerySettings, region_pixels, sam_mask_on_grid


@pytest.mark.parametrize("prompt", ["box", "points", "none"])
def test_forward_backward_each_prompt_kind(prompt, inputs):
    pixel_values, boxes = inputs
    model = tiny_model().train()
    kwargs = {}
    if prompt == "box":
        kwargs["input_boxes"] = boxes
    elif prompt == "points":
        kwargs["input_points"] = torch.tensor([[[20.0, 30.0], [50.0, 10.0]], [[5.0, 5.0], [33.0, 40.0]]])
        kwargs["input_labels"] = torch.tensor([[1, 0], [1, 1]])
    outputs = model(pixel_values, **kwargs)
    assert outputs.logits.shape == (2, 1, 64, 64)
    assert outputs.coarse_logits.shape == (2, 1, 64, 64)
    assert outputs.uncertainty.shape == (2, 64, 64)
    assert outputs.refined.shape == (2, 64, 64) and outputs.refined.dtype == torch.bool
    (outputs.logits.sum() + outputs.coarse_logits.sum()).backward()
    decoder = model.implicit_decoder
    assert decoder.fine_head.weight.grad.abs().sum() > 0
    assert decoder.coarse_head.weight.grad.abs().sum() > 0
    assert model.mask_decoder.upscale_conv1.weight.grad.abs().sum() > 0


def test_prompts_change_the_prediction(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        boxed = model(pixel_values, input_boxes=boxes).logits
        free = model(pixel_values).logits
    assert not torch.allclose(boxed, free)


@pytest.mark.parametrize("size", [(17, 23), (128, 128), (896, 640)])
def test_any_output_size(size, inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        outputs = model(pixel_values[:1], input_boxes=boxes[:1], output_size=size)
    assert outputs.logits.shape == (1, 1, *size)
    assert outputs.refined.sum().item() == round(0.125 * size[0] * size[1])


def test_batch_matches_single_images(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        batched = model(pixel_values, input_boxes=boxes, output_size=(40, 56))
        for i in range(2):
            single = model(pixel_values[i : i + 1], input_boxes=boxes[i : i + 1], output_size=(40, 56))
            torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.uncertainty[i], single.uncertainty[0], atol=1e-6, rtol=1e-5)
            assert torch.equal(batched.refined[i], single.refined[0])


def test_inference_is_deterministic_and_chunking_invariant(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        first = model(pixel_values, input_boxes=boxes, output_size=(50, 70))
        second = model(pixel_values, input_boxes=boxes, output_size=(50, 70))
        model.config.query_chunk_size = 97  # many small chunks, one ragged
        chunked = model(pixel_values, input_boxes=boxes, output_size=(50, 70))
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.refined, chunked.refined)
    torch.testing.assert_close(first.logits, chunked.logits, atol=1e-5, rtol=1e-5)


def test_refinement_is_uncertainty_driven_in_eval_mode(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    height, width = 48, 40
    with torch.no_grad():
        outputs = model(pixel_values, input_boxes=boxes, output_size=(height, width))
    expected = round(0.125 * height * width)
    for i in range(2):
        refined, uncertainty = outputs.refined[i], outputs.uncertainty[i]
        assert refined.sum().item() == expected  # per image, not over the flattened batch
        assert uncertainty.max() > 0  # MC dropout stays active for the sampling passes
        assert uncertainty[refined].min() >= uncertainty[~refined].max()
        # The refined points carry the fine prediction, the others the coarse one.
        assert torch.equal(outputs.logits[i, :, ~refined], outputs.coarse_logits[i, :, ~refined])
        assert not torch.allclose(outputs.logits[i, :, refined], outputs.coarse_logits[i, :, refined])


def test_refine_ratio_and_training_mode_selection(inputs):
    pixel_values, boxes = inputs
    model = tiny_model(refine_ratio=0.25).train()
    outputs = model(pixel_values, input_boxes=boxes, output_size=(16, 16))
    assert outputs.refined.flatten(1).sum(1).tolist() == [64, 64]
    for i in range(2):
        u, r = outputs.uncertainty[i], outputs.refined[i]
        assert u[r].min() >= u[~r].max()


def test_multi_class_logits(inputs):
    pixel_values, boxes = inputs
    model = tiny_model(num_classes=3)
    with torch.no_grad():
        outputs = model(pixel_values, input_boxes=boxes, output_size=(20, 30))
    assert outputs.logits.shape == (2, 3, 20, 30)
    assert outputs.uncertainty.shape == (2, 20, 30)


def test_implicit_decoder_off_uses_sam_mask(inputs):
    pixel_values, boxes = inputs
    model = tiny_model(use_implicit_decoder=False)
    assert model.implicit_decoder is None
    with torch.no_grad():
        outputs = model(pixel_values, input_boxes=boxes, output_size=(32, 48))
    assert outputs.logits.shape == (2, 1, 32, 48)
    assert outputs.refined is None
    frame = torch.nn.functional.interpolate(outputs.sam_logits, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.interpolate(frame, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs.logits, expected)


def test_precomputed_image_embeddings_give_the_same_result(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        direct = model(pixel_values, input_boxes=boxes)
        cached = model(image_embeddings=model.encode_image(pixel_values), input_boxes=boxes)
    torch.testing.assert_close(direct.logits, cached.logits)


def test_frozen_batchnorm_stays_in_eval_mode_when_training():
    model = tiny_model()
    encoder_norm = torch.nn.BatchNorm2d(4)
    model.vision_encoder.extra_norm = encoder_norm  # stands in for TinyViT's BatchNorm layers
    encoder_norm.requires_grad_(False)
    model.train()
    assert not encoder_norm.training
    assert model.implicit_decoder.coarse_mlp[1].training  # trainable BatchNorm does train


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixel_values=torch.zeros(1, 3, 32, 32)), "pixel_values"),
        (dict(pixel_values=torch.zeros(1, 3, 64, 64), input_boxes=torch.zeros(1, 2, 5)), "input_boxes"),
        (
            dict(
                pixel_values=torch.zeros(1, 3, 64, 64), input_points=torch.zeros(1, 2, 2), input_labels=torch.ones(1, 3)
            ),
            "input_labels",
        ),
        (dict(pixel_values=torch.zeros(1, 3, 64, 64), output_size=(0, 5)), "output_size"),
        (dict(), "pixel_values"),
    ],
)
def test_bad_inputs_are_named(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(refine_ratio=1.5), "refine_ratio"),
        (dict(mc_passes=1), "mc_passes"),
        (dict(num_classes=2, use_implicit_decoder=False), "num_classes"),
        (dict(spectrum="wavelet"), "spectrum"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_randomize_batchnorm_helper_changes_running_stats():
    model = IMedSamModel(tiny_config())
    randomize_batchnorm(model)
    assert model.implicit_decoder.coarse_mlp[1].running_mean.abs().sum() > 0


def test_output_region_queries_only_that_part_of_the_frame(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    with torch.no_grad():
        full = model(pixel_values, input_boxes=boxes, output_size=(64, 64))
        # The top-left 32x48 block of the frame, queried at the same point density.
        region = torch.tensor([0.0, 0.0, 0.75, 0.5])
        part = model(pixel_values, input_boxes=boxes, output_size=(32, 48), output_region=region)
    torch.testing.assert_close(part.coarse_logits, full.coarse_logits[:, :, :32, :48], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_region"):
        model(pixel_values, output_region=torch.tensor([0.5, 0.0, 0.2, 1.0]))


def test_sam_prior_starts_the_implicit_decoder_at_the_sam_mask(inputs):
    pixel_values, boxes = inputs
    model = tiny_model(implicit_sam_prior=True)
    with torch.no_grad():
        for head in (model.implicit_decoder.coarse_head, model.implicit_decoder.fine_head):
            head.weight.zero_()
            head.bias.zero_()
        outputs = model(pixel_values, input_boxes=boxes, output_size=(16, 16))
    # With zero heads the implicit decoder returns SAM's logit at every point (16x16 = SAM's own grid).
    torch.testing.assert_close(outputs.logits, outputs.sam_logits, atol=1e-5, rtol=1e-5)
    # Several classes: each class's logit is a residual on the prompt's one SAM logit (class-aware prompts).
    model = tiny_model(implicit_sam_prior=True, num_classes=3)
    with torch.no_grad():
        for head in (model.implicit_decoder.coarse_head, model.implicit_decoder.fine_head):
            head.weight.zero_()
            head.bias.zero_()
        aware = model(
            pixel_values, input_boxes=boxes, input_classes=torch.full((boxes.shape[0], 1), 2), output_size=(16, 16)
        )
    torch.testing.assert_close(aware.logits, aware.sam_logits, atol=1e-5, rtol=1e-5)


def test_overrides_of_a_saved_config_are_checked(tmp_path):
    """`from_pretrained(folder, **overrides)` sets the overrides after the config's checks: loading checks again."""
    tiny_model().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="refine_ratio"):
        load_model(str(tmp_path / "m"), config_overrides={"refine_ratio": 2.0})


def test_adaptive_querying_matches_dense_up_to_the_base_grid_and_refines_few_points(inputs):
    pixel_values, boxes = inputs
    dense = tiny_model(query_mode="dense")
    adaptive = tiny_model(query_mode="adaptive", adaptive_base_size=32, query_region="image")
    with torch.no_grad():
        # At or below the base grid the two modes are the same computation.
        small_dense = dense(pixel_values, input_boxes=boxes, output_size=(32, 24))
        small_adaptive = adaptive(pixel_values, input_boxes=boxes, output_size=(32, 24))
        torch.testing.assert_close(small_dense.logits, small_adaptive.logits)
        big_dense = dense(pixel_values, input_boxes=boxes, output_size=(256, 192))
        big = adaptive(pixel_values, input_boxes=boxes, output_size=(256, 192))
    assert big.logits.shape == (2, 1, 256, 192)
    # Budget: refine_ratio of the 32x24 base grid, scaled by the 8x upsampling (boundary length, not area).
    assert big.refined.flatten(1).sum(1).tolist() == [round(0.125 * 32 * 24 * 8)] * 2
    assert big.refined.sum() < big_dense.refined.sum() / 4
    # Refined points are exact: the same coarse predictions as dense querying at those points.
    for i in range(2):
        exact, reference = big.coarse_logits[i, :, big.refined[i]], big_dense.coarse_logits[i, :, big.refined[i]]
        torch.testing.assert_close(exact, reference, atol=5e-3, rtol=1e-3)
    # (Agreement of the masks needs a trained, smooth field: benchmarks/ measures it on real data.)
    # Refinement follows the uncertainty: the refined points are on average more uncertain than the others.
    for i in range(2):
        assert big.uncertainty[i][big.refined[i]].mean() > big.uncertainty[i][~big.refined[i]].mean()


def test_query_coordinates_predict_arbitrary_points(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    coordinates = (
        torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="xy"), -1).reshape(1, -1, 2) + 0.5
    ) / 8
    with torch.no_grad():
        grid = model(pixel_values[:1], input_boxes=boxes[:1], output_size=(8, 8))
        points = model(pixel_values[:1], input_boxes=boxes[:1], query_coordinates=coordinates)
    assert points.logits.shape == (1, 1, 1, 64)
    torch.testing.assert_close(points.coarse_logits.reshape(1, 1, 8, 8), grid.coarse_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["adaptive", "dense"])
def test_bf16_autocast_inference_in_both_query_modes(mode, inputs):
    """Regression: adaptive querying mixed float32 upsampled maps with bf16 MLP outputs under autocast."""
    pixel_values, boxes = inputs
    model = tiny_model(query_mode=mode, adaptive_base_size=16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(pixel_values, input_boxes=boxes, output_size=(96, 80))
    assert outputs.logits.shape == (2, 1, 96, 80) and torch.isfinite(outputs.logits.float()).all()


@pytest.mark.parametrize("train", [True, False])
def test_refine_ratio_zero_uses_the_coarse_prediction(train, inputs):
    pixel_values, boxes = inputs
    model = tiny_model(refine_ratio=0.0).train(train)
    with torch.set_grad_enabled(train):
        outputs = model(pixel_values, input_boxes=boxes, output_size=(16, 16))
    assert not outputs.refined.any()
    torch.testing.assert_close(outputs.logits, outputs.coarse_logits)


def test_inference_fast_paths_equal_the_layer_by_layer_computation():
    """Eval mode folds BatchNorm into the Linears and the MC dropout masks into the head's rows: same numbers."""
    model = tiny_model(num_classes=2)
    decoder, settings = model.implicit_decoder, IMedSamQuerySettings.from_config(model.config)
    points = torch.randn(2, 50, decoder.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features, uncertainty = decoder.coarse(points, settings)
        hidden = decoder.coarse_mlp(points.flatten(0, 1)).unflatten(0, (2, 50))
        head = decoder.coarse_head(hidden)
        passes = [decoder.coarse_head(hidden * mask)[..., :2] for mask in decoder.inference_dropout_masks(settings)]
        torch.testing.assert_close(logits, head[..., :2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features, head[..., 2:], atol=1e-5, rtol=1e-5)
        expected = torch.stack(passes).sigmoid().var(dim=0).mean(dim=-1)
        torch.testing.assert_close(uncertainty, expected, atol=1e-6, rtol=1e-5)
        # Points the fine decoder will not see skip the coarse-feature rows of the head.
        logits_only, no_features, same_uncertainty = decoder.coarse(points, settings, with_features=False)
        assert no_features is None
        torch.testing.assert_close(logits_only, logits)
        torch.testing.assert_close(same_uncertainty, uncertainty)
        fine = decoder.fine(points, features)
        reference = decoder.fine_head(decoder.fine_mlp(torch.cat([points, features], -1).flatten(0, 1)))
        torch.testing.assert_close(fine, reference.unflatten(0, (2, 50)), atol=1e-5, rtol=1e-5)


def test_blockwise_selection_picks_the_same_points_as_one_topk(monkeypatch):
    import imedsam_hf.modeling_imedsam as modeling

    monkeypatch.setattr(modeling, "TOPK_BLOCK", 1000)
    model = tiny_model()
    decoder, settings = model.implicit_decoder, IMedSamQuerySettings.from_config(model.config)
    uncertainty = torch.rand(2, 10_500, generator=torch.Generator().manual_seed(0))
    for k in (1, 37, 400, 600):  # 600: 2k > block, one plain topk
        selected = decoder._select(uncertainty, settings, k)
        expected = uncertainty.topk(k, dim=1).indices
        assert selected.shape == (2, k)
        for row, reference in zip(selected, expected):
            assert set(row.tolist()) == set(reference.tolist())


@pytest.mark.parametrize("query_mode", ["dense", "adaptive"])
@pytest.mark.parametrize("use_implicit_decoder", [True, False])
def test_several_prompts_per_image_equal_one_call_per_prompt(query_mode, use_implicit_decoder):
    """Boxes `(B, P, 4)`: one encoder pass, every output with a prompt axis, each prompt's mask as if alone."""
    model = tiny_model(query_mode=query_mode, use_implicit_decoder=use_implicit_decoder)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor(
        [[[10.0, 12, 40, 50], [5, 5, 60, 30], [20, 20, 30, 30]], [[1.0, 2, 30, 40], [10, 10, 50, 50], [0, 0, 64, 64]]]
    )
    region = torch.tensor([0.0, 0.0, 1.0, 0.8])
    encoder_calls = []
    model.vision_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    with torch.no_grad():
        several = model(pixel_values, input_boxes=boxes, output_size=(40, 30), output_region=region)
        assert len(encoder_calls) == 1
        assert several.logits.shape == (2, 3, 1, 40, 30) and several.iou_scores.shape == (2, 3, 1)
        assert several.sam_logits.shape == (2, 3, 1, 16, 16)
        for prompt in range(3):
            alone = model(pixel_values, input_boxes=boxes[:, prompt], output_size=(40, 30), output_region=region)
            torch.testing.assert_close(several.logits[:, prompt], alone.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(several.iou_scores[:, prompt], alone.iou_scores, atol=1e-5, rtol=1e-5)
            if use_implicit_decoder:
                assert torch.equal(several.refined[:, prompt], alone.refined)
                torch.testing.assert_close(several.uncertainty[:, prompt], alone.uncertainty, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_size,num_prompts", [(1, 1), (1, 5), (2, 3)])
def test_shared_image_transformer_equals_sams_two_way_transformer(batch_size, num_prompts):
    """The mask decoder's transformer computes the image side of its first block once per image: outputs and
    gradients equal `SamTwoWayTransformer`'s on every prompt's own copy of the image, also inside a PEFT model whose
    trained copy of the transformer (`modules_to_save`) is the one that runs."""
    from peft import get_peft_model

    from imedsam_hf import imedsam_peft_config
    from imedsam_hf.modeling_imedsam import shared_image_two_way_transformer

    model = tiny_model()
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, train_mask_decoder="transformer"))
    wrapped = peft_model.get_base_model().mask_decoder.transformer
    trained = wrapped.modules_to_save["default"]
    with torch.no_grad():
        for parameter in trained.parameters():  # the trained copy differs from the frozen original
            parameter.add_(0.05 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(0)
    hidden, size = trained.config.hidden_size, 4
    image = torch.randn(batch_size, hidden, size, size, generator=generator, requires_grad=True)
    positional = torch.randn(1, hidden, size, size, generator=generator).expand(batch_size, -1, -1, -1)
    tokens = torch.randn(batch_size, num_prompts, 7, hidden, generator=generator, requires_grad=True)
    rows = batch_size * num_prompts
    expected_tokens, expected_image = trained(
        point_embeddings=tokens,
        image_embeddings=image.repeat_interleave(num_prompts, 0),
        image_positional_embeddings=positional.repeat_interleave(num_prompts, 0),
        attention_similarity=None,
    )
    flat = (image.flatten(2).transpose(1, 2), positional.flatten(2).transpose(1, 2))
    got_tokens, got_image = shared_image_two_way_transformer(wrapped, tokens.reshape(rows, 7, hidden), *flat)
    torch.testing.assert_close(got_tokens, expected_tokens.reshape(rows, 7, hidden), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_image, expected_image.reshape(rows, size * size, hidden), atol=1e-5, rtol=1e-5)
    weights = torch.randn(rows, size * size, hidden, generator=generator)
    expected = torch.autograd.grad(
        (expected_image.reshape(rows, -1, hidden) * weights).sum() + expected_tokens.sum(),
        [image, tokens, *trained.parameters()],
    )
    got = torch.autograd.grad((got_image * weights).sum() + got_tokens.sum(), [image, tokens, *trained.parameters()])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_several_prompts_with_points_and_mismatched_counts():
    model = tiny_model()
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[[[20.0, 30.0]], [[50.0, 10.0]]]])  # (1, 2 prompts, 1 point, 2)
    with torch.no_grad():
        several = model(pixel_values, input_points=points, output_size=(16, 16))
        alone = model(pixel_values, input_points=points[:, 1], output_size=(16, 16))
    torch.testing.assert_close(several.logits[:, 1], alone.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prompts per image"):
        model(pixel_values, input_boxes=torch.zeros(1, 3, 4), input_points=points)


@pytest.mark.parametrize("query_mode", ["dense", "adaptive"])
def test_class_aware_prompts_use_their_own_class_heads(query_mode):
    """input_classes: each prompt's mask and uncertainty come from its class's heads alone (one output channel)."""
    model = tiny_model(num_classes=3, query_mode=query_mode, refine_ratio=1.0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[10.0, 12, 40, 50], [5, 5, 60, 30]], [[1.0, 2, 30, 40], [10, 10, 50, 50]]])
    classes = torch.tensor([[1, 3], [2, 2]])
    with torch.no_grad():
        aware = model(pixel_values, input_boxes=boxes, input_classes=classes, output_size=(24, 20))
        every = model(pixel_values, input_boxes=boxes, output_size=(24, 20))
    assert aware.logits.shape == (2, 2, 1, 24, 20)
    # Dense querying predicts every point exactly (and refine_ratio 1 refines all), so the class channel of the
    # class-agnostic call is the reference. Adaptive querying refines where the prompt's own class is uncertain,
    # which differs from where the classes on average are: only the shapes compare there.
    for b in range(2):
        for p in range(2):
            if query_mode == "dense":
                for name in ("coarse_logits", "logits"):
                    channel = getattr(every, name)[b, p, classes[b, p] - 1]
                    torch.testing.assert_close(getattr(aware, name)[b, p, 0], channel, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="class ids 1..3"):
        model(pixel_values, input_boxes=boxes, input_classes=torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="one class per prompt"):
        model(pixel_values, input_boxes=boxes, input_classes=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=1"):
        tiny_model()(pixel_values, input_boxes=boxes, input_classes=classes)


def test_box_prompts_query_only_their_region_of_interest(inputs):
    """`query_region="box"`: inside the region the implicit decoder answers (every point of a small region exactly,
    as a dense query of that region), outside it SAM's own logits; the work follows the region's area."""
    pixel_values, _ = inputs
    model = tiny_model(query_mode="adaptive", query_margin=0.0)
    box_only(model)  # a random SAM head's mask covers the frame; a trained one's covers the structure
    with torch.no_grad():
        boxes = torch.tensor([[[20.0, 20.0, 27.0, 26.0]]])
        outputs = model(pixel_values[:1], input_boxes=boxes, output_size=(256, 256))
        sam_logits = outputs.sam_logits.flatten(0, 1)  # (prompts, 1, h, w)
        regions = model.regions_of_interest(boxes, sam_logits, 0.0)
        sam = sam_mask_on_grid(sam_logits, 64, (256, 256), None)
    x0, y0, x1, y1 = (regions[0] * 256).tolist()
    inside = torch.zeros(256, 256, dtype=torch.bool)
    inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    assert 0 < inside.sum() < 256 * 256
    logits = outputs.logits[0, 0, 0]
    torch.testing.assert_close(logits[~inside], sam[0, 0][~inside])  # SAM's logits outside
    assert not torch.equal(logits[inside], sam[0, 0][inside])  # the implicit decoder inside
    assert not outputs.refined[0, 0][~inside].any()
    # Exactly the computation of the image path restricted to the region's pixels (a region of interest <= 32^2
    # points a side at this size is queried at every point, as dense querying would).
    dense = tiny_model(query_mode="dense", query_region="image")
    rows, columns = inside.any(1).nonzero(), inside.any(0).nonzero()
    region = torch.tensor([[columns.min() / 256, rows.min() / 256, (columns.max() + 1) / 256, (rows.max() + 1) / 256]])
    with torch.no_grad():
        crop = dense(pixel_values[:1], input_boxes=boxes, output_region=region, output_size=(len(rows), len(columns)))
    torch.testing.assert_close(logits[inside].reshape(len(rows), len(columns)), crop.logits[0, 0, 0])


def test_decoding_work_follows_the_structure_not_the_image(inputs):
    """Query points of the coarse MLP for a small and a large box at a 512x512 output: box mode spends in proportion
    to the region, the image path the same for both."""
    pixel_values, _ = inputs
    counts = {}
    for region in ("box", "image"):
        model = tiny_model(query_mode="adaptive", query_region=region, adaptive_base_size=64)  # as LiteMedSAM's 128
        box_only(model)
        seen = []
        decoder, point_features = model.implicit_decoder, model.implicit_decoder.point_features

        def counting(maps, embedding, coordinates, *rest, seen=seen, point_features=point_features):
            seen.append(coordinates.shape[0] * coordinates.shape[1])
            return point_features(maps, embedding, coordinates, *rest)

        decoder.point_features = counting
        for name, box in (("small", [20.0, 20.0, 24.0, 24.0]), ("large", [2.0, 2.0, 62.0, 62.0])):
            seen.clear()
            with torch.no_grad():
                model(pixel_values[:1], input_boxes=torch.tensor([box]), output_size=(512, 512))
            counts[region, name] = sum(seen)
    assert counts["image", "small"] == counts["image", "large"]
    assert counts["box", "small"] * 4 < counts["box", "large"] <= counts["image", "large"] * 1.5


def test_upscaling_a_window_of_tokens_gives_that_window_of_the_frame():
    """SAM's upscaling is local (each 4x4 output block from one image token): a window of tokens upscaled alone equals
    that window of the whole frame's features and mask logits, row by row with different windows."""
    decoder = tiny_model().mask_decoder
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 32, 4, 4, generator=generator)
    hyper_in = torch.randn(3, 4, generator=generator)
    windows = torch.tensor([[0, 4, 0, 4], [1, 3, 0, 2], [2, 4, 3, 4]])
    with torch.no_grad():
        frame = decoder.upscale(tokens)
        frame_logits = decoder.mask_logits(hyper_in, frame)
        masks, features = decoder.upscale_windows(hyper_in, tokens, windows)
    for row, (r0, r1, c0, c1) in enumerate(windows.tolist()):
        window = (..., slice(4 * r0, 4 * r1), slice(4 * c0, 4 * c1))
        torch.testing.assert_close(features.features[row][0], frame[row][window])
        torch.testing.assert_close(masks[row][window], frame_logits[row][window])
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[window[1:]] = False
        assert (masks[row, 0][outside] == SAM_WINDOW_FLOOR).all()


def test_box_prompts_are_upscaled_in_their_windows_with_the_frames_results(inputs):
    """Where SAM's mask stays inside each box's window, the default forward upscales the windows only (SAM's logits
    are background beyond them) and gives the whole frame's masks and, inside every region of interest, its logits;
    where SAM's mask reaches a window's edge (a random head's covers the frame) that prompt gets the whole frame."""
    pixel_values, _ = inputs
    boxes = torch.tensor([[[4.0, 6.0, 14.0, 14.0], [46.0, 44.0, 60.0, 58.0]]])
    for hyper in ("zero", "random"):
        model = tiny_model(query_mode="adaptive", query_margin=0.1)
        if hyper == "zero":  # SAM's logits 0 everywhere: no mask reaches any edge
            last = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
            torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
        with torch.no_grad():
            kwargs = {"pixel_values": pixel_values[:1], "input_boxes": boxes, "output_size": (48, 40)}
            windowed, full = model(**kwargs), model(**kwargs, full_sam_logits=True)
        floor = windowed.sam_logits == SAM_WINDOW_FLOOR
        if hyper == "random":
            torch.testing.assert_close(windowed.logits, full.logits)
            torch.testing.assert_close(windowed.sam_logits, full.sam_logits)
            continue
        assert floor[0, 0].float().mean() > 0.25 and floor[0, 1].float().mean() > 0.25  # windows, not the frame
        torch.testing.assert_close(windowed.sam_logits[~floor], full.sam_logits[~floor])
        assert torch.equal(windowed.logits > 0, full.logits > 0)
        regions = model.regions_of_interest(boxes, full.sam_logits.flatten(0, 1), 0.1)
        pixels, _ = region_pixels(regions, (48, 40), None)
        for row, (r0, r1, c0, c1) in enumerate(pixels):
            got, expected = windowed.logits[0, row, :, r0:r1, c0:c1], full.logits[0, row, :, r0:r1, c0:c1]
            torch.testing.assert_close(got, expected)
            assert not torch.equal(got, full.sam_logits.new_zeros(()).expand_as(got))  # the implicit decoder's
        with pytest.raises(TypeError, match="full_sam_logit"):
            model(**kwargs, full_sam_logit=True)


def test_bf16_decoding_runs_the_decoders_in_bf16_and_returns_float32(inputs):
    """`decoder_precision="bf16"`: inference under autocast (the implicit decoder's matrix products in bf16), outputs
    in float32 and close to fp32's; training ignores it (float32 gradients); an unknown precision is refused."""
    pixel_values, _ = inputs
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 34.0], [30.0, 28.0, 60.0, 58.0]]])
    model = tiny_model(query_mode="adaptive")
    seen = []
    model.implicit_decoder.coarse_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad():
        kwargs = {"pixel_values": pixel_values[:1], "input_boxes": boxes, "output_size": (40, 40)}
        full = model(**kwargs)
        model.config.decoder_precision = "bf16"
        half = model(**kwargs)
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    for name in ("logits", "sam_logits", "iou_scores", "uncertainty"):
        assert getattr(half, name).dtype == torch.float32, name
    torch.testing.assert_close(half.logits, full.logits, atol=0.02, rtol=0.02)  # bf16's rounding only
    model.train()
    seen.clear()
    model(pixel_values[:1], input_boxes=boxes[:, 0], query_coordinates=torch.rand(1, 20, 2))
    assert seen == [torch.float32]
    with pytest.raises(ValueError, match="decoder_precision"):
        tiny_model(decoder_precision="fp16")


def box_only(model) -> None:
    """Regions of interest from the boxes alone (as if SAM's mask lay inside them)."""
    model.regions_of_interest = lambda boxes, sam_logits, margin: (boxes.reshape(-1, 4) / 64).clamp(0, 1)


def test_the_region_of_interest_holds_the_box_and_sams_mask_widened():
    model = tiny_model()
    sam_logits = -torch.ones(2, 1, 16, 16)
    sam_logits[0, 0, 2:4, 10:12] = 1.0  # SAM's mask of the first prompt reaches beyond its box
    boxes = torch.tensor([[[8.0, 8.0, 24.0, 16.0], [8.0, 8.0, 24.0, 16.0]]])  # input pixels of a 64-px frame
    regions = model.regions_of_interest(boxes, sam_logits, 0.25)
    # Second prompt: its box (1/8..3/8 x 1/8..1/4) widened by a quarter of its size on each side.
    torch.testing.assert_close(regions[1], torch.tensor([0.0625, 0.09375, 0.4375, 0.28125]))
    # First: the box and SAM's mask (rows 2..3 of 16, columns 10..11 of 16) together, then widened.
    union = torch.tensor([0.125, 0.125, 0.75, 0.25])
    widen = (union[2:] - union[:2]) * 0.25
    torch.testing.assert_close(regions[0], torch.cat([union[:2] - widen, union[2:] + widen]).clamp(0, 1))


def test_folded_batchnorm_is_refolded_when_the_weights_change():
    """Inference folds each BatchNorm into its Linear once and keeps it: an in-place change of any of the six tensors
    (an optimizer step, `load_state_dict`) is seen at the next call, and the folded pair equals a fresh fold."""
    from imedsam_hf.modeling_tinyvit import fold_batchnorm

    model = tiny_model()
    decoder = model.implicit_decoder
    linear, norm = decoder.coarse_mlp[0], decoder.coarse_mlp[1]
    points = torch.rand(1, 50, decoder.input_size)
    with torch.no_grad():
        before = decoder._flat(decoder.coarse_mlp, points)
        assert decoder._folded(linear, norm) is decoder._folded(linear, norm)  # kept
        for tensor in (linear.weight, norm.running_var):
            tensor.mul_(1.5)  # in place, as an optimizer step or load_state_dict
            for got, fresh in zip(decoder._folded(linear, norm), fold_batchnorm(norm, linear.weight, linear.bias)):
                torch.testing.assert_close(got, fresh)
        after = decoder._flat(decoder.coarse_mlp, points)
    assert not torch.allclose(before, after)
    # With gradients to the weights the fold is part of the graph, never a kept tensor.
    folded, _ = decoder._folded(linear, norm)
    assert folded.requires_grad and folded.grad_fn is not None
