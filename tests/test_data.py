"""Data: folder layouts, validation with paths, splits, augmentation geometry, box prompts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.data import (
    AugmentationConfig,
    DataConfig,
    SegmentationDataset,
    augment,
    discover_pairs,
    jitter_box,
    load_splits,
    make_splits,
    mask_box,
    read_mask,
    records_from_pairs,
    validate_pairs,
    write_splits,
)


def write_pair(root, stem, size=(40, 30), box=(5, 6, 20, 25), image_dir="images", mask_dir="masks", value=255):
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / image_dir / f"{stem}.jpg")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = value
    Image.fromarray(mask).save(root / mask_dir / f"{stem}.png")


@pytest.mark.parametrize(
    "layout", [("images", "masks"), ("image", "mask"), ("TrainDataset/images", "TrainDataset/masks")]
)
def test_layouts_are_found(tmp_path, layout):
    for stem in ("a", "b"):
        write_pair(tmp_path, stem, image_dir=layout[0], mask_dir=layout[1])
    pairs, problems = discover_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["a", "b"] and not problems


def test_bad_files_are_reported_by_path_and_skipped_or_fatal(tmp_path):
    for stem in ("good", "corrupt", "wrong_size", "nomask"):
        write_pair(tmp_path, stem)
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "wrong_size.png")
    (tmp_path / "masks" / "nomask.png").unlink()
    pairs, problems = discover_pairs(tmp_path)
    good, problems = validate_pairs(pairs, problems=problems)
    assert [p.stem for p in good] == ["good"]
    text = "\n".join(str(p) for p in problems)
    assert "corrupt.jpg" in text and "wrong_size.png" in text and "nomask.jpg" in text
    assert "10x10 but its image is 40x30" in text
    with pytest.raises(ValueError, match="3 unusable") as error:
        validate_pairs(pairs, on_error="fail", problems=discover_pairs(tmp_path)[1])
    assert "corrupt.jpg" in str(error.value)


def test_missing_folder_and_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        discover_pairs(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image/mask folders") as error:
        discover_pairs(tmp_path)
    assert "NIfTI" not in str(error.value)
    # A folder of 3-D scans (MSD's imagesTr/ + labelsTr/, or images/ + masks/ of .nii.gz): the command that slices it.
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "msd" / folder).mkdir(parents=True)
        (tmp_path / "msd" / folder / "la_003.nii.gz").write_bytes(b"")
    expected = (
        f"imedsam convert volumes --images {tmp_path / 'msd' / 'imagesTr'} --labels {tmp_path / 'msd' / 'labelsTr'}"
    )
    with pytest.raises(ValueError, match="imagesTr holds no images") as error:  # nnU-Net's folders, not 2-D ones
        discover_pairs(tmp_path / "msd")
    assert expected in str(error.value)
    for folder in ("images", "masks"):
        (tmp_path / "msd" / folder).mkdir()
        (tmp_path / "msd" / folder / "la_003.nii").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no images") as error:
        discover_pairs(tmp_path / "msd")
    assert f"imedsam convert volumes --images {tmp_path / 'msd' / 'images'} --labels" in str(error.value)


def test_splits_are_seeded_disjoint_and_complete(tmp_path):
    stems = [f"s{i:03d}" for i in range(140)]
    splits = make_splits(stems, seed=7)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [84, 28, 28]
    assert sorted(sum(splits.values(), [])) == stems
    assert make_splits(list(reversed(stems)), seed=7) == splits
    assert make_splits(stems, seed=8) != splits
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    assert load_splits(path) == splits
    write_splits(splits, path, seed=7, source="somewhere")  # the file a run writes, with its metadata
    assert load_splits(path) == splits
    path.write_text("{not json")
    with pytest.raises(ValueError, match="split_file"):
        load_splits(path)


def test_masks_of_every_encoding():
    assert read_mask(np.array([[0, 255], [128, 3]], np.uint8)).tolist() == [[0, 1], [1, 0]]
    assert read_mask(np.array([[0, 1], [1, 0]], np.uint8)).tolist() == [[0, 1], [1, 0]]
    assert read_mask(np.array([[0, 2], [1, 0]], np.uint8), num_classes=2).tolist() == [[0, 2], [1, 0]]
    with pytest.raises(ValueError, match="class id 5"):
        read_mask(np.array([[0, 5]], np.uint8), num_classes=2)


def test_box_from_mask_and_jitter():
    mask = np.zeros((30, 40), bool)
    mask[5:25, 10:30] = True
    assert mask_box(mask).tolist() == [10, 5, 29, 24]
    assert mask_box(np.zeros((3, 3))) is None
    rng = np.random.default_rng(0)
    boxes = np.stack([jitter_box(mask_box(mask), 0.1, (30, 40), rng) for _ in range(200)])
    assert np.abs(boxes - mask_box(mask)).max() <= 2.0 + 1e-5
    assert boxes.std(0).min() > 0.3


def test_a_share_of_training_boxes_stays_exact(tmp_path):
    """--box-jitter-probability P: about P of the training boxes are jittered, the others are the mask's exact box."""
    for index in range(40):
        write_pair(tmp_path, f"p{index:02d}", size=(64, 64), box=(10, 12, 40, 50))
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    processor = IMedSamProcessor(image_size=64)
    exact = np.array([10, 12, 39, 49], np.float32)

    def jittered(probability: float) -> int:
        config = DataConfig(augment=None, box_jitter=0.3, box_jitter_probability=probability)
        dataset = SegmentationDataset(records, processor, config, train=True, seed=0)
        return sum(not np.allclose(dataset[i]["input_boxes"].numpy(), exact) for i in range(len(dataset)))

    assert jittered(1.0) == 40 and jittered(0.0) == 0
    assert 10 <= jittered(0.5) <= 30


def test_augmentation_moves_image_and_mask_together():
    image = torch.zeros(3, 64, 64)
    image[:, 20:40, 10:30] = 255.0
    mask = (image[0] > 0).long()
    config = AugmentationConfig(brightness=0, contrast=0, blur_probability=0, noise_probability=0)
    for seed in range(5):
        out_image, out_mask = augment(image, mask, config, np.random.default_rng(seed))
        assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest neighbour: no interpolated labels
        bright = out_image[0] > 127
        agreement = (bright == out_mask.bool()).float().mean()
        assert agreement > 0.97


def test_dataset_samples_are_deterministic_per_epoch_and_exact_in_eval(tmp_path):
    for stem in ("a", "b", "c"):
        write_pair(tmp_path, stem, size=(60, 45), box=(10, 8, 40, 30))
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    processor = IMedSamProcessor(image_size=32)
    train = SegmentationDataset(records, processor, DataConfig(), train=True, seed=1)
    first = train[0]
    assert first["pixel_values"].shape == (3, 32, 32) and first["labels"].shape == (32, 32)
    assert torch.equal(train[0]["pixel_values"], first["pixel_values"])
    train.set_epoch(1)
    assert not torch.equal(train[0]["pixel_values"], first["pixel_values"])
    evaluation = SegmentationDataset(records, processor, DataConfig(augment=None), train=False)
    sample = evaluation[0]
    scale = 32 / 60
    expected = np.array([10, 8, 39, 29]) * scale
    np.testing.assert_allclose(sample["input_boxes"].numpy(), expected, atol=1e-4)
    assert sample["labels"][24:].sum() == 0  # the padding below the 24-px-high image is background


@pytest.mark.skipif(not (SHARED_DATA / "EndoTect2020-polyp").is_dir(), reason="shared data not available")
def test_real_dataset_loads():
    pairs, problems = discover_pairs(SHARED_DATA / "Kvasir-SEG-sample")
    assert len(pairs) == 5 and not problems
    records = records_from_pairs(pairs)
    dataset = SegmentationDataset(
        records, IMedSamProcessor(image_size=256, normalization="minmax"), DataConfig(), train=True
    )
    sample = dataset[0]
    assert sample["labels"].sum() > 100
    x0, y0, x1, y1 = sample["input_boxes"].tolist()
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256


def test_class_prompts_make_one_binary_sample_per_class(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((40, 50), np.uint8)
    mask[2:10, 3:20] = 1
    mask[20:35, 25:45] = 3
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "images" / "ct.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "ct.png")
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    config = DataConfig(augment=None, class_prompts=True, mask_classes=3)
    dataset = SegmentationDataset(records, IMedSamProcessor(image_size=50), config, train=False)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["class_id"] == 1 and second["class_id"] == 3
    assert set(first["labels"].unique().tolist()) == {0, 1} and first["labels"].sum() == 8 * 17
    np.testing.assert_allclose(second["input_boxes"].numpy(), [25, 20, 44, 34])


def test_splits_keep_the_slices_of_a_scan_together():
    from imedsam_hf.data import group_of, make_splits

    stems = [f"case{c:04d}_slice{z:03d}" for c in range(10) for z in range(3)] + ["loose"]
    splits = make_splits(stems, seed=3)
    groups = {name: {group_of(s) for s in members} for name, members in splits.items()}
    assert sorted(s for members in splits.values() for s in members) == sorted(stems)
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["validation"])
    assert all(len([s for s in splits[n] if s.startswith("case0001_")]) in (0, 3) for n in splits)
    # Stems that are their own group split exactly as a plain shuffle of the stems (earlier runs' splits hold).
    plain = [f"img{i:03d}" for i in range(20)]
    assert make_splits(plain, seed=0) == make_splits(plain, seed=0, group_pattern=None)
    with pytest.raises(ValueError, match="group_pattern"):
        make_splits(stems, group_pattern="(")


def test_splits_keep_a_bids_subjects_sessions_and_sequences_together():
    """Slices converted from a BIDS data set are named by their scans (`sub-01_ses-02_T2w_slice078`): each scan was a
    group, so one patient's two sessions (or T1w and T2w) could sit in train and test. A subject is one group."""
    from imedsam_hf.data import make_splits

    stems = [
        f"sub-{s:02d}_ses-{t}_T{w}w_slice{z:03d}" for s in range(10) for t in (1, 2) for w in (1, 2) for z in (7, 8)
    ]
    splits = make_splits(stems, seed=1)
    subjects = {name: {stem.split("_")[0] for stem in members} for name, members in splits.items()}
    assert sorted(s for members in splits.values() for s in members) == sorted(stems)
    assert [len(subjects[name]) for name in ("train", "validation", "test")] == [6, 2, 2]
    assert not (subjects["train"] & subjects["test"]) and not (subjects["train"] & subjects["validation"])
    assert not (subjects["validation"] & subjects["test"])


def test_one_mask_per_structure_folders_convert_to_class_id_masks(tmp_path):
    """SAM-Med2D's layout (masks/<stem>_<structure>_<NNN>.png): a clear error, and a converter to class-id masks."""
    import json

    from imedsam_hf.cli import main
    from imedsam_hf.data import read_class_names

    source = SHARED_DATA / "SAM-Med2D-demo-CT"
    with pytest.raises(ValueError, match="imedsam convert structure-masks"):
        discover_pairs(source)
    assert main(["convert", "structure-masks", "--data-dir", str(source), "--output", str(tmp_path / "ct")]) == 0
    names = read_class_names(tmp_path / "ct")
    assert names[1] == "aorta" and "inferior_vena_cava" in names.values() and len(names) == 24
    pairs, problems = discover_pairs(tmp_path / "ct")
    assert len(pairs) == 4 and not problems  # the fifth image has no mask
    labels = read_mask(tmp_path / "ct" / "masks" / "s0619_32.png", num_classes=24)
    hip_left = [i for i, n in names.items() if n == "hip_left"][0]
    truth = sum(
        (np.asarray(Image.open(source / "masks" / f"s0619_32_hip_left_00{k}.png")) > 0).astype(int) for k in (0, 1)
    )
    assert ((labels == hip_left) == (truth > 0)).mean() > 0.99  # both instances of one structure, one class
    assert json.loads((tmp_path / "ct" / "classes.json").read_text())["classes"]["1"] == "aorta"


def test_one_folder_of_masks_per_structure_converts_to_class_id_masks(tmp_path):
    """The Montgomery chest X-ray set keeps each lung in a folder of its own (`CXR_png/MCUCXR_0001_0.png` beside
    `ManualMask/leftMask/` and `ManualMask/rightMask/`): training and evaluate said "no image/mask folders found",
    and `convert structure-masks` knew only SAM-Med2D's names. Both layouts now name the converter, which writes the
    class ids (by the folders' sorted names) whole or not at all."""
    from imedsam_hf.cli import main
    from imedsam_hf.data import read_class_names

    rng = np.random.default_rng(0)
    for root, images, masks in (("montgomery", "CXR_png", "ManualMask"), ("plain", "images", "masks")):
        for folder in (images, f"{masks}/leftMask", f"{masks}/rightMask"):
            (tmp_path / root / folder).mkdir(parents=True)
        for i in range(1, 4):
            stem = f"MCUCXR_{i:04d}_0"
            Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8)).save(
                tmp_path / root / images / f"{stem}.png"
            )
            left, right = np.zeros((40, 32), np.uint8), np.zeros((40, 32), np.uint8)
            left[5:35, 18:30], right[5:35, 2:20] = 255, 255  # overlapping in columns 18..19
            Image.fromarray(left).save(tmp_path / root / masks / "leftMask" / f"{stem}.png")
            Image.fromarray(right).save(tmp_path / root / masks / "rightMask" / f"{stem}.png")
        with pytest.raises(ValueError, match=r"holds one folder of masks per structure \(leftMask, rightMask\)"):
            discover_pairs(tmp_path / root)
        out = tmp_path / f"{root}_ids"
        assert main(["convert", "structure-masks", "--data-dir", str(tmp_path / root), "--output", str(out)]) == 0
        assert read_class_names(out) == {1: "leftMask", 2: "rightMask"}
        labels = read_mask(out / "masks" / "MCUCXR_0001_0.png", num_classes=2)
        assert (labels[5:35, 20:30] == 1).all() and (labels[5:35, 2:18] == 2).all()
        assert (labels[5:35, 18:20] == 1).all()  # where they overlap, the first name keeps the pixel
        pairs, problems = discover_pairs(out)
        assert len(pairs) == 3 and not problems
    # An existing output is kept; a mask of another size stops the conversion with nothing written.
    assert main(["convert", "structure-masks", "--data-dir", str(tmp_path / "plain"), "--output", str(out)]) == 2
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain" / "masks" / "leftMask" / "MCUCXR_0003_0.png")
    argv = ["convert", "structure-masks", "--data-dir", str(tmp_path / "plain"), "--output", str(tmp_path / "new")]
    assert main(argv) == 2 and not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))


def write_slices(root, boxes: dict[int, dict[int, tuple]], size=(50, 40)) -> None:
    """Slices `scan_slice<z>` of one scan: class-id masks with a rectangle per class (x0, y0, x1, y1 exclusive)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for z, classes in boxes.items():
        mask = np.zeros((size[1], size[0]), np.uint8)
        for class_id, (x0, y0, x1, y1) in classes.items():
            mask[y0:y1, x0:x1] = class_id
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(root / "images" / f"scan_slice{z:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"scan_slice{z:03d}.png")


@pytest.mark.parametrize("all_classes", [True, False])
def test_neighbour_boxes_come_from_a_nearby_slice_of_the_scan(tmp_path, all_classes):
    """--neighbour-box-probability 1: every training box is the same structure's box on a slice at most
    --neighbour-box-distance away, widened by the margin (the boxes 3-D propagation gives); a structure absent there
    keeps its own box; probability 0 leaves the samples exactly as before."""
    # class 2 is absent from slice 12
    drawn = {10: {1: (10, 10, 20, 20), 2: (30, 5, 40, 15)}, 11: {1: (12, 11, 24, 22), 2: (31, 6, 41, 16)},
             12: {1: (14, 12, 28, 24)}}  # fmt: skip
    write_slices(tmp_path, drawn)
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    processor = IMedSamProcessor(image_size=50)
    base = dict(augment=None, box_jitter=0.0, class_prompts=True, mask_classes=2, all_classes_per_sample=all_classes)
    config = DataConfig(
        **base,
        neighbour_box_probability=1.0,
        neighbour_box_distance=1,
        neighbour_box_margin=2.0,
        group_pattern=r"^(.*)_slice\d+$",
    )
    dataset = SegmentationDataset(records, processor, config, train=True, seed=0)
    boxes = {z: {c: [x0, y0, x1 - 1, y1 - 1] for c, (x0, y0, x1, y1) in cs.items()} for z, cs in drawn.items()}
    widened = {
        z: {c: [b[0] - 2, b[1] - 2, b[2] + 2, b[3] + 2] for c, b in classes.items()} for z, classes in boxes.items()
    }
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            record, class_id = dataset.items[index]
            z = 10 + record
            prompts = (
                zip(sample["input_boxes"].tolist(), sample["prompt_classes"].tolist())
                if all_classes
                else [(sample["input_boxes"].tolist(), int(sample["class_id"]))]
            )
            for box, c in prompts:
                options = [widened[z + d][c] for d in (-1, 1) if c in widened.get(z + d, {})]
                if box in options:
                    seen.add((z, c))
                else:  # the neighbour drawn lacks the structure, or is not in the data: its own box
                    assert box == [float(v) for v in boxes[z][c]], (z, c, box)
    assert {(10, 1), (11, 1), (12, 1), (11, 2)} <= seen
    plain = SegmentationDataset(records, processor, DataConfig(**base), train=True, seed=0)
    again = SegmentationDataset(records, processor, replace_probability(config, 0.0), train=True, seed=0)
    for index in range(len(plain)):
        assert torch.equal(plain[index]["input_boxes"], again[index]["input_boxes"])


def test_neighbour_box_jitter_moves_each_side_within_its_fraction(tmp_path):
    """--neighbour-box-jitter F: each side of a neighbour box (the neighbour's box widened by the margin) moves by up
    to F of that box's size, either way, differently from sample to sample (the drift of boxes propagated from
    imperfect masks); the box stays a box inside the slice."""
    drawn = {10: {1: (10, 10, 30, 30)}, 11: {1: (10, 10, 30, 30)}}
    write_slices(tmp_path, drawn)
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    config = DataConfig(
        augment=None,
        box_jitter=0.0,
        class_prompts=True,
        mask_classes=1,
        neighbour_box_probability=1.0,
        neighbour_box_distance=1,
        neighbour_box_margin=2.0,
        neighbour_box_jitter=0.25,
        group_pattern=r"^(.*)_slice\d+$",
    )
    dataset = SegmentationDataset(records, IMedSamProcessor(image_size=50), config, train=True, seed=0)
    widened = np.array([8.0, 8.0, 31.0, 31.0])  # the neighbour's box (10..29) widened by 2 px
    bound = 0.25 * np.array([23.0, 23.0, 23.0, 23.0]) + 1e-4
    seen = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            box = dataset[index]["input_boxes"].numpy()
            assert (np.abs(box - widened) <= bound).all(), box
            assert box[0] < box[2] and box[1] < box[3] and box.min() >= 0 and box[2] <= 50 and box[3] <= 40
            if not np.array_equal(box, [10.0, 10.0, 29.0, 29.0]):  # not the own box (a neighbour not in the data)
                seen.append(tuple(box.round(3)))
    assert len(seen) >= 8 and len(set(seen)) == len(seen)  # each draw its own jitter
    assert any((np.abs(np.array(b) - widened) > 1.0).any() for b in seen)


@pytest.mark.parametrize("all_classes", [True, False])
def test_extent_boxes_are_each_structures_extent_over_its_scan(tmp_path, all_classes):
    """--extent-box-probability 1: every training box is the structure's in-plane extent over the scan's slices (the
    box a 3-D box prompts its middle slice with), whichever slice the sample is; scans are kept apart; shared with
    the neighbour boxes, each sample takes one or the other."""
    drawn = {10: {1: (10, 10, 20, 20), 2: (30, 5, 40, 15)}, 11: {1: (12, 11, 24, 22), 2: (31, 6, 41, 16)},
             12: {1: (14, 12, 28, 24)}}  # fmt: skip
    write_slices(tmp_path, drawn)
    other = tmp_path / "other"  # a second scan whose structure 1 lies elsewhere: never part of scan's extent
    write_slices(other, {10: {1: (0, 0, 5, 5)}})
    for folder in ("images", "masks"):
        (other / folder / "scan_slice010.png").rename(tmp_path / folder / "other_slice010.png")
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    processor = IMedSamProcessor(image_size=50)
    base = dict(augment=None, box_jitter=0.0, class_prompts=True, mask_classes=2, all_classes_per_sample=all_classes)
    config = DataConfig(**base, extent_box_probability=1.0, group_pattern=r"^(.*)_slice\d+$")
    dataset = SegmentationDataset(records, processor, config, train=True, seed=0)
    extent = {1: [10.0, 10.0, 27.0, 23.0], 2: [30.0, 5.0, 40.0, 15.0]}
    for index in range(len(dataset)):
        sample = dataset[index]
        stem = dataset.records[dataset.items[index][0]]["stem"]
        prompts = (
            zip(sample["input_boxes"].tolist(), sample["prompt_classes"].tolist())
            if all_classes
            else [(sample["input_boxes"].tolist(), int(sample["class_id"]))]
        )
        for box, c in prompts:
            assert box == ([0.0, 0.0, 4.0, 4.0] if stem == "other_slice010" else extent[c]), (stem, c, box)
    mixed = replace(config, neighbour_box_probability=0.5, extent_box_probability=0.5, neighbour_box_margin=0.0)
    dataset = SegmentationDataset(records, processor, mixed, train=True, seed=0)
    kinds = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        sample = dataset[1]  # scan_slice011
        box, c = sample["input_boxes"].tolist(), 1
        box = box[0] if all_classes else box
        neighbours = ([10.0, 10.0, 19.0, 19.0], [14.0, 12.0, 27.0, 23.0])  # slices 10 and 12, no margin
        kinds.add("extent" if box == extent[c] else "neighbour" if box in neighbours else str(box))
    assert kinds == {"extent", "neighbour"}


@pytest.mark.parametrize("all_classes", [True, False])
def test_propagated_boxes_are_drawn_from_those_recorded_for_the_slice(tmp_path, all_classes):
    """--propagated-box-probability 1 with --propagated-boxes: a structure with boxes recorded on its slice (those a
    propagation chain prompted it with) takes one of them, each in turn over the epochs; one without (another class,
    another slice) keeps its own box; the stems need no slice numbers."""
    drawn = {10: {1: (10, 10, 20, 20)}, 11: {1: (12, 11, 24, 22), 2: (31, 6, 41, 16)}}
    write_slices(tmp_path, drawn)
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    recorded = [[8.0, 9.0, 30.0, 25.0], [14.0, 12.0, 20.0, 18.0]]
    config = DataConfig(
        augment=None,
        box_jitter=0.0,
        class_prompts=True,
        mask_classes=2,
        all_classes_per_sample=all_classes,
        propagated_box_probability=1.0,
        propagated_boxes={"scan_slice011": {1: recorded}, "elsewhere_slice001": {1: [[0.0, 0.0, 5.0, 5.0]]}},
    )
    dataset = SegmentationDataset(records, IMedSamProcessor(image_size=50), config, train=True, seed=0)
    own = {(10, 1): [10.0, 10.0, 19.0, 19.0], (11, 1): [12.0, 11.0, 23.0, 21.0], (11, 2): [31.0, 6.0, 40.0, 15.0]}
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            z = 10 + dataset.items[index][0]
            prompts = (
                zip(sample["input_boxes"].tolist(), sample["prompt_classes"].tolist())
                if all_classes
                else [(sample["input_boxes"].tolist(), int(sample["class_id"]))]
            )
            for box, c in prompts:
                if (z, c) == (11, 1):
                    assert box in recorded, box
                    seen.add(tuple(box))
                else:
                    assert box == own[z, c], (z, c, box)
    assert seen == {tuple(b) for b in recorded}


def replace_probability(config: DataConfig, probability: float) -> DataConfig:
    return replace(config, neighbour_box_probability=probability)


def test_neighbour_boxes_need_the_slices_of_volumes(tmp_path):
    write_pair(tmp_path, "photo", size=(40, 30))
    records = records_from_pairs(discover_pairs(tmp_path)[0])
    config = DataConfig(augment=None, neighbour_box_probability=0.5, group_pattern=r"^(.*)_slice\d+$")
    with pytest.raises(ValueError, match="'photo' is not one"):
        SegmentationDataset(records, IMedSamProcessor(image_size=40), config, train=True)


def hub_rows(count, size=(40, 30), wrong_size=()):
    """`count` rows of a dataset with image and mask columns (PIL images); masks of `wrong_size` rows are 10x10."""
    import datasets

    images, masks = [], []
    for i in range(count):
        images.append(Image.fromarray(np.full((size[1], size[0], 3), 40 * i % 255, np.uint8)))
        shape = (10, 10) if i in wrong_size else (size[1], size[0])
        mask = np.zeros(shape, np.uint8)
        mask[2:8, 3:9] = 255
        masks.append(Image.fromarray(mask))
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "mask": masks}, features=features)


def test_a_saved_dataset_keeps_its_own_held_out_splits(tmp_path):
    """`save_to_disk` folders load (`load_dataset` refuses them), and a dataset's own validation and test splits are
    reported as its own; a split without masks (a hidden test set) is not used."""
    import datasets

    from imedsam_hf.data import load_hub_dataset

    hub_rows(3).save_to_disk(str(tmp_path / "one"))
    records, own = load_hub_dataset(str(tmp_path / "one"))
    assert records["stem"] == ["train-000000", "train-000001", "train-000002"] and own == {}

    hidden = hub_rows(2).remove_columns("mask")
    datasets.DatasetDict({"train": hub_rows(4), "valid": hub_rows(2), "test": hidden}).save_to_disk(str(tmp_path / "d"))
    records, own = load_hub_dataset(str(tmp_path / "d"))
    assert own == {"validation": ["valid-000000", "valid-000001"]}
    assert len(records) == 6 and sorted(records.column_names) == ["image", "mask", "stem"]
    with pytest.raises(ValueError, match=r"`dataset_split` 'training': .* has the splits \['train', 'valid', 'test'\]"):
        load_hub_dataset(str(tmp_path / "d"), split="training")
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]"):
        load_hub_dataset(str(tmp_path / "d"), mask_column="label")


def test_dataset_rows_are_checked_like_folder_pairs(tmp_path):
    """A dataset row whose mask is missing or of another size is a problem naming the row, never trained on
    stretched (it was: dataset rows were not checked at all)."""
    from imedsam_hf.data import validate_records

    rows = hub_rows(4, wrong_size=(1,))
    rows = rows.cast_column("mask", rows.features["mask"])  # keep the Image feature through the edit below
    rows = rows.map(lambda row, i: {"mask": None if i == 3 else row["mask"]}, with_indices=True)
    rows = rows.add_column("stem", [f"train-{i:06d}" for i in range(4)])
    good, problems = validate_records(rows, source="--dataset org/polyps")
    assert good["stem"] == ["train-000000", "train-000002"]
    assert [str(p) for p in problems] == [
        "--dataset org/polyps row train-000001: mask is 10x10 but its image is 40x30",
        "--dataset org/polyps row train-000003: no mask",
    ]
    with pytest.raises(ValueError, match="2 unusable file"):
        validate_records(rows, on_error="fail")


def test_a_dataset_with_several_configurations_takes_one_by_name(tmp_path):
    """A dataset with several configurations (subsets: one repository, several data sets) loads the one
    `dataset_config` names; without it, the error lists them (datasets' own asks for a Python call)."""
    from imedsam_hf.data import load_hub_dataset

    lines = ["---", "configs:"]
    for name, count in (("kvasir", 3), ("cvc", 2)):
        (tmp_path / name).mkdir()
        hub_rows(count).to_parquet(str(tmp_path / name / "train-00000-of-00001.parquet"))
        lines += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {name}/*.parquet"]
    (tmp_path / "README.md").write_text("\n".join([*lines, "---", ""]))
    assert len(load_hub_dataset(str(tmp_path), config="cvc")[0]) == 2
    assert len(load_hub_dataset(str(tmp_path), config="kvasir")[0]) == 3
    with pytest.raises(ValueError, match=r"several configurations \(kvasir, cvc\): set `dataset_config` to one"):
        load_hub_dataset(str(tmp_path))
    hub_rows(1).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="`dataset_config` 'x': .* has no configurations"):
        load_hub_dataset(str(tmp_path / "saved"), config="x")


def test_an_image_folder_with_a_metadata_csv_is_a_dataset(tmp_path):
    """datasets' `imagefolder` convention: images beside a metadata.csv whose `*_file_name` columns name the image
    and its mask give `image` and `mask` columns, rows checked like any dataset's."""
    import shutil

    from imedsam_hf.data import load_hub_dataset, validate_records

    source, folder = SHARED_DATA / "Kvasir-SEG-sample", tmp_path / "polyps" / "train"
    (folder / "masks").mkdir(parents=True)
    lines = ["image_file_name,mask_file_name"]
    for image in sorted((source / "images").iterdir())[:2]:
        shutil.copy(image, folder / image.name)
        shutil.copy(source / "masks" / f"{image.stem}.png", folder / "masks" / f"{image.stem}.png")
        lines.append(f"{image.name},masks/{image.stem}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    records, own = load_hub_dataset(str(tmp_path / "polyps"))
    good, problems = validate_records(records)
    assert len(good) == 2 and not problems and own == {}


def test_a_classes_file_of_more_ids_than_8_bits_is_refused_in_one_line(tmp_path):
    """A classes.json numbering 300 instances was refused listing all 301 ids; the message names the first few
    outside 0..255 and how many there are."""
    from imedsam_hf.data import read_class_file

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": {str(i): f"cell {i}" for i in range(301)}}))
    with pytest.raises(ValueError) as refused:
        read_class_file(path)
    message = str(refused.value)
    assert message.endswith(
        "class ids must be 0..255 (masks store them in 8 bits), got 256, 257, 258, 259, 260, ... (45 in all)."
    )


def test_split_files_name_scans_and_come_as_monai_datalists_or_nnunet_folds(tmp_path):
    """A split by scan (`{"train": ["case0005"], "test": ["case0001"]}`: TransUNet's Synapse test list, the paper's
    18/12 BTCV split) was refused as "stems not in the data" for a folder of slices; MONAI's datalist
    (`dataset_0.json`) and nnU-Net's `splits_final.json` (a list of folds) could not be read at all. A scan's name now
    stands for its slices, a datalist entry for its image's case, an nnU-Net fold is picked by `fold`."""
    from imedsam_hf.data import resolve_split_names, split_stems

    stems = ["case0001_slice080", "case0001_slice081", "case0002_slice010", "img0005_slice003", "polyp7"]
    by_scan = {"train": ["case0001", "polyp7"], "validation": ["case0002_slice010"], "test": ["img0005"]}
    assert resolve_split_names(by_scan, stems) == {
        "train": ["case0001_slice080", "case0001_slice081", "polyp7"],
        "validation": ["case0002_slice010"],
        "test": ["img0005_slice003"],
    }
    with pytest.raises(ValueError, match=r"names neither an image of the data nor a scan's slices .*: case0009"):
        resolve_split_names({"train": ["case0001", "case0009"]}, stems)
    with pytest.raises(ValueError, match=r"case0001_slice080 is in train and in test"):
        resolve_split_names({"train": ["case0001"], "test": ["case0001_slice080"]}, stems)
    datalist = {
        "training": [{"image": "imagesTr/img0005.nii.gz", "label": "labelsTr/label0005.nii.gz"}],
        "validation": [{"image": "imagesTr/case0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}],
        "test": ["imagesTs/case0002.nii.gz"],
    }
    (tmp_path / "dataset_0.json").write_text(json.dumps(datalist))
    assert load_splits(tmp_path / "dataset_0.json") == {
        "train": ["img0005"],
        "validation": ["case0001"],
        "test": ["case0002"],
    }
    assert split_stems("validation", tmp_path / "dataset_0.json", stems) == {"case0001_slice080", "case0001_slice081"}
    folds = [{"train": ["case0001", "img0005"], "val": ["case0002"]}, {"train": ["case0002"], "val": ["case0001"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    with pytest.raises(ValueError, match=r"nnU-Net's 2 folds; give `split_fold` 0..1"):
        load_splits(tmp_path / "splits_final.json")
    assert load_splits(tmp_path / "splits_final.json", 1) == {
        "train": ["case0002"],
        "validation": ["case0001"],
        "test": [],
    }
    assert split_stems("train", tmp_path / "splits_final.json", stems, fold=0) == {
        "case0001_slice080", "case0001_slice081", "img0005_slice003"
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"`split_fold` 2: .* holds folds 0..1"):
        load_splits(tmp_path / "splits_final.json", 2)
    with pytest.raises(ValueError, match=r"`split_fold` 0: .* holds one split"):
        load_splits(tmp_path / "dataset_0.json", 0)


def test_transunets_synapse_lists_are_a_split_file(tmp_path):
    """TransUNet's BTCV split (SAMed's, and most papers'): `lists/lists_Synapse/train.txt` names training slices,
    unlabelled ones among them (absent from a folder made by `convert volumes`: passed over), `test_vol.txt` the test
    scans. The folder, or one of its files, is a split file; a slice of a scan the data does not hold is refused."""
    from imedsam_hf.data import resolve_split_names, split_stems

    stems = ["case0001_slice080", "case0001_slice081", "case0031_slice050", "case0031_slice051"]
    lists = tmp_path / "lists_Synapse"
    lists.mkdir()
    (lists / "train.txt").write_text("case0031_slice000\ncase0031_slice050\ncase0031_slice051\n\n")
    (lists / "test_vol.txt").write_text("case0001\n")
    (lists / "all.lst").write_text("ignored")
    assert load_splits(lists) == {
        "train": ["case0031_slice000", "case0031_slice050", "case0031_slice051"], "validation": [], "test": ["case0001"]
    }  # fmt: skip
    assert resolve_split_names(load_splits(lists), stems)["train"] == ["case0031_slice050", "case0031_slice051"]
    assert split_stems("test", lists / "test_vol.txt", stems) == {"case0001_slice080", "case0001_slice081"}
    with pytest.raises(ValueError, match=r"names neither .*: case0099_slice001"):
        resolve_split_names({"train": ["case0099_slice001"]}, stems)
    (tmp_path / "cases.txt").write_text("case0001\n")
    with pytest.raises(ValueError, match=r"cases.txt: its name says no split"):
        load_splits(tmp_path / "cases.txt")
