"""Masks read as what they hold, empty masks never scored as a free Dice 1.0, one image per mask stem (issue 13,
items 1 and 5). Every test works on re-encoded or damaged copies of real shared images, written to `tmp_path`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_model
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.cli import main as cli_main
from imedsam_hf.data import (
    AugmentationConfig,
    DataConfig,
    MaskValuesError,
    SegmentationDataset,
    discover_pairs,
    mask_box,
    read_mask,
    records_from_pairs,
    validate_pairs,
)
from imedsam_hf.evaluation import evaluate_pairs, grid_size, summary_lines

KVASIR = SHARED_DATA / "Kvasir-SEG-sample"
BTCV = SHARED_DATA / "BTCV-Synapse-CT"
pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason="shared data not available")


def copy_pairs(root, count=2, source=KVASIR):
    """The first `count` pairs of a shared set, copied into `root/images`, `root/masks`; their stems."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pairs = discover_pairs(source)[0][:count]
    for pair in pairs:
        shutil.copy(pair.image, root / "images")
        shutil.copy(pair.mask, root / "masks")
    return [pair.stem for pair in pairs]


def truth(stem):
    return np.asarray(Image.open(KVASIR / "masks" / f"{stem}.png")) > 0


def split_in_two(foreground, low, high):
    """A class-id mask: the left half of the foreground `low`, the right half `high`."""
    labels = np.zeros(foreground.shape, np.uint8)
    middle = int(np.nonzero(foreground)[1].mean())
    labels[:, :middle][foreground[:, :middle]] = low
    labels[:, middle:][foreground[:, middle:]] = high
    return labels


def palette_png(indices, path):
    """`indices` saved as a palette PNG with PASCAL VOC's colours (1: dark red, 2: dark green)."""
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253)
    image.save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model(query_mode="adaptive").save_pretrained(folder)
    IMedSamProcessor(image_size=64).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- item 1: values
def test_class_id_masks_under_a_binary_model_are_an_error_naming_the_file_and_the_values(tmp_path):
    stems = copy_pairs(tmp_path, 2)
    bad = tmp_path / "masks" / f"{stems[1]}.png"
    Image.fromarray(split_in_two(truth(stems[1]), 38, 75)).save(bad)
    pairs, problems = discover_pairs(tmp_path)
    with pytest.raises(ValueError) as raised:  # fatal even when unusable files are skipped: never read as empty
        validate_pairs(pairs, num_classes=1, on_error="skip", problems=problems)
    message = str(raised.value)
    assert message.startswith(f"{bad}: 3 distinct values [0, 38, 75]") and "\n" not in message
    # The library names its arguments; a command shows them as its flags (`commands.common.flag_message`).
    assert "`mask_classes` to N" in message and "`mask_values`, e.g. 38:1,75:1" in message
    from imedsam_hf.commands.common import flag_message

    assert "set --mask-classes to N" in flag_message(message) and "--mask-values, e.g. 38:1,75:1" in flag_message(
        message
    )
    # Not class ids 1..2 either; merged into one foreground by a mapping, it is the original mask.
    with pytest.raises(MaskValuesError, match="class id 75 outside 0..num_classes"):
        read_mask(bad, num_classes=2)
    merged = read_mask(bad, mask_values={38: 1, 75: 1})
    np.testing.assert_array_equal(merged, truth(stems[1]))
    assert validate_pairs(pairs, mask_values={38: 1, 75: 1, 255: 1})[0] == pairs  # a mapping covers every mask
    with pytest.raises(MaskValuesError, match=r"values \[75\] are not in `mask_values` 38:1"):
        read_mask(bad, mask_values={38: 1})


def test_palette_masks_are_read_by_index_not_through_their_colours(tmp_path):
    stem = copy_pairs(tmp_path, 1)[0]
    foreground = truth(stem)
    path = tmp_path / "masks" / f"{stem}.png"
    palette_png(foreground.astype(np.uint8), path)  # index 1 is dark red: 38 in grey, below the old 127 threshold
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_mask(path), foreground)
    palette_png(split_in_two(foreground, 1, 2), path)
    with pytest.raises(MaskValuesError, match=r"3 distinct values \[0, 1, 2\]"):
        read_mask(path)
    labels = read_mask(path, num_classes=2)
    assert set(np.unique(labels).tolist()) == {0, 1, 2} and np.array_equal(labels > 0, foreground)


@pytest.mark.parametrize("value", [1, 38, 255])
def test_binary_masks_with_any_single_foreground_value_read_as_that_foreground(tmp_path, value):
    stem = copy_pairs(tmp_path, 1)[0]
    path = tmp_path / "masks" / f"{stem}.png"
    Image.fromarray(truth(stem).astype(np.uint8) * value).save(path)
    np.testing.assert_array_equal(read_mask(path), truth(stem))


def test_two_values_without_a_background_zero_are_an_error(tmp_path):
    stem = copy_pairs(tmp_path, 1)[0]
    path = tmp_path / "masks" / f"{stem}.png"
    Image.fromarray(truth(stem).astype(np.uint8) + 1).save(path)  # background 1, foreground 2
    with pytest.raises(MaskValuesError, match=r"\[1, 2\] .* and no 0 \(background\).* `mask_values`, e.g. 1:0,2:1\."):
        read_mask(path)
    np.testing.assert_array_equal(read_mask(path, mask_values={1: 0, 2: 1}), truth(stem))


def test_jpeg_masks_keep_their_compression_noise_tolerance_but_not_class_ids(tmp_path):
    stem = copy_pairs(tmp_path, 1)[0]
    foreground = truth(stem)
    noisy = tmp_path / "noisy.jpg"
    Image.fromarray(foreground.astype(np.uint8) * 255).save(noisy, quality=75)
    assert len(np.unique(np.asarray(Image.open(noisy)))) > 10  # the original Kvasir-SEG masks are such JPEGs
    assert (read_mask(noisy) != foreground).mean() < 1e-3
    Image.fromarray(split_in_two(foreground, 38, 75)).save(tmp_path / "classes.jpg", quality=95)
    with pytest.raises(MaskValuesError, match="none above 127 as a noisy 0/255 mask would have"):
        read_mask(tmp_path / "classes.jpg")


# ------------------------------------------------------------------------------------------ item 1: empty masks
def test_empty_masks_get_no_box_and_no_dice_in_evaluation(tmp_path):
    stems = copy_pairs(tmp_path, 2)
    empty = tmp_path / "masks" / f"{stems[0]}.png"
    Image.fromarray(np.zeros(truth(stems[0]).shape, np.uint8)).save(empty)
    pairs = discover_pairs(tmp_path)[0]
    model, processor = tiny_model(query_mode="adaptive"), IMedSamProcessor(image_size=64)
    rows, summary = evaluate_pairs(model, processor, pairs, output_sizes=[48])
    alone_rows, alone = evaluate_pairs(model, processor, pairs[1:], output_sizes=[48])
    assert rows[0] == {"stem": stems[0], "size": "48", "empty": 1}  # not run: an empty mask has no box
    assert summary["48"]["n"] == 1 and summary["48"]["n_empty"] == 1
    assert summary["48"]["dice"] == alone["48"]["dice"] < 1.0 and alone["48"]["n_empty"] == 0
    lines = summary_lines({"results": summary})
    assert any("n_empty=  1  empty masks (no foreground): not in Dice, IoU or HD (no box" in line for line in lines)
    # Prompt-free: the empty image is run and scored by the foreground predicted on it, still not by Dice.
    rows, summary = evaluate_pairs(model, processor, pairs, output_sizes=[48], prompt="none")
    assert rows[0]["empty"] == 1 and "dice" not in rows[0]
    predicted_fraction = rows[0]["false_positive_fraction"]
    height, width = grid_size(truth(stems[0]).shape, 48)
    assert rows[0]["false_positive_pixels"] == round(predicted_fraction * height * width) <= height * width
    assert summary["48"]["n"] == 1 and summary["48"]["empty_false_positive_fraction"] == predicted_fraction
    assert summary["48"]["n_empty_with_false_positives"] == int(predicted_fraction > 0)
    assert any("predicted foreground on them" in line for line in summary_lines({"results": summary}))


def test_imedsam_evaluate_reports_empty_masks_and_bad_values_in_one_line(tmp_path, model_dir, capsys):
    stems = copy_pairs(tmp_path / "data", 2)
    Image.fromarray(np.zeros(truth(stems[0]).shape, np.uint8)).save(tmp_path / "data" / "masks" / f"{stems[0]}.png")
    argv = ["evaluate", "--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--split", "all"]
    assert cli_main([*argv, "--output-sizes", "32", "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["n_images"] == 2 and result["results"]["32"]["n"] == 1 and result["results"]["32"]["n_empty"] == 1
    assert "empty masks (no foreground)" in capsys.readouterr().out
    Image.fromarray(split_in_two(truth(stems[1]), 38, 75)).save(tmp_path / "data" / "masks" / f"{stems[1]}.png")
    assert cli_main([*argv, "--json", str(tmp_path / "bad.json")]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("error: ") == 1
    assert f"error: {tmp_path / 'data' / 'masks' / stems[1]}.png: 3 distinct values [0, 38, 75]" in error
    assert (
        cli_main(
            [*argv, "--output-sizes", "32", "--mask-values", "38:1,75:1,255:1", "--json", str(tmp_path / "m.json")]
        )
        == 0
    )
    assert json.loads((tmp_path / "m.json").read_text())["results"]["32"]["n"] == 1


def test_training_samples_of_empty_masks_get_no_fabricated_box(tmp_path):
    stems = copy_pairs(tmp_path, 3)
    Image.fromarray(np.zeros(truth(stems[1]).shape, np.uint8)).save(tmp_path / "masks" / f"{stems[1]}.png")
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    processor = IMedSamProcessor(image_size=64)
    boxed = SegmentationDataset(records, processor, DataConfig(augment=None), train=False)
    assert len(boxed) == 2 and boxed.empty_stems == [stems[1]]
    assert [boxed.records[i]["stem"] for i, _ in boxed.items] == [stems[0], stems[2]]
    prompt_free = SegmentationDataset(records, processor, DataConfig(augment=None, prompt="none"), train=False)
    assert len(prompt_free) == 3 and prompt_free[1]["labels"].sum() == 0  # "nothing here" is a prompt-free target
    # Shifts that throw the polyp out of view in 7 of these 18 samples: framed again, the box is still the polyp's.
    far = AugmentationConfig(translate=1.0, noise_probability=0, blur_probability=0)
    train = SegmentationDataset(records, processor, DataConfig(augment=far, box_jitter=0.0), train=True, seed=3)
    for epoch in range(6):
        train.set_epoch(epoch)
        for index in range(len(train)):
            sample = train[index]
            labels = sample["labels"].numpy()
            assert labels.sum() > 0
            np.testing.assert_allclose(sample["input_boxes"].numpy(), mask_box(labels), atol=1.5)


@pytest.mark.skipif(not BTCV.is_dir(), reason="shared CT data not available")
def test_class_prompted_samples_keep_real_boxes_when_augmented_out_of_view(tmp_path):
    copy_pairs(tmp_path, 2, BTCV)
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    far = AugmentationConfig(translate=0.7, noise_probability=0, blur_probability=0)  # 4 of 8 samples out of view
    config = DataConfig(augment=far, box_jitter=0.0, class_prompts=True, mask_classes=13, all_classes_per_sample=True)
    dataset = SegmentationDataset(records, IMedSamProcessor(image_size=64), config, train=True)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            assert (sample["prompt_classes"] > 0).all()  # never a whole-image prompt for an empty target
            for box, class_id in zip(sample["input_boxes"].numpy(), sample["prompt_classes"].tolist()):
                assert (sample["labels"] == class_id).any()
                x0, y0, x1, y1 = box.round().astype(int)
                assert (sample["labels"][y0 : y1 + 1, x0 : x1 + 1] == class_id).any()


# ------------------------------------------------------------------------------------------- item 5: one stem
def test_two_images_of_one_stem_are_an_error_listing_both(tmp_path, capsys):
    stems = copy_pairs(tmp_path, 2)
    jpg = tmp_path / "images" / f"{stems[0]}.jpg"
    png = jpg.with_suffix(".png")
    Image.open(jpg).save(png)  # the same stem as a second file: both would take masks/<stem>.png
    pairs, problems = discover_pairs(tmp_path)
    assert [p.stem for p in pairs] == [stems[1]]
    assert len(problems) == 1 and str(jpg) in str(problems[0]) and str(png) in str(problems[0])
    assert "neither is used" in str(problems[0])
    with pytest.raises(ValueError, match="1 unusable file") as raised:
        validate_pairs(pairs, on_error="fail", problems=problems)
    assert str(png) in str(raised.value)
    shutil.copy(KVASIR / "masks" / f"{stems[1]}.png", tmp_path / "masks" / f"{stems[1]}.bmp")
    pairs, problems = discover_pairs(tmp_path)
    assert pairs == [] and "2 masks share its stem" in str(problems[1])


def test_imedsam_evaluate_lists_same_stem_images_as_skipped(tmp_path, model_dir, capsys):
    stems = copy_pairs(tmp_path / "data", 2)
    jpg = tmp_path / "data" / "images" / f"{stems[0]}.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    argv = ["evaluate", "--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--split", "all"]
    assert cli_main([*argv, "--output-sizes", "32", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().err  # problems with the data are reported on stderr
    assert f"skipped {jpg}: {jpg.with_suffix('.png')} has the same stem" in out
    assert json.loads((tmp_path / "out.json").read_text())["n_images"] == 1


def test_hidden_appledouble_files_of_a_folder_unzipped_from_a_mac_are_not_images(tmp_path, capsys):
    """`._x.png` (macOS's AppleDouble metadata, beside every file of a folder zipped on a Mac) was paired with the
    mask `._x.png` and read as an image, or listed as an image without a mask; `imedsam predict FOLDER` tried to read
    it. Hidden files are not images, in training / evaluation folders and in predict's input folders."""
    from conftest import tiny_model

    from imedsam_hf.cli import main

    stems = copy_pairs(tmp_path, 2)
    for folder in ("images", "masks"):
        for stem in stems:
            (tmp_path / folder / f"._{stem}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    pairs, problems = discover_pairs(tmp_path)
    assert sorted(p.stem for p in pairs) == sorted(stems) and problems == []
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "images"), "--box", "10,10,100,100"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{stem}.png" for stem in stems)


def test_masks_named_with_a_suffix_pair_with_their_images(tmp_path, capsys):
    """ISIC names a mask `<image>_segmentation.png`, PH2 `_lesion`, BUSI `_mask`: such a folder was
    refused ("no mask named x.* in masks" for every image). The one suffix every mask adds to an image's stem is
    found (`mask_name_suffix`) for training, evaluation and `imedsam predict --boxes-from-masks`."""
    from conftest import tiny_model

    from imedsam_hf.cli import main
    from imedsam_hf.data import mask_name_suffix

    assert mask_name_suffix(["ISIC_0000000", "ISIC_0000001"], ["ISIC_0000000_segmentation"]) == "_segmentation"
    assert mask_name_suffix(["benign (1)", "benign (10)"], ["benign (1)_mask", "benign (10)_mask"]) == "_mask"
    assert mask_name_suffix(["case 7"], ["case 7-mask"]) == "-mask"
    assert mask_name_suffix(["a", "b"], ["a", "b_mask"]) == ""  # named like their images: no suffix
    assert mask_name_suffix(["a", "b"], ["a_mask", "b_seg"]) == ""  # two conventions: none
    assert mask_name_suffix(["a_1", "a"], ["a_1_mask"]) == "_mask"  # the longest image stem it extends
    assert mask_name_suffix(["b (4)", "b (5)"], ["b (4)_mask", "b (4)_mask_1", "b (5)_mask"]) == "_mask"  # BUSI
    from imedsam_hf.data import extra_masks

    assert extra_masks("_mask", ["b (4)_mask", "b (4)_mask_1", "b (4)_mask_2", "b (40)_mask_1"])["b (4)"] == [
        "b (4)_mask_1",
        "b (4)_mask_2",
    ]
    stems = copy_pairs(tmp_path / "plain", 3)
    (tmp_path / "isic" / "images").mkdir(parents=True)
    (tmp_path / "isic" / "masks").mkdir()
    for stem in stems:
        shutil.copy(tmp_path / "plain" / "images" / f"{stem}.jpg", tmp_path / "isic" / "images")
        if stem != stems[2]:  # the last image has no mask: named with the suffix in its problem
            shutil.copy(tmp_path / "plain" / "masks" / f"{stem}.png", tmp_path / "isic" / "masks" / f"{stem}_segmentation.png")  # fmt: skip
    pairs, problems = discover_pairs(tmp_path / "isic")
    assert [(p.stem, Path(p.mask).name) for p in pairs] == [(s, f"{s}_segmentation.png") for s in stems[:2]]
    assert [p.reason for p in problems] == [f"no mask named {stems[2]}_segmentation.* in {tmp_path / 'isic' / 'masks'}"]
    # BUSI: a second lesion's mask beside the first: the image is a problem naming both, never half its truth.
    extra = tmp_path / "isic" / "masks" / f"{stems[1]}_segmentation_1.png"
    shutil.copy(tmp_path / "isic" / "masks" / f"{stems[1]}_segmentation.png", extra)
    pairs, problems = discover_pairs(tmp_path / "isic")
    assert [p.stem for p in pairs] == [stems[0]]
    assert f"2 masks ({stems[1]}_segmentation, {stems[1]}_segmentation_1): one per lesion" in problems[0].reason
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "isic" / "images"), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "isic" / "masks"), "--out", str(tmp_path / "busi")]) == 1
    assert f"2 masks ({stems[1]}_segmentation, {stems[1]}_segmentation_1)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "busi").iterdir()) == [f"{stems[0]}.png"]
    extra.unlink()
    outputs = {}
    for name in ("plain", "isic"):
        argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / name / "images"), "--device", "cpu"]
        masks = ["--boxes-from-masks", str(tmp_path / name / "masks"), "--out", str(tmp_path / f"out_{name}")]
        main([*argv, *masks])
        outputs[name] = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / f"out_{name}").iterdir()}
    assert sorted(outputs["isic"]) == [f"{s}.png" for s in sorted(stems[:2])]
    assert all(np.array_equal(outputs["isic"][k], outputs["plain"][k]) for k in outputs["isic"])
    assert f"no mask named {stems[2]}_segmentation.*" in capsys.readouterr().err
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "isic" / "images"), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "gone"), "--out", str(tmp_path / "o")]) == 2
    assert "--boxes-from-masks" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_capitalised_and_cvc_clinicdb_folders_are_found(tmp_path):
    """`Images/` + `Masks/` (many Kaggle copies) and CVC-ClinicDB's `Original/` + `Ground Truth/` were "no image/mask
    folders found" on a case-sensitive file system; the layouts are matched without regard to case."""
    from imedsam_hf.data import find_layout

    for name, (images, masks) in {"caps": ("Images", "Masks"), "cvc": ("Original", "Ground Truth")}.items():
        stems = copy_pairs(tmp_path / "src" / name, 1)
        (tmp_path / "src" / name / "images").rename(tmp_path / "src" / name / images)
        (tmp_path / "src" / name / "masks").rename(tmp_path / "src" / name / masks)
        assert find_layout(tmp_path / "src" / name) == (
            tmp_path / "src" / name / images,
            tmp_path / "src" / name / masks,
        )
        assert [p.stem for p in discover_pairs(tmp_path / "src" / name)[0]] == stems
    both = tmp_path / "two"  # two folders differing only by case: neither is guessed
    for folder in ("Images", "IMAGES", "masks"):
        (both / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match="no image/mask folders found"):
        find_layout(both)


def test_isic_archives_unzipped_side_by_side_are_a_dataset_folder(tmp_path):
    """ISIC's two archives unzip to `ISIC2018_Task1-2_Training_Input/` (x.jpg, plus a LICENSE) and
    `ISIC2018_Task1_Training_GroundTruth/` (x_segmentation.png): a folder holding exactly these two folders of images
    is read as inputs + ground truth, by their names; three folders, or names that do not say, are not guessed."""
    from imedsam_hf.data import find_layout

    stems = copy_pairs(tmp_path / "src", 2)
    root = tmp_path / "isic"
    inputs, truth = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    inputs.mkdir(parents=True)
    truth.mkdir()
    (inputs / "LICENSE.txt").write_text("CC-BY-NC")
    for stem in stems:
        shutil.copy(tmp_path / "src" / "images" / f"{stem}.jpg", inputs)
        shutil.copy(tmp_path / "src" / "masks" / f"{stem}.png", truth / f"{stem}_segmentation.png")
    assert find_layout(root) == (inputs, truth)
    assert [(p.stem, Path(p.mask).name) for p in discover_pairs(root)[0]] == [
        (s, f"{s}_segmentation.png") for s in stems
    ]
    (root / "ISIC2018_Task1-2_Validation_Input").mkdir()  # a third folder of images: which inputs? not guessed
    shutil.copy(tmp_path / "src" / "images" / f"{stems[0]}.jpg", root / "ISIC2018_Task1-2_Validation_Input")
    with pytest.raises(ValueError, match="no image/mask folders found"):
        find_layout(root)
    unnamed = tmp_path / "unnamed"  # two folders whose names do not say which holds the masks
    for folder in ("first", "second"):
        (unnamed / folder).mkdir(parents=True)
        shutil.copy(tmp_path / "src" / "images" / f"{stems[0]}.jpg", unnamed / folder)
    with pytest.raises(ValueError, match="no image/mask folders found"):
        find_layout(unnamed)
