#!/usr/bin/env python
"""Evaluate an I-MedSAM model on a labelled folder or dataset: a thin entry into `imedsam evaluate` (see `--help`).

python training/evaluate.py --model DIR_OR_HUB_ID (--data-dir DIR | --dataset HUB_ID) [--split test|validation|train|all]
    [--output-sizes native 128 896] [--prompt box|points|none] [--baseline] --json OUT.json
"""

from __future__ import annotations

import sys

from imedsam_hf.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
