"""LiteMedSAM's and MedSAM's own training data as NumPy files: the CVPR 2024 "MedSAM on laptop" challenge's `.npz`
cases (`imgs`, `gts`, `spacing`) and MedSAM's `npy/imgs` + `npy/gts` pairs, made images and masks to train and
evaluate on (`imedsam convert npz`)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_model
from PIL import Image

from imedsam_hf.cli import main
from imedsam_hf.data import find_layout, make_splits, read_mask
from imedsam_hf.volumes import numpy_cases_to_slices

BTCV = SHARED_DATA / "BTCV-Synapse-CT"
KVASIR = SHARED_DATA / "Kvasir-SEG-sample"
pytestmark = pytest.mark.skipif(not BTCV.is_dir() or not KVASIR.is_dir(), reason="shared data missing")


def challenge_data(root, slices=slice(70, 76)):
    """Two 3-D cases as the challenge holds them (MedSAM's `pre_CT_MR.py`: SimpleITK's `(D, H, W)` array order,
    `spacing` as `GetSpacing` gives it) from a few slices of BTCV case0002, a 2-D endoscopy case (`(H, W, 3)`, 0/1
    `gts`), and MedSAM's npy pairs of one of them (`npy/imgs/<case>-<nnn>.npy`)."""
    scan = nib.load(BTCV / "volumes" / "case0002.nii.gz")
    imgs = np.asarray(scan.dataobj)[:, :, slices].astype(np.uint8).transpose(2, 1, 0)
    gts = np.asarray(nib.load(BTCV / "labels" / "case0002.nii.gz").dataobj)[:, :, slices].astype(np.uint8)
    gts = gts.transpose(2, 1, 0)
    gts[0] = 0  # a slice without a structure
    spacing = np.array([0.75, 0.8, 3.0])
    ct = root / "CT" / "CT_Abd"
    ct.mkdir(parents=True)
    np.savez_compressed(ct / "CT_Abd_A.npz", imgs=imgs, gts=gts, spacing=spacing)
    np.savez_compressed(ct / "CT_Abd_B.npz", imgs=imgs[::-1], gts=gts[::-1], spacing=spacing)
    # MedSAM's first form (2023): (n, H, W, 3) RGB stacks of the labelled slices beside their embeddings, no spacing
    rgb = np.repeat(imgs[1:3, ..., None], 3, axis=-1)
    np.savez_compressed(ct / "CT_Abd_D.npz", imgs=rgb, gts=gts[1:3], img_embeddings=np.zeros((2, 1, 4, 2, 2)))
    image = next(p for p in sorted((KVASIR / "images").iterdir()))
    picture = np.asarray(Image.open(image).convert("RGB"))[::4, ::4]
    polyp = (np.asarray(Image.open(KVASIR / "masks" / f"{image.stem}.png").convert("L"))[::4, ::4] > 127).astype(
        np.uint8
    )
    endo = root / "Endoscopy" / "Endoscopy_Kvasir"
    endo.mkdir(parents=True)
    np.savez_compressed(endo / "Endoscopy_Kvasir_1.npz", imgs=picture, gts=polyp, spacing=np.array([1.0, 1.0]))
    npy = root / "npy"
    for sub in ("imgs", "gts"):
        (npy / sub).mkdir(parents=True)
    for z in range(1, 4):
        np.save(npy / "imgs" / f"CT_Abd_C-{z:03d}.npy", np.repeat(imgs[z][..., None], 3, axis=-1) / 255.0)
        np.save(npy / "gts" / f"CT_Abd_C-{z:03d}.npy", gts[z])
    np.save(npy / "imgs" / "CT_Abd_C-009.npy", imgs[5])  # no gts file: left out, as MedSAM's loader leaves it
    return imgs, gts, picture, polyp


def test_the_challenges_cases_and_medsams_npy_become_images_and_masks_to_train_on(tmp_path, capsys):
    """LiteMedSAM users hold their data as the challenge's `.npz` cases or MedSAM's npy folders: `evaluate` and
    training found "no image/mask folders" in them, and no command read them. `imedsam convert npz` writes each 3-D
    case's labelled slices as the model sees them (`imgs[z]` as stored, as `predict CASE.npz` shows it) with their
    label ids, a 2-D case as one image, npy slices renamed so that a scan's slices are one group, and each 3-D case's
    spacing for per-volume distances; `evaluate` runs on the result, and pointed at the NumPy data names the command."""
    imgs, gts, picture, polyp = challenge_data(tmp_path / "data")
    tiny_model(num_classes=1).save_pretrained(tmp_path / "model")
    case = str(tmp_path / "data" / "CT" / "CT_Abd" / "CT_Abd_A.npz")  # predict has no boxes to prompt it with
    assert main(["predict", "--model", str(tmp_path / "model"), case, "--out", str(tmp_path / "P")]) == 1
    assert "no boxes array (it holds imgs, gts, spacing): a training case" in capsys.readouterr().err
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--split", "all", "--json", str(tmp_path / "e.json")]
    assert main([*argv, "--data-dir", str(tmp_path / "data" / "CT")]) == 2
    assert "imedsam convert npz --images" in capsys.readouterr().err
    assert main(["convert", "npz", "--images", str(tmp_path / "data"), "--output", str(tmp_path / "S")]) == 0
    assert "16 images and masks from 7 files" in capsys.readouterr().out
    out = tmp_path / "S"
    stems = sorted(p.stem for p in (out / "images").iterdir())
    assert stems == [
        *(f"CT_Abd_A_slice{z:03d}" for z in range(1, 6)),  # slice 0 holds no structure
        *(f"CT_Abd_B_slice{z:03d}" for z in range(5)),
        *(f"CT_Abd_C_slice{z:03d}" for z in range(1, 4)),  # CT_Abd_C-009 has no gts file
        "CT_Abd_D_slice000",
        "CT_Abd_D_slice001",
        "Endoscopy_Kvasir_1",
    ]
    for z in (1, 4):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"CT_Abd_A_slice{z:03d}.png")), imgs[z])
        np.testing.assert_array_equal(read_mask(out / "masks" / f"CT_Abd_A_slice{z:03d}.png", 255), gts[z])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "CT_Abd_C_slice002.png"))[..., 0], imgs[2])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "CT_Abd_D_slice001.png"))[..., 1], imgs[2])
    np.testing.assert_array_equal(read_mask(out / "masks" / "CT_Abd_D_slice001.png", 255), gts[2])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "Endoscopy_Kvasir_1.png")), picture)
    np.testing.assert_array_equal(read_mask(out / "masks" / "Endoscopy_Kvasir_1.png", 255), polyp)
    with (out / "cases.csv").open() as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"CT_Abd_A", "CT_Abd_B"} and rows["CT_Abd_A"]["spacing_mm"] == "0.75x0.8x3.0"
    assert rows["CT_Abd_A"]["n_slices"] == "6" and rows["CT_Abd_A"]["n_labelled_slices"] == "5"
    present = sorted({int(c) for c in np.unique(gts) if c})
    assert json.loads((out / "classes.json").read_text())["classes"]["1"] == "class 1"
    assert find_layout(out) == (out / "images", out / "masks")
    splits = make_splits(stems, seed=0)
    for case in ("CT_Abd_A", "CT_Abd_B", "CT_Abd_C", "CT_Abd_D"):  # a scan's slices in one split, npy's too
        assert len({name for name, part in splits.items() for s in part if s.startswith(case)}) == 1
    assert main([*argv, "--data-dir", str(out), "--classes", str(present[-1])]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    per_scan = result["volume"]["per_scan"]
    assert set(per_scan) == {"CT_Abd_A", "CT_Abd_B", "CT_Abd_C", "CT_Abd_D"}, per_scan  # npy slices: one scan's
    measured = {case: sorted(scores[str(present[-1])]) for case, scores in per_scan.items()}
    assert measured == {"CT_Abd_A": ["dice", "hd95", "nsd"], "CT_Abd_B": ["dice", "hd95", "nsd"]} | {
        case: ["dice"]
        for case in ("CT_Abd_C", "CT_Abd_D")  # no spacing: 3-D Dice only
    }


def test_numpy_data_refusals_name_the_file_and_keep_the_output(tmp_path, capsys):
    """A validation case (imgs and boxes, no gts) is one to predict; shapes that disagree, label ids that are no
    whole numbers or more than 8-bit masks hold (the challenge's microscopy cases number each cell), two cases of one
    name and a folder without NumPy data are refused naming the file; an output folder already holding files is kept
    as it was."""
    data = tmp_path / "data"
    data.mkdir()
    grey = np.zeros((4, 16, 16), np.uint8)
    ids = np.zeros((4, 16, 16), np.uint8)
    ids[1, 4:8, 4:8] = 1
    np.savez(data / "val.npz", imgs=grey, boxes=np.array([[1, 1, 0, 5, 5, 2]]))
    with pytest.raises(ValueError, match=r"val.npz: no gts array \(it holds imgs, boxes\): a case to predict"):
        numpy_cases_to_slices(data, tmp_path / "S")
    (data / "val.npz").unlink()
    np.savez(data / "bad.npz", imgs=grey, gts=ids[:2])
    with pytest.raises(ValueError, match=r"bad.npz: imgs \(4, 16, 16\) and gts \(2, 16, 16\)"):
        numpy_cases_to_slices(data, tmp_path / "S")
    np.savez(data / "bad.npz", imgs=grey, gts=ids * 0.5)
    with pytest.raises(ValueError, match=r"bad.npz: label ids of float64 values that are not whole numbers"):
        numpy_cases_to_slices(data, tmp_path / "S")
    cells = np.arange(16 * 16, dtype=np.uint16).reshape(1, 16, 16).repeat(4, axis=0) + 1  # 256 instances
    np.savez(data / "bad.npz", imgs=grey, gts=cells)
    with pytest.raises(ValueError, match=r"bad.npz: label ids up to 256 \(256 structures\): masks hold ids 0..255"):
        numpy_cases_to_slices(data, tmp_path / "S")
    np.savez(data / "bad.npz", imgs=grey, gts=ids)
    (data / "other").mkdir()
    np.savez(data / "other" / "bad.npz", imgs=grey, gts=ids)
    with pytest.raises(ValueError, match=r"two cases named bad"):
        numpy_cases_to_slices(data, tmp_path / "S")
    (data / "other" / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"other/bad.npz: not a readable .npz file"):
        numpy_cases_to_slices(data / "other", tmp_path / "S")
    assert not (tmp_path / "S").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "x.txt").write_text("mine")
    assert main(["convert", "npz", "--images", str(data / "bad.npz"), "--output", str(tmp_path / "kept")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["x.txt"]
    (tmp_path / "empty").mkdir()
    assert main(["convert", "npz", "--images", str(tmp_path / "empty"), "--output", str(tmp_path / "S")]) == 2
    assert "no LiteMedSAM / MedSAM NumPy training data in it" in capsys.readouterr().err
    assert main(["convert", "npz", "--images", str(data / "bad.npz"), "--output", str(tmp_path / "S")]) == 0
    assert sorted(p.name for p in (tmp_path / "S" / "images").iterdir()) == ["bad_slice001.png"]


def test_transunets_synapse_data_is_numpy_training_data_too(tmp_path, capsys):
    """TransUNet's preprocessed Synapse (BTCV) data, which SAMed and the I-MedSAM paper's BCV experiments read:
    `train_npz/case0005_slice000.npz` (`image` (H, W) in 0..1 from [-125, 275] HU, `label`), every slice of a training
    scan, and `test_vol_h5/case0001.npy.h5` (`image`, `label` (D, H, W)). `convert npz` writes the labelled slices of
    both, named as TransUNet's lists name them, so that its `lists_Synapse/` splits the result."""
    from imedsam_hf.data import split_stems

    h5py = pytest.importorskip("h5py")
    scan = nib.load(BTCV / "volumes" / "case0002.nii.gz")
    grey = np.asarray(scan.dataobj)[:, :, 68:74].astype(np.uint8).transpose(2, 1, 0)  # SAMed's (D, W, H) transpose
    labels = np.asarray(nib.load(BTCV / "labels" / "case0002.nii.gz").dataobj)[:, :, 68:74].transpose(2, 1, 0)
    labels = labels.astype(np.float32)
    labels[0] = 0
    root = tmp_path / "Synapse"
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for z in range(3):  # a training scan's slices, the first without a structure
        np.savez(root / "train_npz" / f"case0005_slice{z:03d}.npz", image=grey[z] / 255.0, label=labels[z])
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "w") as handle:
        handle["image"] = (grey / 255.0).astype(np.float32)
        handle["label"] = labels
    assert main(["convert", "npz", "--images", str(root), "--output", str(tmp_path / "S")]) == 0
    out = tmp_path / "S"
    stems = sorted(p.stem for p in (out / "images").iterdir())
    assert stems == [*(f"case0001_slice{z:03d}" for z in range(1, 6)), "case0005_slice001", "case0005_slice002"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "case0001_slice003.png")), grey[3])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "case0005_slice002.png")), grey[2])
    np.testing.assert_array_equal(read_mask(out / "masks" / "case0001_slice003.png", 255), labels[3])
    lists = tmp_path / "lists_Synapse"
    lists.mkdir()
    (lists / "train.txt").write_text("".join(f"case0005_slice{z:03d}\n" for z in range(3)))
    (lists / "test_vol.txt").write_text("case0001\n")
    assert split_stems("test", lists, stems) == {f"case0001_slice{z:03d}" for z in range(1, 6)}
    assert split_stems("train", lists, stems) == {"case0005_slice001", "case0005_slice002"}
    np.savez(root / "train_npz" / "case0001.npz", image=grey / 255.0, label=labels)  # the test volume's name again
    with pytest.raises(ValueError, match=r"two cases named case0001"):
        numpy_cases_to_slices(root, tmp_path / "S2")
