"""`imedsam export --model NAME --output DIR`: the complete, self-contained Hub folder of a shipped model (or of any model
`load_model` takes): full safetensors, the modeling code with `auto_map`, the processor and the model card.
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it where this package is not installed, and
`huggingface_hub.upload_folder` (or `model.push_to_hub`) would upload it unchanged."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..files import share_weights
from ..loading import load_model
from ..runtime import export_vision_encoder, model_folder_export, probe_images, require_backend
from ..shipped import is_shipped, shipped_folder
from .common import EXIT_OK, fail


def export_model(
    spec: str, output: str | Path, overwrite: bool = False, backend: str = "torch", precision: str = "fp32"
) -> Path:
    """Write the Hub folder of `spec` into `output` (a new or empty folder unless `overwrite`); returns it. With a
    runtime `backend`, also its export of the image encoder beside the weights (`runtime.model_folder_export`), which
    `load_model(output, backend=...)` then uses, its compiled-model cache included, instead of exporting again."""
    output = Path(output)
    require_backend(backend, precision)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output}: the folder is not empty; pass --overwrite to replace its files.")
    model, processor = load_model(spec)
    output.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(output)
    model.save_pretrained(output)
    share_weights(output)
    if is_shipped(spec):  # the shipped card (with its measured results), not the default one
        folder = shipped_folder(spec)
        shutil.copy(folder / "README.md", output / "README.md")
        if (folder / "splits.json").is_file():
            shutil.copy(folder / "splits.json", output / "splits.json")
    if backend != "torch":
        beside = model_folder_export(output, backend, precision)
        if beside.exists() and overwrite:
            shutil.rmtree(beside)
        encoder = export_vision_encoder(model, backend, beside, precision=precision)
        encoder(probe_images(encoder.input_shape, 1))  # compiles once: the compiled-model cache is in the folder
    return output


def run(args: argparse.Namespace) -> int:
    """`imedsam export` with parsed arguments."""
    try:
        folder = export_model(args.model, args.output, args.overwrite, args.backend, args.precision)
    except (OSError, ValueError, ImportError, RuntimeError) as error:  # RuntimeError: a runtime export failed
        return fail(error)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    print(f"wrote {folder}: {', '.join(files)}")
    if args.backend != "torch":
        print(
            f"and the image encoder for {args.backend} ({args.precision}) in "
            f"{model_folder_export(folder, args.backend, args.precision)}: imedsam predict --model {folder} "
            f"--backend {args.backend} --precision {args.precision} uses it"
        )
    print(
        f"load it with transformers alone: AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True); "
        "publish it: huggingface_hub.upload_folder(repo_id=..., folder_path=...)"
    )
    return EXIT_OK


__all__ = ["export_model", "run"]
