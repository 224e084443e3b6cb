"""Files written and checked the one way: atomic writes (masks, label volumes, manifests), SHA-256 digests, and the
`manifest.json` of a folder whose files must arrive whole and unchanged (training checkpoints, shipped models).

A writer never leaves a half-written file where a reader (or the next run's `glob`) would find it: the content goes
to a hidden temporary file in the target's folder, which is renamed into place; a failed or interrupted write
removes it, and `remove_stale_temporaries` clears those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj

TEMPORARY_SUFFIX = ".part"


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """
    Write `target` through `write(temporary_path)` and rename the result into place (`os.replace`), with the
    permissions a plainly created file would get (the umask's, not `mkstemp`'s private 0600). Parent folders are
    created. On any error the temporary file is removed and the old `target`, if any, is left as it was.

    The temporary file is `.<name>.<random>.part` beside the target, so that no pattern for the real files
    (`*.png`, `*.nii.gz`) lists it. Returns the target's path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `target` that an interrupted `atomic_write` left (and those a writer that names
    its file by its extension, SimpleITK's, left beside them: `.x.mha.RANDOM.part.mha`); returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = f".{target.name}.*{TEMPORARY_SUFFIX}"
    stale = sorted({*target.parent.glob(pattern), *target.parent.glob(f"{pattern}.*")})
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return stale


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, name: str = "") -> Iterator[Path]:
    """
    Write a new folder `target` as a whole: the body fills the yielded temporary folder beside it
    (`.<name>.<random>.partial`), renamed into place when the body succeeds, with the permissions a plainly created
    folder would get; on any error it is removed and nothing is left at `target`. `target` must not exist, or be an
    empty folder (a `ValueError` naming it, after the caller's `name` for it, otherwise, before the body runs).
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{f'{name} ' if name else ''}{target}: exists and is not an empty folder; name a new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def share_weights(target: str | os.PathLike) -> None:
    """Give the `.safetensors` files at `target` (a file, or a folder searched through) that are private (0600) the
    permissions a plainly created file gets (the umask's): safetensors 0.8 writes through a temporary file that is
    always 0600 (safetensors/safetensors#782), so a model folder written by one user, or as root in a container
    image, could not be loaded by another while its JSON files could."""
    target = Path(target)
    files = [target] if target.is_file() else sorted(target.rglob("*.safetensors")) if target.is_dir() else []
    mode = 0o666 & ~_umask()
    for path in files:
        if path.suffix == ".safetensors" and path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            os.chmod(path, mode)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in chunks (huggingface_hub's `sha_fileobj`)."""
    with Path(path).open("rb") as handle:
        return sha_fileobj(handle).hex()


MANIFEST = "manifest.json"


def file_records(root: str | os.PathLike, paths) -> dict[str, dict]:
    """`{path relative to root: {"size": bytes, "sha256": hex}}` of `paths` (files under `root`), sorted by path."""
    root = Path(root)
    return {
        str(Path(p).relative_to(root)): {"size": Path(p).stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(Path(p) for p in paths)
    }


def records_problem(root: str | os.PathLike, records: dict) -> str | None:
    """
    What is wrong with the files under `root` against `records` (as `file_records` gives: a file missing, truncated
    or changed, named with its path), or None when every file matches. Records that cannot be read: `ValueError`.
    """
    try:
        expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in records.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"unreadable file records ({type(error).__name__}: {error})") from None
    for name, (size, digest) in expected.items():
        path = Path(root) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when written (truncated?)"
        if sha256_file(path) != digest:
            return f"{path}: its SHA-256 is not the one written in {MANIFEST} ({digest[:12]}...): damaged or altered"
    return None


def write_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """
    Write `folder/manifest.json`, `{"files": file_records(...)}` for every file of the folder but the manifest
    itself, atomically; returns the `files` entry. Write it last: a folder without it is incomplete.
    """
    folder = Path(folder)
    files = file_records(
        folder,
        (p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.endswith(TEMPORARY_SUFFIX)),
    )
    text = json.dumps({"files": files}, indent=1) + "\n"
    atomic_write(folder / MANIFEST, lambda temporary: Path(temporary).write_text(text))
    return files


def manifest_problem(folder: str | os.PathLike) -> str | None:
    """
    What is wrong with `folder` against its `manifest.json` (missing or unreadable manifest; a file missing,
    truncated or changed, named with its path), or None when every listed file is there with its size and SHA-256.
    """
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        return records_problem(folder, json.loads(manifest.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({type(error).__name__}: {error})"


__all__ = [
    "MANIFEST",
    "TEMPORARY_SUFFIX",
    "atomic_write",
    "file_records",
    "manifest_problem",
    "records_problem",
    "remove_stale_temporaries",
    "sha256_file",
    "share_weights",
    "staged_folder",
    "write_manifest",
]
