"""The newcomer's path: what a model is records itself and is read back, short training runs that say where their
model is, one vocabulary, exit codes before any model loads; fine-tuning a trained model keeps its backbone frozen.

Each test failed on the code before these fixes (the issue's numbered items in the docstrings)."""

from __future__ import annotations

import json
import shutil
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, tiny_model
from PIL import Image
from test_training import args, organ_folder, train_script

import imedsam_hf
from imedsam_hf import IMedSamProcessor
from imedsam_hf.cli import main as cli_main
from imedsam_hf.inference import PROMPT_COLOUR, class_colour

slow = pytest.mark.slow
BTCV = SHARED_DATA / "BTCV-Synapse-CT"


def organs_with_names(root):
    folder = organ_folder(root)
    (folder / "classes.json").write_text(json.dumps({"classes": {"1": "left organ", "2": "right organ"}}))
    return folder


@slow
def test_a_class_aware_model_is_scored_class_aware_without_the_flag(tiny_sam, tmp_path, capsys, caplog):
    """Item 1: training records `class_aware`; `imedsam evaluate` reads it (no silent 0.000 without --class-aware)."""
    data = organs_with_names(tmp_path / "organs")
    out = tmp_path / "run"
    extra = ("--class-prompts", "true", "--all-classes-per-sample", "true", "--mask-classes", "2", "--num-classes", "2")
    train_script.main(args(tiny_sam, data, out, *extra, "--epochs", "1", "--baseline", "false", "--window", "abdomen"))
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["training_data"]["window"] == [40.0, 400.0]  # raw HU volumes get it (test_volumes)
    assert (
        "- Volumes: a CT scan in Hounsfield units is windowed with level 40, width 400 (-160..240 HU)"
        in (out / "final" / "README.md").read_text()
    )
    assert config["class_aware"] is True and config["id2label"]["1"] == "left organ"
    assert config["training_data"]["source"] == "organs" and config["training_data"]["num_pairs"] == 5
    assert config["training_data"]["prompts"] == ["box"]  # box-trained: LiteMedSAM-like backbones warn on clicks
    argv = ["evaluate", "--model", str(out / "final"), "--data-dir", str(data), "--output-sizes", "48"]
    assert cli_main([*argv, "--json", str(tmp_path / "default.json")]) == 0
    default = json.loads((tmp_path / "default.json").read_text())
    assert default["class_aware"] is True and set(default["results"]["48"]["per_class"]) == {"1", "2"}
    assert cli_main([*argv, "--class-agnostic", "--json", str(tmp_path / "agnostic.json")]) == 0
    assert json.loads((tmp_path / "agnostic.json").read_text())["class_aware"] is False
    # Fine-tuned again on slices that record no window: the new model would record none and min-max raw CT, so the
    # run says which window its base was trained with and how to pass it.
    again = [*args(tiny_sam, data, tmp_path / "again", *extra, "--epochs", "1", "--baseline", "false")]
    again[again.index("--backbone") + 1] = str(out / "final")
    caplog.clear()
    train_script.main(again)
    assert "trained on slices windowed at level 40, width 400 (-160..240 HU)" in caplog.text
    assert "pass --window 40,400" in caplog.text
    assert "window" not in json.loads((tmp_path / "again" / "final" / "config.json").read_text())["training_data"]


@slow
def test_a_recipe_for_other_data_is_refused_not_carded(tiny_sam, tmp_path):
    """Item 2: 13 heads for a folder with 2 classes, or BTCV's name and licence on another folder, are errors naming
    both, unless given on the command line; the card's facts come from the run."""
    data = organs_with_names(tmp_path / "organs")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {num_classes: 13}\n"
        "data: {class_prompts: true, all_classes_per_sample: true, mask_classes: 13, name: BTCV, license: Synapse,"
        " window: btcv, provenance_for: BTCV-Synapse-CT}\n"
        "training: {epochs: 10}\n"
    )
    base = [*args(tiny_sam, data, tmp_path / "a"), "--config", str(recipe)]
    with pytest.raises(SystemExit, match=r"13 class heads .*classes.json lists 2 classes"):
        train_script.main(base)
    with pytest.raises(SystemExit, match=r"describe the folder 'BTCV-Synapse-CT', not --data-dir .*organs"):
        train_script.main([*base, "--num-classes", "2", "--mask-classes", "2"])
    out = tmp_path / "b"
    # 3 heads given on the command line for 2 classes: kept, and class 3 (in no training image) is carded as untrained
    own = ["--num-classes", "3", "--mask-classes", "3", "--name", "Two organs", "--license", "CC0", "--citation", "-"]
    results = train_script.main(
        [*args(tiny_sam, data, out), "--config", str(recipe), *own, "--max-train-steps", "2", "--baseline", "false"]
    )
    card = (out / "final" / "README.md").read_text()
    assert "Two organs" in card and "CC0" in card and "BTCV" not in card and "Synapse" not in card
    recorded = json.loads((out / "final" / "config.json").read_text())["training_data"]
    assert recorded["untrained_classes"] == [3] and "window" not in recorded  # BTCV's window is not this folder's
    assert "**Not trained for**: 3" in card
    assert results["training"]["steps"] == 2 and "2 optimizer steps" in card and "10 epochs" not in card


def test_training_records_the_window_its_images_were_made_with(tmp_path):
    """`training_data["window"]`: --window on the command line, else the folder's cases.csv (`imedsam convert volumes
    --window` writes it), else the recipe's when the recipe describes this folder; several windows in one folder and
    a window that is none are errors naming them."""
    data_window = train_script.data_window
    folder = tmp_path / "ct"
    folder.mkdir()
    recipe = types.SimpleNamespace(window="btcv", data_dir=str(folder), provenance_for="BTCV-Synapse-CT")
    assert data_window(recipe, "BTCV-Synapse-CT", frozenset()) == [75.0, 400.0]
    assert data_window(recipe, "ct", frozenset()) is None  # BTCV's window does not describe this folder
    (folder / "cases.csv").write_text('case,spacing_mm,window\na,1x1x1,"40,400"\nb,1x1x1,"40,400"\n')
    assert data_window(recipe, "ct", frozenset()) == [40.0, 400.0]  # the folder's own record
    assert data_window(types.SimpleNamespace(window="MR", data_dir=None), "ct", frozenset({"window"})) == "mr"
    (folder / "cases.csv").write_text('case,spacing_mm,window\na,1x1x1,"40,400"\nb,1x1x1,mr\n')
    with pytest.raises(
        SystemExit, match=r"ct/cases.csv: its scans were converted with different windows \(40,400, mr\)"
    ):
        data_window(recipe, "ct", frozenset())
    with pytest.raises(SystemExit, match=r"--window: window 'wide': give 'level,width' in HU"):
        train_script.parse_args(["--window", "wide"])


def class_id_slice(tmp_path):
    """One BTCV slice and its class-id mask in a folder laid out like BTCV (classes.json beside masks/)."""
    stem = "case0039_slice068"
    for sub in ("images", "masks"):
        (tmp_path / "ct" / sub).mkdir(parents=True)
        shutil.copy(BTCV / sub / f"{stem}.png", tmp_path / "ct" / sub / f"{stem}.png")
    shutil.copy(BTCV / "classes.json", tmp_path / "ct" / "classes.json")
    return tmp_path / "ct", stem


@pytest.mark.skipif(not BTCV.is_dir(), reason="shared data missing")
def test_predict_segments_every_structure_of_2d_class_id_masks(tmp_path):
    """Item 3: `imedsam predict slice.png --boxes-from-masks masks/` with class-id masks writes a class-id mask, for
    a class-aware and for a binary model."""
    folder, stem = class_id_slice(tmp_path)
    truth = np.asarray(Image.open(folder / "masks" / f"{stem}.png"))
    for name, model in (
        ("aware", tiny_model(num_classes=13, class_aware=True, implicit_decoder_trained=True)),
        ("binary", tiny_model(implicit_decoder_trained=True)),
    ):
        model.save_pretrained(tmp_path / name)
        IMedSamProcessor(image_size=64).save_pretrained(tmp_path / name)
        argv = ["predict", "--model", str(tmp_path / name), str(folder / "images" / f"{stem}.png")]
        out = tmp_path / f"out-{name}"
        code = cli_main([*argv, "--boxes-from-masks", str(folder / "masks"), "--out", str(out), "--overlay"])
        assert code == 0, name
        written = np.asarray(Image.open(out / f"{stem}.png"))
        assert written.shape == truth.shape and written.dtype == np.uint8
        assert set(np.unique(written)) - {0} <= set(np.unique(truth)) - {0} and written.max() > 0
        # The overlay tints each structure in its own colour: the label map drawn again, one colour per class.
        shown = np.asarray(Image.open(out / f"{stem}_overlay.png")).astype(float)
        expected = np.asarray(Image.open(folder / "images" / f"{stem}.png").convert("RGB")).astype(float)
        for class_id in set(np.unique(written)) - {0}:
            tinted = (written == class_id) & ~(shown == PROMPT_COLOUR).all(axis=-1)  # not under a box's line
            colour = 0.55 * expected[tinted] + 0.45 * np.array(class_colour(class_id))
            np.testing.assert_allclose(shown[tinted], colour, atol=1)
    # A binary model on a folder without classes.json: --mask-classes says the masks hold class ids.
    (folder / "classes.json").unlink()
    code = cli_main(
        [*argv, "--boxes-from-masks", str(folder / "masks"), "--mask-classes", "13", "--out", str(tmp_path / "o3")]
    )
    assert code == 0 and np.asarray(Image.open(tmp_path / "o3" / f"{stem}.png")).max() > 1


@slow
def test_a_short_run_skips_or_bounds_validation_and_says_where_its_model_is(tiny_sam, polyps, tmp_path, capsys):
    """Items 4 and 5: no validation and no final evaluation on request; the last lines name the model folder."""
    out = tmp_path / "run"
    results = train_script.main(
        args(tiny_sam, polyps, out, "--max-train-steps", "2", "--eval-every-epochs", "0", "--final-evaluation", "false")
    )
    printed = capsys.readouterr().out
    assert "results" not in results and (out / "final" / "model.safetensors").is_file()
    assert f"model written to {out / 'final'}" in printed and f"imedsam predict --model {out / 'final'}" in printed
    assert "validation Dice" not in printed
    bounded = train_script.main(args(tiny_sam, polyps, tmp_path / "b", "--epochs", "1", "--max-eval-samples", "1",
                                     "--max-test-samples", "1", "--baseline", "false"))  # fmt: skip
    assert bounded["n_images"] == 1 and "(1 samples)" in capsys.readouterr().out
    # The run's folder instead of its final/ is named with the way out.
    code = cli_main(["predict", "--model", str(out), str(next((polyps / "images").iterdir())), "--no-prompt",
                     "--out", str(tmp_path / "p")])  # fmt: skip
    assert code == 2 and f"its model is `{out / 'final'}`" in capsys.readouterr().err


def test_one_vocabulary_and_units(tmp_path, capsys):
    """Item 6: dashes, `--output-size` height first like Python's `output_size`, units on printed metrics,
    SamProcessor's (batch, boxes, 4) prompt nesting."""
    from imedsam_hf.commands.common import parse_output_size
    from imedsam_hf.evaluation import summary_lines

    assert parse_output_size("64x96") == (64, 96)
    result = {"results": {"native": {"n": 1, "dice": 0.9, "dice_std": 0.0, "iou": 0.8, "hd95": 3.0, "hd": 4.0}}}
    assert summary_lines(result)[0].endswith("HD95 3.00 px  HD 4.00 px")  # a report from before NSD: none printed
    result["results"]["native"]["nsd"] = 0.75
    assert summary_lines(result)[0].endswith("HD95 3.00 px  HD 4.00 px  NSD 0.7500")
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--model", "m", "--data-dir", "d", "--json", "j", "--num-classes", "13"])
    assert "--mask-classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--data-dir" in text and "--data_dir" not in text


def test_predict_checks_what_needs_no_model_before_loading_one(tmp_path, capsys, monkeypatch):
    """Item 7: no prompt, a missing input, a bad boxes file: exit 2 before the model is loaded, one message."""
    import imedsam_hf.commands.predict as predict

    monkeypatch.setattr(predict, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    image = str(next((SHARED_DATA / "Kvasir-SEG-sample" / "images").iterdir()))
    out = str(tmp_path / "out")
    assert cli_main(["predict", "--model", "litemedsam", image, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("error: give a prompt") == 1 and not (tmp_path / "out").exists()
    assert cli_main(["predict", "--model", "litemedsam", str(tmp_path / "nope.png"), "--no-prompt", "--out", out]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err
    (tmp_path / "boxes.json").write_text("[[1, 2, 3, 4]]")
    assert (
        cli_main(["predict", "--model", "litemedsam", image, "--boxes", str(tmp_path / "boxes.json"), "--out", out])
        == 2
    )
    assert "expected a JSON object" in capsys.readouterr().err


def test_peft_runs_no_dependency_warning():
    """Item 10: wrapping a model in the adapter prints no FutureWarning (fixed where peft reads the old name)."""
    from peft import get_peft_model

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config))


@slow
def test_three_valued_masks_train_and_write_their_evaluation(tiny_sam, polyps, tmp_path):
    """One evaluation protocol: masks stored as 0/38/75 with --mask-values 38:1,75:1 train, and the final evaluation
    (train.py's, built like imedsam evaluate's) reads them the same way and writes eval_results.json."""
    for path in sorted((polyps / "masks").iterdir()):
        values = np.asarray(Image.open(path).convert("L")) > 127
        three = np.where(values, 38, 0).astype(np.uint8)
        three[: three.shape[0] // 2][values[: three.shape[0] // 2]] = 75
        path.unlink()
        Image.fromarray(three).save(path.with_suffix(".png"))
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, polyps, out, "--epochs", "1", "--mask-values", "38:1,75:1"))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["n_images"] == 1 and saved["results"]["48"]["n"] == 1 and "baseline_sam" in saved
    assert results["results"] == saved["results"]


@slow
def test_fine_tuning_a_trained_model_trains_only_its_adapters_and_heads(tiny_sam, polyps, tmp_path, capsys):
    """Issue 'damaged scans...', item 1: `--backbone <a trained final/>` trains exactly what the first fine-tune
    trained, keeps its settings, and the backbone does not move in a step."""
    first = tmp_path / "first"
    train_script.main(args(tiny_sam, polyps, first, "--epochs", "1", "--baseline", "false", "--refine-ratio", "0.3"))
    first_count = int(capsys.readouterr().out.split("trainable parameters: ")[1].split(" of")[0].replace(",", ""))
    model, _, published = train_script.build_model(train_script.parse_args(["--backbone", str(first / "final")]).model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert published and trainable == first_count and model.get_base_model().config.refine_ratio == 0.3
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".vision_encoder." in n for n in frozen) and not any(
        ".vision_encoder." in n and "freq_" not in n for n, p in model.named_parameters() if p.requires_grad
    )
    second = tmp_path / "second"
    train_script.main(
        ["--backbone", str(first / "final"), "--data-dir", str(polyps), "--output-dir", str(second), "--epochs", "1",
         "--batch-size", "1", "--output-sizes", "48", "--report-to", "none", "--baseline", "false"]
    )  # fmt: skip
    assert f"trainable parameters: {first_count:,}" in capsys.readouterr().out
    after = imedsam_hf.load_model(second / "final")[0].state_dict()
    before = imedsam_hf.load_model(first / "final")[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(not k.startswith("vision_encoder.") or ".freq_" in k for k in moved)
    assert not any(k.startswith("mask_decoder.transformer.") for k in moved)
    with pytest.raises(SystemExit, match="keeps its architecture"):
        train_script.build_model(
            train_script.parse_args(["--backbone", str(first / "final"), "--num-classes", "3"]).model
        )
    with pytest.raises(SystemExit, match="adapter stays as trained"):
        train_script.build_model(
            train_script.parse_args(["--backbone", str(first / "final"), "--peft-overrides", '{"lora_rank": 8}']).model
        )
