"""2-D DICOM images (radiographs, mammograms, ultrasound and endoscopy stills): read as a viewer shows them, by
`segment()`, `imedsam predict`, `imedsam evaluate` and training folders, their masks too (CBIS-DDSM's ROI masks)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, dicom_skeleton, tiny_model, write_dicom_image, write_dicom_series
from PIL import Image

import imedsam_hf.processing_imedsam as processing_module
from imedsam_hf import IMedSamProcessor, segment
from imedsam_hf.cli import main
from imedsam_hf.data import (
    DataConfig,
    SegmentationDataset,
    discover_pairs,
    image_files_in,
    read_mask,
    records_from_pairs,
    validate_pairs,
)
from imedsam_hf.processing_imedsam import is_volume_slice, open_image, read_dicom_image, to_rgb_array
from imedsam_hf.volumes import dicom_series_in, read_volume

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pydicom") is None, reason="pydicom is not installed")

# A radiograph's stored values: 12 bits used of 16, a bright bone-like band across a darker background.
XRAY = (np.arange(24 * 32, dtype=np.int64).reshape(24, 32) * 5 % 4096).astype(np.uint16)


def windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) to 0..255, written out here as the standard gives it."""
    unit = np.where(
        values <= center - 0.5 - (width - 1) / 2,
        0.0,
        np.where(values > center - 0.5 + (width - 1) / 2, 1.0, (values - (center - 0.5)) / (width - 1) + 0.5),
    )
    return np.round(unit * 255).astype(np.uint8)


def test_2d_dicom_images_read_as_a_viewer_shows_them(tmp_path):
    # The file's own window, on the values after the modality rescale (a CT slice saved alone: HU = stored - 1024).
    read = read_dicom_image(write_dicom_image(XRAY, tmp_path / "xray.dcm", window=(2000, 1500)))
    assert read.dtype == np.uint8 and read.shape == (24, 32)
    np.testing.assert_array_equal(read, windowed(XRAY.astype(float), 2000, 1500))
    ct = write_dicom_image(XRAY, tmp_path / "ct.dcm", modality="CT", intercept=-1024, window=(40, 400))
    np.testing.assert_array_equal(read_dicom_image(ct), windowed(XRAY - 1024.0, 40, 400))
    # SIGMOID, no window (the values' own min/max), MONOCHROME1 (bright = low values: inverted).
    sigmoid = read_dicom_image(write_dicom_image(XRAY, tmp_path / "s.dcm", window=(2000, 1500), voi_function="SIGMOID"))
    expected = np.round(255 / (1 + np.exp(-4 * (XRAY - 2000.0) / 1500))).astype(np.uint8)
    np.testing.assert_array_equal(sigmoid, expected)
    plain = read_dicom_image(write_dicom_image(XRAY, tmp_path / "plain.dcm"))
    np.testing.assert_array_equal(plain, np.round((XRAY - 0.0) / XRAY.max() * 255).astype(np.uint8))
    inverted = read_dicom_image(write_dicom_image(XRAY, tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - plain)
    # Colour: RGB as stored, YBR_FULL back to RGB (within the colour transform's rounding).
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_dicom_image(write_dicom_image(rgb, tmp_path / "rgb.dcm", modality="ES")), rgb)
    ybr = processing_module.require_pydicom().pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
    back = read_dicom_image(write_dicom_image(ybr, tmp_path / "ybr.dcm", photometric="YBR_FULL"))
    assert np.abs(back.astype(int) - rgb).max() <= 2
    # A file of any name with the DICM preamble is DICOM; opened as a PIL image that knows its file.
    write_dicom_image(XRAY, tmp_path / "IM0001", window=(2000, 1500))
    image = open_image(tmp_path / "IM0001")
    assert image.mode == "L" and image.filename == str(tmp_path / "IM0001")
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "IM0001")[..., 1], read.astype(np.float32))
    assert open_image(tmp_path / "rgb.dcm").mode == "RGB"


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data not available")
def test_an_endoscope_s_jpeg_dicom_reads_as_the_jpeg_it_carries(tmp_path):
    """Endoscopes store stills as JPEG inside DICOM (VL Endoscopic Image, YBR_FULL_422, JPEG Baseline): a real
    Kvasir polyp's own JPEG bytes wrapped that way read as the pixels PIL decodes from the .jpg file."""
    pydicom = processing_module.require_pydicom()
    from pydicom.uid import JPEGBaseline8Bit, VLEndoscopicImageStorage

    source = sorted((SHARED_DATA / "Kvasir-SEG-sample" / "images").glob("*.jpg"))[0]
    expected = np.asarray(Image.open(source).convert("RGB"))
    dataset = dicom_skeleton(VLEndoscopicImageStorage, "ES", transfer_syntax=JPEGBaseline8Bit)
    dataset.Rows, dataset.Columns = expected.shape[:2]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "YBR_FULL_422", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.LossyImageCompression = "01"
    dataset.PixelData = pydicom.encaps.encapsulate([source.read_bytes()])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / "endoscopy.dcm", enforce_file_format=True)
    read = read_dicom_image(tmp_path / "endoscopy.dcm")
    assert read.shape == expected.shape and np.abs(read.astype(int) - expected).max() <= 2  # decoders' IDCT rounding


def test_dicom_files_that_are_not_one_2d_image_are_refused_by_name(tmp_path, monkeypatch):
    frames = write_dicom_image(np.stack([XRAY, XRAY]), tmp_path / "cine.dcm", modality="US", frames=2)
    with pytest.raises(ValueError, match=r"cine\.dcm: a DICOM file of 2 frames \(a cine loop.*save the frame you want"):
        read_dicom_image(frames)
    empty = write_dicom_image(XRAY, tmp_path / "report.dcm", with_pixels=False)
    with pytest.raises(ValueError, match=r"report\.dcm: a DICOM file without an image"):
        read_dicom_image(empty)
    (tmp_path / "junk.dcm").write_bytes(b"not a scan")
    with pytest.raises(ValueError, match=r"junk\.dcm: cannot be read as DICOM \(not a DICOM file"):
        to_rgb_array(tmp_path / "junk.dcm")
    cut = write_dicom_image(XRAY, tmp_path / "cut.dcm")
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.dcm: cannot be read as DICOM \("):
        open_image(cut)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        processing_module.importlib.util, "find_spec", lambda name, *a: None if name == "pydicom" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"reading DICOM files needs pydicom.*pip install pydicom"):
        open_image(frames)


def test_2d_images_and_slices_of_a_scan_are_told_apart(tmp_path):
    """A slice records its place in the patient; a radiograph or a screen capture does not. A series folder with a
    screen capture beside its slices reads as the series alone, and the capture is the folder's one image."""
    pytest.importorskip("dicom2nifti")
    hu = np.full((8, 8, 4), -1000.0)
    hu[2:6, 2:6, 1:3] = 40
    affine = np.diag([-1.5, -1.5, 2.5, 1.0])
    export = tmp_path / "export"
    write_dicom_series(hu, affine, export / "alone")
    write_dicom_series(hu, affine, export / "series")
    capture = write_dicom_image(XRAY, export / "series" / "dose_report.dcm", modality="CT")
    # The scanner's scout (localizer) in the same flat folder: its own series, a position in the patient, and no slice.
    scout = write_dicom_image(
        XRAY,
        export / "series" / "IM0000",
        modality="CT",
        slice_of_a_scan=True,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    # A treatment planning system's export is flat too: its dose grid (RTDOSE: frames at a position in the patient).
    dose = write_dicom_image(
        np.stack([XRAY] * 3), export / "series" / "RD.1.2.dcm", modality="RTDOSE", frames=3, slice_of_a_scan=True
    )
    slice_alone = write_dicom_image(XRAY, tmp_path / "slice.dcm", modality="CT", slice_of_a_scan=True)
    assert not is_volume_slice(capture) and is_volume_slice(slice_alone) and not is_volume_slice(scout)
    assert not is_volume_slice(dose)
    assert image_files_in(export / "series") == [capture]  # the scout and the dose: neither slices nor images
    assert dicom_series_in(export) == [export / "alone", export / "series"]
    np.testing.assert_array_equal(read_volume(export / "series").data, read_volume(export / "alone").data)
    xrays = tmp_path / "xrays"
    write_dicom_image(XRAY, xrays / "a.dcm")
    write_dicom_image(XRAY, xrays / "IM0002")
    assert dicom_series_in(xrays) == [] and [p.name for p in image_files_in(xrays)] == ["IM0002", "a.dcm"]
    with pytest.raises(ValueError, match=r"xrays: a folder without DICOM slices in it \(2-D DICOM images"):
        read_volume(xrays)
    # segment(): a 2-D DICOM image is an image; a slice of a scan points to the volume reader.
    model = tiny_model()
    from_file = segment(model, str(xrays / "a.dcm"), box=[4, 3, 20, 18])
    from_array = segment(model, read_dicom_image(xrays / "a.dcm"), box=[4, 3, 20, 18])
    assert torch.equal(torch.as_tensor(from_file.mask), torch.as_tensor(from_array.mask))
    with pytest.raises(ValueError, match=r"slice\.dcm: a DICOM slice, and segment\(\) takes one 2-D image"):
        segment(model, str(slice_alone), box=[4, 3, 20, 18])


def test_predict_segments_2d_dicom_images_as_the_pictures_a_viewer_shows(tmp_path, capsys):
    """`imedsam predict` on a folder of DICOM radiographs (named `.dcm` or not) and on one file writes the masks it
    writes for the same images saved as PNG; a slice of a scan given alone is still sent to its series' folder."""
    tiny_model().save_pretrained(tmp_path / "model")
    write_dicom_image(XRAY, tmp_path / "dicom" / "chest.dcm", window=(2000, 1500))
    write_dicom_image(XRAY[::-1], tmp_path / "dicom" / "IM0002", photometric="MONOCHROME1")
    (tmp_path / "png").mkdir()
    for path in image_files_in(tmp_path / "dicom"):
        Image.fromarray(read_dicom_image(path)).save(tmp_path / "png" / f"{path.stem}.png")
    argv = ["predict", "--model", str(tmp_path / "model"), "--box", "4,3,20,18"]
    assert main([*argv, str(tmp_path / "dicom"), "--out", str(tmp_path / "from_dicom")]) == 0
    assert main([*argv, str(tmp_path / "png"), "--out", str(tmp_path / "from_png")]) == 0
    written = sorted(p.name for p in (tmp_path / "from_dicom").iterdir())
    assert written == ["IM0002.png", "chest.png"] == sorted(p.name for p in (tmp_path / "from_png").iterdir())
    for name in written:
        dicom_mask = np.asarray(Image.open(tmp_path / "from_dicom" / name))
        assert dicom_mask.shape == (24, 32)
        np.testing.assert_array_equal(dicom_mask, np.asarray(Image.open(tmp_path / "from_png" / name)))
    assert main([*argv, str(tmp_path / "dicom" / "chest.dcm"), "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["chest.png"]
    # A cine loop beside it: named, skipped, the other image written (exit 1).
    write_dicom_image(np.stack([XRAY, XRAY]), tmp_path / "dicom" / "cine.dcm", modality="US", frames=2)
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "dicom"), "--out", str(tmp_path / "some")]) == 1
    assert "cine.dcm: a DICOM file of 2 frames" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["IM0002.png", "chest.png"]
    # A DICOM export (patient / study / series folders, files named by their UIDs): every radiograph below the folder
    # given, written under the same sub-folders, each UID kept whole; pictures below it (a masks/ folder) are no input.
    series = tmp_path / "export" / "patient" / "study" / "series"
    write_dicom_image(XRAY, series / "1.2.840.5.4", window=(2000, 1500))
    write_dicom_image(XRAY[::-1], series / "1.2.840.5.5", window=(2000, 1500))
    (tmp_path / "export" / "masks").mkdir()
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "export" / "masks" / "x.png")
    assert main([*argv, str(tmp_path / "export"), "--out", str(tmp_path / "export_out")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "export_out")) for p in (tmp_path / "export_out").rglob("*.png"))
    assert written == ["patient/study/series/1.2.840.5.4.png", "patient/study/series/1.2.840.5.5.png"]
    # Their masks and --boxes entries are named by the whole UID too.
    (tmp_path / "uid_masks").mkdir()
    mask = np.zeros((24, 32), np.uint8)
    mask[3:18, 4:20] = 255
    for uid in ("1.2.840.5.4", "1.2.840.5.5"):
        Image.fromarray(mask).save(tmp_path / "uid_masks" / f"{uid}.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"1.2.840.5.4": [4, 3, 19, 17], "1.2.840.5.5": [4, 3, 19, 17]}))
    base = ["predict", "--model", str(tmp_path / "model"), str(series)]
    assert main([*base, "--boxes-from-masks", str(tmp_path / "uid_masks"), "--out", str(tmp_path / "by_masks")]) == 0
    assert main([*base, "--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "by_boxes")]) == 0
    for uid in ("1.2.840.5.4", "1.2.840.5.5"):
        by_masks, by_boxes = (np.asarray(Image.open(tmp_path / d / f"{uid}.png")) for d in ("by_masks", "by_boxes"))
        np.testing.assert_array_equal(by_masks, by_boxes)
    slice_alone = write_dicom_image(XRAY, tmp_path / "slice.dcm", modality="CT", slice_of_a_scan=True)
    capsys.readouterr()
    assert main([*argv, str(slice_alone), "--out", str(tmp_path / "none")]) == 2
    assert "slice.dcm: a slice of a DICOM series; give the folder of its series" in capsys.readouterr().err


def test_training_folders_of_dicom_images_and_dicom_masks(tmp_path):
    """images/*.dcm with PNG masks (or DICOM masks, as CBIS-DDSM ships its ROI masks) make the samples the same
    images as PNG make; an unreadable DICOM image is reported by name and skipped like any other."""
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:26] = 255
    for root, kind in ((tmp_path / "dicom", "dcm"), (tmp_path / "png", "png")):
        for index, stem in enumerate(("a", "b")):
            pixels = np.roll(XRAY, 3 * index, axis=1)
            if kind == "dcm":
                write_dicom_image(pixels, root / "images" / f"{stem}.dcm", window=(2000, 1500))
            else:
                (root / "images").mkdir(parents=True, exist_ok=True)
                Image.fromarray(windowed(pixels.astype(float), 2000, 1500)).save(root / "images" / f"{stem}.png")
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / "a.png")
    write_dicom_image(mask.astype(np.uint16), tmp_path / "dicom" / "masks" / "b.dcm")  # a DICOM mask, 0/255
    Image.fromarray(mask).save(tmp_path / "png" / "masks" / "b.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "dicom" / "masks" / "b.dcm"), (mask > 0).astype(np.int64))
    processor = IMedSamProcessor(image_size=32)
    samples = {}
    for kind in ("dicom", "png"):
        pairs, problems = discover_pairs(tmp_path / kind)
        good, problems = validate_pairs(pairs, problems=problems)
        assert [p.stem for p in good] == ["a", "b"] and not problems
        dataset = SegmentationDataset(records_from_pairs(good), processor, DataConfig(augment=None), train=False)
        samples[kind] = [dataset[0], dataset[1]]
    for dicom, png in zip(samples["dicom"], samples["png"]):
        for key in ("pixel_values", "labels", "input_boxes"):
            assert torch.equal(dicom[key], png[key]), key
    # A DICOM export's files carry no extension (IM0001) or are named by their UID: found by their preamble, each
    # paired with the mask of its whole name.
    exported = tmp_path / "export"
    for name in ("IM0001", "1.2.840.5.4", "1.2.840.5.5"):
        write_dicom_image(XRAY, exported / "images" / name, window=(2000, 1500))
        (exported / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(exported / "masks" / f"{name}.png")
    (exported / "images" / "notes.txt").write_text("not an image")
    pairs, problems = discover_pairs(exported)
    assert sorted(p.stem for p in pairs) == ["1.2.840.5.4", "1.2.840.5.5", "IM0001"] and not problems
    good, problems = validate_pairs(pairs)
    assert len(good) == 3 and not problems
    (tmp_path / "dicom" / "images" / "a.dcm").write_bytes(b"broken")
    pairs, problems = discover_pairs(tmp_path / "dicom")
    good, problems = validate_pairs(pairs, problems=problems)
    assert (
        [p.stem for p in good] == ["b"]
        and "a.dcm" in str(problems[0])
        and "cannot be read as DICOM" in str(problems[0])
    )
