"""What every `imedsam` command shares: exit codes, flag-value parsers, errors in the command line's words.

The library rooms (`inference`, `volumes`, `evaluation`, `data`, `loading`) raise errors naming files and their
Python arguments in backticks (`` `mask_values` ``); a command shows them with the flag a user types instead
(`--mask-values`), via `flag_message`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from ..data import parse_mask_values
from ..inference import checked_output_size

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # some inputs failed (each named on stderr); the others were written
EXIT_NOTHING_DONE = 2  # bad arguments, or a model, data or option that cannot be used: nothing was done

EXIT_CODES = """exit codes:
  0  done
  1  some inputs failed (each is named on stderr; the others were written)
  2  nothing was done: bad arguments, unreadable model, data or options (the message names which)"""

# Python argument names (as library messages quote them) -> the flag of `imedsam` and `train.py`.
FLAGS = {
    name: f"--{name.replace('_', '-')}"
    for name in (
        "data_dir",
        "num_classes",
        "mask_classes",
        "mask_values",
        "split_file",
        "split_fold",
        "split",
        "group_pattern",
        "dataset",
        "truth",
        "dataset_split",
        "dataset_config",
        "image_column",
        "mask_column",
        "stem_column",
        "output_size",
        "max_output_pixels",
        "box_jitter",
        "jitter_draws",
        "nsd_tolerance",
        "nsd_definition",
        "num_clicks",
        "class_aware",
        "classes",
        "scans",
        "label_suffix",
        "plane",
        "channel",
        "rescale_intercept",
        "window",
        "device",
        "backbone",
        "boxes",
        "box",
        "points",
        "labels",
        "baseline",
        "baseline_model",
        "checkpoint",
        "peft_overrides",
        "finish_only",
        "images",
        "output",
    )
}
FLAGS["num_clicks"] = "--clicks"
FLAGS["class_names"] = "--classes"
FLAGS["input_boxes"] = "--box"
FLAGS["input_points"] = "--points"
FLAGS["input_labels"] = "--points (x,y,label)"


def flag_message(error: BaseException | str, flags: Mapping[str, str] = FLAGS) -> str:
    """A library message with its quoted Python arguments (`` `mask_values` ``) shown as flags (`--mask-values`)."""
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), str(error))


def fail(error: BaseException | str) -> int:
    """`error: <message>` on stderr in the command line's words; the exit code of a command that did nothing."""
    print(f"error: {flag_message(error)}", file=sys.stderr)
    return EXIT_NOTHING_DONE


def parse_box(text: str) -> list[float]:
    """`--box x0,y0,x1,y1` -> four numbers."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(
            f"--box {text!r}: expected four comma-separated numbers x0,y0,x1,y1 (write --box=-5,10,200,300 when the "
            "first is negative)."
        )
    return box


def parse_output_size(text: str | None) -> tuple[int, int] | None:
    """`--output-size HxW` -> `(height, width)`: height first, the order of Python's `output_size` and of array
    shapes, everywhere in this project."""
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise ValueError(f"--output-size {text!r}: expected HEIGHTxWIDTH (height first), e.g. 384x512.")
    return checked_output_size((height, width), "--output-size")


def parse_points(text: str) -> tuple[list[list[float]], list[int]]:
    """`--points "x,y[,label];x,y[,label]"` (label 1 foreground, the default, or 0 background) -> points, labels."""
    points, labels = [], []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        values = item.split(",")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or (len(numbers) == 3 and numbers[2] not in (0, 1)):
            raise ValueError(f"--points {text!r}: {item!r} is not x,y or x,y,label (label 1 or 0).")
        points.append(numbers[:2])
        labels.append(int(numbers[2]) if len(numbers) == 3 else 1)
    if not points:
        raise ValueError(f"--points {text!r}: give at least one x,y.")
    return points, labels


def parse_class_ids(text: str) -> list[int | str]:
    """`--classes 8,4,3` -> ids; `--classes liver,8` -> names (resolved against the folder's classes.json) and ids."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--classes {text!r}: expected comma-separated class ids or names, e.g. 8,4,3 or liver,spleen")
    return [int(v) if v.isdigit() else v for v in values]


def parse_mask_value_map(text: str) -> dict[int, int]:
    """`--mask-values 38:1,75:2` -> {38: 1, 75: 2}."""
    try:
        return parse_mask_values(text)
    except ValueError as error:
        raise ValueError(flag_message(error)) from None


def read_json_file(path: str, flag: str):
    """A JSON file given to `flag`, or a ValueError naming both."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path}: cannot read it as JSON ({error}).") from None


__all__ = [
    "EXIT_CODES",
    "EXIT_NOTHING_DONE",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "FLAGS",
    "fail",
    "flag_message",
    "parse_box",
    "parse_class_ids",
    "parse_mask_value_map",
    "parse_output_size",
    "parse_points",
    "read_json_file",
]
