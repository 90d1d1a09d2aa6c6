"""Training scans: the real CT and MR volumes of ``../shared/data``, prepared as the DISA paper does
(resampled to a common spacing, z-scored), with a fixed split into training and held-out scans.

The held-out scans (Colin27 T1 with skull, the abdomen-pelvis CT) share neither subject nor
anatomy coverage with the training scans, so validation measures generalisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..disa.preprocess import prepare_for_disa
from ..errors import ImageReadError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume


@dataclass(frozen=True)
class ScanSpec:
    name: str
    relative_path: str  # inside the shared data folder
    modality: str  # "CT" or "MR"
    split: str  # "train" or "validation"
    group: str = ""  # scans of one group are co-registered (same grid, same subject)


SCANS = (
    ScanSpec("kirby21_t1", "mr_kirby21_113/t1_mprage.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("kirby21_t2", "mr_kirby21_113/t2.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("kirby21_flair", "mr_kirby21_113/flair.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("mni152_t1", "mni152_2009a/t1.nii.gz", "MR", "train"),
    ScanSpec("voxelmorph_t1", "mr_t1_seg_vxm/t1_seg.npz", "MR", "train"),
    ScanSpec("lidc0001_ct", "ct_chest_lidc0001/ct.nii.gz", "CT", "train"),
    ScanSpec("colin27_t1", "colin27/t1.nii.gz", "MR", "validation"),
    ScanSpec("pelvis_ct", "ct_pelvis_ts/ct.nii.gz", "CT", "validation"),
)


def default_data_dir() -> Path:
    env = os.environ.get("DEEPMMREG_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_scan(spec: ScanSpec, data_dir: Path) -> Volume:
    """Read a scan with its geometry (the voxelmorph npz has none: 1 mm isotropic, identity)."""
    path = Path(data_dir) / spec.relative_path
    if not path.exists():
        raise ImageReadError(f"training scan {spec.name} not found at {path}; pass --data-dir")
    if path.suffix == ".npz":
        with np.load(path) as npz:
            array = np.asarray(npz["vol"], dtype=np.float32)
        return Volume(torch.from_numpy(array), ImageGeometry(shape=array.shape), name=spec.name)
    from ..image.io import read_volume

    return read_volume(path, name=spec.name).float()


def load_prepared_scans(data_dir: Path | None = None, split: str | None = None, spacing_mm: float = 2.0,
                        cache_dir: Path | None = None) -> dict[str, Volume]:
    """Prepared scans by name (optionally one split), cached as .npz to make resumed runs fast."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = {}
    for spec in SCANS:
        if split is not None and spec.split != split:
            continue
        cached = Path(cache_dir) / f"{spec.name}_{spacing_mm:g}mm.pt" if cache_dir else None
        if cached is not None and cached.exists():
            saved = torch.load(cached, weights_only=True)
            geometry = ImageGeometry(shape=tuple(saved["data"].shape), spacing=tuple(saved["spacing"].tolist()),
                                     origin=tuple(saved["origin"].tolist()),
                                     direction=tuple(saved["direction"].tolist()))
            out[spec.name] = Volume(saved["data"], geometry, name=spec.name)
            continue
        volume = prepare_for_disa(read_scan(spec, data_dir), spacing_mm, spec.modality)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            g = volume.geometry
            torch.save({"data": volume.data, "spacing": torch.tensor(g.spacing), "origin": torch.tensor(g.origin),
                        "direction": torch.tensor(g.direction)}, cached)
        out[spec.name] = volume
    return out


def spec_by_name(name: str) -> ScanSpec:
    return next(s for s in SCANS if s.name == name)
