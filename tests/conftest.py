"""Shared fixtures: tiny I-MedSAM configurations that run in milliseconds, and the shared real data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import imedsam_hf  # noqa: F401  (registers the Auto classes and the PEFT type)
from imedsam_hf import IMedSamConfig, IMedSamModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IMEDSAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def btcv_dataset(folder: Path, stems: list[str], mask_column: str = "mask", id2label: bool = False) -> Path:
    """Shared BTCV slices saved as a dataset (`save_to_disk`: a `train` split) with image, mask and `file_name`
    (`<stem>.png`) columns; with `id2label`, the organ names in an `id2label.json` beside it. Returns `folder`."""
    import datasets

    ct = SHARED_DATA / "BTCV-Synapse-CT"
    rows = {
        "image": [str(ct / "images" / f"{s}.png") for s in stems],
        mask_column: [str(ct / "masks" / f"{s}.png") for s in stems],
        "file_name": [f"images/{s}.png" for s in stems],
    }
    features = {"image": datasets.Image(), mask_column: datasets.Image(), "file_name": datasets.Value("string")}
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).save_to_disk(str(folder))
    if id2label:
        classes = json.loads((ct / "classes.json").read_text())["classes"]
        (folder / "id2label.json").write_text(json.dumps(classes))
    return folder


def load_script(path: str, name: str) -> ModuleType:
    """A script of the repository (`path` from its root, e.g. "training/train.py"; not a package module) imported
    as a new module `name`: every call runs it afresh, so a test that patches it leaves other tests' copies alone."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    output_channels=32,
    num_pos_feats=16,
    window_size=2,
    global_attn_indexes=[1],
    mlp_dim=64,
    initializer_range=0.02,
)
TINY_PROMPT = dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8)
TINY_DECODER = dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32)
# Dense querying by default: the paper's protocol, whose refined-point counts the tests check exactly.
TINY_IMPLICIT = dict(
    coarse_hidden_sizes=[64, 32], coarse_feature_size=16, fine_hidden_sizes=[32, 16], query_mode="dense"
)


# LiteMedSAM's TinyViT at test size: four stages, 64 px input, a 16x16 embedding.
TINY_TINYVIT = dict(
    model_type="i_medsam_tinyvit",
    image_size=64,
    embed_dims=[8, 16, 16, 32],
    depths=[1, 1, 1, 1],
    num_heads=[1, 2, 2, 4],
    window_sizes=[3, 3, 5, 3],
    output_channels=32,
    num_pos_feats=16,
)


def tiny_tinyvit_model(seed: int = 0) -> IMedSamModel:
    """A tiny I-MedSAM on a TinyViT encoder (BatchNorm statistics randomised, as after training), in eval mode."""
    config = IMedSamConfig(
        vision_config=dict(TINY_TINYVIT),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=4, mask_input_channels=8),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
        coarse_hidden_sizes=[64, 32],
        coarse_feature_size=16,
        fine_hidden_sizes=[32, 16],
        query_mode="dense",
    )
    torch.manual_seed(seed)
    model = IMedSamModel(config)
    randomize_batchnorm(model)
    return model.eval()


def writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (root ignores permission bits, so tests check what really holds)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def tiny_config(**overrides) -> IMedSamConfig:
    settings = dict(
        vision_config=dict(TINY_VISION),
        prompt_encoder_config=dict(TINY_PROMPT),
        mask_decoder_config=dict(TINY_DECODER),
        **TINY_IMPLICIT,
    )
    settings.update(overrides)
    return IMedSamConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> IMedSamModel:
    torch.manual_seed(seed)
    model = IMedSamModel(tiny_config(**overrides))
    randomize_batchnorm(model)
    return model.eval()


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics, as after training."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable parameter away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def dicom_skeleton(sop_class: str, modality: str, transfer_syntax: str = "", study: str = "", series: str = ""):
    """A DICOM dataset with its file meta, SOP class and instance, modality, an anonymous patient and its study and
    series UIDs (new ones unless given): what every file the tests write starts from. `transfer_syntax`: Explicit
    VR Little Endian (uncompressed) unless given."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PatientID = modality, "anonymous"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    return dataset


def write_dicom_series(
    data,
    affine,
    folder: Path,
    *,
    intercept: float = -1024.0,
    description: str = "abdomen",
    series_uid: str = "",
    skip: tuple[int, ...] = (),
    modality: str = "CT",
) -> list[Path]:
    """Write the `(X, Y, Z)` volume `data` (values in HU) with the RAS `affine` as a CT DICOM series, one file per
    slice `k` (`skip`: slices left out), the way scanners store them: each file's rows along `j` and columns along `i`,
    its position and orientation in LPS patient coordinates, stored values `HU - intercept` with RescaleIntercept.
    Files get random names (no .dcm), so nothing but their positions orders them. `modality` ``"MR"``: an MR series
    (MR Image Storage, values as they are, no rescale type). Returns the files."""
    import numpy as np

    pytest.importorskip("pydicom")
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)  # voxel -> LPS mm
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    stored = np.round(np.asarray(data, dtype=float) - intercept).astype(np.int16)
    files = []
    for k in range(stored.shape[2]):
        if k in skip:
            continue
        storage = MRImageStorage if modality == "MR" else CTImageStorage
        dataset = dicom_skeleton(storage, modality, study=study, series=series)
        dataset.Manufacturer, dataset.FrameOfReferenceUID = "imedsam-hf tests", frame
        dataset.SeriesNumber, dataset.SeriesDescription, dataset.InstanceNumber = 2, description, k + 1
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.ImageOrientationPatient = [float(v) for v in (*(lps[:3, 0] / steps[0]), *(lps[:3, 1] / steps[1]))]
        dataset.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        dataset.PixelSpacing = [float(steps[1]), float(steps[0])]  # between rows, between columns
        dataset.SliceThickness = float(steps[2])
        dataset.Rows, dataset.Columns = stored.shape[1], stored.shape[0]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.RescaleIntercept, dataset.RescaleSlope = int(intercept), 1
        if modality == "CT":
            dataset.RescaleType = "HU"
        dataset.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / generate_uid(prefix=None).replace(".", "")[:16]
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_dicom_image(
    pixels,
    path: Path,
    *,
    modality: str = "DX",
    photometric: str = "",
    window: tuple[float, float] | None = None,
    voi_function: str = "",
    intercept: float = 0.0,
    slope: float = 1.0,
    frames: int = 1,
    slice_of_a_scan: bool = False,
    with_pixels: bool = True,
    image_type: tuple[str, ...] = (),
) -> Path:
    """Write `pixels` (`(H, W)` integers, stored as they are: uint16 or int16; `(H, W, 3)` uint8 RGB, or YBR_FULL
    when `photometric` says so; `(F, H, W)` with `frames`) as a 2-D DICOM image of `modality`, the way an X-ray
    system or an endoscope stores one: no position in the patient unless `slice_of_a_scan` (a CT slice saved alone).
    `window`: `(center, width)` written as its VOI window. Returns `path`."""
    import numpy as np

    pytest.importorskip("pydicom")
    from pydicom.uid import SecondaryCaptureImageStorage

    pixels = np.asarray(pixels)
    colour = pixels.ndim == 3 and frames == 1
    dataset = dicom_skeleton(SecondaryCaptureImageStorage, modality)
    if slice_of_a_scan:
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient = [1.0, 0, 0, 0, 1.0, 0], [0.0, 0.0, 0.0]
    if image_type:
        dataset.ImageType = list(image_type)
    if with_pixels:
        dataset.Rows, dataset.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
        if frames > 1:
            dataset.NumberOfFrames = frames
        if colour:
            dataset.SamplesPerPixel, dataset.PlanarConfiguration = 3, 0
            dataset.PhotometricInterpretation = photometric or "RGB"
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        else:
            signed = pixels.dtype.kind == "i"
            dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric or "MONOCHROME2"
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
            dataset.PixelRepresentation = int(signed)
            pixels = pixels.astype(np.int16 if signed else np.uint16)
            dataset.RescaleIntercept, dataset.RescaleSlope = intercept, slope
        if window is not None:
            dataset.WindowCenter, dataset.WindowWidth = window
        if voi_function:
            dataset.VOILUTFunction = voi_function
        dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def run_python(code: str, cwd: Path, env_extra: dict | None = None) -> str:
    """Run `code` in a fresh interpreter (no state shared with this test process); return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, **(env_extra or {}))
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(autouse=True)
def allocator_calls(monkeypatch):
    """The allocator tuning of `training/train.py` and the `imedsam` command line, recorded instead of applied: it is
    process-wide and would change the memory behaviour of every later test in this process (its real effect is tested
    in a fresh interpreter)."""
    calls = []
    monkeypatch.setattr("imedsam_hf.runtime.keep_freed_memory", lambda: calls.append(1) or "allocator (test): kept")
    return calls


@pytest.fixture(autouse=True)
def torch_threads():
    """Commands under test may set torch's thread count (`--num-threads`), which is process-wide: restored after each
    test, so that later tests compute with the threads they started with (a fresh interpreter's exact-equality checks
    depend on it: reductions split over other thread counts round differently)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=generator)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [5.0, 5.0, 60.0, 30.0]])
    return pixel_values, boxes


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """A tiny transformers SamModel folder, the backbone of the training tests."""
    from test_convert import TINY_SAM
    from transformers import SamConfig, SamModel

    path = tmp_path_factory.mktemp("sam") / "tiny-sam"
    torch.manual_seed(0)
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(path)
    return path


@pytest.fixture
def polyps(tmp_path):
    """Five real Kvasir-SEG pairs, copied so a test can break some of them."""
    import shutil

    root = tmp_path / "polyps"
    shutil.copytree(SHARED_DATA / "Kvasir-SEG-sample", root)
    return root
