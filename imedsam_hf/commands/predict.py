"""`imedsam predict`: masks for images (PNG) and label volumes for NIfTI scans, every check that needs no model made
before the model is loaded, each file written atomically, failures named one by one.

Exit codes (`common.EXIT_CODES`): 0 everything written; 1 some inputs failed (named on stderr, the others written);
2 nothing was done (bad arguments, an unusable model, prompt, boxes file or `--out`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import json
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..configuration_imedsam import is_class_aware, training_window, window_text
from ..data import (
    extra_masks,
    folder_class_names,
    image_files_in,
    image_stem,
    is_image_file,
    is_itk_volume,
    label_classes,
    mask_box,
    mask_clicks,
    mask_folder_naming,
    mask_names,
    masks_beside_images,
    masks_named,
    read_class_names,
    read_mask,
    volumes_in,
)
from ..files import atomic_write, remove_stale_temporaries
from ..inference import MAX_PIXELS, label_map, overlay, segment, structure_id, windowed_slice
from ..loading import load_model
from ..processing_imedsam import (
    SIXTEEN_BIT_MODES,
    check_rescale_intercept,
    dicom_kind,
    image_size,
    is_grid_image,
    open_image,
    stored_hu,
    to_rgb_array,
)
from ..runtime import require_backend
from ..volumes import (
    BACKGROUND,
    NPZ_CLASS_AWARE,
    NamedClick,
    VolumeRefinement,
    case_scans_in,
    channel_files,
    check_label_volume,
    check_window,
    click_label,
    click_labels,
    dicom_annotation_modality,
    dicom_series_in,
    dicom_structure_names,
    embedded_label_names,
    is_dicom_file,
    is_multiframe_scan,
    is_structure_name,
    is_volume,
    label_statistics,
    label_volume_class_names,
    label_volume_names,
    label_volume_of,
    named_label_ids,
    named_structures,
    read_label_volume,
    read_npz_case,
    read_slicer_points,
    read_volume,
    refine_volume,
    require_dicom,
    require_dicom_seg,
    require_itk,
    require_multiframe,
    require_rtstruct,
    resolve_window,
    scans_matching,
    segment_npz_case,
    segment_volume,
    structure_names_of,
    to_uint8,
    volume_name,
    volume_overlay,
    write_dicom_seg,
    write_image_mask,
    write_label_volume,
    write_rtstruct,
)
from .common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    fail,
    flag_message,
    parse_box,
    parse_output_size,
    parse_points,
    read_json_file,
)
from .outputs import (
    check_output_folder,
    check_writable,
    describe_bids_derivative,
    input_places,
    plan_outputs,
    refuse_existing,
)

PROMPT_FLAGS = "--box, --boxes, --boxes-from-masks, --points, --points-from-masks or --no-prompt"


@dataclass
class PromptSource:
    """Where each image's prompt comes from: exactly one of these, or `no_prompt`. Checked before any model runs."""

    box: list[float] | None = None
    boxes: dict[Path, list] | None = None  # each image's box (or list of boxes) of --boxes (`boxes_by_image`)
    boxes_from_masks: str | None = None
    no_prompt: bool = False
    points: tuple[list[list[float]], list[int]] | None = None
    points_from_masks: str | None = None
    clicks: int = 1
    class_ids: bool = False  # masks hold class ids: every structure is a prompt, the output a class-id map
    box_class: int | None = None  # `--classes`: the structure `box` / `boxes` are for (a class-aware model)
    mask_classes: int = 255
    mask_suffix: str = ""  # what the masks add to their image's stem (`data.mask_folder_naming`: ISIC's _segmentation)
    mask_prefix: str = ""  # or what they put before it (ETIS-Larib's p1.tif for 1.tif)
    # Class-id masks numbered otherwise than a class-aware model: `{mask id: the model's class of its name}`
    # (`data.label_classes`); ids it leaves out are not prompted.
    label_classes: dict[int, int] | None = None
    structures: int = 0  # a class-aware model's class count: the ids its heads decode (0: not class-aware)
    # Each image's path below the inputs' common folder (`outputs.input_places`): its mask is looked for at that
    # place under the masks folder first (DeepLesion's `000001_01_01/109.png` beside `000002_01_01/109.png`).
    places: dict[Path, Path] | None = None
    # Each image's lesions' windows `(level, width)` in HU, in the order of its boxes (DeepLesion's DL_info.csv
    # `DICOM_windows`: `deeplesion_windows`), where no --window is given.
    windows: dict[Path, list[tuple[float, float]]] | None = None

    @property
    def masks_folder(self) -> str | None:
        return self.boxes_from_masks or self.points_from_masks

    @functools.cached_property
    def places_of_stem(self) -> dict[str, list[Path]]:
        """The places of the run's images by their stem (one listing for all images)."""
        found: dict[str, list[Path]] = {}
        for source, place in (self.places or {}).items():
            found.setdefault(image_stem(source), []).append(place)
        return found

    def mask_of(self, path: Path, folder: str, size: tuple[int, int]) -> np.ndarray:
        """The mask named like `path` (its stem and the folder's `mask_suffix`, or nnU-Net's case of `<case>_0000`:
        `data.masks_named`) in `folder`, at the image's place below the inputs' folder (`places`: `folder/a/x.png`
        for `a/x.jpg`) or else in `folder` itself (unless another image of the run has its stem: that mask would
        prompt both), as class ids, checked to be the image's `size` (H, W)."""
        stem, place = image_stem(path), (self.places or {}).get(path)
        below = Path(folder) / place.parent if place is not None and place.parent != Path(".") else None
        naming = (self.mask_suffix, self.mask_prefix)
        name, candidates = masks_named(below, stem, *naming) if below is not None else ("", [])
        where = below if candidates else Path(folder)
        if not candidates:
            name, candidates = masks_named(folder, stem, *naming)
            alike = self.places_of_stem.get(stem, [])
            if candidates and below is not None and len(alike) > 1:
                raise ValueError(
                    f"{path}: no mask in {below}, and {candidates[0]} would prompt all {len(alike)} images named "
                    f"{stem} ({', '.join(p.as_posix() for p in alike[:3])}): lay the masks out as the images are "
                    f"({below / stem}.png)."
                )
        if not candidates:
            looked = " or ".join(f"{n}.*" for n in mask_names(stem, *naming))
            raise ValueError(f"{path}: no mask named {looked} in {folder}" + (f" or {below}." if below else "."))
        if self.mask_suffix:  # BUSI's second lesion, x_mask_1.png beside x_mask.png: not half the prompts
            listed = (p.stem for p in where.glob(f"{glob.escape(name)}_*"))
            further = extra_masks(self.mask_suffix, listed).get(image_stem(path), [])
            if further:
                raise ValueError(
                    f"{path}: {len(further) + 1} masks ({name}, {', '.join(further)}) in {folder}: one per lesion; "
                    "merge them into one mask (their union)."
                )
        mask = read_mask(candidates[0], self.mask_classes if self.class_ids else 1)
        if tuple(mask.shape) != tuple(size):
            raise ValueError(
                f"{candidates[0]}: the mask is {mask.shape[1]}x{mask.shape[0]}, its image {path} is {size[1]}x{size[0]}: "
                "a box or click from it would land on other pixels. Give the mask of this image."
            )
        return mask

    def prompt_for(self, path: Path, size: tuple[int, int]) -> dict[str, Any]:
        """`segment`'s prompt arguments for one image of `size` (H, W): `box` (one or several, with their class
        ids under `class_ids`), or `points` with `labels`, or nothing."""
        if self.points:
            points, labels = self.points
            return {"points": points, "labels": labels}
        if self.points_from_masks:
            mask = self.mask_of(path, self.points_from_masks, size)
            clicks = mask_clicks(mask > 0, self.clicks)
            if clicks is None:
                raise ValueError(f"{path}: its mask in {self.points_from_masks} is empty, so it gives no click.")
            return {"points": clicks.tolist(), "labels": [1] * len(clicks)}
        if self.no_prompt:
            return {"box": None}
        drawn = {} if self.box_class is None else {"classes": [self.box_class]}
        if self.box:
            return {"box": self.box, **drawn}
        if self.boxes is not None:
            if path not in self.boxes:
                place = (self.places or {}).get(path, Path(path.name))
                raise ValueError(f"{path}: no box in --boxes for {place.as_posix()} (or {image_stem(path)}).")
            entry = self.boxes[path]
            if isinstance(entry[0], list):  # several structures (a slice's lesions, an image's polyps): one mask
                return {"box": entry, **({} if self.box_class is None else {"classes": [self.box_class] * len(entry)})}
            return {"box": entry, **drawn}
        mask = self.mask_of(path, self.boxes_from_masks, size)
        if not self.class_ids:
            box = mask_box(mask)
            if box is None:
                raise ValueError(f"{path}: its mask in {self.boxes_from_masks} is empty, so it gives no box.")
            return {"box": box.tolist()}
        ids = [
            int(c) for c in np.unique(mask) if c > 0 and (self.label_classes is None or int(c) in self.label_classes)
        ]
        if not ids:
            raise ValueError(f"{path}: its mask in {self.boxes_from_masks} holds no structure, so it gives no box.")
        heads = [(self.label_classes or {}).get(c, c) for c in ids]  # the class decoding each (a class-aware model)
        beyond = sorted(c for c in heads if self.structures and c > self.structures)
        if beyond:  # a 0/255 mask given to a class-aware model: which structure is 255?
            _, found = masks_named(self.boxes_from_masks, image_stem(path), self.mask_suffix, self.mask_prefix)
            raise ValueError(
                f"{path}: its mask {found[0]} holds {', '.join(map(str, beyond))}, not a class id of the model's "
                f"{self.structures} structures (1..{self.structures}): give masks of the model's class ids (or named "
                "by a classes.json beside them), or --box / --boxes with --classes STRUCTURE."
            )
        return {"box": [mask_box(mask == c).tolist() for c in ids], "class_ids": ids, "heads": heads}


def boxes_by_image(boxes: Mapping[str, list], places: Mapping[Path, Path], path: str) -> dict[Path, list]:
    """
    Each image's box of `--boxes` (`image_boxes`): the entry of the longest trailing part of its path, with or without
    its extension (`109.png`, `000001_01_01/109.png`, `Images_png/000001_01_01/109`: DeepLesion's `DL_info.csv`
    names slices so, whichever folder is given); an entry that would prompt several images of the run (a `109.png`
    in many series folders) is refused, naming them and the path to key each by (its place below the inputs' common
    folder, `places`), before any model runs. Images without an entry are left out (`PromptSource.prompt_for` names
    them).
    """
    found, used = {}, {}
    for source in places:
        parts, stem = source.parts, image_stem(source)
        keys = (
            key
            for n in range(min(len(parts), 8), 0, -1)
            for key in ("/".join(parts[-n:]), "/".join([*parts[-n:-1], stem]))
        )
        key = next((k for k in keys if k in boxes), None)
        if key is not None:
            found[source] = boxes[key]
            used.setdefault(key, []).append(source)
    shared = next(((key, sources) for key, sources in used.items() if len(sources) > 1), None)
    if shared:
        key, sources = shared
        listed = ", ".join(places[s].as_posix() for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        raise ValueError(
            f"--boxes {path}: {key!r} names {len(sources)} images of this run ({listed}): key each by its path below "
            f"the inputs' folder ({places[sources[0]].as_posix()!r})."
        )
    return found


def image_boxes(data: Any, path: str) -> dict[str, list[float] | list[list[float]]]:
    """`--boxes` for images: `{image path, name or stem: [x0, y0, x1, y1]}`, each box four numbers, or a list of boxes
    for several structures of one image (DeepLesion's lesions of a slice, an image's polyps: its mask is their union);
    Kvasir-SEG's `kavsir_bboxes.json` and COCO annotation files as they are (`coco_boxes`, `kvasir_boxes`);
    `boxes_by_image` gives each image its entry."""
    if isinstance(data, Mapping) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        data = coco_boxes(data, path)
    elif isinstance(data, Mapping) and any(isinstance(entry, Mapping) and "bbox" in entry for entry in data.values()):
        data = kvasir_boxes(data, path)
    if not isinstance(data, Mapping):
        raise ValueError(
            f"--boxes {path}: expected a JSON object {{image path, name or stem: [x0, y0, x1, y1]}}, got a "
            f"{type(data).__name__}."
        )
    checked: dict[str, list[float] | list[list[float]]] = {}
    for name, entry in data.items():
        several = isinstance(entry, list) and bool(entry) and all(isinstance(box, list) for box in entry)
        for box in entry if several else [entry]:
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise ValueError(
                    f"--boxes {path}: {name!r}: {box!r} is not a box [x0, y0, x1, y1] of four numbers (or a list of "
                    "such boxes, one per structure)."
                )
        checked[str(name)] = [[float(v) for v in box] for box in entry] if several else [float(v) for v in entry]
    return checked


def read_boxes_file(path: str) -> Any:
    """`--boxes`: a JSON file, or DeepLesion's `DL_info.csv` (`deeplesion_boxes`)."""
    return deeplesion_boxes(path) if path.lower().endswith(".csv") else read_json_file(path, "--boxes")


def deeplesion_boxes(path: str) -> dict[str, list]:
    """DeepLesion's `DL_info.csv`, one row per lesion, as image `--boxes`: `{"<series>/<slice>.png": [[x0, y0, x1, y1],
    ...]}` (its `File_name` `000001_01_01_109.png` is `Images_png/000001_01_01/109.png`; `Bounding_boxes` in the key
    slice's pixels), every lesion of a slice in the file's order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a BOM, as spreadsheets write one, is no name
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"--boxes {path}: cannot read it as a CSV file ({error}).") from None
    if not rows or not {"File_name", "Bounding_boxes"} <= set(rows[0]):
        raise ValueError(
            f"--boxes {path}: a CSV of boxes is DeepLesion's DL_info.csv, with File_name and Bounding_boxes columns "
            f"(got {', '.join(list(rows[0])[:6]) if rows else 'no rows'}); give other boxes as JSON."
        )
    boxes: dict[str, list] = {}
    for number, row in enumerate(rows, 2):
        series, _, name = row["File_name"].rpartition("_")
        try:
            box = [float(v) for v in row["Bounding_boxes"].replace(";", ",").split(",")]
        except ValueError:
            box = []
        if not series or len(box) != 4 or not all(np.isfinite(box)):
            raise ValueError(
                f"--boxes {path}: line {number}: {row['File_name']!r} / {row['Bounding_boxes']!r} is not a slice "
                "<series>_<slice>.png with a box 'x0, y0, x1, y1'."
            )
        boxes.setdefault(f"{series}/{name}", []).append(box)
    return boxes


#: What DeepLesion's 16-bit PNGs add to the HU they store (its documentation: subtract 32768).
DEEPLESION_INTERCEPT = -32768.0


def deeplesion_windows(path: str) -> dict[str, list[tuple[float, float]]]:
    """Each lesion's window of DeepLesion's `DL_info.csv`, keyed and ordered as `deeplesion_boxes`' boxes:
    `DICOM_windows` holds the window its slice was read with, as `min, max` in HU (`-175, 275`: soft tissue;
    `-1350, 150`: lung), given here as `(level, width)`. `{}` for a file without the column."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "DICOM_windows" not in rows[0]:
        return {}
    windows: dict[str, list[tuple[float, float]]] = {}
    for number, row in enumerate(rows, 2):
        series, _, name = row["File_name"].rpartition("_")
        try:
            low, high = (float(v) for v in row["DICOM_windows"].split(","))
        except ValueError:
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(
                f"--boxes {path}: line {number}: DICOM_windows {row['DICOM_windows']!r} is not a window 'min, max' in HU."
            )
        windows.setdefault(f"{series}/{name}", []).append(((low + high) / 2, high - low))
    return windows


def coco_boxes(data: Mapping, path: str) -> dict[str, list]:
    """A COCO annotation file (a detector's output in the dataset format: `images` `[{"id", "file_name"}]`,
    `annotations` `[{"image_id", "bbox": [x, y, w, h]}]`) as `--boxes` entries: `{file_name: [[x0, y0, x1, y1],
    ...]}`, each image's boxes in the file's order; images without an annotation left out."""
    names = {}
    for image in data["images"]:
        if not isinstance(image, Mapping) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"--boxes {path}: a COCO image entry needs an id and a file_name, got {image!r}.")
        names[image["id"]] = image["file_name"]
    boxes: dict[str, list] = {}
    for note in data["annotations"]:
        box = note.get("bbox") if isinstance(note, Mapping) else None
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(_is_number(v) for v in box)
            or box[2] < 0
            or box[3] < 0
        ):
            raise ValueError(f"--boxes {path}: a COCO annotation needs a bbox [x, y, width, height], got {note!r}.")
        if note.get("image_id") not in names:
            raise ValueError(f"--boxes {path}: annotation {note.get('id')!r} names image_id {note.get('image_id')!r}, "
                             "which no entry of its \"images\" list has.")  # fmt: skip
        x, y, width, height = (float(v) for v in box)
        boxes.setdefault(names[note["image_id"]], []).append([x, y, x + width, y + height])
    return boxes


def kvasir_boxes(data: Mapping, path: str) -> dict[str, list]:
    """Kvasir-SEG's `kavsir_bboxes.json` (`{id: {"height", "width", "bbox": [{"label", "xmin", "ymin", "xmax",
    "ymax"}, ...]}}`) as `--boxes` entries: `{id: [[x0, y0, x1, y1], ...]}`."""
    boxes: dict[str, list] = {}
    for name, entry in data.items():
        listed = entry.get("bbox") if isinstance(entry, Mapping) else None
        keys = ("xmin", "ymin", "xmax", "ymax")
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(b, Mapping) and all(_is_number(b.get(k)) for k in keys) for b in listed)
        ):
            raise ValueError(
                f'--boxes {path}: {name!r}: expected {{"bbox": [{{"xmin", "ymin", "xmax", "ymax"}}, ...]}} '
                f"(Kvasir-SEG's kavsir_bboxes.json), got {entry!r}."
            )
        boxes[str(name)] = [[float(b[k]) for k in keys] for b in listed]
    return boxes


#: A volume's prompts from `--boxes`: its 3-D boxes and the key slice of those drawn on one slice.
VolumeBoxes = tuple[dict[int | str, list[int]], dict[int | str, int]]  # keyed by class id, or a structure's name


def volume_boxes(data: Any, path: str, volumes: list[str]) -> dict[str, VolumeBoxes]:
    """
    `--boxes` for volumes: `{class id: box}` for every volume, or `{volume name: {class id: box}}` per volume (not both
    in one file). A box is six whole voxel indices `[x0, y0, z0, x1, y1, z1]` (the structure's 3-D box, segmented from
    its middle slice outwards), or `{"box": [x0, y0, z0, x1, y1, z1], "key_slice": z}`: a 2-D box drawn on slice `z`
    with the structure's first and last slice (segmented from `z` outwards). Volume name -> (boxes, key slices),
    checked before any model is loaded. A class-aware model's structure names may stand for class ids (`"liver"`):
    they stay names here, and `named_boxes` makes them ids once the model's classes are known.
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"--boxes {path}: expected a JSON object {{class id: [x0, y0, z0, x1, y1, z1]}} or {{volume name: {{...}}}}, "
            f"got {type(data).__name__ if not isinstance(data, Mapping) else 'an empty object'}."
        )
    # A per-volume entry maps a volume name to its boxes; a class id mapping to {"box", "key_slice"} is one box.
    nested = {key for key, value in data.items() if isinstance(value, Mapping) and "box" not in value}
    if nested and len(nested) != len(data):
        flat = sorted(set(data) - nested)
        raise ValueError(
            f"--boxes {path}: mixes per-volume entries ({sorted(nested)[:3]}) with boxes for every volume "
            f"({flat[:3]}); give one form: {{volume name: {{class id: box}}}} or {{class id: box}}."
        )
    names = [volume_name(v) for v in volumes]
    if nested:
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"--boxes {path}: no boxes for {missing} (it has {sorted(data)}).")
        return {name: _class_boxes(data[name], f"--boxes {path}: {name}") for name in names}
    every = _class_boxes(data, f"--boxes {path}")
    return dict.fromkeys(names, every)


def _class_boxes(data: Mapping, where: str) -> VolumeBoxes:
    boxes, key_slices = {}, {}
    for key, entry in data.items():
        name = is_structure_name(str(key))  # resolved by `named_boxes` once the model is loaded
        if not name and not (str(key).strip().isdigit() and 1 <= int(key) <= 255):
            raise ValueError(
                f"{where}: {key!r} is not a class id (1..255); keys are class ids (or a class-aware model's structure "
                "names), or volume names holding them."
            )
        key = str(key) if name else int(key)
        box, key_slice = entry, None
        if isinstance(entry, Mapping):
            if set(entry) != {"box", "key_slice"}:
                raise ValueError(
                    f'{where}: class {key}: {dict(entry)!r} needs exactly the keys "box" ([x0, y0, z0, x1, y1, z1]: '
                    'the 2-D box drawn on the key slice, and the structure\'s first and last slice) and "key_slice".'
                )
            box, key_slice = entry["box"], entry["key_slice"]
            if not (_is_number(key_slice) and float(key_slice) == int(key_slice)):
                raise ValueError(f"{where}: class {key}: key_slice {key_slice!r} is not a whole slice index.")
        if not isinstance(box, list) or len(box) != 6 or not all(_is_number(v) and float(v) == int(v) for v in box):
            raise ValueError(f"{where}: class {key}: {box!r} is not six whole voxel indices [x0, y0, z0, x1, y1, z1].")
        x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0 or z1 < z0:
            wide = "one voxel wide or reversed in x or y" if z1 >= z0 else "reversed in z"
            raise ValueError(
                f"{where}: class {key}: {box!r} is {wide}; a box holds inclusive voxel indices with x0 < x1, "
                "y0 < y1 and z0 <= z1 (a structure spans at least 2 voxels in x and in y)."
            )
        boxes[key] = [x0, y0, z0, x1, y1, z1]
        if key_slice is not None:
            if not z0 <= int(key_slice) <= z1:
                raise ValueError(
                    f"{where}: class {key}: key_slice {int(key_slice)} is outside the box's slices {z0}..{z1}; the "
                    "2-D box is drawn on a slice of the structure."
                )
            key_slices[key] = int(key_slice)
    return boxes, key_slices


def named_boxes(boxes: dict[str, VolumeBoxes], config, path: str) -> dict[str, VolumeBoxes]:
    """`volume_boxes` with structure names (`"liver"`) made the class ids of a class-aware model's `config`
    (`volumes.named_structures`), checked before any volume is segmented."""
    return {
        volume: named_structures(config, by_key, key_slices, f"--boxes {path}: {volume}:")  # type: ignore[misc]
        for volume, (by_key, key_slices) in boxes.items()
    }


def correction_clicks(paths: list[str], volumes: list[str]) -> dict[str, list[NamedClick]]:
    """
    `--corrections`: each volume's clicks, their structures still names (`volumes.click_labels` reads them once the
    model and the labels they correct are known). A file is a 3D Slicer markups file (`.mrk.json`, a JSON with
    "markups", or the older `.fcsv`: world positions, so one scan per run), or JSON `{structure: [[x, y, z], ...]}`
    in the scans' voxel indices (a structure's name or class id, or "background"), or `{volume name: {structure:
    [...]}}`. Read and checked before any model is loaded.
    """
    names = [volume_name(v) for v in volumes]
    every: list[NamedClick] = []
    per_volume: dict[str, list[NamedClick]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"--corrections {path}: no such file (3D Slicer point lists, .mrk.json, or clicks JSON).")
        fcsv = path.lower().endswith(".fcsv")  # Slicer's point lists before 4.11
        content = None if fcsv else read_json_file(path, "--corrections")
        if fcsv or (isinstance(content, Mapping) and "markups" in content):
            try:
                clicks = read_slicer_points(path)
            except ValueError as error:
                raise ValueError(f"--corrections {error}.") from None
            if not clicks:
                raise ValueError(f"--corrections {path}: its point lists hold no placed point.")
            if len(volumes) > 1:
                raise ValueError(
                    f"--corrections {path}: a 3D Slicer point list holds world positions and says not which scan they "
                    f"are on; give one scan per run ({len(volumes)} given), or clicks JSON per volume name."
                )
            every += clicks
            continue
        where = f"--corrections {path}"
        if not isinstance(content, Mapping) or not content:
            raise ValueError(
                f'{where}: expected {{structure: [[x, y, z], ...], "background": [...]}} (voxel indices) or {{volume '
                "name: {...}}, or a 3D Slicer markups file (.mrk.json)."
            )
        nested = [key for key, value in content.items() if isinstance(value, Mapping)]
        if nested and len(nested) != len(content):
            raise ValueError(
                f"{where}: mixes per-volume entries ({sorted(nested)[:3]}) with clicks for every volume; give one form."
            )
        if not nested:
            every += _voxel_clicks(content, where)
            continue
        missing = [name for name in names if name not in content]
        if missing:
            raise ValueError(f"{where}: no clicks for {missing} (it has {sorted(content)}).")
        for name in names:
            per_volume.setdefault(name, []).extend(_voxel_clicks(content[name], f"{where}: {name}"))
    return {name: every + per_volume.get(name, []) for name in names}


def _voxel_clicks(data: Mapping, where: str) -> list[NamedClick]:
    """`{structure: [[x, y, z], ...]}` -> clicks at those voxel indices, each named by its key."""
    clicks = []
    for key, entry in data.items():
        if not (
            isinstance(entry, list)
            and entry
            and all(isinstance(p, list) and len(p) == 3 and all(_is_whole(v) for v in p) for p in entry)
        ):
            raise ValueError(
                f"{where}: {key!r}: {entry!r} is not a list of clicks [x, y, z] (whole voxel indices of the scan, as "
                "--boxes gives them)."
            )
        for number, point in enumerate(entry, start=1):
            clicks.append(
                NamedClick((str(key),), tuple(float(v) for v in point), False, f"{where}: {key!r} click {number}")
            )  # type: ignore[arg-type]
    return clicks


def check_click_names(corrections: Mapping[str, list[NamedClick]], class_names: Mapping[int, str]) -> None:
    """Every click of `corrections` names `background` or one of a class-aware model's structures; before any volume
    is segmented."""
    for clicks in corrections.values():
        for click in clicks:
            if click_label(click, class_names) is None:
                listed = ", ".join(f"{i} {name}" for i, name in sorted(class_names.items()))
                raise ValueError(
                    f"--corrections {click.where.removeprefix('--corrections ')}: {' / '.join(map(repr, click.names))} "
                    f"names none of the model's structures ({listed}) nor {BACKGROUND!r}."
                )


def refinement_text(refinement: VolumeRefinement) -> str:
    """What `--corrections` did to a volume's labels, per action, for the command's line."""
    actions: dict[str, int] = {}
    for edit in refinement.edits:
        action = edit.action if edit.slices else "not taken"
        actions[action] = actions.get(action, 0) + 1
    agreed = refinement.clicks - len(refinement.edits)
    parts = [f"{count} {action}" for action, count in actions.items()] + (
        [f"{agreed} agreed already"] if agreed else []
    )
    return f"{refinement.clicks} click{'s' if refinement.clicks != 1 else ''} ({', '.join(parts)})"


def previous_labels_of(scan: Path, previous: str) -> Path:
    """`--previous`'s label volume of `scan`: the file itself, or the one named like the scan in its folder."""
    if Path(previous).is_file():
        return Path(previous)
    found = label_volume_of(scan, previous)
    if found is None:
        raise ValueError(f"--previous {previous}: no label volume {label_volume_names(scan, previous)} in it")
    return found


def _is_whole(value: Any) -> bool:
    return _is_number(value) and float(value) == int(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def masks_hold_class_ids(model_config, masks_folder: str | None, mask_classes: int | None) -> bool:
    """Masks read as class ids (every structure a prompt): a class-aware model, `--mask-classes`, or a
    `classes.json` beside the masks folder (BTCV's layout)."""
    if mask_classes is not None:
        return True
    if getattr(model_config, "num_classes", 1) > 1:
        return True
    if masks_folder is None:
        return False
    folder = Path(masks_folder)
    return any(read_class_names(place) for place in (folder, folder.parent) if (place / "classes.json").is_file())


def mask_label_classes(model_config, masks_folder: str | None) -> dict[int, int] | None:
    """`data.label_classes` of a folder of class-id masks for a class-aware model: `{mask id: the model's class of its
    name}` where the folder's names (`data.folder_class_names`) number the structures otherwise; None else."""
    names = structure_names_of(model_config)
    if names is None or masks_folder is None:
        return None
    try:
        own = folder_class_names(masks_folder)
    except ValueError:
        return None
    return label_classes(sorted(own or ()), own, names, masks_folder)


def split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """
    `(volumes, images)` of the command line's inputs: 3-D files (NIfTI, NRRD, MetaImage), given or in a folder given
    (its hidden files, such as MSD's `._case.nii.gz`, and the label volumes kept beside scans, 3D Slicer's
    `.seg.nrrd` or LiTS's `segmentation-0.nii` beside `volume-0.nii`, skipped; or those of its case folders, KiTS's
    `case_00000/imaging.nii.gz`: `volumes.case_scans_in`), DICOM series
    (a folder of one series, or each folder under a folder given that holds DICOM slices: a DICOM export's series),
    and the image files (2-D DICOM images too: radiographs, ...) and folders of images (2-D DICOM images at any depth
    below them, as an export holds them; a folder holding no volume stays one, so that it is named if it holds no
    image either). A single slice of a DICOM series is a ValueError saying to give its series' folder.
    """
    volumes, images = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = [*case_scans_in(path), *dicom_series_in(path)]
            volumes.extend(map(str, found))
            if not found or image_files_in(path, dicom_below=True):
                images.append(raw)
        elif is_volume(raw) or (is_dicom_file(raw) and dicom_kind(raw) == "volume"):  # a 3-D file, a multi-frame scan
            volumes.append(raw)
        elif is_dicom_file(raw) and dicom_kind(raw) == "slice":
            raise ValueError(
                f"{raw}: a slice of a DICOM series; give the folder of its series instead (read as one 3-D scan, a "
                "label volume out)."
            )
        else:
            images.append(raw)
    return volumes, images


def run(args: argparse.Namespace, device: str | None) -> int:
    """`imedsam predict` with parsed arguments."""
    if any(Path(raw).suffix.lower() == ".npz" or npz_cases_in(raw) for raw in args.inputs):
        return predict_npz(args, device)
    made = False  # whether this call made --out (then a refusal removes it again, empty)
    try:
        grid = parse_output_size(args.output_size)
        points = parse_points(args.points) if args.points else None
        box = parse_box(args.box) if args.box else None
        prompt_given = any(
            (args.box, args.boxes, args.boxes_from_masks, args.points, args.points_from_masks, args.no_prompt)
        )
        if args.previous is not None and args.corrections is None:
            raise ValueError(
                f"--previous {args.previous}: the labels that --corrections correct; give the clicks (--corrections)."
            )
        if not prompt_given and args.corrections is None:
            raise ValueError(f"give a prompt: {PROMPT_FLAGS} (volumes: or --corrections).")
        if args.clicks is not None and not args.points_from_masks:
            raise ValueError(
                "--clicks sets the clicks per mask of --points-from-masks; it does nothing with this prompt."
            )
        if args.clicks is not None and args.clicks < 1:
            raise ValueError(f"--clicks {args.clicks}: at least 1 click per mask.")
        missing = [path for path in args.inputs if not Path(path).exists()]
        if missing:
            raise ValueError(
                f"{missing[0]}: no such file or folder"
                + (f" (and {len(missing) - 1} more)." if len(missing) > 1 else ".")
            )
        volumes, images = split_inputs(args.inputs)
        if args.scans is not None:
            if not volumes:
                raise ValueError(
                    "--scans picks among volumes (a channel or MR sequence of each case); no volume given."
                )
            volumes = [str(path) for path in scans_matching(volumes, args.scans, "the inputs")]
        if args.label_suffix is not None and not (volumes and args.boxes_from_masks):
            raise ValueError(
                "--label-suffix picks each volume's label volume in --boxes-from-masks; none is read here."
            )
        if args.channel is not None and volumes:  # nnU-Net's `<case>_0001.nii.gz` files, else a 4-D file's volume
            volumes = [str(path) for path in channel_files(volumes, args.channel) or volumes]
        if any(not is_volume(volume) for volume in volumes):  # DICOM: a series' folder, a multi-frame scan
            require_dicom()  # before anything is loaded or written
            if any(is_multiframe_scan(volume) for volume in volumes):
                require_multiframe()
        masks_folder = args.boxes_from_masks or args.points_from_masks
        flag = "--boxes-from-masks" if args.boxes_from_masks else "--points-from-masks"
        if masks_folder and not Path(masks_folder).is_dir():
            raise ValueError(f"{flag} {masks_folder}: no such folder (masks named like the images, or label volumes).")
        if any(map(is_itk_volume, volumes)) or (masks_folder and any(map(is_itk_volume, volumes_in(masks_folder)))):
            require_itk()  # NRRD / MetaImage scans or label volumes, before anything is loaded or written
        if volumes and not images:
            if args.output_size:
                raise ValueError(
                    "--output-size applies to 2-D images; a label volume is written on its scan's own grid."
                )
        if args.channel is not None and not volumes:
            raise ValueError("--channel picks one volume of 4-D scans (MR sequences, time points); no volume given.")
        if args.corrections is not None:
            if images or not volumes:
                raise ValueError(
                    f"--corrections correct a volume's labels; {(images or args.inputs)[0]} is not a volume (NIfTI, "
                    "NRRD, MetaImage, DICOM): give images their prompt instead."
                )
            if args.previous is not None and not Path(args.previous).exists():
                raise ValueError(f"--previous {args.previous}: no such file or folder.")
            if args.previous is not None and Path(args.previous).is_file() and len(volumes) > 1:
                raise ValueError(
                    f"--previous {args.previous} is one label volume, for {len(volumes)} scans: give a folder of label "
                    "volumes named like the scans (an earlier --out)."
                )
        if args.plane != "stored" and not volumes:
            raise ValueError("--plane applies to volumes (a coronal or sagittal stack resliced axial).")
        for flag, given in (("--propagation", args.propagation is not None), ("--no-confine", args.no_confine)):
            if given and not (volumes and args.boxes):
                raise ValueError(f"{flag} applies to volumes prompted with 3-D boxes (--boxes).")
        if args.statistics and not volumes:
            raise ValueError(
                "--statistics applies to volumes, NIfTI or DICOM (each structure's volume in mL and mean intensity)."
            )
        for flag, given, what, require in (
            ("--dicom-seg", args.dicom_seg, "a DICOM Segmentation", require_dicom_seg),
            ("--dicom-rtstruct", args.dicom_rtstruct, "an RT Structure Set", require_rtstruct),
        ):
            dicom = [raw for raw in volumes if Path(raw).is_dir() or is_multiframe_scan(raw)] if given else []
            other = next((raw for raw in [*volumes, *images] if raw not in dicom), None)
            if given and other is not None:
                raise ValueError(
                    f"{flag}: {other} is not a DICOM scan; {what} references its images: give DICOM series folders "
                    "or multi-frame scans only (NIfTI scans get their label volume without it)."
                )
            if given:
                require()  # its library missing: said before the model loads
        if args.window is not None:
            check_window(args.window)
        if args.classes is not None and (volumes or not (args.box or args.boxes)):
            raise ValueError(
                "--classes names the structure of --box or --boxes for images; a volume's --boxes name each "
                "structure's class id, and masks give their own."
            )
        if volumes and (args.box or args.points or args.points_from_masks or args.no_prompt):
            raise ValueError("volumes take --boxes-from-masks (label volumes) or --boxes (3-D boxes JSON).")
        boxes_json = read_boxes_file(args.boxes) if args.boxes else None
        check_output_folder(args.out, args.inputs, masks_folder)
        volume_plan = plan_outputs(volumes, args.out, volume_suffixes(args), volumes=True) if volumes else {}
        image_plan = (
            plan_outputs(images, args.out, (".png", "_overlay.png") if args.overlay else (".png",)) if images else {}
        )
        if image_plan and masks_folder:  # masks kept beside their images (BUSI, CAMUS) are prompts, not inputs
            _, beside = masks_beside_images(image_stem(path) for path in image_files_in(masks_folder))
            held = Path(masks_folder).resolve()
            image_plan = {
                source: targets
                for source, targets in image_plan.items()
                if not (source.parent.resolve() == held and image_stem(source) in beside)
            }
        check_rescale_intercept(args.rescale_intercept)
        if args.rescale_intercept is not None and not image_plan:
            raise ValueError(
                "--rescale-intercept applies to 16-bit pictures (PNG, TIFF) storing CT as HU plus an offset; a "
                "volume's values are read as its header scales them."
            )
        hu_pictures = args.rescale_intercept is not None
        if args.window is not None and not volumes and not hu_pictures and not any(map(is_grid_image, image_plan)):
            raise ValueError(
                "--window applies to volumes (NIfTI, DICOM series), to 2-D images stored as NIfTI / NRRD / "
                "MetaImage (values in HU) and to 16-bit pictures read with --rescale-intercept; pictures are 8-bit "
                "already."
            )
        on_grid = next((source for source, targets in image_plan.items() if targets[0].suffix != ".png"), None)
        if args.output_size and on_grid is not None:
            raise ValueError(
                f"--output-size: {on_grid}'s mask is written in its format on its grid (its spacing kept); predict "
                "such images without --output-size."
            )
        # What the masks add to their image's stem (ISIC's _segmentation), from the images the plan lists.
        stems = [image_stem(source) for source in image_plan]
        mask_suffix, mask_prefix = mask_folder_naming(stems, masks_folder) if image_plan and masks_folder else ("", "")
        clash = set(t for ts in volume_plan.values() for t in ts) & set(t for ts in image_plan.values() for t in ts)
        if clash:
            raise ValueError(f"a volume and an image would both be written to {sorted(clash)[0]}.")
        every_target = [t for targets in (*volume_plan.values(), *image_plan.values()) for t in targets]
        refuse_existing(every_target, args.out, args.overwrite)
        corrections = correction_clicks(args.corrections, volumes) if args.corrections is not None else None
        if volumes:
            if args.boxes_from_masks is None and boxes_json is None and corrections is None:
                raise ValueError("volumes take --boxes-from-masks (label volumes) or --boxes (3-D boxes JSON).")
            volume_prompts = volume_boxes(boxes_json, args.boxes, volumes) if boxes_json is not None else None
            if args.plane == "axial" and any(keys for _, keys in (volume_prompts or {}).values()):
                raise ValueError(
                    f"--boxes {args.boxes}: key_slice entries are slices of the stored stack; with --plane axial give "
                    "3-D boxes [x0, y0, z0, x1, y1, z1]."
                )
        places = {s: place for s, place in (input_places(images) if images else {}).items() if s in image_plan}
        lesion_windows = None
        if images and boxes_json is not None and not volumes:
            boxes_json = boxes_by_image(image_boxes(boxes_json, args.boxes), places, args.boxes)
            if args.boxes.lower().endswith(".csv") and args.window is None:  # DeepLesion's: each lesion's window
                lesion_windows = boxes_by_image(deeplesion_windows(args.boxes), places, args.boxes) or None
        elif images and boxes_json is not None:
            raise ValueError(
                "--boxes holds either 2-D boxes for images or 3-D boxes for volumes: predict them separately."
            )
        require_backend(args.backend, args.precision)
        made = not Path(args.out).exists()
        check_writable(args.out)  # before the model loads: a read-only folder fails in a second
        model, processor = load_model(
            args.model, device=device, backend=args.backend, backend_options={"precision": args.precision}
        )
        box_class = None if args.classes is None else structure_id(model.config, args.classes)
        unwindowed = args.window is None and training_window(model.config) in (None, "mr")
        if args.rescale_intercept is not None and unwindowed and lesion_windows is None:
            raise ValueError(
                f"--rescale-intercept {args.rescale_intercept:g} gives the pictures' HU, but {args.model} records no CT "
                "window to window them with: give --window (e.g. btcv, or the window the model was trained with)."
            )
        if volumes and volume_prompts is not None:
            volume_prompts = named_boxes(volume_prompts, model.config, args.boxes)
        if corrections is not None and is_class_aware(model.config):
            check_click_names(corrections, structure_names_of(model.config) or {})
    except (OSError, ValueError, ImportError) as error:
        if made and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()  # a model or argument refused leaves no empty folder of ours behind
        return fail(error)
    codes = []
    if volumes:
        codes.append(predict_volumes(model, processor, volume_plan, args, volume_prompts, corrections))
    if images:
        class_ids = masks_hold_class_ids(model.config, args.boxes_from_masks, args.mask_classes)
        source = PromptSource(
            box=box,
            boxes=boxes_json,
            boxes_from_masks=args.boxes_from_masks,
            no_prompt=args.no_prompt,
            points=points,
            points_from_masks=args.points_from_masks,
            clicks=args.clicks or 1,
            class_ids=class_ids,
            box_class=box_class,
            mask_suffix=mask_suffix,
            mask_prefix=mask_prefix,
            mask_classes=args.mask_classes or 255,
            label_classes=mask_label_classes(model.config, args.boxes_from_masks) if class_ids else None,
            structures=getattr(model.config, "num_classes", 1) if is_class_aware(model.config) else 0,
            places=places,
            windows=lesion_windows,
        )
        codes.append(predict_images(model, processor, image_plan, source, grid, args))
    return max(codes)


def predict_images(model, processor, plan, prompts: PromptSource, grid, args) -> int:
    """One mask per image (0/255, or class ids for class-id masks), written atomically; failures named."""
    failures = []
    aware = getattr(model.config, "num_classes", 1) > 1
    for path, targets in tqdm(plan.items(), desc="predict", unit="image", disable=len(plan) < 2):
        try:
            picture, intercept = open_image(path), args.rescale_intercept
            lesions = (prompts.windows or {}).get(path)  # DeepLesion's windows: for its 16-bit HU + 32768 PNGs
            if lesions and intercept is None and getattr(picture, "mode", None) in SIXTEEN_BIT_MODES:
                intercept = DEEPLESION_INTERCEPT
            image = stored_hu(picture, intercept)  # a 16-bit HU + offset picture: its HU
            hu = image if lesions and intercept is not None else None
            window = args.window
            if window is None and intercept is not None:
                # HU by the user's word: windowed whatever their range, as the lesion was read, or as the model was trained
                window = lesions[0] if hu is not None else training_window(model.config)
            if window is not None and isinstance(image, np.ndarray) and image.ndim == 2:  # HU: a 2-D .mha, a picture
                image = to_uint8(image, window)
            image = windowed_slice(image, model.config)  # else the model's window: the overlay shows what it saw
            width, height = image_size(image)
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS} pixels.")
            prompt = prompts.prompt_for(path, (height, width))
            ids, heads = prompt.pop("class_ids", None), prompt.pop("heads", None)
            drawn_for = prompt.pop("classes", None)  # --classes: one structure, a 0/255 mask as for any box
            options = dict(
                output_size=grid or (height, width), processor=processor, max_output_pixels=args.max_output_pixels,
                classes=heads if ids and aware else drawn_for, tta=args.tta,
            )  # fmt: skip
            if hu is not None and len(set(lesions)) > 1 and len(lesions) == len(prompt.get("box") or []):
                result = segment_by_window(model, hu, prompt["box"], lesions, **options)
            else:
                result = segment(model, image, **prompt, **options)
            as_png = targets[0].suffix == ".png"  # else the image's own format: class ids, binary 0/1
            if ids is None:  # several boxes of one image (`--boxes` lists): the union of their masks
                foreground = result.mask > 0 if result.mask.ndim == 2 else (result.mask > 0).any(axis=0)
                values = foreground.astype(np.uint8) * (255 if as_png else 1)
            else:  # one label map of the structures: the most probable prompt wins where masks overlap
                values = label_map(result.probabilities[:, 0], ids, result.mask.shape[-2:])
            if result.grid is not None and result.grid != values.shape:
                warnings.warn(
                    f"{path}: mask predicted at {result.grid[1]}x{result.grid[0]} and resized to "
                    f"{values.shape[1]}x{values.shape[0]} (--max-output-pixels)",
                    UserWarning,
                    stacklevel=1,
                )
            if as_png:
                write_png(Image.fromarray(values), targets[0])
            else:  # a 2-D NIfTI / NRRD / MetaImage image: its mask on its grid, in its format
                write_image_mask(values, path, targets[0])
            if args.overlay:
                picture = (
                    image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image).astype(np.uint8))
                )
                shown = dict(boxes=prompt.get("box"), points=prompt.get("points"), labels=prompt.get("labels"))
                overlaid = overlay(picture, values, **shown, class_colours=ids is not None)  # with its prompts
                write_png(overlaid, targets[1])
        except (ValueError, RuntimeError) as error:  # RuntimeError: an accelerated backend failed, and says so
            skip(path, error, failures)
        except OSError as error:
            message = (
                f"{path}: cannot write {getattr(error, 'filename', None) or targets[0]} ({error.strerror or error})"
            )
            failures.append(message)
            print(f"failed {message}", file=sys.stderr)
    done = len(plan) - len(failures)
    print(
        f"{done} of {len(plan)} images segmented into {args.out}" + (f"; {len(failures)} failed:" if failures else "")
    )
    for message in failures:
        print(f"  {message}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def segment_by_window(model, hu: np.ndarray, boxes: list, windows: list[tuple[float, float]], **options) -> Any:
    """The lesions of one CT slice in HU (`boxes`, one each), each segmented on the slice windowed as it was read
    (`windows`, one `(level, width)` per box: DeepLesion's lung nodule in the lung window, the liver lesion beside it
    in the soft-tissue one): one `segment` call per window, the masks and probabilities back in the boxes' order;
    `classes` in `options` (one per box: --classes) goes with its boxes."""
    classes = options.pop("classes", None)
    order, parts = [], []
    for window in dict.fromkeys(windows):
        chosen = [index for index, own in enumerate(windows) if own == window]
        own = None if classes is None else [classes[index] for index in chosen]
        grey = to_uint8(hu, window)
        parts.append(segment(model, grey, box=[boxes[index] for index in chosen], classes=own, **options))
        order.extend(chosen)
    back = np.argsort(order)
    return dataclasses.replace(
        parts[0],
        mask=np.concatenate([part.mask for part in parts])[back],
        probabilities=np.concatenate([part.probabilities for part in parts])[back],
    )


def skip(path: Path, error: BaseException, failures: list[str]) -> None:
    """An input that failed: its message (naming the input once) kept for the summary and printed as skipped."""
    message = flag_message(error)
    message = message if str(path) in message else f"{path}: {message}"
    failures.append(message)
    print(f"skipped {message}", file=sys.stderr)


def write_png(image: Image.Image, target: Path) -> None:
    """A PNG written atomically (stale temporaries of an earlier killed write removed first)."""
    remove_stale_temporaries(target)
    atomic_write(target, lambda temporary: image.save(temporary, format="PNG"))


def write_json(value: Any, target: Path) -> None:
    """A JSON file written atomically (stale temporaries of an earlier killed write removed first), as `write_png`."""
    text = json.dumps(value, indent=1)
    remove_stale_temporaries(target)
    atomic_write(target, lambda temporary: Path(temporary).write_text(text))


def volume_suffixes(args) -> tuple[str, ...]:
    """What `imedsam predict` writes for each volume: its label volume, then its montage (`--overlay`), its
    structures' volumes and intensities (`--statistics`), its DICOM Segmentation (`--dicom-seg`) and its RT Structure
    Set (`--dicom-rtstruct`)."""
    return (
        (".nii.gz",)
        + (("_overlay.png",) if args.overlay else ())
        + (("_statistics.json",) if args.statistics else ())
        + (("_seg.dcm",) if args.dicom_seg else ())
        + (("_rtstruct.dcm",) if args.dicom_rtstruct else ())
    )


def structure_names(config: Any, label_folder: str | None) -> dict[int, str]:
    """The names `--statistics` keys structures by: a class-aware model's `id2label`; else the names of the
    `--boxes-from-masks` folder of label volumes (`data.folder_class_names`: BTCV's `classes.json`, an nnU-Net
    `dataset.json`), when it has them; else none (and a scan prompted by a DICOM SEG or RTSTRUCT names them as its
    segments or ROIs, one whose label volume is renumbered by name as its own names: `predict_volumes`)."""
    if is_class_aware(config):
        return structure_names_of(config)
    try:
        return (folder_class_names(label_folder) if label_folder else None) or {}
    except ValueError:
        return {}


def predict_volumes(
    model, processor, plan, args, boxes: dict[str, VolumeBoxes] | None, corrections: dict | None = None
) -> int:
    """One label volume per scan (uint8 class ids on the scan's grid), written atomically, and with `--overlay` a
    montage PNG of its slices (`volumes.volume_overlay`); failures named. With `corrections` (`correction_clicks`),
    the labels (`--previous`'s, else the prompt's answer, else none) corrected where the clicks disagree
    (`volumes.refine_volume`)."""
    failures = []
    # The structures' names, written into every label volume (a NIfTI's label table, a .seg.nrrd's segments) and the
    # statistics and DICOM outputs.
    names = structure_names(model.config, args.boxes_from_masks)
    for path, planned in plan.items():
        targets = dict(zip(volume_suffixes(args), planned))
        name = volume_name(path)
        try:
            volume = read_volume(path, args.channel)
            prompts: dict[str, Any] = {"prompts_given": [] if args.overlay else None}
            refinement = None
            names_here = names
            previous = previous_labels_of(path, args.previous) if args.previous is not None else None
            previous_names = label_volume_class_names(previous) if previous is not None else None
            if not names and previous_names:  # a binary model: the names the labels corrected carry
                names_here = previous_names
            if boxes is None and args.boxes_from_masks is None:
                pass  # --corrections alone: they correct --previous's labels, or start from none
            elif boxes is None:
                found = label_volume_of(path, args.boxes_from_masks, args.label_suffix)
                if found is None:
                    looked = label_volume_names(path, args.boxes_from_masks, args.label_suffix)
                    raise ValueError(f"no label volume {looked} in {args.boxes_from_masks}")
                prompts["label_volume"] = read_label_volume(found, volume, structure_names_of(model.config))
                if not names and dicom_annotation_modality(found):  # its structures' ids: their numbers
                    names_here = dicom_structure_names(found)
                elif not names:  # a binary model: the names the label volume carries (TotalSegmentator's)
                    names_here = embedded_label_names(found) or names
                # Numbered otherwise than the model's classes (AMOS, TotalSegmentator): each decoded by the class of
                # its name, its ids kept, and named by its own folder's names.
                prompts["label_classes"] = named_label_ids(
                    found, prompts["label_volume"].data, structure_names_of(model.config)
                )
                if prompts["label_classes"] is not None:
                    names_here = label_volume_class_names(found)
            else:
                prompts["boxes_3d"], prompts["key_slices"] = boxes[name]
                prompts["propagation"] = args.propagation or "stop"
                prompts["confine"] = not args.no_confine
            # Windowed once, for the model and the overlay alike (8-bit: segment_volume takes it as it is).
            window = resolve_window(volume.data, args.window, model.config, str(path), volume.modality)
            if window is not args.window:
                if volume.modality == "MR":
                    how = f"an MR scan (its header says so): scaled with {window_text(window)}"
                else:
                    how = f"not 8-bit: windowed with the model's training window, {window_text(window)}"
                print(f"{path}: {how}; --window overrides")
            grey = dataclasses.replace(volume, data=to_uint8(volume.data, window))
            if args.plane == "axial":  # prompts drawn on resliced slices: the montage shows the labels only
                prompts["prompts_given"] = None
            if previous is not None:  # the labels the clicks correct, on the scan's grid
                labels = check_label_volume(
                    read_label_volume(previous, volume, structure_names_of(model.config)), volume, compare_affines=True
                )
            elif boxes is not None or args.boxes_from_masks is not None:
                labels = segment_volume(
                    model, grey, processor=processor, progress=True, tta=args.tta, plane=args.plane, **prompts
                )
            else:
                labels = np.zeros(volume.shape, dtype=np.uint8)
            if corrections is not None:
                # The structures clicks may name: the model's, else those of the labels they correct.
                click_names = previous_names or structure_names(model.config, args.boxes_from_masks)
                if is_class_aware(model.config):
                    click_names = structure_names_of(model.config)
                refinement = refine_volume(
                    model, grey, labels, click_labels(corrections[name], volume, click_names or None),
                    boxes_3d=prompts.get("boxes_3d"), processor=processor, tta=args.tta, plane=args.plane,
                )  # fmt: skip
                labels = refinement.labels
                print(f"{path}: {refinement_text(refinement)}")
            # In the scan's format (plan_outputs), its structures named: a NIfTI's label table (TotalSegmentator's), a
            # NRRD scan's as a 3D Slicer segmentation.
            written = write_label_volume(labels, volume, targets[".nii.gz"], names_here)
            print(f"{path}: {int((labels > 0).sum())} labelled voxels -> {written}")
            if args.statistics:
                write_json(label_statistics(labels, volume, names_here), targets["_statistics.json"])
            if args.dicom_seg:
                write_dicom_seg(labels, volume, targets["_seg.dcm"], names_here, Path(args.model).name)
            if args.dicom_rtstruct:
                write_rtstruct(labels, volume, targets["_rtstruct.dcm"], names_here, Path(args.model).name)
            if args.overlay:  # a montage of slices: the labels in their colours, the truth outlined, the boxes
                truth = prompts.get("label_volume")
                picture = volume_overlay(
                    grey.data, labels, truth=None if truth is None else truth.data, prompts=prompts["prompts_given"],
                    affine=volume.affine, clicks=None if refinement is None else [e.click for e in refinement.edits],
                )  # fmt: skip
                write_png(picture, targets["_overlay.png"])
        except (OSError, ValueError, ImportError) as error:  # ImportError: a NRRD label volume in a case folder
            skip(path, error, failures)
    print(f"{len(plan) - len(failures)} of {len(plan)} volumes segmented into {args.out}")
    if len(failures) < len(plan):
        described = describe_bids_derivative(args.out, args.model)
        if described is not None:
            print(f"{described}: this derivative data set's description (BIDS)")
    return EXIT_SOME_FAILED if failures else EXIT_OK


# What a challenge case does not take: it carries its boxes, its images are 8-bit, its masks are on its own grid.
NPZ_REFUSED = {
    "--box": "box", "--boxes": "boxes", "--boxes-from-masks": "boxes_from_masks", "--points": "points",
    "--points-from-masks": "points_from_masks", "--no-prompt": "no_prompt", "--window": "window",
    "--output-size": "output_size", "--classes": "classes", "--overlay": "overlay", "--statistics": "statistics",
    "--dicom-seg": "dicom_seg", "--dicom-rtstruct": "dicom_rtstruct", "--channel": "channel",
    "--rescale-intercept": "rescale_intercept", "--label-suffix": "label_suffix",
}  # fmt: skip


def npz_cases_in(raw: str) -> list[Path]:
    """The challenge cases (`.npz`, hidden files skipped) of a folder that holds no image or NIfTI volume; none for a
    file or another folder."""
    folder = Path(raw)
    if not folder.is_dir() or volumes_in(folder):
        return []
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(map(is_image_file, files)):
        return []
    return sorted(p for p in files if p.suffix.lower() == ".npz")


def predict_npz(args: argparse.Namespace, device: str | None) -> int:
    """
    `imedsam predict CASE.npz ...`: cases in the `.npz` form of the CVPR 2024 "MedSAM on laptop" challenge
    (`imgs`, `boxes`: LiteMedSAM's own data) or of the CVPR 2025 interactive 3-D challenge (`boxes` a list of dicts,
    and in its refinement rounds `clicks` with the round before's `prev_pred`, corrected where a click disagrees:
    `volumes.read_npz_case`, `volumes.refine_with_clicks`) -> `<out>/<name>.npz` with `segs`
    (`volumes.segment_npz_case`), each written atomically; a case that cannot be read or segmented is skipped and
    named.
    """
    made = False
    try:
        others = [raw for raw in args.inputs if Path(raw).suffix.lower() != ".npz" and not npz_cases_in(raw)]
        if others:
            raise ValueError(f"{others[0]}: .npz cases and images or volumes go in separate calls.")
        missing = [raw for raw in args.inputs if not Path(raw).exists()]
        if missing:
            raise ValueError(f"{missing[0]}: no such file.")
        cases = [str(p) for raw in args.inputs for p in (npz_cases_in(raw) or [Path(raw)])]
        if args.corrections is not None or args.previous is not None:
            raise ValueError(
                f"{'--corrections' if args.corrections is not None else '--previous'}: a .npz case carries its clicks "
                "(`clicks`) and the labels they correct (`prev_pred`); give them in the case."
            )
        given = [flag for flag, key in NPZ_REFUSED.items() if getattr(args, key, None)]
        if given:
            raise ValueError(
                f"{given[0]}: a .npz case carries its own boxes (`boxes`) and 8-bit `imgs`, and its `segs` are written "
                "on its own grid; give no prompt, window, size or overlay flag."
            )
        check_output_folder(args.out, args.inputs)
        plan = plan_outputs(cases, args.out, (".npz",))
        refuse_existing([t for targets in plan.values() for t in targets], args.out, args.overwrite)
        require_backend(args.backend, args.precision)
        made = not Path(args.out).exists()
        check_writable(args.out)
        model, processor = load_model(
            args.model, device=device, backend=args.backend, backend_options={"precision": args.precision}
        )
        if is_class_aware(model.config):
            raise ValueError(f"--model {args.model}: {NPZ_CLASS_AWARE}.")
    except (OSError, ValueError, ImportError) as error:
        if made and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()
        return fail(error)
    failures = []
    for path, targets in plan.items():
        try:
            case = read_npz_case(path)
            segs = segment_npz_case(
                model, case.imgs, case.boxes, processor=processor, tta=args.tta, key_slices=case.key_slices,
                clicks=case.clicks, previous=case.previous,
            )  # fmt: skip
            atomic_write(targets[0], functools.partial(_save_segs, segs=segs))
            prompts = f"{len(case.boxes)} boxes" if case.boxes is not None else "no boxes"
            if case.clicks is not None:
                prompts += f", {sum(map(len, case.clicks.values()))} clicks"
            print(f"{path}: {prompts}, {int((segs > 0).sum())} labelled pixels -> {targets[0]}")
        except (OSError, ValueError) as error:
            skip(path, error, failures)
    print(f"{len(plan) - len(failures)} of {len(plan)} cases segmented into {args.out}")
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _save_segs(path: str, *, segs: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would add .npz to a path's name
        np.savez_compressed(handle, segs=segs)


__all__ = [
    "PromptSource",
    "image_boxes",
    "masks_hold_class_ids",
    "predict_images",
    "predict_npz",
    "predict_volumes",
    "run",
    "volume_boxes",
]
