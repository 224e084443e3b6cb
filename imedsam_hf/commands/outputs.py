"""Where `imedsam predict` writes: one planned file per input, refused before anything runs when it cannot be written
safely (a clash between inputs, a file already there, an input or mask folder, a read-only folder)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..data import (
    IMAGE_KINDS,
    VOLUME_SUFFIXES,
    find_layout,
    image_files_in,
    image_mask_suffix,
    image_stem,
    is_volume,
    label_volume_suffix,
    volume_stem,
)
from ..files import atomic_write
from ..version import __version__
from ..volumes import BIDS_DESCRIPTION, is_bids_root


def inputs_with_roots(paths: Sequence[str], volumes: bool = False) -> list[tuple[Path, Path]]:
    """Each input file with the folder it was given in: the folder named on the command line, or its own parent.
    `volumes`: the paths are scans, and a folder is one scan (a DICOM series), not a folder of images."""
    files: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not volumes:
            found = image_files_in(path, dicom_below=True)
            if not found:
                raise ValueError(
                    f"{path}: the folder holds no images ({IMAGE_KINDS}), no 3-D volumes "
                    f"({', '.join(VOLUME_SUFFIXES)}) and no DICOM series.{folders_hint(path)}"
                )
            files.extend((file, path) for file in found)
        elif not path.exists():
            raise ValueError(f"{path}: no such file or folder.")
        else:
            files.append((path, path.parent))
    if not files:
        raise ValueError("No input images given.")
    return files


def folders_hint(path: Path) -> str:
    """What to give instead of a folder holding only folders: a data set's images folder (`find_layout`: its
    `images/` beside `masks/`), or its folders of images (DeepLesion's `Images_png/<series>/`); nothing otherwise."""
    with contextlib.suppress(ValueError, OSError):
        images, masks = find_layout(path)
        if images != masks:
            return f" It is a data set: give its images ({images}), and --boxes-from-masks {masks} for their boxes."
    folders = (p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith("."))
    below = list(itertools.islice((p for p in folders if image_files_in(p)), 3))  # DeepLesion has 10,594 of them
    if not below:
        return ""
    return (
        f" Its folders {', '.join(p.name for p in below[:2])}{', ...' if len(below) > 2 else ''} hold images: give "
        f"them ({path}/*), each image then named by its path below {path} (outputs, --boxes entries, masks: a/x.png)."
    )


def input_places(paths: Sequence[str], volumes: bool = False) -> dict[Path, Path]:
    """Each input file (absolute) with its path relative to the common folder of all inputs (`inputs_with_roots`):
    `a/x.jpg` and `b/x.jpg` give `a/x.jpg` and `b/x.jpg`, inputs from one folder their names. Outputs are written at
    these places (`plan_outputs`), and `--boxes` entries and masks are found by them (DeepLesion's
    `Images_png/000001_01_01/109.png` beside `000002_01_01/109.png`)."""
    inputs = inputs_with_roots(paths, volumes)
    sources = list(dict.fromkeys(Path(os.path.abspath(file)) for file, _ in inputs))
    common = Path(os.path.commonpath([os.path.abspath(root) for _, root in inputs]))
    return {source: source.relative_to(common) for source in sources}


def plan_outputs(
    paths: Sequence[str], out: str | os.PathLike, suffixes: Sequence[str] = (".png",), volumes: bool = False
) -> dict[Path, list[Path]]:
    """
    The output files of each input: `<out>/<relative path><suffix>` for each suffix (`.png`, `_overlay.png`,
    `.nii.gz`), the path relative to the common folder of all inputs, so `a/x.jpg` and `b/x.jpg` give `a/x.png` and
    `b/x.png` and inputs from one folder give flat names. Two inputs that would write one file (`x.jpg` and `x.png`)
    are an error naming both, before anything is written. `volumes`: the paths are scans, 3-D files or DICOM series
    folders (`study/1.2.840.5` gives `1.2.840.5.nii.gz`: a folder's name is kept whole), and the suffix `.nii.gz`
    stands for the label volume in its scan's format (`data.label_volume_suffix`: `scan.mha` gives `scan.mha`);
    for images `.png` stands for the mask, in a 2-D NIfTI / NRRD / MetaImage image's own format
    (`data.image_mask_suffix`: grand-challenge's `x.mha` gives `x.mha`).
    """
    folder = Path(out)
    plan: dict[Path, list[Path]] = {}
    writers: dict[Path, Path] = {}
    for source, name in input_places(paths, volumes).items():
        # A file's extension goes (`image_stem`: a DICOM file named by its UID keeps it whole, `1.2.840.5.4` and
        # `1.2.840.5.5` being two images); a DICOM series' folder keeps its name whole.
        if not source.is_dir():
            name = name.with_name(volume_stem(source) if is_volume(source) else image_stem(source))
        if volumes:  # `.nii.gz`: the label volume in its scan's format
            mine = {".nii.gz": label_volume_suffix(source)}
        else:  # `.png`: the mask, in its image's format for a 2-D NIfTI / NRRD / MetaImage image
            mine = {".png": image_mask_suffix(source)}
        targets = [folder / f"{name}{mine.get(suffix, suffix)}" for suffix in suffixes]
        for target in targets:
            if target in writers:
                raise ValueError(
                    f"{writers[target]} and {source} would both be written to {target}; rename one of them or "
                    "predict them separately."
                )
            writers[target] = source
        plan[source] = targets
    return plan


def refuse_existing(targets: Sequence[Path], out: str | os.PathLike, overwrite: bool) -> None:
    """Files to write that already exist are an error naming them, unless `overwrite` (`--overwrite`)."""
    existing = [target for target in targets if target.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(path) for path in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ValueError(
            f"--out {out}: {len(existing)} of the files to write already exist ({shown}); pass --overwrite to "
            "replace them."
        )


def check_output_folder(out: str | os.PathLike, inputs: Sequence[str], masks_folder: str | None = None) -> None:
    """
    `--out` must be a folder (or not exist yet) outside every input folder and the `--boxes-from-masks` folder:
    masks written there would overwrite inputs or ground truth, or be read as inputs by the next run. A BIDS data
    set's `derivatives/` is the place its derived files go (`ds/derivatives/imedsam`): never read as its scans or,
    named as the scans, as their masks (`volumes.bids_scans`, `volumes.bids_derivatives`).
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder.")
    target = folder.resolve()
    guarded = []  # (folder, what it is, whether its subfolders are refused too)
    for raw in inputs:
        path = Path(raw)
        guarded.append(
            (path, f"the input folder {path}", True) if path.is_dir() else (path.parent, f"the folder of {path}", False)
        )
    if masks_folder:
        guarded.append((Path(masks_folder), f"the --boxes-from-masks folder {masks_folder}", True))
    for path, role, subfolders in guarded:
        place = path.resolve()
        if is_bids_root(place) and place / "derivatives" in target.parents:
            continue  # a BIDS data set's derivatives/<pipeline>/
        if target == place or (subfolders and place in target.parents):
            raise ValueError(
                f"--out {out}: is {role if target == place else 'inside ' + role}; masks written there could "
                "overwrite its files or be read as inputs. Choose a folder outside it."
            )


def bids_pipeline_folder(out: str | os.PathLike) -> Path | None:
    """The derivative data set `out` writes into when it lies in a BIDS data set's `derivatives/` (the folder below
    `derivatives/` holding it: `ds/derivatives/imedsam` for `ds/derivatives/imedsam` or below); None otherwise."""
    target = Path(out).resolve()
    for child, parent in zip((target, *target.parents), target.parents):
        if parent.name == "derivatives" and is_bids_root(parent.parent):
            return child
    return None


def describe_bids_derivative(out: str | os.PathLike, model: str) -> Path | None:
    """Where `out` is in a BIDS data set's `derivatives/` (:func:`bids_pipeline_folder`) and its derivative data set
    has no `dataset_description.json` yet, write one as the BIDS derivatives specification asks (`DatasetType`
    derivative, `GeneratedBy` this package and `model`, the data set's `BIDSVersion`); the file written, or None."""
    folder = bids_pipeline_folder(out)
    if folder is None or (folder / BIDS_DESCRIPTION).exists():
        return None
    try:
        source = json.loads((folder.parent.parent / BIDS_DESCRIPTION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        source = {}
    description = {
        "Name": "I-MedSAM segmentations",
        "BIDSVersion": str(source.get("BIDSVersion", "1.8.0")) if isinstance(source, dict) else "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "imedsam-hf", "Version": __version__, "Description": f"imedsam predict --model {model}"}
        ],
    }
    text = json.dumps(description, indent=2) + "\n"
    return atomic_write(folder / BIDS_DESCRIPTION, lambda path: Path(path).write_text(text, encoding="utf-8"))


def check_writable(out: str | os.PathLike) -> None:
    """Create `out` if needed and write a probe file into it, so a read-only folder fails once, before any image."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write into it ({error.strerror or error}).") from None


__all__ = [
    "bids_pipeline_folder",
    "check_output_folder",
    "check_writable",
    "describe_bids_derivative",
    "inputs_with_roots",
    "plan_outputs",
    "refuse_existing",
]
