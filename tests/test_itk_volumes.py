"""Scans and label volumes in ITK's file formats: NRRD (3D Slicer's scans and segmentations) and MetaImage
(grand-challenge.org's `.mha`), read and written with SimpleITK (the ``itk`` extra). Before, `imedsam predict` took a
`.mha` or `.nrrd` scan for a 2-D picture ("cannot identify image file") and never looked for a label volume not named
`.nii` / `.nii.gz`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from imedsam_hf import volumes as volumes_module
from imedsam_hf.cli import main
from imedsam_hf.commands.outputs import plan_outputs
from imedsam_hf.volumes import (
    embedded_label_names,
    itk_geometry,
    label_volume_of,
    onto_grid,
    read_volume,
    segment_volume,
    write_label_volume,
)

sitk = pytest.importorskip("SimpleITK")

# Oblique on purpose: the axes swapped and flipped, turned 30 degrees about S, anisotropic (0.7 x 0.9 x 2.5 mm).
TURN = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6), 0], [np.sin(np.pi / 6), np.cos(np.pi / 6), 0], [0, 0, 1]])
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = TURN @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.diag([0.7, 0.9, 2.5])
OBLIQUE[:3, 3] = [12.5, -40.0, 7.0]
LAS = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def converted(nifti: Path, target: Path) -> Path:
    """`nifti` written as `target` (its extension picks the format) by SimpleITK itself: the reference conversion."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(target))
    return target


def two_organs(shape=(24, 20, 6)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:10, 4:12, 1:5] = 2
    labels[8:20, 10:18, 2:4] = 5
    return labels


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
@pytest.mark.parametrize("affine", [LAS, OBLIQUE], ids=["las", "oblique"])
def test_an_itk_file_reads_as_the_nifti_it_was_converted_from(tmp_path, suffix, affine):
    data = np.random.default_rng(0).integers(-1000, 1500, size=(12, 10, 5)).astype(np.int16)
    nifti = save_nifti(tmp_path / "ct.nii.gz", data, affine)
    volume = read_volume(converted(nifti, tmp_path / f"ct{suffix}"))
    assert volume.shape == (12, 10, 5) and volume.data.dtype == np.int16
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.spacing == pytest.approx(read_volume(nifti).spacing)
    assert volume.axcodes == read_volume(nifti).axcodes


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_a_label_volume_written_as_nrrd_or_metaimage_lies_on_its_scans_grid(tmp_path, suffix):
    scan = converted(save_nifti(tmp_path / "ct.nii.gz", np.zeros((12, 10, 5), np.int16), OBLIQUE), tmp_path / "ct.mha")
    volume = read_volume(scan)
    labels = np.random.default_rng(1).integers(0, 14, size=volume.shape).astype(np.int64)
    out = tmp_path / "out" / f"labels{suffix}"
    out.parent.mkdir()
    (out.parent / f".{out.name}.x1y2.part{suffix}").write_bytes(b"a killed write")  # SimpleITK's, left by a kill
    assert write_label_volume(labels, volume, out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left, one file
    written, reference = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written).transpose(2, 1, 0), labels)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert itk_geometry(volume.affine)[1] == pytest.approx(reference.GetSpacing())
    np.testing.assert_array_equal(read_volume(out).data, labels)
    with pytest.raises(ValueError, match=r"written as \.nii\.gz, \.nii, \.seg\.nrrd, \.nrrd or \.mha"):
        write_label_volume(labels, volume, tmp_path / "labels.mhd")


def test_itk_files_that_are_no_3d_scan_are_refused_by_name(tmp_path):
    junk = tmp_path / "junk.mha"
    junk.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(ValueError, match="junk.mha: cannot be read as a .mha volume") as error:
        read_volume(junk)
    assert "\n" not in str(error.value) and "SimpleITK-build" not in str(error.value)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(tmp_path / "xray.mha"))
    with pytest.raises(ValueError, match=r"xray.mha: is 2-D \(size \(6, 5\)\), not a 3-D volume"):
        read_volume(tmp_path / "xray.mha")
    layers = sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), np.uint8), isVector=True)  # Slicer's overlapping segments
    sitk.WriteImage(layers, str(tmp_path / "layers.seg.nrrd"))
    with pytest.raises(ValueError, match="layers.seg.nrrd: holds 2 values per voxel"):
        read_volume(tmp_path / "layers.seg.nrrd")
    with pytest.raises(ValueError, match="gone.nrrd: no such file"):
        read_volume(tmp_path / "gone.nrrd")


def test_without_simpleitk_an_itk_file_names_the_extra_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    scan = converted(save_nifti(tmp_path / "ct.nii.gz", two_organs() * 20), tmp_path / "in" / "ct.mha")
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "SimpleITK" else found(name, *a))
    with pytest.raises(ImportError, match=r'needs SimpleITK, which is not installed: .*pip install "\.\[itk\]"'):
        read_volume(scan)
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(scan), "--no-prompt", "--out", str(tmp_path / "P")]
    assert main(argv) == 2
    assert "[itk] extra" in capsys.readouterr().err
    assert not (tmp_path / "P").exists()
    # A NRRD label volume found only in a case folder of the masks folder: that scan is skipped, naming the extra.
    nifti = save_nifti(tmp_path / "case1" / "ct.nii.gz", two_organs() * 20)
    converted(save_nifti(tmp_path / "t.nii.gz", two_organs()), tmp_path / "masks" / "case1" / "ct_seg.nrrd")
    argv = ["predict", "--model", str(tmp_path / "model"), str(nifti), "--boxes-from-masks", str(tmp_path / "masks")]
    assert main([*argv, "--out", str(tmp_path / "Q")]) == 1
    assert "[itk] extra" in capsys.readouterr().err


def test_label_volumes_are_planned_in_their_scans_format(tmp_path):
    names = ["a.mha", "b.mhd", "c.nrrd", "d.nhdr", "e.nii.gz", "f.nii"]
    for name in names:
        (tmp_path / name).touch()
    plan = plan_outputs([str(tmp_path / n) for n in names], tmp_path / "P", (".nii.gz", "_overlay.png"), volumes=True)
    written = sorted(target.name for targets in plan.values() for target in targets)
    assert written == sorted(
        ["a.mha", "b.mha", "c.seg.nrrd", "d.seg.nrrd", "e.nii.gz", "f.nii.gz"] + [f"{n[0]}_overlay.png" for n in names]
    )


def slicer_segmentation(labels: np.ndarray, like: Path, path: Path, segments: dict[int, tuple[int, str]]) -> Path:
    """`labels` as 3D Slicer saves a segmentation: cropped to its segments' extent, each segment given label value
    1, 2, ... in its own order (`segments`: ``{label id: (Slicer's value, name)}``), named in the header."""
    renumbered = np.zeros_like(labels)
    for label_id, (value, _) in segments.items():
        renumbered[labels == label_id] = value
    image = sitk.GetImageFromArray(renumbered.transpose(2, 1, 0))
    image.CopyInformation(sitk.ReadImage(str(like)))
    low, high = np.argwhere(renumbered).min(0), np.argwhere(renumbered).max(0) + 1
    cropped = sitk.RegionOfInterest(image, (high - low).tolist(), low.tolist())
    for index, (value, name) in enumerate(segments.values()):
        for key, text in (("ID", f"Segment_{value}"), ("Name", name), ("LabelValue", str(value)), ("Layer", "0")):
            cropped.SetMetaData(f"Segment{index}_{key}", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(cropped, str(path), useCompression=True)
    return path


def test_a_slicer_segmentation_prompts_its_scan_cropped_renumbered_and_named(tmp_path, monkeypatch, capsys):
    """3D Slicer saves a segmentation (`.seg.nrrd`) beside its scan, cropped to the segments and numbered 1, 2, ...
    in the order they were made, their names in its header. It is found as the scan's label volume, padded back
    onto the scan's grid, each segment decoded by the class-aware model's class of its name; what is written keeps
    Slicer's values and names, and `imedsam score` takes the cropped segmentation as the truth."""
    labels = two_organs()
    nifti = save_nifti(tmp_path / "ct.nii.gz", (labels * 30 + 20).astype(np.uint8))
    scan = converted(nifti, tmp_path / "scene" / "ct.nrrd")  # the scene's scan, saved by Slicer as NRRD
    segments = {5: (1, "Esophagus"), 2: (2, "Right kidney")}
    seg = slicer_segmentation(labels, scan, tmp_path / "scene" / "ct.seg.nrrd", segments)
    assert sitk.ReadImage(str(seg)).GetSize() == (17, 14, 4)  # cropped
    assert embedded_label_names(seg) == {1: "Esophagus", 2: "Right kidney"}
    assert label_volume_of(scan, tmp_path / "scene") == seg  # beside the scan, which is not its own label volume
    alone = converted(nifti, tmp_path / "alone" / "ct.nrrd")
    assert label_volume_of(alone, alone.parent) is None
    # Padded back: Slicer's values at the scan's voxels; a box between voxels or outside the scan is no crop of it.
    padded = onto_grid(read_volume(seg), read_volume(scan), crop=True)
    np.testing.assert_array_equal(padded.data, np.select([labels == 5, labels == 2], [1, 2], 0))
    assert onto_grid(read_volume(seg), read_volume(scan)) is None  # only a Slicer segmentation is taken as a crop
    moved = read_volume(seg)
    moved.affine = moved.affine.copy()
    moved.affine[:3, 3] += 0.3
    assert onto_grid(moved, read_volume(scan), crop=True) is None

    model_names = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver"}
    calls: list = []
    real_segment = volumes_module.segment

    def recording(model, image, box=None, classes=None, **kwargs):
        calls.extend(classes)
        return real_segment(model, image, box=box, classes=classes, **kwargs)

    monkeypatch.setattr(volumes_module, "segment", recording)
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True, id2label=model_names).save_pretrained(
        tmp_path / "aware"
    )
    # The scene's folder given as input: its scan is segmented, not its segmentation.
    argv = ["predict", "--model", str(tmp_path / "aware"), str(tmp_path / "scene"), "--device", "cpu"]
    argv += ["--boxes-from-masks", str(tmp_path / "scene"), "--statistics", "--out", str(tmp_path / "P")]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "P").iterdir()) == ["ct.seg.nrrd", "ct_statistics.json"]
    assert set(calls) == {5, 2}  # the esophagus by the esophagus's heads, the kidney by its own
    written = read_volume(tmp_path / "P" / "ct.seg.nrrd")
    np.testing.assert_allclose(written.affine, read_volume(scan).affine, atol=1e-5)
    assert set(np.unique(written.data)) <= {0, 1, 2} and written.data.any()  # Slicer's values
    statistics = json.loads((tmp_path / "P" / "ct_statistics.json").read_text())
    assert set(statistics["structures"]) <= {"Esophagus", "Right kidney"} and statistics["structures"]
    # A segmentation 3D Slicer opens with its segments named: as Slicer's own reader (slicerio) sees it.
    slicerio = pytest.importorskip("slicerio")
    opened = slicerio.read_segmentation(str(tmp_path / "P" / "ct.seg.nrrd"))
    segments = {segment["labelValue"]: segment for segment in opened["segments"]}
    assert set(segments) == set(np.unique(written.data)) - {0}
    assert {segments[value]["name"] for value in segments} <= {"Esophagus", "Right kidney"}
    assert all(segment["layer"] == 0 and len(segment["color"]) == 3 for segment in segments.values())
    np.testing.assert_array_equal(opened["voxels"], written.data)  # slicerio's IJK array: the volume's
    np.testing.assert_allclose(
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ opened["ijkToLPS"], written.affine, atol=1e-5
    )  # LPS -> RAS: the scan's grid
    assert (
        main(["score", str(tmp_path / "P"), "--truth", str(tmp_path / "scene"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    scored = json.loads((tmp_path / "s.json").read_text())
    assert "Esophagus" in json.dumps(scored) and "Right kidney" in json.dumps(scored)


def test_a_metaimage_scan_gives_its_nifti_copys_labels_in_its_own_format(tmp_path, monkeypatch):
    labels = two_organs()
    nifti = save_nifti(tmp_path / "nii" / "ct.nii.gz", (labels * 30 + 20).astype(np.uint8), OBLIQUE)
    mha = converted(nifti, tmp_path / "mha" / "ct.mha")
    save_nifti(tmp_path / "labels" / "ct.nii.gz", labels, OBLIQUE)
    converted(tmp_path / "labels" / "ct.nii.gz", tmp_path / "itk_labels" / "ct.nrrd")
    tiny_model(num_classes=6, class_aware=True, implicit_decoder_trained=True).save_pretrained(tmp_path / "aware")
    for scan, truth, out in ((nifti, "labels", "A"), (mha, "itk_labels", "B")):
        argv = [
            "predict",
            "--model",
            str(tmp_path / "aware"),
            str(scan),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / out),
        ]
        assert main([*argv, "--boxes-from-masks", str(tmp_path / truth)]) == 0
    by_nifti, by_mha = read_volume(tmp_path / "A" / "ct.nii.gz"), read_volume(tmp_path / "B" / "ct.mha")
    np.testing.assert_array_equal(by_mha.data, by_nifti.data)
    np.testing.assert_allclose(by_mha.affine, by_nifti.affine, atol=1e-5)
    assert by_mha.data.any()
    # segment_volume takes the path as it takes a NIfTI's.
    from imedsam_hf import load_model

    aware, processor = load_model(str(tmp_path / "aware"))
    given = segment_volume(aware, mha, processor=processor, label_volume=tmp_path / "itk_labels" / "ct.nrrd")
    np.testing.assert_array_equal(given, by_nifti.data)


def test_slicer_segmentations_numbered_in_each_annotators_order_are_one_numbering_by_name(tmp_path, capsys):
    """Each annotator makes Slicer's segments in their own order (liver 1 in one case, 2 in the next): convert
    volumes refused such cases ("structure 1 is 'Esophagus', in another label volume 'Right kidney'"); without
    --classes they are now numbered by name across cases, as RT Structure Sets' ROIs are."""
    labels = two_organs()
    for case, segments in (("a", {5: (1, "Esophagus"), 2: (2, "Right kidney")}), ("b", {2: (1, "right kidney"), 5: (2, "esophagus")})):  # fmt: skip
        nifti = save_nifti(tmp_path / "nii" / f"{case}.nii.gz", (labels * 30 + 20).astype(np.uint8))
        scan = converted(nifti, tmp_path / "scans" / f"{case}.nrrd")
        slicer_segmentation(labels, scan, tmp_path / "scans" / f"{case}.seg.nrrd", segments)
    argv = ["convert", "volumes", "--images", str(tmp_path / "scans"), "--labels", str(tmp_path / "scans")]
    assert main([*argv, "--output", str(tmp_path / "slices")]) == 0, capsys.readouterr().err
    classes = json.loads((tmp_path / "slices" / "classes.json").read_text())["classes"]
    assert {k: v for k, v in classes.items() if k != "0"} == {"1": "Esophagus", "2": "Right kidney"}
    for case in ("a", "b"):  # the esophagus is 1 in both cases' masks, the kidney 2 (alone on the first slice)
        masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "slices" / "masks").glob(f"{case}_*"))]
        assert set(np.unique(np.stack(masks)).tolist()) == {0, 1, 2}
        assert set(np.unique(masks[0]).tolist()) == {0, 2}


def test_han_segs_structure_masks_beside_its_scans_are_their_label_volume(tmp_path, capsys):
    """HaN-Seg keeps each case's CT and MR beside one `.seg.nrrd` per organ, named for the case
    (`set_1/case_01/case_01_IMG_CT.nrrd`, `case_01_OAR_Brainstem.seg.nrrd`): nothing paired ("no label volume").
    The case folder's `<case>_OAR_<structure>` files are now its structure masks, named by what follows `_OAR_`."""
    from imedsam_hf.volumes import paired_volumes, read_label_volume, scan_files_in, structure_mask_names

    labels = two_organs()
    case = tmp_path / "set_1" / "case_01"
    ct = converted(
        save_nifti(tmp_path / "ct.nii.gz", (labels * 40 - 100).astype(np.int16)), case / "case_01_IMG_CT.nrrd"
    )
    sitk.WriteImage(sitk.ReadImage(str(ct))[::2, ::2, :], str(case / "case_01_IMG_MR_T1.nrrd"))  # not registered
    for value, organ in ((2, "Kidney_L"), (5, "Liver")):
        converted(
            save_nifti(tmp_path / f"{organ}.nii.gz", (labels == value).astype(np.uint8)),
            case / f"case_01_OAR_{organ}.seg.nrrd",
        )
    assert [p.name for p in scan_files_in(case)] == ["case_01_IMG_CT.nrrd", "case_01_IMG_MR_T1.nrrd"]
    assert label_volume_of(ct, tmp_path / "set_1") == case and label_volume_of(ct, case) == case
    assert structure_mask_names(case) == {1: "Kidney_L", 2: "Liver"}
    volume = read_volume(ct)
    np.testing.assert_array_equal(
        read_label_volume(case, volume).data, np.select([labels == 2, labels == 5], [1, 2], 0)
    )
    aware = read_label_volume(case, volume, {3: "left kidney", 6: "liver"})  # TG-263's Kidney_L is the left kidney
    np.testing.assert_array_equal(aware.data, np.select([labels == 2, labels == 5], [1, 2], 0))
    with pytest.raises(
        ValueError, match=r"case_01_IMG_CT.nrrd, case_01_IMG_MR_T1.nrrd have one label volume .*'\*_CT.nrrd'"
    ):
        paired_volumes(tmp_path / "set_1", tmp_path / "set_1")
    assert [(c, s.name) for c, s, _ in paired_volumes(tmp_path / "set_1", tmp_path / "set_1", "*_IMG_CT.nrrd")] == [
        ("case_01_IMG_CT", "case_01_IMG_CT.nrrd")
    ]
    # score: predict's P/case_01/case_01_IMG_CT.nii.gz against the data set as it unpacks, rows named by the files.
    save_nifti(
        tmp_path / "P" / "case_01" / "case_01_IMG_CT.nii.gz",
        np.select([labels == 2, labels == 5], [1, 2], 0).astype(np.uint8),
        volume.affine,
    )
    csv = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(tmp_path / "set_1"), "--csv", str(csv)]) == 0
    assert [row.split(",")[:4] for row in csv.read_text().splitlines()[1:]] == [
        ["case_01_IMG_CT", "1", "Kidney_L", "1.0"],
        ["case_01_IMG_CT", "2", "Liver", "1.0"],
    ]


def test_pi_cais_sequences_pair_with_the_lesions_named_for_their_case(tmp_path, capsys):
    """PI-CAI keeps `picai_public_images_fold0/10000/10000_1000000_t2w.mha` (and `_adc`, `_hbv`, `_cor`, `_sag`) and
    the lesion masks as `human_expert/resampled/10000_1000000.nii.gz`, named for the case without the sequence:
    nothing paired ("no label volume", 0 of 2 segmented). A scan named by its case and a sequence word pairs with the
    case's label volume, the case named so; the refusal without `--scans` names the sequences that pair."""
    from imedsam_hf.volumes import paired_volumes

    labels = two_organs()
    images, masks = tmp_path / "picai_public_images_fold0", tmp_path / "resampled"
    for patient, study, shift in (("10000", "1000000", 0), ("10001", "1000001", 2)):
        moved = np.roll(labels, shift, 0)
        t2 = save_nifti(tmp_path / "t2.nii.gz", (moved * 40 + 10).astype(np.int16))
        for sequence in ("t2w", "adc", "hbv", "cor"):
            converted(t2, images / patient / f"{patient}_{study}_{sequence}.mha")
        save_nifti(masks / f"{patient}_{study}.nii.gz", (moved == 5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"10000_1000000_cor.mha .* end _adc.mha or _hbv.mha or _t2w.mha: pick one"):
        paired_volumes(images, masks)
    pairs = paired_volumes(images, masks, "*_t2w.mha")
    assert [(case, scan.name, label.name) for case, scan, label in pairs] == [
        ("10000_1000000", "10000_1000000_t2w.mha", "10000_1000000.nii.gz"),
        ("10001_1000001", "10001_1000001_t2w.mha", "10001_1000001.nii.gz"),
    ]
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["predict", "--model", str(tmp_path / "model"), str(images), "--scans", "*_t2w.mha", "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(masks), "--out", str(tmp_path / "P")]) == 0, capsys.readouterr().err
    csv = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "P"), "--truth", str(masks), "--csv", str(csv)]) == 0, capsys.readouterr().err
    assert [row.split(",")[:2] for row in csv.read_text().splitlines()[1:]] == [
        ["10000_1000000_t2w", "1"],
        ["10001_1000001_t2w", "1"],
    ]
