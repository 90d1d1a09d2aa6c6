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
from ..fileio import atomic_output
from ..image.geometry import ImageGeometry
from ..image.volume import Volume


@dataclass(frozen=True)
class ScanSpec:
    name: str
    relative_path: str  # inside the shared data folder
    modality: str  # "CT" or "MR"
    split: str  # "train" or "validation"
    group: str = ""  # scans of one group are co-registered (same grid, same subject)
    #: a label map of the scan (relative path; "" = none), read by :func:`read_labels`: what
    #: label-driven synthetic contrasts of it are drawn from
    labels: str = ""


SCANS = (
    ScanSpec("kirby21_t1", "mr_kirby21_113/t1_mprage.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("kirby21_t2", "mr_kirby21_113/t2.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("kirby21_flair", "mr_kirby21_113/flair.nii.gz", "MR", "train", "kirby21"),
    ScanSpec("mni152_t1", "mni152_2009a/t1.nii.gz", "MR", "train", labels="mni152_2009a/gm.nii.gz"),
    ScanSpec("voxelmorph_t1", "mr_t1_seg_vxm/t1_seg.npz", "MR", "train", labels="mr_t1_seg_vxm/t1_seg.npz"),
    ScanSpec("lidc0001_ct", "ct_chest_lidc0001/ct.nii.gz", "CT", "train", labels="ct_chest_lidc0001/labels.nii.gz"),
    ScanSpec("colin27_t1", "colin27/t1.nii.gz", "MR", "validation"),
    ScanSpec("pelvis_ct", "ct_pelvis_ts/ct.nii.gz", "CT", "validation"),
)


#: version of the prepared-scan cache files; bump it whenever reading or preparing a scan changes, so
#: a resumed run never mixes old preparations in (2: the voxelmorph scan read on its LIA grid)
PREPARED_FORMAT = 2


def default_data_dir() -> Path:
    env = os.environ.get("DEEPMMREG_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


#: Where the voxelmorph scan's array axes point.  The npz stores no geometry, but its labels
#: (FreeSurfer numbering) place it: left cerebral white matter (2) lies at higher axis-0 indices than
#: the right one (41), the brainstem (16) at higher axis-1 indices than the white matter, the
#: cerebellum (7) at lower axis-2 indices — FreeSurfer's conformed "LIA" orientation, 1 mm voxels.
#: As the columns of a direction matrix in LPS (x = left, y = posterior, z = superior):
#: axis 0 → +x, axis 1 → −z, axis 2 → −y.
VOXELMORPH_AXES_LPS = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0))


def read_voxelmorph_npz(path: Path, name: str = "voxelmorph_t1") -> tuple[Volume, Volume]:
    """The voxelmorph T1 and its label map as volumes on their physical LIA grid (1 mm, centred at
    the origin), so resampling onto an LPS grid gives the same head orientation as every other scan.
    Reading the raw arrays as (z, y, x) instead would put sagittal planes where axial ones belong."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"training scan {name} not found at {path}; pass --data-dir")
    with np.load(path) as npz:
        vol, seg = np.asarray(npz["vol"], np.float32), np.asarray(npz["seg"], np.int32)
    # our arrays are indexed (k, j, i) with i the first physical axis: reverse the npz axes
    vol, seg = np.ascontiguousarray(vol.transpose(2, 1, 0)), np.ascontiguousarray(seg.transpose(2, 1, 0))
    columns = np.asarray(VOXELMORPH_AXES_LPS).T  # columns = directions of i, j, k
    size_ijk = np.asarray(vol.shape[::-1], np.float64)
    origin = -columns @ ((size_ijk - 1) / 2.0)
    geometry = ImageGeometry(shape=vol.shape, origin=tuple(origin), direction=tuple(columns.reshape(-1)))
    return (Volume(torch.from_numpy(vol), geometry, name=name),
            Volume(torch.from_numpy(seg), geometry, name=name.replace("_t1", "") + "_seg"))


def read_scan(spec: ScanSpec, data_dir: Path) -> Volume:
    """Read a scan with its geometry (the voxelmorph npz has none: see :func:`read_voxelmorph_npz`)."""
    path = Path(data_dir) / spec.relative_path
    if not path.exists():
        raise ImageReadError(f"training scan {spec.name} not found at {path}; pass --data-dir")
    if path.suffix == ".npz":
        return read_voxelmorph_npz(path, spec.name)[0]
    from ..image.io import read_volume

    return read_volume(path, name=spec.name).float()


def _cache_file(cache_dir: Path | None, stem: str, spacing_mm: float) -> Path | None:
    """Where a prepared scan or label map is cached (None: no cache); the name carries the spacing and
    PREPARED_FORMAT, so a changed preparation is never read back."""
    return Path(cache_dir) / f"{stem}_{spacing_mm:g}mm_v{PREPARED_FORMAT}.pt" if cache_dir else None


def mni152_tissue_labels(t1: Volume, gm: Volume, wm: Volume) -> Volume:
    """Labels of the MNI152 template from its tissue probability maps: 0 outside the head (T1 = 0),
    else the likeliest of 1 other (CSF, skull, scalp), 2 grey matter, 3 white matter."""
    other = (255.0 - gm.data - wm.data).clamp_min(0)
    labels = torch.stack([other, gm.data, wm.data]).argmax(0).int() + 1
    labels = torch.where(t1.data > 0, labels, torch.zeros_like(labels))
    return t1.with_data(labels, name="mni152_labels")


def read_labels(spec: ScanSpec, data_dir: Path) -> Volume:
    """The label map of a labelled scan on its own grid (integer ids ≥ 0)."""
    from ..image.io import read_volume

    if not spec.labels:
        raise ImageReadError(f"training scan {spec.name} has no label map")
    path = Path(data_dir) / spec.labels
    if not path.exists():
        raise ImageReadError(f"label map of {spec.name} not found at {path}; pass --data-dir")
    if path.suffix == ".npz":
        return read_voxelmorph_npz(path, spec.name)[1]
    if spec.name == "mni152_t1":  # tissue maps, not labels: grey and white matter beside each other
        t1 = read_scan(spec, data_dir)
        return mni152_tissue_labels(t1, read_volume(path).float(), read_volume(path.parent / "wm.nii.gz").float())
    labels = read_volume(path)
    return labels.with_data(labels.data.round().int())


def load_prepared_labels(prepared: dict[str, Volume], data_dir: Path | None = None,
                         cache_dir: Path | None = None) -> dict[str, Volume]:
    """Label maps of the labelled scans among ``prepared`` (by name), on each prepared scan's grid
    (nearest neighbour), cached beside the prepared scans."""
    from ..msode.grids import resample_onto

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = {}
    for name, scan in prepared.items():
        spec = spec_by_name(name)
        if not spec.labels:
            continue
        cached = _cache_file(cache_dir, f"{name}_labels", scan.geometry.spacing[0])
        if cached is not None and cached.exists():
            out[name] = scan.with_data(torch.load(cached, weights_only=True), name=f"{name}_labels")
            continue
        labels = resample_onto(read_labels(spec, data_dir).float(), scan.geometry, interpolation="nearest")
        data = labels.data.round().to(torch.int16)
        if cached is not None:
            with atomic_output(cached) as tmp:  # a killed run leaves no half-written cache file
                torch.save(data, tmp)
        out[name] = scan.with_data(data, name=f"{name}_labels")
    return out


def load_prepared_scans(data_dir: Path | None = None, split: str | None = None, spacing_mm: float = 2.0,
                        cache_dir: Path | None = None) -> dict[str, Volume]:
    """Prepared scans by name (optionally one split), cached as .pt files to make resumed runs fast
    (:mod:`.scan_cache` packs that folder for a machine without the data)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = {}
    for spec in SCANS:
        if split is not None and spec.split != split:
            continue
        cached = _cache_file(cache_dir, spec.name, spacing_mm)
        if cached is not None and cached.exists():
            saved = torch.load(cached, weights_only=True)
            geometry = ImageGeometry(shape=tuple(saved["data"].shape), spacing=tuple(saved["spacing"].tolist()),
                                     origin=tuple(saved["origin"].tolist()),
                                     direction=tuple(saved["direction"].tolist()))
            out[spec.name] = Volume(saved["data"], geometry, name=spec.name)
            continue
        volume = prepare_for_disa(read_scan(spec, data_dir), spacing_mm, spec.modality)
        if cached is not None:
            g = volume.geometry
            with atomic_output(cached) as tmp:  # a killed run leaves no half-written cache file
                torch.save({"data": volume.data, "spacing": torch.tensor(g.spacing), "origin": torch.tensor(g.origin),
                            "direction": torch.tensor(g.direction)}, tmp)
        out[spec.name] = volume
    return out


def spec_by_name(name: str) -> ScanSpec:
    return next(s for s in SCANS if s.name == name)
