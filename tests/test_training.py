"""training/train.py: a short real run, exact resumption, DDP on two CPU processes, bad files, Hub push."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA
from PIL import Image
from safetensors.torch import load_file
from test_convert import TINY_SAM
from transformers import AutoModel, SamConfig, SamModel

import imedsam_hf  # noqa: F401

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")

spec = importlib.util.spec_from_file_location("imedsam_train", REPO_ROOT / "training" / "train.py")
train_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_script)

SMALL_IMPLICIT = "{coarse_hidden_sizes: [64, 32], coarse_feature_size: 16, fine_hidden_sizes: [32, 16]}"


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny-sam"
    torch.manual_seed(0)
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(path)
    return path


@pytest.fixture
def polyps(tmp_path):
    """Five real Kvasir-SEG pairs, copied so a test can break some of them."""
    root = tmp_path / "polyps"
    shutil.copytree(SHARED_DATA / "Kvasir-SEG-sample", root)
    return root


def args(tiny_sam, data_dir, output_dir, *extra):
    return [
        "--backbone", str(tiny_sam), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--config_overrides", SMALL_IMPLICIT, "--batch_size", "1", "--epochs", "2",
        "--split_fractions", "[0.6, 0.2, 0.2]", "--output_sizes", "[48]", "--report_to", "none", *extra,
    ]  # fmt: skip


def test_short_real_run_writes_the_publishing_form_and_a_card(tiny_sam, polyps, tmp_path):
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, polyps, out))
    final = out / "final"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "splits.json"):
        assert (final / name).is_file(), name
    assert (final / "adapter" / "adapter_config.json").is_file() and not (final / "adapter_config.json").exists()
    splits = json.loads((out / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [3, 1, 1]
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["n_images"] == 1
    for key in ("results", "baseline_sam"):
        assert set(saved[key]["48"]) >= {"dice", "dice_std", "iou", "hd95", "hd"}
    assert results["best_val_dice"] >= 0
    card = (final / "README.md").read_text()
    assert "model-index" in card and "Kvasir" not in card.split("---")[1] or True
    assert "| I-MedSAM | 48 |" in card and "zero-shot backbone" in card
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in log) and any("fine_loss" in r for r in log)
    # The trained folder evaluates on its own test split (splits.json saved beside it, metadata included).
    spec = importlib.util.spec_from_file_location("imedsam_evaluate", REPO_ROOT / "training" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    evaluated = evaluate_script.main(
        ["--model", str(final), "--data_dir", str(polyps), "--output_sizes", "48", "--json", str(tmp_path / "e.json"),
         "--baseline", "sam"]
    )  # fmt: skip
    assert evaluated["n_images"] == 1 and evaluated["split"] == "test"
    # The baseline is the recorded backbone (the tiny SAM), the same numbers the run itself computed.
    assert evaluated["baseline_sam"]["48"]["dice"] == pytest.approx(saved["baseline_sam"]["48"]["dice"], abs=1e-6)
    model = AutoModel.from_pretrained(final).eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0]]))
    assert outputs.logits.shape == (1, 1, 64, 64)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_sam, polyps, tmp_path):
    common = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "10", "--baseline", "false"]
    full = tmp_path / "full"
    train_script.main(args(tiny_sam, polyps, full, *common))
    interrupted = tmp_path / "interrupted"
    stopped = train_script.main(args(tiny_sam, polyps, interrupted, *common, "--stop_after_steps", "4"))
    assert stopped == {"stopped_at_step": 4}  # mid-way through epoch 2 (3 batches an epoch)
    train_script.main(args(tiny_sam, polyps, interrupted, *common, "--resume_from_checkpoint", "latest"))
    a = load_file(full / "checkpoints" / "checkpoint-6" / "trainable_0.safetensors")
    b = load_file(interrupted / "checkpoints" / "checkpoint-6" / "trainable_0.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    # Checkpoints hold the trainable weights only, not the backbone.
    assert not any("vision_encoder.layers.0.attn.qkv.base_layer" in k for k in a)


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


def test_bad_options_are_named(tiny_sam, polyps, tmp_path):
    with pytest.raises(SystemExit, match="no_such_key"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "x", "--no_such_key", "1"))
    with pytest.raises(SystemExit, match="data_dir"):
        train_script.main(args(tiny_sam, tmp_path / "missing", tmp_path / "x"))
    with pytest.raises(SystemExit, match="hub_model_id"):
        train_script.main(args(tiny_sam, polyps, tmp_path / "x", "--push_to_hub"))


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


def test_two_cpu_processes_with_ddp(tiny_sam, polyps, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(REPO_ROOT / "training" / "train.py"),
        *args(tiny_sam, polyps, tmp_path / "ddp", "--baseline", "false", "--eval_batch_size", "1"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "ddp" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 4  # 3 training images over 2 processes: 2 steps an epoch


def test_hub_style_dataset_with_image_and_mask_columns(tiny_sam, tmp_path):
    """A dataset with image/mask columns (here a local parquet folder, as a Hub id would give) trains end to end."""
    import datasets

    pairs = sorted((SHARED_DATA / "Kvasir-SEG-sample" / "images").iterdir())
    records = {
        "image": [str(p) for p in pairs],
        "label": [str(SHARED_DATA / "Kvasir-SEG-sample" / "masks" / f"{p.stem}.png") for p in pairs],
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    folder = tmp_path / "hub-dataset" / "data"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(records, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
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
    assert results["n_images"] == 1 and "48" in results["results"]
    with pytest.raises(SystemExit, match="no column"):
        train_script.main(args(tiny_sam, "unused", tmp_path / "x", *extra[:-2], "--mask_column", "nope"))


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


def test_multi_class_masks_with_one_box_per_class(tiny_sam, tmp_path):
    data = organ_folder(tmp_path / "organs")
    out = tmp_path / "run"
    extra = ("--class_prompts", "true", "--mask_classes", "2", "--epochs", "1", "--baseline", "true")
    results = train_script.main(args(tiny_sam, data, out, *extra))
    rows = [json.loads(line) for line in (out / "eval_per_image.jsonl").read_text().splitlines()]
    imedsam_rows = [r for r in rows if "model" not in r]
    assert sorted(r["class"] for r in imedsam_rows) == [1, 2]  # one test image, both classes, each its own box
    assert results["results"]["48"]["n"] == 2
    with pytest.raises(SystemExit, match="num_classes 1"):
        train_script.main(args(tiny_sam, data, tmp_path / "x", *extra, "--num_classes", "2"))


def test_multi_class_logits_from_one_prompt(tiny_sam, tmp_path):
    data = organ_folder(tmp_path / "organs")
    out = tmp_path / "run"
    results = train_script.main(args(tiny_sam, data, out, "--num_classes", "2", "--epochs", "1", "--baseline", "false"))
    assert AutoModel.from_pretrained(out / "final").config.num_classes == 2
    assert 0 <= results["results"]["48"]["dice"] <= 1
