"""Bad inputs as a new user makes them, on real files: damaged weights, foreign or missing model folders, NaN and
off-image prompts, clashing or protected outputs, untrained decoders, huge output grids. Each gives one clear line
(or a documented fallback), never an empty mask with exit code 0 and never an overwritten file.

The README's table "bad input -> what the user sees" lists the same cases."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, randomize_adapters, tiny_model, writable
from peft import get_peft_model
from PIL import Image
from test_convert import TINY_SAM
from transformers import SamConfig, SamModel

from imedsam_hf import IMedSamProcessor, imedsam_peft_config, load_model, save_pretrained_full, segment
from imedsam_hf.cli import main
from imedsam_hf.loading import convert_checkpoint
from imedsam_hf.processing_imedsam import resize_labels
from imedsam_hf.publishing import implicit_decoder_trained

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
KVASIR = SHARED_DATA / "Kvasir-SEG-sample"
IMAGES = sorted((KVASIR / "images").iterdir())


def save_tiny(folder: Path, **overrides) -> Path:
    tiny_model(query_mode="adaptive", **overrides).save_pretrained(folder)
    IMedSamProcessor(image_size=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint that says its implicit decoder is trained (as a training run's output does)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "trained", implicit_decoder_trained=True)


def predict(model: Path, *argv: str) -> int:
    return main(["predict", "--model", str(model), *map(str, argv)])


def error_line(capsys) -> str:
    """The one `error: ...` line the command printed (and nothing like a traceback)."""
    captured = capsys.readouterr()
    lines = [line for line in (captured.err + captured.out).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# ----------------------------------------------------------------------------------------- damaged model folders


def test_truncated_weights_name_the_file(trained_dir, tmp_path, capsys):
    damaged = shutil.copytree(trained_dir, tmp_path / "truncated")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert predict(damaged, IMAGES[0], "--no-prompt", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(weights) in line and "truncated or damaged" in line
    assert not (tmp_path / "out" / f"{IMAGES[0].stem}.png").exists()


def test_nan_weights_are_refused_at_load_naming_the_file(trained_dir, tmp_path, capsys):
    """4 KiB of model.safetensors overwritten (0xff bytes are NaN): an error at load, not an empty mask."""
    damaged = shutil.copytree(trained_dir, tmp_path / "nan")
    weights = damaged / "model.safetensors"
    with open(weights, "r+b") as stream:
        stream.seek(weights.stat().st_size // 2)
        stream.write(b"\xff" * 4096)
    assert predict(damaged, IMAGES[0], "--no-prompt", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(weights) in line and "NaN or infinite" in line
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_model(damaged)


def test_nan_logits_are_an_error_not_an_empty_mask(trained_dir):
    model, processor = load_model(trained_dir)
    with torch.no_grad():
        model.vision_encoder.neck.conv1.weight.fill_(float("nan"))  # weights damaged after loading
    with pytest.raises(ValueError, match=f"{IMAGES[0].name}: the model's output holds NaN or infinite values"):
        segment(model, str(IMAGES[0]), box=[10, 20, 300, 400], processor=processor)


# ------------------------------------------------------------------------------ foreign or missing model folders


def test_unknown_model_type_with_auto_map_never_prompts_or_runs_its_code(trained_dir, tmp_path, capsys, monkeypatch):
    planted = shutil.copytree(trained_dir, tmp_path / "planted")
    marker = tmp_path / "code-ran"
    (planted / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((planted / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (planted / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked a question"))
    assert predict(planted, IMAGES[0], "--no-prompt", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert "model_type 'evil'" in line and "never runs code" in line and not marker.exists()


def test_an_imedsam_config_with_model_type_sam_is_named(trained_dir, tmp_path, capsys):
    relabelled = shutil.copytree(trained_dir, tmp_path / "relabelled")
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**config, "model_type": "sam"}))
    assert predict(relabelled, IMAGES[0], "--no-prompt", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(relabelled / "config.json") in line and "model_type is 'sam'" in line and "'i_medsam'" in line


def test_a_sam_folder_whose_weights_are_not_sams_is_an_error(trained_dir, tmp_path):
    """transformers would initialise the missing tensors at random; a wrong SAM must not predict."""
    sam = tmp_path / "sam"
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(sam)
    shutil.copy(trained_dir / "model.safetensors", sam / "model.safetensors")  # another model's weights
    with pytest.raises((OSError, ValueError), match=r"sam.*(not a SamModel's|cannot load)"):
        load_model(sam)


def test_a_missing_model_folder_says_so_without_the_hub(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    missing = tmp_path / "run" / "final"
    assert predict(missing, IMAGES[0], "--no-prompt", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert f"`{missing}`: no such model folder" in line
    assert "hub" not in line.lower() and "connect" not in line.lower()


# ----------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(points=[[float("nan"), 40.0]]), r"`input_points`: point \[nan, 40.0\] is not a finite"),
        (dict(points=[[700.0, 40.0]]), r"`input_points`: point \[700.0, 40.0\] lies outside the \d+x\d+ image"),
        (dict(points=[[10.0, 40.0]], labels=[3]), r"`input_labels` are 1 \(foreground\) or 0 \(background\)"),
        (dict(box=[10, float("nan"), 300, 400]), r"`input_boxes`: a box is 4 numbers.*nan"),
    ],
)
def test_nan_and_off_image_prompts_name_the_argument(trained_dir, prompt, message):
    with pytest.raises(ValueError, match=message):
        segment(str(trained_dir), str(IMAGES[0]), **prompt)


# ------------------------------------------------------------------------------------------------------ outputs


def test_same_stems_keep_their_sub_paths_and_clashes_write_nothing(trained_dir, tmp_path, capsys):
    for folder, image in (("a", IMAGES[0]), ("b", IMAGES[1])):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "x.jpg")
    out = tmp_path / "out"
    assert predict(trained_dir, tmp_path / "a", tmp_path / "b", "--no-prompt", "--out", out) == 0
    for folder, image in (("a", IMAGES[0]), ("b", IMAGES[1])):
        assert Image.open(out / folder / "x.png").size == Image.open(image).size
    # x.jpg and x.png would both write x.png: refused before anything is written.
    Image.open(IMAGES[2]).save(tmp_path / "a" / "x.png")
    assert predict(trained_dir, tmp_path / "a", "--no-prompt", "--out", tmp_path / "clash") == 2
    line = error_line(capsys)
    assert "x.jpg and" in line and "x.png would both be written to" in line
    assert not (tmp_path / "clash").exists()


def test_out_in_the_mask_or_input_folder_is_refused_and_ground_truth_kept(trained_dir, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    shutil.copy(IMAGES[0], images)
    truth = shutil.copy(KVASIR / "masks" / f"{IMAGES[0].stem}.png", masks)
    before = Path(truth).read_bytes()
    assert predict(trained_dir, images, "--boxes-from-masks", masks, "--out", masks) == 2
    assert "is the --boxes-from-masks folder" in error_line(capsys)
    assert predict(trained_dir, images, "--no-prompt", "--out", images / "predictions") == 2
    assert "is inside the input folder" in error_line(capsys)
    assert Path(truth).read_bytes() == before and sorted(p.name for p in images.iterdir()) == [IMAGES[0].name]


def test_existing_files_are_kept_unless_overwrite(trained_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [IMAGES[0], "--box", "10,20,300,400", "--overlay", "--out", out]
    assert predict(trained_dir, *argv) == 0
    mask = out / f"{IMAGES[0].stem}.png"
    mask.write_bytes(b"kept")
    assert predict(trained_dir, *argv) == 2
    line = error_line(capsys)
    assert "2 of the files to write already exist" in line and str(mask) in line and "--overwrite" in line
    assert mask.read_bytes() == b"kept"
    assert predict(trained_dir, *argv, "--overwrite") == 0
    assert Image.open(mask).size == Image.open(IMAGES[0]).size
    assert sorted(p.name for p in out.iterdir()) == [mask.name, f"{IMAGES[0].stem}_overlay.png"]  # no temporaries


def test_out_that_is_a_file_or_read_only_is_one_line(trained_dir, tmp_path, capsys):
    a_file = tmp_path / "masks.png"
    a_file.write_bytes(b"")
    assert predict(trained_dir, IMAGES[0], "--no-prompt", "--out", a_file) == 2
    assert error_line(capsys) == f"error: --out {a_file}: is a file, not a folder."
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if writable(read_only):  # root ignores the mode: use a folder the kernel keeps read-only
            read_only = Path("/sys/kernel")
            if not read_only.is_dir() or writable(read_only):
                pytest.skip("no read-only folder available")
        assert predict(trained_dir, IMAGES[0], "--no-prompt", "--out", read_only) == 2
        assert error_line(capsys) == f"error: --out {read_only}: cannot write into it (Permission denied)."
    finally:
        (tmp_path / "read-only").chmod(0o755)


def test_a_file_that_cannot_be_written_is_reported_and_the_batch_goes_on(trained_dir, tmp_path, capsys):
    out = tmp_path / "out"
    blocked = out / f"{IMAGES[0].stem}.png"
    (blocked / "something").mkdir(parents=True)  # a non-empty folder where the first mask goes
    code = predict(trained_dir, IMAGES[0], IMAGES[1], "--no-prompt", "--out", out, "--overwrite")
    assert code == 1
    captured = capsys.readouterr()
    assert f"{IMAGES[0]}: cannot write" in captured.err and "1 of 2 images segmented" in captured.out
    assert (out / f"{IMAGES[1].stem}.png").is_file()


# ------------------------------------------------------------------------------------- untrained implicit decoders


def test_a_converted_model_uses_sams_mask_and_warns_once(tmp_path):
    sam = tmp_path / "sam"
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(sam)
    convert_checkpoint(str(sam), tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["implicit_decoder_trained"] is False
    model, processor = load_model(tmp_path / "converted")
    sam_only, _ = load_model(tmp_path / "converted", config_overrides={"use_implicit_decoder": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        results = [segment(model, str(image), box=[10, 20, 300, 400], processor=processor) for image in IMAGES[:2]]
    assert [str(w.message).count("never trained") for w in caught] == [1]  # once for the model, not per image
    reference = segment(sam_only, str(IMAGES[1]), box=[10, 20, 300, 400], processor=processor)
    assert results[1].mask_source == "sam" and reference.mask_source == "sam"
    np.testing.assert_array_equal(results[1].probabilities, reference.probabilities)


def test_trained_flag_from_training_and_for_old_configs(tmp_path):
    base = tiny_model(implicit_decoder_trained=False)
    peft_model = get_peft_model(base, imedsam_peft_config(base.config))
    assert not implicit_decoder_trained(peft_model)
    assert save_pretrained_full(peft_model, tmp_path / "untouched").config.implicit_decoder_trained is False
    randomize_adapters(peft_model)  # as training moves the decoder's trainable copy
    assert implicit_decoder_trained(peft_model)
    save_pretrained_full(peft_model, tmp_path / "final", processor=IMedSamProcessor(image_size=64))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["implicit_decoder_trained"] is True
    assert segment(str(tmp_path / "final"), str(IMAGES[0])).mask_source == "implicit_decoder"
    # Configs written before the field: a published checkpoint (adapter_config set) stays trained, a plain one not.
    del config["implicit_decoder_trained"]
    (tmp_path / "final" / "config.json").write_text(json.dumps(config))
    assert implicit_decoder_trained(load_model(tmp_path / "final")[0])
    plain = save_tiny(tmp_path / "plain")
    assert not implicit_decoder_trained(load_model(plain)[0])


def test_an_untrained_multi_class_decoder_is_refused(tmp_path):
    model = tiny_model(query_mode="adaptive", num_classes=3, implicit_decoder_trained=False)
    with pytest.raises(ValueError, match="never trained.*num_classes=3"):
        segment(model, str(IMAGES[0]), box=[10, 20, 300, 400])


# ------------------------------------------------------------------------------------------------ output budget


def test_output_grids_over_the_budget_are_predicted_bounded_and_resized(trained_dir, capsys, tmp_path):
    model, processor = load_model(trained_dir)
    box = [10, 20, 300, 400]
    big = segment(
        model, str(IMAGES[0]), box=box, output_size=(3000, 4000), processor=processor, max_output_pixels=30000
    )
    assert big.mask.shape == (3000, 4000) and big.grid == (150, 200) and big.probabilities.shape == (1, 150, 200)
    bounded = segment(model, str(IMAGES[0]), box=box, output_size=(150, 200), processor=processor)
    np.testing.assert_array_equal(big.mask, resize_labels(bounded.mask, (3000, 4000)))
    for budget in (0, -1, 2.5):
        with pytest.raises(ValueError, match="`max_output_pixels` must be a whole number of pixels >= 1"):
            segment(model, str(IMAGES[0]), box=box, processor=processor, max_output_pixels=budget)
    for budget in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            predict(trained_dir, IMAGES[0], "--no-prompt", "--out", tmp_path / "o", "--max-output-pixels", budget)
        assert exit_info.value.code == 2
        assert f"--max-output-pixels: '{budget}': expected a whole number of pixels >= 1" in capsys.readouterr().err
