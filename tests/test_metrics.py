"""Tests for imedsam_hf.metrics: hand-computed values, conventions, a brute-force HD cross-check, the evaluate module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from imedsam_hf.metrics import (
    EVALUATE_METRIC_PATH,
    aggregate,
    dice,
    hausdorff_distances,
    iou,
    load_metric,
    multiclass_scores,
    normalized_surface_dice,
    segmentation_scores,
)


def square(shape=(64, 64), top=10, left=5, size=10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def blob(rng: np.random.Generator, shape=(48, 56), sigma=4.0, quantile=70.0) -> np.ndarray:
    """A random blobby mask (smoothed noise, thresholded): several components that may touch the image border."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.percentile(field, quantile)


def brute_force_distances(pred: np.ndarray, target: np.ndarray, spacing=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: boundary pixels by explicit neighbour checks, all pairwise distances with cdist;
    d(P->T) and d(T->P)."""

    def boundary_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1, constant_values=False)
        neighbours_all_set = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~neighbours_all_set) * np.asarray(spacing, dtype=np.float64)

    distances = cdist(boundary_points(pred), boundary_points(target))
    return distances.min(axis=1), distances.min(axis=0)


def brute_force_hausdorff(pred: np.ndarray, target: np.ndarray, spacing=(1.0, 1.0)) -> tuple[float, float]:
    forward, backward = brute_force_distances(pred, target, spacing)
    hd95 = max(np.percentile(forward, 95), np.percentile(backward, 95))
    return float(hd95), float(max(forward.max(), backward.max()))


def brute_force_nsd(pred: np.ndarray, target: np.ndarray, tolerance: float, spacing=(1.0, 1.0)) -> float:
    forward, backward = brute_force_distances(pred, target, spacing)
    return float(((forward <= tolerance).sum() + (backward <= tolerance).sum()) / (forward.size + backward.size))


# ----------------------------------------------------------------------------------------------------- binary metrics
def test_identical_masks():
    mask = square()
    assert segmentation_scores(mask, mask) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}


def test_disjoint_squares_shifted_20px():
    # Boundary of A: columns 5..14; nearest boundary of B is its left edge at column 25 -> distances 20 (left edge,
    # 10 pixels), 19..12 (top/bottom rows, 2 pixels each), 11 (right edge, 10 pixels): max 20, 95th percentile 20.
    a, b = square(left=5), square(left=25)
    scores = segmentation_scores(a, b)
    assert scores["dice"] == 0.0 and scores["iou"] == 0.0
    assert scores["hd"] == pytest.approx(20.0)
    assert scores["hd95"] == pytest.approx(20.0)
    assert hausdorff_distances(b, a) == pytest.approx((20.0, 20.0))  # symmetric


def test_one_pixel_shifted_square():
    a, b = square(left=5), square(left=6)
    # |A∩B| = 10 * 9 = 90, |A| = |B| = 100.
    assert dice(a, b) == pytest.approx(2 * 90 / 200)
    assert iou(a, b) == pytest.approx(90 / 110)
    # Every boundary pixel is 0 or 1 px from the other boundary (18 pixels each): hd = hd95 = 1.
    assert hausdorff_distances(a, b) == pytest.approx((1.0, 1.0))


def test_empty_mask_conventions():
    empty = np.zeros((30, 40), dtype=bool)
    full = square(shape=(30, 40), top=5, left=5, size=10)
    assert segmentation_scores(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}
    for pred, target in ((empty, full), (full, empty)):
        scores = segmentation_scores(pred, target)
        assert scores["dice"] == 0.0 and scores["iou"] == 0.0 and scores["nsd"] == 0.0
        assert scores["hd95"] == pytest.approx(50.0)  # image diagonal sqrt(30^2 + 40^2)
        assert scores["hd"] == pytest.approx(50.0)
    # In physical units: the diagonal of the image's physical extent.
    assert hausdorff_distances(empty, full, spacing=(2.0, 0.5)) == pytest.approx((math.hypot(60, 20),) * 2)


def test_outlier_pixel_hd_vs_hd95():
    target = square(shape=(100, 100), top=10, left=10, size=20)
    pred = target.copy()
    pred[90, 90] = True  # one stray pixel; the nearest target boundary pixel is the corner (29, 29)
    hd95, hd = hausdorff_distances(pred, target)
    assert hd == pytest.approx(61 * math.sqrt(2))
    # d(P->T): 76 zeros + one 86.3; d(T->P): 76 zeros -> both 95th percentiles are 0.
    assert hd95 == pytest.approx(0.0)
    assert dice(pred, target) == pytest.approx(800 / 801)


def test_spacing_scales_distances():
    a, b = square(left=5), square(left=25)  # horizontal shift of 20 columns
    assert hausdorff_distances(a, b, spacing=2.0) == pytest.approx((40.0, 40.0))
    assert hausdorff_distances(a, b, spacing=(3.0, 0.5)) == pytest.approx((10.0, 10.0))  # only column spacing counts
    c = square(top=35, left=5)  # vertical shift of 25 rows
    assert hausdorff_distances(a, c, spacing=(3.0, 0.5)) == pytest.approx((75.0, 75.0))
    rng = np.random.default_rng(5)
    p, t = blob(rng), blob(rng)
    assert hausdorff_distances(p, t, spacing=0.7) == pytest.approx(tuple(0.7 * d for d in hausdorff_distances(p, t)))
    # Overlap metrics ignore spacing.
    assert segmentation_scores(p, t, spacing=(2.0, 3.0))["dice"] == dice(p, t)
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distances(a, b, spacing=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distances(a, b, spacing=0.0)


@pytest.mark.parametrize("seed", range(6))
def test_hd_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    pred = blob(rng, shape, sigma=float(rng.uniform(1.5, 5)), quantile=float(rng.uniform(40, 90)))
    target = blob(rng, shape, sigma=float(rng.uniform(1.5, 5)), quantile=float(rng.uniform(40, 90)))
    spacing = (float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)))
    assert hausdorff_distances(pred, target) == pytest.approx(brute_force_hausdorff(pred, target), abs=1e-9)
    assert hausdorff_distances(pred, target, spacing=spacing) == pytest.approx(
        brute_force_hausdorff(pred, target, spacing), abs=1e-9
    )


def test_hd_masks_on_the_image_border():
    # The image border counts as background: a mask filling the image has the image frame as its boundary.
    full = np.ones((12, 15), dtype=bool)
    notched = full.copy()
    notched[5:7, 6:9] = False  # a hole: its rim becomes boundary, 4 or 5 px from the frame
    assert hausdorff_distances(full, notched) == pytest.approx(brute_force_hausdorff(full, notched))
    assert hausdorff_distances(full, notched)[1] == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------- inputs and validation
def test_uint8_0_255_and_torch_inputs_match_bool():
    rng = np.random.default_rng(1)
    p, t = blob(rng), blob(rng)
    expected = segmentation_scores(p, t)
    assert segmentation_scores(p.astype(np.uint8) * 255, t.astype(np.uint8) * 255) == expected
    assert segmentation_scores(p.astype(np.uint8), t.astype(np.float32)) == expected
    assert segmentation_scores(torch.from_numpy(p), torch.from_numpy(t).to(torch.uint8) * 255) == expected


def test_shape_mismatch_and_dimensionality_errors():
    with pytest.raises(ValueError, match=r"\(10, 10\).*\(10, 12\)"):
        segmentation_scores(np.zeros((10, 10)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(1, 4, 4\)"):
        dice(np.zeros((4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="2-D"):
        hausdorff_distances(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="2-D"):
        iou(np.zeros(5), np.zeros(5))


def test_normalized_surface_dice_matches_monai_values():
    """Two overlapping rectangles: the values MONAI 1.4's compute_surface_dice gives for them (76 boundary pixels in
    all; its float32 results are these fractions), in pixels and with a (row, column) spacing."""
    a = np.zeros((20, 24), bool)
    a[3:12, 4:15] = True
    b = np.zeros_like(a)
    b[5:14, 6:19] = True
    for tolerance, within in ((1.0, 12), (2.0, 57), (3.0, 65)):
        assert normalized_surface_dice(b, a, tolerance=tolerance) == pytest.approx(within / 76)
    for tolerance, within in ((1.0, 24), (2.0, 47), (3.0, 70)):
        assert normalized_surface_dice(b, a, spacing=(1.5, 0.5), tolerance=tolerance) == pytest.approx(within / 76)
    # The default tolerance is the CVPR 2024 MedSAM challenge's 2 (mm, or pixels without a spacing).
    assert segmentation_scores(b, a)["nsd"] == normalized_surface_dice(b, a, tolerance=2.0) == pytest.approx(57 / 76)
    assert normalized_surface_dice(a, b) == normalized_surface_dice(b, a)  # symmetric
    assert normalized_surface_dice(square(left=5), square(left=6)) == 1.0  # every boundary pixel within 1 px
    assert normalized_surface_dice(square(left=5), square(left=25)) == 0.0  # nearest boundary 11 px away
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(a, b, tolerance=-1.0)


def test_surfel_nsd_is_the_challenge_scripts():
    """`nsd_definition="surfels"`: the CVPR 2024 challenge script's NSD (DeepMind's surface_distance, area-weighted
    surface elements), through MONAI. Reference values from surface_distance 0.1 on the same masks, 2 mm tolerance."""
    pytest.importorskip("monai")
    from imedsam_hf.metrics import surfel_surface_dice

    a = np.zeros((20, 24), bool)
    a[3:12, 4:15] = True
    b = np.zeros_like(a)
    b[5:14, 6:19] = True
    assert surfel_surface_dice(b, a, (1.0, 1.0)) == pytest.approx(0.7535868785, abs=1e-6)  # 0.75 voxels-counted
    assert surfel_surface_dice(b, a, (1.5, 0.5)) == pytest.approx(0.7554878953, abs=1e-6)
    assert segmentation_scores(b, a, spacing=(1.5, 0.5), nsd_definition="surfels")["nsd"] == pytest.approx(
        0.7554878953, abs=1e-6
    )
    truth = np.zeros((24, 20, 6), bool)  # (x, y, z), 0.8 x 0.8 x 3 mm
    truth[6:15, 5:12, 0:3] = True
    truth[8:12, 7:14, 4:6] = True
    pred = truth.copy()
    pred[6:9, 12:14, 1] = True
    pred[2:20, 2:6, 5] = True
    pred[6:15, 5:8, 2] = False
    assert surfel_surface_dice(pred, truth, (0.8, 0.8, 3.0)) == pytest.approx(0.8423864313, abs=1e-6)
    empty = np.zeros_like(a)
    assert surfel_surface_dice(empty, empty, (1.0, 1.0)) == 1.0 and surfel_surface_dice(a, empty, (1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="nsd_definition"):
        segmentation_scores(a, b, nsd_definition="corners")


@pytest.mark.parametrize("seed", range(4))
def test_normalized_surface_dice_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    pred, target = blob(rng), blob(rng)
    for spacing, tolerance in (((1.0, 1.0), 2.0), ((1.2, 0.7), 2.0), ((0.5, 0.5), 1.0)):
        assert normalized_surface_dice(pred, target, spacing=spacing, tolerance=tolerance) == pytest.approx(
            brute_force_nsd(pred, target, tolerance, spacing)
        )


# ------------------------------------------------------------------------------------------------------- multiclass
def test_multiclass_per_class_and_mean():
    pred = np.zeros((20, 20), dtype=np.int64)
    target = np.zeros((20, 20), dtype=np.int64)
    pred[0:4, 0:4] = target[0:4, 0:4] = 1  # class 1: identical
    pred[10:20, 0:10] = 2  # class 2: shifted by one column (touching the bottom/left image border)
    target[10:20, 1:11] = 2
    scores = multiclass_scores(pred, target, num_classes=4)  # class 3 absent from both
    assert scores["dice_class1"] == 1.0 and scores["hd_class1"] == 0.0
    assert scores["dice_class2"] == pytest.approx(0.9)
    assert scores["iou_class2"] == pytest.approx(90 / 110)
    assert scores["hd_class2"] == pytest.approx(1.0) and scores["hd95_class2"] == pytest.approx(1.0)
    assert all(math.isnan(scores[f"{name}_class3"]) for name in ("dice", "iou", "hd95", "hd", "nsd"))
    assert scores["nsd_class1"] == 1.0 and scores["nsd_class2"] == normalized_surface_dice(pred == 2, target == 2)
    assert "dice_class0" not in scores
    assert scores["dice"] == pytest.approx((1.0 + 0.9) / 2)
    assert scores["iou"] == pytest.approx((1.0 + 90 / 110) / 2)
    assert scores["hd"] == pytest.approx(0.5)
    # Per-class values are the binary functions applied to `labels == c`.
    assert scores["hd95_class2"] == hausdorff_distances(pred == 2, target == 2)[0]

    with_background = multiclass_scores(torch.from_numpy(pred), torch.from_numpy(target), 4, ignore_background=False)
    assert with_background["dice_class0"] == pytest.approx(dice(pred == 0, target == 0))
    assert with_background["dice"] == pytest.approx((with_background["dice_class0"] + 1.0 + 0.9) / 3)


def test_multiclass_edge_cases():
    pred = np.zeros((8, 8), dtype=np.uint8)
    target = np.zeros((8, 8), dtype=np.uint8)
    pred[2:4, 2:4] = 1  # class 1 predicted but absent from the target: a scored false positive
    scores = multiclass_scores(pred, target, num_classes=3)
    assert scores["dice_class1"] == 0.0 and scores["hd_class1"] == pytest.approx(math.hypot(8, 8))
    assert math.isnan(scores["dice_class2"]) and scores["dice"] == 0.0
    nothing = multiclass_scores(target, target, num_classes=3)  # only background: nothing to score
    assert math.isnan(nothing["dice"]) and math.isnan(nothing["hd"])
    with pytest.raises(ValueError, match="outside"):
        multiclass_scores(pred + 2, target, num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        multiclass_scores(pred, target[:4], num_classes=3)
    # Rows of multiclass scores aggregate directly.
    assert aggregate([scores, scores])["dice_class1_std"] == 0.0


# ------------------------------------------------------------------------------------------------------ aggregation
def test_aggregate_mean_population_std_and_nan():
    rows = [
        {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0},
        {"dice": 0.5, "iou": 0.25, "hd95": 2.0, "hd": 4.0},
        {"dice": math.nan, "iou": math.nan, "hd95": 4.0, "hd": 8.0},
    ]
    result = aggregate(rows)
    assert list(result) == ["dice", "dice_std", "iou", "iou_std", "hd95", "hd95_std", "hd", "hd_std", "n"]
    assert result["n"] == 3
    assert result["dice"] == pytest.approx(0.75) and result["dice_std"] == pytest.approx(0.25)  # NaN ignored
    assert result["iou"] == pytest.approx(0.625) and result["iou_std"] == pytest.approx(0.375)
    assert result["hd95"] == pytest.approx(2.0) and result["hd95_std"] == pytest.approx(math.sqrt(8 / 3))  # ddof=0
    assert result["hd"] == pytest.approx(4.0) and result["hd_std"] == pytest.approx(math.sqrt(32 / 3))

    all_nan = aggregate([{"dice": math.nan}, {"dice": math.nan}])
    assert math.isnan(all_nan["dice"]) and math.isnan(all_nan["dice_std"]) and all_nan["n"] == 2
    empty = aggregate([])
    assert empty["n"] == 0 and all(math.isnan(empty[key]) for key in ("dice", "iou", "hd95", "hd", "nsd"))


# -------------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_module_loads_offline_and_matches(monkeypatch, tmp_path):
    pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (EVALUATE_METRIC_PATH / f"{EVALUATE_METRIC_PATH.name}.py").is_file()  # evaluate's folder/script rule

    rng = np.random.default_rng(7)
    preds = [blob(rng, (40, 50)), blob(rng, (33, 21)), np.zeros((16, 16), dtype=bool), square(left=5)]
    refs = [blob(rng, (40, 50)), blob(rng, (33, 21)), square((16, 16), 2, 2, 5), square(left=25)]
    expected = aggregate([segmentation_scores(p, r, spacing=(1.5, 0.5)) for p, r in zip(preds, refs)])

    metric = load_metric(cache_dir=str(tmp_path))
    # uint8 0/255 and torch inputs are binarised exactly like the direct functions do.
    mixed_preds = [preds[0].astype(np.uint8) * 255, torch.from_numpy(preds[1]), preds[2], preds[3]]
    result = metric.compute(predictions=mixed_preds, references=refs, spacing=(1.5, 0.5))
    assert result.keys() == expected.keys()
    assert result == pytest.approx(expected, nan_ok=True)

    # Incremental add / add_batch gives the same numbers.
    metric.add(prediction=preds[0], reference=refs[0])
    metric.add_batch(predictions=preds[1:], references=refs[1:])
    assert metric.compute(spacing=(1.5, 0.5)) == pytest.approx(expected, nan_ok=True)
    # The NSD's tolerance is an argument of compute, as spacing is.
    tight = aggregate([segmentation_scores(p, r, (1.5, 0.5), tolerance=1.0) for p, r in zip(preds, refs)])
    result = metric.compute(predictions=preds, references=refs, spacing=(1.5, 0.5), tolerance=1.0)
    assert result == pytest.approx(tight, nan_ok=True) and result["nsd"] < expected["nsd"]
