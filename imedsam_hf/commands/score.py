"""`imedsam score`: score masks or label volumes already written (by `imedsam predict`, or by any other tool) against
the ground truth, with the metrics `imedsam evaluate` uses: Dice, IoU, HD95, HD and NSD (the normalized surface Dice
at 2 mm or 2 px, the CVPR 2024 MedSAM challenge's second metric) per structure, per case and their means. Label
volumes (NIfTI) are scored in 3-D with the header's voxel spacing (mm, `volumes.volume_scores`); images in 2-D, in
pixels (`metrics.segmentation_scores`; in mm against a 2-D NIfTI / NRRD / MetaImage truth, by its pixel size);
LiteMedSAM's challenge cases (.npz `segs` against `gts`) either way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from ..data import (
    IMAGE_KINDS,
    VOLUME_SUFFIXES,
    MaskValuesError,
    class_id_of,
    folder_class_names,
    image_stem,
    is_image_file,
    is_itk_volume,
    is_volume,
    mask_folder_naming,
    masks_named,
    read_mask,
    volumes_in,
)
from ..metrics import METRIC_NAMES, aggregate, check_nsd_options, nanmean, segmentation_scores
from ..processing_imedsam import grid_image_spacing
from ..volumes import (
    check_label_volume,
    dicom_files_in,
    embedded_label_names,
    is_cropped_segmentation,
    label_volume_names,
    label_volume_of,
    onto_grid,
    read_label_volume,
    read_structure_masks,
    read_volume,
    require_itk,
    scan_case,
    volume_name,
    volume_scores,
)
from .common import EXIT_NOTHING_DONE, EXIT_OK, EXIT_SOME_FAILED, fail, flag_message


def run(args: argparse.Namespace) -> int:
    """`imedsam score` with parsed arguments: 0 all scored, 1 some predictions skipped (named), 2 nothing scored."""
    try:
        check_nsd_options(args.nsd_tolerance, args.nsd_definition)  # without MONAI, surfels stop before any case
        nsd = {"tolerance": args.nsd_tolerance, "nsd_definition": args.nsd_definition}
        predictions = prediction_files(args.predictions)
        given = set(map(Path, args.predictions))
        if args.label_suffix is not None and kind_of(predictions[0]) != "label volumes":
            raise ValueError(f"`label_suffix` picks label volumes; {predictions[0]} is no label volume.")
        names = truth_class_names(Path(args.truth), predictions[0], given, args.label_suffix)
        if any(map(is_itk_volume, predictions)) or any(map(is_itk_volume, volumes_in(args.truth))):
            require_itk()  # NRRD / MetaImage label volumes
        wanted = None
        if args.classes is not None:
            if names is None and not all(isinstance(c, int) for c in args.classes):
                raise ValueError(
                    f"`classes` {','.join(map(str, args.classes))}: names need a classes.json or id2label.json in or "
                    f"beside `truth` {args.truth}, or the dataset.json beside it; give ids."
                )
            wanted = [c if isinstance(c, int) else class_id_of(c, names, "`classes`") for c in args.classes]
    except (ImportError, OSError, ValueError) as error:
        return fail(error)
    rows, skipped = [], 0
    masks = kind_of(predictions[0]) == "mask"
    naming = mask_folder_naming([image_stem(p) for p in predictions], args.truth) if masks else ("", "")
    stems = Counter(image_stem(p) for p in predictions) if masks else Counter()
    for path in predictions:
        try:
            in_case_folder = path not in given and path.parent not in given  # `predict`'s P/case_00000/imaging.nii.gz
            place = path.parent.name if masks and in_case_folder else ""  # `predict a/* b/*`'s P/a/x.png
            if not masks:  # P/2/DICOM_anon.nii.gz: predict's place below P of a series `2/DICOM_anon`
                place = place_below(path, given)
            shared = stems[image_stem(path)] > 1
            rows.extend(
                score_one(path, Path(args.truth), naming, wanted, nsd, in_case_folder, place, shared, args.label_suffix)
            )
        except (OSError, ValueError, ImportError) as error:  # ImportError: a NRRD / MetaImage truth without SimpleITK
            print(f"skipped {flag_message(error)}", file=sys.stderr)
            skipped += 1
    if not rows:
        print(
            f"error: nothing scored: none of the {len(predictions)} predictions could be paired and read.",
            file=sys.stderr,
        )
        return EXIT_NOTHING_DONE
    truth_classes = {row["class"] for row in rows if row.pop("in_truth")}
    unknown = sorted({row["class"] for row in rows} - truth_classes)
    if unknown and wanted is None:
        print(
            f"warning: class id(s) {unknown} are in predictions only, in no truth: each scores Dice 0 where it is "
            "predicted and lowers the mean; --classes scores only the structures you name.",
            file=sys.stderr,
        )
    named_by: dict[str, dict[int, str]] = {}  # each truth's own names, for ids the first truth does not name
    for row in rows:  # a binary mask's one structure is its foreground
        default = "foreground" if row.pop("binary", False) else f"class {row['class']}"
        truth, name = row.pop("truth", None), (names or {}).get(row["class"])
        if name is None and truth is not None:
            if truth not in named_by:
                named_by[truth] = truth_names(Path(truth))
            name = named_by[truth].get(row["class"])
        row["name"] = name or default
    units = sorted({(row.pop("dims"), row.pop("unit")) for row in rows})
    if len(units) > 1:
        mixed = " and ".join(f"{dims}-D in {unit}" for dims, unit in units)
        print(f"error: the cases mix distances ({mixed}): score each kind apart.", file=sys.stderr)
        return EXIT_NOTHING_DONE
    summary = summarise(rows, units[0][1], units[0][0])
    summary.update(
        nsd_tolerance=args.nsd_tolerance,
        nsd_definition=args.nsd_definition,
        predictions=[str(p) for p in args.predictions],
        truth=str(args.truth),
        n_skipped=skipped,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", "class", "name", *METRIC_NAMES])
            writer.writeheader()
            writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows)
    print("\n".join(summary_lines(summary)))
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def prediction_files(inputs: list[str]) -> list[Path]:
    """The predictions named on the command line (files, or folders of them: their label volumes if they hold any,
    else those of the folders below (`predict`'s places: KiTS's `case_00000/imaging.nii.gz`, CHAOS's
    `CT/1/DICOM_anon.nii.gz`),
    else their images, without hidden files and `predict --overlay`'s `<name>_overlay.png` beside `<name>.png`),
    all volumes or all images."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            volumes = volumes_in(item) or volumes_below(item)
            images = mask_files_in(item)
            if not images and not volumes:  # `predict a/* b/*`'s P/a/x.png, P/b/x.png (DeepLesion's series folders)
                subfolders = sorted(p for p in item.iterdir() if p.is_dir() and not p.name.startswith("."))
                images = [path for sub in subfolders for path in mask_files_in(sub)]
            cases = sorted(p for p in item.glob("*.npz") if not p.name.startswith("."))
            found.extend(volumes or cases or images)
        elif item.is_file():
            found.append(item)
        else:
            raise ValueError(f"{item}: no such file or folder of predictions.")
    if not found:
        raise ValueError(
            f"{', '.join(inputs)}: no label volumes ({', '.join(VOLUME_SUFFIXES)}), challenge cases (.npz) or masks "
            f"({IMAGE_KINDS})."
        )
    kinds = {kind_of(p) for p in found}
    if len(kinds) > 1:
        raise ValueError(f"the predictions mix {' and '.join(sorted(kinds))}: score each kind on its own.")
    if kinds == {"mask"} and any(not is_image_file(p) for p in found):
        odd = next(p for p in found if not is_image_file(p))
        raise ValueError(
            f"{odd}: not a label volume ({', '.join(VOLUME_SUFFIXES)}), a challenge case (.npz) or a mask image "
            f"({IMAGE_KINDS})."
        )
    return found


def volumes_below(folder: Path) -> list[Path]:
    """The label volumes in the folders below `folder`, at any depth, in path order (hidden folders skipped)."""
    found = []
    for root, folders, _ in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        if Path(root) != folder:
            found.extend(volumes_in(root))
    return found


def mask_files_in(folder: Path) -> list[Path]:
    """The masks of a folder of predictions: its images, without hidden files and `predict --overlay`'s
    `<name>_overlay.png` beside `<name>.png`."""
    images = sorted(p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith("."))
    stems = {image_stem(p) for p in images}
    return [p for p in images if not (p.stem.endswith("_overlay") and p.stem[: -len("_overlay")] in stems)]


def kind_of(path: Path) -> str:
    """`"label volumes"`, `"challenge cases"` (.npz with `segs`) or `"mask"`."""
    if is_volume(path):
        return "label volumes"
    return "challenge cases" if path.suffix.lower() == ".npz" else "mask"


def place_below(path: Path, given: Collection[Path]) -> str:
    """The folder of the prediction `path` below the folder of `given` holding it (`P/2/DICOM_anon.nii.gz` given `P`:
    `2`), as predict places a series' label volume; ``""`` directly in one, or given as a file."""
    folder = next((path.parent.relative_to(g) for g in given if g in path.parents), Path("."))
    return "" if folder == Path(".") else folder.as_posix()


def truth_label_of(
    path: Path, truth: Path, place: str = "", label_suffix: str | None = None
) -> tuple[Path | None, Path | None]:
    """`(label, series)`: the truth of the label volume `path` in `truth` (`volumes.label_volume_of`), else, where
    `truth` keeps DICOM series, that of the series of the prediction's name at its `place` (a label volume there too:
    ATLAS 2.0's lesion mask beside its scan, `R001/sub-r001s001/ses-1/anat/`) (`predict`'s
    `P/2/DICOM_anon.nii.gz` for `truth/2/DICOM_anon/`: CHAOS's slice masks beside it, a DICOM SEG or RTSTRUCT
    referencing it), with the series; `(None, None)` without one. `label_suffix`: the truth is named as the prediction
    with it added (`volumes.label_volume_of`: a BIDS derivative among several)."""
    found = label_volume_of(path, truth, label_suffix)
    if found is None and place and (truth / place).is_dir():  # ATLAS 2.0's R001/sub-r001s001/ses-1/anat/: the mask
        found = label_volume_of(path, truth / place, label_suffix)  # beside the scan, at the prediction's place
    if found is not None:
        return found, None
    name = volume_name(path)
    for series in dict.fromkeys([truth / place / name, truth / name]):
        if series.is_dir() and dicom_files_in(series):
            return label_volume_of(series, truth, label_suffix), series
    return None, None


def truth_names(label: Path) -> dict[int, str]:
    """The names one case's truth gives its ids (`volumes.embedded_label_names`: a header's table, a folder of
    structure masks' files, CHAOS's slice masks), ``{}`` without any or where it cannot be read."""
    try:
        return embedded_label_names(label) or {}
    except (OSError, ValueError):
        return {}


def truth_class_names(
    truth: Path, first: Path | None = None, given: Collection[Path] = (), label_suffix: str | None = None
) -> dict[int, str] | None:
    """The structures' names: a classes.json or id2label.json in the truth folder or beside it, or the MSD / nnU-Net
    dataset.json beside it (labelsTr's parent), else the names the first of its label volumes naming its ids carries
    in its header (TotalSegmentator's `--ml` output, a 3D Slicer segmentation), else those of the truth of the
    `first` prediction (in a case folder; a folder of structure masks names its ids by its files, CHAOS's slice
    masks theirs; `given`: the predictions' folders, of which `first` lies at a place); None without any."""
    if not truth.is_dir():
        raise ValueError(f"`truth` {truth}: not a folder of label volumes or masks.")
    names = folder_class_names(truth)
    if names:
        return names
    # TotalSegmentator's header table, or a 3D Slicer segmentation's segment names (a scene also holds its scan).
    found = next((found for path in volumes_in(truth) if (found := embedded_label_names(path))), None)
    if found is None and first is not None and is_volume(first):  # the truth of the first prediction: case folders,
        # TotalSegmentator's folders of structure masks, a DICOM series' truth at the first prediction's place
        label, _ = truth_label_of(first, truth, place_below(first, given), label_suffix)
        found = embedded_label_names(label) if label is not None else None
    return found


def score_one(
    path: Path,
    truth: Path,
    naming: tuple[str, str],
    wanted: list[int] | None,
    nsd: Mapping,
    in_case_folder: bool = False,
    place: str = "",
    shared: bool = False,
    label_suffix: str | None = None,
) -> list[dict]:
    """The rows (one per structure in either, or each of `wanted`) of one prediction against its truth, the NSD at
    `nsd` (`tolerance` in mm, or pixels in 2-D, and `nsd_definition`); a label volume `in_case_folder` is named by
    its folder where its own name says only what it is (`volumes.scan_case`); a mask's truth is named with the truth
    folder's `naming`, `(suffix, prefix)` (`data.mask_folder_naming`). A mask in the
    sub-folder `place` of a folder given (`predict a/* b/*`'s `P/a/x.png`) is scored against `truth/place/x.*`, else
    `truth/x.*` unless another prediction has its name (`shared`), and its case is named `place/x`."""
    if is_volume(path):
        found, series = truth_label_of(path, truth, place, label_suffix)
        if found is None:
            looked = label_volume_names(series or path, truth, label_suffix)
            raise ValueError(f"{path}: no label volume in `truth` {truth} (looked for {looked}).")
        predicted = read_volume(path)
        if series is not None:  # the truth of a DICOM series, read onto it
            expected = read_label_volume(found, read_volume(series))
        else:
            expected = read_structure_masks(found, predicted) if found.is_dir() else read_volume(found)
        if expected.shape != predicted.shape and is_cropped_segmentation(found):  # 3D Slicer's: padded, not cut
            expected = onto_grid(expected, predicted, crop=True) or expected
        truth_ids = check_label_volume(expected, expected, compare_affines=False)
        predicted_ids = check_label_volume(predicted, expected, compare_affines=True)
        case = scan_case(path, in_case_folder) if series is None else "/".join(filter(None, [place, volume_name(path)]))
        rows = volume_rows(case, predicted_ids, truth_ids, expected.spacing, wanted, "mm", nsd)
        return [{**row, "truth": str(found)} for row in rows]  # names its ids where `truth` names others
    if path.suffix.lower() == ".npz":
        return case_rows(path, truth, wanted, nsd)
    stem = image_stem(path)
    name, candidates = masks_named(truth / place, stem, *naming) if place else ("", [])
    if not candidates:
        if shared and place:
            raise ValueError(
                f"{path}: no mask named {stem}.* in {truth / place}; other predictions are named {stem} too, so "
                f"`truth` {truth} must hold each at its place ({place}/{stem}.png)."
            )
        if shared:  # `score P/a P/b`: one truth file for both
            raise ValueError(
                f"{path}: other predictions are named {stem} too, and `truth` {truth} would score them all against one "
                "mask: give the folder holding their folders (P, not P/a P/b) and a truth laid out alike."
            )
        name, candidates = masks_named(truth, stem, *naming)
    if len(candidates) != 1:
        what = "no mask" if not candidates else f"{len(candidates)} masks"
        looked = f"{truth / place} or {truth}" if place else str(truth)
        raise ValueError(f"{path}: {what} named {name}.* in `truth` {looked}.")
    predicted, expected, binary = class_maps(path, candidates[0])
    if predicted.shape != expected.shape:
        raise ValueError(
            f"{path}: {predicted.shape[1]}x{predicted.shape[0]}, its truth {candidates[0]} "
            f"{expected.shape[1]}x{expected.shape[0]}: score masks on their image's grid."
        )
    spacing = grid_image_spacing(candidates[0])  # a 2-D .mha / .nii.gz truth: distances in mm
    case = f"{place}/{stem}" if place else stem
    return image_rows(case, predicted, expected, wanted, binary, nsd, spacing)


def volume_rows(
    case: str, predicted, expected, spacing, wanted: list[int] | None, unit: str, nsd: Mapping
) -> list[dict]:
    """3-D rows of two `(X, Y, Z)` label arrays (`volumes.volume_scores`), classes absent from both left out."""
    scores = volume_scores(predicted, expected, spacing, wanted, **nsd)
    present = set(np.unique(expected).tolist())
    return [
        {"case": case, "class": c, "in_truth": c in present, "dims": 3, "unit": unit, **values}
        for c, values in scores.items()
        if not np.isnan(values["dice"])
    ]


def image_rows(
    case: str, predicted, expected, wanted: list[int] | None, binary: bool, nsd: Mapping, spacing=None
) -> list[dict]:
    """2-D rows of two `(H, W)` label maps (`metrics.segmentation_scores`): in pixels, or in mm with the truth's
    `spacing` `(row, column)`."""
    ids = wanted or sorted(int(c) for c in np.union1d(np.unique(predicted), np.unique(expected)) if c > 0)
    return [
        {
            "case": case,
            "class": c,
            "binary": binary,
            "in_truth": bool((expected == c).any()),
            "dims": 2,
            "unit": "px" if spacing is None else "mm",
            **segmentation_scores(predicted == c, expected == c, spacing, **nsd),
        }
        for c in ids
        if (predicted == c).any() or (expected == c).any()
    ]


def case_rows(path: Path, truth: Path, wanted: list[int] | None, nsd: Mapping) -> list[dict]:
    """A challenge case's `segs` against the `gts` of the truth folder's case of its name: 2-D in pixels, 3-D
    (`(D, H, W)`) in mm by the truth's `spacing` (x, y, z, as SimpleITK's `GetSpacing` gives it), in voxels without
    one."""
    found = truth / path.name
    if not found.is_file():
        raise ValueError(f"{path}: no case {path.name} in `truth` {truth}.")
    with np.load(path, allow_pickle=False) as predicted, np.load(found, allow_pickle=False) as expected:
        for case, key in ((predicted, "segs"), (expected, "gts")):
            if key not in case.files:
                raise ValueError(f"{path if case is predicted else found}: no {key} array (it holds {case.files}).")
        segs, gts = predicted["segs"], expected["gts"]
        spacing = expected["spacing"] if "spacing" in expected.files else None
    if segs.shape != gts.shape or segs.ndim not in (2, 3):
        raise ValueError(f"{path}: segs {segs.shape}, its truth's gts {gts.shape}: one 2-D or 3-D shape for both.")
    if segs.ndim == 2:
        return image_rows(path.stem, segs, gts, wanted, False, nsd)
    known = spacing is not None and np.asarray(spacing).size == 3
    spacing = tuple(float(v) for v in np.asarray(spacing).reshape(-1)) if known else (1.0, 1.0, 1.0)
    rows = volume_rows(path.stem, segs.transpose(2, 1, 0), gts.transpose(2, 1, 0), spacing, wanted, "mm", nsd)
    return rows if known else [{**row, "unit": "voxels"} for row in rows]


def class_maps(predicted: Path, truth: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both masks as class ids, and whether they were read as binary: binary (each one foreground value: 0/255
    against 0/1 is one structure) when both are, else the stored ids of both."""
    try:
        return read_mask(predicted, 1), read_mask(truth, 1), True
    except MaskValuesError:
        return read_mask(predicted, 255), read_mask(truth, 255), False


def summarise(rows: list[dict], unit: str, dims: int) -> dict:
    """Per structure the mean and standard deviation of each metric over the cases where it is in the prediction or
    the truth (`metrics.aggregate`, as `imedsam evaluate` reports them), and the mean over structures."""
    per_class: dict[int, dict] = {}
    for class_id in sorted({row["class"] for row in rows}):
        mine = [row for row in rows if row["class"] == class_id]
        per_class[class_id] = {
            "name": mine[0]["name"],
            **aggregate([{m: row[m] for m in METRIC_NAMES} for row in mine]),
        }
    return {
        "unit": unit,
        "dims": dims,
        "n_cases": len({row["case"] for row in rows}),
        "per_class": {str(c): v for c, v in per_class.items()},
        "class_mean": {m: nanmean([v[m] for v in per_class.values()]) for m in METRIC_NAMES},
    }


def summary_lines(summary: Mapping) -> list[str]:
    """The table `imedsam score` prints."""
    unit = summary["unit"]
    tolerance = f"{summary['nsd_tolerance']:g} {unit}" + (", surfels" if summary["nsd_definition"] == "surfels" else "")
    lines = [f"{summary['n_cases']} cases, {summary['dims']}-D scores (distances in {unit}, NSD at {tolerance}):"]
    for class_id, v in summary["per_class"].items():
        lines.append(
            f"  {class_id:>3} {v['name']:<28} n={v['n']:>4}  Dice {v['dice']:.4f}"
            + (f" ± {v['dice_std']:.4f}" if v["n"] > 1 else "")
            + f"  IoU {v['iou']:.4f}  "
            f"HD95 {v['hd95']:.2f}  HD {v['hd']:.2f}  NSD {v['nsd']:.4f}"
        )
    mean = summary["class_mean"]
    lines.append(
        f"  mean over {len(summary['per_class'])} structures: Dice {mean['dice']:.4f}  HD95 {mean['hd95']:.2f}  "
        f"NSD {mean['nsd']:.4f}"
    )
    return lines


__all__ = ["run"]
