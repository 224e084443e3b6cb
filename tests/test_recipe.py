"""The training recipe's pieces (`imedsam_hf.training`): point sampling, losses (checked against formulas written
here, independently of the implementation), parameter groups and the training step's forward and loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, tiny_model, tiny_tinyvit_model
from peft import get_peft_model

import imedsam_hf
from imedsam_hf import IMedSamOutput, processor_for_config
from imedsam_hf.data import DataConfig, SegmentationDataset, collate, discover_pairs
from imedsam_hf.files import TEMPORARY_SUFFIX
from imedsam_hf.training import (
    FrozenImageEncoder,
    LossWeights,
    dice_bce,
    fine_weight_at,
    forward_and_loss,
    one_hot_targets,
    parameter_groups,
    sample_points,
    segmentation_loss,
)

# ----------------------------------------------------------------------------------------------------------------------
# reference formulas (numpy, float64), written from the documented definitions


def reference_dice_bce(logits, targets, dice_weight=0.8, bce_weight=0.2) -> float:
    """Soft Dice with +1 smoothing per image and class, averaged; BCE averaged over every element."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    batch, classes = logits.shape[:2]
    logits, targets = logits.reshape(batch, classes, -1), targets.reshape(batch, classes, -1)
    p = 1.0 / (1.0 + np.exp(-logits))
    dice = [
        1.0 - (2.0 * (p[b, c] * targets[b, c]).sum() + 1.0) / (p[b, c].sum() + targets[b, c].sum() + 1.0)
        for b in range(batch)
        for c in range(classes)
    ]
    bce = -(targets * np.log(p) + (1.0 - targets) * np.log(1.0 - p)).mean()
    return dice_weight * float(np.mean(dice)) + bce_weight * float(bce)


def nearest_pixel(coordinate: float, size: int) -> int:
    """Index of the pixel whose centre ((i + 0.5) / size) is nearest to a normalised coordinate."""
    centres = (np.arange(size) + 0.5) / size
    return int(np.argmin(np.abs(centres - coordinate)))


# ----------------------------------------------------------------------------------------------------------------------
# sample_points


def test_sampled_points_lie_inside_each_images_unpadded_area():
    size = 64
    labels = torch.zeros(2, size, size, dtype=torch.long)
    reshaped = torch.tensor([[64, 32], [20, 64]])  # (h, w): a tall image and a wide one, padded right / below
    coordinates, point_labels = sample_points(labels, reshaped, 3000, torch.Generator().manual_seed(0))
    assert coordinates.shape == (2, 3000, 2) and coordinates.dtype == torch.float32
    assert point_labels.shape == (2, 1, 3000) and point_labels.dtype == torch.long
    assert (coordinates >= 0).all()
    for b, (height, width) in enumerate(reshaped.tolist()):
        x, y = coordinates[b, :, 0], coordinates[b, :, 1]
        assert (x < width / size).all() and (y < height / size).all(), b
        # Uniform over the whole unpadded area, not a corner of it.
        assert x.max() > 0.95 * width / size and y.max() > 0.95 * height / size
        assert x.mean() == pytest.approx(width / size / 2, rel=0.05)
        assert y.mean() == pytest.approx(height / size / 2, rel=0.05)


def test_sampled_labels_are_the_class_of_the_nearest_pixel():
    size = 16
    # Left half class 1, right half class 0: the answer is known from x alone.
    halves = torch.zeros(1, size, size, dtype=torch.long)
    halves[..., : size // 2] = 1
    coordinates, point_labels = sample_points(
        halves, torch.tensor([[size, size]]), 500, torch.Generator().manual_seed(1)
    )
    expected = (coordinates[0, :, 0] < 0.5).long()
    assert torch.equal(point_labels[0, 0], expected)
    assert 0 < expected.sum() < 500  # both classes were sampled

    # Any label map: each point's label is that of the pixel whose centre is nearest.
    labels = torch.randint(0, 3, (2, size, size), generator=torch.Generator().manual_seed(2))
    reshaped = torch.tensor([[16, 10], [7, 16]])
    coordinates, point_labels = sample_points(labels, reshaped, 200, torch.Generator().manual_seed(3))
    for b in range(2):
        for n in range(200):
            x, y = coordinates[b, n].tolist()
            assert point_labels[b, 0, n] == labels[b, nearest_pixel(y, size), nearest_pixel(x, size)], (b, n)


def test_sampling_is_deterministic_with_a_seeded_generator():
    labels = torch.randint(0, 2, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    reshaped = torch.tensor([[32, 20], [25, 32]])
    first = sample_points(labels, reshaped, 64, torch.Generator().manual_seed(7))
    again = sample_points(labels, reshaped, 64, torch.Generator().manual_seed(7))
    other = sample_points(labels, reshaped, 64, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


# ----------------------------------------------------------------------------------------------------------------------
# losses


def test_one_hot_targets_are_classes_one_to_c_and_background_is_all_zero():
    labels = torch.tensor([[[0, 1, 2], [2, 0, 1]]])
    targets = one_hot_targets(labels, num_classes=2)
    assert targets.shape == (1, 2, 2, 3) and targets.dtype == torch.float32
    assert targets[0, 0].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert targets[0, 1].tolist() == [[0, 0, 1], [1, 0, 0]]
    # Point labels `(B, 1, N)` (from sample_points) give `(B, C, 1, N)` targets.
    assert one_hot_targets(torch.tensor([[[0, 1, 1]]]), 1).tolist() == [[[[0.0, 1.0, 1.0]]]]


def test_dice_bce_at_zero_logits_by_hand():
    logits = torch.zeros(1, 1, 4)
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    # sigmoid(0) = 0.5: intersection 1, sum of probabilities 2, sum of targets 2 -> Dice loss 1 - 3/5; BCE log 2.
    expected = 0.8 * (1 - 3 / 5) + 0.2 * math.log(2)
    assert dice_bce(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    assert dice_bce(logits, targets, dice_weight=1.0, bce_weight=0.0).item() == pytest.approx(0.4, abs=1e-6)
    assert dice_bce(logits, targets, dice_weight=0.0, bce_weight=1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # An empty target at zero logits: Dice loss 1 - 1 / (0.5 * 4 + 0 + 1), BCE still log 2.
    empty = dice_bce(logits, torch.zeros(1, 1, 4), 1.0, 1.0).item()
    assert empty == pytest.approx(1 - 1 / 3 + math.log(2), abs=1e-6)


def test_dice_bce_matches_the_formula_per_image_and_class():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 6, generator=generator) * 3
    targets = (torch.rand(3, 2, 5, 6, generator=generator) > 0.6).float()
    targets[0, 1] = 0  # an empty class in one image: the per-(image, class) average differs from a pooled Dice
    expected = reference_dice_bce(logits.numpy(), targets.numpy(), 0.7, 0.3)
    assert dice_bce(logits, targets, 0.7, 0.3).item() == pytest.approx(expected, abs=1e-5)
    # (B, C, N) and (B, C, H, W) are the same loss.
    assert dice_bce(logits.flatten(2), targets.flatten(2), 0.7, 0.3).item() == pytest.approx(expected, abs=1e-5)
    # A near-perfect prediction has a near-zero loss; the opposite one a large loss.
    assert dice_bce(torch.where(targets[:1, :1] > 0, 20.0, -20.0), targets[:1, :1]).item() < 1e-3
    assert dice_bce(torch.where(targets[:1, :1] > 0, -20.0, 20.0), targets[:1, :1]).item() > 3


def fake_outputs(batch=2, classes=1, size=6, refined_per_image=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, classes, size, size, generator=generator) * 2
    logits = torch.randn(batch, classes, size, size, generator=generator) * 2
    refined = torch.zeros(batch, size * size, dtype=torch.bool)
    for b in range(batch):
        refined[b, torch.randperm(size * size, generator=generator)[:refined_per_image]] = True
    refined = refined.reshape(batch, size, size)
    labels = torch.randint(0, classes + 1, (batch, size, size), generator=generator)
    return IMedSamOutput(logits=logits, coarse_logits=coarse, refined=refined), labels


@pytest.mark.parametrize("classes", [1, 2])
def test_segmentation_loss_is_coarse_plus_weighted_fine_on_the_refined_points(classes):
    outputs, labels = fake_outputs(classes=classes)
    loss, parts = segmentation_loss(outputs, labels, classes, fine_weight=0.3, dice_weight=0.6, bce_weight=0.4)
    targets = np.stack([(labels.numpy() == c) for c in range(1, classes + 1)], axis=1).astype(np.float64)
    coarse = reference_dice_bce(outputs.coarse_logits.numpy(), targets, 0.6, 0.4)
    mask = outputs.refined.numpy()
    fine_logits = np.stack([outputs.logits.numpy()[b][:, mask[b]] for b in range(mask.shape[0])])
    fine_targets = np.stack([targets[b][:, mask[b]] for b in range(mask.shape[0])])
    assert fine_logits.shape == (2, classes, 5)
    fine = reference_dice_bce(fine_logits, fine_targets, 0.6, 0.4)
    assert loss.item() == pytest.approx(coarse + 0.3 * fine, abs=1e-5)
    assert parts["coarse_loss"] == pytest.approx(coarse, abs=1e-5)
    assert parts["fine_loss"] == pytest.approx(fine, abs=1e-5)
    assert parts["loss"] == pytest.approx(loss.item())
    # The final logits outside the refined points do not enter the loss.
    changed = outputs.logits + 100.0 * (~outputs.refined)[:, None].float()
    changed_outputs = IMedSamOutput(logits=changed, coarse_logits=outputs.coarse_logits, refined=outputs.refined)
    same, _ = segmentation_loss(changed_outputs, labels, classes, 0.3, 0.6, 0.4)
    assert same.item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("epoch", [0, 2, 4, 9])
def test_released_loss_is_dice_only_and_hands_over_from_coarse_to_output(epoch):
    """The released code's loss: (1 - a) Dice(coarse) + a Dice(output), a = min((epoch + 1) / 5, 1), no BCE."""
    outputs, labels = fake_outputs()
    a = fine_weight_at(epoch, 5)
    loss, parts = segmentation_loss(outputs, labels, 1, fine_weight=a, dice_weight=0.3, composition="released")
    targets = (labels.numpy() == 1)[:, None].astype(np.float64)
    coarse = reference_dice_bce(outputs.coarse_logits.numpy(), targets, 1.0, 0.0)
    output = reference_dice_bce(outputs.logits.numpy(), targets, 1.0, 0.0)
    assert loss.item() == pytest.approx((1 - a) * coarse + a * output, abs=1e-5)
    assert parts["coarse_loss"] == pytest.approx(coarse, abs=1e-5) and parts["fine_loss"] == pytest.approx(output)
    assert (epoch >= 4) == (a == 1.0)  # the coarse term is gone from epoch 4 on
    with pytest.raises(ValueError, match="composition"):
        segmentation_loss(outputs, labels, 1, composition="paper")


def test_segmentation_loss_without_refined_points_is_the_coarse_loss():
    outputs, labels = fake_outputs(refined_per_image=0)
    loss, parts = segmentation_loss(outputs, labels, 1, fine_weight=1.0)
    targets = (labels.numpy() == 1)[:, None]
    coarse = reference_dice_bce(outputs.coarse_logits.numpy(), targets)
    assert loss.item() == pytest.approx(coarse, abs=1e-5)
    assert parts == pytest.approx({"loss": coarse, "coarse_loss": coarse, "fine_loss": 0.0}, abs=1e-5)


def test_segmentation_loss_without_the_implicit_decoder_uses_the_logits():
    outputs, labels = fake_outputs()
    sam_only = IMedSamOutput(logits=outputs.logits)
    loss, parts = segmentation_loss(sam_only, labels, 1, fine_weight=5.0, dice_weight=0.5, bce_weight=0.5)
    expected = reference_dice_bce(outputs.logits.numpy(), (labels.numpy() == 1)[:, None], 0.5, 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert parts == {"loss": pytest.approx(expected, abs=1e-5)}


def test_segmentation_loss_on_sampled_points():
    """Point outputs `(B, C, 1, N)` with point labels `(B, 1, N)`, as `forward_and_loss` gives them."""
    generator = torch.Generator().manual_seed(4)
    coarse = torch.randn(2, 1, 1, 12, generator=generator)
    logits = torch.randn(2, 1, 1, 12, generator=generator)
    refined = torch.zeros(2, 1, 12, dtype=torch.bool)
    refined[:, :, :3] = True
    labels = torch.randint(0, 2, (2, 1, 12), generator=generator)
    loss, _ = segmentation_loss(IMedSamOutput(logits=logits, coarse_logits=coarse, refined=refined), labels, 1)
    targets = labels.numpy()[:, None].astype(np.float64)
    expected = reference_dice_bce(coarse.numpy(), targets) + reference_dice_bce(
        logits.numpy()[..., :3], targets[..., :3]
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_fine_weight_ramps_up_over_the_warmup_then_stays_at_one():
    assert [fine_weight_at(epoch, 4) for epoch in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert fine_weight_at(0.5, 3) == pytest.approx(0.5)
    for epoch in (0, 1, 7.5):
        assert fine_weight_at(epoch, 0) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# parameter groups


def adapted_model(**config_overrides):
    model = tiny_model(**config_overrides)
    return get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config))


def test_parameter_groups_give_the_implicit_decoder_its_own_rate_and_skip_frozen_tensors():
    peft_model = adapted_model()
    groups = parameter_groups(peft_model, learning_rate=1e-4, implicit_learning_rate=1e-3, weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 0.05), (1e-3, 0.05)]
    names = {id(p): n for n, p in peft_model.named_parameters()}
    other, implicit = ([names[id(p)] for p in g["params"]] for g in groups)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(other) | set(implicit) == trainable and not set(other) & set(implicit)
    assert len(other) + len(implicit) == len(trainable)  # no tensor twice
    assert implicit and all("implicit_decoder" in n for n in implicit)
    assert not any("implicit_decoder" in n for n in other)
    assert any("freq_lora" in n for n in other) and any("freq_adapter" in n for n in other)
    assert not any("original_module" in n for n in other + implicit)  # frozen originals of modules_to_save
    assert not any("vision_encoder" in n and "freq_" not in n for n in other)


def test_parameter_groups_without_an_implicit_decoder_are_one_group():
    peft_model = adapted_model(use_implicit_decoder=False)
    groups = parameter_groups(peft_model, 1e-4, 1e-3, 0.0)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in peft_model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# forward_and_loss


@pytest.fixture(scope="module")
def real_batch():
    """Two real Kvasir-SEG pairs as `imedsam_hf.data.collate` gives them, in the tiny model's 64 px frame."""
    data_dir = SHARED_DATA / "Kvasir-SEG-sample"
    if not data_dir.is_dir():
        pytest.skip("shared data missing")
    pairs = discover_pairs(data_dir)[0][:2]
    records = [{"stem": p.stem, "image": p.image, "mask": p.mask} for p in pairs]
    processor = processor_for_config(tiny_model().config)
    dataset = SegmentationDataset(records, processor, DataConfig(augment=None), train=False)
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["labels"].shape == (2, 64, 64)
    assert batch["labels"].sum() > 0
    return batch


@pytest.fixture(scope="module")
def real_ct_batch():
    """One real BTCV slice with every organ a prompt, in the tiny model's 64 px frame (no augmentation)."""
    from imedsam_hf.data import SegmentationPair

    ct = SHARED_DATA / "BTCV-Synapse-CT"
    if not ct.is_dir():
        pytest.skip("shared data missing")
    stem = "case0039_slice068"
    records = [{"stem": stem, "image": str(ct / "images" / f"{stem}.png"), "mask": str(ct / "masks" / f"{stem}.png")}]
    config = DataConfig(class_prompts=True, mask_classes=13, all_classes_per_sample=True, augment=None, box_jitter=0)
    dataset = SegmentationDataset(records, processor_for_config(tiny_model().config), config, train=True)
    del SegmentationPair
    return collate([dataset[0]])


def record_calls(peft_model):
    """Record the keyword arguments and outputs of the wrapped IMedSamModel's forward."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs, output))

    handle = peft_model.get_base_model().register_forward_hook(hook, with_kwargs=True)
    return calls, handle


def test_forward_and_loss_on_sampled_points_trains_the_adapter_and_the_implicit_decoder(real_batch):
    peft_model = adapted_model().train()
    calls, handle = record_calls(peft_model)
    weights = LossWeights(dice_weight=0.6, bce_weight=0.4, fine_weight=0.5)
    loss, parts = forward_and_loss(
        peft_model, real_batch, 1, weights=weights, train_points=48, generator=torch.Generator().manual_seed(3)
    )
    handle.remove()
    assert torch.isfinite(loss) and loss.requires_grad
    assert set(parts) == {"loss", "coarse_loss", "fine_loss"} and parts["loss"] == pytest.approx(loss.item())

    # The model was queried once, on 48 points per image: the seeded sample_points draw, with the box prompts.
    assert len(calls) == 1
    kwargs, outputs = calls[0]
    coordinates, point_labels = sample_points(
        real_batch["labels"], real_batch["reshaped_size"], 48, torch.Generator().manual_seed(3)
    )
    assert torch.equal(kwargs["query_coordinates"], coordinates)
    assert torch.equal(kwargs["input_boxes"], real_batch["input_boxes"])
    assert outputs.logits.shape == (2, 1, 1, 48) and outputs.coarse_logits.shape == (2, 1, 1, 48)
    expected, _ = segmentation_loss(outputs, point_labels, 1, fine_weight=0.5, dice_weight=0.6, bce_weight=0.4)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)

    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for key in ("freq_lora_q_B", "freq_lora_v_B", "freq_adapter", "implicit_decoder"):
        assert any(key in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), key
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)


def test_forward_and_loss_on_the_whole_frame_and_prompt_free(real_batch):
    peft_model = adapted_model().train()
    calls, handle = record_calls(peft_model)
    loss, _ = forward_and_loss(peft_model, real_batch, 1, train_points=None, use_box_prompts=False)
    handle.remove()
    kwargs, outputs = calls[0]
    assert kwargs["query_coordinates"] is None and kwargs["input_boxes"] is None
    assert outputs.logits.shape == (2, 1, 64, 64)
    expected, _ = segmentation_loss(outputs, real_batch["labels"], 1)  # default LossWeights
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_forward_and_loss_without_the_implicit_decoder_ignores_train_points(real_batch):
    peft_model = adapted_model(use_implicit_decoder=False).train()
    calls, handle = record_calls(peft_model)
    loss, parts = forward_and_loss(peft_model, real_batch, 1, train_points=32)
    handle.remove()
    kwargs, outputs = calls[0]
    assert kwargs["query_coordinates"] is None and outputs.logits.shape == (2, 1, 64, 64)
    assert set(parts) == {"loss"} and torch.isfinite(loss)
    loss.backward()
    assert any(
        "freq_lora_q_B" in n and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if p.grad is not None
    )


def test_samples_with_every_class_as_a_prompt_train_on_each_class_mask(tmp_path):
    """A CT slice with several organs: one sample, one box per organ; collate pads; the loss sees each organ's mask."""
    from imedsam_hf import IMedSamProcessor
    from imedsam_hf.data import SegmentationPair, records_from_pairs
    from imedsam_hf.training import prompt_rows

    ct = SHARED_DATA / "BTCV-Synapse-CT"
    pairs = [
        SegmentationPair(stem, str(ct / "images" / f"{stem}.png"), str(ct / "masks" / f"{stem}.png"))
        for stem in ("case0039_slice068", "case0001_slice080")
    ]
    config = DataConfig(class_prompts=True, mask_classes=13, all_classes_per_sample=True, augment=None)
    dataset = SegmentationDataset(records_from_pairs(pairs), IMedSamProcessor(image_size=64), config, train=False)
    samples = [dataset[0], dataset[1]]
    counts = [len(s["prompt_classes"]) for s in samples]
    assert len(dataset) == 2 and counts[0] == 12 and counts[1] < 12
    batch = collate(samples)
    assert batch["input_boxes"].shape == (2, 12, 4) and (batch["prompt_classes"][1, counts[1] :] == 0).all()
    logits = torch.randn(2, 12, 1, 64, 64)
    outputs = IMedSamOutput(logits=logits, coarse_logits=logits, refined=torch.zeros(2, 12, 64, 64, dtype=torch.bool))
    rows, targets = prompt_rows(outputs, batch["labels"], batch["prompt_classes"])
    assert rows.logits.shape[0] == targets.shape[0] == sum(counts)  # padding prompts are not rows
    liver = int((batch["prompt_classes"][0] == 6).nonzero()[0, 0])
    assert torch.equal(targets[liver], (batch["labels"][0] == 6).long())


def test_coordinate_annealing_switches_octaves_on_from_low_to_high():
    """`anneal_coordinates`: in training, octaves >= ceil(F * n) are 0 (F = (epoch + 1) / N); evaluation uses all."""
    from conftest import tiny_model
    from peft import get_peft_model

    from imedsam_hf import imedsam_peft_config
    from imedsam_hf.training import anneal_coordinates

    model = tiny_model()
    peft_model = get_peft_model(model, imedsam_peft_config(model.config))
    decoders = [m for m in peft_model.modules() if type(m).__name__ == "IMedSamImplicitDecoder"]
    assert len(decoders) == 2  # the frozen original and PEFT's trained copy: both are annealed
    assert anneal_coordinates(peft_model, epoch=4, annealing_epochs=20) == 0.25
    decoder = decoders[-1].train()
    n = decoder.num_frequencies
    coordinates = torch.rand(3, 7, 2)
    code = decoder.encode_coordinates(coordinates)
    sines, cosines = code[..., 2 : 2 + 2 * n].reshape(3, 7, 2, n), code[..., 2 + 2 * n :].reshape(3, 7, 2, n)
    kept = math.ceil(0.25 * n)
    assert sines[..., kept:].abs().sum() == 0 and cosines[..., kept:].abs().sum() == 0
    assert sines[..., :kept].abs().sum() > 0
    torch.testing.assert_close(decoder.eval().encode_coordinates(coordinates)[..., :2], code[..., :2])
    assert decoder.eval().encode_coordinates(coordinates)[..., 2 + kept].abs().sum() > 0  # all on outside training
    assert anneal_coordinates(peft_model, epoch=30, annealing_epochs=20) == 1.0
    assert anneal_coordinates(peft_model, epoch=0, annealing_epochs=0) == 1.0


def test_click_prompted_training_steps(real_batch):
    """`max_clicks`: samples carry 1..N random clicks inside the structure; a click step prompts with them, no box."""
    from imedsam_hf.data import random_clicks

    mask = real_batch["labels"][0].numpy() > 0
    clicks = random_clicks(mask, 3, np.random.default_rng(0))
    used = clicks["input_labels"] == 1
    assert clicks["input_points"].shape == (3, 2) and 1 <= int(used.sum()) <= 3
    assert bool((clicks["input_labels"][~used] == -10).all())
    assert all(mask[int(y), int(x)] for x, y in clicks["input_points"][used].tolist())
    assert (random_clicks(np.zeros((8, 8), bool), 2, np.random.default_rng(0))["input_labels"] == -10).all()
    batch = {**real_batch, **collate_clicks(mask_batch=real_batch["labels"] > 0)}
    peft_model = adapted_model().train()
    calls, handle = record_calls(peft_model)
    loss, _ = forward_and_loss(peft_model, batch, 1, train_points=32, click_probability=1.0)
    forward_and_loss(peft_model, batch, 1, train_points=32, click_probability=0.0)
    handle.remove()
    (clicked, _), (boxed, _) = calls
    assert clicked["input_boxes"] is None and torch.equal(clicked["input_points"], batch["input_points"])
    assert "input_points" not in boxed and torch.equal(boxed["input_boxes"], batch["input_boxes"])
    loss.backward()
    point_embeddings = [p.grad for n, p in peft_model.named_parameters() if "point_embed" in n and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in point_embeddings)  # the click embeddings learn


def collate_clicks(mask_batch: torch.Tensor) -> dict[str, torch.Tensor]:
    from imedsam_hf.data import random_clicks

    samples = [random_clicks(m.numpy(), 3, np.random.default_rng(i)) for i, m in enumerate(mask_batch)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


# ----------------------------------------------------------------------------------------------------------------------
# small structures' share: points inside each prompt's box, rarer classes prompted more often


def test_box_points_lie_in_each_prompts_widened_box_and_carry_their_pixels_labels():
    size = 64
    labels = torch.randint(0, 3, (2, size, size), generator=torch.Generator().manual_seed(0))
    reshaped = torch.tensor([[64, 48], [40, 64]])
    boxes = torch.tensor(
        [[[10.0, 10.0, 20.0, 30.0], [30.0, 2.0, 46.0, 8.0]], [[0.0, 0.0, 64.0, 40.0], [5.3, 5.3, 5.3, 5.3]]]
    )
    coordinates, point_labels = sample_points(
        labels, reshaped, 400, torch.Generator().manual_seed(1), boxes=boxes, box_fraction=0.25
    )
    assert coordinates.shape == (2, 2, 400, 2) and point_labels.shape == (2, 2, 1, 400)
    for b in range(2):
        height, width = reshaped[b].tolist()
        assert (coordinates[b, ..., 0] < width / size).all() and (coordinates[b, ..., 1] < height / size).all()
        for p in range(2):
            x0, y0, x1, y1 = boxes[b, p].tolist()
            wx, wy = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
            inside = coordinates[b, p, :100] * size  # the first 25%: in the box widened by 10% a side
            assert (inside[:, 0] >= max(0, x0 - wx) - 1e-4).all() and (inside[:, 0] <= min(width, x1 + wx) + 1e-4).all()
            assert (inside[:, 1] >= max(0, y0 - wy) - 1e-4).all() and (
                inside[:, 1] <= min(height, y1 + wy) + 1e-4
            ).all()
            for n in range(0, 400, 7):
                x, y = coordinates[b, p, n].tolist()
                assert point_labels[b, p, 0, n] == labels[b, nearest_pixel(y, size), nearest_pixel(x, size)]
    # The rest spread over the image: far more of them outside the small first box than inside it.
    rest = coordinates[0, 0, 100:] * size
    outside = ~((rest[:, 0] >= 9) & (rest[:, 0] <= 21) & (rest[:, 1] >= 8) & (rest[:, 1] <= 32))
    assert outside.float().mean() > 0.8
    # One box per image (no prompt axis): shared coordinates, as without boxes.
    shared, shared_labels = sample_points(labels, reshaped, 50, boxes=boxes[:, 0], box_fraction=1.0)
    assert shared.shape == (2, 50, 2) and shared_labels.shape == (2, 1, 50)


def test_small_structures_get_box_points_in_a_training_step(real_ct_batch):
    """With box_point_fraction a small organ's prompt sees many of its own pixels; each prompt gets its own points."""
    peft_model = adapted_model(num_classes=13).train()
    calls, handle = record_calls(peft_model)
    forward_and_loss(peft_model, real_ct_batch, 13, train_points=256, box_point_fraction=0.5)
    forward_and_loss(peft_model, real_ct_batch, 13, train_points=256)
    handle.remove()
    (focused, _), (uniform, _) = calls
    prompts = real_ct_batch["prompt_classes"].shape[1]
    assert focused["query_coordinates"].shape == (1, prompts, 256, 2) and uniform["query_coordinates"].shape == (
        1,
        256,
        2,
    )
    labels = real_ct_batch["labels"][0]
    size = labels.shape[-1]

    def hits(coordinates, class_id):
        pixels = (coordinates * size).long().clamp(0, size - 1)
        return int((labels[pixels[:, 1], pixels[:, 0]] == class_id).sum())

    smallest = min(range(prompts), key=lambda p: int((labels == real_ct_batch["prompt_classes"][0, p]).sum()))
    class_id = int(real_ct_batch["prompt_classes"][0, smallest])
    assert hits(focused["query_coordinates"][0, smallest], class_id) > 5 * max(
        1, hits(uniform["query_coordinates"][0], class_id)
    )


def test_at_most_n_prompts_per_sample_rarer_classes_more_often():
    from imedsam_hf import IMedSamProcessor
    from imedsam_hf.data import SegmentationPair, records_from_pairs

    ct = SHARED_DATA / "BTCV-Synapse-CT"
    stems = ["case0039_slice068", "case0001_slice065", "case0001_slice090", "case0001_slice100"]
    pairs = [SegmentationPair(s, str(ct / "images" / f"{s}.png"), str(ct / "masks" / f"{s}.png")) for s in stems]
    config = DataConfig(class_prompts=True, mask_classes=13, all_classes_per_sample=True, max_prompts_per_sample=3)
    dataset = SegmentationDataset(records_from_pairs(pairs), IMedSamProcessor(image_size=64), config, train=True)
    assert dataset.class_counts[6] == 4  # the liver is on every one of these slices
    chosen = []
    for epoch in range(30):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        classes = sample["prompt_classes"].tolist()
        assert len(classes) == 3 == len(set(classes)) and sample["input_boxes"].shape == (3, 4)
        chosen += classes
    counts = {c: chosen.count(c) for c in set(chosen)}
    rarest = min(dataset.class_counts, key=dataset.class_counts.get)
    assert counts.get(rarest, 0) > counts.get(6, 0)  # a class on one slice is drawn more often than the liver
    evaluation = SegmentationDataset(records_from_pairs(pairs), IMedSamProcessor(image_size=64), config, train=False)
    assert len(evaluation[0]["prompt_classes"]) == 12  # evaluation prompts every structure


def test_per_prompt_query_coordinates_equal_calls_with_each_prompt_alone(inputs):
    pixel_values, boxes = inputs
    model = tiny_model()
    coordinates = torch.rand(1, 2, 30, 2, generator=torch.Generator().manual_seed(0))
    both = model(pixel_values[:1], input_boxes=boxes[None], query_coordinates=coordinates)
    for p in range(2):
        alone = model(pixel_values[:1], input_boxes=boxes[p : p + 1], query_coordinates=coordinates[:, p])
        torch.testing.assert_close(both.logits[0, p], alone.logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="query_coordinates"):
        model(pixel_values[:1], input_boxes=boxes[None], query_coordinates=coordinates[:, :1, :, :].expand(1, 3, 30, 2))


def test_the_two_way_transformer_can_train_at_its_own_rate():
    """`train_mask_decoder="transformer"`: the transformer that reads the box trains (with the upscaling), the
    hypernetworks stay frozen; `mask_decoder_learning_rate` gives it its own AdamW group."""
    model = tiny_model()
    peft_model = get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config, train_mask_decoder="transformer"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("mask_decoder.transformer" in n for n in trainable)
    assert any("upscale_conv1" in n for n in trainable)
    assert not any("output_hypernetworks" in n or "iou_prediction" in n for n in trainable)
    groups = parameter_groups(peft_model, 1e-4, 1e-3, 0.01, mask_decoder_learning_rate=1e-5)
    assert [g["lr"] for g in groups] == [1e-4, 1e-5, 1e-3]
    names = {id(p): n for n, p in peft_model.named_parameters()}
    decoder = [names[id(p)] for p in groups[1]["params"]]
    assert decoder and all("mask_decoder.transformer" in n for n in decoder)
    assert any("upscale_conv1" in names[id(p)] for p in groups[0]["params"])  # the upscaling keeps the adapters' rate
    with pytest.raises(ValueError, match="train_mask_decoder"):
        imedsam_hf.imedsam_peft_config(model.config, train_mask_decoder="hypernetworks")


def count_encodings(peft_model) -> list[int]:
    """The batch size of every `encode_image` call of the wrapped IMedSamModel, recorded."""
    calls, base = [], peft_model.get_base_model()
    encode = base.encode_image

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return encode(pixel_values)

    base.encode_image = counting
    return calls


def test_frozen_image_encoder_trains_the_prompt_side_on_embeddings_encoded_once(real_batch):
    """--freeze-image-encoder: the same loss as from the pixels, no gradient into the encoder's adapters, and each
    image encoded once when cached (keyed by image: two samples of one image share it)."""
    peft_model = adapted_model().eval()
    with torch.no_grad():
        expected = peft_model.get_base_model().encode_image(real_batch["pixel_values"])
    calls = count_encodings(peft_model)
    frozen = FrozenImageEncoder(peft_model, cache=True, key=lambda index: index // 2)  # samples 0 and 1: one image
    batch = frozen(real_batch)
    assert "pixel_values" not in batch and "pixel_values" in real_batch  # the caller's batch is left as it was
    assert calls == [1] and torch.equal(batch["image_embeddings"][0], expected[0])
    assert torch.equal(batch["image_embeddings"][1], expected[0])  # the cached image, by key
    frozen(real_batch)
    assert calls == [1]  # nothing encoded again
    uncached = FrozenImageEncoder(peft_model, cache=False)(real_batch)
    assert calls == [1, 2] and torch.equal(uncached["image_embeddings"], expected)
    assert not uncached["image_embeddings"].requires_grad

    def loss_of(inputs):
        return forward_and_loss(peft_model, inputs, 1, train_points=48, generator=torch.Generator().manual_seed(3))[0]

    assert loss_of(uncached).item() == pytest.approx(loss_of(real_batch).item(), abs=1e-6)
    peft_model.train()
    torch.manual_seed(0)
    loss = loss_of(uncached)
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if "vision_encoder" in n)  # LoRA and frequency adapter
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "implicit_decoder" in n)
    encoder = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "vision_encoder" in n}
    optimizer = torch.optim.AdamW(parameter_groups(peft_model, 1e-2, 1e-2, weight_decay=0.1))
    optimizer.step()
    assert all(torch.equal(p, encoder[n]) for n, p in peft_model.named_parameters() if "vision_encoder" in n)


def test_frozen_image_encoder_keeps_embeddings_on_disk_for_the_next_run(real_batch, tmp_path):
    """`cache_dir`: a second encoder object (another run) reads each image's embeddings from disk, bit-identical,
    instead of encoding; a file cut short is encoded and written again; other encoder weights get their own folder."""
    peft_model = adapted_model().eval()
    calls = count_encodings(peft_model)
    first = FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)
    expected = first(real_batch)["image_embeddings"]
    files = sorted(first.cache_dir.glob("*.safetensors"))
    assert calls == [2] and (first.hits, first.encoded) == (0, 2) and len(files) == 2
    assert first.cache_dir.parent == tmp_path and not list(first.cache_dir.glob(f"*{TEMPORARY_SUFFIX}"))
    second = FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)
    assert torch.equal(second(real_batch)["image_embeddings"], expected)
    assert calls == [2] and (second.hits, second.encoded) == (2, 0)
    files[0].write_bytes(files[0].read_bytes()[:100])  # damaged (a write is renamed into place only when whole)
    third = FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)
    assert torch.equal(third(real_batch)["image_embeddings"], expected)
    assert calls == [2, 1] and (third.hits, third.encoded) == (1, 1)
    assert FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)(real_batch) and calls == [2, 1]  # rewritten
    late = FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)  # made before a resumed run loads weights
    with torch.no_grad():  # other adapter weights: other embeddings, another folder
        for parameter in (p for n, p in peft_model.named_parameters() if "vision_encoder" in n and p.requires_grad):
            parameter.add_(0.1)
    other = FrozenImageEncoder(peft_model, cache=True, cache_dir=tmp_path)
    assert not torch.equal(other(real_batch)["image_embeddings"], expected) and calls == [2, 1, 2]
    assert other.cache_dir != first.cache_dir and other.cache_dir.parent == tmp_path
    assert late(real_batch) and late.cache_dir == other.cache_dir and calls == [2, 1, 2]  # named by the loaded weights
    with pytest.raises(ValueError, match="needs cache=True"):
        FrozenImageEncoder(peft_model, cache=False, cache_dir=tmp_path)


def test_frozen_image_encoder_encodes_in_eval_mode_and_restores_every_module():
    """The encoder runs in eval mode (BatchNorm on its running statistics, as at inference); afterwards every
    module is back in its own mode (the frozen BatchNorm layers stay in eval while the model trains)."""
    model = tiny_tinyvit_model()
    peft_model = get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config)).train()
    modes = {name: module.training for name, module in peft_model.named_modules()}
    assert not all(modes.values()) and any(modes.values())
    size = model.config.prompt_encoder_config.image_size
    batch = {"pixel_values": torch.randn(2, 3, size, size), "index": torch.tensor([0, 1])}
    embeddings = FrozenImageEncoder(peft_model, cache=False)(batch)["image_embeddings"]
    assert {name: module.training for name, module in peft_model.named_modules()} == modes
    model.eval()
    with torch.no_grad():
        assert torch.equal(embeddings, model.encode_image(batch["pixel_values"]))
