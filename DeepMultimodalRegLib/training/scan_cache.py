"""The prepared-scan cache of a training run, packed into one compressed archive and back.

Why: a lent GPU machine has neither ``../shared/data`` nor SimpleITK, and what travels there is
limited (64 MiB per call).  The cache files that :func:`~.scans.load_prepared_scans` and
:func:`~.scans.load_prepared_labels` write (float32 volumes, int16 label maps, ~140 MB at 2 mm) pack
into ~17 MB as float16 in a compressed ``.npz``; unpacked into a run's ``prepared_scans`` folder
they are read as if prepared there, so ``train disa`` runs without the data or SimpleITK.  MS-ODE's
anatomy cache (:func:`~.msode_data.load_prepared_anatomies`, ``prepared_anatomies``) packs the same way.

float16 keeps 11 significant bits: about 1e-3 of a z-scored intensity, far below the random
affine intensity change every training crop gets.  Label maps are packed exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ImageReadError
from ..fileio import atomic_output

#: key of a cache file that holds one bare tensor (label maps) instead of a dict of tensors
_BARE = ""


def _packed(array: np.ndarray) -> np.ndarray:
    """Volumes (float, ≥ 3 axes) as float16; everything else (geometry, labels, masks) exactly."""
    return array.astype(np.float16) if array.dtype == np.float32 and array.ndim >= 3 else array


def pack_cache(cache_dir: str | Path, archive: str | Path) -> list[str]:
    """Write every ``*.pt`` cache file of ``cache_dir`` (a tensor, or a dict of tensors) into
    ``archive`` (a compressed .npz); returns the packed file names."""
    files = sorted(Path(cache_dir).glob("*.pt"))
    if not files:
        raise ImageReadError(f"no prepared-scan cache files (*.pt) in {cache_dir}")
    arrays = {}
    for path in files:
        saved = torch.load(path, weights_only=True)
        entries = saved.items() if isinstance(saved, dict) else [(_BARE, saved)]
        for key, tensor in entries:
            arrays[f"{path.stem}|{key}"] = _packed(tensor.numpy())
    with atomic_output(Path(archive)) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return [p.name for p in files]


def unpack_cache(archive: str | Path, cache_dir: str | Path) -> list[str]:
    """Write the cache files packed in ``archive`` into ``cache_dir`` (created); returns their names."""
    archive = Path(archive)
    if not archive.is_file():
        raise ImageReadError(f"packed scan cache not found: {archive}")
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    with np.load(archive) as packed:
        by_stem: dict[str, list[str]] = {}
        for entry in packed.files:
            stem, key = entry.split("|", 1)
            by_stem.setdefault(stem, []).append(key)
        for stem, keys in sorted(by_stem.items()):
            tensors = {}
            for key in keys:
                array = packed[f"{stem}|{key}"]
                tensors[key] = torch.from_numpy(array.astype(np.float32) if array.dtype == np.float16 else array.copy())
            content = tensors[_BARE] if keys == [_BARE] else tensors
            with atomic_output(out / f"{stem}.pt") as tmp:
                torch.save(content, tmp)
            names.append(f"{stem}.pt")
    return names
