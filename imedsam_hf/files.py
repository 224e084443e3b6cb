"""Files written and checked the one way: atomic writes (masks, label volumes, manifests) and SHA-256 digests.

A writer never leaves a half-written file where a reader (or the next run's `glob`) would find it: the content goes
to a hidden temporary file in the target's folder, which is renamed into place; a failed or interrupted write
removes it, and `remove_stale_temporaries` clears those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
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
    """Remove the temporary files of `target` that an interrupted `atomic_write` left; returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = sorted(target.parent.glob(f".{target.name}.*{TEMPORARY_SUFFIX}"))
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return stale


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in chunks (huggingface_hub's `sha_fileobj`)."""
    with Path(path).open("rb") as handle:
        return sha_fileobj(handle).hex()


__all__ = ["TEMPORARY_SUFFIX", "atomic_write", "remove_stale_temporaries", "sha256_file"]
