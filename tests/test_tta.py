"""Test-time mirroring (`tta`): the mirrored image and prompts, the average mirrored back, and every path that takes it
(`segment`, `predict_logits`/`imedsam evaluate`, `segment_volume`, `imedsam predict`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, load_script, tiny_model
from PIL import Image

from imedsam_hf.cli import main
from imedsam_hf.evaluation import predict_logits
from imedsam_hf.inference import segment
from imedsam_hf.processing_imedsam import (
    TTA_MIRRORS,
    mirror_image,
    mirror_prompts,
    mirrored_mean,
    processor_for_config,
    to_rgb_array,
    tta_mirrors,
)
from imedsam_hf.volumes import encode_slice, segment_volume

KVASIR = SHARED_DATA / "Kvasir-SEG-sample"


def picture(height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3)).astype(np.uint8)


def test_mirrored_prompts_land_on_the_same_pixels():
    """A box's corners are its first and last pixels: mirrored, they are those pixels' mirrors (W - 1 - x)."""
    mask = np.zeros((40, 56), bool)
    mask[5:12, 3:20] = True
    image = picture()
    for mirror, flip in (("h", (1,)), ("v", (0,)), ("hv", (0, 1))):
        box = [3.0, 5.0, 19.0, 11.0]
        mirrored_mask = np.flip(mask, flip)
        ys, xs = np.nonzero(mirrored_mask)
        assert mirror_prompts(box, mirror, mask.shape) == [xs.min(), ys.min(), xs.max(), ys.max()]
        point = mirror_prompts([[4.0, 6.0]], mirror, mask.shape)[0]
        assert mirrored_mask[int(point[1]), int(point[0])]
        mirrored, size = mirror_image(image, mirror)
        assert size == (40, 56) and np.array_equal(mirrored, np.flip(image, flip))
    assert mirror_prompts(None, "h", (40, 56)) is None
    assert mirror_prompts([[0.0, 0.0, 56.0, 40.0]], "hv", (40, 56)) == [[0.0, 0.0, 55.0, 39.0]]  # kept in the frame


def test_mirror_image_keeps_the_representation():
    """A PIL image stays PIL (its mode and 8 bits), an array its dtype and layout: read as the original would be."""
    array = picture()
    pil = Image.fromarray(array)
    mirrored, size = mirror_image(pil, "h")
    assert isinstance(mirrored, Image.Image) and size == (40, 56)
    np.testing.assert_array_equal(np.asarray(mirrored), array[:, ::-1])
    channels_first = torch.from_numpy(array).permute(2, 0, 1).float()
    mirrored, size = mirror_image(channels_first, "v")
    assert size == (40, 56) and mirrored.shape == (3, 40, 56)
    np.testing.assert_array_equal(to_rgb_array(mirrored), to_rgb_array(channels_first)[::-1])
    grey16 = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    mirrored, _ = mirror_image(grey16, "hv")
    assert mirrored.dtype == np.uint16  # min/max rescaling sees the same values: the same intensities, mirrored
    np.testing.assert_array_equal(to_rgb_array(mirrored), to_rgb_array(grey16)[::-1, ::-1])


def test_unknown_tta_is_named():
    with pytest.raises(ValueError, match=r"`tta` must be one of none, h, v, hv.*'x'"):
        tta_mirrors("x")
    with pytest.raises(ValueError, match="`tta`"):
        segment(tiny_model(implicit_decoder_trained=True), picture(), box=[3, 5, 19, 11], tta="both")
    assert TTA_MIRRORS["hv"][0] == ""  # the image as given first: its prompts are checked as the user gave them


def test_segment_with_tta_is_the_mean_of_the_mirrors_mirrored_back():
    model = tiny_model(implicit_decoder_trained=True)
    image, boxes = picture(), [[3.0, 5.0, 19.0, 11.0], [20.0, 2.0, 50.0, 30.0]]
    plain = segment(model, image, box=boxes)
    assert segment(model, image, box=boxes, tta="none").probabilities.tolist() == plain.probabilities.tolist()
    result = segment(model, image, box=boxes, tta="hv")
    parts = []
    for mirror in TTA_MIRRORS["hv"]:
        mirrored, size = mirror_image(image, mirror)
        parts.append(torch.from_numpy(segment(model, mirrored, box=mirror_prompts(boxes, mirror, size)).probabilities))
    expected = mirrored_mean(parts, TTA_MIRRORS["hv"]).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert result.mask.shape == (2, 40, 56) and np.array_equal(result.mask, expected[:, 0] > 0.5)
    # One box, an output size of its own: the grid is mirrored back as the image is.
    single = segment(model, image, box=boxes[0], output_size=(20, 28), tta="h")
    assert single.mask.shape == (20, 28) and single.probabilities.shape == (1, 20, 28)
    # A mirror-symmetric image and box give a mirror-symmetric average.
    symmetric = np.concatenate([image[:, :28], image[:, :28][:, ::-1]], axis=1)
    both = segment(model, symmetric, box=[10.0, 5.0, 45.0, 30.0], tta="h").probabilities[0]
    np.testing.assert_allclose(both, both[:, ::-1], atol=1e-6)


def test_an_image_file_is_read_once_for_all_its_mirrors(tmp_path, monkeypatch):
    import imedsam_hf.processing_imedsam as processing

    path = tmp_path / "image.png"
    Image.fromarray(picture()).save(path)
    reads = []
    original = processing.opened_image
    monkeypatch.setattr(processing, "opened_image", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    model = tiny_model(implicit_decoder_trained=True)
    from_file = segment(model, str(path), box=[3, 5, 19, 11], tta="hv")
    assert reads == [str(path)]
    processor = processor_for_config(model.config)
    predict_logits(model, processor, str(path), [3, 5, 19, 11], tta="hv")
    assert reads == [str(path)] * 2
    np.testing.assert_allclose(
        from_file.probabilities, segment(model, picture(), box=[3, 5, 19, 11], tta="hv").probabilities, atol=1e-6
    )


def test_segment_with_tta_checks_prompts_and_embeddings():
    model = tiny_model(implicit_decoder_trained=True)
    with pytest.raises(ValueError, match=r"box \[30.0, 5.0, 19.0, 11.0\] needs x0 < x1"):
        segment(model, picture(), box=[30, 5, 19, 11], tta="h")  # the user's box, not its mirror, is named
    processor = processor_for_config(model.config)
    embeddings = encode_slice(model, processor, picture(), tta="h")
    assert isinstance(embeddings, list) and len(embeddings) == 2
    given = segment(model, picture(), box=[3, 5, 19, 11], tta="h", image_embeddings=embeddings)
    np.testing.assert_allclose(
        given.probabilities, segment(model, picture(), box=[3, 5, 19, 11], tta="h").probabilities, atol=1e-6
    )
    with pytest.raises(ValueError, match="one per mirror"):
        segment(model, picture(), box=[3, 5, 19, 11], tta="hv", image_embeddings=embeddings)
    with pytest.raises(ValueError, match="tta='none'"):
        segment(model, picture(), box=[3, 5, 19, 11], image_embeddings=embeddings)


def test_predict_logits_with_tta_matches_segment():
    model = tiny_model(implicit_decoder_trained=True)
    processor = processor_for_config(model.config)
    image, box = picture(), [3.0, 5.0, 19.0, 11.0]
    logits = predict_logits(model, processor, image, box, tta="hv")["native"]
    expected = segment(model, image, box=box, processor=processor, tta="hv").probabilities
    np.testing.assert_allclose(logits.sigmoid().numpy(), expected, atol=1e-5)


def test_segment_volume_with_tta_runs_every_mirror_of_every_slice(monkeypatch):
    import imedsam_hf.volumes as volumes_module

    model = tiny_model(implicit_decoder_trained=True)
    labels = np.zeros((24, 20, 5), np.uint8)
    labels[4:14, 6:15, 1:4] = 2
    images = np.random.default_rng(1).integers(0, 256, size=labels.shape).astype(np.uint8)
    seen = []
    original = volumes_module.segment
    monkeypatch.setattr(volumes_module, "segment", lambda *a, **k: seen.append(k["tta"]) or original(*a, **k))
    predicted = segment_volume(model, images, boxes_3d={2: [4, 6, 1, 13, 14, 3]}, progress=False, tta="v")
    assert seen == ["v"] * 3 and predicted.shape == labels.shape
    with pytest.raises(ValueError, match="`tta`"):
        segment_volume(model, images, label_volume=labels, progress=False, tta="sideways")


def test_evaluate_and_predict_take_tta(tmp_path, capsys):
    model = tiny_model(implicit_decoder_trained=True)
    model.save_pretrained(tmp_path / "tiny")
    args = ["--model", str(tmp_path / "tiny"), "--device", "cpu"]
    report = tmp_path / "r.json"
    assert main(["evaluate", *args, "--data-dir", str(KVASIR), "--split", "all", "--limit", "2", "--tta", "h",
                 "--output-sizes", "48", "--baseline", "--json", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert result["tta"] == "h" and result["n_images"] == 2 and "baseline_sam" in result
    image = sorted((KVASIR / "images").iterdir())[0]
    out = tmp_path / "masks"
    assert main(["predict", *args, str(image), "--box", "10,20,300,400", "--tta", "hv", "--output-size", "40x48",
                 "--out", str(out)]) == 0  # fmt: skip
    assert len(list(out.glob("*.png"))) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", *args, str(image), "--box", "10,20,300,400", "--tta", "flip", "--out", str(out)])
    assert "--tta" in capsys.readouterr().err


def test_the_card_section_on_mirroring_is_written_from_the_reports(tmp_path):
    """`scripts/write_model_cards.py mirroring`: every number from the reports, placed before "Intended use", and
    written again in place (not twice)."""

    cards = load_script("scripts/write_model_cards.py", "write_model_cards")

    def report(model: float, zero_shot: float, tta: str | None = None, jitter: float = 0.0) -> dict:
        organs = {"1": {"name": "spleen", "dice": model + 0.01}, "2": {"name": "aorta", "dice": model - 0.01}}
        native = {"class_mean": {"dice": model}, "per_class": organs}
        baseline = {"native": {"class_mean": {"dice": zero_shot}}, "volume": {"dice": zero_shot - 0.01}}
        hd95 = {"1": 2.0, "2": 6.0 if tta else 4.0}  # mirroring moves the aorta's boundary outliers
        volume = {
            "dice": model - 0.01,
            "hd95": sum(hd95.values()) / 2,
            "per_class": {k: {"name": organs[k]["name"], "dice": model, "hd95": hd95[k]} for k in organs},
        }
        return {"model": "m", "data_dir": "d", "box_jitter": jitter, "results": {"native": native},
                "volume": volume, "baseline_sam": baseline, **({"tta": tta} if tta else {})}  # fmt: skip

    card = tmp_path / "card.md"
    card.write_text("# m\n\n## Results\n\nx\n\n## Intended use and limitations\n\n- research\n")
    for argv in ([], ["--jitter", "j.json", "--tta-jitter", "tj.json"]):
        files = {"e.json": report(0.885, 0.833), "t.json": report(0.891, 0.840, "hv")}
        files.update({"j.json": report(0.878, 0.801, jitter=0.1), "tj.json": report(0.884, 0.806, "hv", 0.1)})
        for name, content in files.items():
            (tmp_path / name).write_text(json.dumps(content))
        arguments = ["mirroring", "--output", str(card), "--exact", "e.json", "--tta-exact", "t.json", *argv]
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert cards.main(arguments) == 0
        finally:
            os.chdir(cwd)
    text = card.read_text()
    assert text.count("## With test-time mirroring") == 1 and text.index("mirroring") < text.index("## Intended use")
    assert "| exact boxes, per slice | 0.833 | 0.840 | 0.885 | **0.891** |" in text
    assert "| every box side moved by up to 10%, per volume (3-D) | 0.791 | 0.796 | 0.868 | **0.874** |" in text
    assert (
        "`--tta hv`, 4 encoder and decoder passes" in text and "runs from +0.6 points (aorta) to +0.6 (spleen)" in text
    )
    assert (
        "13-organ HD95 goes from 3.00 to 4.00 mm mirrored (most on the aorta: 4.00 -> 6.00 mm, 3-D Dice 0.885 -> 0.891)"
        in text
    )
    with pytest.raises(ValueError, match="--tta-exact"):
        cards.mirroring_section(report(0.9, 0.8), report(0.9, 0.8))  # a report made without --tta
