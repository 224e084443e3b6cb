"""training/train.py: its options (typed dataclasses, YAML, precedence, trackers), a short real run, exact
resumption, fine-tuning a checkpoint, sampled-point training, DDP on two CPU processes, bad files, Hub push."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, SHARED_DATA, btcv_dataset, load_script, tiny_model
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, SamModel

import imedsam_hf  # noqa: F401
import imedsam_hf.training as recipe
from imedsam_hf.loading import load_model

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")

train_script = load_script("training/train.py", "imedsam_train")
slow = pytest.mark.slow  # a real training run (seconds to a minute on 2 CPU cores)

SMALL_IMPLICIT = {"coarse_hidden_sizes": [64, 32], "coarse_feature_size": 16, "fine_hidden_sizes": [32, 16]}


def args(tiny_sam, data_dir, output_dir, *extra):
    return [
        "--backbone", str(tiny_sam), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--config_overrides", json.dumps(SMALL_IMPLICIT), "--batch_size", "1", "--epochs", "2",
        "--split_fractions", "0.6", "0.2", "0.2", "--output_sizes", "48", "--report_to", "none", *extra,
    ]  # fmt: skip


@slow
def test_short_real_run_writes_the_publishing_form_and_a_card(tiny_sam, polyps, tmp_path):
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, polyps, out, "--hub_token", "hf_secret_token"))
    final = out / "final"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "splits.json"):
        assert (final / name).is_file(), name
    assert (final / "adapter" / "adapter_config.json").is_file() and not (final / "adapter_config.json").exists()
    splits = json.loads((out / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [3, 1, 1]
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["n_images"] == 1
    for key in ("results", "baseline_sam"):
        assert set(saved[key]["48"]) >= {"dice", "dice_std", "iou", "hd95", "hd", "nsd"}
    assert results["best_val_dice"] >= 0
    card = (final / "README.md").read_text()
    metadata = card.split("---")[1]  # the YAML front matter
    # No --name: the dataset is named after the data folder (here the copy "polyps"), not a guess such as "Kvasir".
    assert "model-index" in metadata and "polyps" in metadata and "Kvasir" not in metadata
    assert "| I-MedSAM | 48 |" in card and "zero-shot backbone" in card
    row = next(line for line in card.splitlines() if line.startswith("| I-MedSAM | 48 |"))
    assert "| HD | NSD |" in card and row.endswith(f"| {saved['results']['48']['nsd']:.4f} |")
    assert "type: nsd" in metadata  # the model-index lists it beside Dice, IoU and HD95
    assert "- Prompts: ground-truth boxes, jittered by up to 10% of the box size per side in training; exact at" in card
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in log) and any("fine_loss" in r for r in log)
    # config.yaml: the resolved options, the effective precision, never the token; it loads as a --config again.
    resolved = (out / "config.yaml").read_text()
    assert "hf_secret_token" not in resolved and yaml.safe_load(resolved)["hub"]["hub_token"] is None
    assert yaml.safe_load(resolved)["training"]["mixed_precision"] == "no" == saved["mixed_precision"]
    assert train_script.parse_args(["--config", str(out / "config.yaml")]).training.output_dir == str(out)
    # The trained folder evaluates on its own test split (splits.json saved beside it, metadata included).
    evaluate_script = load_script("training/evaluate.py", "imedsam_evaluate")
    # The model records its backbone by a portable name ("tiny-sam"); here the local copy is passed explicitly.
    assert json.loads((final / "config.json").read_text())["base_model"] == "tiny-sam"
    code = evaluate_script.main(
        ["--model", str(final), "--data-dir", str(polyps), "--output-sizes", "48", "--json", str(tmp_path / "e.json"),
         "--baseline", "--baseline-model", str(tiny_sam)]
    )  # fmt: skip
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and evaluated["n_images"] == 1 and evaluated["split"] == "test"
    # The baseline is the recorded backbone (the tiny SAM), the same numbers the run itself computed.
    assert evaluated["baseline_sam"]["48"]["dice"] == pytest.approx(saved["baseline_sam"]["48"]["dice"], abs=1e-6)
    model = AutoModel.from_pretrained(final).eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0]]))
    assert outputs.logits.shape == (1, 1, 64, 64)


@slow
def test_time_budget_then_finish_elsewhere_from_the_best_weights(tiny_sam, polyps, tmp_path, monkeypatch):
    """--max_train_minutes stops, validates and finishes; --finish_only rebuilds final/ from best/ elsewhere."""
    out = tmp_path / "run"
    clock = iter(range(0, 10**6, 40))  # every reading of the clock is 40 s later: the 1-minute budget ends at step 1
    monkeypatch.setattr(train_script, "clock", lambda: float(next(clock)))
    released = ("--loss_composition", "released", "--coordinate_annealing_epochs", "4")  # the released recipe
    released += ("--max_clicks", "2", "--click_probability", "0.5")  # and click-prompted steps
    results = train_script.main(
        args(tiny_sam, polyps, out, "--epochs", "5", "--max_train_minutes", "1", "--baseline", "false", *released)
    )
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["coordinate_fraction"] for r in log if "loss" in r] == [0.25, 0.25]
    assert max(r["step"] for r in log) == results["best_step"] == 2 and (out / "final" / "model.safetensors").is_file()
    prompts = lambda: json.loads((out / "final" / "config.json").read_text())["training_data"]["prompts"]  # noqa: E731
    assert prompts() == ["box", "points"]  # click-prompted steps: the model has learned clicks (`learned_clicks`)
    monkeypatch.undo()
    # The run's folder moved to another machine: no final/, no checkpoints; its config.yaml says how it was trained.
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints")
    trained = (out / "config.yaml").read_text()
    finished = train_script.main(args(tiny_sam, polyps, out, "--finish_only", "--baseline", "false"))
    assert (out / "config.yaml").read_text() == trained  # kept, not replaced by the finishing call's options
    assert finished["best_step"] == 2 and finished["results"]["48"]["dice"] == pytest.approx(
        results["results"]["48"]["dice"]
    )
    assert not (out / "checkpoints").exists()  # nothing trained
    assert prompts() == ["box", "points"]  # what the run trained, not what the finishing call says
    card = (out / "final" / "README.md").read_text()
    assert "; 50% of the training steps prompted with 1 to 2 positive clicks instead of boxes; exact at" in card
    from imedsam_hf.model_card import training_prompts

    assert training_prompts({"prompt": "none", "box_jitter": 0.1}) == "none: trained and evaluated prompt-free"
    # Weights of another model are refused by name, before anything is written.
    with pytest.raises(SystemExit, match="does not fit this model"):
        train_script.main(args(tiny_sam, polyps, out, "--finish_only", "--use_frequency_adapter", "false"))
    with pytest.raises(SystemExit, match="best/trainable.safetensors not found"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "empty", "--finish_only"))
    with pytest.raises(SystemExit):
        train_script.parse_args(["--max_train_minutes", "0"])
    with pytest.raises(SystemExit, match="--box-jitter-probability 1.5: a probability in"):
        train_script.parse_args(["--box-jitter-probability", "1.5"])
    with pytest.raises(SystemExit, match="--max-clicks"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "clicks", "--click_probability", "0.5"))
    with pytest.raises(SystemExit, match="--rescale-intercept -32768 reads the pictures as HU: give the CT --window"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "hu", "--rescale_intercept", "-32768"))


@slow
def test_selection_by_exact_and_jittered_validation_boxes_is_imedsam_evaluates(tiny_sam, polyps, tmp_path, monkeypatch):
    """--selection-box-jitter: each validation scores the validation images as `imedsam evaluate` does, with exact
    and with jittered boxes (here the mean of two draws, --selection-jitter-draws); the best mean is the model kept, and
    the CLI gives the selected model the same numbers."""
    from imedsam_hf.cli import main as cli

    protocols = []  # (box jitter, jitter seed, draws, output sizes) of each evaluation train.py runs
    evaluate_model = train_script.evaluate_model

    def spy(model, processor, pairs, protocol, **kwargs):
        sizes = tuple(map(str, protocol.output_sizes))
        protocols.append((protocol.box_jitter, protocol.jitter_seed, protocol.jitter_draws, sizes))
        return evaluate_model(model, processor, pairs, protocol, **kwargs)

    monkeypatch.setattr(train_script, "evaluate_model", spy)
    out = tmp_path / "run"
    extra = ("--selection_box_jitter", "0.2", "--selection_jitter_draws", "2", "--baseline", "false")
    extra += ("--split_fractions", "0.4", "0.4", "0.2")
    results = train_script.main(args(tiny_sam, polyps, out, *extra))
    # two validations of two protocols each (the tiny model barely reads its box), then the test split's
    assert protocols == [(0.0, 0, 1, ("native",)), (0.2, 0, 2, ("native",))] * 2 + [(0.0, 0, 1, ("48",))]
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    validations = [r for r in log if "val_dice" in r]
    assert len(validations) == 2
    for r in validations:
        assert r["val_dice"] == pytest.approx((r["val_dice_exact"] + r["val_dice_jittered"]) / 2)
    best = max(validations, key=lambda r: r["val_dice"])
    assert results["best_val_dice"] == pytest.approx(best["val_dice"]) and results["best_step"] == best["step"]
    measured = {}
    for name, jitter in (
        ("exact", []),
        ("jittered", ["--box-jitter", "0.2", "--jitter-seed", "0", "--jitter-draws", "2"]),
    ):
        report = tmp_path / f"{name}.json"
        command = ["evaluate", "--model", str(out / "final"), "--data-dir", str(polyps), "--split", "validation"]
        command += ["--split-file", str(out / "splits.json"), "--output-sizes", "native", "--json", str(report)]
        assert cli([*command, *jitter]) == 0
        measured[name] = json.loads(report.read_text())["results"]["native"]["dice"]
    assert measured["exact"] == pytest.approx(best["val_dice_exact"], abs=1e-4)
    assert measured["jittered"] == pytest.approx(best["val_dice_jittered"], abs=1e-4)
    card = (out / "final" / "README.md").read_text()
    assert "best mean validation Dice with exact boxes and with every box side moved by up to 20%" in card
    assert "the mean of 2 draws of the jittered boxes" in card


def test_validation_subsets_are_evenly_spaced():
    """--max-eval-samples: the validation loader's samples and --selection-box-jitter's images, one rule for both."""
    assert train_script.evenly_spaced(5, None) == [0, 1, 2, 3, 4] == train_script.evenly_spaced(5, 8)
    assert train_script.evenly_spaced(300, 4) == [0, 100, 199, 299]
    assert train_script.evenly_spaced(28, 1) == [0]


@slow
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_sam, polyps, tmp_path, capsys):
    common = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "10", "--baseline", "false"]
    full = tmp_path / "full"
    train_script.main(args(tiny_sam, polyps, full, *common))
    interrupted = tmp_path / "interrupted"
    stopped = train_script.main(args(tiny_sam, polyps, interrupted, *common, "--stop_after_steps", "4"))
    assert stopped == {"stopped_at_step": 4}  # mid-way through epoch 2 (3 batches an epoch)
    # The newest checkpoint was damaged (a truncated optimizer file): it is named and skipped, never half-loaded.
    optimizer = interrupted / "checkpoints" / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(SystemExit, match="optimizer.bin has 100 bytes"):
        train_script.main(
            args(tiny_sam, polyps, interrupted, *common, "--resume_from_checkpoint", str(optimizer.parent))
        )
    (interrupted / "checkpoints" / "checkpoint-3" / "random_states_0.pkl").unlink()  # and the one before lost its RNG
    train_script.main(args(tiny_sam, polyps, interrupted, *common, "--resume_from_checkpoint", "latest"))
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and "optimizer.bin has 100 bytes" in printed
    assert "random_states_0.pkl is missing" in printed and "resumed from" in printed and "checkpoint-2" in printed
    a = load_file(full / "checkpoints" / "checkpoint-6" / "trainable_0.safetensors")
    b = load_file(interrupted / "checkpoints" / "checkpoint-6" / "trainable_0.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    # Checkpoints hold the trainable weights only, not the backbone.
    assert not any("vision_encoder.layers.0.attn.qkv.base_layer" in k for k in a)


@slow
def test_bad_files_are_reported_by_path_and_skipped(tiny_sam, polyps, tmp_path):
    images = sorted((polyps / "images").iterdir())
    images[0].write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(polyps / "masks" / f"{images[1].stem}.png")
    out = tmp_path / "run"
    train_script.main(args(tiny_sam, polyps, out, "--epochs", "1", "--baseline", "false"))
    problems = (out / "data_problems.txt").read_text()
    assert images[0].name in problems and f"{images[1].stem}.png" in problems
    with pytest.raises(SystemExit, match="unusable"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "strict", "--on_error", "fail"))


@slow
def test_empty_and_encoded_masks_in_training(tiny_sam, polyps, tmp_path):
    """An empty mask makes no sample and is listed; 0/38 masks train with --mask_values; a bad mapping is named."""
    masks = sorted((polyps / "masks").iterdir())
    Image.fromarray(np.zeros_like(np.asarray(Image.open(masks[0]).convert("L")))).save(masks[0])
    for path in masks[1:]:  # 0/255 JPEG-noisy masks re-encoded as 0/38 PNGs (same stems)
        values = np.asarray(Image.open(path).convert("L")) > 127
        path.unlink()
        Image.fromarray((values * 38).astype(np.uint8)).save(path.with_suffix(".png"))
    out = tmp_path / "run"
    split = {"train": [m.stem for m in masks[:3]], "validation": [masks[3].stem], "test": [masks[4].stem]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    common = ["--epochs", "1", "--baseline", "false", "--split_file", str(tmp_path / "split.json")]
    train_script.main(args(tiny_sam, polyps, out, *common, "--mask_values", "38:1"))
    problems = (out / "data_problems.txt").read_text()
    assert f"{masks[0].stem}: empty mask" in problems
    with pytest.raises(SystemExit, match="--mask-values 'x'"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "bad", *common, "--mask_values", "x"))


def test_train_tunes_the_cpu_allocator_unless_told_not_to(tiny_sam, polyps, tmp_path, allocator_calls, capsys):
    (sorted((polyps / "images").iterdir())[0]).write_bytes(b"not an image")
    for mode, expected in (("keep", [1]), ("default", [1])):
        with pytest.raises(SystemExit, match="unusable"):
            train_script.main(args(tiny_sam, polyps, tmp_path / mode, "--on_error", "fail", "--cpu_allocator", mode))
        assert allocator_calls == expected, mode
    with pytest.raises(SystemExit):
        train_script.parse_args(["--cpu-allocator", "jemalloc"])
    assert "--cpu-allocator: invalid choice: 'jemalloc'" in capsys.readouterr().err


def test_bad_options_are_named(tiny_sam, polyps, tmp_path):
    with pytest.raises(SystemExit, match="no_such_key"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "x", "--no_such_key", "1"))
    with pytest.raises(SystemExit, match="--data-dir"):
        train_script.main(args(tiny_sam, tmp_path / "missing", tmp_path / "x"))
    with pytest.raises(SystemExit, match="--hub-model-id"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "x", "--push_to_hub"))
    with pytest.raises(SystemExit, match="--neighbour-box-probability 2.0: a probability"):
        train_script.parse_args(["--neighbour-box-probability", "2"])
    with pytest.raises(SystemExit, match="--embedding-cache-dir keeps a frozen encoder's embeddings: add --freeze-"):
        train_script.parse_args(["--embedding-cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--embedding-cache-dir .*: augmented images differ at every step"):
        train_script.parse_args(["--freeze-image-encoder", "--embedding-cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--neighbour-box-distance 0"):
        train_script.parse_args(["--neighbour-box-distance", "0"])
    with pytest.raises(SystemExit, match="--neighbour-box-jitter 1.5: a fraction of the box's size in .0, 1.."):
        train_script.parse_args(["--neighbour-box-jitter", "1.5"])
    with pytest.raises(SystemExit, match="--extent-box-probability 0.6: a probability in .0, 1. that, with "):
        train_script.parse_args(["--neighbour-box-probability", "0.5", "--extent-box-probability", "0.6"])
    with pytest.raises(SystemExit, match="--propagated-box-probability 0.5: a probability in .0, 1. that, with "):
        train_script.parse_args(["--extent-box-probability", "0.6", "--propagated-box-probability", "0.5"])
    with pytest.raises(SystemExit, match="--propagated-box-probability and --propagated-boxes go together"):
        train_script.parse_args(["--propagated-box-probability", "0.5"])
    # Propagated boxes: a file that is not one, or written for other data, named before training.
    (tmp_path / "boxes.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"case0001_slice001": {"1": [[0, 0, 4, 4]]}}')
    for name, message in (("missing.json", "not a JSON file of"), ("boxes.json", "not a JSON file of"),
                          ("other.json", "none of its 1 stems is a training stem")):  # fmt: skip
        extra = ("--propagated_box_probability", "0.5", "--propagated_boxes", str(tmp_path / name))
        with pytest.raises(SystemExit, match=f"--propagated-boxes .*{name}: {message}"):
            train_script.main(args(tiny_sam, polyps, tmp_path / "x", *extra))
    with pytest.raises(SystemExit, match="--selection-box-jitter 1.0: a fraction of the box's size in .0, 1."):
        train_script.parse_args(["--selection-box-jitter", "1"])
    with pytest.raises(SystemExit, match="--selection-jitter-draws 3 draws the boxes of --selection-box-jitter again"):
        train_script.parse_args(["--selection-jitter-draws", "3"])
    with pytest.raises(SystemExit, match="--selection-jitter-draws 0: at least 1 draw"):
        train_script.parse_args(["--selection-box-jitter", "0.1", "--selection-jitter-draws", "0"])
    with pytest.raises(SystemExit, match="--selection-box-jitter 0.1 moves box prompts; with --prompt none"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "x", "--selection_box_jitter", "0.1", "--prompt", "none"))
    # Neighbour or extent boxes on photos (no slice numbers in the stems): named, before training.
    for option in ("neighbour", "extent"):
        with pytest.raises(SystemExit, match=f"--{option}-box-probability: neighbour and extent boxes take the slices"):
            train_script.main(args(tiny_sam, polyps, tmp_path / "x", f"--{option}_box_probability", "0.5"))


def option_help(text: str, name: str) -> str:
    """The `--help` entry of `--name` (argparse wraps entries over lines), whitespace collapsed."""
    entries = re.split(r"\n\s+(?=--)", text)
    entry = next(e for e in entries if re.match(rf"--{name.replace('_', '-')}[ ,]", e))
    return " ".join(entry.split("\n\n")[0].split())  # up to the next group's title


def test_help_lists_every_option_with_its_type_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section, arguments in train_script.SECTIONS.items():
        assert f"\n{section}:\n" in text  # one group per YAML section
        for field in dataclasses.fields(arguments):
            assert "(default: " in option_help(text, field.name), field.name
    expected = {  # option: (type, default)
        "backbone": ("STR", "litemedsam"),
        "refine_ratio": ("FLOAT", "None"),
        "use_frequency_adapter": ("[BOOL]", "None"),
        "config_overrides": ("JSON", "{}"),
        "split_fractions": ("FLOAT [FLOAT ...]", "[0.6, 0.2, 0.2]"),
        "augment": ("[BOOL]", "True"),
        "learning_rate": ("FLOAT", "5e-05"),
        "mixed_precision": ("{no,fp16,bf16,fp8}", "None"),
        "report_to": ("STR", "auto"),
        "output_sizes": ("STR [STR ...]", "['native']"),
        "hub_model_id": ("STR", "None"),
    }
    for name, (kind, default) in expected.items():
        pattern = rf"--{name.replace('_', '-')} {re.escape(kind)}[ ,].* \(default: {re.escape(default)}\)"
        assert re.fullmatch(pattern, option_help(text, name)), option_help(text, name)
    assert "wandb" in option_help(text, "report_to") and "comet_ml" in option_help(text, "report_to")


def test_options_defaults_then_yaml_then_command_line(tmp_path):
    parse = train_script.parse_args
    names = [field.name for arguments in train_script.SECTIONS.values() for field in dataclasses.fields(arguments)]
    assert len(names) == len(set(names))  # flat --key flags: unique across sections
    defaults = parse([])
    assert defaults.model.config_changes() == {}  # model keys unset: the backbone's own config decides
    assert defaults.training.mixed_precision is None and defaults.training.report_to == "auto"
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {refine_ratio: 0.3, config_overrides: {mc_passes: 3}}\n"
        "data: {split_fractions: [0.5, 0.25, 0.25]}\n"
        "training: {epochs: 3, learning_rate: 1, checkpointing_steps: 5}\n"
        "evaluation: {output_sizes: [native, 128]}\n"
    )
    args = parse(["--config", str(config), "--epochs", "4", "--use_lora", "false"])
    assert args.training.epochs == 4 and args.training.learning_rate == 1.0  # command line > YAML > defaults
    assert args.training.checkpoint_every == 5 and args.data.split_fractions == [0.5, 0.25, 0.25]
    assert args.model.config_changes() == {"use_lora": False, "refine_ratio": 0.3, "mc_passes": 3}
    assert args.evaluation.output_sizes == ["native", "128"]
    args = parse(
        ["--split_fractions", "0.6", "0.3", "0.1", "--output_sizes", "native", "2x", "--augment", "false",
         "--config_overrides", '{"refine_ratio": 0.5}', "--data_dir", "null", "--checkpoints_total_limit", "null",
         "--use_implicit_decoder", "--mixed_precision", "bf16", "--no_baseline"]
    )  # fmt: skip
    assert args.data.split_fractions == [0.6, 0.3, 0.1] and args.evaluation.output_sizes == ["native", "2x"]
    assert args.data.augment is False and args.evaluation.baseline is False and args.data.data_dir is None
    assert args.training.checkpoints_total_limit is None and args.training.mixed_precision == "bf16"
    assert args.model.config_changes() == {"use_implicit_decoder": True, "refine_ratio": 0.5}
    # Dashes are the spelling shown; underscores still parse. A YAML-style mapping is a JSON value.
    args = parse(
        ["--refine-ratio", "0.25", "--split-fractions", "0.6", "0.3", "0.1", "--peft_overrides", "{lora_rank: 8}"]
    )
    assert args.model.refine_ratio == 0.25 and args.data.split_fractions == [0.6, 0.3, 0.1]
    assert args.model.peft_overrides == {"lora_rank": 8} and {"refine_ratio", "peft_overrides"} <= args.given
    # Mistakes name the file and the key.
    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("model: {refine_ratios: 0.3}", r"bad.yaml: unknown key model.refine_ratios \(did you mean model.refine_ratio"),
        ("data: {refine_ratio: 0.3}", r"bad.yaml: unknown key data.refine_ratio"),
        ("optimizer: {lr: 1}", r"bad.yaml: unknown section 'optimizer'"),
        ("training: {epochs: many}", r"bad.yaml: training.epochs: expected INT"),
        ("model: {config_overrides: [1, 2]}", r"bad.yaml: model.config_overrides: expected a JSON object"),
    ):
        bad.write_text(text + "\n")
        with pytest.raises(SystemExit, match=message):
            parse(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"unknown option\(s\) --refine-ratios 0.3 \(did you mean model.refine_ratio"):
        parse(["--refine-ratios", "0.3"])
    with pytest.raises(SystemExit, match="--output-sizes"):
        parse(["--output_sizes", "huge"])
    # Every shipped config loads; none fixes the precision (the Accelerate config decides).
    for path in sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")):
        assert parse(["--config", str(path)]).training.mixed_precision is None, path


def test_report_to_names_a_missing_or_unknown_tracker(tmp_path):
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(
            SystemExit, match=r"--report-to wandb: the wandb package is not installed; pip install wandb"
        ):
            train_script.main(["--report_to", "wandb", "--output_dir", str(tmp_path / "x")])
        with pytest.raises(SystemExit, match=r"wandb.* not installed; pip install .*wandb"):
            train_script.main(["--report_to", "tensorboard,wandb", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"unknown tracker\(s\) \['tensorbord'\].*'tensorboard'"):
        train_script.main(["--report_to", "tensorbord", "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert train_script.resolve_trackers("none") == []
    from accelerate.utils import is_tensorboard_available

    assert train_script.resolve_trackers("auto") == (["tensorboard"] if is_tensorboard_available() else [])


def test_the_accelerate_config_decides_the_mixed_precision(monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    AcceleratorState._reset_state(True)
    try:
        accelerator = train_script.make_accelerator(train_script.parse_args([]), [])
        assert accelerator.mixed_precision == "bf16"
        AcceleratorState._reset_state(True)
        accelerator = train_script.make_accelerator(train_script.parse_args(["--mixed_precision", "no"]), [])
        assert accelerator.mixed_precision == "no"  # an explicit option wins
    finally:
        AcceleratorState._reset_state(True)


def test_forward_and_loss_sees_the_config_through_a_wrapper():
    model = tiny_model()
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DistributedDataParallel holds it
    assert recipe.model_config(wrapper) is model.config and recipe.model_config(torch.nn.Linear(1, 1)) is None


@slow
def test_fine_tuning_a_checkpoint_keeps_its_own_config(tiny_sam, polyps, tmp_path):
    overrides = {**SMALL_IMPLICIT, "refine_ratio": 0.3, "use_frequency_adapter": False}
    model, processor = load_model(tiny_sam, config_overrides=overrides, eval_mode=False)
    model.config.base_model = "org/original-sam"
    checkpoint = tmp_path / "trained-imedsam"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    # Unset keys keep the checkpoint's values; a key that is set changes, alone.
    built, _, published = train_script.build_model(
        train_script.parse_args(["--backbone", str(checkpoint), "--mc_passes", "3"]).model
    )
    assert (built.config.refine_ratio, built.config.use_frequency_adapter, built.config.mc_passes) == (0.3, False, 3)
    assert not published  # a conversion, not a trained I-MedSAM: wrapped in a new adapter
    out = tmp_path / "run"
    train_script.main(
        ["--backbone", str(checkpoint), "--data_dir", str(polyps), "--output_dir", str(out), "--epochs", "1",
         "--split_fractions", "0.6", "0.2", "0.2", "--output_sizes", "48", "--report_to", "none", "--baseline", "false"]
    )  # fmt: skip
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["refine_ratio"] == 0.3 and config["use_frequency_adapter"] is False
    assert config["coarse_feature_size"] == SMALL_IMPLICIT["coarse_feature_size"]
    assert config["base_model"] == "org/original-sam"  # the original backbone, not the checkpoint's folder
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["refine_ratio"] is None  # recorded as unset


@slow
def test_decoder_only_fine_tune_without_adapter_layers(tiny_sam, polyps, tmp_path):
    """Both branches off and the whole prompt encoder and mask decoder trained (MedSAM-style, the box-robustness
    baseline): no adapter layer is built, the trained decoder is saved in the model, and it loads as it trained."""
    out = tmp_path / "run"
    train_script.main(
        args(tiny_sam, polyps, out, "--epochs", "1", "--baseline", "false", "--use_lora", "false",
             "--use_frequency_adapter", "false", "--use_implicit_decoder", "false",
             "--peft_overrides", json.dumps({"train_mask_decoder": True}))
    )  # fmt: skip
    model, _ = load_model(out / "final")
    config = model.config.adapter_config
    assert (config["use_lora"], config["use_frequency_adapter"], model.config.use_implicit_decoder) == (False,) * 3
    assert not any("freq_" in name for name, _ in model.named_parameters())
    backbone = SamModel.from_pretrained(tiny_sam)
    trained, frozen = model.state_dict(), backbone.state_dict()
    moved = {k.rsplit(".", 1)[0] for k in frozen if k in trained and not torch.equal(trained[k], frozen[k])}
    assert {k.split(".")[0] for k in moved} == {"prompt_encoder", "mask_decoder"}  # the image encoder is the backbone's
    assert any(k.startswith("mask_decoder.transformer.") for k in moved)  # the whole decoder, not only its upscaling
    # The whole prompt encoder would train a copy of the positional embedding it shares with the image: refused.
    with pytest.raises(SystemExit, match="shared with the image"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "bad", "--peft_overrides",
                               json.dumps({"modules_to_save": ["prompt_encoder", "mask_decoder"]})))  # fmt: skip


@slow
def test_decoders_fine_tuned_on_a_frozen_encoder_encode_each_image_once(tiny_sam, polyps, tmp_path, monkeypatch):
    """--freeze-image-encoder --no-augment on a trained I-MedSAM: each training and validation image is encoded once
    for the whole run (and not at all by a next run, with --embedding-cache-dir), the encoder (LoRA, frequency
    adapter) comes out exactly as it went in, the decoders train."""
    first = tmp_path / "first"
    train_script.main(args(tiny_sam, polyps, first, "--epochs", "1", "--final_evaluation", "false"))
    encoded = []
    encode = recipe.FrozenImageEncoder._encode

    def counting(self, pixel_values):
        encoded.append(len(pixel_values))
        return encode(self, pixel_values)

    monkeypatch.setattr(recipe.FrozenImageEncoder, "_encode", counting)
    second, cache = tmp_path / "second", tmp_path / "embeddings"
    frozen = ("--backbone", str(first / "final"), "--freeze_image_encoder", "--no-augment", "--final_evaluation", "false",
              "--embedding_cache_dir", str(cache))  # fmt: skip
    train_script.main(args(tiny_sam, polyps, second, *frozen, "--epochs", "3"))
    splits = json.loads((second / "splits.json").read_text())
    images = len(splits["train"]) + len(splits["validation"])
    assert sum(encoded) == images  # 3 epochs, 3 validations
    assert len(list(cache.glob("*/*.safetensors"))) == images
    # Another run on the same encoder and images (--embedding-cache-dir) encodes nothing.
    train_script.main(args(tiny_sam, polyps, tmp_path / "third", *frozen, "--epochs", "1"))
    assert sum(encoded) == images
    before, after = load_file(first / "final" / "model.safetensors"), load_file(second / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert "implicit_decoder" in changed and "vision_encoder" not in changed
    assert any("freq_" in k for k in before)  # the adapters are there, and stayed as they were


@slow
def test_training_on_sampled_points(tiny_sam, polyps, tmp_path, monkeypatch):
    sampled = []
    sample_points = recipe.sample_points

    def recording(labels, sizes, num_points, generator=None, **kwargs):
        sampled.append(num_points)
        return sample_points(labels, sizes, num_points, generator, **kwargs)

    monkeypatch.setattr(recipe, "sample_points", recording)
    out = tmp_path / "run"
    results = train_script.main(
        args(tiny_sam, polyps, out, "--train_points", "256", "--epochs", "1", "--baseline", "false")
    )
    assert sampled == [256, 256, 256]  # one epoch of 3 training images, batch 1: every step on sampled points
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert 0 <= results["results"]["48"]["dice"] <= 1
    model = AutoModel.from_pretrained(out / "final").eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0]]))
    assert outputs.logits.shape == (1, 1, 64, 64) and torch.isfinite(outputs.logits).all()


class RecordingHubApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, {"private": private}))

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {"path_in_repo": path_in_repo, "files": files}))
        if run_as_future:
            from concurrent.futures import Future

            future = Future()
            future.set_result(None)
            return future
        return None


@slow
def test_push_to_hub_uploads_checkpoints_then_model_and_card(tiny_sam, polyps, tmp_path):
    api = RecordingHubApi()
    out = tmp_path / "run"
    extra = (
        "--push_to_hub",
        "--hub_model_id",
        "org/i-medsam-test",
        "--baseline",
        "false",
        "--name",
        "Kvasir-SEG sample",
        "--license",
        "research-only",
    )
    train_script.main(args(tiny_sam, polyps, out, *extra), hub_api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds[0] == "create_repo" and api.calls[0][1] == "org/i-medsam-test"
    checkpoints = [
        c for c in api.calls if c[0] == "upload_folder" and (c[2]["path_in_repo"] or "").startswith("checkpoints/")
    ]
    assert [c[2]["path_in_repo"] for c in checkpoints] == ["checkpoints/checkpoint-3", "checkpoints/checkpoint-6"]
    assert "trainable_0.safetensors" in checkpoints[0][2]["files"]
    final = api.calls[-1]
    assert final[0] == "upload_folder" and final[2]["path_in_repo"] is None
    files = set(final[2]["files"])
    assert {"README.md", "config.json", "model.safetensors", "modeling_imedsam.py", "preprocessor_config.json"} <= files
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    assert "adapter_config.json" not in files
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.model_name == "org/i-medsam-test"
    assert card.data.eval_results and card.data.eval_results[0].metric_type == "dice"
    assert "Kvasir-SEG sample" in card.text and "research-only" in card.text


@slow
def test_two_cpu_processes_with_ddp(tiny_sam, polyps, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(REPO_ROOT / "training" / "train.py"),
        *args(tiny_sam, polyps, tmp_path / "ddp", "--baseline", "false", "--eval_batch_size", "1",
              "--train_points", "64", "--selection_box_jitter", "0.1"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "ddp" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 4  # 3 training images over 2 processes: 2 steps an epoch
    # --selection-box-jitter shares the validation images out (one image: the second process gets none) and gathers
    validations = [r for r in log if "val_dice_jittered" in r]
    assert len(validations) == 2 and all(0 <= r["val_dice_exact"] <= 1 for r in validations)
    # The precision `accelerate launch` chose is the one recorded.
    assert yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())["training"]["mixed_precision"] == "no"


@slow
def test_hub_style_dataset_with_image_and_mask_columns(tiny_sam, tmp_path):
    """
    A dataset with image/mask columns (here a local parquet folder, as a Hub id would give) trains end to end; its
    own test split is the run's test split (the validation split is cut from its train split), and a row whose mask
    does not fit its image is skipped and listed, not trained on stretched.
    """
    import datasets

    pairs = sorted((SHARED_DATA / "Kvasir-SEG-sample" / "images").iterdir())
    records = {
        "image": [str(p) for p in pairs],
        "label": [str(SHARED_DATA / "Kvasir-SEG-sample" / "masks" / f"{p.stem}.png") for p in pairs],
    }
    records["label"][0] = records["label"][1]  # another image's mask, of another size
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    folder = tmp_path / "hub-dataset" / "data"
    folder.mkdir(parents=True)
    rows = datasets.Dataset.from_dict(records, features=features)
    rows.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    rows.select([2, 3]).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    out = tmp_path / "run"
    extra = [
        "--dataset",
        str(tmp_path / "hub-dataset"),
        "--mask_column",
        "label",
        "--data_dir",
        "null",
        "--epochs",
        "1",
    ]
    results = train_script.main(args(tiny_sam, "unused", out, *extra))
    splits = json.loads((out / "splits.json").read_text())
    assert splits["test"] == ["test-000000", "test-000001"] and splits["metadata"]["dataset_splits"] == ["test"]
    assert splits["metadata"]["source"] == "hub-dataset"  # the folder's name, not its path (splits.json is published)
    assert len(splits["train"]) + len(splits["validation"]) == 4 and "train-000000" not in splits["train"]
    assert "train-000000: mask is" in (out / "data_problems.txt").read_text()
    assert results["n_images"] == 2 and "48" in results["results"]
    card = (out / "final" / "README.md").read_text()
    assert "(test: the dataset's own; validation cut from its `train` split)" in card
    # A local dataset folder is no Hub dataset id: its path stays out of the card's metadata (the Hub's links).
    assert str(tmp_path) not in card.split("---")[1] and "type: hub-dataset" in card
    with pytest.raises(SystemExit, match="no column"):
        train_script.main(args(tiny_sam, "unused", tmp_path / "x", *extra[:-2], "--mask_column", "nope"))
    with pytest.raises(SystemExit, match="--data-dir .*polyps and --dataset .*: train on one of them"):
        train_script.main(args(tiny_sam, "unused", tmp_path / "y", *extra[:4], "--data_dir", str(tmp_path / "polyps")))


def organ_folder(root, count=5):
    """Small images with two labelled structures (class ids 1 and 2), like per-organ CT masks merged."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = rng.integers(0, 80, (60, 80, 3), dtype=np.uint8)
        mask = np.zeros((60, 80), np.uint8)
        mask[5 + i : 25, 8:30] = 1
        mask[30:55, 40 + i : 75] = 2
        image[mask == 1] += 120
        image[mask == 2] += 60
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


@slow
def test_multi_class_masks_with_one_box_per_class(tiny_sam, tmp_path):
    data = organ_folder(tmp_path / "organs")
    out = tmp_path / "run"
    extra = ("--class_prompts", "true", "--mask_classes", "2", "--epochs", "1", "--baseline", "true")
    results = train_script.main(args(tiny_sam, data, out, *extra))
    rows = [json.loads(line) for line in (out / "eval_per_image.jsonl").read_text().splitlines()]
    imedsam_rows = [r for r in rows if "model" not in r]
    assert sorted(r["class"] for r in imedsam_rows) == [1, 2]  # one test image, both classes, each its own box
    assert results["results"]["48"]["n"] == 2
    with pytest.raises(SystemExit, match="--num-classes 1"):
        train_script.main(args(tiny_sam, data, tmp_path / "x", *extra, "--num_classes", "2"))


@slow
def test_multi_class_logits_from_one_prompt(tiny_sam, tmp_path):
    data = organ_folder(tmp_path / "organs")
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, data, out, "--num_classes", "2", "--epochs", "1", "--baseline", "false"))
    assert AutoModel.from_pretrained(out / "final").config.num_classes == 2
    assert 0 <= results["results"]["48"]["dice"] <= 1


@slow
def test_ct_folder_splits_by_scan_and_records_the_class_names(tiny_sam, tmp_path):
    """BTCV slices of five scans with classes.json: whole scans per split, organ names in the config and card."""
    ct, folder = SHARED_DATA / "BTCV-Synapse-CT", tmp_path / "ct"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(ct / "classes.json", folder / "classes.json")
    stems = [f"case000{c}_slice{z:03d}" for c in (1, 2) for z in (80, 81)] + ["case0003_slice100", "case0004_slice080"]
    stems.append("case0005_slice075")
    for stem in stems:
        for sub in ("images", "masks"):
            shutil.copy(ct / sub / f"{stem}.png", folder / sub / f"{stem}.png")
    out = tmp_path / "run"
    extra = ("--class_prompts", "true", "--mask_classes", "13", "--epochs", "1", "--baseline", "false")
    # Every organ of a slice as a prompt of one sample: one encoder pass per slice, the loss over its prompts; every
    # sample's boxes from a neighbouring slice where there is one (slices 80 and 81 of case0001 and case0002).
    results = train_script.main(
        args(tiny_sam, folder, out, *extra, "--all_classes_per_sample", "true", "--neighbour_box_probability", "1")
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["neighbour_box_probability"] == 1.0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r) and 0 <= results["best_val_dice"] <= 1
    splits = json.loads((out / "splits.json").read_text())
    scans = {name: {stem.split("_")[0] for stem in splits[name]} for name in ("train", "validation", "test")}
    assert sum(len(s) for s in scans.values()) == 5 and not (scans["train"] & (scans["validation"] | scans["test"]))
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"]["6"] == "liver" and config["label2id"]["spleen"] == 1
    assert "6 liver" in (out / "final" / "README.md").read_text()
    # A 13-class model on the same samples is class-aware: each organ's box uses that organ's heads. Half of its
    # samples prompted with recorded propagation boxes (the liver's, a loose box on every slice).
    recorded = tmp_path / "propagated.json"
    recorded.write_text(json.dumps({p.stem: {"6": [[40.0, 40.0, 220.0, 200.0]]} for p in (folder / "masks").iterdir()}))
    aware = train_script.main(args(tiny_sam, folder, tmp_path / "aware", *extra, "--all_classes_per_sample", "true",
                                   "--num_classes", "13", "--propagated_box_probability", "0.5",
                                   "--propagated_boxes", str(recorded)))  # fmt: skip
    assert yaml.safe_load((tmp_path / "aware" / "config.yaml").read_text())["data"]["propagated_boxes"] == str(recorded)
    # The card says how the training boxes were made.
    assert (
        "of the training samples, 50% are prompted instead with a box the model's own propagation gave on that "
        "slice (`propagated.json`)" in (tmp_path / "aware" / "final" / "README.md").read_text()
    )
    assert 0 <= aware["best_val_dice"] <= 1 and set(aware["results"]["48"]["per_class"]) <= {
        str(i) for i in range(1, 14)
    }
    # The final evaluation reports per scan too (3D Dice per organ), as imedsam evaluate does.
    assert aware["volume"]["n_volumes"] == 1 and set(aware["volume"]["per_class"]) <= set(
        aware["results"]["48"]["per_class"]
    )


@slow
def test_ct_slices_as_a_dataset_split_by_scan_with_the_names_of_its_id2label(tiny_sam, tmp_path):
    """The same BTCV slices as a dataset (save_to_disk) with a file-name column and an id2label.json: rows named by
    the column keep each scan in one split, and the organ names reach the config and the card."""
    stems = [f"case000{c}_slice{z:03d}" for c in (1, 2) for z in (80, 81)] + ["case0003_slice100", "case0004_slice080"]
    btcv_dataset(tmp_path / "ct", [*stems, "case0005_slice075"], mask_column="annotation", id2label=True)
    out = tmp_path / "run"
    extra = ["--dataset", str(tmp_path / "ct"), "--data_dir", "null", "--mask_column", "annotation"]
    extra += ["--stem_column", "file_name", "--class_prompts", "true", "--mask_classes", "13", "--epochs", "1"]
    train_script.main(args(tiny_sam, "unused", out, *extra, "--baseline", "false"))
    splits = json.loads((out / "splits.json").read_text())
    scans = {name: {stem.split("_")[0] for stem in splits[name]} for name in ("train", "validation", "test")}
    assert sum(len(s) for s in scans.values()) == 5 and not (scans["train"] & (scans["validation"] | scans["test"]))
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"]["6"] == "liver" and "6 liver" in (out / "final" / "README.md").read_text()
    # The run's splits.json says how rows were read and named: imedsam evaluate --split test finds them untold.
    from imedsam_hf.cli import main as cli_main

    assert splits["metadata"]["stem_column"] == "file_name" and splits["metadata"]["mask_column"] == "annotation"
    evaluate = ["evaluate", "--model", str(out / "final"), "--dataset", str(tmp_path / "ct"), "--split", "test"]
    assert cli_main([*evaluate, "--json", str(tmp_path / "test.json")]) == 0
    assert json.loads((tmp_path / "test.json").read_text())["n_images"] == len(splits["test"])


def test_a_prompt_free_runs_card_says_it_was_trained_and_scored_without_prompts(tmp_path):
    """Regression: the card of a `--prompt none` run said "ground-truth boxes, jittered ..." and named its test
    metrics "exact box prompts"."""
    from conftest import tiny_model

    from imedsam_hf.model_card import write_model_card

    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path)
    training = dict(output_dir="o", epochs=1, batch_size=1, gradient_accumulation_steps=1, weight_decay=0.0,
                    learning_rate=1e-4, implicit_learning_rate=1e-3, mixed_precision="no", dice_weight=0.8,
                    bce_weight=0.2, fine_weight_warmup_epochs=1)  # fmt: skip
    data = dict(name="demo", split_seed=0, box_jitter=0.1, data_dir="d", prompt="none")
    results = {"split": "test", "n_images": 1, "results": {"48": {"dice": 0.5, "iou": 0.4, "hd95": 3.0}}}
    write_model_card(tmp_path, dict(model={}, data=data, training=training, hub={}), results, {"test": 1}, 10, 100)
    card = (tmp_path / "README.md").read_text()
    assert "- Prompts: none: trained and evaluated prompt-free" in card
    assert "exact box prompts" not in card and "dice (48 resolution, no prompt)" in card
    assert "Test split (1 images), no prompt." in card


def test_the_card_links_hub_dataset_ids_only(tmp_path):
    from imedsam_hf.model_card import hub_id_or_none

    assert hub_id_or_none("org/polyps", bare=True) == "org/polyps" and hub_id_or_none("kvasir", bare=True) == "kvasir"
    for local in (str(tmp_path), "./data/x", None):
        assert hub_id_or_none(local, bare=True) is None and hub_id_or_none(local) is None
    assert hub_id_or_none("kvasir") is None  # a model's id names its org


def test_a_datasets_own_split_with_no_usable_row_is_cut_from_training(tmp_path):
    """A dataset's own validation split whose every row is unusable (here: masks of another size) would leave the
    run without validation: it is cut from the training split instead, as for a dataset without one."""
    import datasets
    from accelerate import Accelerator

    from imedsam_hf.data import SPLITS

    def rows(count, mask_size):
        images = [Image.fromarray(np.full((30, 40, 3), 20 * i, np.uint8)) for i in range(count)]
        mask = np.zeros(mask_size, np.uint8)
        mask[2:6, 2:6] = 255
        features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
        return datasets.Dataset.from_dict({"image": images, "mask": [Image.fromarray(mask)] * count}, features=features)

    datasets.DatasetDict({"train": rows(10, (30, 40)), "validation": rows(2, (8, 8))}).save_to_disk(str(tmp_path / "d"))
    data = train_script.DataArguments(dataset=str(tmp_path / "d"))
    splits = train_script.load_pairs(data, 1, tmp_path, Accelerator(cpu=True))
    assert {name: len(splits[name]) for name in SPLITS} == {"train": 6, "validation": 2, "test": 2}
    assert all(stem.startswith("train-") for stem in splits["validation"]["stem"])
    assert "dataset_splits" not in json.loads((tmp_path / "splits.json").read_text())["metadata"]


def test_training_splits_by_a_file_of_scans_datalists_and_nnunet_folds(tmp_path):
    """`--split-file` naming scans (`case0001` for its slices), a MONAI datalist or nnU-Net's folds (`--split-fold`):
    each scan's slices go where the file puts the scan; names of nothing in the data are left out with a warning (a
    copy lacking some scans, as the shared BTCV lacks TransUNet's held-out ones), a file naming no training image is
    refused."""
    from train_arguments import DataArguments

    stems = ["case0001_slice080", "case0001_slice081", "case0002_slice010", "case0003_slice001"]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["case0001", "case0002"], "test": ["case0003"]}))
    data = DataArguments(split_file=str(tmp_path / "split.json"))
    assert train_script.choose_splits(stems, data) == {
        "train": stems[:3], "validation": [], "test": ["case0003_slice001"]
    }  # fmt: skip
    folds = [{"train": ["case0001"], "val": ["case0002", "case0003"]}, {"train": ["case0002"], "val": ["case0001"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    data = DataArguments(split_file=str(tmp_path / "splits_final.json"), split_fold=1)
    assert train_script.choose_splits(stems, data)["validation"] == stems[:2]
    (tmp_path / "part.json").write_text(json.dumps({"train": ["case0001", "case0042"], "test": ["case0008"]}))
    with pytest.warns(UserWarning, match=r"--split-file .*part.json: names neither .*: case0042, case0008; left out"):
        splits = train_script.choose_splits(stems, DataArguments(split_file=str(tmp_path / "part.json")))
    assert splits == {"train": stems[:2], "validation": [], "test": []}  # a copy lacking scans of the split
    (tmp_path / "none.json").write_text(json.dumps({"train": ["case0042"], "test": ["case0001"]}))
    with pytest.raises(SystemExit, match=r"none.json: names no image of the data for training"), pytest.warns():
        train_script.choose_splits(stems, DataArguments(split_file=str(tmp_path / "none.json")))
    with pytest.raises(SystemExit, match=r"give --split-fold 0..1"):
        train_script.choose_splits(stems, DataArguments(split_file=str(tmp_path / "splits_final.json")))


@slow
def test_a_folder_of_class_id_masks_with_its_classes_json_trains_without_flags(tiny_sam, tmp_path):
    """A folder `convert volumes` / `convert npz` writes (class-id masks, classes.json) was refused by training as
    masks "read as binary"; the suggested `--mask-classes N` then trained the N organs as one structure and the
    final evaluation died in a MaskValuesError traceback after training. Class prompts now follow the one rule
    evaluation uses (`data.class_prompting`): on for class-id masks with a one-class model, no flag needed; the union
    asked for explicitly (`--class-prompts false --mask-classes N`) is refused before training, naming the fix."""
    import shutil

    ct, folder = SHARED_DATA / "BTCV-Synapse-CT", tmp_path / "ct"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(ct / "classes.json", folder / "classes.json")
    for path in [sorted((ct / "images").glob(f"case000{c}_slice*.png"))[20] for c in (1, 2, 3, 4, 5)]:
        stem = path.stem
        for sub in ("images", "masks"):
            shutil.copy(ct / sub / f"{stem}.png", folder / sub / f"{stem}.png")
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, folder, out, "--epochs", "1", "--baseline", "false"))
    assert results["results"]["48"]["class_mean"]["n_classes"] > 1  # scored per organ, by class prompts
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["class_prompts"] is None  # the rule decided, as it will on a rerun
    shared = (out / "config.yaml").stat().st_mode & 0o777  # weights as readable as the rest (safetensors#782: 0600)
    assert {path.stat().st_mode & 0o777 for path in out.rglob("*.safetensors")} == {shared}
    with pytest.raises(SystemExit, match=r"--mask-classes 13 with --class-prompts false .* --mask-values 1:1,2:1,"):
        train_script.main(args(tiny_sam, folder, tmp_path / "x", "--class_prompts", "false", "--mask_classes", "13"))
