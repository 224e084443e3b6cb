#!/usr/bin/env python
"""Ship a training run's model inside the package: `imedsam_hf/shipped/<name>/` (see `imedsam_hf.shipped`).

    python scripts/ship_model.py --run outputs/litemedsam_btcv --name imedsam-litemedsam-btcv \
        --card model_cards/imedsam-litemedsam-btcv.md \
        --reference ../shared/data/BTCV-Synapse-CT/images/case0039_slice068.png:../shared/data/BTCV-Synapse-CT/masks/case0039_slice068.png

Writes what the run's selected model trained (`best/trainable.safetensors`, by PEFT's names; float16 when float32
would exceed --max-mb), its config and processor (from `final/`), the card, the run's `splits.json` (stems only),
and `reference.json`: the logits the run's own `final/` model gives on each reference image with every structure of
its mask boxed (a 16x16 grid over the image), which the tests compare against the shipped model loaded by name.
It first ships the float32 weights and checks that the model loaded by name gives the run's logits (to 1e-3); when
the weights are then stored in float16, the references become the float16 model's logits, each with its largest
difference from the float32 run's (`float32_run_max_difference`), so the tests hold the files to the stored precision. `--card-only`
refreshes the card (and the manifest) of a model already shipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import imedsam_hf  # noqa: F401
import imedsam_hf.shipped as shipped
from imedsam_hf.data import mask_box, read_mask
from imedsam_hf.loading import load_model
from imedsam_hf.shipped import SHIPPED_MODELS, TRAINABLE, write_manifest

REFERENCE_GRID = (16, 16)


def reference_logits(model, processor, image: str, mask: str, full_sam_logits: bool = True) -> dict:
    """Every structure of `mask` boxed (class-aware models: with its class), logits on a 16x16 grid. Outside each
    structure's region of interest the logits are SAM's own: over the whole frame (`full_sam_logits`, as the training
    run computed them) or, with `full_sam_logits=False`, over each box's upscaling window only (the default forward)."""
    labels = read_mask(mask, 255)
    ids = [int(c) for c in np.unique(labels) if c > 0]
    boxes = [mask_box(labels == c).tolist() for c in ids]
    aware = model.config.num_classes > 1
    inputs = processor(image, input_boxes=boxes if len(boxes) > 1 else boxes[0])
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_boxes=inputs["input_boxes"],
            input_classes=torch.tensor([ids]) if aware and len(ids) > 1 else (torch.tensor(ids) if aware else None),
            output_size=REFERENCE_GRID,
            output_region=inputs["output_region"],
            full_sam_logits=full_sam_logits,
        )
    return {
        "image": Path(image).name,
        "mask": Path(mask).name,
        "classes": ids if aware else None,
        "boxes": boxes,
        "output_size": list(REFERENCE_GRID),
        "logits": np.round(outputs.logits[0].float().numpy(), 5).tolist(),
    }


def logit_difference(again: dict, reference: dict) -> float:
    """The largest absolute difference between two `reference_logits` results' logits."""
    return float(np.abs(np.array(again["logits"]) - np.array(reference["logits"])).max())


def same_logits(name: str, pairs: list[str], references: list[dict], tolerance: float) -> bool:
    """Whether the shipped model `name`, loaded by name, gives `references` on the IMAGE:MASK `pairs`."""
    model, processor = load_model(name)
    for pair, reference in zip(pairs, references):
        error = logit_difference(reference_logits(model, processor, *pair.split(":")), reference)
        print(f"{reference['image']}: shipped vs trained run, max |logit difference| {error:.2e}")
        if error > tolerance:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the training run's folder (best/, final/, splits.json)")
    parser.add_argument("--name", required=True, choices=SHIPPED_MODELS)
    parser.add_argument("--card", required=True, help="the model card (model_cards/<name>.md)")
    parser.add_argument("--reference", nargs="*", default=[], help="IMAGE:MASK pairs for reference.json")
    parser.add_argument("--max-mb", type=float, default=10.0, help="largest trainable file in float32")
    parser.add_argument("--card-only", action="store_true")
    args = parser.parse_args(argv)
    run, target = Path(args.run), shipped.shipped_root() / args.name
    if args.card_only:
        shutil.copy(args.card, target / "README.md")
        write_manifest(target)
        print(f"card of {args.name} refreshed")
        return 0
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((run / "final" / "config.json").read_text())
    config["_name_or_path"] = args.name
    config.pop("auto_map", None)  # the code comes from the package; `imedsam export` writes auto_map for the Hub
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(run / "final" / "preprocessor_config.json", target / "preprocessor_config.json")
    processor_config = json.loads((target / "preprocessor_config.json").read_text())
    processor_config.pop("auto_map", None)
    (target / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    splits = json.loads((run / "splits.json").read_text())
    metadata = {
        "seed": splits.get("metadata", {}).get("seed"),
        "source": Path(str(splits.get("metadata", {}).get("source"))).name,
    }
    splits = {**{k: v for k, v in splits.items() if k in ("train", "validation", "test")}, "metadata": metadata}
    (target / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    shutil.copy(args.card, target / "README.md")
    trained, processor = load_model(run / "final")
    run_logits = [reference_logits(trained, processor, *pair.split(":")) for pair in args.reference]
    del trained
    # First in float32: the shipped model loaded by name must give the run's own logits.
    state = load_file(str(run / "best" / "trainable.safetensors"))
    source = {"source": f"{run.name}/best/trainable.safetensors"}
    save_file(state, str(target / TRAINABLE), metadata=source)
    (target / "reference.json").write_text(json.dumps({"references": run_logits}) + "\n")
    write_manifest(target)
    if not same_logits(args.name, args.reference, run_logits, tolerance=1e-3):
        print("error: the shipped model does not reproduce the run's logits", file=sys.stderr)
        return 1
    size_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    if size_mb > args.max_mb:
        # Then at the stored precision: the references become the float16 model's logits (what the tests can hold
        # the shipped files to), each with its largest difference from the float32 run's.
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(target / TRAINABLE), metadata={**source, "dtype": "float16"})
        write_manifest(target)
        model, model_processor = load_model(args.name)
        stored = [reference_logits(model, model_processor, *pair.split(":")) for pair in args.reference]
        for again, reference in zip(stored, run_logits):
            error = logit_difference(again, reference)
            again["float32_run_max_difference"] = round(error, 6)
            print(f"{again['image']}: float16 storage moves the logits by at most {error:.2e}")
        (target / "reference.json").write_text(json.dumps({"dtype": "float16", "references": stored}) + "\n")
        write_manifest(target)
    total = sum(p.stat().st_size for p in target.iterdir()) / 2**20
    print(f"shipped {args.name}: {total:.2f} MB in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
