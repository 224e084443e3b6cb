"""Segmentation metrics: the project's single implementation, shared by training, evaluation, the CLI and benchmarks.

All binary functions take one 2-D mask pair of shape ``(H, W)``. Inputs may be numpy arrays or torch tensors (any
device; they are moved to the CPU) of any dtype: boolean masks are used as they are, anything else is binarised with
``mask > 0``, so ``{0, 1}`` and ``{0, 255}`` ``uint8`` masks both work. ``pred`` and ``target`` must have the same
shape (``ValueError`` otherwise, naming both shapes) and be 2-D.

Conventions
-----------
Dice / IoU
    ``dice = 2|P∩T| / (|P| + |T|)``, ``iou = |P∩T| / |P∪T|``. Both masks empty -> ``1.0`` (a correct "nothing here");
    exactly one empty -> ``0.0``.
Empty ground truth
    The conventions above make a mean over images reward every empty target with a free ``1.0`` (or punish it with
    ``0.0``) whatever the structure looked for. Evaluation (``imedsam_hf.evaluation``) therefore never scores an image
    whose mask is empty with them: it counts it (``n_empty``), leaves it out of the means, and for prompt-free runs
    reports :func:`false_positive_area`, the foreground predicted where there is none.
Hausdorff distances
    Computed between the mask *boundaries* (surface pixels: foreground pixels with at least one 4-connected background
    neighbour or on the image border, i.e. ``mask ^ binary_erosion(mask)``, as MONAI's ``get_mask_edges`` and MedPy's
    ``__surface_distances`` do), with exact Euclidean distance transforms (``scipy.ndimage.distance_transform_edt``),
    never an O(N^2) pairwise matrix. With ``d(A->B)`` the distances from every boundary pixel of ``A`` to the nearest
    boundary pixel of ``B``:

    - ``hd   = max(max d(P->T), max d(T->P))`` (the symmetric Hausdorff distance);
    - ``hd95 = max(percentile95 d(P->T), percentile95 d(T->P))`` with ``numpy.percentile``'s default linear
      interpolation: exactly MONAI's ``compute_hausdorff_distance(..., percentile=95, directed=False)``. (MedPy's
      ``hd95`` instead takes one percentile over the pooled union of both directed sets; the two usually agree closely
      but are not identical.)

    Distances are in pixels, or in physical units when ``spacing`` (row, column) is given. Both masks empty -> ``0.0``;
    exactly one empty -> the image diagonal ``sqrt((H*sy)^2 + (W*sx)^2)`` (``sqrt(H^2 + W^2)`` in pixels), the
    largest distance possible inside the image. The paper's released code scores an empty mask as a constant ``100``;
    our value is finite too but resolution-aware, so numbers for empty predictions differ from the paper's code.
Normalized surface Dice (NSD)
    The share of both boundaries lying within a tolerance of the other's:
    ``nsd = (|d(P->T) <= tau| + |d(T->P) <= tau|) / (|boundary P| + |boundary T|)``, from the same boundaries and
    distances as the Hausdorff distances, with ``tau =`` :data:`NSD_TOLERANCE` (2 mm, or 2 pixels without a spacing):
    the second metric of the CVPR 2024 "MedSAM on laptop" challenge, whose tolerance it keeps. Each boundary pixel
    counts once, as in MONAI's ``compute_surface_dice`` (its default; the same numbers, tested). The challenge's script
    (DeepMind's ``surface_distance``, which MONAI's ``use_subvoxels=True`` reproduces) measures between surface
    elements on the voxel corners, weighted by their areas, and reads higher: on a BTCV scan (0.76 x 0.76 x 3 mm
    voxels) 0.947 against this 0.925 as the mean of 13 organs, 0.0003 to 0.053 per organ. Compare NSD with NSD of the
    same definition: ``nsd_definition="surfels"`` gives the challenge's (:func:`surfel_surface_dice`, through MONAI, an
    optional dependency). Both masks empty -> ``1.0``, exactly one empty -> ``0.0`` (as the challenge scores them).
Multi-class
    One binary evaluation per class id; classes absent from both prediction and target are NaN and skipped in means.
Aggregation
    :func:`aggregate` reports the NaN-ignoring mean and *population* standard deviation (``ddof=0``) per key.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_NAMES",
    "EVALUATE_METRIC_PATH",
    "NSD_TOLERANCE",
    "boundary_scores",
    "aggregate",
    "as_mask",
    "dice",
    "dice_from_counts",
    "false_positive_area",
    "hausdorff_distances",
    "iou",
    "iou_from_counts",
    "load_metric",
    "multiclass_scores",
    "nanmean",
    "normalized_surface_dice",
    "overlap_counts",
    "segmentation_scores",
    "surface_distances",
    "surfel_surface_dice",
    "NSD_DEFINITIONS",
    "check_nsd_options",
    "mask_pair_scores",
]

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "hd", "nsd")
"""Keys of :func:`segmentation_scores`, in order."""

NSD_TOLERANCE: float = 2.0
"""The normalized surface Dice's tolerance: 2 mm (2 pixels without a spacing), the CVPR 2024 MedSAM challenge's."""

NSD_DEFINITIONS: tuple[str, ...] = ("voxels", "surfels")
"""How the NSD counts a surface: ``"voxels"``, each boundary voxel once (MONAI's default, this module's own), or
``"surfels"``, surface elements on the voxel corners weighted by their areas (the CVPR 2024 challenge's script,
:func:`surfel_surface_dice`, needs MONAI)."""

EVALUATE_METRIC_PATH: Path = Path(__file__).resolve().parent / "evaluate_metric" / "segmentation_scores"
"""Folder of the ``evaluate`` metric script (``evaluate.load(str(EVALUATE_METRIC_PATH))``)."""

Spacing = float | Sequence[float] | None


# --------------------------------------------------------------------------------------------------- input handling
def _to_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):  # torch.Tensor, without importing torch
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def as_mask(mask: Any) -> np.ndarray:
    """The binarisation every binary metric applies: ``mask`` as a boolean numpy array of the same shape.

    Numpy arrays, torch tensors (moved to the CPU) and nested lists are accepted; booleans are kept, anything else is
    thresholded ``> 0``, so ``{0, 1}`` and ``{0, 255}`` integer masks (and logits) work. Probability maps are *not*
    thresholded at 0.5: pass ``prob > 0.5`` yourself.
    """
    array = _to_numpy(mask)
    return array if array.dtype == np.bool_ else array > 0


def _check_pair(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    if pred.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {tuple(pred.shape)}")


def _mask_pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred_array, target_array = _to_numpy(pred), _to_numpy(target)
    _check_pair(pred_array, target_array)
    return as_mask(pred_array), as_mask(target_array)


def _spacing_pair(spacing: Spacing) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    if np.ndim(spacing) == 0:
        value = float(spacing)  # type: ignore[arg-type]
        values = (value, value)
    else:
        flat = [float(v) for v in np.asarray(spacing, dtype=np.float64).ravel()]
        if len(flat) != 2:
            raise ValueError(f"spacing must be a scalar or a (row, column) pair, got {spacing!r}")
        values = (flat[0], flat[1])
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return values


# --------------------------------------------------------------------------------------------------- overlap metrics
def overlap_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """`(|P∩T|, |P|, |T|)` of two boolean masks of any dimension."""
    intersection = int(np.count_nonzero(pred & target))
    return intersection, int(np.count_nonzero(pred)), int(np.count_nonzero(target))


def dice_from_counts(intersection: int, n_pred: int, n_target: int) -> float:
    """Dice from `overlap_counts` (summed over slices, they give a volume's Dice); 1.0 when both are empty."""
    total = n_pred + n_target
    return 1.0 if total == 0 else 2.0 * intersection / total


def iou_from_counts(intersection: int, n_pred: int, n_target: int) -> float:
    """IoU from `overlap_counts`; 1.0 when both are empty."""
    union = n_pred + n_target - intersection
    return 1.0 if union == 0 else intersection / union


def false_positive_area(pred: Any) -> dict[str, float]:
    """The foreground predicted on an image whose ground truth is empty: every predicted pixel is a false positive.

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.

    Returns:
        ``{"false_positive_pixels": count, "false_positive_fraction": count / (H * W)}``.
    """
    mask = as_mask(pred)
    if mask.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {tuple(mask.shape)}")
    pixels = int(np.count_nonzero(mask))
    return {"false_positive_pixels": pixels, "false_positive_fraction": pixels / max(mask.size, 1)}


def dice(pred: Any, target: Any) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of two masks.

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.
        target: ground-truth mask, shape ``(H, W)``, same rules.

    Returns:
        Dice in ``[0, 1]``; ``1.0`` when both masks are empty, ``0.0`` when exactly one is.

    Raises:
        ValueError: shapes differ or the masks are not 2-D.
    """
    return dice_from_counts(*overlap_counts(*_mask_pair(pred, target)))


def iou(pred: Any, target: Any) -> float:
    """Intersection over union (Jaccard) ``|P∩T| / |P∪T|`` of two masks.

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.
        target: ground-truth mask, shape ``(H, W)``, same rules.

    Returns:
        IoU in ``[0, 1]``; ``1.0`` when both masks are empty, ``0.0`` when exactly one is.

    Raises:
        ValueError: shapes differ or the masks are not 2-D.
    """
    return iou_from_counts(*overlap_counts(*_mask_pair(pred, target)))


# ------------------------------------------------------------------------------------------------ boundary distances
def _boundary(mask: np.ndarray) -> np.ndarray:
    """Surface pixels (voxels) of a boolean mask of any dimension: foreground with a background neighbour along an
    axis (4-connected in 2-D, 6-connected in 3-D), or on the array's border."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _directed_surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d(P->T)`` and ``d(T->P)`` between the boundaries of two non-empty masks (any dimension).

    Both masks are first cropped to the bounding box of their union plus a one-pixel background margin (kept only where
    it lies inside the image, so that the image border still counts as background for the erosion). Every boundary pixel
    of both masks lies inside that box, so the distance transforms computed on the crop are exact.
    """
    union = ndimage.find_objects((pred | target).astype(np.uint8))[0]
    window = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(union, pred.shape))
    pred_edges, target_edges = _boundary(pred[window]), _boundary(target[window])
    # distance_transform_edt measures the distance to the nearest zero: zeros = the other mask's boundary pixels.
    to_target = ndimage.distance_transform_edt(~target_edges, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_edges, sampling=spacing)
    return to_target[pred_edges], to_pred[target_edges]


def hausdorff_distances(pred: Any, target: Any, spacing: Spacing = None) -> tuple[float, float]:
    """95th-percentile and maximum symmetric Hausdorff distances between the boundaries of two masks.

    With ``d(A->B)`` the Euclidean distances from every boundary pixel of ``A`` to the nearest boundary pixel of ``B``
    (boundary = ``mask ^ binary_erosion(mask)`` with a 4-connected cross, image border counted as background)::

        hd   = max(max(d(P->T)), max(d(T->P)))
        hd95 = max(percentile(d(P->T), 95), percentile(d(T->P), 95))   # numpy's default linear interpolation

    ``hd95`` is exactly MONAI's ``compute_hausdorff_distance(..., percentile=95, directed=False)``: each directed set
    gets its own percentile and the larger one is reported (MedPy's ``hd95`` pools both sets before one percentile).
    Distance transforms come from ``scipy.ndimage.distance_transform_edt``: exact and roughly linear in the pixels of
    the masks' bounding box, with no pairwise distance matrix.

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.
        target: ground-truth mask, shape ``(H, W)``, same rules.
        spacing: pixel size, a scalar or ``(row, column)`` pair; ``None`` measures in pixels.

    Returns:
        ``(hd95, hd)``. Both masks empty -> ``(0.0, 0.0)``. Exactly one empty -> both equal the image diagonal
        ``sqrt((H * spacing_row)^2 + (W * spacing_col)^2)``, the largest distance inside the image (the paper's released
        code used a constant 100 for an empty mask; this value is finite and resolution-aware instead).

    Raises:
        ValueError: shapes differ, the masks are not 2-D, or ``spacing`` is not one or two positive numbers.
    """
    pred_mask, target_mask = _mask_pair(pred, target)
    return surface_distances(pred_mask, target_mask, _spacing_pair(spacing))


def surface_distances(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """
    ``(hd95, hd)`` of two boolean masks of any dimension (2-D images, 3-D volumes) with one spacing per axis: the
    conventions of :func:`hausdorff_distances`, the empty-mask distance being the array's diagonal.
    """
    scores = boundary_scores(pred, target, spacing)
    return scores["hd95"], scores["hd"]


def boundary_scores(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, ...],
    tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
) -> dict[str, float]:
    """
    ``{"hd95", "hd", "nsd"}`` of two boolean masks of any dimension (2-D images, 3-D volumes) with one spacing per
    axis, from one pair of distance transforms: the Hausdorff distances of :func:`hausdorff_distances` (the
    empty-mask distance being the array's diagonal) and the normalized surface Dice at ``tolerance`` (same units as
    ``spacing``) of :func:`normalized_surface_dice`, or with ``nsd_definition="surfels"`` of
    :func:`surfel_surface_dice`.
    """
    if not tolerance >= 0:
        raise ValueError(f"the surface Dice tolerance must be >= 0, got {tolerance!r}")
    check_nsd_options(None, nsd_definition, load=False)
    pred_empty, target_empty = not pred.any(), not target.any()
    if pred_empty and target_empty:
        return {"hd95": 0.0, "hd": 0.0, "nsd": 1.0}
    if pred_empty or target_empty:
        diagonal = math.hypot(*(n * s for n, s in zip(pred.shape, spacing)))
        return {"hd95": diagonal, "hd": diagonal, "nsd": 0.0}
    forward, backward = _directed_surface_distances(pred, target, spacing)
    if nsd_definition == "surfels":
        nsd = surfel_surface_dice(pred, target, spacing, tolerance)
    else:
        within = int(np.count_nonzero(forward <= tolerance)) + int(np.count_nonzero(backward <= tolerance))
        nsd = within / (forward.size + backward.size)
    return {
        "hd95": max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95))),
        "hd": max(float(forward.max()), float(backward.max())),
        "nsd": nsd,
    }


def check_nsd_options(nsd_tolerance: float | None, nsd_definition: str, load: bool = True) -> None:
    """The NSD's options as a command takes them, before any real work starts: a ValueError for a tolerance that is no
    positive distance (None: not checked) or a definition not in :data:`NSD_DEFINITIONS`; with ``load``, for
    ``"surfels"`` an ImportError naming ``pip install monai`` where MONAI is missing (one tiny pair scored)."""
    if nsd_tolerance is not None and not (math.isfinite(nsd_tolerance) and nsd_tolerance > 0):
        raise ValueError(f"`nsd_tolerance` {nsd_tolerance}: a positive distance (mm for volumes, pixels for images).")
    if nsd_definition not in NSD_DEFINITIONS:
        raise ValueError(f"`nsd_definition` {nsd_definition!r}: one of {', '.join(NSD_DEFINITIONS)}")
    if load and nsd_definition == "surfels":
        surfel_surface_dice(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0, 1.0))


def surfel_surface_dice(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...], tolerance: float = NSD_TOLERANCE
) -> float:
    """
    The NSD as the CVPR 2024 MedSAM challenge's script computes it (DeepMind's ``surface_distance``): surface elements
    on the voxel corners, each weighted by its area (length in 2-D), within ``tolerance`` of the other surface. Two
    boolean masks of any dimension with one spacing per axis; computed by MONAI's ``compute_surface_dice(...,
    use_subvoxels=True)`` on the masks cut to their union's box plus one voxel (the same value; tested against
    DeepMind's on random 2-D and 3-D masks). Both empty -> ``1.0``, one empty -> ``0.0``.

    Raises:
        ImportError: MONAI is not installed (``pip install monai``).
    """
    try:
        import torch
        from monai.metrics import compute_surface_dice
    except ImportError as error:
        raise ImportError(
            "the challenge's NSD (surfels) is computed by MONAI, which is not installed: pip install monai"
        ) from error
    if not pred.any() or not target.any():
        return float(not pred.any() and not target.any())
    union = ndimage.find_objects((pred | target).astype(np.uint8))[0]
    window = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(union, pred.shape))
    one_hot = [torch.from_numpy(np.stack([~m[window], m[window]])[None]) for m in (pred, target)]
    with warnings.catch_warnings():  # MONAI's own deprecation notices about its internals are not the user's
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            *one_hot, class_thresholds=[tolerance], include_background=False, spacing=list(spacing), use_subvoxels=True
        )
    return float(value)


def mask_pair_scores(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, ...],
    tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for two boolean masks of any dimension (2-D images, 3-D volumes) with one
    spacing per axis: Dice and IoU from the overlap counts, the rest from :func:`boundary_scores`."""
    counts = overlap_counts(pred, target)
    return {
        "dice": dice_from_counts(*counts),
        "iou": iou_from_counts(*counts),
        **boundary_scores(pred, target, spacing, tolerance, nsd_definition),
    }


def normalized_surface_dice(pred: Any, target: Any, spacing: Spacing = None, tolerance: float = NSD_TOLERANCE) -> float:
    """Normalized surface Dice of two masks: the share of both boundaries within ``tolerance`` of the other's.

    ``(|d(P->T) <= tolerance| + |d(T->P) <= tolerance|) / (|boundary P| + |boundary T|)``, with the boundaries and
    distances of :func:`hausdorff_distances`; MONAI's ``compute_surface_dice`` with ``class_thresholds=[tolerance]``.

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.
        target: ground-truth mask, shape ``(H, W)``, same rules.
        spacing: pixel size, a scalar or ``(row, column)`` pair; ``None`` measures in pixels.
        tolerance: in the units of ``spacing`` (pixels without one); default :data:`NSD_TOLERANCE`.

    Returns:
        A value in ``[0, 1]``. Both masks empty -> ``1.0``, exactly one empty -> ``0.0``.
    """
    pred_mask, target_mask = _mask_pair(pred, target)
    return boundary_scores(pred_mask, target_mask, _spacing_pair(spacing), tolerance)["nsd"]


# ------------------------------------------------------------------------------------------------------- combined
def segmentation_scores(
    pred: Any, target: Any, spacing: Spacing = None, tolerance: float = NSD_TOLERANCE, nsd_definition: str = "voxels"
) -> dict[str, float]:
    """Dice, IoU, HD95, HD and NSD for one binary mask pair (see :func:`dice`, :func:`iou`, :func:`hausdorff_distances`,
    :func:`normalized_surface_dice`; NSD at :data:`NSD_TOLERANCE` in the units of ``spacing``).

    Args:
        pred: predicted mask, shape ``(H, W)``; numpy array or torch tensor, non-boolean values are thresholded ``> 0``.
        target: ground-truth mask, shape ``(H, W)``, same rules.
        spacing: pixel size for the distances, a scalar or ``(row, column)`` pair; ``None`` measures in pixels.
        tolerance: the NSD's, in the units of ``spacing`` (pixels without one).
        nsd_definition: one of :data:`NSD_DEFINITIONS`.

    Returns:
        ``{"dice": float, "iou": float, "hd95": float, "hd": float, "nsd": float}``.
    """
    pred_mask, target_mask = _mask_pair(pred, target)
    return mask_pair_scores(pred_mask, target_mask, _spacing_pair(spacing), tolerance, nsd_definition)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def multiclass_scores(
    pred_labels: Any,
    target_labels: Any,
    num_classes: int,
    ignore_background: bool = True,
    spacing: Spacing = None,
    tolerance: float = NSD_TOLERANCE,
    nsd_definition: str = "voxels",
) -> dict[str, float]:
    """Per-class and mean Dice, IoU, HD95, HD and NSD for two integer label maps.

    Each class ``c`` is scored as the binary pair ``(pred_labels == c, target_labels == c)`` with
    :func:`segmentation_scores`.

    Args:
        pred_labels: predicted label map, shape ``(H, W)``, integer class ids in ``[0, num_classes)``, ``0`` =
            background; numpy array or torch tensor.
        target_labels: ground-truth label map, shape ``(H, W)``, same rules.
        num_classes: number of label values *including* background: ids ``0 .. num_classes - 1``.
        ignore_background: skip class ``0`` (default). When ``False`` background is scored like any other class.
        spacing: pixel size for the distances, as in :func:`segmentation_scores`.
        tolerance, nsd_definition: the NSD's, as in :func:`segmentation_scores`.

    Returns:
        A flat dict (so that :func:`aggregate` can average a list of them): ``"<metric>_class<c>"`` for every scored
        class ``c`` and metric in ``dice, iou, hd95, hd, nsd``, plus ``"<metric>"`` = the mean over the scored classes.
        A class absent from both maps gets NaN for every metric and is left out of the means; if no scored class
        is present at all, the means are NaN too.

    Raises:
        ValueError: shapes differ, maps are not 2-D, ``num_classes < 1``, or a label lies outside ``[0, num_classes)``.
    """
    pred_array, target_array = _to_numpy(pred_labels), _to_numpy(target_labels)
    _check_pair(pred_array, target_array)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, array in (("pred_labels", pred_array), ("target_labels", target_array)):
        if array.dtype == np.bool_:
            continue
        if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
            raise ValueError(f"{name} must hold integer class ids, got non-integer values of dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels in [{array.min()}, {array.max()}], outside [0, {num_classes}) for num_classes="
                f"{num_classes} (num_classes counts the background)"
            )
    spacing_pair = _spacing_pair(spacing)
    scores: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for class_id in range(1 if ignore_background else 0, num_classes):
        pred_mask, target_mask = pred_array == class_id, target_array == class_id
        if not pred_mask.any() and not target_mask.any():
            class_scores = dict.fromkeys(METRIC_NAMES, math.nan)
        else:
            class_scores = mask_pair_scores(pred_mask, target_mask, spacing_pair, tolerance, nsd_definition)
        for name in METRIC_NAMES:
            scores[f"{name}_class{class_id}"] = class_scores[name]
            per_metric[name].append(class_scores[name])
    means = {name: nanmean(values) for name, values in per_metric.items()}
    return {**means, **scores}


# ------------------------------------------------------------------------------------------------------ aggregation
def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and population standard deviation (``ddof=0``) of every key over a list of score dicts, NaNs ignored.

    Args:
        rows: score dicts, e.g. from :func:`segmentation_scores` or :func:`multiclass_scores`. Keys may differ between
            rows; a key missing from a row counts as NaN for that row.

    Returns:
        ``{"<key>": nanmean, "<key>_std": nanstd(ddof=0), ..., "n": len(rows)}`` for every key, in first-seen order
        (``dice, dice_std, iou, iou_std, hd95, hd95_std, hd, hd_std, nsd, nsd_std, n`` for
        :func:`segmentation_scores` rows). A key that is NaN in every row gets NaN mean and std. With no rows: NaN for
        every name of :data:`METRIC_NAMES` and ``n = 0``.
    """
    keys: list[str] = []
    for row in rows:
        keys.extend(key for key in row if key not in keys)
    if not rows:
        keys = list(METRIC_NAMES)
    result: dict[str, float] = {}
    for key in keys:
        values = np.array([float(row.get(key, math.nan)) for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        result[key] = float(values.mean()) if values.size else math.nan
        result[f"{key}_std"] = float(values.std(ddof=0)) if values.size else math.nan
    result["n"] = len(rows)
    return result


# ------------------------------------------------------------------------------------------------------- evaluate
def load_metric(**kwargs: Any):
    """Load the project's ``evaluate`` metric (works offline: it is a local script).

    Equivalent to ``evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)``. Its ``compute(predictions=..., references=...,
    spacing=None)`` takes lists of ``(H, W)`` masks (sizes may vary between pairs) and returns :func:`aggregate` of the
    per-pair :func:`segmentation_scores`.
    """
    import evaluate

    return evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)
