"""The prepared-scan cache of a training run, packed into one compressed archive and back.

Why: a lent GPU machine has neither ``../shared/data`` nor SimpleITK, and what travels there is
limited (64 MiB per call).  The cache files that :func:`~.scans.load_prepared_scans` and
:func:`~.scans.load_prepared_labels` write (float32 volumes, int16 label maps, ~140 MB at 2 mm) pack
into ~17 MB as float16 in a compressed ``.npz``; unpacked into a run's ``prepared_scans`` folder
they are read as if prepared there, so ``train disa`` runs without the data or SimpleITK.

float16 keeps 11 significant bits: about 1e-3 of a z-scored intensity, far below the random
affine intensity change every training crop gets.  Label maps are packed exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ImageReadError
from ..fileio import atomic_output

#: geometry entries of a prepared-scan file (label files are bare tensors)
_GEOMETRY_KEYS = ("spacing", "origin", "direction")


def pack_cache(cache_dir: str | Path, archive: str | Path) -> list[str]:
    """Write every ``*.pt`` cache file of ``cache_dir`` into ``archive`` (a compressed .npz); returns
    the packed file names."""
    files = sorted(Path(cache_dir).glob("*.pt"))
    if not files:
        raise ImageReadError(f"no prepared-scan cache files (*.pt) in {cache_dir}")
    arrays = {}
    for path in files:
        saved = torch.load(path, weights_only=True)
        if isinstance(saved, dict):
            arrays[f"{path.stem}|data"] = saved["data"].numpy().astype(np.float16)
            for key in _GEOMETRY_KEYS:
                arrays[f"{path.stem}|{key}"] = saved[key].numpy()
        else:
            arrays[f"{path.stem}|labels"] = saved.numpy()
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
        stems = sorted({key.split("|")[0] for key in packed.files})
        for stem in stems:
            if f"{stem}|labels" in packed.files:
                content = torch.from_numpy(packed[f"{stem}|labels"].copy())
            else:
                content = {"data": torch.from_numpy(packed[f"{stem}|data"].astype(np.float32)),
                           **{key: torch.from_numpy(packed[f"{stem}|{key}"].copy()) for key in _GEOMETRY_KEYS}}
            with atomic_output(out / f"{stem}.pt") as tmp:
                torch.save(content, tmp)
            names.append(f"{stem}.pt")
    return names
