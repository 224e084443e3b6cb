"""2-D data sets as they unpack: BUSI's class folders with each mask beside its image, CAMUS's `_gt` frames,
nnU-Net's 2-D `imagesTr/<case>_0000.png` with `labelsTr/<case>.png` and a `dataset.json`, PH2's case folders. Each
was refused ("no image/mask folders found", "no mask named <case>_0000.*") or, worse, segmented its masks as images
and scored them, until moved into `images/` + `masks/` by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_model
from PIL import Image
from test_grid_images import kvasir_pairs, needs_itk, save_grid

from imedsam_hf.cli import main
from imedsam_hf.data import discover_pairs, read_class_names


@needs_itk
def test_masks_kept_beside_their_images_prompt_them_and_are_neither_inputs_nor_truth_for_them(tmp_path, capsys):
    """BUSI keeps `benign (1)_mask.png` beside `benign (1).png`, CAMUS `x_2CH_ED_gt.nii.gz` beside `x_2CH_ED.nii.gz`.
    predict on such a folder segmented the masks as images (each its own prompt) and refused the images ("256
    distinct values in a mask read as binary": each image taken as its own mask); score paired those predictions
    with the masks of their names and printed a Dice."""
    pairs = kvasir_pairs(2)
    busi, camus = tmp_path / "busi" / "benign", tmp_path / "camus" / "patient0001"
    busi.mkdir(parents=True)
    for index, (stem, rgb, mask) in enumerate(pairs, 1):
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        Image.fromarray(grey).save(busi / f"benign ({index}).png")
        Image.fromarray(mask * 255).save(busi / f"benign ({index})_mask.png")
        save_grid(grey, camus / f"{stem}_2CH_ED.nii.gz")
        save_grid(mask, camus / f"{stem}_2CH_ED_gt.nii.gz")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    scored = {}
    for folder, written in (
        (busi, ["benign (1).png", "benign (2).png"]),
        (camus, [f"{s}_2CH_ED.nii.gz" for s, *_ in pairs]),
    ):
        out = tmp_path / f"P_{folder.parent.name}"
        argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(folder)]
        assert main([*argv, "--boxes-from-masks", str(folder), "--out", str(out)]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == sorted(written)
        assert main(["score", str(out), "--truth", str(folder), "--json", str(out.with_suffix(".json"))]) == 0
        scored[folder.parent.name] = json.loads(out.with_suffix(".json").read_text())
    assert scored["busi"]["n_cases"] == scored["camus"]["n_cases"] == 2
    # The same images and masks: the same Dice, read as pictures or as NIfTI files.
    assert scored["camus"]["class_mean"]["dice"] == pytest.approx(scored["busi"]["class_mean"]["dice"])


def test_a_busi_download_trains_and_evaluates_as_it_is_unpacked(tmp_path, capsys):
    """BUSI unpacks as `Dataset_BUSI_with_GT/{benign,malignant,normal}/`, each image's mask beside it: training and
    evaluate refused it ("no image/mask folders found") until moved into images/ + masks/ by hand."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    pairs = kvasir_pairs(3)
    for folder, index, (_, rgb, mask) in zip(("benign", "benign", "malignant"), (1, 2, 1), pairs, strict=True):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).convert("L").save(root / folder / f"{folder} ({index}).png")
        Image.fromarray(mask * 255).save(root / folder / f"{folder} ({index})_mask.png")
    Image.fromarray(pairs[0][2] * 255).save(root / "malignant" / "malignant (1)_mask_1.png")  # a second lesion
    (root / "normal").mkdir()
    Image.fromarray(pairs[1][1]).convert("L").save(root / "normal" / "normal (1).png")
    Image.fromarray(np.zeros(pairs[1][2].shape, np.uint8)).save(root / "normal" / "normal (1)_mask.png")
    found, problems = discover_pairs(root)
    assert [pair.stem for pair in found] == ["benign (1)", "benign (2)", "normal (1)"]
    assert [pair.mask for pair in found] == [str(root / f) for f in ("benign/benign (1)_mask.png",
        "benign/benign (2)_mask.png", "normal/normal (1)_mask.png")]  # fmt: skip
    assert len(problems) == 1 and "2 masks (malignant (1)_mask, malignant (1)_mask_1)" in problems[0].reason
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(root), "--split", "all"]
    assert main([*argv, "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["n_images"] == 3


def nnunet_dataset(root: Path) -> list[str]:
    """nnU-Net v2's 2-D layout of two Kvasir pairs (RGB `_0000.png`, 0/1 labels, `dataset.json`), and a case of two
    channels; the single-channel cases."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    cases = []
    for stem, rgb, mask in kvasir_pairs(2):
        Image.fromarray(rgb).save(root / "imagesTr" / f"{stem}_0000.png")
        Image.fromarray(rgb).save(root / "imagesTs" / f"{stem}_0000.png")
        Image.fromarray(mask).save(root / "labelsTr" / f"{stem}.png")
        cases.append(stem)
    grey = np.full((32, 32), 90, np.uint8)
    for channel in ("0000", "0001"):
        Image.fromarray(grey).save(root / "imagesTr" / f"two_{channel}.png")
    Image.fromarray((grey > 0).astype(np.uint8)).save(root / "labelsTr" / "two.png")
    labels = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "polyp": 1}}
    (root / "dataset.json").write_text(json.dumps({**labels, "numTraining": 3, "file_ending": ".png"}))
    return cases


def test_an_nnunet_2d_data_set_trains_evaluates_predicts_and_scores_as_it_is(tmp_path, capsys):
    root = tmp_path / "Dataset901_Kvasir"
    cases = nnunet_dataset(root)
    found, problems = discover_pairs(root)
    assert [pair.stem for pair in found] == cases  # named by case, as nnU-Net names them
    assert [Path(pair.mask).name for pair in found] == [f"{case}.png" for case in cases]
    assert len(problems) == 1 and "2 channels of case two (two_0000.png, two_0001.png)" in problems[0].reason
    assert read_class_names(root) == {1: "polyp"}  # the dataset.json's labels
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu", "--data-dir", str(root)]
    assert main([*argv, "--split", "all", "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["n_images"] == 2
    assert "volume" not in evaluated  # 2-D images, no slices of scans: no per-scan "3D Dice" of single images
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(root / "imagesTs")]
    assert main([*argv, "--boxes-from-masks", str(root / "labelsTr"), "--out", str(tmp_path / "P")]) == 0
    assert sorted(p.name for p in (tmp_path / "P").iterdir()) == [f"{case}_0000.png" for case in cases]
    argv = ["score", str(tmp_path / "P"), "--truth", str(root / "labelsTr"), "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    scored = json.loads((tmp_path / "s.json").read_text())
    assert scored["per_class"]["1"]["name"] == "polyp" and scored["n_cases"] == 2
    assert scored["class_mean"]["dice"] == pytest.approx(evaluated["results"]["native"]["dice"], abs=1e-6)


def test_the_ph2_download_trains_and_evaluates_as_it_is_unpacked(tmp_path, capsys):
    """PH2 unpacks as `PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp` beside
    `IMD002/IMD002_lesion/IMD002_lesion.bmp` (and, for some cases, `IMD002_roi/`): one folder per case. Refused
    before ("no image/mask folders found"); read case by case, it gives the pairs and the Dice of the flat copy."""
    shared = SHARED_DATA / "PH2"
    root = tmp_path / "PH2 Dataset images"
    cases = sorted(path.stem for path in (shared / "images").iterdir())[:2]
    for case in cases:
        (root / case / f"{case}_Dermoscopic_Image").mkdir(parents=True)
        (root / case / f"{case}_lesion").mkdir()
        Image.open(shared / "images" / f"{case}.png").save(root / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        Image.open(shared / "masks" / f"{case}.png").save(root / case / f"{case}_lesion" / f"{case}_lesion.bmp")
    (root / cases[0] / f"{cases[0]}_roi").mkdir()  # PH2's colour-class regions, named for neither: left out
    Image.open(shared / "masks" / f"{cases[0]}.png").save(root / cases[0] / f"{cases[0]}_roi" / "IMD_R1_Label4.bmp")
    found, problems = discover_pairs(root)
    assert not problems and [(pair.stem, Path(pair.mask).name) for pair in found] == [
        (case, f"{case}_lesion.bmp") for case in cases
    ]
    flat = tmp_path / "flat"
    for folder in ("images", "masks"):
        (flat / folder).mkdir(parents=True)
        for case in cases:
            Image.open(shared / folder / f"{case}.png").save(flat / folder / f"{case}.png")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    dice = {}
    for name, data in (("ph2", root), ("flat", flat)):
        argv = ["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu", "--data-dir", str(data)]
        assert main([*argv, "--split", "all", "--json", str(tmp_path / f"{name}.json")]) == 0, capsys.readouterr().err
        dice[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"]["native"]["dice"]
    assert dice["ph2"] == pytest.approx(dice["flat"], abs=1e-9)


def test_drives_field_of_view_masks_are_not_taken_for_its_ground_truth(tmp_path):
    """DRIVE keeps `images/`, `1st_manual/` (the vessels) and `mask/` (the field of view): a folder named for masks
    that is not the ground truth. Three folders of images are never guessed between (PH2's `_roi/` is left out by
    name only)."""
    root = tmp_path / "DRIVE" / "training"
    picture = Image.fromarray(np.full((16, 16), 200, np.uint8))
    for folder, name in (
        ("images", "21_training.tif"),
        ("1st_manual", "21_manual1.gif"),
        ("mask", "21_training_mask.gif"),
    ):
        (root / folder).mkdir(parents=True)
        picture.save(root / folder / name)
    with pytest.raises(ValueError, match="no image/mask folders found"):
        discover_pairs(root)


def test_images_of_one_name_in_several_folders_get_their_own_boxes_masks_and_truth(tmp_path, capsys):
    """DeepLesion keeps key slices as `Images_png/<series>/<slice>.png`, the slice name shared by many series.
    `predict Images_png/* --boxes` keyed boxes by name only: a `109.png` entry prompted every series' `109.png` with
    the box drawn on one of them (silently), and an entry keyed by its path was "no box"; masks were looked up by stem
    in the flat masks folder only, and score found no masks in the folder of series folders."""
    pairs = kvasir_pairs(2)
    boxes = {}
    for series, (_, rgb, mask) in zip(("000001_01_01", "000002_01_01"), pairs, strict=True):
        for root, picture in (("Images_png", rgb), ("truth", mask * 255)):
            (tmp_path / root / series).mkdir(parents=True)
            Image.fromarray(picture).save(tmp_path / root / series / "109.png")
        rows, cols = np.nonzero(mask)
        boxes[series] = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    inputs = [str(p) for p in sorted((tmp_path / "Images_png").iterdir())]
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", *inputs]
    (tmp_path / "by_name.json").write_text(json.dumps({"109.png": boxes["000001_01_01"]}))
    assert main([*base, "--boxes", str(tmp_path / "by_name.json"), "--out", str(tmp_path / "A")]) == 2
    err = capsys.readouterr().err
    assert "'109.png' names 2 images of this run (000001_01_01/109.png, 000002_01_01/109.png)" in err
    assert not (tmp_path / "A").exists()
    by_path = {f"{series}/109.png": box for series, box in boxes.items()}
    by_path["000002_01_01/109"] = by_path.pop("000002_01_01/109.png")  # without the extension too
    (tmp_path / "by_path.json").write_text(json.dumps(by_path))
    assert main([*base, "--boxes", str(tmp_path / "by_path.json"), "--out", str(tmp_path / "B")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "B")) for p in (tmp_path / "B").rglob("*.png")) == [
        "000001_01_01/109.png", "000002_01_01/109.png"
    ]  # fmt: skip
    # Masks laid out as the images give the same boxes; a flat mask named like both is refused, not used twice.
    assert main([*base, "--boxes-from-masks", str(tmp_path / "truth"), "--out", str(tmp_path / "C")]) == 0
    for series in boxes:
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "C" / series / "109.png")),
            np.asarray(Image.open(tmp_path / "B" / series / "109.png")),
        )
    (tmp_path / "flat").mkdir()
    Image.fromarray(pairs[0][2] * 255).save(tmp_path / "flat" / "109.png")
    assert main([*base, "--boxes-from-masks", str(tmp_path / "flat"), "--out", str(tmp_path / "D")]) == 1
    assert "would prompt all 2 images named 109" in capsys.readouterr().err
    # score pairs the folder of series folders with the truth laid out alike, each case named by its place.
    assert (
        main(["score", str(tmp_path / "B"), "--truth", str(tmp_path / "truth"), "--csv", str(tmp_path / "s.csv")]) == 0
    )
    cases = [row.split(",")[0] for row in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    assert cases == ["000001_01_01/109", "000002_01_01/109"]
    argv = ["score", *[str(p) for p in sorted((tmp_path / "B").iterdir())], "--truth", str(tmp_path / "flat")]
    assert main(argv) == 2 and "other predictions are named 109 too" in capsys.readouterr().err
    # Several lesions of one slice: a list of boxes, the mask their union (each box's mask as when given alone).
    several = {
        "000001_01_01/109.png": [boxes["000001_01_01"], [0, 0, 40, 40]],
        "000002_01_01/109.png": boxes["000002_01_01"],
    }
    (tmp_path / "several.json").write_text(json.dumps(several))
    assert main([*base, "--boxes", str(tmp_path / "several.json"), "--out", str(tmp_path / "E")]) == 0
    (tmp_path / "second.json").write_text(json.dumps({"109.png": [0, 0, 40, 40]}))  # its folder alone: its name
    assert main([*base[:-2], inputs[0], "--boxes", str(tmp_path / "second.json"), "--out", str(tmp_path / "G")]) == 0
    union = np.asarray(Image.open(tmp_path / "E" / "000001_01_01" / "109.png")) > 0
    first = np.asarray(Image.open(tmp_path / "B" / "000001_01_01" / "109.png")) > 0
    np.testing.assert_array_equal(union, first | (np.asarray(Image.open(tmp_path / "G" / "109.png")) > 0))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "E" / "000002_01_01" / "109.png")),
        np.asarray(Image.open(tmp_path / "B" / "000002_01_01" / "109.png")),
    )
    # DeepLesion's own DL_info.csv (one row per lesion, `000001_01_01_109.png`, "x0, y0, x1, y1"), whichever folder
    # is given: the series folders, or one series alone.
    rows = ["File_name,Key_slice_index,Bounding_boxes,Train_Val_Test"]
    rows += [f'{series}_109.png,109,"{", ".join(map(str, box))}",1' for series, box in boxes.items()]
    rows.append('000001_01_01_109.png,109,"0, 0, 40, 40",1')
    (tmp_path / "DL_info.csv").write_text("\n".join(rows) + "\n")
    assert main([*base, "--boxes", str(tmp_path / "DL_info.csv"), "--out", str(tmp_path / "H")]) == 0
    for series in boxes:
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "H" / series / "109.png")),
            np.asarray(Image.open(tmp_path / "E" / series / "109.png")),  # the JSON list of the same boxes
        )
    one = [*base[:-2], inputs[1], "--boxes", str(tmp_path / "DL_info.csv"), "--out", str(tmp_path / "I")]
    assert main(one) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "I" / "109.png")),
        np.asarray(Image.open(tmp_path / "B" / "000002_01_01" / "109.png")),
    )
    (tmp_path / "other.csv").write_text("image,x0,y0,x1,y1\na.png,1,2,3,4\n")
    assert main([*base, "--boxes", str(tmp_path / "other.csv"), "--out", str(tmp_path / "J")]) == 2
    assert "a CSV of boxes is DeepLesion's DL_info.csv" in capsys.readouterr().err
    # The folder of series folders itself: the message says what to give.
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "Images_png"), "--box", "1,1,9,9"]
    assert main([*argv, "--out", str(tmp_path / "F")]) == 2
    assert "hold images: give them" in capsys.readouterr().err


def test_deeplesions_slices_are_windowed_as_each_lesion_was_read(tmp_path, capsys):
    """DeepLesion's PNGs hold HU + 32768 and its DL_info.csv says, for each lesion, the window its slice was read with
    (`DICOM_windows`, min and max in HU): with that file as --boxes, no --window or --rescale-intercept is needed, and
    a lung nodule and a liver lesion of one slice are each segmented in their own window (MedSAM's LiteMedSAM records
    no window: it needed --window, one for every lesion)."""
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 30, (64, 64))
    hu[:, :20] = -800 + rng.normal(0, 60, (64, 20))  # lung on the left
    hu[10:18, 5:13] = -100  # a nodule in it
    hu[40:52, 36:50] = 90  # a lesion in soft tissue
    folder = tmp_path / "Images_png" / "000001_01_01"
    folder.mkdir(parents=True)
    Image.fromarray((hu + 32768).astype(np.uint16)).save(folder / "109.png")
    nodule, lesion = [4, 9, 14, 19], [35, 39, 51, 53]
    rows = ["File_name,Key_slice_index,Bounding_boxes,DICOM_windows"]
    rows += [
        '000001_01_01_109.png,109,"4, 9, 14, 19","-1350, 150"',
        '000001_01_01_109.png,109,"35, 39, 51, 53","-175, 275"',
    ]
    (tmp_path / "DL_info.csv").write_text("\n".join(rows) + "\n")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(folder / "109.png")]
    assert main([*base, "--boxes", str(tmp_path / "DL_info.csv"), "--out", str(tmp_path / "A")]) == 0
    both = np.asarray(Image.open(tmp_path / "A" / "109.png")) > 0
    alone = []  # each lesion alone, windowed by hand as its row says: lung -600 / 1500, soft tissue 50 / 450
    for name, box, window in (("N", nodule, "-600,1500"), ("L", lesion, "50,450")):
        argv = [*base, "--box", ",".join(map(str, box)), "--rescale-intercept=-32768", f"--window={window}"]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
        alone.append(np.asarray(Image.open(tmp_path / name / "109.png")) > 0)
    np.testing.assert_array_equal(both, alone[0] | alone[1])
    # A class-aware model told the lesions' structure (--classes): each window's lesions with their own heads.
    tiny_model(num_classes=3, class_aware=True, implicit_decoder_trained=True).save_pretrained(tmp_path / "aware")
    argv = [*base, "--boxes", str(tmp_path / "DL_info.csv"), "--classes", "2", "--out", str(tmp_path / "K")]
    argv[argv.index(str(tmp_path / "model"))] = str(tmp_path / "aware")
    assert main(argv) == 0, capsys.readouterr().err
    # --window given: every lesion in it, as before.
    argv = [*base, "--boxes", str(tmp_path / "DL_info.csv"), "--rescale-intercept=-32768", "--window", "50,450"]
    assert main([*argv, "--out", str(tmp_path / "W")]) == 0
    (tmp_path / "boxes.json").write_text(json.dumps({"109.png": [nodule, lesion]}))
    argv = [*base, "--boxes", str(tmp_path / "boxes.json"), "--rescale-intercept=-32768", "--window", "50,450"]
    assert main([*argv, "--out", str(tmp_path / "J")]) == 0
    one_window = np.asarray(Image.open(tmp_path / "W" / "109.png"))
    np.testing.assert_array_equal(one_window, np.asarray(Image.open(tmp_path / "J" / "109.png")))
    assert (both != (one_window > 0)).any()  # the nodule seen in the soft-tissue window: another mask
    # A window that is none: named with its line.
    (tmp_path / "bad.csv").write_text(rows[0] + '\n000001_01_01_109.png,109,"4, 9, 14, 19","150, -1350"\n')
    assert main([*base, "--boxes", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "B")]) == 2
    assert "bad.csv: line 2: DICOM_windows '150, -1350' is not a window 'min, max' in HU" in capsys.readouterr().err


def test_kvasir_segs_own_boxes_file_and_coco_annotations_are_boxes_as_they_are(tmp_path, capsys):
    """Kvasir-SEG ships its boxes as `kavsir_bboxes.json` (`{id: {"bbox": [{"xmin", ...}]}}`), and detectors write
    COCO annotations (`bbox` `[x, y, w, h]`): `--boxes` refused both ("is not a box [x0, y0, x1, y1]"). Read as they
    are, they prompt as the same boxes written out do; an image with two polyps gets the union of both."""
    pairs = kvasir_pairs(3)
    (tmp_path / "images").mkdir()
    plain, kvasir, coco = {}, {}, {"images": [], "annotations": [], "categories": [{"id": 1, "name": "polyp"}]}
    for index, (stem, rgb, mask) in enumerate(pairs, 1):
        Image.fromarray(rgb).save(tmp_path / "images" / f"{stem}.jpg")
        rows, cols = np.nonzero(mask)
        box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
        boxes = [box, [0, 0, 30, 30]] if index == 3 else [box]  # the third image: two polyps
        plain[stem] = boxes if len(boxes) > 1 else box
        kvasir[stem] = {"height": mask.shape[0], "width": mask.shape[1],
                        "bbox": [{"label": "polyp", "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]} for b in boxes]}  # fmt: skip
        coco["images"].append(
            {"id": index, "file_name": f"{stem}.jpg", "height": mask.shape[0], "width": mask.shape[1]}
        )
        for b in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": index, "category_id": 1,
                                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})  # fmt: skip
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    base = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(tmp_path / "images"), "--boxes"]
    written = {}
    for name, content in (("plain", plain), ("kavsir_bboxes", kvasir), ("coco", coco)):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        assert main([*base, str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name)]) == 0, (
            capsys.readouterr().err
        )
        written[name] = [np.asarray(Image.open(tmp_path / name / f"{stem}.png")) for stem, *_ in pairs]
    for kind in ("kavsir_bboxes", "coco"):
        for mine, reference in zip(written[kind], written["plain"], strict=True):
            np.testing.assert_array_equal(mine, reference)
    assert set(np.unique(written["plain"][2])) <= {0, 255}  # two polyps: one binary mask, their union
    coco["annotations"][0]["image_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    assert main([*base, str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")]) == 2
    assert 'names image_id 99, which no entry of its "images" list has' in capsys.readouterr().err


def lgg_layout(root: Path, patients: int, slices: int) -> Path:
    """Kaggle's LGG brain MRI set as it unpacks: `root/<patient>/<patient>_<n>.tif` beside `<patient>_<n>_mask.tif`
    (random RGB slices, a 0/255 square mask each)."""
    rng = np.random.default_rng(0)
    for patient in range(patients):
        folder = root / f"TCGA_CS_49{patient}1_1996090{patient}"
        folder.mkdir(parents=True)
        for n in range(1, slices + 1):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{folder.name}_{n}.tif")
            Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 8)).save(folder / f"{folder.name}_{n}_mask.tif")
    return root


def test_slices_kept_in_a_folder_per_patient_are_split_by_patient(tmp_path):
    """Kaggle's LGG brain MRI set keeps each patient's slices in a folder of their own, each mask beside its slice
    (`TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif`, `..._12_mask.tif`): training split it slice by slice, so
    one patient's neighbouring slices sat in train and test (the leak the BTCV split by scan avoids). Slices named
    for their folder are now one case; BUSI's class folders (`benign/benign (3).png`) stay image by image."""
    from imedsam_hf.data import case_folder_group, make_splits

    root = lgg_layout(tmp_path / "kaggle_3m", patients=6, slices=3)
    pairs, problems = discover_pairs(root)
    assert len(pairs) == 18 and not problems
    groups = {pair.stem: case for pair in pairs if (case := case_folder_group(pair.image, pair.stem))}
    assert len(set(groups.values())) == 6 and len(groups) == 18
    splits = make_splits([pair.stem for pair in pairs], groups=groups)
    patients = {name: {stem.rsplit("_", 1)[0] for stem in stems} for name, stems in splits.items()}
    assert sum(map(len, patients.values())) == 6  # each patient in one split only
    assert all(len(stems) % 3 == 0 for stems in splits.values())
    assert case_folder_group(tmp_path / "benign" / "benign (3).png", "benign (3)") is None
    assert case_folder_group(tmp_path / "IMD002_Dermoscopic_Image" / "IMD002.bmp", "IMD002") is None
    # Flattened into one folder, the same slices are split image by image: a warning says so and what to give.
    from imedsam_hf.data import ungrouped_slices

    stems = [pair.stem for pair in pairs]
    assert "18 of 18 images look like numbered slices of 6 cases" in ungrouped_slices(stems)
    assert ungrouped_slices(stems, groups=groups) is None
    assert ungrouped_slices(stems, group_pattern=r"^(.*)_\d+$") is None
    for names in (
        [f"ISIC_{n:07d}" for n in range(20)],
        [str(n) for n in range(20)],
        [f"MCUCXR_{n:04d}_0" for n in range(20)],
    ):
        assert ungrouped_slices(names) is None  # one data set prefix, plain numbers, one image per case
    # A pattern given groups the stems it matches; the folder decides for the others.
    by_pattern = make_splits(["a_slice001", "a_slice002", "x"], group_pattern=r"^(.*)_slice\d+$", groups={"x": "a"})
    assert sorted(next(stems for stems in by_pattern.values() if "x" in stems)) == ["a_slice001", "a_slice002", "x"]


def test_slices_kept_in_a_folder_per_patient_are_scored_per_patient_too(tmp_path, capsys):
    """The LGG set's papers report Dice per patient: evaluate stacks each patient folder's slices into a 3-D Dice
    (the slices' overlap counts summed), as it does for BTCV's `case0001_sliceNNN`; single images get none."""
    from imedsam_hf.evaluation import volume_summary

    rows = [  # one binary mask per slice: no class; patient a's two slices, patient b's one
        {"stem": "a_1", "size": "native", "overlap": 8, "predicted_pixels": 10, "true_pixels": 10},
        {"stem": "a_2", "size": "native", "overlap": 0, "predicted_pixels": 0, "true_pixels": 4},
        {"stem": "b_7", "size": "native", "overlap": 5, "predicted_pixels": 5, "true_pixels": 5},
        {"stem": "lone", "size": "native", "overlap": 1, "predicted_pixels": 1, "true_pixels": 1},
    ]
    volume = volume_summary(rows, "native", None, groups={"a_1": "a", "a_2": "a", "b_7": "b"})
    assert volume["per_scan"] == {"a": {"1": {"dice": 2 * 8 / 24}}, "b": {"1": {"dice": 1.0}}}
    assert volume["per_class"]["1"]["name"] == "foreground" and volume["dice"] == pytest.approx((2 * 8 / 24 + 1) / 2)
    root = lgg_layout(tmp_path / "kaggle_3m", patients=3, slices=2)
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu", "--split", "all"]
    assert main([*argv, "--data-dir", str(root), "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    volume = json.loads((tmp_path / "e.json").read_text())["volume"]
    assert volume["n_volumes"] == 3 and sorted(volume["per_scan"]) == sorted(p.name for p in root.iterdir())
    assert "volume  3 scans, 3D Dice per class:" in capsys.readouterr().out
    flat = tmp_path / "flat"  # the same images in one folder: no cases to stack
    flat.mkdir()
    for path in root.rglob("*.tif"):
        path.rename(flat / path.name)
    assert main([*argv, "--data-dir", str(flat), "--json", str(tmp_path / "f.json")]) == 0
    assert "volume" not in json.loads((tmp_path / "f.json").read_text())


def test_isic_2017_as_it_unpacks_superpixel_maps_are_neither_images_nor_masks(tmp_path, capsys):
    """ISIC 2017's `ISIC-2017_Training_Data/` holds each image's superpixel map beside it (`ISIC_0000000_superpixels
    .png`), its masks in `ISIC-2017_Training_Part1_GroundTruth/` (`_segmentation.png`): evaluate took the superpixel
    maps for masks kept beside their images ("229 distinct values in a mask read as binary") and predict segmented
    them as images (each "no mask named ISIC_0000000_superpixels_segmentation")."""
    from imedsam_hf.data import masks_beside_images

    root = tmp_path / "ISIC2017"
    images, truth = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    images.mkdir(parents=True)
    truth.mkdir()
    rng = np.random.default_rng(0)
    for index, (_, rgb, mask) in enumerate(kvasir_pairs(2)):
        stem = f"ISIC_{index:07d}"
        Image.fromarray(rgb).save(images / f"{stem}.jpg")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{stem}_superpixels.png")
        Image.fromarray(mask * 255).save(truth / f"{stem}_segmentation.png")
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("image_id,melanoma,seborrheic_keratosis\n")
    assert masks_beside_images(["a", "a_superpixels", "b", "b_superpixels"]) == ("", set())
    assert masks_beside_images(["a", "a_mask", "b", "b_mask"]) == ("_mask", {"a_mask", "b_mask"})
    pairs, problems = discover_pairs(root)
    assert [(p.stem, Path(p.mask).name) for p in pairs] == [
        ("ISIC_0000000", "ISIC_0000000_segmentation.png"), ("ISIC_0000001", "ISIC_0000001_segmentation.png")
    ] and not problems  # fmt: skip
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(images), "--boxes-from-masks"]
    assert main([*argv, str(truth), "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "P").iterdir()) == ["ISIC_0000000.png", "ISIC_0000001.png"]


def test_etis_larib_and_shenzhen_as_they_unpack(tmp_path, capsys):
    """ETIS-Larib keeps `ETIS-LaribPolypDB/1.tif` beside `GroundTruth/p1.tif`, the Shenzhen chest X-rays
    `CXR_png/CHNCXR_0001_0.png` beside `mask/CHNCXR_0001_0_mask.png`: neither folder of inputs has a name saying so,
    and ETIS's masks put a `p` before the image's name. Training and evaluate said "no image/mask folders found",
    predict and score "no mask named 1.*"."""
    from imedsam_hf.data import mask_name_prefix

    pairs = kvasir_pairs(2)
    etis, shenzhen = tmp_path / "ETIS-LaribPolypDB", tmp_path / "ChinaSet_AllFiles"
    for folder in (etis / "ETIS-LaribPolypDB", etis / "GroundTruth", shenzhen / "CXR_png", shenzhen / "mask"):
        folder.mkdir(parents=True)
    for index, (_, rgb, mask) in enumerate(pairs, 1):
        Image.fromarray(rgb).save(etis / "ETIS-LaribPolypDB" / f"{index}.tif")
        Image.fromarray(mask * 255).save(etis / "GroundTruth" / f"p{index}.tif")
        Image.fromarray(rgb).convert("L").save(shenzhen / "CXR_png" / f"CHNCXR_000{index}_0.png")
        Image.fromarray(mask * 255).save(shenzhen / "mask" / f"CHNCXR_000{index}_0_mask.png")
    assert mask_name_prefix({"1", "11", "2"}, {"p1", "p11", "p2"}) == "p"
    assert mask_name_prefix({"1", "2"}, {"11", "12"}) == ""  # digits are no prefix
    found = {root.name: discover_pairs(root) for root in (etis, shenzhen)}
    assert [(p.stem, Path(p.mask).name) for p in found[etis.name][0]] == [("1", "p1.tif"), ("2", "p2.tif")]
    assert [Path(p.mask).name for p in found[shenzhen.name][0]] == ["CHNCXR_0001_0_mask.png", "CHNCXR_0002_0_mask.png"]
    assert not found[etis.name][1] and not found[shenzhen.name][1]
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", str(etis / "ETIS-LaribPolypDB")]
    assert main([*argv, "--boxes-from-masks", str(etis / "GroundTruth"), "--out", str(tmp_path / "P")]) == 0
    assert (
        main(["score", str(tmp_path / "P"), "--truth", str(etis / "GroundTruth"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["n_cases"] == 2
    # A folder of a model's outputs beside the truth is never taken for the inputs.
    (shenzhen / "CXR_png").rename(shenzhen / "predictions")
    with pytest.raises(ValueError, match="no image/mask folders found"):
        discover_pairs(shenzhen)


def test_one_data_set_in_two_formats_names_the_copies(tmp_path):
    """CVC-ClinicDB as Kaggle hands it keeps the same 612 images twice, `PNG/{Original,Ground Truth}` and
    `TIF/{Original,Ground Truth}`: every stem was in two folders, so every image was skipped ("another folder holds an
    image of this stem") and nothing was left to train or evaluate on."""
    for kind in ("PNG", "TIF"):
        for folder in ("Original", "Ground Truth"):
            (tmp_path / "CVC-ClinicDB" / kind / folder).mkdir(parents=True)
        for index, (_, rgb, mask) in enumerate(kvasir_pairs(2), 1):
            suffix = f".{kind.lower()}"
            Image.fromarray(rgb).save(tmp_path / "CVC-ClinicDB" / kind / "Original" / f"{index}{suffix}")
            Image.fromarray(mask * 255).save(tmp_path / "CVC-ClinicDB" / kind / "Ground Truth" / f"{index}{suffix}")
    with pytest.raises(ValueError, match=r"PNG/Original and .*TIF/Original hold the same 2 images .*CVC-ClinicDB/PNG"):
        discover_pairs(tmp_path / "CVC-ClinicDB")
    assert len(discover_pairs(tmp_path / "CVC-ClinicDB" / "PNG")[0]) == 2


def test_files_beside_images_under_a_suffix_naming_no_mask_are_named_not_trained_on(tmp_path):
    """HC18 keeps each fetal head's ellipse outline as `000_HC_Annotation.png` beside `000_HC.png`: the outlines were
    taken for masks kept beside their images and trained on. `_Annotation` names no mask: the refusal says so, and
    what to do."""
    from imedsam_hf.data import masks_beside_images

    folder = tmp_path / "training_set"
    folder.mkdir()
    for index, (_, rgb, mask) in enumerate(kvasir_pairs(2)):
        Image.fromarray(rgb).convert("L").save(folder / f"{index:03d}_HC.png")
        Image.fromarray(mask * 255).save(folder / f"{index:03d}_HC_Annotation.png")
    assert masks_beside_images(["000_HC", "000_HC_Annotation"]) == ("", set())
    with pytest.raises(ValueError, match=r"<image>_Annotation beside their images are not taken for masks .*HC18"):
        discover_pairs(folder)
