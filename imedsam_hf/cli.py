"""The `imedsam` command: predict masks for images, convert checkpoints, evaluate on a labelled folder.

    imedsam predict --model DIR_OR_HUB_ID IMAGES_OR_DIR... [--box x0,y0,x1,y1 | --boxes boxes.json |
                    --boxes-from-masks DIR | --no-prompt] [--output-size WxH] --out DIR [--overlay]
    imedsam convert sam --checkpoint ... --image-size 384 --output DIR      (python -m imedsam_hf.convert)
    imedsam evaluate --model ... --data_dir ... --json OUT.json              (training/evaluate.py)

`predict` writes one 0/255 PNG mask per input, named after it, and with `--overlay` an overlay PNG; an input that
cannot be used (unreadable file, bad box) is reported by name, the others go on, and the command exits non-zero
with a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .data import IMAGE_EXTENSIONS, mask_box, read_mask
from .inference import segment
from .processing_imedsam import open_image, to_rgb_array

MAX_PIXELS = 20000 * 20000  # larger images are refused (PIL also stops at about 179M pixels)
MAX_OUTPUT_PIXELS = 4096 * 4096  # beyond this the mask is predicted on a reduced grid and resized to the image


def load_model_and_processor(name: str):
    """An IMedSamModel folder or hub id, or `litemedsam` (the backbone itself), with its processor."""
    from transformers import AutoModel, AutoProcessor

    from .processing_imedsam import processor_for_config
    from .training import LITEMEDSAM, load_backbone

    if name == LITEMEDSAM:
        model = load_backbone(LITEMEDSAM, use_implicit_decoder=False)
        return model.eval(), processor_for_config(model.config)
    model = AutoModel.from_pretrained(name).eval()
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = processor_for_config(model.config)
    return model, processor


def collect_inputs(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise ValueError("No input images given.")
    return files


def fitted_grid(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The image's own grid, or the largest grid of the same aspect within `max_pixels` points."""
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"--box {text!r}: expected four comma-separated numbers x0,y0,x1,y1.")
    return box


def parse_output_size(text: str | None) -> tuple[int, int] | None:
    """`WxH` -> (H, W)."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise ValueError(f"--output-size {text!r}: expected WIDTHxHEIGHT, e.g. 512x384.")
    return height, width


def box_for(path: Path, args, boxes: dict) -> list[float] | None:
    if args.no_prompt:
        return None
    if args.box:
        return parse_box(args.box)
    if boxes:
        if path.name not in boxes and path.stem not in boxes:
            raise ValueError(f"{path}: no box in --boxes for {path.name}.")
        return [float(v) for v in boxes.get(path.name, boxes.get(path.stem))]
    if args.boxes_from_masks:
        candidates = sorted(Path(args.boxes_from_masks).glob(f"{path.stem}.*"))
        if not candidates:
            raise ValueError(f"{path}: no mask named {path.stem}.* in {args.boxes_from_masks}.")
        box = mask_box(read_mask(candidates[0]))
        if box is None:
            raise ValueError(f"{candidates[0]}: the mask is empty, so it gives no box.")
        return box.tolist()
    raise ValueError("Give a prompt: --box, --boxes, --boxes-from-masks, or --no-prompt.")


def overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image with the mask tinted red (image resized to the mask's grid if needed)."""
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    if picture.size != (mask.shape[1], mask.shape[0]):
        picture = picture.resize((mask.shape[1], mask.shape[0]), Image.BILINEAR)
    array = np.asarray(picture).astype(np.float32)
    array[mask > 0] = 0.55 * array[mask > 0] + 0.45 * np.array([255.0, 0.0, 0.0])
    return Image.fromarray(array.astype(np.uint8))


def predict(args) -> int:
    from tqdm.auto import tqdm

    try:
        files = collect_inputs(args.inputs)
        output_size = parse_output_size(args.output_size)
        boxes = json.loads(Path(args.boxes).read_text()) if args.boxes else {}
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for path in tqdm(files, desc="predict", disable=len(files) < 2):
        try:
            image = open_image(path)
            width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS} pixels.")
            size = output_size or fitted_grid(height, width, args.max_output_pixels)
            result = segment(model, image, box=box_for(path, args, boxes), output_size=size, processor=processor)
        except ValueError as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            failures.append(message)
            print(f"skipped {message}", file=sys.stderr)
            continue
        mask = Image.fromarray((result.mask > 0).astype(np.uint8) * 255)
        if output_size is None and mask.size != (width, height):
            print(f"{path}: mask predicted at {mask.size[0]}x{mask.size[1]} and resized to {width}x{height}")
            mask = mask.resize((width, height), Image.NEAREST)
        mask.save(out / f"{path.stem}.png")
        if args.overlay:
            thumbnail = (
                image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image).astype(np.uint8))
            )
            thumbnail = thumbnail.convert("RGB").resize((result.mask.shape[1], result.mask.shape[0]))
            overlay(np.asarray(thumbnail).astype(np.float32), result.mask).save(out / f"{path.stem}_overlay.png")
    done = len(files) - len(failures)
    print(f"{done} of {len(files)} images segmented into {out}" + (f"; {len(failures)} failed:" if failures else ""))
    for message in failures:
        print(f"  {message}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imedsam", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment images")
    p.add_argument("--model", required=True, help="IMedSamModel folder or hub id, or 'litemedsam'")
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--box", help="one box x0,y0,x1,y1 (original pixels) for every image")
    prompt.add_argument("--boxes", help="JSON {image name or stem: [x0, y0, x1, y1]}")
    prompt.add_argument("--boxes-from-masks", dest="boxes_from_masks", help="folder of masks named like the images")
    prompt.add_argument("--no-prompt", dest="no_prompt", action="store_true", help="prompt-free")
    p.add_argument("--output-size", dest="output_size", help="WxH of the masks (default: each image's size)")
    p.add_argument("--out", required=True, help="folder for the masks")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    p.add_argument(
        "--max-output-pixels",
        dest="max_output_pixels",
        type=int,
        default=MAX_OUTPUT_PIXELS,
        help="bigger images get their mask predicted on a grid of this many points and resized (bounded memory)",
    )
    sub.add_parser("convert", help="convert a checkpoint (see python -m imedsam_hf.convert --help)", add_help=False)
    sub.add_parser("evaluate", help="evaluate on a labelled folder (see training/evaluate.py)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from .convert import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "evaluate":
        import runpy

        script = Path(__file__).resolve().parents[1] / "training" / "evaluate.py"
        if not script.is_file():
            print(f"error: {script} not found: `imedsam evaluate` needs the repository checkout.", file=sys.stderr)
            return 2
        sys.argv = [str(script), *argv[1:]]
        runpy.run_path(str(script), run_name="__main__")
        return 0
    args = build_parser().parse_args(argv)
    return predict(args)


if __name__ == "__main__":
    sys.exit(main())
