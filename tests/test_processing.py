"""IMedSamProcessor: geometry of non-square images, prompt scaling, image modes, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

import imedsam_hf  # noqa: F401
from imedsam_hf import IMedSamProcessor
from imedsam_hf.modeling_imedsam import sam_mask_on_grid
from imedsam_hf.processing_imedsam import to_rgb_array


def rectangle_mask(height, width, box):
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return mask


@pytest.mark.parametrize("height, width", [(37, 53), (61, 29), (64, 64), (101, 23)])
def test_masks_land_on_the_right_pixels_of_odd_non_square_images(height, width):
    processor = IMedSamProcessor(image_size=64)
    box = (width // 5, height // 4, width // 5 + max(2, width // 2), height // 4 + max(2, height // 2))
    mask = rectangle_mask(height, width, box)
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    batch = processor(image, input_boxes=box)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    resized = tuple(batch["reshaped_input_sizes"][0].tolist())
    assert max(resized) == 64
    # Box corners move exactly like the mask into the frame.
    frame_mask = processor.resize_mask(mask > 0, resized)
    ys, xs = torch.nonzero(frame_mask, as_tuple=True)
    x0, y0, x1, y1 = batch["input_boxes"][0].tolist()
    assert abs(xs.min().item() - x0) <= 1 and abs(ys.min().item() - y0) <= 1
    assert abs(xs.max().item() + 1 - x1) <= 1.5 and abs(ys.max().item() + 1 - y1) <= 1.5
    # A perfect frame-level prediction comes back on the original pixels.
    logits = (frame_mask.float() * 2 - 1)[None, None] * 10
    back = sam_mask_on_grid(logits, 64, (height, width), batch["output_region"])
    predicted = IMedSamProcessor.post_process_masks(back)[0].numpy()
    truth = mask > 0
    iou = (predicted & truth).sum() / (predicted | truth).sum()
    assert predicted.shape == (height, width) and iou > 0.8
    assert abs(np.argwhere(predicted).mean(0) - np.argwhere(truth).mean(0)).max() <= 1.0


def test_padding_is_bottom_right_and_normalisation_modes():
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    sam = IMedSamProcessor(image_size=32)(image)
    assert tuple(sam["reshaped_input_sizes"][0].tolist()) == (16, 32)
    values = sam["pixel_values"][0]
    assert torch.all(values[:, 16:] == 0) and torch.allclose(values[0, :16], torch.tensor((200 - 123.675) / 58.395))
    lite = IMedSamProcessor(image_size=32, normalization="minmax")(np.arange(800).reshape(20, 40).astype(np.uint16))
    inside = lite["pixel_values"][0, :, :16]
    assert inside.min() == 0 and inside.max() == 1


def test_points_are_scaled_and_padded():
    processor = IMedSamProcessor(image_size=50)
    batch = processor(
        [np.zeros((100, 200, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)],
        input_points=[[[100, 50]], [[10, 20], [30, 40]]],
        input_labels=[[1], [1, 0]],
    )
    assert batch["input_points"].shape == (2, 2, 2)
    assert batch["input_points"][0, 0].tolist() == [25.0, 12.5]
    assert batch["input_labels"].tolist() == [[1, -10], [1, 0]]


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((10, 12), np.uint8),
        np.zeros((10, 12, 4), np.uint8),
        np.arange(120, dtype=np.uint16).reshape(10, 12) * 500,
        np.random.default_rng(0).random((10, 12, 3)).astype(np.float32),
        np.zeros((10, 12, 1), np.uint8),
    ],
)
def test_image_modes_become_rgb_0_255(array):
    rgb = to_rgb_array(array)
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 255


def test_pil_modes(tmp_path):
    for mode in ("L", "RGBA", "P", "I;16", "I", "F", "1", "LA", "CMYK"):
        image = Image.new(mode, (9, 7))
        assert to_rgb_array(image).shape == (7, 9, 3), mode


def test_save_and_auto_load(tmp_path):
    IMedSamProcessor(image_size=256, normalization="minmax").save_pretrained(tmp_path)
    for loader in (AutoProcessor, AutoImageProcessor):
        processor = loader.from_pretrained(tmp_path)
        assert isinstance(processor, IMedSamProcessor)
        assert processor.image_size == 256 and processor.normalization == "minmax"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_boxes=[30, 5, 10, 20]), "x0 < x1"),
        (dict(input_boxes=[500, 500, 600, 600]), "outside"),
        (dict(input_boxes=[1, 2, 3]), "4 numbers"),
        (dict(input_points=[[1, 2], [3, 4]], input_labels=[1]), "2 points but 1 labels"),
    ],
)
def test_bad_prompts_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMedSamProcessor(image_size=32)(np.zeros((40, 50, 3), np.uint8), **kwargs)


def test_bad_images_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        IMedSamProcessor(image_size=32)(str(broken))
    with pytest.raises(ValueError, match="no such image"):
        IMedSamProcessor(image_size=32)(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="unsupported image shape"):
        IMedSamProcessor(image_size=32)(np.zeros((4, 5, 6, 7)))
    with pytest.raises(ValueError, match="empty"):
        IMedSamProcessor(image_size=32)([])


@pytest.mark.skipif(not (SHARED_DATA / "PH2").is_dir(), reason="shared data not available")
def test_real_image_and_mask_geometry_agree():
    images = sorted((SHARED_DATA / "PH2" / "images").iterdir())[:1]
    mask_path = SHARED_DATA / "PH2" / "masks" / f"{images[0].stem}.png"
    mask = np.asarray(Image.open(mask_path).convert("L")) > 127
    processor = IMedSamProcessor(image_size=256, normalization="minmax")
    ys, xs = np.nonzero(mask)
    batch = processor(str(images[0]), input_boxes=[xs.min(), ys.min(), xs.max(), ys.max()])
    frame = processor.resize_mask(mask, tuple(batch["reshaped_input_sizes"][0].tolist()))
    fy, fx = torch.nonzero(frame, as_tuple=True)
    box = batch["input_boxes"][0]
    assert abs(fx.min() - box[0]) <= 1 and abs(fy.min() - box[1]) <= 1


def test_lists_of_boxes_give_a_prompt_axis_and_merge_into_one_label_map():
    processor = IMedSamProcessor(image_size=64)
    image = np.zeros((40, 80, 3), np.uint8)
    assert processor(image, input_boxes=[1, 2, 30, 20])["input_boxes"].shape == (1, 4)
    boxes = processor(image, input_boxes=[[0, 0, 40, 20], [40, 20, 80, 40]])["input_boxes"]
    assert boxes.shape == (1, 2, 4)
    torch.testing.assert_close(boxes[0, 1], torch.tensor([32.0, 16.0, 64.0, 32.0]))  # scaled by 64 / 80
    assert processor([image, image], input_boxes=[[[1, 2, 30, 20]], [[5, 5, 70, 30]]])["input_boxes"].shape == (2, 1, 4)
    with pytest.raises(ValueError, match="same number of boxes"):
        processor([image, image], input_boxes=[[[1, 2, 30, 20]], [[5, 5, 70, 30], [1, 1, 5, 5]]])
    # Where two prompts' masks overlap the more probable one wins; nothing above the threshold is background.
    logits = torch.tensor([[[[2.0, 1.0, -1.0]]], [[[1.0, 3.0, -2.0]]]])  # (2 prompts, 1, 1, 3)
    assert IMedSamProcessor.merge_prompt_masks(logits, [6, 11]).tolist() == [[6, 11, 0]]
