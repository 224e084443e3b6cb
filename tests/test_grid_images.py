"""2-D images stored in NIfTI, NRRD or MetaImage files: grand-challenge.org hands its 2-D tasks' images to algorithms
as `.mha`, CAMUS keeps its echocardiograms as `.nii.gz`. `imedsam predict x.mha` refused them ("holds 3 values per
voxel ... not a 3-D volume", "has shape (622, 529), not a 3-D volume"), and `imedsam evaluate` / training said to
convert a folder of them with `convert volumes`, which refuses 2-D files too."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_model
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.cli import main
from imedsam_hf.data import (
    DataConfig,
    SegmentationDataset,
    discover_pairs,
    image_files_in,
    image_stem,
    is_volume,
    read_mask,
    records_from_pairs,
    volumes_in,
)
from imedsam_hf.metrics import segmentation_scores
from imedsam_hf.processing_imedsam import grid_image_spacing, is_grid_image, read_grid_image
from imedsam_hf.volumes import write_image_mask

sitk = importlib.import_module("SimpleITK") if importlib.util.find_spec("SimpleITK") else None
needs_itk = pytest.mark.skipif(sitk is None, reason="SimpleITK (the [itk] extra) is not installed")
KVASIR = SHARED_DATA / "Kvasir-SEG-sample"


def kvasir_pairs(count: int = 2) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`(stem, RGB image (H, W, 3), 0/1 mask (H, W))` of the first shared Kvasir-SEG pairs."""
    pairs = []
    for path in sorted((KVASIR / "images").iterdir())[:count]:
        mask = next((KVASIR / "masks").glob(path.stem + ".*"))
        rgb = np.asarray(Image.open(path).convert("RGB"))
        pairs.append((path.stem, rgb, (np.asarray(Image.open(mask).convert("L")) > 127).astype(np.uint8)))
    return pairs


def save_grid(array: np.ndarray, path: Path, spacing=(0.4, 0.3), origin=(5.0, -2.0)) -> Path:
    """A 2-D image `(H, W[, 3])` as `path`: NIfTI by nibabel (its first axis across), NRRD / MetaImage by SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii.gz", ".nii")):
        affine = np.diag([-spacing[0], -spacing[1], 1.0, 1.0])
        affine[:2, 3] = origin
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.T), affine), str(path))
    else:
        image = sitk.GetImageFromArray(array, isVector=array.ndim == 3)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        sitk.WriteImage(image, str(path))
    return path


def hu_copy(png: Path) -> np.ndarray:
    """A BTCV PNG slice (made with the 'btcv' window, -125..275 HU) as the HU a scan held, air and bone outside the
    window (so that min-max would not give the PNG back)."""
    grey = np.asarray(Image.open(png).convert("L")).astype(np.float32)
    hu = grey / 255 * 400 - 125
    hu[grey == 0], hu[grey == 255] = -1000.0, 1200.0
    return hu


@needs_itk
def test_a_2d_file_in_a_3d_format_is_an_image_read_as_itk_lays_it_out(tmp_path):
    (stem, rgb, mask), *_ = kvasir_pairs(1)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    nifti = save_grid(grey, tmp_path / "a" / f"{stem}.nii.gz")
    mha = save_grid(rgb, tmp_path / "a" / "colour.mha")
    nrrd = save_grid(grey, tmp_path / "a" / "grey.nrrd")
    scan = tmp_path / "a" / "scan.nii.gz"  # a scan of one slice stays a scan, as do 3-D files
    nib.save(nib.Nifti1Image(grey.T[..., None].copy(), np.eye(4)), str(scan))
    for path in (nifti, mha, nrrd):
        assert is_grid_image(path) and not is_volume(path)
    assert not is_grid_image(scan) and is_volume(scan) and not is_grid_image(tmp_path / "a" / "gone.mha")
    np.testing.assert_array_equal(read_grid_image(nifti), grey)  # rows down, columns across, as SimpleITK reads it
    np.testing.assert_array_equal(read_grid_image(nifti), sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))))
    np.testing.assert_array_equal(read_grid_image(mha), rgb)
    np.testing.assert_array_equal(read_grid_image(nrrd), grey)
    for path in (nifti, mha):
        assert grid_image_spacing(path) == pytest.approx((0.3, 0.4))  # (row, column)
    assert grid_image_spacing(scan) is None
    assert [p.name for p in image_files_in(tmp_path / "a")] == sorted(["colour.mha", f"{stem}.nii.gz", "grey.nrrd"])
    assert [p.name for p in volumes_in(tmp_path / "a")] == ["scan.nii.gz"]
    assert image_stem(nifti) == stem and image_stem(mha) == "colour"
    # A mask stored so is read exactly, and a mask written for an image keeps its grid.
    save_grid(mask * 3, tmp_path / "m" / f"{stem}.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "m" / f"{stem}.nii.gz", 3), mask * 3)
    for image, suffix in ((mha, ".mha"), (nifti, ".nii.gz"), (nrrd, ".nrrd")):
        written = write_image_mask(mask, image, tmp_path / "out" / f"x{suffix}")
        back = sitk.ReadImage(str(written))
        assert back.GetSpacing() == pytest.approx(sitk.ReadImage(str(image)).GetSpacing())
        assert back.GetOrigin() == pytest.approx(sitk.ReadImage(str(image)).GetOrigin())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    with pytest.raises(ValueError, match="does not fit"):
        write_image_mask(mask[:-1], mha, tmp_path / "out" / "y.mha")


@needs_itk
def test_predict_score_and_training_read_them_as_their_picture_copies(tmp_path, capsys):
    pairs = kvasir_pairs(2)
    for folder in ("images", "masks"):
        (tmp_path / "png" / folder).mkdir(parents=True)
    for stem, rgb, mask in pairs:
        Image.fromarray(rgb).save(tmp_path / "png" / "images" / f"{stem}.png")
        Image.fromarray(mask * 255).save(tmp_path / "png" / "masks" / f"{stem}.png")
    # grand-challenge's layout: colour .mha images; CAMUS's: .nii.gz images beside their `_gt` masks.
    first, second = pairs
    save_grid(first[1], tmp_path / "grid" / "images" / f"{first[0]}.mha")
    save_grid(first[2], tmp_path / "grid" / "masks" / f"{first[0]}.mha")
    save_grid(second[1], tmp_path / "grid" / "images" / f"{second[0]}.mha")
    save_grid(second[2], tmp_path / "grid" / "masks" / f"{second[0]}.nii.gz")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu"]
    for kind in ("png", "grid"):
        argv = [*base, str(tmp_path / kind / "images"), "--boxes-from-masks", str(tmp_path / kind / "masks")]
        assert main([*argv, "--out", str(tmp_path / f"P{kind}"), "--overlay"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "Pgrid").iterdir()) == sorted(
        name for stem, *_ in pairs for name in (f"{stem}.mha", f"{stem}_overlay.png")
    )
    for stem, *_ in pairs:
        written = sitk.ReadImage(str(tmp_path / "Pgrid" / f"{stem}.mha"))
        assert written.GetSpacing() == pytest.approx((0.4, 0.3)) and written.GetOrigin() == pytest.approx((5, -2))
        picture = np.asarray(Image.open(tmp_path / "Ppng" / f"{stem}.png"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), picture // 255)  # binary: 0/1, not 0/255
    argv = [*base, str(tmp_path / "grid" / "images"), "--boxes-from-masks", str(tmp_path / "grid" / "masks")]
    assert main([*argv, "--out", str(tmp_path / "Q"), "--output-size", "64x64"]) == 2
    assert "--output-size" in capsys.readouterr().err and not (tmp_path / "Q").exists()
    # score reads the .mha masks against .mha / .nii.gz truth as the PNGs against theirs, distances in mm by the
    # truth's pixel size (0.3 mm a row, 0.4 mm a column).
    scored = {}
    for kind in ("png", "grid"):
        argv = ["score", str(tmp_path / f"P{kind}"), "--truth", str(tmp_path / kind / "masks")]
        assert main([*argv, "--json", str(tmp_path / f"{kind}.json")]) == 0
        scored[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    assert (scored["png"]["unit"], scored["grid"]["unit"], scored["grid"]["dims"]) == ("px", "mm", 2)
    assert "2-D scores (distances in mm, NSD at 2 mm)" in capsys.readouterr().out
    in_mm = []
    for stem, *_ in pairs:
        predicted = np.asarray(Image.open(tmp_path / "Ppng" / f"{stem}.png")) > 0
        truth = np.asarray(Image.open(tmp_path / "png" / "masks" / f"{stem}.png")) > 0
        stored = next((tmp_path / "grid" / "masks").glob(f"{stem}.*"))  # .mha: 0.3 exactly; .nii.gz: float32's 0.3
        in_mm.append(segmentation_scores(predicted, truth, spacing=grid_image_spacing(stored)))
    for metric in ("dice", "hd95", "nsd"):
        assert scored["grid"]["class_mean"][metric] == pytest.approx(np.mean([row[metric] for row in in_mm]))
    assert scored["grid"]["class_mean"]["dice"] == pytest.approx(scored["png"]["class_mean"]["dice"])
    # evaluate and training pair and read the folder as they read the pictures.
    processor = IMedSamProcessor(image_size=64)
    items = {}
    for kind in ("png", "grid"):
        pairs_found, problems = discover_pairs(tmp_path / kind)
        assert not problems and [p.stem for p in pairs_found] == [stem for stem, *_ in pairs]
        dataset = SegmentationDataset(records_from_pairs(pairs_found), processor, DataConfig(augment=None))
        items[kind] = [dataset[i] for i in range(len(dataset))]
    for png, grid in zip(items["png"], items["grid"], strict=True):
        for key in ("pixel_values", "labels", "input_boxes"):
            np.testing.assert_array_equal(grid[key].numpy(), png[key].numpy())
    # `convert volumes` has nothing to convert, and says why.
    argv = ["convert", "volumes", "--images", str(tmp_path / "grid" / "images"), "--labels"]
    assert main([*argv, str(tmp_path / "grid" / "masks"), "--output", str(tmp_path / "slices")]) == 2
    assert "are 2-D images: training and evaluation read them as they are" in capsys.readouterr().err


@needs_itk
def test_a_ct_slice_in_hounsfield_units_as_mha_is_windowed_as_the_models_training_slices(tmp_path):
    """The shipped BTCV model records its training window: a 2-D `.mha` CT slice in HU gets it, as its PNG slice
    (made from the scan with that window) was made."""
    from imedsam_hf import segment

    png = SHARED_DATA / "BTCV-Synapse-CT" / "images" / "case0002_slice090.png"
    mha = save_grid(hu_copy(png), tmp_path / "slice.mha")
    truth = read_mask(SHARED_DATA / "BTCV-Synapse-CT" / "masks" / png.name, 13)
    rows, cols = np.nonzero(truth == 6)  # the liver
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    by_mha = segment("imedsam-litemedsam-btcv", mha, box=box, classes=[6])
    by_png = segment("imedsam-litemedsam-btcv", png, box=box, classes=[6])
    np.testing.assert_array_equal(by_mha.mask, by_png.mask)
    assert by_mha.mask.any()


@needs_itk
def test_window_applies_to_a_2d_ct_image_in_hounsfield_units(tmp_path, capsys):
    """`--window` was refused for images ("images are 8-bit already"); a 2-D `.mha` CT in HU takes it as scans do."""
    png = SHARED_DATA / "BTCV-Synapse-CT" / "images" / "case0002_slice090.png"
    save_grid(hu_copy(png), tmp_path / "mha" / "slice.mha")
    (tmp_path / "png").mkdir()
    Image.open(png).save(tmp_path / "png" / "slice.png")
    mask = (read_mask(SHARED_DATA / "BTCV-Synapse-CT" / "masks" / png.name, 13) == 6).astype(np.uint8)
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask * 255).save(tmp_path / "masks" / "slice.png")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", "--boxes-from-masks"]
    assert main([*base, str(tmp_path / "masks"), str(tmp_path / "png"), "--out", str(tmp_path / "A")]) == 0
    argv = [*base, str(tmp_path / "masks"), str(tmp_path / "mha"), "--window", "btcv", "--out", str(tmp_path / "B")]
    assert main(argv) == 0, capsys.readouterr().err
    by_png = np.asarray(Image.open(tmp_path / "A" / "slice.png")) > 0
    by_mha = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "B" / "slice.mha"))) > 0
    np.testing.assert_array_equal(by_mha, by_png)
    argv = [*base, str(tmp_path / "masks"), str(tmp_path / "png"), "--window", "btcv", "--out", str(tmp_path / "C")]
    assert main(argv) == 2 and "pictures are 8-bit already" in capsys.readouterr().err


@needs_itk
def test_training_and_evaluate_window_2d_ct_images_in_hounsfield_units(tmp_path, capsys):
    """Training read a 2-D CT `.mha` in HU min-max per image, and evaluate scored a CT model on such images without the
    window it records; both now window them as predict does."""
    btcv = SHARED_DATA / "BTCV-Synapse-CT"
    for folder in ("png/images", "png/masks", "mha/images", "mha/masks"):
        (tmp_path / folder).mkdir(parents=True)
    for z in (90, 95):
        name = f"case0002_slice{z:03d}"
        liver = (read_mask(btcv / "masks" / f"{name}.png", 13) == 6).astype(np.uint8) * 255
        Image.open(btcv / "images" / f"{name}.png").save(tmp_path / "png" / "images" / f"{name}.png")
        save_grid(hu_copy(btcv / "images" / f"{name}.png"), tmp_path / "mha" / "images" / f"{name}.mha")
        for kind in ("png", "mha"):
            Image.fromarray(liver).save(tmp_path / kind / "masks" / f"{name}.png")
    processor = IMedSamProcessor(image_size=64)

    def pixels(kind: str, window) -> list[np.ndarray]:
        records = records_from_pairs(discover_pairs(tmp_path / kind)[0])
        dataset = SegmentationDataset(records, processor, DataConfig(augment=None, window=window))
        return [dataset[i]["pixel_values"].numpy() for i in range(len(dataset))]

    for png, mha in zip(pixels("png", None), pixels("mha", (75.0, 400.0)), strict=True):
        np.testing.assert_array_equal(mha, png)
    assert not np.array_equal(pixels("mha", None)[0], pixels("png", None)[0])  # min-max: another image
    model = tiny_model(implicit_decoder_trained=True)
    model.config.training_data = {"name": "ct", "window": [75.0, 400.0]}
    model.save_pretrained(tmp_path / "model")
    dice = {}
    for kind in ("png", "mha"):
        argv = ["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu", "--data-dir", str(tmp_path / kind)]
        assert main([*argv, "--split", "all", "--json", str(tmp_path / f"{kind}.json")]) == 0, capsys.readouterr().err
        dice[kind] = json.loads((tmp_path / f"{kind}.json").read_text())["results"]["native"]["dice"]
    assert dice["mha"] == pytest.approx(dice["png"], abs=1e-9)


@needs_itk
def test_the_demo_takes_a_2d_mha_or_nifti_upload_as_predict_reads_it(tmp_path):
    gradio = pytest.importorskip("gradio")
    from conftest import load_script

    app = load_script("demo/app.py", "imedsam_demo_uploads")
    (stem, rgb, _), *_ = kvasir_pairs(1)
    np.testing.assert_array_equal(app.file_upload(str(save_grid(rgb, tmp_path / f"{stem}.mha"))), rgb)
    png = SHARED_DATA / "BTCV-Synapse-CT" / "images" / "case0002_slice090.png"
    ct = str(save_grid(hu_copy(png), tmp_path / "ct.mha"))
    config = tiny_model().config
    config.training_data = {"window": [75.0, 400.0]}  # a CT model's recorded window: the PNG slice's grey
    grey = np.asarray(Image.open(png).convert("L"))
    np.testing.assert_array_equal(app.file_upload(ct, config), np.repeat(grey[..., None], 3, axis=-1))
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(scan))
    with pytest.raises(gradio.Error, match="scan.nii.gz: not a 2-D image"):
        app.file_upload(str(scan))


@needs_itk
def test_evaluate_measures_distances_in_mm_against_2d_masks_with_a_pixel_size(tmp_path, capsys):
    """`imedsam score` gave a grid-image truth's HD95 in mm, `imedsam evaluate` in pixels on the same masks (CAMUS
    reports distances in mm): evaluate now measures in mm when every mask has a pixel size, at every output grid
    (a grid half the size has pixels twice as large), and says so; the model card too."""
    from imedsam_hf.evaluation import evaluate_pairs, summary_lines, truth_pixel_sizes
    from imedsam_hf.model_card import write_model_card

    pairs = kvasir_pairs(2)
    for stem, rgb, mask in pairs:
        for kind in ("png", "grid", "mixed"):
            (tmp_path / kind / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / kind / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(tmp_path / kind / "images" / f"{stem}.png")
        Image.fromarray(mask * 255).save(tmp_path / "png" / "masks" / f"{stem}.png")
        save_grid(mask, tmp_path / "grid" / "masks" / f"{stem}.mha", spacing=(0.5, 0.5))
    save_grid(pairs[0][2], tmp_path / "mixed" / "masks" / f"{pairs[0][0]}.mha", spacing=(0.5, 0.5))
    Image.fromarray(pairs[1][2] * 255).save(tmp_path / "mixed" / "masks" / f"{pairs[1][0]}.png")
    model = tiny_model(implicit_decoder_trained=True).eval()
    processor = IMedSamProcessor(image_size=64)
    found = {kind: discover_pairs(tmp_path / kind)[0] for kind in ("png", "grid", "mixed")}
    assert truth_pixel_sizes(found["grid"]) == {str(p.mask): (0.5, 0.5) for p in found["grid"]}
    assert truth_pixel_sizes(found["mixed"]) is None and truth_pixel_sizes(found["png"]) is None
    scored = {kind: evaluate_pairs(model, processor, found[kind], output_sizes=["native", 32]) for kind in found}
    for png, grid, mixed in zip(scored["png"][0], scored["grid"][0], scored["mixed"][0], strict=True):
        assert grid["dice"] == pytest.approx(png["dice"]) and mixed == pytest.approx(png)  # mixed: all in pixels
        height, width = np.asarray(Image.open(next((tmp_path / "png" / "masks").glob(f"{png['stem']}.*")))).shape
        scale = 0.5 if png["size"] == "native" else 0.5 * max(height, width) / 32  # mm per pixel of the grid
        assert grid["hd95"] == pytest.approx(png["hd95"] * scale, rel=0.02), png["size"]
    units = {kind: {size: s["unit"] for size, s in scored[kind][1].items()} for kind in found}
    assert units == {"png": dict.fromkeys(["native", "32"], "px"), "grid": dict.fromkeys(["native", "32"], "mm"),
                     "mixed": dict.fromkeys(["native", "32"], "px")}  # fmt: skip
    assert " mm  HD " in summary_lines({"results": scored["grid"][1]})[0]
    # The command and the card of a run evaluated on such masks.
    model.save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu", "--data-dir", str(tmp_path / "grid")]
    assert main([*argv, "--split", "all", "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    assert "HD95" in capsys.readouterr().out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["results"]["native"]["unit"] == "mm"
    config = dict(
        model={}, data=dict(name="grid", split_seed=0, box_jitter=0.1, data_dir="d"), hub={},
        training=dict(output_dir="o", epochs=1, batch_size=1, gradient_accumulation_steps=1, weight_decay=0.0,
                      learning_rate=1e-4, implicit_learning_rate=1e-3, mixed_precision="no", dice_weight=0.8,
                      bce_weight=0.2, fine_weight_warmup_epochs=1),
    )  # fmt: skip
    card = write_model_card(tmp_path / "model", config, report, {"test": 2}, 10, 100)
    assert "are\nin mm, by the masks' pixel size" in card.text and "at 2 mm" in card.text
    report["results"]["native"]["unit"] = "px"
    assert (
        "pixels of the scored grid" in write_model_card(tmp_path / "model", config, report, {"test": 2}, 10, 100).text
    )


def test_16_bit_pictures_storing_hu_plus_an_offset_are_read_as_hu_with_rescale_intercept(tmp_path, capsys):
    """DeepLesion keeps CT slices as 16-bit PNGs of HU + 32768: they were rescaled min-max, never windowed as the
    shipped CT model's training slices (15 BTCV slices so stored: class-mean Dice 0.8506 against 0.8804 for their 8-bit
    PNGs, silently). `--rescale-intercept -32768` reads them as HU, windowed with the model's window: the 8-bit
    slices' masks exactly; without it a warning says so."""
    from imedsam_hf.data import DataConfig, SegmentationDataset
    from imedsam_hf.processing_imedsam import stored_hu

    btcv = SHARED_DATA / "BTCV-Synapse-CT"
    name = "case0002_slice090.png"
    hu = hu_copy(btcv / "images" / name)
    for folder in ("u16/images", "png/images", "masks"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.round(hu + 32768).astype(np.uint16)).save(tmp_path / "u16" / "images" / name)
    Image.open(btcv / "images" / name).save(tmp_path / "png" / "images" / name)
    liver = (read_mask(btcv / "masks" / name, 13) == 6).astype(np.uint8)
    Image.fromarray(liver * 255).save(tmp_path / "masks" / name)  # binary, for a one-class model
    (tmp_path / "ids").mkdir()
    Image.fromarray(liver * 6).save(tmp_path / "ids" / name)  # the class-aware model's id of the liver
    stored = tmp_path / "u16" / "images" / name
    np.testing.assert_array_equal(stored_hu(stored, -32768), np.round(hu))
    with pytest.raises(ValueError, match=f"{name}: is a L picture; `rescale_intercept` applies to 16-bit grey"):
        stored_hu(tmp_path / "png" / "images" / name, -32768)
    assert stored_hu(stored, None) == stored
    # predict: the shipped BTCV model, its recorded window.
    base = ["predict", "--model", "imedsam-litemedsam-btcv", "--boxes-from-masks", str(tmp_path / "ids")]
    assert main([*base, str(tmp_path / "png" / "images"), "--out", str(tmp_path / "A")]) == 0
    assert main([*base, str(tmp_path / "u16" / "images"), "--out", str(tmp_path / "B")]) == 0
    assert "warning: 16-bit grey pictures are rescaled min-max" in capsys.readouterr().err
    argv = [*base, str(tmp_path / "u16" / "images"), "--rescale-intercept", "-32768", "--out", str(tmp_path / "C")]
    assert main(argv) == 0, capsys.readouterr().err
    by_png = np.asarray(Image.open(tmp_path / "A" / name))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "C" / name)), by_png)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "B" / name)), by_png)  # min-max: another image
    from imedsam_hf import segment  # in Python: segment(..., rescale_intercept=)

    rows, cols = np.nonzero(liver)
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    by_api = segment("imedsam-litemedsam-btcv", stored, box=box, classes=[6], rescale_intercept=-32768).mask
    np.testing.assert_array_equal(by_api > 0, by_png > 0)
    # A model that records no CT window needs --window with it; 8-bit pictures and volumes do not take it.
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    tiny = [
        "predict",
        "--model",
        str(tmp_path / "model"),
        "--device",
        "cpu",
        "--boxes-from-masks",
        str(tmp_path / "masks"),
    ]
    argv = [*tiny, str(tmp_path / "u16" / "images"), "--rescale-intercept", "-32768", "--out", str(tmp_path / "D")]
    assert main(argv) == 2 and "records no CT window to window them with: give --window" in capsys.readouterr().err
    assert main([*argv[:-4], "--rescale-intercept=nan", "--out", str(tmp_path / "D")]) == 2
    assert "--rescale-intercept nan: HU = stored value + it, a finite offset" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "E"), "--window", "btcv"]) == 0
    argv = [*tiny, str(tmp_path / "png" / "images"), "--rescale-intercept", "-32768", "--window", "btcv", "--out"]
    argv.append(str(tmp_path / "F"))
    assert main(argv) == 1 and "is a L picture; --rescale-intercept applies to 16-bit" in capsys.readouterr().err
    # evaluate and training read them so, for a model that records its CT window.
    model = tiny_model(implicit_decoder_trained=True)
    model.config.training_data = {"name": "ct", "window": [75.0, 400.0]}
    model.save_pretrained(tmp_path / "ct_model")
    dice = {}
    for kind, extra in (("png", []), ("u16", ["--rescale-intercept", "-32768"])):
        (tmp_path / kind / "masks").mkdir()
        Image.open(tmp_path / "masks" / name).save(tmp_path / kind / "masks" / name)
        argv = [
            "evaluate",
            "--model",
            str(tmp_path / "ct_model"),
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path / kind),
        ]
        assert main([*argv, "--split", "all", "--json", str(tmp_path / f"{kind}.json"), *extra]) == 0
        dice[kind] = json.loads((tmp_path / f"{kind}.json").read_text())["results"]["native"]["dice"]
    assert dice["u16"] == pytest.approx(dice["png"], abs=1e-9)
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "u16"), "--split", "all"]
    assert main([*argv, "--json", str(tmp_path / "x.json"), "--rescale-intercept", "-32768"]) == 2
    assert (
        "--rescale-intercept -32768 gives the pictures' HU, but the model records no CT window"
        in capsys.readouterr().err
    )
    processor = IMedSamProcessor(image_size=64)
    pixels = {}
    for kind, intercept in (("png", None), ("u16", -32768.0)):
        records = records_from_pairs(discover_pairs(tmp_path / kind)[0])
        config = DataConfig(augment=None, window=(75.0, 400.0), rescale_intercept=intercept)
        pixels[kind] = SegmentationDataset(records, processor, config)[0]["pixel_values"].numpy()
    np.testing.assert_array_equal(pixels["u16"], pixels["png"])
