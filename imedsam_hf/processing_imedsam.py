"""Image, prompt and mask pre- and post-processing for I-MedSAM, shared by training, evaluation and inference.

The model sees a square `image_size` frame: the image resized so that its longest side fits (aspect ratio kept,
antialiased), intensity-normalised, and zero-padded at the bottom and right. Prompts given in original-image
pixels are scaled by the same factors. Masks come back at the original size (or any size) by querying the
implicit decoder over the unpadded part of the frame (`output_region`), never by upsampling a coarse grid.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_imedsam import MR_WINDOW, TINYVIT_MODEL_TYPE, unknown_arguments_message

SAM_IMAGE_MEAN = (123.675, 116.28, 103.53)
SAM_IMAGE_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("mean_std", "minmax")
ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
#: Names of DICOM files read as 2-D images (:func:`read_dicom_image`); a file of another name is read as DICOM when it
#: has the ``DICM`` preamble (:func:`is_dicom_file`).
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: NIfTI file names (`.nii.gz` first, so that a name is matched by its whole extension).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Files of ITK's formats, read with SimpleITK (the ``itk`` extra): NRRD (3D Slicer's scans and its segmentations,
#: `.seg.nrrd`; `.nhdr` a detached header) and MetaImage (grand-challenge.org's `.mha`; `.mhd` beside its `.raw`).
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The names of the 3-D image formats, NIfTI first: a 3-D scan or label volume (`volumes`), or a 2-D image stored in
#: one of them (:func:`is_grid_image`: grand-challenge.org's 2-D `.mha`, CAMUS's echocardiograms in `.nii.gz`).
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
#: Transfer syntaxes whose pixels decode to exactly what was stored (uncompressed ones are not in the list: they are
#: not compressed at all); a mask under any other (baseline JPEG, lossy JPEG 2000) may carry compression noise.
LOSSLESS_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
)


def describe(source: Any) -> str:
    """How an input is named in error messages: its path if it has one."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    filename = getattr(source, "filename", None)
    return filename or f"<{type(source).__name__}>"


@contextlib.contextmanager
def opened_image(path: str | os.PathLike, what: str = "image") -> Iterator[Image.Image]:
    """
    A file as a fully decoded PIL image in its stored mode and format (a truncated file fails here), open for the
    block; a missing or unreadable file is a ValueError naming it and `what` it was meant to be.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such {what} file.")
    try:
        with Image.open(path) as image:
            image.load()
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read the {what} ({error}).") from error


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM (Part 10) file: `DICM` after its 128-byte preamble, whatever its name (`IM0001`, `x.dcm`)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A file read as DICOM: named `.dcm`/`.dicom` (a file without the preamble is then named as unreadable, not
    handed to PIL) or holding the preamble."""
    return str(path).lower().endswith(DICOM_EXTENSIONS) or is_dicom_file(path)


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it has no text."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def require_module(module: str, package: str, what: str, extra: str, otherwise: str = "") -> Any:
    """The module `module` (pip `package`), which `what` needs; an `ImportError` naming the `extra` that installs it
    (and `otherwise`, another way) when it is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{what} needs {package}, which is not installed: pip install {package} (the [{extra}] extra: pip "
            f'install ".[{extra}]" in a clone of imedsam-hf){", " + otherwise if otherwise else ""}.'
        )
    return importlib.import_module(module)


def require_pydicom() -> Any:
    """The `pydicom` module; an `ImportError` naming the ``dicom`` extra when it is not installed."""
    return require_module("pydicom", "pydicom", "reading DICOM files", "dicom", "or save the images as PNG")


def dicom_dataset(path: str | os.PathLike, pixels: bool = True, tags: Sequence[str] | None = None) -> Any:
    """A DICOM file read by pydicom (`pixels`: with its pixels decoded, so a truncated or undecodable file fails here;
    `tags`: those elements only, for a quick look at the header). A file pydicom cannot read is a ValueError naming
    it."""
    pydicom = require_pydicom()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such DICOM file.")
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=not pixels, specific_tags=tags)
        if pixels and "PixelData" in dataset:
            _ = dataset.pixel_array  # decoded now (pydicom keeps it)
    except pydicom.errors.InvalidDicomError as error:
        raise ValueError(f"{path}: cannot be read as DICOM (not a DICOM file: no 'DICM' header)") from error
    except Exception as error:  # OSError, a truncated element, a missing decoder
        raise ValueError(f"{path}: cannot be read as DICOM ({first_line(error)})") from error
    return dataset


#: DICOM modalities whose files hold pixels that are no image to segment: a segmentation (SEG), a radiotherapy dose
#: grid (RTDOSE, stored beside the planning CT's slices in a planning system's export, at a position in the patient).
NOT_IMAGES = ("SEG", "RTDOSE")


def dicom_kind(path: str | os.PathLike) -> str:
    """
    What the DICOM file `path` holds, from its header: ``"slice"``, one slice of a cross-sectional scan (CT, MR, PET:
    it records where it lies in the patient, `ImagePositionPatient` and `ImageOrientationPatient`); ``"volume"``, a
    whole scan in one multi-frame file (an enhanced CT, MR or PET, or a legacy converted one: several frames described
    by functional groups, each frame's position among them); ``"image"``, a
    2-D image (radiographs, mammograms, ultrasound, endoscopy or dermoscopy stills, screen captures); ``"other"``, no
    image to segment (a DICOM SEG, an RT structure set, plan or dose grid, a structured report, a presentation state,
    or a CT's localizer: the scout a scanner stores beside the axial slices, `ImageType` LOCALIZER). A file whose header cannot be read is an image
    when named `.dcm`/`.dicom` and a slice otherwise (`IM0001`), so that one reader names it, never both.
    """
    tags = ["ImagePositionPatient", "ImageOrientationPatient", "Rows", "Modality", "ImageType", "NumberOfFrames"]
    try:
        header = dicom_dataset(path, pixels=False, tags=[*tags, "SharedFunctionalGroupsSequence"])
    except ValueError:
        return "image" if str(path).lower().endswith(DICOM_EXTENSIONS) else "slice"
    localizer = "LOCALIZER" in [str(value).upper() for value in (header.get("ImageType") or [])]
    if "Rows" not in header or str(header.get("Modality", "")) in NOT_IMAGES or localizer:
        return "other"
    if int(header.get("NumberOfFrames", 1) or 1) > 1 and "SharedFunctionalGroupsSequence" in header:
        return "volume"
    return "slice" if "ImagePositionPatient" in header and "ImageOrientationPatient" in header else "image"


def is_volume_slice(path: str | os.PathLike) -> bool:
    """Whether the DICOM file `path` is one slice of a cross-sectional scan (:func:`dicom_kind`)."""
    return dicom_kind(path) == "slice"


def _dicom_pixels(path: Path, what: str) -> Any:
    """The dataset of a DICOM file read as one 2-D `what` (image or mask), its pixels decoded; a file without pixels
    or of several frames is a ValueError naming it and what to do."""
    dataset = dicom_dataset(path)
    annotation = {"SEG": "a DICOM SEG", "RTSTRUCT": "an RT Structure Set"}.get(str(dataset.get("Modality", "")))
    if annotation:
        raise ValueError(
            f"{path}: {annotation} (the segmentation of a series, not one 2-D {what}); it is read onto its series as a "
            "label volume (volumes.read_label_volume; `imedsam predict` takes it as the labels of the series it "
            "references)."
        )
    if "PixelData" not in dataset:
        kind = getattr(getattr(dataset, "SOPClassUID", None), "name", "") or "no pixel data"
        raise ValueError(f"{path}: a DICOM file without an image ({kind}); give the DICOM {what} itself.")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(
            f"{path}: a DICOM file of {frames} frames (a cine loop, or a multi-frame scan); one 2-D {what} per file is "
            "read: save the frame you want as PNG; a multi-frame CT, MR or PET scan is read as a volume "
            "(volumes.read_volume, `imedsam predict`)."
        )
    return dataset


def _window_unit(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM's VOI window (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID) of `values` -> [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _first_value(value: Any) -> float:
    """A DICOM number that may hold several (`WindowCenter` "40\\400"): the first."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def read_dicom_image(path: str | os.PathLike) -> np.ndarray:
    """
    A 2-D DICOM image (radiograph, mammogram, ultrasound, endoscopy or dermoscopy still, a CT slice saved alone) as a
    viewer shows it: `(H, W)` uint8 for grey, `(H, W, 3)` uint8 for colour. Grey pixels go through the modality
    rescale (HU for CT), then the file's first VOI window (`WindowCenter`/`WindowWidth`, LINEAR, LINEAR_EXACT or
    SIGMOID) or its VOI LUT, or else their own min/max; MONOCHROME1 (bright = low values) is inverted. YBR colour
    comes back RGB, palette colour through its lookup table.

    Raises:
        ValueError: naming the file: not readable as DICOM, no pixels (a report), several frames (a cine or an
            enhanced multi-frame scan), or samples that are neither grey nor colour.
        ImportError: pydicom is not installed.
    """
    path = Path(path)
    dataset = _dicom_pixels(path, "image")
    pixels = require_pydicom().pixels
    array = dataset.pixel_array  # YBR comes back RGB (pydicom's default)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        colour = pixels.apply_color_lut(array, dataset).astype(np.float64) / (2**bits - 1) * 255.0
        return np.round(np.clip(colour, 0, 255)).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 3:
        if array.dtype == np.uint8:
            return np.ascontiguousarray(array)
        top = 2 ** int(dataset.get("BitsStored", 8 * array.dtype.itemsize)) - 1
        return np.round(np.clip(array.astype(np.float64) / top * 255.0, 0, 255)).astype(np.uint8)
    if array.ndim != 2:
        raise ValueError(f"{path}: DICOM pixels of shape {array.shape}; a grey or RGB 2-D image is read.")
    values = np.asarray(pixels.apply_modality_lut(array, dataset), dtype=np.float64)
    if "WindowCenter" in dataset and "WindowWidth" in dataset and _first_value(dataset.WindowWidth) > 0:
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        unit = _window_unit(values, _first_value(dataset.WindowCenter), _first_value(dataset.WindowWidth), function)
    else:
        if "VOILUTSequence" in dataset:
            values = np.asarray(pixels.apply_voi_lut(values, dataset, prefer_lut=True), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        unit = (values - low) / max(high - low, 1e-8)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.round(unit * 255.0).astype(np.uint8)


def dicom_mask_pixels(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """A mask stored as a 2-D DICOM image (CBIS-DDSM's ROI masks): its stored values `(H, W)` as they are (no rescale
    or window), and whether they are exact (uncompressed or a lossless transfer syntax)."""
    dataset = _dicom_pixels(Path(path), "mask")
    array = dataset.pixel_array
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", ""))
    exact = not syntax or syntax in LOSSLESS_TRANSFER_SYNTAXES or not require_pydicom().uid.UID(syntax).is_compressed
    return (array[..., 0] if array.ndim == 3 else array), exact


def require_simpleitk() -> Any:
    """The `SimpleITK` module; an `ImportError` naming the ``itk`` extra when it is not installed."""
    what = "reading or writing NRRD / MetaImage files (.nrrd, .mha, .mhd)"
    return require_module("SimpleITK", "SimpleITK", what, "itk")


def _grid_format(path: str | os.PathLike) -> str:
    """`"nifti"`, `"itk"` or `""` (another name, or a 3D Slicer segmentation, which is never an image) by name."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "itk" if name.endswith(ITK_SUFFIXES) and not name.endswith(".seg.nrrd") else ""


def _itk_header(path: str | os.PathLike) -> Any:
    """SimpleITK's reader of `path` with its header read (size, spacing, geometry; no voxels); SimpleITK's own error
    for a file it cannot read."""
    reader = require_simpleitk().ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


@functools.lru_cache(maxsize=8192)
def _grid_dimensions(path: str, state: tuple[int, int]) -> int | None:
    """How many axes the header of a NIfTI / NRRD / MetaImage file gives its grid (read once per file `state`:
    modification time and size); None when it cannot be read here (damaged, or SimpleITK missing)."""
    del state  # the cache key only
    try:
        if _grid_format(path) == "nifti":
            import nibabel as nib

            return len(nib.load(path).shape)
        if importlib.util.find_spec("SimpleITK") is None:
            return None
        return int(_itk_header(path).GetDimension())
    except Exception:  # noqa: BLE001 - any unreadable header: not an image here; reading it says what is wrong
        return None


def is_grid_image(path: str | os.PathLike) -> bool:
    """A 2-D image stored in a 3-D image format (NIfTI, NRRD, MetaImage: its header gives two axes), read as an image,
    not a scan: grand-challenge.org's 2-D `.mha` inputs, CAMUS's echocardiograms (`.nii.gz`), their masks. Only the
    header is read, once per file state. False for any other file, a missing or unreadable one, a 3D Slicer
    segmentation, and a NRRD / MetaImage file where SimpleITK is not installed (a scan then, which says so when read).
    A one-slice 3-D file (``(X, Y, 1)``) is a scan of one slice."""
    if not _grid_format(path):
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return _grid_dimensions(str(path), (stat.st_mtime_ns, stat.st_size)) == 2


def read_grid_image(path: str | os.PathLike) -> np.ndarray:
    """
    A 2-D image stored as NIfTI, NRRD or MetaImage (:func:`is_grid_image`) -> its stored values, `(H, W)` or
    `(H, W, C)` for a colour image (NRRD / MetaImage vector pixels): the file's first axis across (columns), its
    second down (rows), as SimpleITK's `GetArrayFromImage` and ITK's viewers (ITK-SNAP, grand-challenge.org) lay a
    2-D image out; no rescale beyond the file's own slope and intercept. An image and its mask read here share one
    layout. A file that cannot be read is a ValueError naming it.
    """
    try:
        if _grid_format(path) == "nifti":
            import nibabel as nib

            values = np.asarray(nib.load(str(path)).dataobj)
            array = values.T
        else:
            sitk = require_simpleitk()
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - nibabel's and ITK's own errors, one line naming the file
        raise ValueError(f"{path}: cannot read the image ({first_line(error)}).") from error
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{path}: has shape {array.shape}, not a 2-D image (H, W) or colour image (H, W, 3).")
    return np.ascontiguousarray(array)


def open_image(source: ImageInput) -> Image.Image | np.ndarray:
    """Open a path as a PIL image (fully decoded, so a truncated file fails here, with its name); a DICOM file as
    :func:`read_dicom_image` reads it; a 2-D image in a NIfTI / NRRD / MetaImage file as the array of its stored
    values (:func:`read_grid_image`)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if is_grid_image(source):
        return read_grid_image(source)
    if is_dicom_path(source) and Path(source).is_file():
        decoded = Image.fromarray(read_dicom_image(source))
        decoded.filename = str(source)
        return decoded
    with opened_image(source) as image:
        decoded = image.copy() if image.mode not in ("P", "PA") else image.convert("RGBA")
    decoded.filename = str(source)  # a copy forgets its file: errors about it (`describe`) name it, not <Image>
    return decoded


def grid_image_spacing(path: str | os.PathLike) -> tuple[float, float] | None:
    """A 2-D NIfTI / NRRD / MetaImage image's pixel size `(row, column)` (mm) as its header gives it, in
    :func:`read_grid_image`'s layout; None for any other file."""
    if not is_grid_image(path):
        return None
    if _grid_format(path) == "nifti":
        import nibabel as nib

        across, down = nib.load(str(path)).header.get_zooms()[:2]
    else:
        across, down = _itk_header(path).GetSpacing()[:2]
    return float(down), float(across)


def image_size(source: ImageInput) -> tuple[int, int]:
    """`(W, H)` of an image (a path is opened: :func:`open_image`), as PIL's `size` gives it, for an array too."""
    image = open_image(source)
    if isinstance(image, Image.Image):
        return image.size
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    height, width = array.shape[1:3] if _channels_first(array) else array.shape[:2]
    return int(width), int(height)


def _channels_first(array: np.ndarray) -> bool:
    """Whether an image array is laid out `(C, H, W)` (a tensor's layout) rather than `(H, W[, C])`."""
    return array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)


def to_rgb_array(source: ImageInput) -> np.ndarray:
    """
    Any supported image (path, PIL, numpy or torch; grey, RGB, RGBA, palette, 16-bit, float) -> `(H, W, 3)` float32
    with values in [0, 255]. Alpha is dropped. 16-bit and float images are rescaled from their own min/max.
    """
    image = open_image(source)
    if isinstance(image, Image.Image):
        if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "1"):
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"Unsupported image type {type(image).__name__}: pass a path, PIL image or array.")
    if _channels_first(array):
        array = np.moveaxis(array, 0, -1)  # channels-first tensor
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"{describe(source)}: unsupported image shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)."
        )
    array = array[..., :3]
    if min(array.shape[:2]) < 1:
        raise ValueError(f"{describe(source)}: empty image of shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if array.dtype == bool:
        return array.astype(np.float32) * 255
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{describe(source)}: the image contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    return (array - low) / max(high - low, 1e-8) * 255.0


def hu_window(data: np.ndarray, level: float, width: float) -> np.ndarray:
    """Window raw CT values (HU) to 8-bit grey: ``level - width/2 -> 0``, ``level + width/2 -> 255``, linear between
    (`volumes.window`, the one implementation for volumes and 2-D images).

    Values outside the window are clipped; results are rounded to the nearest integer.

    Args:
        data: any shape, any real dtype (HU).
        level, width: the window's centre and width in HU (``width > 0``).

    Returns:
        ``uint8`` array of ``data``'s shape.
    """
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    scaled = (np.asarray(data, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def looks_like_hu(data: np.ndarray | torch.Tensor) -> bool:
    """Whether intensities look like CT in Hounsfield units, to which a model's recorded CT window applies: not 8-bit,
    some value below 0 (air is -1000, fat about -100) and a range wider than 255. Images normalised elsewhere
    ([0, 1], z-scores), MR and CT stored with an offset do not."""
    values = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if values.dtype in (np.uint8, np.bool_) or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        return False
    low, high = float(values.min()), float(values.max())
    return low < 0 and high - low > 255


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit grey PNGs and TIFFs


def check_rescale_intercept(value: float | None) -> None:
    """A ValueError naming `rescale_intercept` unless it is None or an offset a 16-bit picture can carry (a finite
    number within +-65536: DeepLesion's -32768, -1024)."""
    if value is not None and not (math.isfinite(value) and abs(value) <= 65536):
        raise ValueError(
            f"`rescale_intercept` {value:g}: HU = stored value + it, a finite offset within +-65536 (DeepLesion's "
            "PNGs: -32768; HU + 1024 ones: -1024)."
        )


def stored_hu(image: ImageInput, rescale_intercept: float | None) -> ImageInput:
    """
    A 16-bit grey picture (PNG, TIFF; a path or a PIL image) that stores CT as HU minus `rescale_intercept` (DICOM's
    RescaleIntercept, slope 1: DeepLesion's PNGs hold HU + 32768, so -32768; other sets HU + 1024, so -1024) as its
    Hounsfield units, float32 `(H, W)`: what :func:`hu_windowed` then windows as a CT slice. None leaves every image as
    it is; with an intercept, any other image (8-bit, colour, an array) is a ValueError naming it and the fix.
    """
    if rescale_intercept is None:
        return image
    check_rescale_intercept(rescale_intercept)
    picture = open_image(image) if isinstance(image, (str, os.PathLike)) else image
    if not isinstance(picture, Image.Image) or picture.mode not in SIXTEEN_BIT_MODES:
        kind = (
            f"a {picture.mode} picture"
            if isinstance(picture, Image.Image)
            else f"not a picture ({type(picture).__name__})"
        )
        raise ValueError(
            f"{describe(image)}: is {kind}; `rescale_intercept` applies to 16-bit grey pictures (PNG, TIFF) storing "
            "CT as HU plus an offset: leave it out for this image."
        )
    return np.asarray(picture).astype(np.float32) + np.float32(rescale_intercept)


def sixteen_bit_caveat(image: ImageInput, window: Sequence[float] | str | None) -> str | None:
    """What to say (once: the words name no file) when a model that records a CT `window` is given a 16-bit grey
    picture as it is (rescaled min-max by :func:`to_rgb_array`, not windowed): it may store HU plus an offset
    (`rescale_intercept`); None otherwise."""
    if window is None or window == MR_WINDOW:
        return None
    mode = None
    if isinstance(image, Image.Image):
        mode = image.mode
    elif isinstance(image, (str, os.PathLike)) and not is_grid_image(image) and not is_dicom_path(image):
        with contextlib.suppress(OSError, ValueError, UnidentifiedImageError), Image.open(image) as opened:
            mode = opened.mode
    if mode not in SIXTEEN_BIT_MODES:
        return None
    return (
        "16-bit grey pictures are rescaled min-max, not windowed as this model's training images were (it records a "
        "CT window): if they store HU plus an offset (DeepLesion's PNGs: HU + 32768), give `rescale_intercept` "
        "(-32768) and they are windowed as those were."
    )


def hu_windowed(
    image: ImageInput, window: Sequence[float] | str | None, rescale_intercept: float | None = None
) -> ImageInput:
    """
    A CT image in Hounsfield units windowed to 8-bit grey by `window` `(level, width)` (:func:`hu_window`): an array
    (numpy or torch, one channel: pydicom's or SimpleITK's rescaled pixels) or a 2-D NIfTI / NRRD / MetaImage file
    (:func:`read_grid_image`) whose values look like HU (:func:`looks_like_hu`). `window` as a model records it
    (`configuration_imedsam.training_window`): None, or an MR window (``"mr"``, not HU), leaves every image as it is,
    as does anything else (pictures, 8-bit and colour images, arrays that do not look like HU); a 16-bit grey picture
    given so is rescaled min-max later, with a warning (:func:`sixteen_bit_caveat`). With `rescale_intercept`, a
    16-bit grey picture storing HU plus an offset (:func:`stored_hu`; any other image a ValueError) is windowed,
    whatever its range; a CT `window` is then needed (a ValueError names `rescale_intercept` otherwise).
    """
    if rescale_intercept is not None:
        if window is None or window == MR_WINDOW:
            raise ValueError(
                f"`rescale_intercept` {rescale_intercept:g} gives the pictures' HU, but no CT window is given to "
                "window them with (the model records none): give `window` (e.g. btcv)."
            )
        return hu_window(stored_hu(image, rescale_intercept), *window)
    if window is None or window == MR_WINDOW:
        return image
    if caveat := sixteen_bit_caveat(image, window):
        warnings.warn(caveat, UserWarning, stacklevel=2)
    if isinstance(image, (str, os.PathLike)) and is_grid_image(image):  # a 2-D CT image stored as .mha / .nii.gz
        image = read_grid_image(image)
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2 or not looks_like_hu(array):
        return image
    return hu_window(array, *window)


def resize_labels(labels: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """
    The one resize of a class-id map `(H, W)` -> `shape`: nearest neighbour (`nearest-exact`), never bilinear, which
    would thin the foreground and invent class ids. Returns an array of the input's dtype.
    """
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if tuple(array.shape) == tuple(shape):
        return array
    # torch's `nearest-exact` rule, source index floor((i + 0.5) * in / out) in float32, applied by indexing: the
    # result is identical and needs no float copy (a 20000 x 20000 mask stays 400 MB instead of passing 2 GB).
    rows, columns = (_nearest_exact_indices(n_in, n_out) for n_in, n_out in zip(array.shape, shape))
    return array[np.ix_(rows, columns)]


def _nearest_exact_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each of `size_out` destination pixels under torch's `nearest-exact` resize."""
    if size_out < 1:
        raise ValueError(f"`shape` must be positive, got a side of {size_out}.")
    scale = np.float32(size_in / size_out)
    centres = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale
    return np.minimum(np.floor(centres).astype(np.int64), size_in - 1)


CALL_ARGUMENTS = ("images", "input_boxes", "input_points", "input_labels", "return_tensors")
BOX_SHAPES = (
    "A box is 4 numbers x0, y0, x1, y1. One image takes [x0, y0, x1, y1], a list of boxes [[x0, y0, x1, y1], ...] "
    "or SamProcessor's nesting [[[x0, y0, x1, y1], ...]] (batch of 1, boxes, 4); a batch of images one box or one "
    "list of boxes per image, e.g. [[[x0, y0, x1, y1]], [[x0, y0, x1, y1]]]."
)


def _box_depth(value: Any) -> int | None:
    """
    How deeply a box prompt nests: 1 for one box (a flat sequence of numbers, whatever its length), 2 for a list of
    boxes, 3 for SamProcessor's (batch, boxes, 4); 0 for a number; None for anything else (text, ragged nesting).
    """
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim if value.dtype != object else _box_depth(value.tolist())
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        return 0
    if not isinstance(value, (list, tuple)) or not value:
        return None
    depths = {_box_depth(item) for item in value}
    return 1 + depths.pop() if len(depths) == 1 and None not in depths else None


def _shown(value: Any) -> str:
    text = repr(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    return text if len(text) <= 120 else f"{text[:117]}..."


def _one_image_boxes(input_boxes: Any) -> Any:
    """One image's `input_boxes` in any accepted nesting -> one box or a list of boxes; malformed ones are refused
    with the shapes that are accepted."""
    depth = _box_depth(input_boxes)
    if depth in (1, 2):
        return input_boxes
    if depth == 3 and len(input_boxes) == 1:
        return input_boxes[0]
    if depth == 3:
        raise ValueError(
            f"`input_boxes` holds boxes for {len(input_boxes)} images ({_shown(input_boxes)}) but one image was "
            f"given. {BOX_SHAPES}"
        )
    raise ValueError(f"`input_boxes` {_shown(input_boxes)} is not a box or a list of boxes. {BOX_SHAPES}")


class IMedSamProcessor(BaseImageProcessor):
    r"""
    Pre- and post-processing of [`IMedSamModel`] inputs and outputs, saved as `preprocessor_config.json`.

    Args:
        image_size (`int`): side of the model's square input frame.
        normalization (`str`): `"mean_std"` (SAM: `(x - image_mean) / image_std` on 0-255 values) or `"minmax"`
            (LiteMedSAM: per-image min-max to [0, 1] after resizing).
        image_mean, image_std (`tuple[float, float, float]`): used by `"mean_std"`.
        antialias (`bool`): antialiased bilinear downsizing.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 1024,
        normalization: str = "mean_std",
        image_mean: Sequence[float] = SAM_IMAGE_MEAN,
        image_std: Sequence[float] = SAM_IMAGE_STD,
        antialias: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {normalization!r}.")
        self.image_size = int(image_size)
        self.normalization = normalization
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.antialias = antialias

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """`(new_height, new_width)` of an image once its longest side fits `image_size`."""
        scale = self.image_size / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def resize_image(self, image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """`(3, H, W)` float -> `(3, new_h, new_w)` (bilinear, antialiased when shrinking)."""
        return F.interpolate(image[None], size=shape, mode="bilinear", align_corners=False, antialias=self.antialias)[0]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """`(3, h, w)` 0-255 values -> the model's intensity normalisation."""
        if self.normalization == "minmax":
            return (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
        mean = torch.tensor(self.image_mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.image_std, dtype=image.dtype)[:, None, None]
        return (image - mean) / std

    def pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Zero-pad `(..., h, w)` at the bottom and right to `(..., image_size, image_size)`."""
        height, width = tensor.shape[-2:]
        return F.pad(tensor, (0, self.image_size - width, 0, self.image_size - height))

    def preprocess_image(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image -> pixel values `(3, S, S)`, its original `(H, W)` and its resized `(h, w)` inside the frame."""
        image = open_image(image)
        if isinstance(image, Image.Image):
            width, height = image.size
            image = self._shrink(image)
            array = to_rgb_array(image)
        else:
            array = to_rgb_array(image)
            height, width = array.shape[:2]
        shape = self.resized_shape(height, width)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        pixel_values = self.pad(self.normalize(self.resize_image(tensor, shape)))
        return pixel_values, (height, width), shape

    def _shrink(self, image: Image.Image) -> Image.Image:
        """
        Box-filter a huge image (longest side over 4096 px) by an integer factor, keeping at least
        max(4 x frame, 2048) px, before it becomes a float array: memory stays bounded (a 10000x10000 RGB image
        would need 1.2 GB as float32) and the antialiased resize that follows sees nearly the same content.
        Ordinary images are untouched, so preprocessing stays exactly the one a backbone was trained with.
        """
        side = max(image.size)
        factor = side // max(4 * self.image_size, 2048) if side > 4096 else 1
        if factor < 2:
            return image
        try:
            return image.reduce(factor)
        except (ValueError, NotImplementedError):  # modes PIL cannot reduce (e.g. some 16-bit ones)
            return image

    def resize_mask(self, mask: np.ndarray | torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """`(H, W)` class-id mask -> `(S, S)` long: nearest-neighbour resize into the frame, zero padding."""
        mask = np.asarray(mask)
        shape = shape or self.resized_shape(*mask.shape)
        return self.pad(torch.from_numpy(resize_labels(mask.astype(np.int64), shape)))

    def scale_coordinates(self, coordinates: np.ndarray, original: tuple[int, int], resized: tuple[int, int]):
        """`(..., 2k)` x, y, ... pairs in original pixels -> input-frame pixels."""
        scale = np.array([resized[1] / original[1], resized[0] / original[0]], dtype=np.float32)
        return coordinates.astype(np.float32).reshape(*coordinates.shape[:-1], -1, 2) * scale

    def check_box(self, box: Sequence[float], size: tuple[int, int], name: str) -> np.ndarray:
        """Validate an (x0, y0, x1, y1) box in original pixels of an image of `size` = (H, W)."""
        try:
            box = np.asarray(box, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: `input_boxes`: a box is 4 numbers x0, y0, x1, y1, got {box!r}.") from None
        height, width = size
        if box.shape != (4,) or not np.isfinite(box).all():
            raise ValueError(
                f"{name}: `input_boxes`: a box is 4 numbers x0, y0, x1, y1, all finite, got {box.tolist()}."
            )
        x0, y0, x1, y1 = box.tolist()
        if x0 >= x1 or y0 >= y1:
            raise ValueError(f"{name}: `input_boxes`: box {box.tolist()} needs x0 < x1 and y0 < y1.")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"{name}: `input_boxes`: box {box.tolist()} lies outside the {width}x{height} image.")
        return np.clip(box, 0, [width, height, width, height]).astype(np.float32)

    @staticmethod
    def check_points(points: Any, labels: Any, size: tuple[int, int], name: str) -> tuple[np.ndarray, np.ndarray]:
        """
        Validate point prompts of an image of `size` = (H, W): `(N, 2)` finite (x, y) in original pixels, inside
        the image, and one label each, 1 (foreground) or 0 (background). A NaN or a point off the image would
        otherwise give a silently empty mask. Returns points `(N, 2)` float32 and labels `(N,)` int64.
        """
        try:
            array = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: `input_points`: expected (x, y) pairs of numbers, got {points!r}.") from None
        label = np.ones(len(array)) if labels is None else np.asarray(labels, dtype=np.float64).reshape(-1)
        if len(label) != len(array):
            raise ValueError(f"{name}: {len(array)} points but {len(label)} labels; give one label per point.")
        if not len(array):
            raise ValueError(f"{name}: `input_points` is empty; give at least one point, or none at all.")
        if not np.isfinite(array).all():
            bad = array[~np.isfinite(array).all(axis=1)][0].tolist()
            raise ValueError(f"{name}: `input_points`: point {bad} is not a finite (x, y) pair.")
        height, width = size
        outside = (array[:, 0] < 0) | (array[:, 0] > width) | (array[:, 1] < 0) | (array[:, 1] > height)
        if outside.any():
            raise ValueError(
                f"{name}: `input_points`: point {array[outside][0].tolist()} lies outside the {width}x{height} image."
            )
        if not np.isin(label, (0, 1)).all():
            raise ValueError(f"{name}: `input_labels` are 1 (foreground) or 0 (background), got {label.tolist()}.")
        return array, label.astype(np.int64)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        input_boxes: Sequence | None = None,
        input_points: Sequence | None = None,
        input_labels: Sequence | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess a batch. Prompts are per image, in original-image pixels: `input_boxes` one (x0, y0, x1, y1)
        each, or a list of boxes each (several prompts per image, the same number for every image; one image also
        takes SamProcessor's nesting `[[[x0, y0, x1, y1], ...]]`, batch of 1, boxes, 4; `BOX_SHAPES`),
        `input_points` `(num_points, 2)` each with `input_labels` `(num_points,)` (1 foreground, 0 background).

        Returns a `BatchFeature` with `pixel_values` `(B, 3, S, S)`, `original_sizes` and `reshaped_input_sizes`
        `(B, 2)`, `output_region` `(B, 4)` (the unpadded image in the frame, for the model's `output_region`),
        and the scaled `input_boxes` `(B, 4)` (`(B, P, 4)` for lists of boxes), `input_points` `(B, N, 2)`,
        `input_labels` `(B, N)` when given.
        Any other keyword is an error (a misspelt `input_box=` must not give a prompt-free input).
        """
        if kwargs:
            raise TypeError(unknown_arguments_message(f"{type(self).__name__}.__call__", kwargs, CALL_ARGUMENTS))
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("`images` is empty.")
        pixel_values, originals, resized = [], [], []
        for image in images:
            values, original, shape = self.preprocess_image(image)
            pixel_values.append(values)
            originals.append(original)
            resized.append(shape)
        data = {
            "pixel_values": torch.stack(pixel_values),
            "original_sizes": torch.tensor(originals),
            "reshaped_input_sizes": torch.tensor(resized),
            "output_region": self.output_region(resized),
        }
        if input_boxes is not None:
            data["input_boxes"] = self._boxes(
                [_one_image_boxes(input_boxes)] if single else input_boxes, images, originals, resized
            )
        if input_points is not None:
            data.update(self._points(images, input_points, input_labels, originals, resized, single))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _boxes(self, input_boxes, images, originals, resized) -> torch.Tensor:
        """Per-image box or list of boxes in original pixels -> `(B, 4)` or `(B, P, 4)` in input-frame pixels."""
        sequence = isinstance(input_boxes, (list, tuple, np.ndarray, torch.Tensor))
        if not sequence or _box_depth(input_boxes) == 1 or len(input_boxes) != len(images):
            given = f"{len(input_boxes)} entries" if sequence and _box_depth(input_boxes) != 1 else _shown(input_boxes)
            raise ValueError(f"`input_boxes`: {given} for {len(images)} images; give one entry per image. {BOX_SHAPES}")
        depths = [_box_depth(boxes) for boxes in input_boxes]
        for image, boxes, depth in zip(images, input_boxes, depths):
            if depth not in (1, 2):
                raise ValueError(f"{describe(image)}: `input_boxes` {_shown(boxes)} is not a box. {BOX_SHAPES}")
        nested = [depth == 2 for depth in depths]
        per_image = [boxes if is_list else [boxes] for boxes, is_list in zip(input_boxes, nested)]
        counts = sorted({len(boxes) for boxes in per_image})
        if any(nested) and (len(counts) != 1 or not all(nested)):
            raise ValueError(
                f"`input_boxes`: every image needs the same number of boxes (a list of boxes each), got {counts}."
            )
        scaled = [
            [
                self.scale_coordinates(self.check_box(box, size, describe(image)), size, shape).reshape(4)
                for box in boxes
            ]
            for boxes, size, shape, image in zip(per_image, originals, resized, images)
        ]
        if not scaled[0]:
            raise ValueError("`input_boxes`: an empty list of boxes; give at least one, or none at all.")
        stacked = torch.from_numpy(np.stack([np.stack(boxes) for boxes in scaled]))
        return stacked if any(nested) else stacked[:, 0]

    def _points(self, images, input_points, input_labels, originals, resized, single) -> dict[str, torch.Tensor]:
        if single:
            input_points = [input_points]
            input_labels = None if input_labels is None else [input_labels]
        if len(input_points) != len(images):
            raise ValueError(f"`input_points` has {len(input_points)} entries for {len(images)} images.")
        points, labels = [], []
        for i, image_points in enumerate(input_points):
            image_labels = None if input_labels is None else input_labels[i]
            array, label = self.check_points(image_points, image_labels, originals[i], describe(images[i]))
            points.append(self.scale_coordinates(array, originals[i], resized[i]).reshape(-1, 2))
            labels.append(label)
        length = max(len(p) for p in points)
        # Pad to a common count with SAM's padding label -10 (ignored by the prompt encoder).
        padded = np.zeros((len(points), length, 2), dtype=np.float32)
        padded_labels = np.full((len(points), length), -10, dtype=np.int64)
        for i, (p, label) in enumerate(zip(points, labels)):
            padded[i, : len(p)], padded_labels[i, : len(p)] = p, label
        return {"input_points": torch.from_numpy(padded), "input_labels": torch.from_numpy(padded_labels)}

    def output_region(self, reshaped_input_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
        """`(B, 4)` normalised (x0, y0, x1, y1) of each image's unpadded area in the input frame."""
        sizes = torch.as_tensor(reshaped_input_sizes, dtype=torch.float32).reshape(-1, 2)
        zeros = torch.zeros(len(sizes))
        return torch.stack([zeros, zeros, sizes[:, 1], sizes[:, 0]], dim=1) / self.image_size

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save with the processor's code and `auto_map`, so `AutoProcessor` loads it with or without the package."""
        self.register_for_auto_class("AutoImageProcessor")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @staticmethod
    def merge_prompt_masks(logits: torch.Tensor, class_ids: Sequence[int], threshold: float = 0.0) -> torch.Tensor:
        """
        One label map from the masks of several prompts of one image: logits `(P, 1, H, W)` (one binary mask per
        prompt, e.g. one box per organ) and the class id of each prompt -> `(H, W)` long. Where masks overlap, the
        prompt with the highest probability wins; 0 where none exceeds `threshold`.
        """
        if logits.ndim != 4 or logits.shape[1] != 1 or len(class_ids) != logits.shape[0]:
            raise ValueError(
                f"`logits` must be (num_prompts, 1, H, W) with one class id per prompt, got {tuple(logits.shape)} "
                f"and {len(class_ids)} ids."
            )
        best, index = logits[:, 0].max(dim=0)
        ids = torch.as_tensor(list(class_ids), dtype=torch.long, device=logits.device)
        return torch.where(best > threshold, ids[index], torch.zeros_like(index))

    @staticmethod
    def post_process_masks(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
        """
        Logits `(B, C, H, W)` from a model called with `output_size=original size` and `output_region` -> masks:
        `(B, H, W)` bool for one class (logit > threshold); for C classes `(B, H, W)` long class ids, 0 where no
        class exceeds the threshold.
        """
        if logits.shape[1] == 1:
            return logits[:, 0] > threshold
        best, index = logits.max(dim=1)
        return torch.where(best > threshold, index + 1, torch.zeros_like(index))


#: Test-time mirroring (nnU-Net's test-time augmentation): the mirrors of the image each choice predicts on, their
#: probabilities averaged. "h" flips left-right (columns), "v" up-down (rows), "hv" both; "" is the image as it is,
#: always first (its prompts are checked as the user gave them).
TTA_MIRRORS = {"none": ("",), "h": ("", "h"), "v": ("", "v"), "hv": ("", "h", "v", "hv")}


def tta_mirrors(tta: str, name: str = "`tta`") -> tuple[str, ...]:
    """The mirrors of a test-time augmentation choice (`TTA_MIRRORS`); an unknown one is an error naming `name`."""
    if tta not in TTA_MIRRORS:
        raise ValueError(
            f"{name} must be one of {', '.join(TTA_MIRRORS)} (mirrors averaged at test time), got {tta!r}."
        )
    return TTA_MIRRORS[tta]


def mirror_image(source: ImageInput, mirror: str) -> tuple[Image.Image | np.ndarray, tuple[int, int]]:
    """
    One image mirrored (`mirror` of `TTA_MIRRORS`: "", "h", "v" or "hv") in its own representation (a PIL image stays
    one, an array keeps its dtype and layout), so that it is read exactly as the original would be; and its `(H, W)`.
    """
    image = open_image(source)
    if isinstance(image, Image.Image):
        size = (image.height, image.width)
        if "h" in mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if "v" in mirror:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return image, size
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    rows = 1 if _channels_first(array) else 0
    axes = tuple(axis for flag, axis in (("v", rows), ("h", rows + 1)) if flag in mirror)
    mirrored = np.ascontiguousarray(np.flip(array, axes)) if axes else array
    return mirrored, (array.shape[rows], array.shape[rows + 1])


def mirror_prompts(values: Any, mirror: str, size: tuple[int, int]) -> Any:
    """
    Boxes `(..., 4)` (x0, y0, x1, y1) or points `(..., 2)` (x, y), in original pixels of an image of `size` (H, W),
    as they fall on the image mirrored by `mirror`: pixel index x -> W - 1 - x (a box's corners are its first and last
    pixels, `data.mask_box`), kept inside the frame. `None` stays `None`; lists come back as lists.
    """
    if values is None or not mirror:
        return values
    array = np.array(values, dtype=np.float32)
    height, width = size
    if "h" in mirror:
        columns = [0, 2] if array.shape[-1] == 4 else [0]
        array[..., columns] = width - 1 - array[..., columns[::-1]]
    if "v" in mirror:
        rows = [1, 3] if array.shape[-1] == 4 else [1]
        array[..., rows] = height - 1 - array[..., rows[::-1]]
    array = np.clip(array, 0, None)
    return array.tolist() if isinstance(values, (list, tuple)) else array


def mirrored_inputs(
    image: ImageInput, mirrors: Sequence[str], box: Any = None, points: Any = None
) -> Iterator[tuple[str, Image.Image | np.ndarray, tuple[int, int], Any, Any]]:
    """
    For each of `mirrors` (in order): `(mirror, image, (H, W), box, points)` with the image and its prompts mirrored
    (`mirror_image`, `mirror_prompts`). A path is read once, not once per mirror.
    """
    source = open_image(image)
    for mirror in mirrors:
        mirrored, size = mirror_image(source, mirror)
        yield mirror, mirrored, size, mirror_prompts(box, mirror, size), mirror_prompts(points, mirror, size)


def unmirror(maps: torch.Tensor, mirror: str) -> torch.Tensor:
    """Maps `(..., H, W)` predicted on a mirrored image, mirrored back onto the image."""
    dims = tuple(dim for flag, dim in (("v", -2), ("h", -1)) if flag in mirror)
    return torch.flip(maps, dims) if dims else maps


def mirrored_mean(probabilities: Sequence[torch.Tensor], mirrors: Sequence[str]) -> torch.Tensor:
    """The mean of probability maps `(..., H, W)` predicted on the mirrors of one image, each mirrored back first."""
    return torch.stack([unmirror(value.float(), mirror) for value, mirror in zip(probabilities, mirrors)]).mean(0)


def probability_logits(probability: torch.Tensor) -> torch.Tensor:
    """Logits of probabilities (mirrors averaged), so that thresholds and `post_process_masks` read them as they
    read one prediction's logits."""
    return torch.logit(probability.clamp(1e-7, 1 - 1e-7))


def processor_for_config(config) -> IMedSamProcessor:
    """The processor matching a model config: SAM mean/std for SAM ViTs, min-max for LiteMedSAM."""
    if config.vision_config.model_type == TINYVIT_MODEL_TYPE:
        return IMedSamProcessor(image_size=config.image_size, normalization="minmax")
    return IMedSamProcessor(image_size=config.image_size)


__all__ = [
    "DICOM_EXTENSIONS",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "dicom_dataset",
    "dicom_kind",
    "dicom_mask_pixels",
    "hu_window",
    "hu_windowed",
    "image_size",
    "first_line",
    "is_dicom_file",
    "is_dicom_path",
    "grid_image_spacing",
    "is_grid_image",
    "read_grid_image",
    "require_simpleitk",
    "is_volume_slice",
    "read_dicom_image",
    "require_pydicom",
    "looks_like_hu",
    "IMedSamProcessor",
    "TTA_MIRRORS",
    "mirror_image",
    "mirror_prompts",
    "mirrored_inputs",
    "mirrored_mean",
    "open_image",
    "opened_image",
    "probability_logits",
    "processor_for_config",
    "resize_labels",
    "to_rgb_array",
    "tta_mirrors",
    "unmirror",
]
