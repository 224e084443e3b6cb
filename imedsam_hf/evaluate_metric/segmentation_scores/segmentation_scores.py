"""`evaluate` metric: Dice, IoU, HD95, HD and NSD of binary segmentation masks, averaged over a set of mask pairs.

Load it offline from this folder (``evaluate.load`` wants the folder and script to share a name)::

    import evaluate
    metric = evaluate.load("path/to/imedsam_hf/evaluate_metric/segmentation_scores")
    # or: from imedsam_hf.metrics import load_metric; metric = load_metric()

Every number comes from ``imedsam_hf.metrics`` (``segmentation_scores`` per pair, then ``aggregate``), so it is the
same as calling those functions directly.
"""

import datasets
import evaluate
import numpy as np

from imedsam_hf.metrics import NSD_TOLERANCE, aggregate, as_mask, segmentation_scores

_DESCRIPTION = """\
Binary segmentation scores of the imedsam_hf project: Dice, IoU, HD95, HD and NSD per prediction/reference mask pair,
reported as the NaN-ignoring mean and population standard deviation (ddof=0) over all pairs. Hausdorff distances are
measured between mask boundaries with exact Euclidean distance transforms; hd95 = max of the two directed 95th
percentiles (MONAI's compute_hausdorff_distance(percentile=95)); nsd = the normalized surface Dice at a 2-pixel
(or 2 mm with a spacing) tolerance, each boundary pixel counted once (MONAI's compute_surface_dice). Empty masks:
Dice/IoU/NSD 1 when both are empty, 0 when one is; HD95/HD 0 when both are empty, the image diagonal when exactly one
is.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted masks, a list (or an (N, H, W) array/tensor) of 2-D (H, W) masks; sizes may differ between
        pairs. Booleans are kept, any other dtype is binarised with `> 0` (so 0/1 and 0/255 uint8 masks work).
    references: ground-truth masks, same rules; reference i must have the shape of prediction i.
    spacing: optional pixel size (scalar or (row, column) pair) for the distances; default: pixels.
    tolerance: the NSD's, in the units of `spacing` (pixels without one); default 2.
Returns:
    dict with `dice`, `dice_std`, `iou`, `iou_std`, `hd95`, `hd95_std`, `hd`, `hd_std`, `nsd`, `nsd_std` and `n`
    (number of pairs).
Examples:
    >>> metric = evaluate.load("imedsam_hf/evaluate_metric/segmentation_scores")
    >>> mask = np.zeros((8, 8), dtype=np.uint8); mask[2:6, 2:6] = 1
    >>> metric.compute(predictions=[mask], references=[mask])["dice"]
    1.0
"""

_CITATION = """\
@inproceedings{wei2024imedsam,
  title={I-MedSAM: Implicit Medical Image Segmentation with Segment Anything},
  author={Wei, Xiaobao and Cao, Jiajun and Jin, Yizhu and Lu, Ming and Wang, Guangyu and Zhang, Shanghang},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}
"""

# datasets >= 4 has `List`; older releases spell a variable-length list `Sequence`.
_LIST = getattr(datasets, "List", datasets.Sequence)
_MASK_FEATURE = _LIST(_LIST(datasets.Value("uint8")))


def _binarise(masks):
    """Masks as uint8 {0, 1} arrays, with the rule of `imedsam_hf.metrics.as_mask` (bool kept, else `> 0`)."""
    if masks is None:
        return None
    return [as_mask(mask).astype(np.uint8) for mask in masks]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentationScores(evaluate.Metric):
    """Dice, IoU, HD95, HD and NSD of binary masks, delegated to `imedsam_hf.metrics`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _MASK_FEATURE, "references": _MASK_FEATURE}),
        )

    # Binarise before Arrow encoding: uint8 storage would otherwise reject or truncate other dtypes (floats, 0/255
    # int64, torch tensors), and the stored masks must follow the same `> 0` rule as the direct functions.
    # (evaluate appends `inputs_description` to the docstrings of add/add_batch/compute, so they must have one.)
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of (H, W) prediction and reference masks, binarised with `> 0` unless boolean."""
        return super().add_batch(predictions=_binarise(predictions), references=_binarise(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one (H, W) prediction and reference mask, binarised with `> 0` unless boolean."""
        prediction = None if prediction is None else as_mask(prediction).astype(np.uint8)
        reference = None if reference is None else as_mask(reference).astype(np.uint8)
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, spacing=None, tolerance=NSD_TOLERANCE):
        # Stored masks come back as nested lists of 0/1 ints (evaluate's "numpy" format only supports scalar features).
        rows = [
            segmentation_scores(np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool), spacing, tolerance)
            for pred, ref in zip(predictions, references, strict=True)
        ]
        return aggregate(rows)
