"""Masks read as what they hold, empty masks never scored as a free Dice 1.0, one image per mask stem (issue 13,
items 1 and 5). Every test works on re-encoded or damaged copies of real shared images, written to `tmp_path`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_model
from PIL import Image

from imedsam_hf import IMedSamProcessor
from imedsam_hf.cli import main as cli_main
from imedsam_hf.data import (
    discover_pairs,
    validate_pairs,
)

KVASIR = SHARED_DATA / "Kvasir-SEG-sample"
BTCV = SHARED_DATA / "BTCV-Synapse-CT"
pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason="shared data not available")


def copy_pairs(root, count=2, source=KVASIR):
    """The first `count` pairs of a shared set, copied into `root/images`, `root/masks`; their stems."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pairs = discover_pairs(source)[0][:count]
    for pair in pairs:
        shutil.copy(pair.image, root / "images")
        shutil.copy(pair.mask, root / "masks")
    return [pair.stem for pair in pairs]


def truth(stem):
    return np.asarray(Image.open(KVASIR / "masks" / f"{stem}.png")) > 0


def split_in_two(foreground, low, high):
    """A class-id mask: the left half of the foreground `low`, the right half `high`."""
    labels = np.zeros(foreground.shape, np.uint8)
    middle = int(np.nonzero(foreground)[1].mean())
    labels[:, :middle][foreground[:, :middle]] = low
    labels[:, middle:][foreground[:, middle:]] = high
    return labels


def palette_png(indices, path):
    """`indices` saved as a palette PNG with PASCAL VOC's colours (1: dark red, 2: dark green)."""
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253)
    image.save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model(query_mode="adaptive").save_pretrained(folder)
    IMedSamProcessor(image_size=64).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- item 5: one stem
def test_two_images_of_one_stem_are_an_error_listing_both(tmp_path, capsys):
    stems = copy_pairs(tmp_path, 2)
    jpg = tmp_path / "images" / f"{stems[0]}.jpg"
    png = jpg.with_suffix(".png")
    Image.open(jpg).save(png)  # the same stem as a second file: both would take masks/<stem>.png
    pairs, problems = discover_pairs(tmp_path)
    assert [p.stem for p in pairs] == [stems[1]]
    assert len(problems) == 1 and str(jpg) in str(problems[0]) and str(png) in str(problems[0])
    assert "neither is used" in str(problems[0])
    with pytest.raises(ValueError, match="1 unusable file") as raised:
        validate_pairs(pairs, on_error="fail", problems=problems)
    assert str(png) in str(raised.value)
    shutil.copy(KVASIR / "masks" / f"{stems[1]}.png", tmp_path / "masks" / f"{stems[1]}.bmp")
    pairs, problems = discover_pairs(tmp_path)
    assert pairs == [] and "2 masks share its stem" in str(problems[1])


def test_imedsam_evaluate_lists_same_stem_images_as_skipped(tmp_path, model_dir, capsys):
    stems = copy_pairs(tmp_path / "data", 2)
    jpg = tmp_path / "data" / "images" / f"{stems[0]}.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    argv = ["evaluate", "--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--split", "all"]
    assert cli_main([*argv, "--output-sizes", "32", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert f"skipped {jpg}: {jpg.with_suffix('.png')} has the same stem" in out
    assert json.loads((tmp_path / "out.json").read_text())["n_images"] == 1
