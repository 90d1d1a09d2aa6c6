"""Training pairs for MS-ODE: label-driven contrasts of real brain T1 scans, moved by the paper's motions.

Anatomies (``../shared/data``): the voxelmorph T1 with its 46-label segmentation, the MNI152
2009a T1 with labels from its grey/white-matter maps (CSF-or-other / GM / WM by the largest
probability inside the brain), and Colin27 (a whole head with skull, AAL labels).  Kirby21 (the
only subject with real T1/T2/FLAIR) is held out for the benchmark.  Each anatomy is resampled once
onto an LPS-aligned working grid (cached by :func:`load_prepared_anatomies`); every sample then
draws two contrasts (``synthesize_contrast``: random intensity per label, bias field, noise; or
the real T1 with probability ``real_t1_probability``), masks them to the head and moves the first
by a random motion: rigid rotations U(−a, a) per axis and translations U(−b, b) mm (paper: 75°,
20 mm), or B-spline control-point displacements N(0, σ²) (paper: σ = 8 mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ImageReadError
from ..fileio import atomic_output
from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from ..msode.grids import centre_of_mass, normalise, pyramid, resample_onto, working_grid
from ..msode.model import PairBatch
from ..msode.warp import (BSplineBasis, apply_homogeneous, field_points, grid_points, rigid_homogeneous,
                          sample_moving)
from ..synthetic import synthesize_contrast
from ..transforms.bspline import control_grid_for_domain
from .scans import default_data_dir, mni152_tissue_labels, read_voxelmorph_npz


@dataclass
class Anatomy:
    name: str
    image: Volume  # [0, 1] on the working grid
    labels: Volume  # integer labels on the working grid
    mask: torch.Tensor  # bool brain mask
    #: synthesised contrasts drawn so far (re-used: synthesis costs more than a training step's warp)
    pool: list = None  # type: ignore[assignment]


def _read(path: Path) -> Volume:
    from ..image.io import read_volume

    if not path.exists():
        raise ImageReadError(f"training scan not found at {path}; pass --data-dir")
    return read_volume(path).float()


def raw_anatomies(data_dir: Path | None = None) -> list[tuple[str, Volume, Volume]]:
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = []
    t1, seg = read_voxelmorph_npz(data_dir / "mr_t1_seg_vxm" / "t1_seg.npz")
    out.append(("voxelmorph_t1", t1, seg))
    t1 = _read(data_dir / "mni152_2009a" / "t1.nii.gz")
    labels = mni152_tissue_labels(t1, _read(data_dir / "mni152_2009a" / "gm.nii.gz"),
                                  _read(data_dir / "mni152_2009a" / "wm.nii.gz"))
    out.append(("mni152_t1", t1, labels))
    # a whole head (skull, scalp, neck) as the held-out Kirby21 scans show, where the two above are
    # brain-only or nearly so: without it a deformable model meets tissue it never saw at test time
    t1 = _read(data_dir / "colin27" / "t1.nii.gz")
    aal = _read(data_dir / "colin27" / "aal_labels.nii.gz")
    out.append(("colin27_t1", t1, aal.with_data(aal.data.round().int(), name="colin27_aal")))
    return out


def prepare_anatomies(raw, size: int, spacing_mm: float) -> list[Anatomy]:
    out = []
    for name, image, labels in raw:
        grid = working_grid(image.geometry, size, spacing_mm)
        im = resample_onto(image, grid)
        lab = resample_onto(labels.float(), grid, interpolation="nearest")
        mask = (lab.data > 0) | (im.data > 0)
        out.append(Anatomy(name, im.with_data(normalise(im.data) * mask), lab.with_data(lab.data.round().long()), mask))
    return out


#: the anatomies :func:`raw_anatomies` reads, in its order (a cache is read back in this order)
ANATOMY_NAMES = ("voxelmorph_t1", "mni152_t1", "colin27_t1")
#: version of the anatomy cache files; bump it whenever reading or preparing an anatomy changes
ANATOMY_FORMAT = 1


def _anatomy_file(cache_dir: Path, name: str, size: int, spacing_mm: float) -> Path:
    return Path(cache_dir) / f"{name}_anatomy_{size}_{spacing_mm:g}mm_v{ANATOMY_FORMAT}.pt"


def load_prepared_anatomies(data_dir: Path | None, size: int, spacing_mm: float,
                            cache_dir: Path | None = None) -> list[Anatomy]:
    """:func:`prepare_anatomies` of :func:`raw_anatomies`, cached in ``cache_dir`` (one .pt file per
    anatomy, written atomically).  With every file cached, neither the data nor SimpleITK is needed,
    so a run can move to a machine without them (``scripts/scan_cache.py`` packs the folder)."""
    files = [_anatomy_file(cache_dir, n, size, spacing_mm) for n in ANATOMY_NAMES] if cache_dir else []
    if files and all(f.exists() for f in files):
        out = []
        for name, path in zip(ANATOMY_NAMES, files):
            saved = torch.load(path, weights_only=True)
            geometry = ImageGeometry(shape=tuple(saved["image"].shape), spacing=tuple(saved["spacing"].tolist()),
                                     origin=tuple(saved["origin"].tolist()), direction=tuple(saved["direction"].tolist()))
            out.append(Anatomy(name, Volume(saved["image"], geometry, name=name),
                               Volume(saved["labels"], geometry, name=f"{name}_labels"), saved["mask"]))
        return out
    raw = raw_anatomies(data_dir)
    if [r[0] for r in raw] != list(ANATOMY_NAMES):
        raise AssertionError("raw_anatomies and ANATOMY_NAMES disagree")  # a programming error, not user input
    anatomies = prepare_anatomies(raw, size, spacing_mm)
    for anatomy, path in zip(anatomies, files):
        g = anatomy.image.geometry
        with atomic_output(path) as tmp:
            torch.save({"image": anatomy.image.data, "labels": anatomy.labels.data, "mask": anatomy.mask,
                        "spacing": torch.tensor(g.spacing), "origin": torch.tensor(g.origin),
                        "direction": torch.tensor(g.direction)}, tmp)
    return anatomies


#: synthesised contrasts kept per anatomy; once full, a draw re-uses one (with probability 1 − POOL_REFRESH)
POOL_SIZE, POOL_REFRESH = 24, 0.15


def draw_contrast(anatomy: Anatomy, generator: torch.Generator, real_t1_probability: float) -> torch.Tensor:
    if float(torch.rand(1, generator=generator)) < real_t1_probability:
        return anatomy.image.data.float()
    if anatomy.pool is None:
        anatomy.pool = []
    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=generator))
    if len(anatomy.pool) >= POOL_SIZE and float(torch.rand(1, generator=generator)) > POOL_REFRESH:
        return anatomy.pool[seed % len(anatomy.pool)]
    contrast = _synthesise(anatomy, seed)
    if len(anatomy.pool) < POOL_SIZE:
        anatomy.pool.append(contrast)
    else:
        anatomy.pool[seed % POOL_SIZE] = contrast
    return contrast


def _synthesise(anatomy: Anatomy, seed: int) -> torch.Tensor:
    synthetic = synthesize_contrast(anatomy.image, anatomy.labels, seed, bias=0.2, noise=0.02)
    return normalise(synthetic.data * anatomy.mask) * anatomy.mask


@dataclass
class MotionSettings:
    rotation_deg: float = 75.0
    translation_mm: float = 20.0
    bspline_sigma_mm: float = 8.0
    mesh: int = 8


def random_rigid(batch: int, motion: MotionSettings, generator: torch.Generator) -> torch.Tensor:
    """[B, 6] (radians, mm) uniformly in the ranges."""
    u = torch.rand(batch, 6, generator=generator) * 2 - 1
    return u * torch.tensor([math.radians(motion.rotation_deg)] * 3 + [motion.translation_mm] * 3)


@dataclass
class TrainingBatch:
    pairs: PairBatch
    #: the true map (fixed point → moving point) at the finest fixed grid points, [B, D, H, W, 3]
    truth_points: torch.Tensor
    #: where the transform error counts (brain of the fixed image), [B, D, H, W]
    weight: torch.Tensor

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.pairs.to(device), self.truth_points.to(device), self.weight.to(device))


def make_batch(anatomies: list[Anatomy], kind: str, batch: int, levels: int, motion: MotionSettings,
               generator: torch.Generator, real_t1_probability: float = 0.25) -> TrainingBatch:
    """A batch of (moving = contrast b, fixed = contrast a moved by a known motion) pairs on one grid."""
    fixed, moving, truths, masks = [], [], [], []
    geometry = None
    for _ in range(batch):
        anatomy = anatomies[int(torch.randint(len(anatomies), (1,), generator=generator))]
        g = anatomy.image.geometry
        # every anatomy lives on its own box-centred grid of one size and spacing: samples are
        # expressed in coordinates relative to their box centre, so they share one grid
        geometry = geometry or g
        a = draw_contrast(anatomy, generator, real_t1_probability)
        b = draw_contrast(anatomy, generator, real_t1_probability)
        points = grid_points(g)
        centre = torch.as_tensor(g.center, dtype=torch.float32)
        if kind == "rigid":
            theta = random_rigid(1, motion, generator)
            h = rigid_homogeneous(theta, centre[None], centre[None])
            truth = apply_homogeneous(h, points)
        else:
            control = control_grid_for_domain(g, mesh_size=(motion.mesh,) * 3)
            coeff = torch.randn(1, 3, *control.shape, generator=generator) * motion.bspline_sigma_mm
            truth = field_points(points, BSplineBasis(control, g)(coeff))
        moved = sample_moving(a[None, None], g, truth)
        shift = centre  # express every sample in coordinates centred on its own box
        fixed.append(moved[0])
        moving.append(b[None])
        truths.append(truth[0] - shift)
        masks.append((moved[0, 0] > 0.02).float())
    # a common grid centred at the origin (all anatomies share size and spacing)
    common = ImageGeometry(shape=geometry.shape, spacing=geometry.spacing,
                           origin=tuple(np.asarray(geometry.origin) - np.asarray(geometry.center)),
                           direction=geometry.direction)
    fixed_t, moving_t = torch.stack(fixed), torch.stack(moving)
    geoms = [common if k == 0 else common.resampled(tuple(s * 2 ** k for s in common.spacing))
             for k in range(levels - 1, -1, -1)]
    pairs = PairBatch(pyramid(fixed_t, levels), pyramid(moving_t, levels), geoms, geoms,
                      centre_of_mass(fixed_t, common), centre_of_mass(moving_t, common))
    return TrainingBatch(pairs, torch.stack(truths), torch.stack(masks))
