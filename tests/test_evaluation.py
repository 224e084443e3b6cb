"""Evaluation protocol and training/evaluate.py's JSON schema."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, btcv_dataset, load_script, tiny_model
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.data import discover_pairs, mask_box, read_mask
from imedsam_hf.evaluation import evaluate_pairs, grid_size, parse_size, resize_labels


def test_output_sizes():
    assert grid_size((576, 768), "native") == (576, 768)
    assert grid_size((576, 768), "2x") == (1152, 1536)
    assert grid_size((576, 768), "0.5x") == (288, 384)
    assert grid_size((576, 768), 128) == (96, 128)
    for bad in ("big", "-2x", "0", "x"):
        with pytest.raises(ValueError, match="not 'native'"):
            parse_size(bad)


def test_labels_are_resized_with_nearest_neighbour():
    labels = np.zeros((10, 10), np.int64)
    labels[2:8, 2:8] = 2
    resized = resize_labels(labels, (20, 20))
    assert set(np.unique(resized)) == {0, 2} and resized.sum() == 4 * labels.sum()


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
def test_evaluate_pairs_scores_model_and_baseline():
    model = tiny_model(query_mode="adaptive")
    pairs = discover_pairs(SHARED_DATA / "Kvasir-SEG-sample")[0][:2]
    rows, summary = evaluate_pairs(model, IMedSamProcessor(image_size=64), pairs, output_sizes=["native", "0.25x", 40])
    assert len(rows) == 6 and set(summary) == {"native", "0.25x", "40"}
    for size, values in summary.items():
        scored = [row for row in rows if row["size"] == size]
        assert values["n"] == 2 and values["dice"] == pytest.approx(np.mean([row["dice"] for row in scored]))
        assert values["hd95"] == pytest.approx(np.mean([row["hd95"] for row in scored]))
    _, baseline = evaluate_pairs(model, IMedSamProcessor(image_size=64), pairs, output_sizes=[40], baseline=True)
    assert baseline["40"]["dice"] != summary["40"]["dice"]


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
def test_evaluate_script_json_schema(tmp_path, capsys):
    model = tiny_model(query_mode="adaptive")
    model.save_pretrained(tmp_path / "model")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "model")
    script = load_script("training/evaluate.py", "imedsam_evaluate")
    out = tmp_path / "eval.json"
    script.main(
        [
            "--model", str(tmp_path / "model"), "--data-dir", str(SHARED_DATA / "Kvasir-SEG-sample"),
            "--split", "all", "--output-sizes", "native", "32", "--baseline", "sam", "--json", str(out),
            "--overlays", str(tmp_path / "overlays"), "--limit", "2",
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n_images"] == 2
    for key in ("results", "baseline_sam"):
        for size in ("native", "32"):
            assert {"dice", "dice_std", "iou", "hd95", "hd"} <= set(result[key][size])
    assert out.with_suffix(".csv").read_text().count("\n") == 1 + 2 * 2 * 2
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    assert len(list((tmp_path / "overlays" / "baseline_sam").glob("*.png"))) == 2  # --baseline's, side by side
    # Regression: without --baseline the CSV had rows with a key missing from its header.
    script.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--data-dir",
            str(SHARED_DATA / "Kvasir-SEG-sample"),
            "--split",
            "all",
            "--limit",
            "1",
            "--json",
            str(tmp_path / "plain.json"),
        ]
    )
    assert (tmp_path / "plain.csv").read_text().startswith("model,size,stem,dice")
    capsys.readouterr()
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--data-dir",
        str(SHARED_DATA / "Kvasir-SEG-sample"),
        "--json",
        str(out),
    ]
    assert script.main(argv) == 2  # no split file: one clear line naming the option, exit code 2
    assert "--split-file" in capsys.readouterr().err


def test_untrained_batchnorm_free_model_is_deterministic():
    model = tiny_model(query_mode="adaptive")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x, output_size=(100, 80)).logits, model(x, output_size=(100, 80)).logits)


def test_volume_dice_stacks_the_slices_of_each_scan():
    from imedsam_hf.evaluation import volume_summary

    rows = [  # scan a: two slices of class 6; scan b: one slice of class 6 and one of class 8
        {"stem": "a_slice001", "size": "native", "class": 6, "overlap": 8, "predicted_pixels": 10, "true_pixels": 10},
        {"stem": "a_slice002", "size": "native", "class": 6, "overlap": 0, "predicted_pixels": 0, "true_pixels": 4},
        {"stem": "b_slice010", "size": "native", "class": 6, "overlap": 5, "predicted_pixels": 5, "true_pixels": 5},
        {"stem": "b_slice011", "size": "native", "class": 8, "overlap": 1, "predicted_pixels": 3, "true_pixels": 1},
        {"stem": "b_slice011", "size": "128", "class": 8, "overlap": 0, "predicted_pixels": 9, "true_pixels": 9},
    ]
    volume = volume_summary(rows, "native", {6: "liver", 8: "aorta"})
    liver_a = 2 * 8 / (10 + 14)  # the volume's counts, not the mean of the slices' Dice (0.8 and 0)
    assert volume["per_class"]["6"] == {
        "name": "liver",
        "dice": pytest.approx((liver_a + 1.0) / 2),
        "hd95": None,  # no masks and spacing given
        "nsd": None,
        "n": 2,
    }
    assert volume["per_class"]["8"]["dice"] == pytest.approx(0.5)
    assert volume["dice"] == pytest.approx(((liver_a + 1.0) / 2 + 0.5) / 2) and volume["n_volumes"] == 2
    # Each scan's own scores are kept, for per-case tables and paired tests.
    assert volume["per_scan"] == {
        "a": {"6": {"dice": pytest.approx(liver_a)}},
        "b": {"6": {"dice": 1.0}, "8": {"dice": pytest.approx(0.5)}},
    }


def test_volume_hd95_of_stacked_slices_equals_the_label_volume_hd95():
    """Slices stacked by index (a missing slice empty in both), anisotropic spacing: volume_scores' HD95 in mm and
    NSD at 2 mm."""
    from imedsam_hf.data import DEFAULT_GROUP_PATTERN, compile_group_pattern
    from imedsam_hf.evaluation import SliceMasks, scan_distances, volume_summary
    from imedsam_hf.volumes import volume_scores

    rng = np.random.default_rng(0)
    true = np.zeros((6, 20, 24), bool)  # (z, rows, cols); slice 3 is missing from the folder (nothing there)
    true[0:3, 5:12, 6:15] = True
    true[4:6, 7:14, 8:12] = True
    predicted = true.copy()
    predicted[1, 12:14, 6:9] = True
    predicted[5] = rng.random((20, 24)) > 0.97
    masks = {(f"s_slice{z + 40:03d}", 6): SliceMasks.of(predicted[z], true[z]) for z in (0, 1, 2, 4, 5)}
    spacing = {"s": (0.8, 0.8, 3.0)}  # x (columns), y (rows), z
    distances = scan_distances(masks, spacing, compile_group_pattern(DEFAULT_GROUP_PATTERN))
    # The same volume as (x, y, z) label volumes: volume_scores is the reference.
    reference = volume_scores(predicted.transpose(2, 1, 0) * 6, true.transpose(2, 1, 0) * 6, (0.8, 0.8, 3.0))
    assert distances[("s", 6)] == pytest.approx({"hd95": reference[6]["hd95"], "nsd": reference[6]["nsd"]})
    assert 0 < reference[6]["nsd"] < 1
    rows = [
        {"stem": stem, "size": "native", "class": 6, "overlap": 1, "predicted_pixels": 1, "true_pixels": 1}
        for stem, _ in masks
    ]
    volume = volume_summary(rows, "native", {6: "liver"}, slice_masks=masks, spacing=spacing)
    assert volume["hd95"] == volume["per_class"]["6"]["hd95"] == pytest.approx(reference[6]["hd95"])
    assert volume["nsd"] == volume["per_class"]["6"]["nsd"] == pytest.approx(reference[6]["nsd"])
    assert volume["per_scan"]["s"]["6"] == pytest.approx({"dice": 1.0, **{k: reference[6][k] for k in ("hd95", "nsd")}})


def test_multi_class_folder_reports_per_class_and_per_volume(tmp_path, monkeypatch, capsys):
    """A folder with classes.json: every organ of a slice prompted in one pass; per class, class mean, per volume."""
    import shutil

    from imedsam_hf.cli import main as cli_main

    ct, folder = SHARED_DATA / "BTCV-Synapse-CT", tmp_path / "ct"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(ct / "classes.json", folder / "classes.json")
    shutil.copy(ct / "cases.csv", folder / "cases.csv")  # each scan's spacing: per-volume HD95 in mm
    for stem in ("case0001_slice080", "case0001_slice081", "case0002_slice080"):
        for sub in ("images", "masks"):
            shutil.copy(ct / sub / f"{stem}.png", folder / sub / f"{stem}.png")
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(folder), "--split", "all"]
    assert cli_main([*argv, "--classes", "6,8", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    native = result["results"]["native"]
    assert set(native["per_class"]) == {"6", "8"} and native["per_class"]["6"]["name"] == "liver"
    assert native["per_class"]["6"]["n"] == 3 and native["class_mean"]["n_classes"] == 2
    assert result["volume"]["n_volumes"] == 2 and set(result["volume"]["per_class"]) == {"6", "8"}
    assert set(result["volume"]["per_scan"]) == {"case0001", "case0002"}  # each scan's own, by name
    assert result["volume"]["per_scan"]["case0001"]["6"].keys() == {"dice", "hd95", "nsd"}
    assert result["volume"]["hd95"] > 0 and all(v["hd95"] > 0 for v in result["volume"]["per_class"].values())
    assert all(0 <= v["nsd"] <= 1 for v in [*native["per_class"].values(), *result["volume"]["per_class"].values()])
    assert native["class_mean"]["nsd"] == pytest.approx(np.mean([v["nsd"] for v in native["per_class"].values()]))
    assert result["nsd_tolerance"] == 2.0
    # --nsd-tolerance 1 (FLARE's 1 mm per scan, 1 px per slice): recorded; no surface is nearer at a tighter bound.
    assert cli_main([*argv, "--classes", "6,8", "--nsd-tolerance", "1", "--json", str(tmp_path / "one.json")]) == 0
    tight = json.loads((tmp_path / "one.json").read_text())
    assert tight["nsd_tolerance"] == 1.0
    for loose, strict in ((native, tight["results"]["native"]), (result["volume"], tight["volume"])):
        assert all(strict["per_class"][c]["nsd"] <= v["nsd"] for c, v in loose["per_class"].items())
        assert strict["per_class"]["6"]["dice"] == loose["per_class"]["6"]["dice"]
    assert tight["volume"]["per_class"]["6"]["nsd"] < result["volume"]["per_class"]["6"]["nsd"]
    assert cli_main([*argv, "--nsd-tolerance", "0", "--json", str(tmp_path / "zero.json")]) == 2
    assert not (tmp_path / "zero.json").exists()
    # The challenge script's NSD (surfels, through MONAI), as `imedsam score --nsd-definition surfels` gives it.
    if importlib.util.find_spec("monai") is not None:
        surfels_json = str(tmp_path / "surfels.json")
        assert cli_main([*argv, "--classes", "6,8", "--nsd-definition", "surfels", "--json", surfels_json]) == 0
        surfels = json.loads(Path(surfels_json).read_text())
        assert surfels["nsd_definition"] == "surfels" and "nsd_definition" not in result
        assert surfels["results"]["native"]["per_class"]["6"]["dice"] == native["per_class"]["6"]["dice"]
        assert surfels["volume"]["per_class"]["6"]["nsd"] != pytest.approx(result["volume"]["per_class"]["6"]["nsd"])
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "monai.metrics", None)  # as where MONAI is not installed: named, nothing written
        assert cli_main([*argv, "--nsd-definition", "surfels", "--json", str(tmp_path / "none.json")]) == 2
        assert "pip install monai" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
    assert cli_main([*argv, "--classes", "6,42", "--json", str(tmp_path / "bad.json")]) == 2  # 42: not in classes.json
    assert not (tmp_path / "bad.json").exists()
    # Names from the folder's classes.json, as `imedsam predict --classes liver` takes them: the same report.
    assert cli_main([*argv, "--classes", "Liver,aorta", "--json", str(tmp_path / "named.json")]) == 0
    named = json.loads((tmp_path / "named.json").read_text())
    assert named["results"]["native"]["per_class"] == native["per_class"]
    assert cli_main([*argv, "--classes", "liver,kidney", "--json", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "taken").write_text("")  # --overlays naming a file: refused before anything is scored or written
    assert cli_main([*argv, "--overlays", str(tmp_path / "taken"), "--json", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists() and (tmp_path / "taken").read_text() == ""
    # A 13-class model, class-aware: each organ's box prompts that organ's heads; the same report.
    tiny_model(query_mode="adaptive", num_classes=13, implicit_decoder_trained=True).save_pretrained(tmp_path / "aware")
    argv[2] = str(tmp_path / "aware")
    aware_argv = [*argv, "--class-aware", "--classes", "6,8", "--overlays", str(tmp_path / "overlays")]
    assert cli_main([*aware_argv, "--json", str(tmp_path / "aware.json")]) == 0
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    aware = json.loads((tmp_path / "aware.json").read_text())
    assert set(aware["results"]["native"]["per_class"]) == {"6", "8"} and aware["volume"]["n_volumes"] == 2
    # --jitter-draws: per class and per scan, the means over the draws (`mean_over_draws`, below).
    drawn = [*argv, "--class-aware", "--classes", "6,8", "--box-jitter", "0.1", "--jitter-draws", "2"]
    assert cli_main([*drawn, "--json", str(tmp_path / "drawn.json")]) == 0
    volume = json.loads((tmp_path / "drawn.json").read_text())["volume"]
    assert len(volume["dice_per_draw"]) == 2 and volume["dice"] == pytest.approx(np.mean(volume["dice_per_draw"]))
    assert volume["n_volumes"] == 2 and len(volume["per_class"]["6"]["dice_per_draw"]) == 2


def test_jittered_boxes_are_the_same_for_every_model_and_run(monkeypatch):
    """--box-jitter: each image's boxes are moved by a seeded amount that depends on the image, not on the model."""
    import imedsam_hf.evaluation as evaluation

    seen = []
    real = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: seen.append(np.array(a[3])) or real(*a, **k))
    model = tiny_model(query_mode="adaptive")
    processor = IMedSamProcessor(image_size=64)
    pairs = discover_pairs(SHARED_DATA / "Kvasir-SEG-sample")[0][:2]
    exact = mask_box(read_mask(pairs[1].mask))
    for kwargs in (dict(), dict(baseline=True), dict(), dict(jitter_seed=1)):
        evaluate_pairs(model, processor, pairs, output_sizes=[40], box_jitter=0.1, **kwargs)
    np.testing.assert_array_equal(seen[1], seen[3])  # model and baseline: the same boxes for image 1
    np.testing.assert_array_equal(seen[0], seen[4])  # a second run: the same boxes
    assert not np.array_equal(seen[1], exact) and not np.array_equal(seen[1], seen[7])  # moved; another seed, others
    width, height = exact[2] - exact[0], exact[3] - exact[1]
    assert np.all(np.abs(seen[1] - exact) <= 0.1 * np.array([width, height, width, height]) + 1e-3)
    evaluate_pairs(model, processor, pairs[1:], output_sizes=[40], box_jitter=0.1)
    np.testing.assert_array_equal(seen[-1], seen[1])  # the same image gets the same box in a subset


def test_jitter_draws_average_independent_draws_of_the_jittered_boxes(tmp_path, monkeypatch, capsys):
    """--jitter-draws K: every image scored with K independent draws of its jittered boxes, draw 0 the single draw
    of a run without it; the report's numbers are the means over the draws, each draw's Dice kept."""
    import imedsam_hf.evaluation as evaluation

    seen = []
    real = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: seen.append(np.array(a[3])) or real(*a, **k))
    model_dir = tmp_path / "model"
    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(model_dir)
    data = SHARED_DATA / "Kvasir-SEG-sample"
    one = run_evaluation(str(model_dir), data, str(tmp_path / "one.json"), split="all", limit=3, box_jitter=0.2)
    three = run_evaluation(
        str(model_dir), data, str(tmp_path / "three.json"), split="all", limit=3, box_jitter=0.2, jitter_draws=3
    )
    assert len(seen) == 3 + 9
    for image in range(3):  # draw 0 is the single draw; draws 1 and 2 are other boxes
        np.testing.assert_array_equal(seen[image], seen[3 + image])
        assert not np.array_equal(seen[3 + image], seen[6 + image])
        assert not np.array_equal(seen[6 + image], seen[9 + image])
    native = three["results"]["native"]
    assert three["jitter_draws"] == 3 and "jitter_draws" not in one and native["n"] == 3
    assert native["dice_per_draw"][0] == pytest.approx(one["results"]["native"]["dice"], abs=1e-12)
    assert native["dice"] == pytest.approx(np.mean(native["dice_per_draw"]), abs=1e-12)
    rows = (tmp_path / "three.csv").read_text().splitlines()
    assert "jitter_draw" in rows[0].split(",") and len(rows) == 1 + 9
    assert "3 jitter draws" in capsys.readouterr().out
    # Draws of exact boxes would all be the same: refused, naming the flags.
    with pytest.raises(ValueError, match="--jitter-draws 2 .*--box-jitter"):
        run_evaluation(str(model_dir), data, str(tmp_path / "bad.json"), split="all", limit=1, jitter_draws=2)
    assert not (tmp_path / "bad.json").exists()


def test_jitter_draws_of_class_prompted_scans_average_the_per_class_and_volume_scores():
    """With class prompts the per-class and per-scan summaries are averaged over the draws the same way."""
    from imedsam_hf.evaluation import mean_over_draws

    draws = [
        {"dice": 0.8, "hd95": None, "n": 2, "per_class": {"1": {"name": "spleen", "dice": 0.7, "hd95": 3.0, "n": 2}}},
        {"dice": 0.6, "hd95": None, "n": 2, "per_class": {"1": {"name": "spleen", "dice": 0.5, "hd95": None, "n": 2}}},
    ]
    merged = mean_over_draws(draws)
    assert merged["dice"] == pytest.approx(0.7) and merged["dice_per_draw"] == [0.8, 0.6]
    assert merged["hd95"] is None and merged["n"] == 2  # no spacing in any draw: still none; counts as they are
    spleen = merged["per_class"]["1"]
    assert spleen["name"] == "spleen" and spleen["dice"] == pytest.approx(0.6) and spleen["hd95"] == 3.0


def run_evaluation(model: str, data, json_path: str, **options) -> dict:
    """`imedsam evaluate` with `options` as flags; its JSON summary (a ValueError with its message if it failed)."""
    from imedsam_hf.cli import main as cli_main

    argv = ["evaluate", "--model", model, "--data-dir", str(data), "--json", json_path]
    for key, value in options.items():
        flag = "--clicks" if key == "num_clicks" else f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    errors = io.StringIO()
    with contextlib.redirect_stderr(Tee(errors, sys.stderr)):
        code = cli_main(argv)
    if code:
        raise ValueError(errors.getvalue())
    return json.loads(Path(json_path).read_text())


class Tee(io.StringIO):
    """Writes to two streams: what a command prints on stderr, kept and passed on."""

    def __init__(self, *streams):
        super().__init__()
        self.streams = streams

    def write(self, text):
        return [stream.write(text) for stream in self.streams][0]


def test_an_untrained_implicit_decoder_is_never_scored(tmp_path, capsys):
    """A conversion (implicit decoder never trained) is scored by its SAM mask, with a warning; a trained one is not."""
    data = SHARED_DATA / "Kvasir-SEG-sample"
    for trained in (False, True):
        model = tiny_model(implicit_decoder_trained=trained)
        model.save_pretrained(tmp_path / str(trained))
        IMedSamProcessor(image_size=64).save_pretrained(tmp_path / str(trained))
    untrained = run_evaluation(
        str(tmp_path / "False"), str(data), str(tmp_path / "u.json"), split="all", limit=2, baseline="sam"
    )
    assert "warning: " in capsys.readouterr().err.split("implicit decoder was never trained")[0]
    assert untrained["mask_source"] == "sam"
    assert untrained["results"]["native"]["dice"] == untrained["baseline_sam"]["native"]["dice"]
    trained = run_evaluation(str(tmp_path / "True"), str(data), str(tmp_path / "t.json"), split="all", limit=2)
    assert trained["mask_source"] == "implicit_decoder"


def test_click_prompts_score_each_mask_with_its_most_interior_points(tmp_path, monkeypatch):
    """`imedsam evaluate --prompt points --clicks 3`: the model and the baseline get the same clicks, no box."""
    import imedsam_hf.evaluation as evaluation

    seen = []
    real = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: seen.append((a[3], k["points"])) or real(*a, **k))
    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    model.save_pretrained(tmp_path / "m")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "m")
    data = SHARED_DATA / "Kvasir-SEG-sample"
    kwargs = dict(
        split="all", limit=2, prompt="points", num_clicks=3, baseline="sam", baseline_model=str(tmp_path / "m")
    )
    result = run_evaluation(str(tmp_path / "m"), str(data), str(tmp_path / "e.json"), **kwargs)
    assert result["clicks"] == 3 and result["results"]["native"]["n"] == 2 and "baseline_sam" in result
    assert all(box is None and len(points) == 3 for box, points in seen) and seen[0][1] == seen[2][1]
    with pytest.raises(ValueError, match="--clicks 0"):
        run_evaluation(str(tmp_path / "m"), str(data), str(tmp_path / "e.json"), **{**kwargs, "num_clicks": 0})


def test_clicks_given_to_a_model_that_learned_boxes_only_are_named(tmp_path, capsys):
    """LiteMedSAM and MedSAM learned boxes only: one click alone gives Dice 0.05 with the polyp model (0.96 with a
    box). `segment`, `imedsam evaluate --prompt points` and the demo say so; a model that learned clicks is quiet."""
    import warnings

    from conftest import tiny_tinyvit_model

    from imedsam_hf import segment
    from imedsam_hf.inference import clicks_caveat

    box_only = tiny_model(implicit_decoder_trained=True, base_model="litemedsam")
    assert not box_only.config.learned_clicks and not tiny_tinyvit_model().config.learned_clicks
    assert tiny_model().config.learned_clicks and tiny_model(base_model="facebook/sam-vit-base").config.learned_clicks
    assert not tiny_model(name_or_path="wanglab/medsam-vit-base").config.learned_clicks
    assert tiny_model(base_model="litemedsam", training_data={"prompts": ["box", "points"]}).config.learned_clicks
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    processor = IMedSamProcessor(image_size=64)
    for prompt, said in (
        ({"points": [[20, 20]], "labels": [1]}, "clicks without a box give nearly empty masks"),
        ({"points": [[20, 20]], "labels": [1], "box": [5, 5, 30, 30]}, "clicks added to a box"),
        ({"box": [5, 5, 30, 30]}, None),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segment(box_only, image, processor=processor, **prompt)
            segment(tiny_model(implicit_decoder_trained=True), image, processor=processor, **prompt)
        texts = [str(w.message) for w in caught if "learned box prompts only" in str(w.message)]
        assert texts == ([] if said is None else [clicks_caveat(box_only, "box" in prompt)]), prompt
        assert said is None or said in texts[0]
    box_only.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    options = dict(split="all", limit=1, prompt="points")
    run_evaluation(str(tmp_path / "m"), SHARED_DATA / "Kvasir-SEG-sample", str(tmp_path / "e.json"), **options)
    assert "learned box prompts only" in capsys.readouterr().err
    app = load_script("demo/app.py", "imedsam_demo_app_clicks")
    _, _, info = app.segment_request(box_only, processor, image, (0, 0, 0, 0), [(20.0, 20.0, 1)], "native")
    assert "learned box prompts only" in info and "clicks without a box" in info
    texts = [getattr(b, "value", "") for b in app.build_demo(str(tmp_path / "m"), device="cpu").blocks.values()]
    assert any("This model learned box prompts only: give a box." in str(t) for t in texts)


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
def test_overlays_show_the_scored_masks_and_the_prompts_they_came_from(tmp_path):
    """Regression: `--overlays` predicted every image again with its exact box at native size, so with
    `--box-jitter`, clicks, class prompts or TTA the overlay showed a mask that was never scored."""
    from imedsam_hf.evaluation import jittered_boxes, predict_logits
    from imedsam_hf.inference import PROMPT_COLOUR, overlay
    from imedsam_hf.processing_imedsam import to_rgb_array

    model = tiny_model(query_mode="adaptive", implicit_decoder_trained=True)
    processor = IMedSamProcessor(image_size=64)
    pairs = discover_pairs(SHARED_DATA / "Kvasir-SEG-sample")[0][:2]
    folder = tmp_path / "overlays"
    evaluate_pairs(model, processor, pairs, output_sizes=[40, "native"], box_jitter=0.2, jitter_seed=3, overlays=folder)
    for pair in pairs:
        labels, image = read_mask(pair.mask), to_rgb_array(pair.image)
        box = jittered_boxes([mask_box(labels)], 0.2, labels.shape, pair.stem, seed=3)[0]
        predicted = IMedSamProcessor.post_process_masks(predict_logits(model, processor, image, box, [40])[40][None])
        predicted = predicted[0].numpy()
        truth = resize_labels(labels, predicted.shape)
        expected = np.asarray(overlay(image, predicted, truth=truth, boxes=box))
        shown = np.asarray(Image.open(folder / f"{pair.stem}.png"))
        assert shown.shape[:2] == grid_size(labels.shape, 40)  # the first output size, not a native re-prediction
        np.testing.assert_array_equal(shown, expected)
        assert (shown == PROMPT_COLOUR).all(axis=-1).any()  # the jittered box is drawn
    # Clicks: drawn as rings, no box.
    evaluate_pairs(model, processor, pairs[:1], prompt="points", num_clicks=2, overlays=tmp_path / "clicks")
    assert (np.asarray(Image.open(tmp_path / "clicks" / f"{pairs[0].stem}.png")) == PROMPT_COLOUR).all(axis=-1).any()


@pytest.mark.skipif(not (SHARED_DATA / "BTCV-Synapse-CT").is_dir(), reason="shared data missing")
def test_overlays_of_class_prompted_slices_show_every_prompted_organ(tmp_path):
    """Class prompts: one overlay per slice with every scored organ's mask, its truth and its box."""
    from scipy import ndimage

    from imedsam_hf.inference import PROMPT_COLOUR, class_colour

    ct = SHARED_DATA / "BTCV-Synapse-CT"
    pairs = [p for p in discover_pairs(ct)[0] if p.stem == "case0001_slice080"]
    model = tiny_model(query_mode="adaptive", num_classes=13, implicit_decoder_trained=True)
    options = dict(class_prompts=True, mask_classes=13, classes=[6, 8], num_classes=13, overlays=tmp_path / "o")
    evaluate_pairs(model, IMedSamProcessor(image_size=64), pairs, **options)
    shown = np.asarray(Image.open(tmp_path / "o" / "case0001_slice080.png"))
    labels = read_mask(pairs[0].mask, 13)
    outlined = (shown == PROMPT_COLOUR).all(axis=-1)
    for organ in (6, 8):  # each organ's box outline: its top-left corner is drawn
        x0, y0, _, _ = (int(round(v)) for v in mask_box((labels == organ).astype(np.int64)))
        assert outlined[y0, x0]
    liver = labels == 6  # its truth outlined in its colour (all but where its box's lines cover it)
    outline = liver & ~ndimage.binary_erosion(liver)
    in_colour = (shown == class_colour(6)).all(axis=-1)
    assert in_colour[outline].mean() > 0.8 and not in_colour[~liver].any()


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
def test_evaluate_scores_a_dataset_split_as_the_same_folder(tmp_path, capsys):
    """`imedsam evaluate --dataset` scores every row of `--dataset-split` (default test) as `--data-dir` scores the
    same images; a bad row is skipped and named; `--split` picks the run's stems from every labelled split."""
    import datasets

    model = tiny_model(query_mode="adaptive")
    model.save_pretrained(tmp_path / "model")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "model")
    folder = SHARED_DATA / "Kvasir-SEG-sample"
    images = sorted((folder / "images").iterdir())
    rows = {"image": [str(p) for p in images], "label": [str(folder / "masks" / f"{p.stem}.png") for p in images]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    test = datasets.Dataset.from_dict({k: v[:3] for k, v in rows.items()}, features=features)
    test.to_parquet(str(data / "test-00000-of-00001.parquet"))
    bad = {"image": rows["image"][3:], "label": rows["label"][4:] + rows["label"][:1]}  # masks of other images
    datasets.Dataset.from_dict(bad, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    script = load_script("training/evaluate.py", "imedsam_evaluate")
    common = ["--model", str(tmp_path / "model"), "--output-sizes", "32"]
    hub = ["--dataset", str(tmp_path / "hub"), "--mask-column", "label"]
    assert script.main([*common, *hub, "--json", str(tmp_path / "hub.json")]) == 0
    scored = json.loads((tmp_path / "hub.json").read_text())
    assert scored["dataset_split"] == "test" and scored["split"] == "all" and scored["n_images"] == 3
    pick = tmp_path / "pick"
    for name in ("images", "masks"):
        (pick / name).mkdir(parents=True)
        for path in [Path(p) for p in rows["image"][:3]] if name == "images" else []:
            (pick / name / path.name).symlink_to(path)
    for stem in (Path(p).stem for p in rows["image"][:3]):
        (pick / "masks" / f"{stem}.png").symlink_to(folder / "masks" / f"{stem}.png")
    assert script.main([*common, "--data-dir", str(pick), "--split", "all", "--json", str(tmp_path / "dir.json")]) == 0
    assert json.loads((tmp_path / "dir.json").read_text())["results"] == scored["results"]
    argv = [*common, "--data-dir", str(pick), "--mask-column", "label", "--json", str(tmp_path / "x.json")]
    assert script.main(argv) == 2  # a dataset's flag with a folder: said, not ignored
    assert "--mask-column reads the rows of --dataset; a --data-dir folder has images and masks" in (
        capsys.readouterr().err
    )
    splits = {"train": [], "validation": [], "test": ["test-000001", "train-000000", "train-000001"]}
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    capsys.readouterr()
    argv = [
        *common,
        *hub,
        "--split",
        "test",
        "--split-file",
        str(tmp_path / "splits.json"),
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert script.main(argv) == 0
    assert json.loads((tmp_path / "s.json").read_text())["n_images"] == 1  # the two train rows' masks do not fit
    assert f"skipped --dataset {tmp_path / 'hub'} row train-000000: mask is 617x528" in capsys.readouterr().err
    (tmp_path / "splits.json").write_text(json.dumps({**splits, "test": ["cju0qkwl35piu0993l0dewei2"]}))
    assert script.main(argv) == 2  # rows named otherwise than the split file's stems: the flag that names them
    assert "its rows are named like 'train-000000'): name them as the training run did (--stem-column)" in (
        capsys.readouterr().err
    )


def test_dataset_rows_named_by_a_file_column_split_and_stack_by_scan(tmp_path):
    """`--stem-column`: CT slices on the Hub named by file keep a scan's slices together, in training's split (the
    group pattern) and in evaluation's per-volume scores; without it every row is its own group."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.data import dataset_records, make_splits, open_dataset

    stems = ["case0001_slice080", "case0001_slice081", "case0002_slice080", "case0002_slice081"]
    btcv_dataset(tmp_path / "ct", stems)
    records = dataset_records(
        str(tmp_path / "ct"), open_dataset(str(tmp_path / "ct")), ["train"], stem_column="file_name"
    )
    assert list(records["stem"]) == stems
    for seed in range(4):  # two scans, cut 50/50: each scan whole on one side
        cut = make_splits(list(records["stem"]), seed, (0.5, 0.5, 0.0))
        assert {s[:8] for s in cut["train"]} & {s[:8] for s in cut["validation"]} == set()
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "ct"), "--dataset-split"]
    argv += ["train", "--mask-classes", "13", "--classes", "6", "--stem-column", "file_name"]
    assert cli_main([*argv, "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["volume"]["n_volumes"] == 2
    assert cli_main([*argv[:-2], "--stem-column", "path", "--json", str(tmp_path / "bad.json")]) == 2


def test_a_datasets_class_names_come_from_its_id2label(tmp_path, monkeypatch):
    """A dataset names its classes as transformers' semantic-segmentation datasets do, in an `id2label.json` (a
    local dataset folder's, or the Hub repository's): evaluation reports and takes the names."""
    import huggingface_hub

    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.data import dataset_class_names

    btcv_dataset(tmp_path / "ct", ["case0001_slice080", "case0002_slice080"], id2label=True)
    assert dataset_class_names(str(tmp_path / "ct"))[6] == "liver"
    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "ct"), "--dataset-split"]
    assert cli_main([*argv, "train", "--classes", "liver,right kidney", "--json", str(tmp_path / "eval.json")]) == 0
    per_class = json.loads((tmp_path / "eval.json").read_text())["results"]["native"]["per_class"]
    assert {c: v["name"] for c, v in per_class.items()} == {"2": "right kidney", "6": "liver"}

    asked = []

    def download(repo_id, filename, repo_type=None, **kwargs):
        asked.append((repo_id, filename, repo_type))
        return str(tmp_path / "ct" / "id2label.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert dataset_class_names("org/abdomen-ct")[1] == "spleen"
    assert asked == [("org/abdomen-ct", "id2label.json", "dataset")]


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
def test_score_masks_written_by_predict_against_masks_with_a_suffix(tmp_path, capsys):
    """`imedsam score` on 2-D masks: a 0/1 prediction against 0/255 truth named with the folder's suffix (ISIC's
    `_segmentation`) is one structure; the scores are `segmentation_scores`' (pixels)."""
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.metrics import segmentation_scores

    masks = sorted((SHARED_DATA / "Kvasir-SEG-sample" / "masks").iterdir())[:2]
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    expected = []
    for path in masks:
        truth = read_mask(path)
        predicted = np.roll(truth, 7, axis=1)
        Image.fromarray(predicted.astype(np.uint8)).save(tmp_path / "pred" / path.name)  # 0/1
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "pred" / f"{path.stem}_overlay.png")  # predict's
        Image.fromarray((truth * 255).astype(np.uint8)).save(tmp_path / "truth" / f"{path.stem}_segmentation.png")
        expected.append(segmentation_scores(predicted, truth))
    argv = ["score", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--json", str(tmp_path / "s.json")]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["unit"] == "px" and summary["n_cases"] == 2 and list(summary["per_class"]) == ["1"]
    assert summary["per_class"]["1"]["name"] == "foreground"
    assert summary["per_class"]["1"]["dice"] == pytest.approx(np.mean([e["dice"] for e in expected]))
    assert summary["per_class"]["1"]["hd95"] == pytest.approx(np.mean([e["hd95"] for e in expected]))
    assert summary["per_class"]["1"]["nsd"] == pytest.approx(np.mean([e["nsd"] for e in expected]))  # 2 px
    # The spread over cases, as `imedsam evaluate` reports it (metrics.aggregate: population std), and printed.
    assert summary["per_class"]["1"]["dice_std"] == pytest.approx(np.std([e["dice"] for e in expected]))
    assert f"± {summary['per_class']['1']['dice_std']:.4f}" in capsys.readouterr().out
    assert cli_main(["score", str(tmp_path / "pred"), "--truth", str(tmp_path / "nowhere")]) == 2
    assert "--truth" in capsys.readouterr().err


def test_evaluate_takes_a_split_file_of_scans(tmp_path, capsys):
    """`imedsam evaluate --split test --split-file` with the scans' names (the paper's BTCV split is by scan) scored
    nothing: no stem of the file named a slice. The test scan's slices are scored, the training scan's not; nnU-Net's
    folds take `--split-fold`."""
    import shutil

    from imedsam_hf.cli import main as cli_main

    ct, folder = SHARED_DATA / "BTCV-Synapse-CT", tmp_path / "ct"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(ct / "classes.json", folder / "classes.json")
    for stem in ("case0001_slice080", "case0001_slice081", "case0002_slice080"):
        for sub in ("images", "masks"):
            shutil.copy(ct / sub / f"{stem}.png", folder / sub / f"{stem}.png")
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["case0001"], "test": ["case0002"]}))
    (tmp_path / "folds.json").write_text(json.dumps([{"train": ["case0002"], "val": ["case0001"]}] * 2))
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(folder), "--classes", "6"]
    for extra, scored in (
        (["--split", "test", "--split-file", str(tmp_path / "split.json")], 1),
        (["--split", "train", "--split-file", str(tmp_path / "split.json")], 2),
        (["--split", "validation", "--split-file", str(tmp_path / "folds.json"), "--split-fold", "1"], 2),
    ):
        assert cli_main([*argv, *extra, "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["results"]["native"]["per_class"]["6"]["n"] == scored, extra
    assert cli_main([*argv, "--split", "validation", "--split-file", str(tmp_path / "folds.json"), "--json", "x"]) == 2
    assert "--split-file" in (err := capsys.readouterr().err) and "give --split-fold 0..1" in err
