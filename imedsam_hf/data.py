"""Segmentation datasets (local folders and Hub datasets), reproducible splits, augmentation and box prompts.

Folder layouts found automatically under `data_dir`:
- `images/` + `masks/` (Kvasir-SEG, EndoTect, PH2 as shipped here), or `image/` + `mask/` (PraNet's
  `TrainDataset/`, `TestDataset/<name>/`); masks share the image's stem, any extension;
- masks hold 0/255, 0/1 (any one non-zero value is the foreground) or class ids 0..C (0 = background); palette
  PNGs are read by index; `mask_values` maps other encodings to class ids. A binary reading of a mask with more
  values is an error naming the file and its values, never a guess (see `read_mask`).

Every pair is opened once before training: an unreadable file, a missing mask, a mask whose size differs
from its image or two files of one stem are reported with their paths, and either skipped (`on_error="skip"`) or
fatal (`"fail"`), so a run never crashes halfway through an epoch. A mask whose values do not fit the classes it
is read with is always fatal: the whole folder is likely encoded that way, and skipping would hide it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import itertools
import json
import math
import os
import random
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import staged_folder
from .processing_imedsam import (
    DICOM_EXTENSIONS,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    IMedSamProcessor,
    describe,
    dicom_kind,
    dicom_mask_pixels,
    hu_windowed,
    image_size,
    is_dicom_file,
    is_dicom_path,
    is_grid_image,
    opened_image,
    read_grid_image,
    to_rgb_array,
)

PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
#: 2-D image files: pictures, and DICOM images (`processing_imedsam.read_dicom_image`: a radiograph, a mammogram, ...).
IMAGE_EXTENSIONS = (*PICTURE_EXTENSIONS, *DICOM_EXTENSIONS)
#: The 2-D image files read, as messages list them (:func:`is_image_file`).
IMAGE_KINDS = f"{', '.join(IMAGE_EXTENSIONS)}; 2-D .nii.gz, .nrrd, .mha"
#: What a label volume is written as, by its scan's format: ITK's formats keep theirs (a detached header's attached;
#: a NRRD scan's labels as a 3D Slicer segmentation, which Slicer opens with its structures named), anything else
#: (NIfTI, DICOM, an array) gives NIfTI.
LABEL_VOLUME_SUFFIXES = {".nrrd": ".seg.nrrd", ".nhdr": ".seg.nrrd", ".mha": ".mha", ".mhd": ".mha"}


def is_volume(path: str | os.PathLike) -> bool:
    """A 3-D image file: named NIfTI (`.nii`, `.nii.gz`), NRRD (`.nrrd`, `.seg.nrrd`, `.nhdr`) or MetaImage (`.mha`,
    `.mhd`), and not a 2-D image stored so (`processing_imedsam.is_grid_image`, its header read: grand-challenge's 2-D
    `.mha`, which is an image)."""
    return str(path).lower().endswith(VOLUME_SUFFIXES) and not is_grid_image(path)


def is_image_file(path: str | os.PathLike) -> bool:
    """A 2-D image file by its name (:data:`IMAGE_EXTENSIONS`: pictures, `.dcm`) or, in a NIfTI / NRRD / MetaImage
    file, by its header (`processing_imedsam.is_grid_image`)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS) or is_grid_image(path)


def is_itk_volume(path: str | os.PathLike) -> bool:
    """A NRRD or MetaImage file name (:data:`ITK_SUFFIXES`), which SimpleITK reads."""
    return str(path).lower().endswith(ITK_SUFFIXES)


def volume_suffix(path: str | os.PathLike) -> str:
    """The 3-D file name's extension as :data:`VOLUME_SUFFIXES` spells it (`.seg.nrrd`, `.nii.gz`), or ``""``."""
    lower = str(path).lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if lower.endswith(suffix)), "")


def volume_stem(path: str | os.PathLike) -> str:
    """A 3-D file's name without its extension: `case0001.nii.gz`, `case0001.seg.nrrd` -> `case0001`."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def label_volume_suffix(scan: str | os.PathLike) -> str:
    """The extension of the label volume written for `scan`: its own ITK format (:data:`LABEL_VOLUME_SUFFIXES`, as
    nnU-Net writes predictions in its data set's format), else `.nii.gz`."""
    return LABEL_VOLUME_SUFFIXES.get(volume_suffix(scan), ".nii.gz")


def image_mask_suffix(image: str | os.PathLike) -> str:
    """The extension of the mask written for a 2-D image: `.png`, or a 2-D NIfTI / NRRD / MetaImage image's own
    (`processing_imedsam.is_grid_image`; a detached header's attached: `.mhd` gives `.mha`, `.nhdr` `.nrrd`), so that
    the mask keeps its image's spacing and geometry (`volumes.write_image_mask`)."""
    if not is_grid_image(image):
        return ".png"
    suffix = volume_suffix(image)
    return {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix, suffix)


def image_files_in(folder: str | os.PathLike, dicom_below: bool = False) -> list[Path]:
    """
    The 2-D images directly in `folder`, sorted: pictures (:data:`PICTURE_EXTENSIONS`), 2-D images in NIfTI / NRRD /
    MetaImage files (`processing_imedsam.is_grid_image`; 3-D ones are scans) and DICOM images (named
    `.dcm`/`.dicom`, or of another name with the ``DICM`` preamble) that are neither slices of a scan (those make a
    series, read as one volume) nor objects without an image, such as a DICOM SEG (`dicom_kind`). Hidden files
    (macOS's `._x.png`) and files derived from an image (ISIC 2017's `x_superpixels.png`: :func:`derived_stems`) are
    not images. `dicom_below`: DICOM images in the folders below too, at any depth (a DICOM export's patient / study /
    series folders of radiographs); pictures are read from `folder` itself only (a `masks/` folder beside the images
    is no input).
    """
    found = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith(".")) if dicom_below else []
        top = Path(root) == Path(folder)
        for name in sorted(names):
            path, lower = Path(root) / name, name.lower()
            if lower.startswith(".") or lower.endswith((".npz", ".json")):
                continue
            if lower.endswith(VOLUME_SUFFIXES):
                if top and is_grid_image(path):
                    found.append(path)
            elif lower.endswith(PICTURE_EXTENSIONS):
                if top:
                    found.append(path)
            elif is_dicom_path(path) and dicom_kind(path) == "image":
                found.append(path)
    derived = derived_stems({image_stem(path) for path in found})
    return sorted(path for path in found if image_stem(path) not in derived)


def derived_stems(stems: Iterable[str]) -> set[str]:
    """The stems of files a data set keeps beside an image that are neither inputs nor masks (:data:`DERIVED_SUFFIXES`:
    ISIC 2017's `ISIC_0000000_superpixels.png` beside `ISIC_0000000.jpg`): not listed as images."""
    stems = set(stems)
    return {s for s in stems for end in DERIVED_SUFFIXES if s.endswith(end) and s[: -len(end)] in stems}


def image_stem(path: str | os.PathLike) -> str:
    """An image file's name without its extension, which its outputs, masks and `--boxes` entries are named after; a
    DICOM file not named `.dcm` keeps its whole name (`IM0001`, or its UID: the last number of `1.2.840.5.4` is no
    extension); a NIfTI / NRRD / MetaImage file loses its whole extension (`x.nii.gz` -> `x`)."""
    path = Path(path)
    if path.name.lower().endswith(VOLUME_SUFFIXES):  # a 2-D image in a NIfTI file: `x.nii.gz` -> `x`
        return volume_stem(path)
    if not path.name.lower().endswith(IMAGE_EXTENSIONS) and is_dicom_file(path):
        return path.name
    return path.stem


def volumes_in(folder: str | os.PathLike, scans: bool = False) -> list[Path]:
    """The 3-D files of `folder` (:func:`is_volume`), sorted; hidden ones (MSD archives' `._case.nii.gz` AppleDouble
    copies) are not volumes, nor are 2-D images stored so. `scans`: without 3D Slicer's segmentations (`.seg.nrrd`),
    which a scene saved by Slicer keeps beside its scan."""
    found = (p for p in Path(folder).iterdir() if is_volume(p) and not p.name.startswith(".") and p.is_file())
    return sorted(p for p in found if not (scans and volume_suffix(p) == ".seg.nrrd"))


# Image and mask sub-folders, matched without regard to case (`Images/` + `Masks/`); CVC-ClinicDB's are last.
LAYOUTS = (
    ("images", "masks"),
    ("image", "mask"),
    ("TrainDataset/images", "TrainDataset/masks"),
    ("Original", "Ground Truth"),
    ("imagesTr", "labelsTr"),  # nnU-Net's 2-D data sets: `imagesTr/<case>_0000.png`, `labelsTr/<case>.png`
)
SPLITS = ("train", "validation", "test")
ALL_CLASSES = -1  # a sample's class id when it carries every class of its image as a prompt
# PIL formats whose pixel values are stored exactly; a mask in any other (JPEG, WebP) or an array of unknown origin
# may carry compression noise around its edges.
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "GIF", "PPM", "TGA")


@dataclass
class DataProblem:
    """A pair that cannot be used, with the file to look at. `fatal`: stops a run whatever `on_error` says."""

    path: str
    reason: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class SegmentationPair:
    stem: str
    image: str
    mask: str


@dataclass
class AugmentationConfig:
    """Geometric and photometric augmentation of I-MedSAM's recipe (method.md section 2)."""

    rotation: float = 20.0  # degrees, uniform in [-r, r]
    scale: tuple[float, float] = (0.8, 1.2)
    shear: float = 10.0  # degrees
    translate: float = 0.1  # fraction of the side
    horizontal_flip: float = 0.5
    vertical_flip: float = 0.5
    brightness: float = 0.2  # multiplicative, uniform in [1 - b, 1 + b]
    contrast: float = 0.2
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_probability: float = 0.2
    noise_std: float = 8.0  # on 0-255 values


@dataclass
class DataConfig:
    """How samples are made from pairs."""

    num_classes: int = 1
    augment: AugmentationConfig | None = field(default_factory=AugmentationConfig)
    box_jitter: float = 0.1  # each box side moves by up to this fraction of the box size (training only)
    # The share of training boxes that are jittered; the others stay exact (1.0: all), so that a model trained for
    # imperfect boxes still sees tight ones.
    box_jitter_probability: float = 1.0
    prompt: str = "box"  # "box" or "none"
    # Multi-class masks with one box per class present: one binary sample per (image, class), prompted with that
    # class's box (the model has one output channel; the box says which structure). `mask_classes` is the number
    # of foreground class ids in the masks (default `num_classes`).
    class_prompts: bool = False
    mask_classes: int | None = None
    # With `class_prompts`: one sample per image carrying every class present as a prompt (`input_boxes` (P, 4),
    # `prompt_classes` (P,)): one encoder pass per image, the loss averaged over the prompts.
    all_classes_per_sample: bool = False
    # With `all_classes_per_sample`, in training: at most this many of an image's structures are prompts of its
    # sample (None: all), drawn without replacement with weights inversely proportional to how many training images
    # hold each class, so that rare structures (adrenal glands, the portal vein) get their share of the steps.
    max_prompts_per_sample: int | None = None
    # Stored mask value -> class id, for masks in another encoding (`read_mask`); None: 0/255, 0/1 or class ids.
    mask_values: dict[int, int] | None = None
    # > 0: each training sample (one prompt per sample) also carries 1..max_clicks random positive clicks inside its
    # structure, `input_points` (max_clicks, 2) in frame pixels and `input_labels` (max_clicks,), -10 marking unused
    # slots (SAM's padding); a click-prompted training step uses them instead of the box (`click_probability`).
    max_clicks: int = 0
    # Training only, on the slices of volumes (stems ending in the slice number, scans told apart by
    # `group_pattern`): with this probability a sample's boxes come from the same structure on a slice up to
    # `neighbour_box_distance` away in the same scan, widened by `neighbour_box_margin` pixels: the boxes that 3-D
    # propagation (`segment_volume(boxes_3d=...)`: the previous slice's mask's box plus 3 px) gives. Such a sample
    # keeps only the photometric augmentation (the neighbour's box is in the stored frame); a structure absent from
    # the neighbour (or a neighbour not in the data) keeps its own, jittered box.
    neighbour_box_probability: float = 0.0
    neighbour_box_distance: int = 2
    neighbour_box_margin: float = 3.0
    # Then each side of a neighbour box moves by up to this fraction of the box's size, either way (0: none): the
    # boxes propagation takes from its own imperfect masks, which grow onto neighbouring structures or shrink.
    neighbour_box_jitter: float = 0.0
    # Training only, on the slices of volumes, as the neighbour boxes (and drawn after them: a sample takes one or the
    # other, `neighbour_box_probability + extent_box_probability <= 1`): with this probability a sample's boxes are
    # each structure's in-plane extent over its scan (the union of its boxes on the scan's slices of this data set),
    # the box a 3-D box (`segment_volume(boxes_3d=...)`) prompts its middle slice with: loose for a structure that
    # winds or leans through the scan (aorta, esophagus, portal vein), so the model learns to find it inside.
    extent_box_probability: float = 0.0
    # Training only, drawn after the neighbour and extent boxes (the three probabilities add up to at most 1): with
    # this probability a sample's boxes are ones a model was prompted with when it segmented the sample's scan with a
    # 3-D box or a key slice (`propagated_boxes`: `{stem: {class id: [box, ...]}}` in stored pixels, one drawn per
    # structure; a structure without one keeps its own, jittered box): the drifted boxes of a propagation chain, so
    # that the model learns to come back to the structure from them.
    propagated_box_probability: float = 0.0
    propagated_boxes: dict[str, dict[int, list[list[float]]]] | None = None
    group_pattern: str | None = None
    # The window the training images were made with, as the model records it (`[level, width]` in HU, "mr" or None):
    # images still in Hounsfield units (2-D CT `.mha` / `.nii.gz`) are windowed with it (`processing_imedsam.
    # hu_windowed`), as `imedsam predict` windows them; 8-bit images, and any with "mr" or None, as they are.
    window: Sequence[float] | str | None = None
    # 16-bit pictures storing CT as HU minus this (DeepLesion's PNGs: -32768; `processing_imedsam.stored_hu`): read as
    # HU and windowed with `window` (a CT window, then needed), whatever their range. None: pictures as they are.
    rescale_intercept: float | None = None

    @property
    def mask_class_count(self) -> int:
        return self.mask_classes or self.num_classes


def class_prompting(
    class_prompts: bool | None,
    mask_classes: int | None,
    class_names: Mapping[int, str] | None,
    one_prompt_per_class: bool,
) -> tuple[bool, int | None]:
    """`(class_prompts, mask_classes)` as training and evaluation read class-id masks, one rule for both:
    `class_prompts` None is true for class-id masks (the data names its classes, a `classes.json` beside `masks/` or
    a dataset's `id2label.json`, or `mask_classes` is given) when the model takes one prompt per class
    (`one_prompt_per_class`: a one-class model, or class-aware prompts); with class prompts, `mask_classes` None is
    the largest id the data names. A ValueError for class prompts without any class count."""
    if class_prompts is None:
        class_prompts = (class_names is not None or mask_classes is not None) and one_prompt_per_class
    if class_prompts and mask_classes is None:
        if not class_names:
            raise ValueError("class prompts need the masks' class count: set `mask_classes` or add classes.json.")
        mask_classes = max(class_names)
    return bool(class_prompts), mask_classes


def find_layout(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The image and mask folders of a dataset folder, or a ValueError listing the layouts looked for."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"`data_dir` {root}: no such folder.")
    for images, masks in LAYOUTS:
        image_dir, mask_dir = _sub_folder(root, images), _sub_folder(root, masks)
        if image_dir is not None and mask_dir is not None:
            return image_dir, mask_dir
    named = _named_pair(root)
    if named is not None:
        return named
    looked = ", ".join(f"{i}/ + {m}/" for i, m in LAYOUTS)
    raise ValueError(
        f"`data_dir` {root}: no image/mask folders found (looked for {looked}, a folder of images named for inputs "
        "beside one named for ground truth, masks kept beside their images (BUSI), or case folders holding either "
        f"(PH2)).{volumes_hint(root)}"
    )


def find_layouts(data_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """
    The `(images, masks)` folders of a dataset folder: :func:`find_layout`'s one pair, or else folders that keep
    their masks beside their images (:func:`masks_beside_images`), each its own images and masks folder: the dataset
    folder itself, or its sub-folders (BUSI's `benign/`, `malignant/`, `normal/`, each holding `benign (1).png`
    beside `benign (1)_mask.png`); or case folders each holding a folder of images named for inputs and one named
    for ground truth (PH2's `IMD002/IMD002_Dermoscopic_Image/` and `IMD002/IMD002_lesion/`). A ValueError listing the
    layouts looked for when there is none.
    """
    try:
        return [find_layout(data_dir)]
    except ValueError:
        root = Path(data_dir)
        if not root.is_dir():
            raise
        cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        stems = _files_by_stem(root)  # listed once: for masks kept beside its images, and the refusal below
        if masks_beside_images(stems)[1]:
            return [(root, root)]
        beside = [folder for folder in cases if masks_beside_images(_files_by_stem(folder))[1]]
        if beside:
            return [(folder, folder) for folder in beside]
        named = [pair for pair in map(_named_pair, cases) if pair is not None]  # PH2's IMD002/IMD002_lesion/
        if named:
            return named
        in_folders = structure_folder_layout(root)  # Montgomery's CXR_png/ beside ManualMask/{leftMask,rightMask}/
        if in_folders:
            raise ValueError(_structure_folders_message(root, in_folders[1])) from None
        suffix = _one_suffix(set(stems), stems, shortest=True)
        if re.fullmatch(r"[_-][A-Za-z][\w-]*", suffix):  # HC18's `000_HC_Annotation.png` beside `000_HC.png`
            raise ValueError(
                f"`data_dir` {root}: its files <image>{suffix} beside their images are not taken for masks "
                f"({suffix!r} names none: {', '.join(sorted(MASK_SUFFIX_WORDS))}). If they are filled masks, name them "
                f"<image>_mask; outlines (HC18's ellipses) must be filled first."
            ) from None
        raise


# Words that name a folder of inputs or of ground-truth masks (ISIC's `ISIC2018_Task1-2_Training_Input/` and
# `ISIC2018_Task1_Training_GroundTruth/`), for `data_dir`s in none of the `LAYOUTS`.
INPUT_WORDS = ("input", "image", "img", "data")  # ISIC 2017's `ISIC-2017_Training_Data/`
# Words of a suffix that names masks kept beside their images (BUSI's `_mask`, CAMUS's `_gt`); other files named
# after an image (ISIC 2017's `ISIC_0000000_superpixels.png` beside `ISIC_0000000.jpg`) are not its mask.
MASK_SUFFIX_WORDS = {"mask", "masks", "gt", "seg", "segmentation", "label", "labels", "lesion", "truth", "manual"}
# What data sets keep beside their images that is neither an input nor a mask: ISIC 2017's superpixel maps.
DERIVED_SUFFIXES = ("_superpixels",)
TRUTH_WORDS = ("groundtruth", "ground truth", "ground_truth", "mask", "label", "segmentation", "_gt", "lesion")
# Words naming a folder of a model's outputs, never taken for the inputs beside a ground-truth folder.
OUTPUT_WORDS = ("pred", "output", "result", "overlay", "prob")
# Words of a folder name (whole words) that hold regions of another kind beside a case's image and mask folders,
# left out of the pairing: PH2's `IMD002_roi/` (its colour-class regions).
REGION_WORDS = {"roi", "rois"}


def _named_pair(root: Path) -> tuple[Path, Path] | None:
    """The one folder of images named for inputs and the one named for ground truth, when `root` holds exactly two
    folders of images (besides folders of regions, PH2's `IMD002_roi/`: :data:`REGION_WORDS`) and their names say
    which is which, or only the truth folder's does and the other's does not name outputs (:data:`OUTPUT_WORDS`:
    `ETIS-LaribPolypDB/` beside `GroundTruth/`); None otherwise (never a guess among more: DRIVE's `images/`,
    `1st_manual/` and `mask/`, its field-of-view masks, are not guessed)."""
    folders = [
        p
        for p in sorted(root.iterdir())
        if p.is_dir()
        and not p.name.startswith(".")
        and not REGION_WORDS & set(re.split(r"[^a-z0-9]+", p.name.lower()))
        and any(is_image_file(f) for f in p.iterdir())
    ]
    if len(folders) != 2:
        return None
    truth = [f for f in folders if any(w in f.name.lower() for w in TRUTH_WORDS)]
    inputs = [f for f in folders if f not in truth and any(w in f.name.lower() for w in INPUT_WORDS)]
    if len(truth) == 1 and not inputs:  # only the truth is named: Shenzhen's `CXR_png/` + `mask/`, ETIS-Larib's
        inputs = [f for f in folders if f not in truth and not any(w in f.name.lower() for w in OUTPUT_WORDS)]
    return (inputs[0], truth[0]) if len(truth) == 1 and len(inputs) == 1 else None


def _sub_folder(root: Path, relative: str) -> Path | None:
    """The folder `relative` (`a/b`) below `root`, each part matched exactly or else without regard to case (one
    match only); None when there is none."""
    folder = root
    for part in Path(relative).parts:
        if (folder / part).is_dir():
            folder = folder / part
            continue
        matches = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == part.lower()]
        if len(matches) != 1:
            return None
        folder = matches[0]
    return folder


#: The folders of MedSAM's NumPy training data (its `npz_to_npy.py`; MedSAM's and LiteMedSAM's `train_one_gpu.py`
#: read them): `imgs/<name>.npy` (an image, `(H, W, 3)`) beside `gts/<name>.npy` (its label ids, `(H, W)`).
NUMPY_PAIR_FOLDERS = ("imgs", "gts")


#: The files of one case of NumPy training data: the challenge's and MedSAM's `.npz` (TransUNet's Synapse slices too,
#: `train_npz/case0005_slice000.npz`), and TransUNet's HDF5 test volumes (`test_vol_h5/case0001.npy.h5`).
NUMPY_CASE_SUFFIXES = (".npz", ".h5")


def numpy_training_files(source: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """LiteMedSAM's and MedSAM's training data as NumPy files in `source` (a file or a folder, searched through):
    `(cases, pairs)`, the `.npz` cases of the CVPR 2024 "MedSAM on laptop" challenge (`imgs` and `gts` inside;
    TransUNet's `image` and `label` slices and `.npy.h5` volumes, :data:`NUMPY_CASE_SUFFIXES`; a case file given
    itself), and the `(imgs/<name>.npy, gts/<name>.npy)` pairs of :data:`NUMPY_PAIR_FOLDERS` (an image
    without its `gts` file left out, as MedSAM's loader leaves it); both sorted, hidden files and folders skipped."""
    source = Path(source)
    if source.is_file():
        return ([source] if source.name.lower().endswith(NUMPY_CASE_SUFFIXES) else []), []
    if not source.is_dir():
        return [], []
    cases, pairs = [], []
    for folder, names, files in os.walk(source):
        names[:] = sorted(n for n in names if not n.startswith("."))
        cases += [Path(folder) / f for f in sorted(files) if f.lower().endswith(NUMPY_CASE_SUFFIXES) and f[0] != "."]
        if Path(folder).name.lower() != NUMPY_PAIR_FOLDERS[0]:
            continue
        truth = [Path(folder).parent / n for n in os.listdir(Path(folder).parent) if n.lower() == NUMPY_PAIR_FOLDERS[1]]
        for name in sorted(f for f in files if f.lower().endswith(".npy") and not f.startswith(".")):
            if truth and (truth[0] / name).is_file():
                pairs.append((Path(folder) / name, truth[0] / name))
    return cases, pairs


def numpy_hint(root: Path) -> str:
    """For LiteMedSAM's or MedSAM's NumPy training data given where images are read (:func:`numpy_training_files`):
    the command that makes them images and masks, or ""."""
    cases, pairs = numpy_training_files(root)
    if not cases and not pairs:
        return ""
    what = f"{len(cases)} .npz / .h5 cases" if cases else f"{len(pairs)} npy image/label pairs (imgs/ + gts/)"
    return (
        f" It holds LiteMedSAM / MedSAM training data as NumPy files ({what}): make them images and masks first: "
        f"imedsam convert npz --images {root} --output DIR."
    )


def volumes_hint(root: Path) -> str:
    """For a folder of 3-D scans given where 2-D images are read (NIfTI files in it or its folders, DICOM series
    below it: CHAOS's `CT/1/DICOM_anon/`, a BIDS data set's `sub-01/anat/`): the command that makes them slices,
    or "" (LiteMedSAM's NumPy cases: :func:`numpy_hint`)."""
    numpy = numpy_hint(root)
    if numpy:
        return numpy
    folders = [root, *(p for p in sorted(root.iterdir()) if p.is_dir())]
    holding = [f for f in folders if any(is_volume(n) for n in os.listdir(f))]
    subjects = [f for f in folders if BIDS_SUBJECT.fullmatch(f.name)]
    if not holding and subjects:  # BIDS: `sub-01/[ses-01/]anat/sub-01_T2w.nii.gz`, masks under `derivatives/`
        command = f"imedsam convert volumes --images {root} --labels {root} --output DIR"
        return (
            f" It is a BIDS data set ({', '.join(f.name for f in subjects[:2])}{', ...' if len(subjects) > 2 else ''})"
            f": make its scans 2-D slices first: {command} (with `scans` '*_T2w.nii.gz' and `label_suffix` "
            "seg-manual to pick a sequence and the masks of derivatives/)."
        )
    if not holding:
        series = _series_folders(root)
        if not series:
            return ""
        listed = ", ".join(map(str, series[:2])) + (", ..." if len(series) > 2 else "")
        command = f"imedsam convert volumes --images {root} --labels {root} --output DIR"
        return f" It holds DICOM series ({listed}): make them 2-D slices first: {command}."
    images = next((f for f in holding if f.name.lower().startswith(("image", "volume", "scan"))), holding[0])
    labels = next((f for f in holding if f.name.lower().startswith(("label", "mask", "seg")) and f != images), None)
    command = f"imedsam convert volumes --images {images} --labels {labels or 'LABELS'} --output DIR"
    return f" It holds 3-D volumes ({', '.join(str(f) for f in holding)}): make them 2-D slices first: {command}."


def _series_folders(root: Path, depth: int = 4, most: int = 3) -> list[Path]:
    """Up to `most` folders at most `depth` levels below `root` holding DICOM slices of a scan (`dicom_kind`
    "slice"; each folder judged by its first file), for a hint."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")) if level < depth else []
        first = next((Path(folder) / name for name in sorted(files) if not name.startswith(".")), None)
        if first is not None and is_dicom_file(first) and dicom_kind(first) == "slice":
            found.append(Path(folder))
            if len(found) == most:
                break
    return found


STRUCTURE_MASK_SUFFIX = re.compile(r"^_(?P<name>.+)_(?P<instance>\d{3})$")


def structure_masks(image_stems: Sequence[str], mask_dir: Path) -> dict[str, dict[str, list[Path]]]:
    """
    The one-mask-per-structure layout (SAM-Med2D's: `masks/<image stem>_<structure>_<NNN>.png`, 0/255 each):
    `{image stem: {structure: [mask files]}}` (several instances `_000`, `_001` of one structure are one class).
    Empty when the folder holds none. A mask matches its image by the longest image stem it starts with.
    """
    stems = sorted(image_stems, key=len, reverse=True)
    found: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        for stem in stems:
            match = path.stem.startswith(stem) and STRUCTURE_MASK_SUFFIX.match(path.stem[len(stem) :])
            if match:
                found.setdefault(stem, {}).setdefault(match["name"], []).append(path)
                break
    return found


def structure_folders(mask_dir: Path, image_stems: Iterable[str]) -> dict[str, dict[str, list[Path]]]:
    """
    The one-folder-per-structure layout (the Montgomery chest X-ray set's `ManualMask/leftMask/MCUCXR_0001_0.png`
    and `rightMask/MCUCXR_0001_0.png`): `{image stem: {structure (its folder's name): [mask files]}}` from the
    sub-folders of `mask_dir` holding masks named like the images. Empty when it holds none.
    """
    stems = set(image_stems)
    found: dict[str, dict[str, list[Path]]] = {}
    for folder in sorted(p for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for stem, paths in _files_by_stem(folder).items():
            if stem in stems:
                found.setdefault(stem, {})[folder.name] = paths
    return found


def _structure_folders_message(data_dir: str | os.PathLike, mask_dir: Path) -> str:
    """The refusal of a data set whose masks are kept in one folder per structure, with the command converting it."""
    names = sorted(p.name for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return (
        f"`data_dir` {data_dir}: {mask_dir} holds one folder of masks per structure ({', '.join(names[:6])}). Convert "
        f"them to class-id masks first: imedsam convert structure-masks --data-dir {data_dir} --output DIR."
    )


def structure_folder_layout(root: Path) -> tuple[Path, Path] | None:
    """The `(images, masks)` folders of a data set whose masks folder holds one folder per structure: `images/` +
    `masks/<structure>/` (`find_layout`'s), or the one folder of images beside one folder of structure folders
    (Montgomery's `CXR_png/` beside `ManualMask/`); None when there is none (or more than one such pair)."""
    with contextlib.suppress(ValueError, OSError):
        image_dir, mask_dir = find_layout(root)
        return (image_dir, mask_dir) if structure_folders(mask_dir, _files_by_stem(image_dir)) else None
    if not root.is_dir():
        return None
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    pictures = {folder: _files_by_stem(folder) for folder in folders}
    found = [
        (images, masks)
        for images in folders
        if pictures[images]
        for masks in folders
        if masks != images and not pictures[masks] and len(structure_folders(masks, pictures[images])) > 0
    ]
    return found[0] if len(found) == 1 else None


def convert_structure_masks(data_dir: str | os.PathLike, output: str | os.PathLike) -> dict[int, str]:
    """
    A folder in a one-mask-per-structure layout -> the class-id layout every command reads: `output/images/` (the
    images, copied), `output/masks/<stem>.png` (uint8 class ids) and `output/classes.json` (ids numbered by the
    structures' sorted names). The layouts: SAM-Med2D's `masks/<image stem>_<structure>_<NNN>.png`
    (:func:`structure_masks`), or one folder of masks per structure (:func:`structure_folders`: Montgomery's
    `ManualMask/leftMask/`, `rightMask/`). Where two structures overlap, the one earlier in that order keeps the
    pixel. Returns `{id: name}`. `output` is written whole or not at all (`files.staged_folder`); nothing is written
    when the folder has neither layout (a `ValueError` says why).
    """
    in_folders = structure_folder_layout(Path(data_dir))
    image_dir, mask_dir = in_folders or find_layout(data_dir)
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    per_image = structure_folders(mask_dir, images) if in_folders else structure_masks(list(images), mask_dir)
    if not per_image:
        raise ValueError(
            f"{mask_dir}: no masks named <image stem>_<structure>_<NNN>.png and no folder of masks per structure (one "
            "mask per structure)."
        )
    names = sorted({name for structures in per_image.values() for name in structures})
    if len(names) > 255:
        raise ValueError(f"{mask_dir}: {len(names)} structures; a uint8 class-id mask holds at most 255.")
    ids = {name: i + 1 for i, name in enumerate(names)}
    with staged_folder(output, "`output`") as out:
        (out / "images").mkdir()
        (out / "masks").mkdir()
        for stem, structures in per_image.items():
            size = image_size(images[stem])
            labels = np.zeros((size[1], size[0]), dtype=np.uint8)
            for name in sorted(structures, key=ids.get, reverse=True):  # earlier names written last: win overlaps
                for path in structures[name]:
                    mask = read_mask(path)
                    if mask.shape != labels.shape:
                        raise ValueError(
                            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[0]}x{size[1]}."
                        )
                    labels[mask > 0] = ids[name]
            shutil.copy(images[stem], out / "images" / images[stem].name)
            Image.fromarray(labels).save(out / "masks" / f"{stem}.png")
        classes = {i: name for name, i in ids.items()}
        (out / "classes.json").write_text(json.dumps({"classes": {str(i): n for i, n in classes.items()}}, indent=1))
    return classes


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """The image files of a folder by stem (:func:`image_stem`), in path order (several when `x.jpg` and `x.png` both
    exist): pictures and DICOM files by their extension, 2-D NIfTI / NRRD / MetaImage files by their header, and DICOM
    files of any other name by their ``DICM`` preamble
    (a DICOM export's `IM0001` or UID-named files). Hidden files (macOS's `._x.png` AppleDouble copies in a folder
    unzipped from a Mac) and files derived from an image (:func:`derived_stems`) are not images."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if is_image_file(path) or is_dicom_file(path):
            found.setdefault(image_stem(path), []).append(path)
    derived = derived_stems(found)
    return {stem: paths for stem, paths in found.items() if stem not in derived}


def _one_suffix(images: set[str], masks: Iterable[str], shortest: bool = False) -> str:
    """The one suffix (from `_` or `-`) the `masks` named after one of `images` add to its stem (the longest image
    stem each extends, or the `shortest`), further masks `<suffix>_<n>` counted as the suffix; `""` for none or two
    unrelated ones."""
    suffixes = set()
    for stem in masks:
        cuts = [i for i, character in enumerate(stem) if character in "_-" and stem[:i] in images]
        if cuts:
            suffixes.add(stem[(min(cuts) if shortest else max(cuts)) :])
    bases = [s for s in suffixes if all(t == s or re.fullmatch(re.escape(s) + r"_\d+", t) for t in suffixes)]
    return bases[0] if len(bases) == 1 else ""


# nnU-Net / Medical Segmentation Decathlon image names carry a channel: `la_003_0000.nii.gz`, its labels `la_003.nii.gz`
# (2-D data sets too: `imagesTr/<case>_0000.png`, `labelsTr/<case>.png`).
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def mask_names(stem: str, suffix: str = "", prefix: str = "") -> list[str]:
    """The stems the mask of the 2-D image `stem` may have, in the order looked for: the image's with its folder's
    mask `suffix` (:func:`mask_name_suffix`) or `prefix` (:func:`mask_name_prefix`), then for nnU-Net's
    `<case>_0000` image the case's (`labelsTr/<case>.png`)."""
    match = CHANNEL_SUFFIX.match(stem)
    return [f"{prefix}{stem}{suffix}"] + ([match["case"]] if match and not suffix and not prefix else [])


def masks_named(folder: str | os.PathLike, stem: str, suffix: str = "", prefix: str = "") -> tuple[str, list[Path]]:
    """The mask files (images by :func:`is_image_file`, not hidden) in `folder` of the first of :func:`mask_names`
    of the image `stem` that has any, and that name; the first name and no files when none has."""
    names = mask_names(stem, suffix, prefix)
    for name in names:
        found = sorted(
            path
            for path in Path(folder).glob(f"{glob.escape(name)}.*")
            if not path.name.startswith(".") and image_stem(path) == name and is_image_file(path)
        )
        if found:
            return name, found
    return names[0], []


def _nnunet_cases(
    images: dict[str, list[Path]], masks: Mapping[str, list[Path]]
) -> tuple[dict[str, list[Path]], list[DataProblem]]:
    """nnU-Net's 2-D images `<case>_0000.png` (masks `<case>.png`) by their case; a case of several channels
    (`_0000`, `_0001`: two inputs of one case) is a problem naming them. `images` as they are unless every stem has a
    channel and some case has a mask."""
    matches = {stem: CHANNEL_SUFFIX.match(stem) for stem in images}
    if not images or not all(matches.values()) or not any(m["case"] in masks for m in matches.values()):
        return images, []
    by_case: dict[str, list[str]] = {}
    for stem, match in matches.items():
        by_case.setdefault(match["case"], []).append(stem)
    cases, problems = {}, []
    for case, stems in by_case.items():
        if len(stems) == 1:
            cases[case] = images[stems[0]]
            continue
        listed = ", ".join(str(images[stem][0].name) for stem in sorted(stems))
        problems.append(
            DataProblem(
                str(images[sorted(stems)[0]][0]),
                f"{len(stems)} channels of case {case} ({listed}): one image a case is read (a colour image is one "
                "file, `_0000`); keep one channel.",
            )
        )
    return cases, problems


def masks_beside_images(stems: Iterable[str]) -> tuple[str, set[str]]:
    """
    A folder keeping masks beside their images (BUSI's `benign (1).png` beside `benign (1)_mask.png`, CAMUS's
    `x_2CH_ED.nii.gz` beside `x_2CH_ED_gt.nii.gz`), by its files' stems: the suffix its masks add to their image's
    stem (:func:`mask_name_suffix`'s conventions; a word of it naming masks, :data:`MASK_SUFFIX_WORDS`) and the stems
    that are masks (further masks, `_mask_1`, included); `("", set())` when no one convention fits.
    """
    stems = set(stems)
    suffix = _one_suffix(stems, stems, shortest=True)  # `x_mask_1` extends `x`, not `x_mask`
    if not MASK_SUFFIX_WORDS & set(re.split(r"[^a-z]+", suffix.lower())):  # ISIC's `x_superpixels.png`: no mask
        return "", set()
    pattern = re.compile(r"(?P<image>.+)" + re.escape(suffix) + r"(_\d+)?")
    masks = {s for s in stems if (match := pattern.fullmatch(s)) and match["image"] in stems} if suffix else set()
    return suffix, masks


def mask_name_suffix(image_stems: Iterable[str], mask_stems: Iterable[str]) -> str:
    """
    What a folder's masks add to their image's stem: `""` when masks are named like their images (or no one
    convention fits), else the one suffix, starting with `_` or `-`, that every mask named after an image adds to
    it: ISIC's `_segmentation`, PH2's `_lesion`, BUSI's `_mask` (whose further masks of one image, `_mask_1`, are
    `extra_masks`). Masks named after no image do not count; two unrelated suffixes are no convention (`""`). A
    masks folder that holds the images too (:func:`masks_beside_images`) has its masks' suffix: a file named like an
    image with a mask of its own beside it is that image, not its mask.
    """
    images, masks = set(image_stems), set(mask_stems)
    if not images & masks:
        return _one_suffix(images, masks)
    beside, _ = masks_beside_images(masks)
    return beside if beside and any(f"{stem}{beside}" in masks for stem in images & masks) else ""


def extra_masks(suffix: str, mask_stems: Iterable[str]) -> dict[str, list[str]]:
    """`{image stem: its further masks, sorted}` under a folder's `suffix` (BUSI's `x_mask_1` beside `x_mask`), in
    one pass over the masks."""
    further: dict[str, list[str]] = {}
    pattern = re.compile(r"(?P<image>.+)" + re.escape(suffix) + r"_\d+")
    for stem in sorted(mask_stems):
        match = pattern.fullmatch(stem)
        if match:
            further.setdefault(match["image"], []).append(stem)
    return further


def mask_name_prefix(image_stems: Iterable[str], mask_stems: Iterable[str]) -> str:
    """
    What a folder's masks put before their image's stem where none is named like an image: the one prefix of up to
    8 letters (and a `_` or `-`) that every mask named after an image starts with, each mask taken with the longest
    image stem it ends with (ETIS-Larib's `GroundTruth/p11.tif` for `ETIS-LaribPolypDB/11.tif`, not `p1` + `1`); `""`
    for none, or two.
    """
    images, masks = set(image_stems), set(mask_stems)
    if images & masks:
        return ""
    prefixes = set()
    for stem in masks:
        cut = next((i for i in range(1, min(len(stem), 10)) if stem[i:] in images), None)
        if cut is not None:
            prefixes.add(stem[:cut])
    found = next(iter(prefixes)) if len(prefixes) == 1 else ""
    return found if re.fullmatch(r"[A-Za-z]{1,8}[_-]?", found) else ""


def mask_naming(image_stems: Iterable[str], mask_stems: Iterable[str]) -> tuple[str, str]:
    """`(suffix, prefix)`: what a folder's masks add after their image's stem (:func:`mask_name_suffix`: ISIC's
    `_segmentation`), else what they put before it (:func:`mask_name_prefix`: ETIS-Larib's `p`); `("", "")` for masks
    named like their images."""
    images, masks = list(image_stems), list(mask_stems)
    suffix = mask_name_suffix(images, masks)
    return suffix, "" if suffix else mask_name_prefix(images, masks)


def mask_folder_naming(image_stems: Iterable[str], mask_dir: str | os.PathLike) -> tuple[str, str]:
    """:func:`mask_naming` of the masks in `mask_dir` (its image files, hidden ones skipped, listed once) for these
    images."""
    return mask_naming(image_stems, _files_by_stem(Path(mask_dir)))


def _folder_pairs(
    data_dir: str | os.PathLike, image_dir: Path, mask_dir: Path
) -> tuple[list[SegmentationPair], list[DataProblem]]:
    """:func:`discover_pairs` in one images folder and its masks folder (the same folder where masks are kept beside
    their images)."""
    masks = _files_by_stem(mask_dir)
    images = masks if image_dir == mask_dir else _files_by_stem(image_dir)  # one listing of a folder holding both
    if image_dir == mask_dir:  # masks kept beside their images (BUSI's class folders, CAMUS)
        (suffix, held), prefix = masks_beside_images(masks), ""
        images = {stem: paths for stem, paths in images.items() if stem not in held}
        masks = {stem: paths for stem, paths in masks.items() if stem in held}
    elif not masks and structure_folders(mask_dir, images):
        raise ValueError(_structure_folders_message(data_dir, mask_dir))
    elif not set(images) & set(masks) and structure_masks(list(images), mask_dir):
        raise ValueError(
            f"`data_dir` {data_dir}: {mask_dir} holds one mask per structure (<image stem>_<structure>_<NNN>.png). "
            f"Convert it to class-id masks first: imedsam convert structure-masks --data-dir {data_dir} --output DIR."
        )
    else:
        suffix, prefix = mask_naming(images, masks)  # ISIC's `x_segmentation.png`, ETIS-Larib's `p1.tif` for `1.tif`
    pairs, problems = [], []
    if prefix:
        masks = {stem[len(prefix) :]: paths for stem, paths in masks.items() if stem.startswith(prefix)}
    elif not suffix and not set(images) & set(masks):  # nnU-Net's `<case>_0000.png` with `<case>.png`
        images, problems = _nnunet_cases(images, masks)
    extras = extra_masks(suffix, masks) if suffix else {}
    if suffix:
        masks = {stem[: -len(suffix)]: paths for stem, paths in masks.items() if stem.endswith(suffix)}
    for stem, paths in images.items():
        candidates = masks.get(stem, [])
        further = extras.get(stem, [])
        if candidates and further:
            problems.append(
                DataProblem(
                    str(paths[0]),
                    f"{len(further) + 1} masks ({stem}{suffix}, {', '.join(further)}): one per lesion; merge them "
                    "into one mask (their union) to use this image.",
                )
            )
        elif not candidates:
            problems.extend(
                DataProblem(str(path), f"no mask named {prefix}{stem}{suffix}.* in {mask_dir}") for path in paths
            )
        elif len(paths) > 1:
            others = ", ".join(str(path) for path in paths[1:])
            problems.append(
                DataProblem(
                    str(paths[0]),
                    f"{others} has the same stem, so both would get the mask {candidates[0]}; neither is used: "
                    "rename or remove all but one.",
                )
            )
        elif len(candidates) > 1:
            listed = ", ".join(str(path) for path in candidates)
            problems.append(DataProblem(str(paths[0]), f"{len(candidates)} masks share its stem ({listed}): keep one."))
        else:
            pairs.append(SegmentationPair(stem, str(paths[0]), str(candidates[0])))
    return pairs, problems


def discover_pairs(data_dir: str | os.PathLike) -> tuple[list[SegmentationPair], list[DataProblem]]:
    """
    Pair every image with the mask of the same stem, or of its stem and the folder's one mask suffix
    (`mask_name_suffix`: ISIC's `x_segmentation.png` for `x.jpg`): one image per mask. Images without a mask, and
    stems that two images (`x.jpg`, `x.png`: one mask for both) or two masks share, are problems naming every file;
    none is used. In the folders of :func:`find_layouts` (BUSI's class folders, masks beside their images), a stem
    two folders share is a problem too.
    """
    layouts = find_layouts(data_dir)
    pairs, problems = [], []
    stems_of: dict[Path, set[str]] = {}
    for image_dir, mask_dir in layouts:
        found, trouble = _folder_pairs(data_dir, image_dir, mask_dir)
        pairs.extend(found)
        problems.extend(trouble)
        stems_of[image_dir] = {pair.stem for pair in found}
    copies = [(a, b) for a, b in itertools.combinations(stems_of, 2) if stems_of[a] and stems_of[a] == stems_of[b]]
    if copies:  # CVC-ClinicDB as Kaggle hands it: PNG/{Original,Ground Truth} beside TIF/{Original,Ground Truth}
        first, second = copies[0]
        one = first.parent if first.parent != Path(data_dir) else first
        raise ValueError(
            f"`data_dir` {data_dir}: {first} and {second} hold the same {len(stems_of[first])} images (copies in two "
            f"formats); give the folder of one of them (e.g. {one})."
        )
    if len(layouts) > 1:  # BUSI's class folders: one stem names one image in the splits
        clashing = {stem for stem, count in Counter(pair.stem for pair in pairs).items() if count > 1}
        problems.extend(
            DataProblem(pair.image, f"another folder of {data_dir} holds an image of this stem; rename one of them.")
            for pair in pairs
            if pair.stem in clashing
        )
        pairs = [pair for pair in pairs if pair.stem not in clashing]
    image_dir = layouts[0][0]
    if not pairs and not problems:
        raise ValueError(
            f"`data_dir` {data_dir}: {image_dir} holds no images ({IMAGE_KINDS})." + volumes_hint(Path(data_dir))
        )
    return pairs, problems


def class_id_of(value: str | int, class_names: Mapping[int, str], argument: str) -> int:
    """
    A class given by id or by name -> its id among `class_names` `{id: name}`: a whole number that is one of the ids,
    or a name (case, spaces and underscores ignored: `right kidney`, `Right_Kidney`; else the same words, as
    `structure_words` reads them: `kidney_right`, TG-263's `Kidney_R`, `IVC`). Anything else is a ValueError that
    starts with `argument` (`` "`classes`" ``: the Python argument, which the command line shows as its flag) and
    lists the classes.
    """
    text = str(value).strip()
    if text.isdigit() and int(text) in class_names:
        return int(text)
    key = lambda name: re.sub(r"[\s_]+", " ", str(name)).strip().lower()  # noqa: E731
    found = [i for i, name in class_names.items() if key(name) == key(text)]
    if not found and text:
        found = [i for i, name in class_names.items() if structure_words(name) == structure_words(text)]
    if len(found) != 1:
        listed = ", ".join(f"{i} {name}" for i, name in sorted(class_names.items()))
        raise ValueError(f"{argument} {value!r}: not one of the classes ({listed}).")
    return found[0]


def read_class_names(data_dir: str | os.PathLike) -> dict[int, str] | None:
    """
    The class names of a multi-class folder, from its `classes.json`, or `id2label.json` (transformers'
    semantic-segmentation convention), or an nnU-Net / MSD `dataset.json` (`class_file`, `read_class_file`). None
    when the folder has none.
    """
    path = class_file(data_dir)
    return None if path is None else read_class_file(path)


#: Words of structure names written short, as radiotherapy's standard names (AAPM TG-263: `Kidney_R`,
#: `Glnd_Adrenal_L`) and clinicians write them.
STRUCTURE_ABBREVIATIONS = {"r": "right", "rt": "right", "l": "left", "lt": "left", "glnd": "gland"}
#: Whole names of a structure that share no words with its usual name: TG-263's vessels, `IVC`, AMOS's names
#: (``gall bladder``, ``postcava``, its spelling ``arota``) and the short names of MONAI's BTCV ``dataset_0.json``
#: (not its ``rad`` / ``lad``, which elsewhere name a coronary artery: its adrenal glands are left out, with a warning).
STRUCTURE_ALIASES = {
    frozenset({"a", "aorta"}): frozenset({"aorta"}),
    frozenset({"v", "venacava", "i"}): frozenset({"inferior", "vena", "cava"}),
    frozenset({"ivc"}): frozenset({"inferior", "vena", "cava"}),
    frozenset({"postcava"}): frozenset({"inferior", "vena", "cava"}),
    frozenset({"arota"}): frozenset({"aorta"}),
    frozenset({"gall", "bladder"}): frozenset({"gallbladder"}),
    frozenset({"gall"}): frozenset({"gallbladder"}),
    frozenset({"rkid"}): frozenset({"right", "kidney"}),
    frozenset({"lkid"}): frozenset({"left", "kidney"}),
    frozenset({"eso"}): frozenset({"esophagus"}),
    frozenset({"sto"}): frozenset({"stomach"}),
    frozenset({"veins"}): frozenset({"portal", "vein", "and", "splenic"}),
    frozenset({"leftkidney"}): frozenset({"left", "kidney"}),  # 3D-IRCADb's folder names, run together
    frozenset({"rightkidney"}): frozenset({"right", "kidney"}),
    frozenset({"venacava"}): frozenset({"inferior", "vena", "cava"}),
    frozenset({"portalvein"}): frozenset({"portal", "vein", "and", "splenic"}),  # BTCV's class holds the portal vein
    frozenset({"portal", "vein"}): frozenset({"portal", "vein", "and", "splenic"}),
}


def structure_words(name: str) -> frozenset[str]:
    """A structure's name as its words, so that `kidney_right` (TotalSegmentator's) and `Kidney_R` (TG-263's) name
    `right kidney`, and `A_Aorta` the aorta (:data:`STRUCTURE_ABBREVIATIONS`, :data:`STRUCTURE_ALIASES`)."""
    words = frozenset(
        STRUCTURE_ABBREVIATIONS.get(word, word) for word in re.split(r"[^a-z0-9]+", str(name).lower()) if word
    )
    return STRUCTURE_ALIASES.get(words, words)


def classes_by_name(names: Mapping[int, str], class_names: Mapping[int, str]) -> dict[int, int]:
    """`{number: class id}` of each of `names` (`{number: name}`) whose words (`structure_words`) are those of a class
    of `class_names`, in the order of `names`; the others left out. The one name matcher of label volumes, DICOM SEG
    segments and RTSTRUCT ROIs."""
    by_words = {structure_words(name): int(class_id) for class_id, name in class_names.items()}
    return {number: by_words[words] for number, name in names.items() if (words := structure_words(name)) in by_words}


def label_classes(
    ids: Iterable[int], names: Mapping[int, str] | None, class_names: Mapping[int, str] | None, where: str
) -> dict[int, int] | None:
    """
    `{label id: class id}`: the class of a class-aware model (`class_names`, its `id2label`) that has the name
    `names` (a label folder's, `folder_class_names`, or a label volume's own) gives each of `ids` (by their words,
    `structure_words`), for labels numbered otherwise than the model. An id whose name is none of the classes (or
    that has no name) is left out with a warning naming `where`. None where nothing is to be renumbered: no names or
    classes, names of ids only (`class 3`, transformers' `LABEL_3`) on either side, the model's own numbering; names
    that match no class are warned about and the ids kept.
    """
    ids = sorted(int(i) for i in ids)
    unnamed = lambda name: re.fullmatch(r"(class |label_)\d+", str(name).strip().lower())  # noqa: E731
    if not names or not class_names or all(unnamed(names.get(i, f"class {i}")) for i in ids):
        return None
    if all(unnamed(name) for name in class_names.values()):  # a model that names none of its classes
        return None
    found: dict[int, int] = {}
    for label_id, class_id in classes_by_name({i: names[i] for i in ids if i in names}, class_names).items():
        if class_id not in found.values():  # a class named twice: its first structure
            found[label_id] = class_id
    if not found:
        listed = ", ".join(f"{i} {names[i]!r}" if i in names else f"{i} (unnamed)" for i in ids)
        warnings.warn(
            f"{where}: its structures' names ({listed}) are none of the model's classes; their ids are taken as the "
            "model's class ids",
            stacklevel=3,
        )
        return None
    left = [f"{i} {names[i]!r}" if i in names else f"{i} (unnamed)" for i in ids if i not in found]
    if left:  # TotalSegmentator's 117 structures hold ~100 an abdominal model lacks: the first few named
        listed = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        warnings.warn(f"{where}: structures {listed} are none of the model's classes: left out", stacklevel=3)
    return None if not left and all(i == c for i, c in found.items()) else found


def folder_class_names(folder: str | os.PathLike) -> dict[int, str] | None:
    """
    The names of the ids of a folder of label volumes or masks: a `classes.json` or `id2label.json` in it or beside
    it (BTCV's layout), or the MSD / nnU-Net `dataset.json` beside it (`labelsTr`'s parent); None without any.
    """
    folder = Path(folder)
    return read_class_names(folder) or read_class_names(folder.parent)


def class_file(folder: str | os.PathLike) -> Path | None:
    """The file naming a folder's classes: its `classes.json`, else its `id2label.json`, else the Medical
    Segmentation Decathlon / nnU-Net `dataset.json` of a data set's folder (one with `"labels"`); None without any."""
    found = next((Path(folder) / n for n in ("classes.json", "id2label.json") if (Path(folder) / n).is_file()), None)
    dataset = Path(folder) / "dataset.json"
    if found is None and dataset.is_file():
        with contextlib.suppress(OSError, ValueError):
            content = json.loads(dataset.read_text())
            found = dataset if isinstance(content, dict) and "labels" in content else None
    return found


def channel_names(scan: str | os.PathLike) -> dict[int, str]:
    """`{index: name}` of a data set's image channels from the Medical Segmentation Decathlon / nnU-Net `dataset.json`
    beside the scan's folder (`imagesTr`'s parent) or in it: MSD's `"modality"` (`{"0": "FLAIR", "1": "T1w", ...}`,
    the 4th axis of each 4-D scan) or nnU-Net v2's `"channel_names"`; `{}` without one (or an unreadable one)."""
    for folder in (Path(scan).parent.parent, Path(scan).parent):
        dataset = folder / "dataset.json"
        if not dataset.is_file():
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            content = json.loads(dataset.read_text())
            table = content.get("modality") or content.get("channel_names") or {}
            return {int(index): str(name) for index, name in table.items()}
    return {}


def dataset_class_names(name: str) -> dict[int, str] | None:
    """
    The class names of a dataset (`open_dataset`'s `name`): a local dataset folder's `classes.json` or
    `id2label.json`, a Hub dataset's `id2label.json` (where transformers' semantic-segmentation example reads them).
    None when it has none or the Hub cannot be reached.
    """
    if Path(name).is_dir():
        return read_class_names(name)
    path = _hub_class_file(name)
    return None if path is None else read_class_file(path)


@functools.lru_cache(maxsize=8)
def _hub_class_file(name: str) -> str | None:
    """A Hub dataset's `id2label.json`, downloaded once a process; None when it has none or the Hub is out of reach."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(name, "id2label.json", repo_type="dataset")
    except Exception:  # no such file, offline, gated...
        return None


def read_class_file(path: str | os.PathLike) -> dict[int, str]:
    """
    `{id: name}` of the structures (id 0, background, left out) listed in `path`: a `classes.json`
    (`{"classes": {"1": "spleen", ...}}` or a flat `{"1": "spleen", ...}`), a Medical Segmentation Decathlon or
    nnU-Net `dataset.json`, whose `"labels"` map ids to names (`{"1": "spleen"}`) or names to ids (`{"spleen": 1}`),
    or a model's `config.json` (its `"id2label"`).
    A file that lists no structure (only the background), ids outside 0..255 or nnU-Net's region labels (lists of
    ids) are a ValueError naming it.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        table = content.get("classes", content.get("labels", content.get("id2label", content)))
        if table and all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in table.values()):
            regions = [name for name, value in table.items() if isinstance(value, list)]
            if regions:
                raise ValueError(f"region labels {regions} (lists of ids) are not class ids; give one id per name")
            table = {value: name for name, value in table.items()}  # nnU-Net v2: name -> id
        names = {int(key): str(value) for key, value in table.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise ValueError(f'{path}: expected {{"classes": {{"<id>": "<name>", ...}}}} ({error}).') from None
    if not names or min(names) < 0 or max(names) > 255:
        outside = sorted(i for i in names if not 0 <= i <= 255)
        listed = ", ".join(map(str, outside[:5])) + (f", ... ({len(outside)} in all)" if len(outside) > 5 else "")
        raise ValueError(f"{path}: class ids must be 0..255 (masks store them in 8 bits), got {listed or 'none'}.")
    names.pop(0, None)
    if not names:
        raise ValueError(
            f"{path}: lists only the background (id 0), no structure; list each class id of the masks with its name, "
            'e.g. {"classes": {"0": "background", "1": "spleen"}}, or remove the file for binary masks.'
        )
    return names


SCAN_COLUMNS = ("case", "scan", "volume")
SPACING_COLUMNS = ("spacing_mm", "spacing")


def read_scan_spacing(source: str | os.PathLike) -> dict[str, tuple[float, float, float]]:
    """
    Voxel spacing in mm `(x, y, z)` of each scan, for per-volume distances of a folder of slices: a CSV with a scan
    column (`case`, `scan` or `volume`) and `spacing_mm` (`"1.17x1.17x3.0"`, BTCV's `cases.csv`), or a JSON
    `{scan: [x, y, z]}`. x and y are the slices' column and row spacing, z the distance between slice indices.
    """
    path = Path(source)
    try:
        if path.suffix == ".json":
            table = {str(k): v for k, v in json.loads(path.read_text()).items()}
        else:
            with path.open(newline="") as handle:
                records = list(csv.DictReader(handle))
            columns = set(records[0]) if records else set()
            scan = next((c for c in SCAN_COLUMNS if c in columns), None)
            spacing = next((c for c in SPACING_COLUMNS if c in columns), None)
            if scan is None or spacing is None:
                raise ValueError(
                    f"expected columns {SCAN_COLUMNS[0]!r} and {SPACING_COLUMNS[0]!r}, got {sorted(columns)}"
                )
            table = {r[scan]: re.split(r"[x×, ]+", r[spacing].strip()) for r in records}
        result = {}
        for name, values in table.items():
            numbers = tuple(float(v) for v in values)
            if len(numbers) != 3 or not all(math.isfinite(v) and v > 0 for v in numbers):
                raise ValueError(f"scan {name}: spacing {values} is not three positive numbers")
            result[name] = numbers
    except (OSError, ValueError, TypeError, AttributeError, csv.Error) as error:
        raise ValueError(f"{path}: cannot read the scans' spacing ({error}).") from None
    return result


def default_scan_spacing(data_dir: str | os.PathLike) -> dict[str, tuple[float, float, float]] | None:
    """`<data_dir>/cases.csv`'s spacing when it has one (BTCV's layout), else None."""
    path = Path(data_dir) / "cases.csv"
    if not path.is_file():
        return None
    try:
        return read_scan_spacing(path)
    except ValueError:
        return None  # a cases.csv without spacing: per-volume distances are left out, not an error


def folder_window(data_dir: str | os.PathLike) -> str | None:
    """
    The intensity window `<data_dir>/cases.csv` records in its `window` column (`imedsam convert volumes --window`
    writes it: `"level,width"` in HU or `"mr"`), when every scan that names one names the same; None without the file
    or the column, or with the column empty (slices that came 8-bit, or rescaled min-max).

    Raises:
        ValueError: naming the file, when its scans name different windows (folders converted with different ones).
    """
    path = Path(data_dir) / "cases.csv"
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as handle:
            windows = {(row.get("window") or "").strip() for row in csv.DictReader(handle)} - {""}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # an unreadable cases.csv records no window; the spacing reader names its problems
    if len(windows) > 1:
        raise ValueError(
            f"{path}: its scans were converted with different windows ({', '.join(sorted(windows))}); convert them "
            "with one window, or give the training run the `window` its images were made with."
        )
    return windows.pop() if windows else None


def slice_index(stem: str) -> int | None:
    """The slice number of a stem (its trailing digits: `case0001_slice061` -> 61), or None."""
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else None


def volume_slice_key(stem: str, pattern: re.Pattern) -> tuple[str, int] | None:
    """A volume slice's `(scan, slice number)`: the first group of `pattern` (`compile_group_pattern`) and the
    stem's trailing number (`case0001_slice061` -> `("case0001", 61)`); None for a stem that is not one."""
    match, number = re.match(pattern, stem), slice_index(stem)
    return (match.group(1), number) if number is not None and match and match.groups() else None


class MaskValuesError(ValueError):
    """A mask whose values do not fit the classes it is read with: the file, the values found and the fix."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def parse_mask_values(text: str) -> dict[int, int]:
    """`--mask_values "38:1,75:2"` -> `{38: 1, 75: 2}`: the value stored in the mask files -> its class id."""
    mapping = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        value, _, class_id = item.partition(":")
        try:
            mapping[int(value)] = int(class_id)
        except ValueError:
            raise ValueError(
                f"`mask_values` {text!r}: expected VALUE:CLASS pairs, e.g. 38:1,75:1 (two values, one foreground)."
            ) from None
    if not mapping or min(mapping.values()) < 0:
        raise ValueError(f"`mask_values` {text!r}: expected VALUE:CLASS pairs with class ids >= 0, e.g. 38:1,75:2.")
    return mapping


def _mask_pixels(source) -> tuple[np.ndarray, bool]:
    """
    The values stored in a mask `(H, W)` and whether they are exact (a lossless file) rather than possibly noisy
    (JPEG, WebP, an array of unknown origin). Palette images give their indices, never their colours.
    """
    if isinstance(source, (str, os.PathLike)):
        if is_dicom_path(source):
            return dicom_mask_pixels(source)
        if is_grid_image(source):  # NIfTI / NRRD / MetaImage: stored exactly
            return read_grid_image(source), True
        with opened_image(source, "mask") as image:  # opened, so its format (lossless or not) is known
            return _mask_pixels(image)
    if isinstance(source, Image.Image):
        exact = source.format in LOSSLESS_FORMATS
        if source.mode in ("P", "PA", "LA"):  # palette indices (P, PA) or grey with alpha (LA): channel 0
            return np.asarray(source)[..., 0] if source.mode != "P" else np.asarray(source), exact
        if source.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
            source = source.convert("L")  # colour masks: a colour per class reads as one grey level per class
        return np.asarray(source), exact
    array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    return (array[..., 0] if array.ndim == 3 else array), False


def mask_pixels(path: str | os.PathLike) -> np.ndarray:
    """The values a mask file stores, `(H, W)`, as they are (palette PNGs by index): what a reader that maps them
    itself starts from (`volumes.read_slice_masks`)."""
    return _mask_pixels(path)[0]


def _binary_mask(pixels: np.ndarray, exact: bool, name: str) -> np.ndarray:
    """A binary mask's foreground: its one non-zero value; a noisy (JPEG) 0/255 mask's values above 127."""
    values = np.unique(pixels)
    if len(values) == 1 or (len(values) == 2 and values[0] == 0):
        return (pixels != 0).astype(np.int64)
    if not exact and values[-1] > 127:  # compression noise around a 0/255 mask's edges
        return (pixels > 127).astype(np.int64)
    shown = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
    found = f"{len(values)} distinct values [{shown}] in a mask read as binary (num_classes 1)"
    if not exact:
        reason = (
            f"{found}, none above 127 as a noisy 0/255 mask would have: class ids do not survive lossy (JPEG) "
            "compression. Save the masks as PNG: 0/255, or class ids with `mask_classes` N."
        )
    elif values[0] != 0:
        example = f"{values[0]}:0,{values[-1]}:1"
        reason = f"{found} and no 0 (background): which is the foreground? Set `mask_values`, e.g. {example}."
    else:
        reason = (
            f"{found}: class ids, a palette or a colour mask? For class ids 1..N set `mask_classes` to N, a prompt "
            "per class (a classes.json beside masks/ naming them does it; training also takes `num_classes` N); to "
            f"choose the foreground set `mask_values`, e.g. {','.join(f'{v}:1' for v in values[1:3].tolist())}."
        )
    raise MaskValuesError(name, reason)


def _mapped_mask(pixels: np.ndarray, mask_values: Mapping[int, int], name: str) -> np.ndarray:
    """Stored values -> class ids by `mask_values` (0 is background unless mapped); an unmapped value is an error."""
    table = {0: 0, **{int(value): int(class_id) for value, class_id in mask_values.items()}}
    values = np.unique(pixels)
    unknown = [v for v in values.tolist() if v not in table]
    if unknown:
        listed = ",".join(f"{v}:{c}" for v, c in mask_values.items())
        raise MaskValuesError(name, f"values {unknown[:8]} are not in `mask_values` {listed}: map every value.")
    labels = np.zeros(pixels.shape, np.int64)
    for value in values.tolist():
        labels[pixels == value] = table[value]
    return labels


def read_mask(source, num_classes: int = 1, mask_values: Mapping[int, int] | None = None) -> np.ndarray:
    """
    A mask file, PIL image or array -> `(H, W)` int64 class ids: the one place masks are read.

    - `mask_values` given: each stored value becomes its class id (0 -> background unless listed); any other value
      is a `MaskValuesError`.
    - Binary (`num_classes=1`): a mask with one non-zero value (1, 255, 38...) has that value as foreground; a lossy
      (JPEG, WebP) or in-memory mask with more values is a noisy 0/255 mask, read above 127; any other mask with
      more than two values is a `MaskValuesError` naming the file and its values (class ids, a palette, a colour
      mask read as binary would silently train as "nothing here").
    - Multi-class: ids 0..num_classes; a larger id is an error.

    Palette ("P") PNGs are read by index, never through their colours.
    """
    pixels, exact = _mask_pixels(source)
    name = describe(source)
    if pixels.ndim != 2:
        raise ValueError(f"{name}: a mask must be 2-D, got shape {pixels.shape}.")
    if mask_values is not None:
        labels = _mapped_mask(pixels, mask_values, name)
    elif num_classes == 1:
        return _binary_mask(pixels, exact, name)
    else:
        labels = pixels.astype(np.int64)
    if labels.size and (labels.max() > num_classes or labels.min() < 0):
        raise MaskValuesError(
            name,
            f"class id {int(labels.max() if labels.max() > num_classes else labels.min())} outside 0..num_classes "
            f"({num_classes}); set `mask_classes` to N for ids 1..N, or map the values with `mask_values`.",
        )
    return labels


def check_pair(
    pair: SegmentationPair, num_classes: int = 1, mask_values: Mapping[int, int] | None = None
) -> DataProblem | None:
    """Open both files of a pair; report what is wrong, naming the file (mask values that do not fit: fatal)."""
    try:
        size = image_size(pair.image)
    except ImportError:  # pydicom for a DICOM image: once, for the whole folder
        raise
    except Exception as error:  # PIL raises many types for corrupt files
        return DataProblem(pair.image, f"unreadable image ({error})")
    return check_mask(pair.mask, size, pair.mask, num_classes, mask_values)


def check_mask(
    source, size: tuple[int, int], name: str, num_classes: int = 1, mask_values: Mapping[int, int] | None = None
) -> DataProblem | None:
    """What is wrong with the mask `source` (a file, PIL image or array) of an image of `size` (W, H), reported under
    `name`; None when it is usable."""
    try:
        mask = read_mask(source, num_classes, mask_values)
    except MaskValuesError as error:
        return DataProblem(name, error.reason, fatal=True)
    except Exception as error:
        return DataProblem(name, f"unreadable mask ({error})")
    if (mask.shape[1], mask.shape[0]) != size:
        return DataProblem(name, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}")
    return None


def validate_pairs(
    pairs: list[SegmentationPair],
    num_classes: int = 1,
    on_error: str = "skip",
    problems: list | None = None,
    mask_values: Mapping[int, int] | None = None,
) -> tuple[list[SegmentationPair], list[DataProblem]]:
    """
    Keep the usable pairs. With `on_error="fail"` any problem raises one ValueError listing them all; a fatal
    problem (mask values that do not fit the classes) raises whatever `on_error` says, naming the first such mask.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"`on_error` must be 'skip' or 'fail', got {on_error!r}.")
    problems = list(problems or [])
    good = []
    for pair in pairs:
        problem = check_pair(pair, num_classes, mask_values)
        if problem is None:
            good.append(pair)
        else:
            problems.append(problem)
    settle_problems(problems, on_error)
    return good, problems


def settle_problems(problems: Sequence[DataProblem], on_error: str) -> None:
    """Raise for `problems` as `on_error` says: any of them with `"fail"`, a fatal one whatever it says."""
    if problems and on_error == "fail":
        listing = "\n  ".join(str(p) for p in problems)
        raise ValueError(f"{len(problems)} unusable file(s) (use on_error=skip to skip them):\n  {listing}")
    fatal = [p for p in problems if p.fatal]
    if fatal:
        more = f" ({len(fatal) - 1} more mask(s) like it, e.g. {fatal[1].path})" if len(fatal) > 1 else ""
        raise ValueError(f"{fatal[0]}{more}")


# The scan (patient, volume) of a slice: the stem before `_slice<z>` (BTCV's `case0001_slice061`). A stem that does
# not match is its own group, so ordinary images split one by one.
DEFAULT_GROUP_PATTERN = r"^(.*)_slice\d+$"
#: A BIDS subject's label (`sub-01`): its folder's name, and the first entity of its files' names.
BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")
#: The subject of a scan named as BIDS names it (`sub-01_ses-02_T2w` -> `sub-01`): its sessions and sequences are one
#: patient's, which the splits keep together.
BIDS_SUBJECT_OF = re.compile(rf"^({BIDS_SUBJECT.pattern})(?:_|$)")


def compile_group_pattern(pattern: str | None) -> re.Pattern:
    """A group pattern (see `group_of`), checked; `None`: every stem is its own group."""
    try:
        return re.compile(pattern or r"^$")
    except re.error as error:
        raise ValueError(f"`group_pattern` {pattern!r}: not a regular expression ({error}).") from None


def group_of(stem: str, pattern: re.Pattern | str = DEFAULT_GROUP_PATTERN) -> str:
    """The group a stem belongs to: the first group of `pattern`'s match, else the stem itself."""
    match = re.match(pattern, stem)
    return match.group(1) if match and match.groups() else stem


def case_folder_group(image: object, stem: str) -> str | None:
    """The case a 2-D image is a slice of when it lies in a folder named for the case and is named `<folder>_<n>` (or
    `-<n>`): the Kaggle LGG brain MRI set's `TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif`; None otherwise
    (BUSI's `benign/benign (12).png` is a class folder of many patients, PH2's `IMD002_Dermoscopic_Image/IMD002.bmp`
    one image; an image of a Hub dataset, read in memory, none)."""
    if not isinstance(image, (str, os.PathLike)):
        return None
    folder = Path(image).parent.name
    return folder if folder and re.fullmatch(re.escape(folder) + r"[_-]\d+", stem) else None


def ungrouped_slices(
    stems: Sequence[str], group_pattern: str | None = DEFAULT_GROUP_PATTERN, groups: Mapping[str, str] | None = None
) -> str | None:
    """
    What to say when stems look like numbered slices of several cases that the splits would still cut image by image
    (Kaggle's LGG MRI slices flattened into one folder: `TCGA_CS_4941_19960909_12`): none of them grouped by
    `group_pattern` or `groups`, and most named `<case>_<n>` with at least two cases of three or more slices each (one
    prefix shared by all, ISIC's `ISIC_0000000`, names a data set, not a case). None otherwise.
    """
    pattern = compile_group_pattern(group_pattern)
    if any(group_of(stem, pattern) != stem or stem in (groups or {}) for stem in stems):
        return None
    numbered = Counter(match[1] for stem in stems if (match := re.fullmatch(r"(.+)[_-]\d+", stem)))
    cases = {case: count for case, count in numbered.items() if count >= 3}
    if len(cases) < 2 or sum(cases.values()) < len(stems) / 2:
        return None
    example = max(cases, key=cases.get)
    return (
        f"{sum(cases.values())} of {len(stems)} images look like numbered slices of {len(cases)} cases "
        f"({example}_<n>: {cases[example]} images), but the splits take them image by image: neighbouring slices of "
        "one case would sit in train and test. Give `group_pattern` '^(.*)_\\d+$' to keep each case in one split."
    )


def make_splits(
    stems: Sequence[str],
    seed: int = 0,
    fractions=(0.6, 0.2, 0.2),
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """
    Seeded shuffle cut into train/validation/test (60/20/20 by default, as SwIPE and I-MedSAM), by group: all the
    slices of one scan (`group_pattern`, see `group_of`; a stem it does not group, by `groups`, `{stem: case}`:
    `case_folder_group`) land in the same split, never slice by slice (neighbouring slices are nearly identical),
    and the scans of one BIDS subject (`sub-01_ses-01_T2w`, `sub-01_ses-02_T2w`: :data:`BIDS_SUBJECT_OF`) in one too.
    When every stem is its own group this is the plain shuffle of the stems.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"`split_fractions` must be three non-negative numbers summing to 1, got {fractions}.")
    pattern = compile_group_pattern(group_pattern)
    members: dict[str, list[str]] = {}
    for stem in stems:
        group = group_of(stem, pattern)
        group = group if group != stem else (groups or {}).get(stem, stem)
        subject = BIDS_SUBJECT_OF.match(group)  # a BIDS subject's sessions and sequences: one patient, one split
        members.setdefault(subject[1] if subject else group, []).append(stem)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    cuts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: sorted(stem for group in groups for stem in members[group]) for name, groups in cuts.items()}


#: The keys of a MONAI datalist (its BTCV `dataset_0.json`: `{"training": [{"image": ..., "label": ...}], ...}`)
#: and the splits they name.
DATALIST_SPLITS = {"training": "train", "validation": "validation", "test": "test", "testing": "test"}


def load_splits(path: str | os.PathLike, fold: int | None = None) -> dict[str, list[str]]:
    """
    A split file's names per split, `{"train": [...], "validation": [...], "test": [...]}`, from the JSON of
    `write_splits` (a training run's `splits.json`), a MONAI datalist (`{"training": [{"image":
    "imagesTr/img0001.nii.gz", ...}], "validation": [...]}`: each entry named by its image's file name) or nnU-Net's
    `splits_final.json` (a list of folds `{"train": [...], "val": [...]}`: `fold` picks one; a single fold needs none).
    TransUNet's lists (`lists/lists_Synapse/`: `train.txt` of slice names, `test_vol.txt` of scans' names, one per
    line; SAMed's and most BTCV papers' split) are read from their folder, or one such file for its split.
    A name is an image's stem or a scan's (case's) name standing for its slices (:func:`resolve_split_names`).
    """
    listed = Path(path).is_dir() or Path(path).suffix.lower() == ".txt"
    try:
        splits = None if listed else json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`split_file` {path}: cannot read it as JSON ({error}).") from error
    if isinstance(splits, list):  # nnU-Net's splits_final.json: one {"train", "val"} per fold
        folds = [f for f in splits if isinstance(f, dict) and {"train", "val"} <= set(f)]
        if not splits or len(folds) != len(splits):
            raise ValueError(f'`split_file` {path}: a list, but not nnU-Net\'s folds of {{"train", "val"}}.')
        if fold is None and len(folds) > 1:
            raise ValueError(
                f"`split_file` {path}: nnU-Net's {len(folds)} folds; give `split_fold` 0..{len(folds) - 1}."
            )
        if fold is not None and not 0 <= fold < len(folds):
            raise ValueError(f"`split_fold` {fold}: {path} holds folds 0..{len(folds) - 1}.")
        chosen = folds[fold or 0]
        return {"train": list(chosen["train"]), "validation": list(chosen["val"]), "test": []}
    if fold is not None:
        raise ValueError(f"`split_fold` {fold}: {path} holds one split, not nnU-Net's folds.")
    if listed:
        return _listed_splits(Path(path))
    if isinstance(splits, dict) and "training" in splits:  # a MONAI datalist
        named = {name: [] for name in SPLITS}
        for key, name in DATALIST_SPLITS.items():
            for entry in splits.get(key) or []:
                image = entry.get("image") if isinstance(entry, dict) else entry
                if isinstance(image, list):  # several channels of one case: the first names it
                    image = image[0] if image else None
                if not isinstance(image, str):
                    raise ValueError(f"`split_file` {path}: a {key!r} entry without an image path: {entry!r}.")
                named[name].append(volume_stem(image))
        return named
    # `metadata` is what write_splits records beside the stems (seed, source).
    if not isinstance(splits, dict) or not set(splits) - {"metadata"} <= set(SPLITS) or "train" not in splits:
        raise ValueError(
            f"`split_file` {path}: expected keys {SPLITS} (train required), a MONAI datalist (training, "
            f"validation) or nnU-Net's splits_final.json, got {list(splits) if isinstance(splits, dict) else splits}."
        )
    return {name: list(splits.get(name, [])) for name in SPLITS}


#: The split a name list of TransUNet's `lists_Synapse/` folder is for, by the start of its file name
#: (`train.txt`, `test_vol.txt`, `val.txt`).
LIST_SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))


def _listed_splits(path: Path) -> dict[str, list[str]]:
    """:func:`load_splits` of TransUNet's name lists: a folder of them, or one `.txt` file."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for file in files:
        split = next((name for start, name in LIST_SPLITS if file.name.lower().startswith(start)), None)
        if split is None:
            if path.is_dir():
                continue
            raise ValueError(f"`split_file` {path}: its name says no split (train.txt, val.txt, test_vol.txt).")
        try:
            lines = file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"`split_file` {file}: cannot read it ({error}).") from None
        splits[split] += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not any(splits.values()):
        raise ValueError(f"`split_file` {path}: no train.txt, val.txt or test_vol.txt list of names in it.")
    return {name: list(dict.fromkeys(names)) for name, names in splits.items()}


def resolve_split_names(
    splits: Mapping[str, Sequence[str]],
    stems: Iterable[str],
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    source: str = "`split_file`",
    absent: str = "error",
) -> dict[str, list[str]]:
    """`splits`' names as the data's stems: a stem as it is, a scan's or case's name for all of its slices
    (`case0001` for `case0001_slice080`, ...: :func:`group_of` by `group_pattern`; TransUNet's Synapse test list,
    nnU-Net's folds and MONAI's datalists name cases), in the data's order; a slice the data lacks of a scan it holds
    (TransUNet's `train.txt` lists unlabelled slices too) is passed over. Other names are a ValueError naming a few and
    `source` (`absent` "error"), or left out with a UserWarning ("warn": a copy of a data set without some of its
    scans, as the shared BTCV lacks TransUNet's held-out ones) or silently ("ignore": a folder scored against a
    larger data set's file); a stem put in two splits is a ValueError."""
    stems = list(stems)
    pattern = compile_group_pattern(group_pattern)
    known = set(stems)
    by_group: dict[str, list[str]] = {}
    for stem in stems:
        by_group.setdefault(group_of(stem, pattern), []).append(stem)
    resolved, unknown = {}, []
    for name, names in splits.items():
        chosen = []
        for entry in names:
            entry = str(entry)
            found = [entry] if entry in known else by_group.get(entry) or by_group.get(volume_stem(entry))
            if not found and group_of(entry, pattern) not in by_group:  # a slice of a scan the data holds, left out
                unknown.append(entry)  # of it (an unlabelled one `convert volumes` skips), is passed over
            chosen += found or []
        resolved[name] = list(dict.fromkeys(chosen))
    if unknown:
        message = (
            f"{source}: names neither an image of the data nor a scan's slices (group pattern {group_pattern!r}): "
            f"{', '.join(unknown[:5])}{f' ({len(unknown)} in all)' if len(unknown) > 5 else ''}"
        )
        if absent == "error":
            raise ValueError(f"{message}.")
        if absent == "warn":
            warnings.warn(f"{message}; left out.", UserWarning, stacklevel=2)
    seen: dict[str, str] = {}
    for name, chosen in resolved.items():
        for stem in chosen:
            if stem in seen and seen[stem] != name:
                raise ValueError(f"{source}: {stem} is in {seen[stem]} and in {name}; a stem belongs to one split.")
            seen[stem] = name
    return resolved


def select_split(
    pairs: Sequence[SegmentationPair],
    split: str,
    split_file: str | os.PathLike | None,
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    fold: int | None = None,
):
    """
    The one split selection: the pairs `split_file` lists under `split` (`"train"`, `"validation"`, `"test"`) by
    stem or by scan (:func:`resolve_split_names`), in their order; `"all"` keeps every pair (no file needed).
    """
    stems = split_stems(split, split_file, [pair.stem for pair in pairs], group_pattern, fold)
    return list(pairs) if stems is None else [pair for pair in pairs if pair.stem in stems]


def select_split_records(
    records,
    split: str,
    split_file: str | os.PathLike | None,
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    fold: int | None = None,
):
    """`select_split` for dataset records (`dataset_records`), by their `stem` column: no row is decoded."""
    stems = split_stems(split, split_file, records["stem"], group_pattern, fold)
    return records if stems is None else records.select([i for i, s in enumerate(records["stem"]) if s in stems])


def split_stems(
    split: str,
    split_file: str | os.PathLike | None,
    stems: Iterable[str] | None = None,
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    fold: int | None = None,
) -> set[str] | None:
    """The stems `split_file` lists under `split`, a scan's name standing for its slices among `stems` (the data's:
    :func:`resolve_split_names`); None for `"all"` (every pair, no file needed)."""
    if split == "all":
        return None
    if split not in SPLITS:
        raise ValueError(f"`split` {split!r}: expected one of {(*SPLITS, 'all')}.")
    if split_file is None or not Path(split_file).exists():
        raise ValueError(
            f"`split` {split} needs a split file (`split_file`, or the splits.json a training run saves beside the "
            f"model; none at {split_file}); or use `split` all."
        )
    splits = load_splits(split_file, fold)
    if stems is None:
        return set(splits[split])
    source = f"`split_file` {split_file}"  # names of nothing here are left out: it may list a larger data set's
    return set(resolve_split_names(splits, stems, group_pattern, source, absent="ignore")[split])


def split_metadata(path: str | os.PathLike) -> dict:
    """What a split file records beside its stems (`write_splits`' metadata: seed, source, a dataset's
    `stem_column`); empty for a file without it."""
    try:
        metadata = json.loads(Path(path).read_text()).get("metadata")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"`split_file` {path}: cannot read it as JSON ({error}).") from error
    return metadata if isinstance(metadata, dict) else {}


def write_splits(splits: dict[str, list[str]], path: str | os.PathLike, **metadata) -> None:
    Path(path).write_text(json.dumps({**splits, "metadata": metadata}, indent=1))


def mask_clicks(mask: np.ndarray | torch.Tensor, count: int = 1) -> np.ndarray | None:
    """
    `count` positive clicks `(count, 2)` as (x, y) pixel centres, as a careful user would place them, or None for an
    empty mask: the first at the interior point farthest from the mask's boundary (the largest inscribed circle's
    centre), each next one at the farthest point of what the earlier clicks' circles leave uncovered. Ties go to the
    first point in raster order, so the clicks are deterministic.
    """
    from scipy import ndimage  # only the click prompts need it

    remaining = np.asarray(mask) > 0
    if count < 1:
        raise ValueError(f"`count` must be >= 1 click, got {count}.")
    if not remaining.any():
        return None
    rows, cols = np.indices(remaining.shape)
    clicks = []
    for _ in range(count):
        if not remaining.any():
            break
        distance = ndimage.distance_transform_edt(np.pad(remaining, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        clicks.append((float(x), float(y)))
        remaining &= (rows - y) ** 2 + (cols - x) ** 2 >= distance[y, x] ** 2
    return np.array(clicks, dtype=np.float64)


def random_clicks(mask: np.ndarray, max_clicks: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """
    Training clicks: 1..`max_clicks` positive clicks at random foreground pixels of `mask`, as `input_points`
    `(max_clicks, 2)` (x, y) and `input_labels` `(max_clicks,)` with -10 in the unused slots (SAM's padding label,
    embedded as nothing); an empty mask gives only padding.
    """
    points = np.zeros((max_clicks, 2), dtype=np.float32)
    labels = np.full(max_clicks, -10, dtype=np.int64)
    ys, xs = np.nonzero(mask)
    if len(xs):
        count = int(rng.integers(1, max_clicks + 1))
        chosen = rng.choice(len(xs), size=min(count, len(xs)), replace=False)
        points[: len(chosen)] = np.stack([xs[chosen], ys[chosen]], axis=1)
        labels[: len(chosen)] = 1
    return {"input_points": torch.from_numpy(points), "input_labels": torch.from_numpy(labels)}


def mask_box(mask: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """
    The tight (x0, y0, x1, y1) box of a mask's foreground, or None if empty. Corners are the first and last
    foreground pixel indices, as in MedSAM/LiteMedSAM (so the box a model was trained with is the box it gets).
    """
    mask = np.asarray(mask) > 0
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, y0 = xs.min(), ys.min()
    return np.array([x0, y0, max(xs.max(), x0 + 1), max(ys.max(), y0 + 1)], dtype=np.float32)


def jitter_box(box: np.ndarray, fraction: float, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Move each side by up to `fraction` of the box's width/height (either way), clipped to the `size` frame."""
    width, height = box[2] - box[0], box[3] - box[1]
    shift = rng.uniform(-fraction, fraction, 4) * np.array([width, height, width, height])
    jittered = box + shift
    jittered[[0, 2]] = np.sort(np.clip(jittered[[0, 2]], 0, size[1]))
    jittered[[1, 3]] = np.sort(np.clip(jittered[[1, 3]], 0, size[0]))
    jittered[2] = max(jittered[2], jittered[0] + 1)
    jittered[3] = max(jittered[3], jittered[1] + 1)
    return jittered.astype(np.float32)


def _affine_matrix(config: AugmentationConfig, rng: np.random.Generator) -> torch.Tensor:
    """A random 2x3 affine matrix (normalised coordinates) for `F.affine_grid`."""
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    shear = math.radians(rng.uniform(-config.shear, config.shear))
    scale = rng.uniform(*config.scale)
    flip_x = -1.0 if rng.random() < config.horizontal_flip else 1.0
    flip_y = -1.0 if rng.random() < config.vertical_flip else 1.0
    tx, ty = rng.uniform(-config.translate, config.translate, 2) * 2
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    linear = rotation @ shearing @ np.diag([flip_x, flip_y]) / scale
    return torch.tensor(np.concatenate([linear, [[tx], [ty]]], axis=1), dtype=torch.float32)


def augment(
    image: torch.Tensor, mask: torch.Tensor, config: AugmentationConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Random geometric (shared by image and mask; masks use nearest neighbour) and photometric augmentation.

    Args:
        image: `(3, h, w)` float 0-255. mask: `(h, w)` long class ids.
    """
    theta = _affine_matrix(config, rng)[None]
    grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
    brightness = rng.uniform(1 - config.brightness, 1 + config.brightness)
    contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
    mean = image.mean()
    image = ((image - mean) * contrast + mean) * brightness
    if rng.random() < config.blur_probability:
        image = _gaussian_blur(image, rng.uniform(*config.blur_sigma))
    if rng.random() < config.noise_probability:
        noise = torch.from_numpy(rng.normal(0, config.noise_std, image.shape).astype(np.float32))
        image = image + noise
    return image.clamp(0, 255), mask


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    blurred = F.conv2d(
        F.pad(image[None], (radius, radius, 0, 0), mode="reflect"),
        kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1),
        groups=channels,
    )
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, radius, radius), mode="reflect"),
        kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1),
        groups=channels,
    )
    return blurred[0]


class SegmentationDataset(torch.utils.data.Dataset):
    """
    Model-ready samples from a `datasets.Dataset` with `image` and `mask` columns (paths or decoded images) and
    a `stem` column.

    Each sample: `pixel_values` `(3, S, S)`, `labels` `(S, S)` long class ids in the input frame,
    `input_boxes` `(4,)` in frame pixels (jittered in training; exact otherwise), `original_size` `(2,)`,
    `reshaped_size` `(2,)`, `index`. Augmentation randomness comes from `(seed, epoch, index)`, so an epoch's
    samples are the same whatever the number of workers or processes, and after a resume.

    Box prompts come from the mask only: a record whose mask is empty has no box, so with `prompt="box"` it makes
    no sample (its stem is in `empty_stems`; class prompts likewise skip absent classes), and a training sample
    whose structure the augmentation moved out of view is framed again without the geometric augmentation. With
    `prompt="none"` empty masks are kept ("nothing here" is a target) and `input_boxes` is a whole-frame
    placeholder the prompt-free training step never reads.
    """

    def __init__(
        self, records, processor: IMedSamProcessor, config: DataConfig, train: bool = False, seed: int = 0
    ) -> None:
        self.records = records
        self.processor = processor
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.empty_stems: list[str] = []
        self.class_counts: dict[int, int] = {}  # class id -> images holding it (class prompts)
        self.items = self._items()
        # Neighbour and extent boxes: each record's (scan, slice number), the record of each (scan, slice number),
        # and each scan's in-plane extent of each structure.
        borrowing = train and config.neighbour_box_probability + config.extent_box_probability > 0
        self.slice_keys = self._slice_keys() if borrowing else []
        self.slices = {key: i for i, key in enumerate(self.slice_keys)}
        self.extents = self._scan_extents() if train and config.extent_box_probability > 0 else {}

    def _slice_keys(self) -> list[tuple[str, int]]:
        """Each record's (scan, slice number), for the neighbour and extent boxes: every stem must name its scan (a
        match of `group_pattern` with a group) and end in its slice number."""
        pattern = compile_group_pattern(self.config.group_pattern)
        keys = []
        for i in range(len(self.records)):
            stem = str(self.records[i]["stem"])
            key = volume_slice_key(stem, pattern)
            if key is None:
                raise ValueError(
                    f"neighbour and extent boxes take the slices of volumes, stems like case0001_slice061 (the scan by the group "
                    f"pattern {self.config.group_pattern!r}, then the slice number); {stem!r} is not one."
                )
            keys.append(key)
        return keys

    @staticmethod
    def _structure_boxes(mask: np.ndarray) -> dict[int, np.ndarray]:
        """`{class id: box}` of each structure of a class-id mask (inclusive pixel indices), 0 for all of them."""
        ids = [int(c) for c in np.unique(mask) if c > 0]
        boxes = {class_id: mask_box(mask == class_id) for class_id in ids}
        if ids:
            boxes[0] = mask_box(mask > 0)
        return boxes

    def _scan_extents(self) -> dict[str, dict[int, np.ndarray]]:
        """`{scan: {class id: box}}`, each structure's in-plane extent over the scan's slices of this data set."""
        extents: dict[str, dict[int, np.ndarray]] = {}
        for record_index, (scan, _) in enumerate(self.slice_keys):
            boxes = extents.setdefault(scan, {})
            for class_id, box in self._structure_boxes(self._read_mask(self.records[record_index])).items():
                known = boxes.get(class_id)
                boxes[class_id] = (
                    box if known is None else np.concatenate([np.minimum(known, box)[:2], np.maximum(known, box)[2:]])
                )
        return extents

    def _borrowed_boxes(self, record_index: int, rng: np.random.Generator) -> dict[int, np.ndarray] | None:
        """With `neighbour_box_probability`, each structure's box on a slice near this one in its scan, widened by
        the margin; with `extent_box_probability`, its extent over the scan; with `propagated_box_probability`, one
        of the boxes a propagation chain prompted it with on this slice; else None. `{class id: box}` in stored
        pixels, 0 for all structures together (not for propagated boxes, which are per structure)."""
        config = self.config
        propagated = config.propagated_boxes if config.propagated_box_probability > 0 else None
        if not self.slices and not propagated:
            return None
        draw = rng.random()
        if draw < config.neighbour_box_probability:
            scan, number = self.slice_keys[record_index]
            offset = int(rng.integers(1, config.neighbour_box_distance + 1)) * int(rng.choice([-1, 1]))
            neighbour = self.slices.get((scan, number + offset))
            if neighbour is None:
                return None
            mask = self._read_mask(self.records[neighbour])
            height, width = mask.shape[:2]
            margin = np.array([-1, -1, 1, 1]) * config.neighbour_box_margin
            boxes = {
                class_id: np.clip(box + margin, 0, [width, height, width, height])
                for class_id, box in self._structure_boxes(mask).items()
            }
            if config.neighbour_box_jitter > 0:
                boxes = {
                    class_id: jitter_box(box, config.neighbour_box_jitter, (height, width), rng)
                    for class_id, box in boxes.items()
                }
            return boxes
        if draw < config.neighbour_box_probability + config.extent_box_probability:
            return self.extents[self.slice_keys[record_index][0]]
        if (
            propagated
            and draw
            < config.neighbour_box_probability + config.extent_box_probability + config.propagated_box_probability
        ):
            recorded = propagated.get(str(self.records[record_index]["stem"]))
            if not recorded:
                return None
            return {
                int(class_id): np.asarray(boxes[int(rng.integers(len(boxes)))], dtype=np.float32)
                for class_id, boxes in recorded.items()
                if boxes
            }
        return None

    def _borrowed_box(self, boxes: dict[int, np.ndarray], class_id: int, original, shape) -> np.ndarray | None:
        """A borrowed box of one structure (`_borrowed_boxes`) in the model's frame; None if it has none."""
        box = boxes.get(class_id)
        if box is None:
            return None
        return self.processor.scale_coordinates(box.astype(np.float32), original, shape).reshape(4)

    def _read_mask(self, record) -> np.ndarray:
        return read_mask(record["mask"], self.config.mask_class_count, self.config.mask_values)

    def _items(self) -> list[tuple[int, int]]:
        """(record index, class id) of every sample; class id 0 means the whole mask (no per-class prompts)."""
        if not self.config.class_prompts and self.config.prompt != "box":
            return [(i, 0) for i in range(len(self.records))]
        items = []
        for i in range(len(self.records)):
            present = [int(c) for c in np.unique(self._read_mask(self.records[i])) if c > 0]
            for c in present:
                self.class_counts[c] = self.class_counts.get(c, 0) + 1
            if not present:
                self.empty_stems.append(str(self.records[i]["stem"]))
            elif not self.config.class_prompts:
                items.append((i, 0))
            elif self.config.all_classes_per_sample:
                items.append((i, ALL_CLASSES))
            else:
                items.extend((i, c) for c in present)
        return items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record_index, class_id = self.items[index]
        record = self.records[record_index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = to_rgb_array(hu_windowed(record["image"], self.config.window, self.config.rescale_intercept))
        mask = self._read_mask(record)
        borrowed = self._borrowed_boxes(record_index, rng) if self.train else None
        if class_id == ALL_CLASSES:
            return self._all_classes_sample(image, mask, rng, index, borrowed)
        if class_id:
            mask = (mask == class_id).astype(np.int64)
        if borrowed is not None and class_id in borrowed:  # in the stored frame: photometric augmentation only
            pixel_values, labels, original, shape = self._frame(image, mask, rng, geometric=False)
            box = self._borrowed_box(borrowed, class_id, original, shape)
            return self._sample(pixel_values, labels, box, original, shape, index, class_id, rng)
        pixel_values, labels, original, shape = self._frame(image, mask, rng)
        box = mask_box(labels.numpy()) if self.train else self._exact_box(mask, original, shape)
        if box is None and mask.any():  # augmented out of view: the frame without geometric augmentation
            pixel_values, labels, original, shape = self._frame(image, mask, rng, geometric=False)
            box = self._exact_box(mask, original, shape)
        if box is None:  # prompt="none" only (empty masks make no box-prompted sample): an unused placeholder
            box = np.array([0, 0, shape[1], shape[0]], dtype=np.float32)
        return self._sample(
            pixel_values, labels, self._training_box(box, shape, rng), original, shape, index, class_id, rng
        )

    def _sample(self, pixel_values, labels, box, original, shape, index: int, class_id: int, rng) -> dict:
        sample = {
            "pixel_values": pixel_values,
            "labels": labels,
            "input_boxes": torch.from_numpy(box),
            "original_size": torch.tensor(original),
            "reshaped_size": torch.tensor(shape),
            "index": torch.tensor(index),
            "class_id": torch.tensor(class_id),
        }
        if self.train and self.config.max_clicks > 0:
            sample.update(random_clicks(labels.numpy() > 0, self.config.max_clicks, rng))
        return sample

    def _frame(
        self, image: np.ndarray, mask: np.ndarray, rng, geometric: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Image and class-id mask into the model's frame (resized, augmented in training, normalised, padded):
        pixel values `(3, S, S)`, labels `(S, S)`, the original `(H, W)` and the resized `(h, w)`.
        `geometric=False` keeps the augmentation photometric (the structure stays in view)."""
        original = image.shape[:2]
        shape = self.processor.resized_shape(*original)
        tensor = self.processor.resize_image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), shape)
        labels = self.processor.resize_mask(mask, shape)[: shape[0], : shape[1]]
        if self.train and self.config.augment is not None:
            config = self.config.augment
            if not geometric:
                still = dict(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, horizontal_flip=0.0)
                config = replace(config, **still, vertical_flip=0.0)
            tensor, labels = augment(tensor, labels, config, rng)
        return self.processor.pad(self.processor.normalize(tensor)), self.processor.pad(labels), original, shape

    def _all_classes_sample(
        self, image: np.ndarray, mask: np.ndarray, rng, index: int, borrowed: dict[int, np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """One sample with every class present as a prompt: `input_boxes` `(P, 4)`, `prompt_classes` `(P,)`.
        When augmentation moved every structure out of view, the frame is made again without its geometric part.
        With `borrowed` boxes (a neighbour slice's or the scan's extents, `_borrowed_boxes`), each structure that
        has one is prompted with it."""
        if borrowed is None:
            pixel_values, labels, original, shape = self._frame(image, mask, rng)
            boxes, classes = self._class_boxes(mask, labels, original, shape, rng)
        else:
            pixel_values, labels, original, shape = self._frame(image, mask, rng, geometric=False)
            boxes, classes = self._class_boxes(mask, labels, original, shape, rng, exact=True, borrowed=borrowed)
        if not boxes:
            pixel_values, labels, original, shape = self._frame(image, mask, rng, geometric=False)
            boxes, classes = self._class_boxes(mask, labels, original, shape, rng, exact=True)
        most = self.config.max_prompts_per_sample
        if self.train and most and len(classes) > most:
            weights = np.array([1.0 / self.class_counts.get(c, 1) for c in classes])
            keep = np.sort(rng.choice(len(classes), size=most, replace=False, p=weights / weights.sum()))
            boxes, classes = [boxes[i] for i in keep], [classes[i] for i in keep]
        return {
            "pixel_values": pixel_values,
            "labels": labels,
            "input_boxes": torch.from_numpy(np.stack(boxes).astype(np.float32)),
            "prompt_classes": torch.tensor(classes),
            "original_size": torch.tensor(original),
            "reshaped_size": torch.tensor(shape),
            "index": torch.tensor(index),
            "class_id": torch.tensor(ALL_CLASSES),
        }

    def _class_boxes(
        self,
        mask: np.ndarray,
        labels: torch.Tensor,
        original,
        shape,
        rng,
        exact: bool = False,
        borrowed: dict[int, np.ndarray] | None = None,
    ) -> tuple[list[np.ndarray], list[int]]:
        """The box of each class present in `mask` (in training from the augmented `labels`, unless `exact`; the
        classes out of view left out) and the class ids; a class with a `borrowed` box takes that one."""
        boxes, classes = [], []
        for class_id in (int(c) for c in np.unique(mask) if c > 0):
            box = None if borrowed is None else self._borrowed_box(borrowed, class_id, original, shape)
            if box is not None:
                boxes.append(box)
                classes.append(class_id)
                continue
            box = (
                mask_box(labels.numpy() == class_id)
                if self.train and not exact
                else self._exact_box(mask == class_id, original, shape)
            )
            if box is None:  # augmented out of view
                continue
            box = self._training_box(box, shape, rng)
            boxes.append(box)
            classes.append(class_id)
        return boxes, classes

    def _training_box(self, box: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
        """In training, `box` jittered by `box_jitter` (with probability `box_jitter_probability`); else `box`."""
        config = self.config
        if not self.train or config.box_jitter <= 0:
            return box
        if config.box_jitter_probability < 1.0 and rng.random() >= config.box_jitter_probability:
            return box
        return jitter_box(box, config.box_jitter, shape, rng)

    def _exact_box(self, mask: np.ndarray, original, shape) -> np.ndarray | None:
        """The ground-truth box at the original resolution, scaled into the frame (the evaluation protocol)."""
        box = mask_box(mask)
        if box is None:
            return None
        return self.processor.scale_coordinates(box, original, shape).reshape(4)


def records_from_pairs(pairs: Sequence[SegmentationPair]):
    """A `datasets.Dataset` of paths (decoded lazily by the SegmentationDataset)."""
    import datasets

    return datasets.Dataset.from_dict(
        {"stem": [p.stem for p in pairs], "image": [p.image for p in pairs], "mask": [p.mask for p in pairs]}
    )


# The names a dataset's own held-out splits go by (the first one it has is used); its test split is `test`.
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")


def open_dataset(name: str, config: str | None = None):
    """
    A Hub dataset id or a local dataset folder as a `datasets.DatasetDict` of its splits: a folder written by
    `save_to_disk` (a `Dataset`: one split, named `train`; a `DatasetDict`) is read with `load_from_disk`, anything
    else (a Hub id, a folder of parquet, CSV or JSON files, an image folder) with `load_dataset`, `config` naming
    one of its configurations (subsets).
    """
    import datasets

    folder = Path(name)
    saved = (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()
    if saved and config is not None:
        raise ValueError(f"`dataset_config` {config!r}: {name} was written by save_to_disk and has no configurations.")
    try:
        loaded = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(name, config)
    except Exception as error:  # network, unknown id or configuration, unreadable files...
        configs = _dataset_configs(name) if config is None and not saved else []
        if len(configs) > 1:
            raise ValueError(
                f"`dataset` {name} has several configurations ({', '.join(configs)}): set `dataset_config` to one."
            ) from error
        raise ValueError(
            f"`dataset` {name}{f' (`dataset_config` {config})' if config else ''}: cannot load it ({error})."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    return loaded


def _dataset_configs(name: str) -> list[str]:
    """The configuration names of a dataset, or none where they cannot be listed."""
    import datasets

    try:
        return list(datasets.get_dataset_config_names(name))
    except Exception:
        return []


def load_hub_dataset(
    name: str,
    split: str = "train",
    image_column: str = "image",
    mask_column: str = "mask",
    stem_column: str | None = None,
    config: str | None = None,
) -> tuple[object, dict[str, list[str]]]:
    """
    A dataset's rows to train on, as records with `stem`, `image`, `mask`, and the held-out splits it has itself.

    `split` is the split to train on. The dataset's own validation split (the first of `VALIDATION_SPLIT_NAMES` it
    has) and `test` split, when they have both columns, are loaded too: their rows follow `split`'s in the records,
    and `{"validation": [stems], "test": [stems]}` (only those it has) says which they are, so that a run keeps the
    dataset's published test split as its own. A split without the mask column (a challenge's hidden test set) is
    not used. Stems as `dataset_records` gives them. `config`: the dataset's configuration (`open_dataset`).
    """
    splits = open_dataset(name, config)
    held_out = {"validation": next((s for s in VALIDATION_SPLIT_NAMES if s in splits and s != split), None)}
    held_out["test"] = "test" if "test" in splits and split != "test" else None
    labelled = labelled_splits(splits, image_column, mask_column)  # a split without masks: nothing to score against
    held_out = {role: source for role, source in held_out.items() if source in labelled}
    records = dataset_records(name, splits, [split, *held_out.values()], image_column, mask_column, stem_column)
    stems, start, own = list(records["stem"]), len(splits[split]), {}
    for role, source in held_out.items():
        own[role] = stems[start : start + len(splits[source])]
        start += len(splits[source])
    return records, own


def labelled_splits(splits, image_column: str = "image", mask_column: str = "mask") -> list[str]:
    """The names of the splits of `splits` (`open_dataset`'s) that have both columns."""
    return [name for name, rows in splits.items() if not {image_column, mask_column} - set(rows.column_names)]


def dataset_records(
    name: str,
    splits,
    names: Sequence[str],
    image_column: str = "image",
    mask_column: str = "mask",
    stem_column: str | None = None,
):
    """
    The rows of the splits `names` of `splits` (`open_dataset(name)`'s), in that order, as one set of records with
    `stem`, `image` and `mask` columns. A row's stem is its `stem_column`'s value (a file name without its folder and
    image extension: `case0001_slice061`, so that `group_pattern` keeps a scan's slices in one split and evaluation
    stacks them per volume), else the dataset's `stem` column, else `<split>-<row:06d>`; stems must be unique.
    """
    import datasets

    missing = [split for split in names if split not in splits]
    if missing:
        raise ValueError(f"`dataset_split` {missing[0]!r}: {name} has the splits {list(splits)}.")
    parts = [_hub_records(name, split, splits[split], image_column, mask_column, stem_column) for split in names]
    for index, part in enumerate(parts[1:], 1):
        try:
            parts[index] = part if part.features == parts[0].features else part.cast(parts[0].features)
        except Exception as error:
            raise ValueError(
                f"`dataset` {name}: its {names[index]!r} split's columns do not match {names[0]!r}'s ({error})."
            ) from error
    records = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    repeated = sorted(stem for stem, count in Counter(records["stem"]).items() if count > 1)
    if repeated:
        raise ValueError(
            f"`dataset` {name}: its {stem_column or 'stem'!r} column repeats stems ({repeated[:3]}); stems name rows "
            "once."
        )
    return records


def record_pairs(records) -> Sequence[SegmentationPair]:
    """Dataset records (`stem`, `image`, `mask`) as `SegmentationPair`s, each row decoded only when it is read."""
    return _RecordPairs(records)


class _RecordPairs(Sequence):
    """`record_pairs`' lazy sequence: a slice stays lazy (`select`), an item is one decoded row."""

    def __init__(self, records) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _RecordPairs(self.records.select(range(*index.indices(len(self)))))
        row = self.records[index]
        return SegmentationPair(row["stem"], row["image"], row["mask"])


def _hub_records(name: str, split: str, dataset, image_column: str, mask_column: str, stem_column: str | None = None):
    """One split's rows with only `stem`, `image` and `mask` columns (`dataset_records`' stems)."""
    wanted = {image_column: "`image_column`", mask_column: "`mask_column`", stem_column: "`stem_column`"}
    missing = [column for column in wanted if column is not None and column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`dataset` {name}: its {split!r} split has no column(s) {missing}; it has {dataset.column_names}: set "
            f"{' and '.join(wanted[c] for c in missing)} to {'one' if len(missing) == 1 else 'two'} of them."
        )
    stem_column = stem_column or ("stem" if "stem" in dataset.column_names else None)
    if stem_column in (image_column, mask_column):
        stem_column = None
    stems = (
        [_row_stem(value) for value in dataset[stem_column]]
        if stem_column
        else [f"{split}-{i:06d}" for i in range(len(dataset))]
    )
    dataset = dataset.select_columns([image_column, mask_column])  # another `mask` or `stem` column cannot clash
    return dataset.rename_columns({image_column: "image", mask_column: "mask"}).add_column("stem", stems)


def _row_stem(value) -> str:
    """A stem column's value as a stem: a file name loses its folder and image extension; any other value is kept,
    path separators made `_` (a stem names the row's files: overlays, CSV rows)."""
    text = str(value).strip()
    path = Path(text)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else re.sub(r"[\\/]", "_", text)


def validate_records(
    records,
    num_classes: int = 1,
    on_error: str = "skip",
    mask_values: Mapping[int, int] | None = None,
    source: str = "dataset",
):
    """
    `validate_pairs` for a dataset's records (`load_hub_dataset`): every row's image and mask decoded once; a row
    without a mask, an unreadable image or mask, or a mask whose size differs from its image is a problem named
    `<source> row <stem>`. Returns the usable records (`select`ed) and the problems.
    """
    good, problems = [], []
    for index, record in enumerate(records):
        name = f"{source} row {record['stem']}"
        if record["image"] is None or record["mask"] is None:
            problems.append(DataProblem(name, f"no {'image' if record['image'] is None else 'mask'}"))
            continue
        try:
            image = to_rgb_array(record["image"])
        except Exception as error:
            problems.append(DataProblem(name, f"unreadable image ({error})"))
            continue
        problem = check_mask(record["mask"], (image.shape[1], image.shape[0]), name, num_classes, mask_values)
        if problem is None:
            good.append(index)
        else:
            problems.append(problem)
    settle_problems(problems, on_error)
    return (records if len(good) == len(records) else records.select(good)), problems


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; samples with several prompts are padded to the batch's most (`prompt_classes` 0: padding)."""
    if "prompt_classes" not in samples[0]:
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    most = max(len(s["prompt_classes"]) for s in samples)
    padded = []
    for sample in samples:
        missing = most - len(sample["prompt_classes"])
        boxes = torch.cat([sample["input_boxes"], sample["input_boxes"][:1].expand(missing, 4)])
        classes = torch.cat([sample["prompt_classes"], sample["prompt_classes"].new_zeros(missing)])
        padded.append({**sample, "input_boxes": boxes, "prompt_classes": classes})
    return {key: torch.stack([s[key] for s in padded]) for key in padded[0]}


__all__ = [
    "AugmentationConfig",
    "NUMPY_PAIR_FOLDERS",
    "NUMPY_CASE_SUFFIXES",
    "numpy_training_files",
    "DEFAULT_GROUP_PATTERN",
    "BIDS_SUBJECT",
    "DataConfig",
    "DataProblem",
    "LOSSLESS_FORMATS",
    "VALIDATION_SPLIT_NAMES",
    "MaskValuesError",
    "ITK_SUFFIXES",
    "IMAGE_KINDS",
    "LABEL_VOLUME_SUFFIXES",
    "CHANNEL_SUFFIX",
    "find_layouts",
    "mask_names",
    "masks_named",
    "image_mask_suffix",
    "masks_beside_images",
    "is_image_file",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "class_id_of",
    "class_prompting",
    "extra_masks",
    "image_files_in",
    "image_stem",
    "mask_folder_naming",
    "mask_naming",
    "mask_name_prefix",
    "mask_name_suffix",
    "SegmentationDataset",
    "SegmentationPair",
    "augment",
    "check_mask",
    "check_pair",
    "collate",
    "compile_group_pattern",
    "convert_structure_masks",
    "default_scan_spacing",
    "folder_window",
    "case_folder_group",
    "ungrouped_slices",
    "discover_pairs",
    "group_of",
    "is_itk_volume",
    "is_volume",
    "label_volume_suffix",
    "volume_stem",
    "volume_suffix",
    "volumes_in",
    "load_hub_dataset",
    "open_dataset",
    "dataset_records",
    "labelled_splits",
    "record_pairs",
    "load_splits",
    "make_splits",
    "mask_box",
    "mask_clicks",
    "parse_mask_values",
    "random_clicks",
    "read_class_file",
    "read_class_names",
    "folder_class_names",
    "label_classes",
    "classes_by_name",
    "structure_words",
    "STRUCTURE_ABBREVIATIONS",
    "STRUCTURE_ALIASES",
    "class_file",
    "dataset_class_names",
    "read_mask",
    "mask_pixels",
    "read_scan_spacing",
    "records_from_pairs",
    "select_split",
    "resolve_split_names",
    "select_split_records",
    "split_stems",
    "split_metadata",
    "slice_index",
    "settle_problems",
    "validate_pairs",
    "validate_records",
    "write_splits",
]
