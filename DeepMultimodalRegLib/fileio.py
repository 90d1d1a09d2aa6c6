"""Safe output: atomic writes and checks that an output never replaces an input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputPathError


def _suffix(path: Path) -> str:
    """The full file suffix, so that a temporary 'x.nii.gz' keeps '.nii.gz' (writers pick the format by it)."""
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return path.suffix


def check_output_path(path: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early if ``path`` cannot be written or is one of the ``protected`` inputs."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    for p in protected:
        if p is not None and Path(p).expanduser().resolve() == resolved:
            raise OutputPathError(f"refusing to write {out}: it is one of the inputs; choose another output name")
    parent = resolved.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputPathError(f"cannot write {out}: folder {existing} is not writable")
    if resolved.is_dir():
        raise OutputPathError(f"cannot write {out}: a folder of that name exists")
    return out


def check_output_dir(path: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early if an output folder cannot be created or written."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    for p in protected:
        if p is not None and Path(p).expanduser().resolve() == resolved:
            raise OutputPathError(f"refusing to use {out} as output folder: it is an input")
    if resolved.exists() and not resolved.is_dir():
        raise OutputPathError(f"cannot use {out} as output folder: a file of that name exists")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise OutputPathError(f"cannot write into {out}: {existing} is not writable")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A crash, an exception or a cancel inside the block leaves any earlier file at ``path`` intact.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part" + _suffix(out), dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
