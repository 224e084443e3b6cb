"""Hostile and careless inputs on copies of real files: a damaged scan, masks of another size, an edited processor,
retired or silently ignored options, degenerate volume prompts, unloadable checkpoints, many prompts in one call,
malformed boxes files, clashing or read-only outputs, stale temporaries and unclear messages.

Each is refused (or warned about) with one line naming the file, the argument and the value, before anything is
written where it can be: never a wrong mask with exit code 0, never a Python error that says nothing to a user.
One test per item of the issue, numbered as there.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, load_script, tiny_model, writable
from PIL import Image

from imedsam_hf import IMedSamProcessor, load_model, segment
from imedsam_hf import volumes as volumes_module
from imedsam_hf.cli import main
from imedsam_hf.commands import outputs as outputs_module
from imedsam_hf.commands import predict as predict_module
from imedsam_hf.evaluation import EvaluationProtocol
from imedsam_hf.volumes import Volume, read_volume, segment_volume

KVASIR = SHARED_DATA / "Kvasir-SEG-sample"
BTCV = SHARED_DATA / "BTCV-Synapse-CT"
pytestmark = pytest.mark.skipif(
    not (KVASIR / "images").is_dir() or not (BTCV / "labels" / "case0001.nii.gz").is_file(),
    reason="shared data missing",
)
PAIRED = sorted(p for p in (KVASIR / "images").iterdir() if (KVASIR / "masks" / f"{p.stem}.png").is_file())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint saved with its processor, standing in for a trained model (its decoder is used)."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(path)
    IMedSamProcessor(image_size=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def btcv_crop() -> dict:
    """A small real piece of BTCV case0001: 48 x 48 voxels around its structures on 3 slices, scan and labels."""
    labels = read_volume(BTCV / "labels" / "case0001.nii.gz")
    scan = read_volume(BTCV / "volumes" / "case0001.nii.gz") if (BTCV / "volumes").is_dir() else None
    z = 100
    xs, ys = np.nonzero(labels.data[:, :, z])
    x, y = int(np.median(xs)), int(np.median(ys))
    region = (slice(max(x - 24, 0), max(x - 24, 0) + 48), slice(max(y - 24, 0), max(y - 24, 0) + 48), slice(z, z + 3))
    truth = np.ascontiguousarray(labels.data[region])
    assert truth.any()
    image = np.ascontiguousarray(scan.data[region]) if scan is not None else (truth * 17 + 30).astype(np.uint8)
    return {"scan": image, "labels": truth, "affine": labels.affine}


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that must come before the model: the test fails if `imedsam predict` loads one."""
    monkeypatch.setattr(predict_module, "load_model", refuse_to_load)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def copy_image(tmp_path: Path, index: int = 0, folder: str = "in") -> Path:
    target = tmp_path / folder / PAIRED[index].name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(PAIRED[index], target)
    return target


def predict(model: Path, *argv) -> int:
    return main(["predict", "--model", str(model), *map(str, argv), "--device", "cpu"])


def error_line(capsys) -> str:
    """The one `error: ...` line a command printed on stderr (and no traceback)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------------------ 2
def test_2_a_flipped_byte_in_a_compressed_btcv_volume_is_refused_as_damaged(model_dir, tmp_path, capsys):
    damaged = tmp_path / "in" / "case0001.nii.gz"
    damaged.parent.mkdir()
    payload = bytearray((BTCV / "labels" / "case0001.nii.gz").read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # inside the deflate stream: header and trailer intact
    damaged.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="damaged") as error:
        read_volume(damaged)
    assert str(damaged) in str(error.value)
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(BTCV / "labels" / "case0001.nii.gz", labels / "case0001.nii.gz")
    code = predict(model_dir, damaged, "--boxes-from-masks", labels, "--out", tmp_path / "out")
    captured = capsys.readouterr()
    assert code in (1, 2)
    assert str(damaged) in captured.err and "damaged" in captured.err and "damaged" not in captured.out
    assert not list((tmp_path / "out").glob("*.nii.gz"))


# ------------------------------------------------------------------------------------------------------------ 3
@pytest.mark.parametrize("flag", ["--boxes-from-masks", "--points-from-masks"])
def test_3_a_mask_of_another_size_skips_its_image_naming_the_mask_and_both_sizes(model_dir, tmp_path, capsys, flag):
    image = copy_image(tmp_path)
    width, height = Image.open(image).size
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = masks / f"{image.stem}.png"
    Image.open(KVASIR / "masks" / f"{image.stem}.png").resize((width // 2, height // 2), Image.NEAREST).save(mask)
    assert predict(model_dir, image, flag, masks, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert str(mask) in err and f"{width // 2}x{height // 2}" in err and f"{width}x{height}" in err
    assert not (tmp_path / "out" / f"{image.stem}.png").exists()


# ------------------------------------------------------------------------------------------------------------ 4
def test_4_an_edited_preprocessor_normalization_is_refused_at_load(model_dir, tmp_path, capsys):
    edited = shutil.copytree(model_dir, tmp_path / "edited")
    config_file = edited / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    assert config["normalization"] == "mean_std"
    config_file.write_text(json.dumps({**config, "normalization": "minmax"}))
    with pytest.raises(ValueError, match="preprocessor_config.json") as error:
        load_model(edited)
    assert "normalization" in str(error.value) and "minmax" in str(error.value)
    image = copy_image(tmp_path)
    assert predict(edited, image, "--box", "10,10,200,200", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(config_file) in line and "normalization" in line
    assert files_in(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------------------ 5
def test_5_evaluate_num_classes_is_refused_pointing_to_mask_classes(model_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(model_dir), "--data-dir", str(KVASIR), "--split", "all"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--num-classes", "13", "--json", str(tmp_path / "eval.json")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--num-classes" in err and "--mask-classes" in err
    assert not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------------------------------------------ 7
def test_7_degenerate_volume_prompts_are_errors_naming_the_volume_or_box(
    model_dir, btcv_crop, tmp_path, capsys, monkeypatch
):
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    affine, labels = btcv_crop["affine"], btcv_crop["labels"]
    header = nib.Nifti1Image(labels, affine).header
    scan = Volume(btcv_crop["scan"], affine, header, Path("case0001_crop.nii.gz"))
    truth = Volume(labels, affine, header, Path("case0001_labels.nii.gz"))
    zeros = Volume(np.zeros_like(scan.data), affine, header, Path("empty_scan.nii.gz"))
    with pytest.raises(ValueError, match="every voxel is 0") as error:
        segment_volume(model, zeros, label_volume=truth, progress=False)
    assert "empty_scan.nii.gz" in str(error.value)
    empty_labels = Volume(np.zeros_like(labels), affine, header, Path("empty_labels.nii.gz"))
    with pytest.raises(ValueError, match="holds no structure") as error:
        segment_volume(model, scan, label_volume=empty_labels, progress=False)
    assert "empty_labels.nii.gz" in str(error.value)
    with pytest.raises(ValueError, match=r"boxes_3d\[6\].*one voxel wide"):
        segment_volume(model, scan, boxes_3d={6: [10, 10, 1, 10, 10, 1]}, progress=False)
    # An int16 copy whose values happen to lie in 0..255: taken as 8-bit grey, with a warning that they may be HU.
    as_int16 = Volume(scan.data.astype(np.int16), affine, header, scan.path)
    with pytest.warns(UserWarning, match=r"int16 values all within 0\.\.255"):
        segment_volume(model, as_int16, boxes_3d={6: [2, 2, 1, 30, 30, 1]}, progress=False)
    # `imedsam predict`: the empty scan is named on stderr and nothing is written (exit 1) ...
    empty = save_nifti(tmp_path / "in" / "empty.nii.gz", np.zeros_like(labels), affine)
    save_nifti(tmp_path / "labels" / "empty.nii.gz", labels, affine)
    assert predict(model_dir, empty, "--boxes-from-masks", tmp_path / "labels", "--out", tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert str(empty) in captured.err and "every voxel is 0" in captured.err and "every voxel" not in captured.out
    assert files_in(tmp_path / "out") == []
    # ... and a one-voxel box, or a boxes file mixing per-volume and global keys, is refused before the model loads.
    monkeypatch.setattr(predict_module, "load_model", refuse_to_load)
    boxes = tmp_path / "boxes.json"
    for content, message in (
        ({"6": [10, 10, 1, 10, 10, 1]}, "one voxel wide"),
        ({"empty": {"6": [2, 2, 0, 30, 30, 2]}, "6": [2, 2, 0, 30, 30, 2]}, "mixes per-volume entries"),
    ):
        boxes.write_text(json.dumps(content))
        assert predict(model_dir, empty, "--boxes", boxes, "--out", tmp_path / "boxes") == 2
        line = error_line(capsys)
        assert str(boxes) in line and message in line, line
        assert not (tmp_path / "boxes").exists()


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


# ------------------------------------------------------------------------------------------------------------ 8
@pytest.fixture(scope="module")
def train_script():
    module = load_script("training/train.py", "imedsam_train_hostile")
    return module


def fake_checkpoint(folder: Path, step: int, max_steps: int = 8, random_states: bytes | None = None) -> Path:
    """A checkpoint folder as `save_checkpoint` leaves it: state, RNG file and the manifest written last."""
    path = folder / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    state = {"epoch": 0, "batches_done": step, "global_step": step, "best_val_dice": -1.0, "best_step": None}
    (path / "training_state.json").write_text(json.dumps({**state, "max_steps": max_steps}))
    if random_states is None:
        torch.save({"torch_manual_seed": torch.get_rng_state()}, path / "random_states_0.pkl")
    else:
        (path / "random_states_0.pkl").write_bytes(random_states)
    return path


def test_8_a_checkpoint_whose_random_states_do_not_load_is_reported_and_skipped(train_script, tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    train_script.write_manifest(good)
    bad = fake_checkpoint(tmp_path, 4, random_states=b"garbage, not a pickle of random states")
    train_script.write_manifest(bad)  # the manifest verifies: sizes and sha256 are those of the garbage
    problem = train_script.checkpoint_problem(bad)
    assert problem is not None and str(bad / "random_states_0.pkl") in problem and "does not load" in problem
    assert train_script.checkpoint_problem(good) is None
    reports = []
    assert train_script.latest_checkpoint(tmp_path, reports.append) == good
    assert len(reports) == 1 and str(bad) in reports[0] and "random_states_0.pkl" in reports[0]


# ------------------------------------------------------------------------------------------------------------ 9
def test_9_many_boxes_are_decoded_in_chunks_within_the_budget_and_a_huge_call_is_refused():
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    image = str(PAIRED[0])
    boxes = [[10.0 + 40 * i, 20.0 + 30 * i, 200.0 + 40 * i, 260.0 + 30 * i] for i in range(5)]
    prompts_per_call = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, output: prompts_per_call.append(kwargs["input_boxes"].shape[1]), with_kwargs=True
    )
    try:
        together = segment(model, image, box=boxes, output_size=(20, 20), max_output_pixels=800)  # 2 masks a call
    finally:
        hook.remove()
    assert prompts_per_call == [2, 2, 1]
    assert together.mask.shape == (5, 20, 20) and together.probabilities.shape == (5, 1, 20, 20)
    for index, box in enumerate(boxes):
        alone = segment(model, image, box=box, output_size=(20, 20), max_output_pixels=800)
        np.testing.assert_allclose(together.probabilities[index], alone.probabilities, atol=1e-5)
        np.testing.assert_array_equal(together.mask[index], alone.mask)
    # 17 full-budget masks are more than MAX_CALL_OUTPUTS (16) budgets: refused with an estimate, before any work.
    with pytest.raises(ValueError, match=r"17 prompts of 20x20 masks would hold about .* GiB") as error:
        segment(model, image, box=[boxes[0]] * 17, output_size=(20, 20), max_output_pixels=400)
    assert image in str(error.value) and "fewer prompts" in str(error.value)


# ----------------------------------------------------------------------------------------------------------- 10
def test_10_trainable_weights_of_another_model_shape_are_refused_naming_the_file_and_the_fix(tmp_path, train_script):
    """Resuming (or `--finish-only`) with other model options than the run's: the saved trainable weights do not fit;
    the error names the file and says to build the model with the run's own options."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    import imedsam_hf
    from imedsam_hf.publishing import trainable_state

    def trainable(**overrides):
        model = tiny_model(query_mode="adaptive", **overrides)
        return get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config))

    saved = tmp_path / "trainable_0.safetensors"
    save_file({k: v.contiguous() for k, v in trainable_state(trainable()).items()}, str(saved))
    train_script.load_trainable(trainable(), saved)  # the run's own options: loads
    with pytest.raises(SystemExit, match=r"trainable_0.safetensors.*Build it with the run's own model options"):
        train_script.load_trainable(trainable(num_classes=3), saved)


def test_10_a_boxes_file_holding_a_json_list_is_refused_before_the_model_loads(
    model_dir, btcv_crop, tmp_path, capsys, no_model_load
):
    image = copy_image(tmp_path)
    scan = save_nifti(tmp_path / "scans" / "case0001.nii.gz", btcv_crop["scan"], btcv_crop["affine"])
    boxes = tmp_path / "boxes.json"
    for inputs, content in ((image, [[10, 10, 200, 200]]), (scan, [[2, 2, 0, 30, 30, 2]])):
        boxes.write_text(json.dumps(content))
        assert predict(model_dir, inputs, "--boxes", boxes, "--out", tmp_path / "out") == 2
        line = error_line(capsys)
        assert f"--boxes {boxes}" in line and "JSON object" in line and "list" in line, line
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------- 11
def test_11_a_mixed_call_with_a_clash_or_a_read_only_out_does_nothing(
    model_dir, btcv_crop, tmp_path, capsys, monkeypatch, no_model_load
):
    folder = tmp_path / "in"
    scan = save_nifti(folder / "case0001.nii.gz", btcv_crop["scan"], btcv_crop["affine"])
    save_nifti(tmp_path / "labels" / "case0001.nii.gz", btcv_crop["labels"], btcv_crop["affine"])
    image = copy_image(tmp_path)  # x.jpg, and a PNG copy x.png beside it: both would write out/x.png
    Image.open(image).save(folder / f"{image.stem}.png")
    argv = [scan, image, folder / f"{image.stem}.png", "--boxes-from-masks", tmp_path / "labels"]
    assert predict(model_dir, *argv, "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(tmp_path / "out" / f"{image.stem}.png") in line and "both be written" in line
    assert not (tmp_path / "out").exists()
    # A read-only --out: one line before anything runs (as root the folder is writable anyway: its probe fails).
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if writable(read_only):

            def denied(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(outputs_module.tempfile, "TemporaryFile", denied)
        assert predict(model_dir, scan, image, "--boxes-from-masks", tmp_path / "labels", "--out", read_only) == 2
    finally:
        read_only.chmod(0o755)
    line = error_line(capsys)
    assert f"--out {read_only}" in line and "cannot write into it" in line
    assert files_in(read_only) == []


# ----------------------------------------------------------------------------------------------------------- 12
def test_12_stale_temporaries_are_removed_and_never_listed_as_outputs(model_dir, btcv_crop, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    scan = save_nifti(folder / "scan.nii.gz", btcv_crop["scan"], btcv_crop["affine"])
    save_nifti(tmp_path / "labels" / "scan.nii.gz", btcv_crop["labels"], btcv_crop["affine"])
    image = copy_image(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(KVASIR / "masks" / f"{image.stem}.png", masks / f"{image.stem}.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".scan.nii.gz.k3j9_x.part", out / f".{image.stem}.png.a8f2q1.part"]  # left by a killed write
    for path in stale:
        path.write_bytes(b"half a file")
    listed = []
    real_write = volumes_module.atomic_write

    def watched(target, write):
        def write_and_look(temporary):
            write(temporary)  # the whole label volume is in the temporary, not yet in place
            listed.append((Path(temporary).name, sorted(p.name for p in Path(target).parent.glob("*.nii.gz"))))

        return real_write(target, write_and_look)

    monkeypatch.setattr(volumes_module, "atomic_write", watched)
    for inputs, prompt in ((scan, tmp_path / "labels"), (image, masks)):
        assert predict(model_dir, inputs, "--boxes-from-masks", prompt, "--out", out) == 0
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in out.iterdir()) == sorted(["scan.nii.gz", f"{image.stem}.png"])
    [(temporary, seen)] = listed
    assert temporary.startswith(".scan.nii.gz.") and temporary.endswith(".part") and seen == []
    assert [p.name for p in out.glob("*.nii.gz")] == ["scan.nii.gz"]
    assert read_volume(out / "scan.nii.gz").shape == btcv_crop["labels"].shape


# ----------------------------------------------------------------------------------------------------------- 13
def test_13_messages_say_what_is_wrong_in_the_users_words(model_dir, btcv_crop, tmp_path, capsys, monkeypatch):
    # 3-D boxes keyed by a volume that was not given, or by something that is not a class id: no int() error.
    scan = save_nifti(tmp_path / "in" / "case0001.nii.gz", btcv_crop["scan"], btcv_crop["affine"])
    boxes = tmp_path / "boxes.json"
    with monkeypatch.context() as patched:
        patched.setattr(predict_module, "load_model", refuse_to_load)
        for content, message in (
            ({"case9999": {"6": [2, 2, 0, 30, 30, 2]}}, "no boxes for ['case0001'] (it has ['case9999'])"),
            ({"0": [2, 2, 0, 30, 30, 2]}, "'0' is not a class id (1..255)"),
        ):
            boxes.write_text(json.dumps(content))
            assert predict(model_dir, scan, "--boxes", boxes, "--out", tmp_path / "out") == 2
            line = error_line(capsys)
            assert message in line and str(boxes) in line and "invalid literal" not in line, line
    # A name stands for a class id only with a class-aware model (its id2label), known once the model is loaded.
    boxes.write_text(json.dumps({"abc": [2, 2, 0, 30, 30, 2]}))
    assert predict(model_dir, scan, "--boxes", boxes, "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert f"--boxes {boxes}: case0001: 'abc': this model is not class-aware" in line, line
    # A negative first coordinate needs no `=`: the box is clipped to the image and a mask written.
    image = copy_image(tmp_path, folder="images")
    assert predict(model_dir, image, "--box", "-200,10,300,400", "--out", tmp_path / "negative") == 0
    assert (tmp_path / "negative" / f"{image.stem}.png").is_file()
    capsys.readouterr()
    # A box off the image names the image's file, never `<Image>`; a volume's problem goes to stderr.
    assert predict(model_dir, image, "--box", "5000,5000,6000,6000", "--out", tmp_path / "off") == 1
    captured = capsys.readouterr()
    assert str(image) in captured.err and "<Image>" not in captured.err and "outside" in captured.err
    assert "--box" in captured.err
    assert predict(model_dir, scan, "--boxes-from-masks", tmp_path / "images", "--out", tmp_path / "nolabels") == 1
    captured = capsys.readouterr()
    assert "no label volume case0001.nii.gz" in captured.err and "no label volume" not in captured.out
    # A box given as text to the Python API.
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    with pytest.raises(ValueError, match="(?i)a box is 4 numbers"):
        segment(model, str(image), box="1,2,3,4")
    # A classes.json listing only the background: named, in `imedsam evaluate` and in the protocol.
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for path in PAIRED[:2]:
        shutil.copy(path, data / "images" / path.name)
        shutil.copy(KVASIR / "masks" / f"{path.stem}.png", data / "masks" / f"{path.stem}.png")
    (data / "classes.json").write_text(json.dumps({"classes": {"0": "background"}}))
    argv = ["evaluate", "--model", str(model_dir), "--data-dir", str(data), "--split", "all"]
    assert main([*argv, "--json", str(tmp_path / "eval.json"), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert str(data / "classes.json") in line and "only the background" in line and "max()" not in line
    with pytest.raises(ValueError, match="only the background"):
        EvaluationProtocol.resolve(
            model.config, str(data), prompt="box", output_sizes=["native"], class_aware=None, class_prompts=None,
            mask_classes=None, classes=None, mask_values=None, box_jitter=0.0, jitter_seed=0, jitter_draws=1,
            num_clicks=1, group_pattern=r"^(.*)$", spacing=None, tta="none", nsd_tolerance=2.0, nsd_definition="voxels",
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- 14
def test_14_options_that_would_be_silently_ignored_are_errors(
    model_dir, btcv_crop, train_script, tmp_path, capsys, monkeypatch
):
    scan = save_nifti(tmp_path / "in" / "case0001.nii.gz", btcv_crop["scan"], btcv_crop["affine"])
    labels = save_nifti(tmp_path / "labels" / "case0001.nii.gz", btcv_crop["labels"], btcv_crop["affine"]).parent
    image = copy_image(tmp_path, folder="images")
    with monkeypatch.context() as patched:
        patched.setattr(predict_module, "load_model", refuse_to_load)
        for argv, message in (
            ([scan, "--boxes-from-masks", labels, "--output-size", "64x64"], "--output-size applies to 2-D images"),
            (
                [image, "--box", "10,10,200,200", "--window", "abdomen"],
                "--window applies to volumes (NIfTI, DICOM series)",
            ),
            ([image, "--box", "10,10,200,200", "--clicks", "3"], "--clicks sets the clicks per mask"),
            ([scan, "--boxes-from-masks", labels, "--propagation", "continue"], "--propagation applies to volumes"),
            ([scan, "--boxes-from-masks", labels, "--no-confine"], "--no-confine applies to volumes prompted with 3-D"),
        ):
            assert predict(model_dir, *argv, "--out", tmp_path / "out") == 2
            assert message in error_line(capsys)
            assert not (tmp_path / "out").exists()
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    with pytest.raises(ValueError, match="`labels` were given without `points`"):
        segment(model, str(image), box=[10, 10, 200, 200], labels=[1])
    with pytest.raises(ValueError, match=r"`classes` \[1\.7\]: class ids are whole numbers"):
        segment(model, str(image), box=[10, 10, 200, 200], classes=[1.7])
    # train.py: LiteMedSAM takes 256 px only (refused before loading it) ...
    with pytest.raises(SystemExit, match="--image-size 512: LiteMedSAM's encoder takes 256 px only"):
        train_script.build_model(train_script.parse_args(["--backbone", "litemedsam", "--image-size", "512"]).model)
    # ... and a checkpoint planned for another number of steps is not resumed (its learning rate schedule differs).
    checkpoint = fake_checkpoint(tmp_path / "run", 4, max_steps=8)
    train_script.write_manifest(checkpoint)
    run = types.SimpleNamespace(
        args=types.SimpleNamespace(training=types.SimpleNamespace(resume_from_checkpoint=str(checkpoint))),
        output_dir=tmp_path / "run",
        max_steps=20,
        accelerator=types.SimpleNamespace(print=print),
    )
    with pytest.raises(SystemExit, match="planned for 8 steps .* now 20 are asked for"):
        train_script.resume(run)


# ------------------------------------------------------------------------------------------------------------ 6
def test_6_the_processor_takes_samprocessors_nesting_and_shows_the_accepted_shapes():
    processor = IMedSamProcessor(image_size=64)
    image = str(PAIRED[0])
    first, second = [10.0, 20.0, 300.0, 400.0], [100.0, 50.0, 200.0, 150.0]
    listed = processor(image, input_boxes=[first, second])["input_boxes"]
    nested = processor(image, input_boxes=[[first, second]])["input_boxes"]  # SamProcessor: (batch, boxes, 4)
    assert listed.shape == nested.shape == (1, 2, 4)
    torch.testing.assert_close(nested, listed)
    assert processor(image, input_boxes=first)["input_boxes"].shape == (1, 4)
    assert processor(image, input_boxes=[[first]])["input_boxes"].shape == (1, 1, 4)
    assert processor([image], input_boxes=[[first, second]])["input_boxes"].shape == (1, 2, 4)
    for malformed in ([[first], [second]], [first, [second]], [[[first]]], "10,20,300,400"):
        with pytest.raises(ValueError, match=r"\[\[\[x0, y0, x1, y1\], \.\.\.\]\] \(batch of 1, boxes, 4\)"):
            processor(image, input_boxes=malformed)
    result = segment(tiny_model(implicit_decoder_trained=True), image, box=[[first, second]], output_size=(8, 8))
    assert result.mask.shape == (2, 8, 8)
