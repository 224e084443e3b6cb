"""`imedsam export --model NAME --output DIR`: the complete, self-contained Hub folder of a shipped model (or of any model
`load_model` takes): full safetensors, the modeling code with `auto_map`, the processor and the model card.
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it where this package is not installed, and
`huggingface_hub.upload_folder` (or `model.push_to_hub`) would upload it unchanged."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..loading import load_model
from ..shipped import is_shipped, shipped_folder
from .common import EXIT_OK, fail


def export_model(spec: str, output: str | Path, overwrite: bool = False) -> Path:
    """Write the Hub folder of `spec` into `output` (a new or empty folder unless `overwrite`); returns it."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output}: the folder is not empty; pass --overwrite to replace its files.")
    model, processor = load_model(spec)
    output.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(output)
    model.save_pretrained(output)
    if is_shipped(spec):  # the shipped card (with its measured results), not the default one
        folder = shipped_folder(spec)
        shutil.copy(folder / "README.md", output / "README.md")
        if (folder / "splits.json").is_file():
            shutil.copy(folder / "splits.json", output / "splits.json")
    return output


def run(args: argparse.Namespace) -> int:
    """`imedsam export` with parsed arguments."""
    try:
        folder = export_model(args.model, args.output, args.overwrite)
    except (OSError, ValueError, ImportError) as error:
        return fail(error)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    print(f"wrote {folder}: {', '.join(files)}")
    print(
        f"load it with transformers alone: AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True); "
        "publish it: huggingface_hub.upload_folder(repo_id=..., folder_path=...)"
    )
    return EXIT_OK


__all__ = ["export_model", "run"]
