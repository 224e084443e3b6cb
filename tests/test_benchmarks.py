"""The benchmarks' shared measurement helpers, and the ablation's orchestration on a tiny SAM and a few real images
(seconds, not the real study)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA, load_script
from test_convert import TINY_SAM
from transformers import SamConfig, SamModel


def load_benchmark(name: str):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        module = load_script(f"benchmarks/{name}.py", f"imedsam_{name}")
        return module
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))


def test_cpu_peak_memory_is_the_peak_of_each_block_alone():
    common = load_benchmark("common")
    with common.peak_memory(torch.device("cpu")) as big:
        block = torch.ones(64 * 2**20)  # 256 MiB
        del block
    with common.peak_memory(torch.device("cpu")) as small:
        block = torch.ones(4 * 2**20)  # 16 MiB
        del block
    assert 250 <= big["peak_mib"] <= 300
    # The first block's peak does not leak into the second's (the kernel's peak RSS is reset per block).
    assert 15 <= small["peak_mib"] <= 60


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG-sample").is_dir(), reason="shared data missing")
@pytest.mark.slow
def test_ablation_runs_every_variant_and_refine_ratio(tmp_path):
    torch.manual_seed(0)
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(tmp_path / "sam")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"model: {{backbone: {tmp_path / 'sam'}, config_overrides: {{coarse_hidden_sizes: [32, 16], "
        "coarse_feature_size: 8, fine_hidden_sizes: [16, 8]}}\n"
        "training: {epochs: 1, batch_size: 2, report_to: none}\nevaluation: {output_sizes: [native, 32]}\n"
    )
    ablation = load_benchmark("ablation")
    result = ablation.main(
        [
            "--config", str(config), "--data_dir", str(SHARED_DATA / "Kvasir-SEG-sample"),
            "--output_dir", str(tmp_path / "runs"), "--variants", "lora_only", "all",
            "--refine_ratios", "0", "--jitter", "0.1", "--reference", "all", "--zero_shot",
            "--baseline_model", str(tmp_path / "sam"),
        ]
    )  # fmt: skip
    runs = [(row["run"], row["boxes"], row["output"]) for row in result["rows"]]
    sizes = [("exact", "native"), ("exact", "32"), ("jitter 0.1", "native")]
    assert runs == [(run, *size) for run in ("lora_only", "all", "all, refine 0") for size in sizes]
    assert all(0 <= row["dice"] <= 1 for row in result["rows"])
    assert (tmp_path / "runs" / "ablation.json").is_file()
    # Every other run and the backbone's own mask, paired with the reference image by image, exact and jittered.
    paired = [(row["run"], row["boxes"]) for row in result["paired_vs_reference"]]
    assert paired == [
        (run, boxes) for boxes in ("exact", "jitter 0.1") for run in ("lora_only", "all, refine 0", "zero-shot")
    ]
    assert all(row["n"] == result["rows"][0]["n"] and 0 <= row["p"] <= 1 for row in result["paired_vs_reference"])
    jittered = json.loads((tmp_path / "runs" / "all" / "jitter_0.1.json").read_text())
    assert (jittered["box_jitter"], jittered["jitter_seed"], jittered["split"]) == (0.1, 0, "test")

    # A finished sweep is read back, not retrained (an interrupted one resumes).
    ablation.load_train_script = lambda: pytest.fail("a finished run was trained again")
    again = ablation.main(["--config", str(config), "--data_dir", str(SHARED_DATA / "Kvasir-SEG-sample"),
                           "--output_dir", str(tmp_path / "runs"), "--variants", "lora_only", "all",
                           "--refine_ratios", "0", "--jitter", "0.1", "--reference", "all"])  # fmt: skip
    assert again["rows"] == result["rows"]


def test_compare_runs_pairs_images_by_size_and_stem(tmp_path):
    compare_runs = load_benchmark("compare_runs")
    stems = [f"img{i}" for i in range(8)]
    run = tmp_path / "eval_per_image.jsonl"  # train.py's format: model rows unmarked, zero-shot rows marked
    lines = [{"stem": s, "size": "native", "dice": 0.9 + 0.01 * i} for i, s in enumerate(stems)]
    lines += [{"stem": s, "size": "native", "dice": 0.8, "model": "baseline_sam"} for s in stems]
    run.write_text("\n".join(json.dumps(line) for line in lines))
    other = tmp_path / "test.csv"  # evaluate.py's format, rows in another order
    other.write_text("model,size,stem,dice\n" + "".join(f"imedsam,native,{s},0.9\n" for s in reversed(stems)))
    result = compare_runs.main([str(run), str(run), "--model_b", "baseline_sam"])
    (row,) = result["rows"]
    assert row["n"] == 8 and row["a_higher"] == 8 and row["wilcoxon_p"] < 0.01
    assert abs(row["mean_difference"] - (0.935 - 0.8)) < 1e-9
    (row,) = compare_runs.main([str(run), str(other)])["rows"]
    assert row["a_higher"] == 7 and abs(row["mean_difference"] - 0.035) < 1e-9
    with pytest.raises(SystemExit, match="models in the file"):
        compare_runs.main([str(run), str(other), "--model_b", "nope"])
    # `imedsam evaluate --jitter-draws K`: an image's K rows are its draws, averaged into its value.
    drawn = tmp_path / "drawn.csv"
    drawn.write_text(
        "model,size,stem,dice,jitter_draw\n"
        + "".join(f"imedsam,native,{s},{d},{k}\n" for s in stems for k, d in enumerate((0.8, 1.0)))
    )
    (row,) = compare_runs.main([str(drawn), str(other)])["rows"]
    assert row["n"] == 8 and abs(row["mean_a"] - 0.9) < 1e-9 and row["wilcoxon_p"] == 1.0
    # Two rows of one image otherwise: refused (the second would silently have replaced the first).
    twice = tmp_path / "twice.csv"
    twice.write_text(other.read_text() + "imedsam,native,img0,0.5\n")
    with pytest.raises(SystemExit, match="several 'dice' rows of model 'imedsam' for img0"):
        compare_runs.main([str(twice), str(run)])


def test_training_step_benchmark_times_the_frozen_encoder_step_too(tmp_path, monkeypatch):
    from conftest import tiny_model

    benchmark = load_benchmark("training_step")
    monkeypatch.setattr(benchmark, "build_model", lambda backbone, **overrides: tiny_model(**overrides))
    result = benchmark.main(
        ["--batch_size", "2", "--train_points", "64", "--repeats", "1", "--json", str(tmp_path / "step.json")]
    )
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"i-medsam", "lora-only", "i-medsam, frozen encoder"}
    # frozen: the same model less the encoder's LoRA and frequency adapter
    assert 0 < rows["i-medsam, frozen encoder"]["trainable_params"] < rows["i-medsam"]["trainable_params"]
    assert rows["i-medsam, frozen encoder"]["time_vs_i_medsam"] > 0 and (tmp_path / "step.json").is_file()


def test_multi_prompt_benchmark_times_both_ways_and_checks_they_agree(tmp_path):
    from conftest import tiny_model

    tiny_model(query_mode="adaptive").save_pretrained(tmp_path / "model")
    ct = SHARED_DATA / "BTCV-Synapse-CT"
    result = load_benchmark("multi_prompt").main(
        [
            "--image", str(ct / "images" / "case0039_slice068.png"), "--mask", str(ct / "masks" / "case0039_slice068.png"),
            "--model", str(tmp_path / "model"), "--repeats", "1", "--json", str(tmp_path / "multi.json"),
        ]
    )  # fmt: skip
    assert result["rows"][0]["prompts"] == len(result["classes"]) == 12
    assert result["max_probability_difference"] < 1e-5
    assert result["rows"][1]["vs_one_call"] > 0 and (tmp_path / "multi.json").is_file()


def test_query_region_benchmark_pairs_box_and_image_querying(tmp_path, polyps):
    from conftest import tiny_model

    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    result = load_benchmark("query_region").main(
        ["--model", str(tmp_path / "model"), "--data_dir", str(polyps), "--split", "all", "--jitter", "0", "0.1",
         "--json", str(tmp_path / "query.json")]
    )  # fmt: skip
    assert [row["boxes"] for row in result["rows"]] == ["exact", "jitter 0.1"]
    for row in result["rows"]:  # the same five images, both ways
        assert row["n"] == 5 and 0 <= row["dice_box"] <= 1 and 0 <= row["dice_image"] <= 1
        assert row["s_per_image_box"] > 0 and row["s_per_image_image"] > 0
    assert (tmp_path / "query.json").is_file()


def test_upscale_window_benchmark_pairs_windows_and_the_frame(tmp_path, polyps):
    """The paired window-vs-frame benchmark on a tiny model (a random SAM head's mask reaches every window's edge, so
    each prompt falls back to the frame: the two agree exactly)."""
    from conftest import tiny_model

    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    result = load_benchmark("upscale_window").main(
        ["--model", str(tmp_path / "model"), "--data_dir", str(polyps), "--split", "all", "--jitter", "0", "0.1",
         "--limit", "3", "--json", str(tmp_path / "window.json")]
    )  # fmt: skip
    assert [row["boxes"] for row in result["rows"]] == ["exact", "jittered 0.1"]
    for row in result["rows"]:
        assert row["structures"] == 3 and row["structures_differing"] == 0 and row["mean_difference"] == 0
        assert row["decode_s_per_image_window"] > 0 and row["decode_s_per_image_frame"] > 0
    assert (tmp_path / "window.json").is_file()


def test_volume_benchmark_times_a_volume_and_its_encoder(tmp_path):
    """benchmarks/volume.py on a small crop of a real scan: the encoder runs once per slice with organs."""
    import nibabel as nib
    import numpy as np
    from conftest import tiny_model

    tiny_model(query_mode="adaptive", implicit_decoder_trained=True).save_pretrained(tmp_path / "model")
    ct = SHARED_DATA / "BTCV-Synapse-CT"
    paths = {}
    for kind in ("volumes", "labels"):  # 8 slices of case0001 around the kidneys
        image = nib.load(ct / kind / "case0001.nii.gz")
        paths[kind] = tmp_path / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 60:68], image.affine, image.header), paths[kind])
    result = load_benchmark("volume").main(
        ["--volume", str(paths["volumes"]), "--labels", str(paths["labels"]), "--model", str(tmp_path / "model"),
         "--device", "cpu", "--protocol", "labels", "boxes3d", "--json", str(tmp_path / "volume.json")]
    )  # fmt: skip
    labelled = int((np.asarray(nib.load(paths["labels"]).dataobj) > 0).any(axis=(0, 1)).sum())
    for row in result["rows"]:  # each slice with an organ encoded once, whatever the number of organs or the protocol
        assert row["slices"] == 8 and 0 < row["slices_encoded"] <= labelled and 0 < row["encoder_share"] < 1
        assert row["seconds_with_startup"] > row["seconds"] and row["per_class"]
    assert [row["protocol"] for row in result["rows"]] == ["labels", "boxes3d"] and (tmp_path / "volume.json").is_file()
    # The scan and its labels stored RAS and LPS (`--stored-as`), the orientation recorded; the scores are those of
    # the scan as stored (this tiny model's masks would not tell mirrored slices apart: test_volumes checks the slices
    # a model sees).
    for codes in ("RAS", "LPS"):
        turned = load_benchmark("volume").main(
            ["--volume", str(paths["volumes"]), "--labels", str(paths["labels"]), "--model", str(tmp_path / "model"),
             "--device", "cpu", "--protocol", "boxes3d", "--stored-as", codes]
        )  # fmt: skip
        assert turned["stored_as"] == codes and turned["rows"][0]["per_class"] == result["rows"][1]["per_class"]


def test_btcv_volumes_runs_every_protocol_on_shared_embeddings(tmp_path):
    """A scan of PNG slices through three protocols: rows per protocol, each charged the encoding of the slices it
    visited (the embeddings are shared, so the later protocols' own encoding took no time)."""
    import numpy as np
    from conftest import tiny_model
    from PIL import Image

    module = load_benchmark("btcv_volumes")
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "tiny")
    data = tmp_path / "scans"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for z in range(5):
        mask = np.zeros((20, 24), np.uint8)
        mask[4:12, 5:15] = 1 if z else 0
        mask[13:18, 2:9] = 2
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(
            data / "images" / f"caseA_slice{z:03d}.png"
        )
        Image.fromarray(mask).save(data / "masks" / f"caseA_slice{z:03d}.png")
    (data / "cases.csv").write_text("case,spacing_mm\ncaseA,1.0x1.0x3.0\n")
    result = module.main(["--data_dir", str(data), "--model", str(tmp_path / "tiny"), "--protocol", "labels",
                          "boxes3d", "keyslice", "--num_threads", "1", "--json", str(tmp_path / "v.json"),
                          "--overlays", str(tmp_path / "o")])  # fmt: skip
    rows = {row["protocol"]: row for row in result["rows"]}
    assert set(rows) == {"labels", "boxes3d", "keyslice"} and all(row["scans"] == 1 for row in rows.values())
    assert sorted(p.parent.name for p in (tmp_path / "o" / "tiny").glob("*/caseA.png")) == sorted(rows)
    assert all(row["seconds_per_volume"] > 0 and set(row["per_class"]) == {"1", "2"} for row in rows.values())


def test_btcv_volumes_says_where_a_protocol_loses():
    """`where_lost`: slices left empty and Dice at the ends of an organ's z range against its middle."""
    import numpy as np

    module = load_benchmark("btcv_volumes")
    labels = np.zeros((4, 4, 8), np.uint8)
    labels[1:3, 1:3, :] = 2
    predicted = labels.copy()
    predicted[:, :, [0, 7]] = 0  # a propagation that stopped one slice short at both ends
    counts = module.where_lost(predicted, labels, 2)
    assert counts["slices"] == 8 and counts["missed"] == 2
    summary = module.summarize_losses([counts, module.where_lost(labels, labels, 2)])
    assert summary["missed_slices"] == 2 / 16 and summary["dice_middle"] == 1.0
    # the ends (2 slices at either end, 16 voxels per scan): 8 + 16 overlapping, 24 + 32 in prediction and truth
    assert summary["dice_ends"] == 2 * (8 + 16) / (24 + 32)


def test_interactive_rounds_lays_out_a_scan_of_slices_as_its_staged_volume(tmp_path):
    """A scan kept only as PNG slices (BTCV's validation scans) is laid out as a challenge case as its staged NIfTI
    would be: the same `imgs`, `gts`, boxes, key slices, and `cases.csv`'s spacing in `(z, y, x)`."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from imedsam_hf.volumes import place_slice

    module = load_benchmark("interactive_rounds")
    rng = np.random.default_rng(0)
    image, labels = np.zeros((24, 20, 5), np.uint8), np.zeros((24, 20, 5), np.uint8)
    staged, slices = tmp_path / "staged", tmp_path / "slices"
    for folder in (staged / "volumes", staged / "labels", slices / "images", slices / "masks"):
        folder.mkdir(parents=True)
    for z in range(5):
        picture, mask = rng.integers(0, 256, (20, 24), dtype=np.uint8), np.zeros((20, 24), np.uint8)
        mask[3 + z : 11, 5:15], mask[13:18, 2 : 4 + z] = 1, 2
        place_slice(image, z, picture)
        place_slice(labels, z, mask)
        Image.fromarray(picture).save(slices / "images" / f"caseA_slice{z + 7:03d}.png")
        Image.fromarray(mask).save(slices / "masks" / f"caseA_slice{z + 7:03d}.png")
    (slices / "cases.csv").write_text("case,spacing_mm\ncaseA,0.8x0.8x3.0\n")
    affine = np.diag([-0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), staged / "volumes" / "caseA.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), staged / "labels" / "caseA.nii.gz")
    from_slices, from_nifti = module.challenge_case(slices, "caseA"), module.challenge_case(staged, "caseA")
    for left, right in zip(from_slices[:5], from_nifti[:5]):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    assert from_slices[5] == pytest.approx((3.0, 0.8, 0.8)) and from_nifti[5] == pytest.approx((3.0, 0.8, 0.8))
    assert from_slices[2].tolist() == [[5, 5, 0, 14, 10, 4], [2, 13, 0, 5, 17, 4]]
    with pytest.raises(SystemExit, match="caseB"):
        module.challenge_case(slices, "caseB")
