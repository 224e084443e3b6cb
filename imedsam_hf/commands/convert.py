"""`imedsam convert`: a SAM checkpoint or LiteMedSAM as an I-MedSAM folder, or one-mask-per-structure folders as
class-id masks."""

from __future__ import annotations

import argparse

from ..data import convert_structure_masks
from ..loading import LITEMEDSAM, convert_checkpoint
from .common import EXIT_OK, fail


def run(args: argparse.Namespace) -> int:
    """`imedsam convert sam|litemedsam|structure-masks` with parsed arguments."""
    try:
        if args.source == "structure-masks":
            classes = convert_structure_masks(args.data_dir, args.output)
            print(f"wrote {args.output}: class-id masks of {len(classes)} structures, classes.json")
            return EXIT_OK
        spec = LITEMEDSAM if args.source == "litemedsam" else args.checkpoint
        model = convert_checkpoint(spec, args.output, getattr(args, "image_size", None), args.num_classes)
    except (OSError, ValueError, ImportError) as error:
        return fail(error)
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: IMedSamModel, input {model.config.image_size} px, {total / 1e6:.2f}M parameters")
    return EXIT_OK


__all__ = ["run"]
