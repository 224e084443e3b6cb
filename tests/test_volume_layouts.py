"""Scans and label volumes named as public data sets name them. `imedsam convert volumes`, `predict
--boxes-from-masks` and `score` paired a scan only with the label volume of its own name (or nnU-Net's `<case>` of
`<case>_0000`), so Synapse's own BTCV download (`img/img0001.nii.gz`, `label/label0001.nii.gz`), LiTS
(`volume-0.nii` beside `segmentation-0.nii`), ACDC (`_gt`), KiTS (`imaging` / `segmentation`) and PROMISE12
(`Case00_segmentation.mhd`) were refused ("no label volume for ...") until renamed by hand, and a folder keeping both
gave its label volumes as scans too."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from imedsam_hf.cli import main
from imedsam_hf.volumes import (
    label_volume_names,
    label_volume_of,
    paired_volumes,
    read_label_volume,
    read_structure_masks,
    read_volume,
    scan_files_in,
    structure_mask_names,
    volumes_to_slices,
)

LAS = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
HAS_ITK = importlib.util.find_spec("SimpleITK") is not None


def two_organs(shape=(24, 20, 6)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:10, 4:12, 1:5] = 2
    labels[8:20, 10:18, 2:4] = 5
    return labels


def save(path: Path, data: np.ndarray) -> Path:
    """`data` as `path`: NIfTI, or with SimpleITK a MetaImage (`.mhd` beside its `.raw`) for PROMISE12's names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mhd":
        import SimpleITK as sitk

        nifti = save(path.with_suffix(".nii.gz"), data)
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
        nifti.unlink()
    else:
        nib.save(nib.Nifti1Image(data, LAS), str(path))
    return path


# (data set, scan, its label volume, the case it makes): relative to one root; a shared folder keeps both.
LAYOUTS = [
    ("synapse-btcv", "img/img0001.nii.gz", "label/label0001.nii.gz", "img0001"),
    ("lits", "data/volume-0.nii", "data/segmentation-0.nii", "volume-0"),
    ("acdc", "patient001/patient001_frame01.nii.gz", "patient001/patient001_frame01_gt.nii.gz", "patient001_frame01"),
    ("kits", "case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz", "imaging"),  # one case folder given
    ("capitals", "scans/CT_007.nii.gz", "masks/SEG_007.nii.gz", "CT_007"),
    ("promise12", "train/Case00.mhd", "train/Case00_segmentation.mhd", "Case00"),
    ("brats", "BraTS2021_00000/BraTS2021_00000_flair.nii.gz", "BraTS2021_00000/BraTS2021_00000_seg.nii.gz",
     "BraTS2021_00000_flair"),
    ("segthor", "Patient_01/Patient_01.nii.gz", "Patient_01/GT.nii.gz", "Patient_01"),  # named for what it is
    ("pi-cai", "10000/10000_1000000_t2w.nii.gz", "resampled/10000_1000000.nii.gz", "10000_1000000"),  # case, sequence
    ("hecktor", "imagesTr/CHUM-001__CT.nii.gz", "labelsTr/CHUM-001.nii.gz", "CHUM-001"),
]  # fmt: skip


@pytest.mark.parametrize("layout, scan_name, label_name, case", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_a_data_sets_own_label_names_pair_and_give_the_slices_of_a_same_named_pair(
    tmp_path, layout, scan_name, label_name, case
):
    if scan_name.endswith(".mhd") and not HAS_ITK:
        pytest.skip("the [itk] extra (SimpleITK) is not installed")
    labels = two_organs()
    scan = save(tmp_path / layout / scan_name, (labels * 40 + 10).astype(np.uint8))
    label = save(tmp_path / layout / label_name, labels)
    images, label_folder = scan.parent, label.parent
    assert label_volume_of(scan, label_folder) == label
    assert scan_files_in(images) == [scan]  # a folder keeping both: the label volume is no scan
    assert paired_volumes(images, label_folder) == [(case, scan, label)]
    volumes_to_slices(images, label_folder, tmp_path / "slices", progress=False)
    # The same pair named alike gives the same slices, named by the scan's case.
    save(tmp_path / "same" / "images" / "x.nii.gz", (labels * 40 + 10).astype(np.uint8))
    save(tmp_path / "same" / "labels" / "x.nii.gz", labels)
    volumes_to_slices(tmp_path / "same" / "images", tmp_path / "same" / "labels", tmp_path / "ref", progress=False)
    for sub in ("images", "masks"):
        written = sorted((tmp_path / "slices" / sub).iterdir())
        reference = sorted((tmp_path / "ref" / sub).iterdir())
        assert [p.name for p in written] == [p.name.replace("x_", f"{case}_", 1) for p in reference]
        assert [p.read_bytes() for p in written] == [p.read_bytes() for p in reference]


def test_a_label_of_the_scans_own_name_comes_first_and_a_name_matching_nothing_is_named(tmp_path):
    labels = two_organs()
    scan = save(tmp_path / "images" / "a.nii.gz", labels * 40)
    own = save(tmp_path / "labels" / "a.nii.gz", labels)
    save(tmp_path / "labels" / "B_SEG.nii.gz", labels)
    assert label_volume_of(scan, tmp_path / "labels") == own  # its own name first
    b = save(tmp_path / "images" / "B.nii.gz", labels * 40)
    assert label_volume_of(b, tmp_path / "labels") == tmp_path / "labels" / "B_SEG.nii.gz"  # in any case
    # Beside a label volume of its own, a file of the scan's name is a scan (LiTS, ACDC keep both in one folder).
    save(tmp_path / "labels" / "a_gt.nii.gz", labels)
    assert label_volume_of(scan, tmp_path / "labels") == tmp_path / "labels" / "a_gt.nii.gz"
    # Scans whose conventional label volume is missing stay scans; img1 is no label of img2.
    for name in ("img1.nii.gz", "img2.nii.gz"):
        save(tmp_path / "alone" / name, labels * 40)
    assert [p.name for p in scan_files_in(tmp_path / "alone")] == ["img1.nii.gz", "img2.nii.gz"]
    save(tmp_path / "several" / "mask.nii.gz", labels)  # named for what it is, among two scans: neither's
    several = [save(tmp_path / "several" / name, labels * 40) for name in ("img1.nii.gz", "img2.nii.gz")]
    assert [label_volume_of(scan, tmp_path / "several") for scan in several] == [None, None]
    looked_for = label_volume_names(tmp_path / "alone" / "img1.nii.gz")
    assert looked_for == (
        "img1.nii.gz (or .nii, .seg.nrrd, .nrrd, .nhdr, .mha, .mhd), img1_gt, img1_seg, img1_segmentation, label1, "
        "..., or a folder of one mask per structure (img1/, segmentations/)"
    )
    with pytest.raises(ValueError, match=r"no label volume for img1.nii.gz \(looked for img1.nii.gz .*label1, \.\.\.,"):
        paired_volumes(tmp_path / "alone", tmp_path / "labels")


def test_several_sequences_of_one_case_are_refused_naming_their_label_volume_or_one_is_picked(tmp_path, capsys):
    labels = two_organs()
    case = tmp_path / "BraTS-GLI-00000-000"
    for sequence in ("t1n", "t2f"):
        save(case / f"BraTS-GLI-00000-000-{sequence}.nii.gz", (labels * 40).astype(np.uint8))
    save(case / "BraTS-GLI-00000-000-seg.nii.gz", labels)
    with pytest.raises(ValueError, match=r"t1n.nii.gz, .*t2f.nii.gz have one label volume \(BraTS-GLI-00000-000-seg"):
        paired_volumes(case, case)
    # One sequence picked by name (`--scans`): paired, converted.
    assert [scan.name for _, scan, _ in paired_volumes(case, case, "*-T2F.nii.gz")] == [
        "BraTS-GLI-00000-000-t2f.nii.gz"
    ]
    argv = ["convert", "volumes", "--images", str(case), "--labels", str(case), "--output", str(tmp_path / "slices")]
    assert main([*argv, "--scans", "*-t2f.nii.gz"]) == 0
    assert all(p.name.startswith("BraTS-GLI-00000-000-t2f_slice") for p in (tmp_path / "slices" / "images").iterdir())
    assert main([*argv, "--scans", "*_0000.nii.gz"]) == 2
    assert "--scans '*_0000.nii.gz': matches none of the scans in --images" in capsys.readouterr().err
    assert main(argv) == 2
    assert "pick one (--scans '*-t1n.nii.gz')" in capsys.readouterr().err  # the first sequence's
    # predict takes --scans too: a folder of BraTS cases segments one sequence each, not all four.
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True).save_pretrained(tmp_path / "aware")
    argv = ["predict", "--model", str(tmp_path / "aware"), "--device", "cpu", str(tmp_path), "--boxes-from-masks"]
    out = tmp_path.parent / f"{tmp_path.name}-predictions"  # outside the input folder
    assert main([*argv, str(tmp_path), "--scans", "*-t2f.nii.gz", "--out", str(out)]) == 0
    assert [p.name for p in out.rglob("*.nii.gz")] == ["BraTS-GLI-00000-000-t2f.nii.gz"]
    assert main([*argv, str(tmp_path), "--scans", "*_0000.nii.gz", "--out", str(out)]) == 2
    assert "--scans '*_0000.nii.gz': matches none of the scans in the inputs" in capsys.readouterr().err


def test_predict_and_score_a_folder_keeping_scans_beside_their_label_volumes(tmp_path, capsys):
    """LiTS keeps `volume-N.nii` beside `segmentation-N.nii`: predict on the folder, prompted by that folder,
    segments the scans only (each prompted by its own label volume), and score finds the truth by the same names."""
    labels = two_organs()
    lits = tmp_path / "lits"
    for n in (0, 1):
        save(lits / f"volume-{n}.nii", (labels * 40 + 10).astype(np.uint8))
        save(lits / f"segmentation-{n}.nii", labels)
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(lits), "--boxes-from-masks", str(lits)]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "P").iterdir()) == ["volume-0.nii.gz", "volume-1.nii.gz"]
    assert main(["score", str(tmp_path / "P"), "--truth", str(lits), "--csv", str(tmp_path / "s.csv")]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == ["volume-0", "volume-1"]
    # Scored against the segmentations, not the scans of the predictions' names: as against a folder of labels only.
    for n in (0, 1):
        save(tmp_path / "truth" / f"volume-{n}.nii", labels)
    assert (
        main(["score", str(tmp_path / "P"), "--truth", str(tmp_path / "truth"), "--csv", str(tmp_path / "t.csv")]) == 0
    )
    assert (tmp_path / "t.csv").read_text() == (tmp_path / "s.csv").read_text()
    assert len(rows) == 4  # two structures of two scans (a scan as truth gives a row for each of its grey values)


def test_a_folder_of_case_folders_is_converted_predicted_and_scored_case_by_case(tmp_path, capsys):
    """KiTS keeps each case in a folder of its own (`case_00000/imaging.nii.gz`, `segmentation.nii.gz`): every
    scan was named `imaging`, and a folder holding no 3-D file of its own held no scans. The folder of the case
    folders goes in as `--images` / `--labels`, as predict's input and mask folder and as score's truth; the cases
    are named by their folders."""
    labels = two_organs()
    kits = tmp_path / "kits"
    for n, shift in ((0, 0), (1, 2)):
        save(kits / f"case_0000{n}" / "imaging.nii.gz", (np.roll(labels, shift, 0) * 40 + 10).astype(np.uint8))
        save(kits / f"case_0000{n}" / "segmentation.nii.gz", np.roll(labels, shift, 0))
    (kits / "LICENSE").write_text("CC BY-NC-SA 4.0")
    pairs = paired_volumes(kits, kits)
    assert [(case, scan.parent.name, label.name) for case, scan, label in pairs] == [
        ("case_00000", "case_00000", "segmentation.nii.gz"),
        ("case_00001", "case_00001", "segmentation.nii.gz"),
    ]
    volumes_to_slices(kits, kits, tmp_path / "slices", progress=False)
    written = sorted(p.name for p in (tmp_path / "slices" / "images").iterdir())
    assert written[0].startswith("case_00000_slice") and written[-1].startswith("case_00001_slice")
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(kits), "--boxes-from-masks", str(kits)]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    predicted = sorted(str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*.nii.gz"))
    assert predicted == ["case_00000/imaging.nii.gz", "case_00001/imaging.nii.gz"]
    assert main(["score", str(tmp_path / "P"), "--truth", str(kits), "--csv", str(tmp_path / "s.csv")]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == ["case_00000", "case_00001"] and len(rows) == 4
    # Two case folders whose scans would make one case are refused before anything is written.
    save(tmp_path / "clash" / "a" / "scan1.nii.gz", labels)
    save(tmp_path / "clash" / "a" / "scan1_seg.nii.gz", labels)
    save(tmp_path / "clash" / "b" / "scan1.nii.gz", labels)
    save(tmp_path / "clash" / "b" / "scan1_seg.nii.gz", labels)
    with pytest.raises(ValueError, match=r"a/scan1.nii.gz and .*b/scan1.nii.gz would both be case scan1"):
        paired_volumes(tmp_path / "clash", tmp_path / "clash")


def test_totalsegmentators_folders_of_structure_masks_are_label_volumes_named_by_their_files(tmp_path, capsys):
    """TotalSegmentator writes one binary mask per structure (`segmentations/liver.nii.gz`, ...; its data set keeps
    them beside each scan, `s0000/ct.nii.gz`). Such a folder is a label volume: ids in file-name order, named by the
    files, so a class-aware model decodes each mask by the class of its name (only those masks read) and convert
    volumes numbers them by --classes; a voxel two masks claim keeps the first's, with a warning."""
    labels = two_organs()
    case = tmp_path / "ts" / "s0001"
    scan = save(case / "ct.nii.gz", (labels * 40 + 10).astype(np.uint8))
    for name, value in (("liver", 2), ("kidney_right", 5), ("colon", 9)):  # colon: empty, as TotalSegmentator writes
        save(case / "segmentations" / f"{name}.nii.gz", (labels == value).astype(np.uint8))
    folder = case / "segmentations"
    assert label_volume_of(scan, tmp_path / "ts") == folder  # a folder of case folders
    assert label_volume_of(scan, case) == folder and scan_files_in(case) == [scan]
    assert structure_mask_names(folder) == {1: "colon", 2: "kidney_right", 3: "liver"}
    read = read_label_volume(folder, read_volume(scan))
    np.testing.assert_array_equal(read.data, np.select([labels == 2, labels == 5], [3, 2], 0))
    model_names = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver"}
    only = read_structure_masks(folder, read_volume(scan), model_names)  # the colon's mask not read: no class
    np.testing.assert_array_equal(only.data, read.data)
    # Two masks claiming a voxel; a mask of several ids; a mask on another grid: named.
    overlap = save(tmp_path / "bad" / "a" / "kidney.nii.gz", (labels > 0).astype(np.uint8))
    save(tmp_path / "bad" / "a" / "liver.nii.gz", (labels == 2).astype(np.uint8))
    with pytest.warns(UserWarning, match=r"a: \d+ voxels lie in two structures' masks"):
        read_structure_masks(overlap.parent, read_volume(scan))
    save(tmp_path / "bad" / "b" / "all.nii.gz", labels)
    with pytest.raises(ValueError, match=r"all.nii.gz: holds the values \[0, 2, 5\], not one structure's mask"):
        read_structure_masks(tmp_path / "bad" / "b", read_volume(scan))
    # convert volumes numbers them by the model's classes; predict keeps their ids, named by their files.
    classes = tmp_path / "classes.json"
    classes.write_text('{"classes": {"1": "spleen", "2": "right kidney", "6": "liver"}}')
    argv = ["convert", "volumes", "--images", str(tmp_path / "ts"), "--labels", str(tmp_path / "ts")]
    assert main([*argv, "--classes", str(classes), "--output", str(tmp_path / "slices")]) == 0
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "slices" / "masks").iterdir())]
    assert set(np.unique(np.stack(masks)).tolist()) == {0, 2, 6}
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True, id2label=model_names).save_pretrained(
        tmp_path / "aware"
    )
    argv = ["predict", "--model", str(tmp_path / "aware"), str(tmp_path / "ts"), "--boxes-from-masks"]
    assert main([*argv, str(tmp_path / "ts"), "--statistics", "--device", "cpu", "--out", str(tmp_path / "P")]) == 0
    written = np.asarray(nib.load(tmp_path / "P" / "ct.nii.gz").dataobj)
    assert set(np.unique(written).tolist()) <= {0, 2, 3} and written.any()  # the folder's ids
    statistics = json.loads((tmp_path / "P" / "ct_statistics.json").read_text())
    assert set(statistics["structures"]) <= {"kidney_right", "liver"} and statistics["structures"]
    # score: the prediction against the case's folder, named by the masks' files.
    assert main(["score", str(tmp_path / "P"), "--truth", str(case), "--json", str(tmp_path / "s.json")]) == 0
    scored = json.loads((tmp_path / "s.json").read_text())["per_class"]
    assert {row["name"] for row in scored.values()} == {"kidney_right", "liver"}


def test_a_label_volume_added_after_a_lookup_is_found(tmp_path):
    """Folders are listed once per state (pairing n scans lists the labels folder once, not n times: 500 LiTS scans
    took 12.5 s, now 0.4 s); a folder that changed is listed again."""
    labels = two_organs()
    scan = save(tmp_path / "images" / "a.nii.gz", labels * 40)
    save(tmp_path / "labels" / "b.nii.gz", labels)
    long_ago = 1_700_000_000
    os.utime(tmp_path / "labels", (long_ago, long_ago))
    assert label_volume_of(scan, tmp_path / "labels") is None  # listed, and kept
    save(tmp_path / "labels" / "a_seg.nii.gz", labels)
    os.utime(tmp_path / "labels", (long_ago + 1, long_ago + 1))  # changed, still long ago (whole-second times)
    assert label_volume_of(scan, tmp_path / "labels") == tmp_path / "labels" / "a_seg.nii.gz"


def test_acdcs_patient_folders_give_their_labelled_frames_with_scans(tmp_path):
    labels = two_organs()
    acdc = tmp_path / "training"
    for patient in ("patient001", "patient002"):
        for frame in ("01", "12"):
            save(acdc / patient / f"{patient}_frame{frame}.nii.gz", (labels * 40).astype(np.uint8))
            save(acdc / patient / f"{patient}_frame{frame}_gt.nii.gz", labels)
        save(acdc / patient / f"{patient}_4d.nii.gz", np.zeros((*labels.shape, 3), np.uint8))  # the cine, unlabelled
    with pytest.raises(ValueError, match=r"no label volume for patient001_4d.nii.gz"):
        paired_volumes(acdc, acdc)
    pairs = paired_volumes(acdc, acdc, "*_frame??.nii.gz")
    assert [(case, label.name) for case, _, label in pairs] == [
        ("patient001_frame01", "patient001_frame01_gt.nii.gz"),
        ("patient001_frame12", "patient001_frame12_gt.nii.gz"),
        ("patient002_frame01", "patient002_frame01_gt.nii.gz"),
        ("patient002_frame12", "patient002_frame12_gt.nii.gz"),
    ]


def test_structure_folders_holding_different_structures_are_numbered_by_name(tmp_path):
    labels = two_organs()
    ts = tmp_path / "ts"
    for case, structures in (("s1", {"kidney": 5, "liver": 2}), ("s2", {"liver": 2})):  # liver 2nd, then 1st file
        save(ts / case / "ct.nii.gz", (labels * 40 + 10).astype(np.uint8))
        for name, value in structures.items():
            save(ts / case / "segmentations" / f"{name}.nii.gz", (labels == value).astype(np.uint8))
    done = volumes_to_slices(ts, ts, tmp_path / "slices", progress=False)
    assert done["classes"] == {1: "kidney", 2: "liver"}
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "slices" / "masks").glob("s2_*"))]
    assert set(np.unique(np.stack(masks)).tolist()) == {0, 2}  # s2's liver is class 2, as s1's


def test_the_decathlons_4d_scans_give_the_channel_asked_for_by_index_or_name(tmp_path, capsys):
    """The Medical Segmentation Decathlon keeps a case's MR sequences in one 4-D file (`Task05_Prostate`: T2, ADC)
    beside a 3-D label volume: predict skipped every scan and `convert volumes` stopped ("a 4-D series ..., extract
    one volume"), leaving users to write a nibabel script. `--channel T2` (or 0) now picks one, as the 3-D file of that
    sequence would be read; the refusal lists the volumes with their `dataset.json` names."""
    labels = two_organs()
    t2, adc = (labels * 40 + 10).astype(np.uint8), (250 - labels * 30).astype(np.uint8)
    task = tmp_path / "Task05_Prostate"
    save(task / "imagesTr" / "prostate_00.nii.gz", np.stack([t2, adc], axis=-1))
    save(task / "labelsTr" / "prostate_00.nii.gz", labels)
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background",
                                                   "2": "peripheral zone", "5": "transition zone"}}))  # fmt: skip
    four_d = task / "imagesTr" / "prostate_00.nii.gz"
    for channel, expected in ((0, t2), ("1", adc), ("t2", t2), ("ADC", adc)):
        volume = read_volume(four_d, channel=channel)
        np.testing.assert_array_equal(volume.data, expected)
        assert volume.header.get_data_shape() == labels.shape and np.allclose(volume.affine, LAS)
    with pytest.raises(ValueError, match=r"2 volumes along its 4th axis: 0 'T2', 1 'ADC' .*pick one with `channel`"):
        read_volume(four_d)
    with pytest.raises(ValueError, match=r"`channel` 'DWI': .*holds 2 volumes along its 4th axis: 0 'T2', 1 'ADC'"):
        read_volume(four_d, channel="DWI")
    with pytest.raises(ValueError, match=r"`channel` 2: .* give one of them"):
        read_volume(four_d, channel=2)
    with pytest.raises(ValueError, match="is one 3-D volume, shape .*; leave `channel` out"):
        read_volume(task / "labelsTr" / "prostate_00.nii.gz", channel=0)
    # The same scan as a 3-D file of its T2 sequence: the same slices, the same labels predicted.
    save(tmp_path / "t2" / "prostate_00.nii.gz", t2)
    base = ["convert", "volumes", "--labels", str(task / "labelsTr")]
    assert main([*base, "--images", str(task / "imagesTr"), "--output", str(tmp_path / "S0")]) == 2
    assert "pick one with --channel (its index or name)" in capsys.readouterr().err
    argv = [*base, "--images", str(task / "imagesTr"), "--channel", "T2", "--output", str(tmp_path / "S")]
    assert main(argv) == 0, capsys.readouterr().err
    assert main([*base, "--images", str(tmp_path / "t2"), "--output", str(tmp_path / "R")]) == 0
    for sub in ("images", "masks"):
        assert [p.read_bytes() for p in sorted((tmp_path / "S" / sub).iterdir())] == [
            p.read_bytes() for p in sorted((tmp_path / "R" / sub).iterdir())
        ]
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", "--boxes-from-masks"]
    assert main([*argv, str(task / "labelsTr"), str(task / "imagesTr"), "--out", str(tmp_path / "P0")]) == 1
    assert "pick one with --channel" in capsys.readouterr().err
    assert (
        main([*argv, str(task / "labelsTr"), str(task / "imagesTr"), "--channel", "T2", "--out", str(tmp_path / "P")])
        == 0
    )
    assert main([*argv, str(task / "labelsTr"), str(tmp_path / "t2"), "--out", str(tmp_path / "Q")]) == 0
    by_channel = nib.load(tmp_path / "P" / "prostate_00.nii.gz")
    assert by_channel.shape == labels.shape
    np.testing.assert_array_equal(
        np.asarray(by_channel.dataobj), np.asarray(nib.load(tmp_path / "Q" / "prostate_00.nii.gz").dataobj)
    )
    picture = tmp_path / "pictures" / "a.png"
    picture.parent.mkdir()
    Image.fromarray(t2[:, :, 2]).save(picture)
    assert (
        main([*argv, str(task / "labelsTr"), str(picture.parent), "--channel", "0", "--out", str(tmp_path / "I")]) == 2
    )
    assert "--channel picks one volume of 4-D scans" in capsys.readouterr().err and not (tmp_path / "I").exists()
    # nnU-Net v2 keeps the sequences as `<case>_0000`, `<case>_0001`: the refusal names them by its dataset.json.
    nnunet = tmp_path / "Dataset005_Prostate"
    for number, volume in (("0000", t2), ("0001", adc)):
        save(nnunet / "imagesTr" / f"prostate_00_{number}.nii.gz", volume)
    save(nnunet / "labelsTr" / "prostate_00.nii.gz", labels)
    (nnunet / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "file_ending": ".nii.gz"})
    )
    with pytest.raises(ValueError, match=r"case prostate_00 \(0000 'T2', 0001 'ADC'\).*`scans` '\*_0000.nii.gz'\)"):
        paired_volumes(nnunet / "imagesTr", nnunet / "labelsTr")
    # ... and `--channel` picks its files by name or number, as it picks a 4-D file's volume.
    assert [p.name for _, p, _ in paired_volumes(nnunet / "imagesTr", nnunet / "labelsTr", channel="adc")] == [
        "prostate_00_0001.nii.gz"
    ]
    nn = ["convert", "volumes", "--images", str(nnunet / "imagesTr"), "--labels", str(nnunet / "labelsTr")]
    assert main([*nn, "--channel", "T2", "--output", str(tmp_path / "N")]) == 0, capsys.readouterr().err
    for sub in ("images", "masks"):
        assert [p.read_bytes() for p in sorted((tmp_path / "N" / sub).iterdir())] == [
            p.read_bytes() for p in sorted((tmp_path / "R" / sub).iterdir())
        ]
    assert main([*nn, "--channel", "DWI", "--output", str(tmp_path / "N2")]) == 2
    assert "the cases' channel files are 0000 'T2', 0001 'ADC'; give one of them" in capsys.readouterr().err
    argv = ["predict", "--model", str(tmp_path / "model"), "--device", "cpu", "--boxes-from-masks"]
    argv += [str(nnunet / "labelsTr"), str(nnunet / "imagesTr"), "--channel", "0", "--out", str(tmp_path / "PN")]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "PN").iterdir()) == ["prostate_00_0000.nii.gz"]
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "PN" / "prostate_00_0000.nii.gz").dataobj), np.asarray(by_channel.dataobj)
    )


@pytest.mark.skipif(not HAS_ITK, reason="the [itk] extra (SimpleITK) is not installed")
def test_a_4d_or_vector_nrrd_gives_its_channel_as_the_nifti_does(tmp_path):
    """NRRD / MetaImage keep channels along a 4th axis or as values per voxel: `channel` picks one of either."""
    import SimpleITK as sitk

    labels = two_organs()
    t2, adc = (labels * 40 + 10).astype(np.uint8), (250 - labels * 30).astype(np.uint8)
    nifti = read_volume(save(tmp_path / "t2.nii.gz", t2))
    four_d = sitk.JoinSeries(
        [sitk.ReadImage(str(save(tmp_path / f"{n}.nii.gz", a))) for n, a in (("a", t2), ("b", adc))]
    )
    sitk.WriteImage(four_d, str(tmp_path / "four.nrrd"))
    vector = sitk.Compose([sitk.ReadImage(str(tmp_path / "a.nii.gz")), sitk.ReadImage(str(tmp_path / "b.nii.gz"))])
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    for name in ("four.nrrd", "vector.nrrd"):
        for channel, expected in ((0, t2), (1, adc)):
            volume = read_volume(tmp_path / name, channel=channel)
            np.testing.assert_array_equal(volume.data, expected)
            np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-6)
    with pytest.raises(ValueError, match=r"four.nrrd: is 4-D, shape \(24, 20, 6, 2\), not one 3-D volume"):
        read_volume(tmp_path / "four.nrrd")
    with pytest.raises(ValueError, match="vector.nrrd: holds 2 values per voxel"):
        read_volume(tmp_path / "vector.nrrd")
    with pytest.raises(ValueError, match="leave `channel` out"):
        read_volume(tmp_path / "a.nii.gz", channel=0)


def predict_from_masks(tmp_path: Path, inputs: Path, masks: Path) -> list[str]:
    """`imedsam predict`'s arguments for a tiny model saved in `tmp_path`, on `inputs` prompted by `masks`."""
    tiny_model().save_pretrained(tmp_path / "model")
    return [
        "predict",
        "--model",
        str(tmp_path / "model"),
        str(inputs),
        "--boxes-from-masks",
        str(masks),
        "--device",
        "cpu",
    ]


def bids(root: Path, labels: np.ndarray) -> Path:
    """A BIDS data set as spine-generic and OpenNeuro keep one: raw scans in `sub-XX/[ses-YY/]anat/` (a T2w with its
    masks, a T1w without), a 4-D `func/` run, the manual masks at the same place of `derivatives/labels/`
    (`_seg-manual` and `_lesion-manual` of the T2w, each with its JSON sidecar), the data set's own files."""
    for place, shift in (("sub-01", 0), ("sub-02/ses-01", 2)):
        stem = place.replace("/", "_")
        moved = np.roll(labels, shift, 0)
        save(root / place / "anat" / f"{stem}_T2w.nii.gz", (moved * 40 + 10).astype(np.uint8))
        save(root / place / "anat" / f"{stem}_T1w.nii.gz", (moved * 20 + 5).astype(np.uint8))
        save(root / place / "func" / f"{stem}_task-rest_bold.nii.gz", np.zeros((6, 6, 4, 3), np.uint8))
        derivatives = root / "derivatives" / "labels" / place / "anat"
        save(derivatives / f"{stem}_T2w_seg-manual.nii.gz", (moved == 2).astype(np.uint8))
        save(derivatives / f"{stem}_T2w_lesion-manual.nii.gz", (moved == 5).astype(np.uint8))
        save(derivatives / f"{stem}_T2w_labels-disc-manual.nii.gz", (moved == 5).astype(np.uint8))  # points: no mask
        (derivatives / f"{stem}_T2w_seg-manual.json").write_text('{"Author": "x"}')
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    return root


def test_a_bids_data_set_gives_its_scans_and_the_derivative_masks_asked_for(tmp_path, capsys):
    """A BIDS data set (`sub-01/anat/sub-01_T2w.nii.gz`, sessions, masks in `derivatives/labels/` at the scan's
    place, `sub-01_T2w_seg-manual.nii.gz` beside `_lesion-manual`): its root held "no images, no 3-D volumes", and no
    derivative was any scan's label volume. Now the root, a subject's or a session's folder give their `anat/`
    scans (not `func/`'s time series), predict writes at their places, the one derivative `--label-suffix` names is
    the truth (several without it are refused, naming them and the flag), score reads the root as truth."""
    labels = two_organs()
    root = bids(tmp_path / "ds", labels)
    from imedsam_hf.volumes import bids_derivatives, case_scans_in

    scans = [str(p.relative_to(root)) for p in case_scans_in(root)]
    assert scans == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz",
        "sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz",
    ]
    assert [p.name for p in case_scans_in(root / "sub-02")] == ["sub-02_ses-01_T1w.nii.gz", "sub-02_ses-01_T2w.nii.gz"]
    assert [p.name for p in case_scans_in(root / "sub-02" / "ses-01")] == [
        "sub-02_ses-01_T1w.nii.gz",
        "sub-02_ses-01_T2w.nii.gz",
    ]
    t2 = root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_T2w.nii.gz"
    # The derivatives found from the root, the pipeline's folder and the subject's folder in it alike.
    for given in (root, root / "derivatives" / "labels", root / "derivatives" / "labels" / "sub-02"):
        assert [p.name for p in bids_derivatives(t2, given)] == [
            "sub-02_ses-01_T2w_lesion-manual.nii.gz",
            "sub-02_ses-01_T2w_seg-manual.nii.gz",
        ]
        assert label_volume_of(t2, given, "seg-manual").name == "sub-02_ses-01_T2w_seg-manual.nii.gz"
        with pytest.raises(ValueError, match=r"2 label volumes .*`label_suffix` lesion-manual or seg-manual"):
            label_volume_of(t2, given)
    assert label_volume_of(t2, root, "_lesion-manual").name == "sub-02_ses-01_T2w_lesion-manual.nii.gz"
    assert label_volume_of(t2, root, "dseg") is None

    with pytest.raises(ValueError, match=r"no label volume for sub-01_T1w.nii.gz .*`scans` '\*_T2w.nii.gz'"):
        paired_volumes(root, root, label_suffix="seg-manual")
    with pytest.raises(ValueError, match=r"looked for sub-01_T2w_seg-manul; its masks there add lesion-manual, seg-"):
        paired_volumes(root, root, "*_T2w.nii.gz", label_suffix="seg-manul")  # a typo: what there is is named
    pairs = paired_volumes(root, root, "*_T2w.nii.gz", label_suffix="seg-manual")
    assert [(case, label.name) for case, _, label in pairs] == [
        ("sub-01_T2w", "sub-01_T2w_seg-manual.nii.gz"),
        ("sub-02_ses-01_T2w", "sub-02_ses-01_T2w_seg-manual.nii.gz"),
    ]
    volumes_to_slices(root, root, tmp_path / "S", scans="*_T2w.nii.gz", label_suffix="seg-manual", progress=False)
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "S" / "masks").iterdir())]
    assert len(masks) == 8 and {int(v) for m in masks for v in np.unique(m)} == {0, 1}  # 4 labelled slices a scan

    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(root), "--boxes-from-masks", str(root)]
    argv += ["--scans", "*_T2w.nii.gz", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "P0")]) == 1
    err = capsys.readouterr().err
    assert "2 label volumes in" in err and "--label-suffix lesion-manual or seg-manual" in err
    assert main([*argv, "--label-suffix", "seg-manual", "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*.nii.gz"))
    assert written == ["sub-01/anat/sub-01_T2w.nii.gz", "sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz"]
    predicted = read_volume(tmp_path / "P" / "sub-01" / "anat" / "sub-01_T2w.nii.gz").data
    assert set(np.unique(predicted)) <= {0, 1}  # prompted by the seg-manual mask only: one structure

    score = ["score", str(tmp_path / "P"), "--truth", str(root), "--csv", str(tmp_path / "s.csv")]
    assert main(score) == 2
    assert "--label-suffix lesion-manual or seg-manual" in capsys.readouterr().err
    assert main([*score, "--label-suffix", "seg-manual"]) == 0, capsys.readouterr().err
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == ["sub-01_T2w", "sub-02_ses-01_T2w"] and len(rows) == 2
    # The same scores against the pipeline's folder, and against a flat folder of the masks named as the scans.
    (tmp_path / "flat").mkdir()
    for stem in ("sub-01", "sub-02_ses-01"):
        derivative = next(root.rglob(f"{stem}_T2w_seg-manual.nii.gz"))
        (tmp_path / "flat" / f"{stem}_T2w.nii.gz").write_bytes(derivative.read_bytes())
    for truth, name in ((root / "derivatives" / "labels", "d.csv"), (tmp_path / "flat", "f.csv")):
        again = ["score", str(tmp_path / "P"), "--truth", str(truth), "--csv", str(tmp_path / name)]
        assert main([*again, *(["--label-suffix", "seg-manual"] if name == "d.csv" else [])]) == 0
        assert (tmp_path / name).read_text() == (tmp_path / "s.csv").read_text()


def test_label_suffix_is_refused_where_no_label_volume_is_read(tmp_path, capsys):
    """`--label-suffix` picks label volumes: with 2-D images, or volumes prompted otherwise, it is named."""
    labels = two_organs()
    save(tmp_path / "scan.nii.gz", (labels * 40).astype(np.uint8))
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "scan.nii.gz"), "--box", "1,1,8,8"]
    assert main([*argv, "--label-suffix", "seg", "--device", "cpu", "--out", str(tmp_path / "P")]) == 2
    assert "--label-suffix picks each volume's label volume in --boxes-from-masks" in capsys.readouterr().err
    assert not (tmp_path / "P").exists()


def test_han_segs_structure_masks_converted_to_nifti_are_no_scans(tmp_path, capsys):
    """HaN-Seg converted to NIfTI (`case_01/case_01_IMG_CT.nii.gz` beside `case_01_OAR_Brainstem.nii.gz`, ...): the
    organ files were taken for scans beside the CT ("several images of one case") and would be segmented; they are
    the case's structure masks in any 3-D format, as its own `.seg.nrrd` files are."""
    labels = two_organs()
    case = tmp_path / "set_1" / "case_01"
    ct = save(case / "case_01_IMG_CT.nii.gz", (labels * 40 + 10).astype(np.uint8))
    for value, organ in ((2, "Kidney_L"), (5, "Liver")):
        save(case / f"case_01_OAR_{organ}.nii.gz", (labels == value).astype(np.uint8))
    assert [p.name for p in scan_files_in(case)] == ["case_01_IMG_CT.nii.gz"]
    assert [(c, s.name, t) for c, s, t in paired_volumes(tmp_path / "set_1", tmp_path / "set_1")] == [
        ("case_01_IMG_CT", "case_01_IMG_CT.nii.gz", case)
    ]
    assert structure_mask_names(case) == {1: "Kidney_L", 2: "Liver"}
    np.testing.assert_array_equal(
        read_label_volume(case, read_volume(ct)).data, np.select([labels == 2, labels == 5], [1, 2], 0)
    )
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "set_1"), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(tmp_path / "set_1"), "--out", str(tmp_path / "P")]) == 0
    written = [str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*.nii.gz")]
    assert written == ["case_01_IMG_CT.nii.gz"], capsys.readouterr().err  # one scan: named by itself


def test_bids_derivatives_named_by_the_scans_entities_are_its_masks(tmp_path, capsys):
    """The BIDS derivatives specification names a mask by its source's entities without the source's suffix
    (fMRIPrep's `sub-01_desc-brain_mask.nii.gz` and `sub-01_dseg.nii.gz` for `sub-01_T1w.nii.gz`): those are the scan's
    masks, picked by `--label-suffix desc-brain_mask`; a template's grid (`space-MNI...`), a probability map, another
    acquisition's (`acq-ax`) or another sequence's (`T2w_...`) are not. The segmentation's look-up table beside it
    (`sub-01_dseg.tsv`) names its ids."""
    from imedsam_hf.volumes import bids_derivatives, bids_label_table

    labels = two_organs()
    root = tmp_path / "ds"
    t1 = save(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", (labels * 40 + 10).astype(np.uint8))
    anat = root / "derivatives" / "fmriprep" / "sub-01" / "anat"
    save(anat / "sub-01_desc-brain_mask.nii.gz", (labels > 0).astype(np.uint8))
    save(anat / "sub-01_dseg.nii.gz", labels)
    save(anat / "sub-01_desc-preproc_T1w.nii.gz", (labels * 40).astype(np.uint8))  # an image, no mask
    save(anat / "sub-01_label-GM_probseg.nii.gz", (labels > 0).astype(np.float32))
    save(anat / "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz", np.zeros((9, 9, 9), np.uint8))
    save(anat / "sub-01_acq-ax_desc-brain_mask.nii.gz", (labels > 0).astype(np.uint8))
    save(anat / "sub-01_T2w_seg-manual.nii.gz", (labels > 0).astype(np.uint8))
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    assert [p.name for p in bids_derivatives(t1, root)] == ["sub-01_desc-brain_mask.nii.gz", "sub-01_dseg.nii.gz"]
    with pytest.raises(ValueError, match=r"`label_suffix` desc-brain_mask or dseg"):
        label_volume_of(t1, root)
    assert label_volume_of(t1, root, "desc-brain_mask").name == "sub-01_desc-brain_mask.nii.gz"
    assert label_volume_of(t1, root / "derivatives" / "fmriprep", "dseg").name == "sub-01_dseg.nii.gz"
    pairs = paired_volumes(root, root, label_suffix="dseg")
    assert [(case, label.name) for case, _, label in pairs] == [("sub-01_T1w", "sub-01_dseg.nii.gz")]
    assert main(["convert", "labels", "--images", str(root), "--labels", str(root), "--label-suffix", "dseg",
                 "--output", str(tmp_path / "L")]) == 0, capsys.readouterr().err  # fmt: skip
    np.testing.assert_array_equal(read_volume(tmp_path / "L" / "sub-01_T1w.nii.gz").data, labels)
    # The segmentation's look-up table (BIDS's `sub-01_dseg.tsv`) names its ids in score's rows.
    (anat / "sub-01_dseg.tsv").write_text(
        "index\tname\tabbreviation\n0\tbackground\tBG\n2\tleft kidney\tLK\n5\tliver\tL\n"
    )
    save(tmp_path / "P" / "sub-01_T1w.nii.gz", labels)
    csv = tmp_path / "s.csv"
    argv = ["score", str(tmp_path / "P"), "--truth", str(root), "--label-suffix", "dseg", "--csv", str(csv)]
    assert main(argv) == 0, capsys.readouterr().err
    assert [row.split(",")[:4] for row in csv.read_text().splitlines()[1:]] == [
        ["sub-01_T1w", "2", "left kidney", "1.0"],
        ["sub-01_T1w", "5", "liver", "1.0"],
    ]
    (anat / "sub-01_dseg.tsv").write_text("index\tname\nx\tliver\n")
    with pytest.warns(UserWarning, match=r"sub-01_dseg.tsv: its label table cannot be read"):
        assert bids_label_table(anat / "sub-01_dseg.nii.gz") is None


def test_bids_tables_and_sidecars_are_inherited_from_the_data_sets_root(tmp_path, capsys):
    """BIDS's inheritance principle: fMRIPrep keeps the look-up table of every subject's `sub-01_desc-aseg_dseg.nii.gz`
    once, at its pipeline's root (`desc-aseg_dseg.tsv`, names quoted), and a sidecar may sit at the data set's root
    (`T1w.json`). Only a table beside the file under its name was read: score's rows said `class 5`. Now the nearest
    applicable file names the ids (not `sub-01_dseg`'s, whose entities differ), a file's own still first."""
    from imedsam_hf.volumes import bids_applicable_file, bids_label_table, sidecar_modality

    labels = two_organs()
    root = tmp_path / "ds"
    t1 = save(root / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz", (labels * 40 + 10).astype(np.uint8))
    pipeline = root / "derivatives" / "fmriprep"
    anat = pipeline / "sub-01" / "ses-01" / "anat"
    aseg = save(anat / "sub-01_ses-01_desc-aseg_dseg.nii.gz", labels)
    tissue = save(anat / "sub-01_ses-01_dseg.nii.gz", labels)
    (pipeline / "desc-aseg_dseg.tsv").write_text('index\tname\n0\t"Unknown"\n2\t"left kidney"\n5\t"liver"\n')
    (pipeline / "desc-aparcaseg_dseg.tsv").write_text("index\tname\n5\tcortex\n")
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    assert bids_label_table(aseg) == {2: "left kidney", 5: "liver"}
    assert bids_label_table(tissue) is None  # `desc-aseg` is none of its entities
    save(tmp_path / "P" / "sub-01_ses-01_T1w.nii.gz", labels)
    csv = tmp_path / "s.csv"
    argv = ["score", str(tmp_path / "P"), "--truth", str(root), "--label-suffix", "desc-aseg_dseg", "--csv", str(csv)]
    assert main(argv) == 0, capsys.readouterr().err
    assert [row.split(",")[1:3] for row in csv.read_text().splitlines()[1:]] == [["2", "left kidney"], ["5", "liver"]]
    (anat / "sub-01_ses-01_desc-aseg_dseg.tsv").write_text("index\tname\n5\thepar\n")  # its own table first
    assert bids_label_table(aseg) == {5: "hepar"}
    # A sidecar at the root says what the subject's scans are, one beside a scan what it is; two alike are none.
    assert sidecar_modality(t1) == "MR"  # the MRI folder's rule
    (root / "T1w.json").write_text('{"Modality": "CT"}')
    assert bids_applicable_file(t1, ".json") == root / "T1w.json" and sidecar_modality(t1) == "CT"
    (root / "sub-01" / "sub-01_T1w.json").write_text('{"Modality": "PT"}')
    assert sidecar_modality(t1) == "PT"  # the nearer one
    (root / "sub-01" / "ses-01_T1w.json").write_text('{"Modality": "MR"}')
    assert bids_applicable_file(t1, ".json") is None  # two alike in one folder
    flat = save(tmp_path / "flat" / "case_01.nii.gz", labels)
    (tmp_path / "T1w.json").write_text('{"Modality": "CT"}')
    assert bids_applicable_file(flat, ".json") is None  # no BIDS name: its own sidecar only


def test_predict_writes_into_a_bids_data_sets_derivatives(tmp_path, capsys):
    """BIDS puts derived files in the data set's `derivatives/<pipeline>/`: `--out ds/derivatives/imedsam` was refused
    as inside the input folder. It is the place: predict writes there at the scans' places with the derivative data
    set's description, and the data set read again has the same scans and masks (predictions named as the scans are
    neither)."""
    root = bids(tmp_path / "ds", two_organs())
    before = paired_volumes(root, root, "*_T2w.nii.gz", label_suffix="seg-manual")
    tiny_model().save_pretrained(tmp_path / "model")
    out = root / "derivatives" / "imedsam"
    argv = [
        "predict",
        "--model",
        str(tmp_path / "model"),
        str(root),
        "--boxes-from-masks",
        str(root),
        "--device",
        "cpu",
    ]
    argv += ["--scans", "*_T2w.nii.gz", "--label-suffix", "seg-manual", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert written == ["sub-01/anat/sub-01_T2w.nii.gz", "sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.8.0"
    assert description["GeneratedBy"][0]["Name"] == "imedsam-hf"
    assert paired_volumes(root, root, "*_T2w.nii.gz", label_suffix="seg-manual") == before
    assert main(["score", str(out), "--truth", str(root), "--label-suffix", "seg-manual"]) == 0
    # Elsewhere inside the data set it is still refused; a folder without the data set's description is no BIDS root.
    assert main([*argv[:-1], str(root / "sub-01" / "P")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    (root / "dataset_description.json").unlink()
    assert main([*argv[:-1], str(root / "derivatives" / "other")]) == 2


def test_isles_2022s_bids_layout_gives_its_diffusion_images_and_lesion_masks(tmp_path):
    """ISLES 2022 keeps BIDS without pipeline folders: `sub-strokecase0001/ses-0001/dwi/..._dwi.nii.gz` and `_adc`
    (3-D images), `anat/..._FLAIR.nii.gz`, and the lesion masks at `derivatives/sub-strokecase0001/ses-0001/
    sub-strokecase0001_ses-0001_msk.nii.gz`. `dwi/` was skipped as a folder of time series and `_msk` was no mask's
    name: nothing paired. Now `dwi/`'s 3-D images are scans (its 4-D diffusion series not), the mask is each image's of
    the session, and the refusal for several images of one case names the pattern that picks one. Its images carry no
    JSON sidecar: the BIDS MRI folder says they are MR."""
    labels = two_organs()
    root = tmp_path / "ISLES-2022"
    stem = "sub-strokecase0001_ses-0001"
    session = root / "sub-strokecase0001" / "ses-0001"
    dwi = save(session / "dwi" / f"{stem}_dwi.nii.gz", (labels * 40 + 10).astype(np.uint8))
    save(session / "dwi" / f"{stem}_adc.nii.gz", (labels * 20 + 10).astype(np.uint8))
    save(session / "dwi" / f"{stem}_acq-multi_dwi.nii.gz", np.zeros((6, 6, 4, 5), np.uint8))  # a diffusion series
    save(session / "anat" / f"{stem}_FLAIR.nii.gz", (labels[::2, ::2] * 40).astype(np.uint8))
    mask = root / "derivatives" / "sub-strokecase0001" / "ses-0001" / f"{stem}_msk.nii.gz"
    save(mask, (labels == 5).astype(np.uint8))
    (root / "dataset_description.json").write_text('{"Name": "ISLES 2022", "BIDSVersion": "1.6.0"}')
    from imedsam_hf.volumes import case_scans_in

    assert [p.name for p in case_scans_in(root)] == [f"{stem}_FLAIR.nii.gz", f"{stem}_adc.nii.gz", f"{stem}_dwi.nii.gz"]
    assert label_volume_of(dwi, root) == mask
    with pytest.raises(ValueError, match=r"several images of one case.*`scans` '\*_FLAIR.nii.gz'"):
        paired_volumes(root, root)
    assert [(case, label) for case, _, label in paired_volumes(root, root, "*_dwi.nii.gz")] == [(f"{stem}_dwi", mask)]
    # Without a sidecar, a BIDS MRI folder says MR (the `mr` window for scans that are not 8-bit); elsewhere nothing.
    assert read_volume(dwi).modality == "MR"
    assert read_volume(save(tmp_path / "anat" / "scan.nii.gz", labels)).modality is None
    ct = save(tmp_path / "ds" / "sub-01" / "anat" / "sub-01_ct.nii.gz", labels)  # a CT kept there: not MR
    assert read_volume(ct).modality is None


def test_atlas_2s_sites_keep_each_lesion_mask_beside_its_t1w(tmp_path, capsys):
    """ATLAS 2.0 keeps one BIDS data set per site (`Training/R001/sub-r001s001/ses-1/anat/`), each T1w beside its
    lesion mask (`..._space-MNI152NLin2009aSym_T1w.nii.gz`, `..._space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask
    .nii.gz`): "no 3-D volumes" in the folder of sites. Its sites' scans are read, each mask is its T1w's label
    volume (not a scan), and score finds it at the prediction's place below the truth."""
    labels = two_organs()
    training = tmp_path / "ATLAS_2" / "Training"
    for site, shift in (("R001", 0), ("R002", 2)):
        subject = f"sub-{site.lower()}s001"
        anat = training / site / subject / "ses-1" / "anat"
        stem = f"{subject}_ses-1_space-MNI152NLin2009aSym"
        moved = np.roll(labels, shift, 0)
        save(anat / f"{stem}_T1w.nii.gz", (moved * 40 + 10).astype(np.uint8))
        save(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz", (moved == 5).astype(np.uint8))
        (training / site / "dataset_description.json").write_text('{"Name": "ATLAS", "BIDSVersion": "1.4.0"}')
    pairs = paired_volumes(training, training)
    assert [(case, label.name) for case, _, label in pairs] == [
        ("sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w", "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"),
        ("sub-r002s001_ses-1_space-MNI152NLin2009aSym_T1w", "sub-r002s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"),
    ]  # fmt: skip
    assert [p.name for p in scan_files_in(training / "R001" / "sub-r001s001" / "ses-1" / "anat")] == [
        "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
    ]
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(training), "--boxes-from-masks", str(training)]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*.nii.gz"))
    assert written == [
        "R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz",
        "R002/sub-r002s001/ses-1/anat/sub-r002s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz",
    ]
    csv = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(training), "--csv", str(csv)]) == 0, (
        capsys.readouterr().err
    )
    rows = [row.split(",") for row in csv.read_text().splitlines()[1:]]
    assert [row[:2] for row in rows] == [
        ["sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w", "1"],
        ["sub-r002s001_ses-1_space-MNI152NLin2009aSym_T1w", "1"],
    ]


def test_verses_rawdata_and_derivatives_pair_without_datatype_folders(tmp_path, capsys):
    """VerSe keeps `dataset-01training/rawdata/sub-gl003/sub-gl003_dir-ax_ct.nii.gz` and the vertebrae's labels at
    `derivatives/sub-gl003/sub-gl003_dir-ax_seg-vert_msk.nii.gz` (beside centroid JSON), with no datatype folders and
    no dataset description: "no 3-D volumes". The data set's folder gives `rawdata/`'s scans (none of
    `derivatives/`), each paired with its mask, found from the data set's folder or `derivatives/` alike."""
    labels = two_organs()
    root = tmp_path / "dataset-01training"
    for subject, shift in (("sub-gl002", 0), ("sub-gl003", 2)):
        moved = np.roll(labels, shift, 0)
        save(root / "rawdata" / subject / f"{subject}_dir-ax_ct.nii.gz", (moved * 40 + 10).astype(np.uint8))
        save(root / "derivatives" / subject / f"{subject}_dir-ax_seg-vert_msk.nii.gz", moved)
        (root / "derivatives" / subject / f"{subject}_dir-ax_seg-subreg_ctd.json").write_text("[]")
    expected = [
        ("sub-gl002_dir-ax_ct", "sub-gl002_dir-ax_seg-vert_msk.nii.gz"),
        ("sub-gl003_dir-ax_ct", "sub-gl003_dir-ax_seg-vert_msk.nii.gz"),
    ]
    assert [(case, label.name) for case, _, label in paired_volumes(root, root)] == expected
    pairs = paired_volumes(root / "rawdata", root / "derivatives")
    assert [(case, label.name) for case, _, label in pairs] == expected
    argv = predict_from_masks(tmp_path, root, root)
    assert main([*argv, "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*.nii.gz"))
    assert written == ["sub-gl002/sub-gl002_dir-ax_ct.nii.gz", "sub-gl003/sub-gl003_dir-ax_ct.nii.gz"]  # below rawdata/
    csv = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(root), "--csv", str(csv)]) == 0, capsys.readouterr().err
    assert sorted({row.split(",")[0] for row in csv.read_text().splitlines()[1:]}) == [c for c, _ in expected]


def test_abdomenatlas_combined_labels_beside_its_ct_are_no_scan(tmp_path):
    """AbdomenAtlas (and SuPreM's output) keeps `BDMAP_00000001/ct.nii.gz` beside `combined_labels.nii.gz` and
    `segmentations/<structure>.nii.gz`: `combined_labels` was listed as a scan of its own ("no label volume for
    combined_labels.nii.gz"). It is a label volume named for what it is; the folder of structure masks beside it,
    which names the structures, is the one read; without it, `combined_labels`. PanTS keeps the labels apart
    (`LabelTr/<case>/combined_labels.nii.gz`): that file, not its folder as one structure."""
    labels = two_organs()
    root = tmp_path / "AbdomenAtlas"
    for case in ("BDMAP_00000001", "BDMAP_00000002"):
        save(root / case / "ct.nii.gz", (labels * 40 + 10).astype(np.uint8))
        save(root / case / "combined_labels.nii.gz", labels)
    for value, name in ((2, "aorta"), (5, "liver")):
        save(root / "BDMAP_00000001" / "segmentations" / f"{name}.nii.gz", (labels == value).astype(np.uint8))
    assert [p.name for p in scan_files_in(root / "BDMAP_00000001")] == ["ct.nii.gz"]
    pairs = paired_volumes(root, root)
    assert [(case, label.relative_to(root).as_posix()) for case, _, label in pairs] == [
        ("BDMAP_00000001", "BDMAP_00000001/segmentations"),
        ("BDMAP_00000002", "BDMAP_00000002/combined_labels.nii.gz"),
    ]
    assert structure_mask_names(pairs[0][2]) == {1: "aorta", 2: "liver"}
    # Scored from the data set's root, a prediction `P/BDMAP_00000001/ct.nii.gz` meets the masks predict was prompted
    # with, not the case folder (its `ct.nii.gz` and `combined_labels` taken for structures, as TotalSegmentator's too).
    argv = predict_from_masks(tmp_path, root / "BDMAP_00000001", root / "BDMAP_00000001")
    assert main([*argv, "--out", str(tmp_path / "P" / "BDMAP_00000001")]) == 0
    assert label_volume_of(tmp_path / "P" / "BDMAP_00000001" / "ct.nii.gz", root) == pairs[0][2]
    csv = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(root), "--csv", str(csv)]) == 0
    assert [row.split(",")[:3] for row in csv.read_text().splitlines()[1:]] == [
        ["BDMAP_00000001", "1", "aorta"],
        ["BDMAP_00000001", "2", "liver"],
    ]
    pants = tmp_path / "PanTS"
    scan = save(pants / "ImageTr" / "PanTS_00000001" / "ct.nii.gz", (labels * 40 + 10).astype(np.uint8))
    combined = save(pants / "LabelTr" / "PanTS_00000001" / "combined_labels.nii.gz", labels)
    save(pants / "LabelTr" / "PanTS_00000001" / "segmentations" / "liver.nii.gz", (labels == 5).astype(np.uint8))
    assert label_volume_of(scan, pants / "LabelTr") == combined
