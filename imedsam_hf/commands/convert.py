"""`imedsam convert`: a SAM checkpoint or LiteMedSAM as an I-MedSAM folder, one-mask-per-structure folders as
class-id masks, scans with label volumes (or LiteMedSAM's NumPy training data) as a folder of 2-D slices, or label
volumes (DICOM SEGs, RT Structure Sets) as NIfTI on their scans' grids."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import class_file, convert_structure_masks, read_class_file
from ..loading import LITEMEDSAM, convert_checkpoint
from ..volumes import label_volumes_to_nifti, numpy_cases_to_slices, volumes_to_slices
from .common import EXIT_OK, fail


def run(args: argparse.Namespace) -> int:
    """`imedsam convert sam|litemedsam|structure-masks|npz|volumes|labels` with parsed arguments."""
    try:
        if args.source == "npz":
            names = read_class_file(args.classes) if args.classes is not None else None
            done = numpy_cases_to_slices(args.images, args.output, class_names=names, all_slices=args.all_slices)
            spacing = f", the spacing of {done['scans']} 3-D cases (cases.csv)" if done["scans"] else ""
            print(
                f"wrote {args.output}: {done['images']} images and masks from {done['files']} files, "
                f"{len(done['classes'])} classes (classes.json){spacing}"
            )
            return EXIT_OK
        if args.source in ("volumes", "labels"):
            return slices_of_volumes(args)
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


def slices_of_volumes(args: argparse.Namespace) -> int:
    """`imedsam convert volumes` (2-D slices) and `imedsam convert labels` (NIfTI label volumes): the class names
    from --classes or the dataset.json beside --labels."""
    classes = args.classes
    beside = class_file(Path(args.labels).parent)  # a dataset.json naming its labels (not only its channels)
    if classes is None and beside is not None and beside.name == "dataset.json":
        classes = beside
        print(f"class names from {beside}")
    names = read_class_file(classes) if classes is not None else None
    if args.source == "labels":
        done = label_volumes_to_nifti(
            args.images,
            args.labels,
            args.output,
            class_names=names,
            scans=args.scans,
            channel=args.channel,
            label_suffix=args.label_suffix,
        )
        print(
            f"wrote {args.output}: {done['volumes']} label volumes (<case>.nii.gz), {len(done['classes'])} classes (classes.json)"
        )
        return EXIT_OK
    done = volumes_to_slices(
        args.images,
        args.labels,
        args.output,
        window=args.window,
        class_names=names,
        all_slices=args.all_slices,
        scans=args.scans,
        plane=args.plane,
        channel=args.channel,
        label_suffix=args.label_suffix,
    )
    print(
        f"wrote {args.output}: {done['slices']} slices of {done['volumes']} scans, {len(done['classes'])} classes "
        f"(classes.json), each scan's spacing and orientation (cases.csv)"
    )
    return EXIT_OK


__all__ = ["run", "slices_of_volumes"]
