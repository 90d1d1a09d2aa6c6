"""Dense deformable registration on precomputed feature maps (DISA paper, section 4.2).

The method is Heinrich et al.'s "non-parametric discrete registration with convex optimisation"
(WBIR 2014), without its inverse-consistency part, run on DISA or MIND-SSC feature maps.  The
displacement u lives in FIXED space: the full transform is ``CompositeTransform([pose, field])``,
x → pose(x + u(x)), where ``field`` is what :func:`dense_displacement` returns.

1. **Cost volume** (explicit search).  On a control grid of spacing ``grid_spacing_mm`` covering
   the fixed map's box, every control point p gets the cost of every candidate displacement d of
   a cube (±``search_radius_mm`` per axis in steps of ``search_step_mm``)::

       C(p, d) = Σ_q g(q − p) ω(q) · dis(φF(q), φM(pose(q + d)))  /  Σ_q g(q − p) ω(q)

   q runs over ``patch_samples``³ samples per grid cell (1: the control point itself, the plain
   point-wise cost), g is a Gaussian window of σ = ``patch_sigma_mm`` over neighbouring cells (0:
   p's own cell only), ω the fixed weight (LC²'s local variance times the user mask) and dis the
   pair's comparison turned into a cost: −dot product (DISA) or the mean squared difference
   (MIND).  One descriptor, or one 8 mm cell, is too little evidence to pick one of thousands of
   labels across modalities; Heinrich aggregates over patches for the same reason.  Samples whose
   candidate position leaves the moving map count at the cell's mean cost (neither attracting nor
   repelling).  Costs are then normalised: excess over each point's best label, divided by one
   global robust scale, times a confidence min(1, Σω / median Σω) (zero weight → regulariser only).
2. **Coupled convex optimisation.**  From the best label of each point (θ = ∞), alternate
   v = Gσ ∗ u (Gaussian smoothing of ``smoothing_sigma_mm``, the regulariser's step; points
   without evidence are down-weighted in it so they follow their neighbours) and
   u(p) = argmin_d  C(p, d) + |d − v(p)|² / (2θ)  (solved exactly by search over the labels, then
   refined below the label step by a parabola per axis) for a decreasing θ, so u and v meet; the
   result is the last smoothed v.
3. Optionally (``gradient_steps``) Adam steps on the continuous objective (trilinear sampling of
   the maps, as the linear stages use) with a diffusion penalty.  Off by default: on the synthetic
   MR-like/CT tests the discrete result already scores better on the MIND objective than the true
   field does, so following the objective further moved away from the truth.

Why lattices make the search cheap: the candidates are whole steps of a lattice of spacing
``search_step_mm`` (sharing the fixed map's direction) through the fixed samples.  The moving map
is resampled once, through the pose, onto that lattice padded by the search radius, so
φM(pose(q + d)) for every candidate is a shifted view of one array: no interpolation inside the
search loop, and any pose (even a non-linear one) costs the same.

Memory: the cost volume, N grid points × L candidates × 4 bytes, plus as much again for the
covered shares when candidates leave the moving map (``max_cost_volume_bytes`` bounds the two
together: 7 k points × 2197 labels ≈ 120 MiB), the maps resampled onto the sample grid and the
moving lattice, and fixed-size working chunks (``CHUNK_BYTES`` of moving windows in the search,
64 MiB of coupled costs in each argmin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field
from typing import Optional

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..image.geometry import ImageGeometry
from ..progress import CancelToken, ProgressCallback, ProgressScope
from ..transforms.base import Transform
from ..transforms.composite import CompositeTransform
from ..transforms.displacement import DisplacementFieldTransform
from ..transforms.linear import AffineTransform
from ..transforms.resample import resample_tensor
from .features import FeaturePair

#: weight of a point without evidence in the smoothing, against 1 for one with evidence
CONFIDENCE_FLOOR = 0.05
#: confidence (cell weight / median cell weight) from which a point counts fully in the smoothing
EVIDENCE_FULL = 0.1
#: bound on the temporary copy of moving windows in one step of the cost-volume search
CHUNK_BYTES = 64 * 1024 ** 2


@dataclass
class DenseSettings:
    """Parameters of :func:`dense_displacement` (lengths in mm, θ in mm²)."""

    #: spacing of the control grid that carries the displacement (a multiple of ``search_step_mm``)
    grid_spacing_mm: float = 8.0
    #: candidates span ±radius per axis: the largest residual displacement after the pose
    search_radius_mm: float = 12.0
    #: spacing of the candidates (12/2 → 13³ = 2197 labels)
    search_step_mm: float = 2.0
    #: fixed samples per axis in each grid cell whose costs are pooled (must divide grid/step);
    #: 1 compares the control point alone, 2 samples the cell every grid/2 mm (8 samples)
    patch_samples: int = 2
    #: σ of the Gaussian window over neighbouring cells with which the cell costs are pooled
    #: (0: each cell alone).  Cross-modal evidence from one 8 mm cell is weak; a window of
    #: σ = 8 mm (about 3 cells across) is close to the 30 mm patches LC² compares.
    patch_sigma_mm: float = 8.0
    #: coupling schedule θ (mm²), decreasing.  The data term is normalised so that an unrelated
    #: label costs about 1 more than the best one; |d − v|²/(2θ) then weighs a deviation δ from the
    #: smooth field.  θ = 50 lets a point leave v by ~10 mm if its data strongly agree (δ²/2θ = 1);
    #: θ = 0.5 makes leaving v by one 2 mm step cost 4 unrelated-label units, so the last u and v
    #: agree to within a step and smoothing it no longer changes it (the coupling has converged).
    #: Heinrich 2014 uses the same kind of geometric decay over about six steps.
    thetas: tuple = (50.0, 15.0, 5.0, 1.5, 0.5)
    #: σ of the Gaussian applied to u between coupling steps (the regulariser).  One grid cell
    #: keeps 8 mm detail yet averages out single-point mismatches.
    smoothing_sigma_mm: float = 8.0
    #: Adam steps on the continuous objective after the discrete stage (0: none)
    gradient_steps: int = 0
    #: Adam step size of those steps, mm
    gradient_step_mm: float = 0.25
    #: weight of the diffusion penalty (mean squared field difference between neighbouring grid
    #: points, per mm²) against the weighted mean feature dissimilarity, during those steps
    diffusion_weight: float = 0.05
    #: refuse problems whose cost volume (grid points × labels × 8 bytes) would exceed this
    max_cost_volume_bytes: int = 2 * 1024 ** 3
    #: fixed points of the continuous refinement (the heaviest ones)
    gradient_max_points: int = 50_000

    def validated(self) -> "DenseSettings":
        """Checks every field; returns self.  Raises :class:`InvalidParameterError`."""
        for name in ("grid_spacing_mm", "search_step_mm"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise InvalidParameterError(f"dense settings: {name} must be a positive number of mm, got {value!r}")
        if not _finite(self.search_radius_mm) or self.search_radius_mm < self.search_step_mm:
            raise InvalidParameterError(
                f"dense settings: search_radius_mm ({self.search_radius_mm!r}) must be at least search_step_mm "
                f"({self.search_step_mm}), or there is nothing to search")
        ratio = self.grid_spacing_mm / self.search_step_mm
        if abs(ratio - round(ratio)) > 1e-6:
            raise InvalidParameterError(
                f"dense settings: grid_spacing_mm ({self.grid_spacing_mm}) must be a whole multiple of "
                f"search_step_mm ({self.search_step_mm}); e.g. 8 and 2")
        if not isinstance(self.patch_samples, (int, np.integer)) or self.patch_samples < 1 \
                or round(ratio) % int(self.patch_samples):
            raise InvalidParameterError(
                f"dense settings: patch_samples ({self.patch_samples!r}) must be a positive integer dividing "
                f"grid_spacing_mm / search_step_mm = {round(ratio)}")
        thetas = tuple(self.thetas)
        if any(not _finite(t) or t <= 0 for t in thetas):
            raise InvalidParameterError(f"dense settings: every coupling θ must be positive, got {thetas}")
        if any(b > a for a, b in zip(thetas, thetas[1:])):
            raise InvalidParameterError(f"dense settings: the coupling schedule θ must decrease, got {thetas}")
        for name in ("smoothing_sigma_mm", "patch_sigma_mm"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise InvalidParameterError(f"dense settings: {name} must be ≥ 0 mm, got {value!r}")
        if not isinstance(self.gradient_steps, (int, np.integer)) or self.gradient_steps < 0:
            raise InvalidParameterError(
                f"dense settings: gradient_steps must be an integer ≥ 0, got {self.gradient_steps!r}")
        for name in ("gradient_step_mm", "diffusion_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise InvalidParameterError(f"dense settings: {name} must be ≥ 0, got {value!r}")
        if int(self.gradient_max_points) < 1 or int(self.max_cost_volume_bytes) < 1:
            raise InvalidParameterError(
                "dense settings: gradient_max_points and max_cost_volume_bytes must be positive")
        return self

    @property
    def label_radius(self) -> int:
        """Candidates per axis on each side of zero."""
        return int(math.floor(self.search_radius_mm / self.search_step_mm + 1e-6))

    @property
    def label_count(self) -> int:
        return (2 * self.label_radius + 1) ** 3


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- grids
@dataclass
class _Lattices:
    """The three grids of the search, all sharing the fixed map's direction.

    control: the displacement grid (spacing G), covering the fixed map's box (edge to edge);
    samples: ``patch_samples`` fixed samples per axis in each control cell, evenly spread;
    moving:  the candidates' lattice (spacing h) through the samples, padded by the radius R.
    """

    control: ImageGeometry
    samples: ImageGeometry
    moving: ImageGeometry
    step_ratio: int  # sample spacing in moving-lattice steps
    radius: int  # R, in moving-lattice steps
    patch: int  # samples per axis per cell
    cells: tuple = dataclass_field(default=())  # control shape (z, y, x)


def _geometry(center: np.ndarray, direction: np.ndarray, spacing: float, size_xyz: np.ndarray,
              template: ImageGeometry) -> ImageGeometry:
    """A grid of ``size_xyz`` voxels of ``spacing`` centred on ``center`` along ``direction``."""
    origin = center - direction @ (spacing * (size_xyz - 1) / 2.0)
    return ImageGeometry(shape=(int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0])), spacing=(spacing,) * 3,
                         origin=tuple(origin), direction=template.direction)


def _lattices(fixed: ImageGeometry, settings: DenseSettings) -> _Lattices:
    g, h, s = float(settings.grid_spacing_mm), float(settings.search_step_mm), int(settings.patch_samples)
    k = int(round(g / h))
    step_ratio = k // s
    radius = settings.label_radius
    direction = fixed.direction_matrix
    center = np.asarray(fixed.center)
    # enough cells to cover the whole box: a field that stopped short would jump to zero inside it
    cells = np.maximum(1, np.ceil(fixed.extent_mm / g - 1e-6)).astype(int)
    control = _geometry(center, direction, g, cells, fixed)
    samples = _geometry(center, direction, g / s, cells * s, fixed)  # same centre: cells stay centred
    moving_size = (cells * s - 1) * step_ratio + 1 + 2 * radius
    moving = _geometry(center, direction, h, moving_size, fixed)
    return _Lattices(control, samples, moving, step_ratio, radius, s, control.shape)


# ---------------------------------------------------------------------------------------- helpers
def _gaussian_kernel(sigma_cells: float, dtype, device) -> Optional[torch.Tensor]:
    if sigma_cells <= 1e-6:
        return None
    radius = max(1, int(math.ceil(3.0 * sigma_cells)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma_cells) ** 2)
    return kernel / kernel.sum()


def _filter(x: torch.Tensor, kernel: Optional[torch.Tensor]) -> torch.Tensor:
    """Separable filtering of each [D, H, W] image of ``x`` [B, D, H, W] by ``kernel``, zero padded.

    Each axis is one matrix product with a banded matrix (the grids are small: tens of cells per
    axis), much faster on a CPU than a 1-channel convolution over thousands of images.
    """
    if kernel is None:
        return x
    r = (kernel.numel() - 1) // 2
    out = x
    for axis, size in zip((1, 2, 3), x.shape[1:]):
        i = torch.arange(size, device=x.device)
        offset = i[None, :] - i[:, None] + r  # kernel index of (output i, input j)
        band = torch.where((offset >= 0) & (offset <= 2 * r), kernel[offset.clamp(0, 2 * r)],
                           torch.zeros((), dtype=kernel.dtype, device=x.device)).to(x.dtype)
        out = torch.movedim(torch.tensordot(band, torch.movedim(out, axis, 0), dims=([1], [0])), 0, axis)
    return out


def _smooth(field: torch.Tensor, kernel: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gaussian smoothing of a field [3, D, H, W] as a normalised convolution, optionally weighted.

    Dividing by the smoothed (weights or) ones keeps border displacements at their level instead of
    pulling them towards the zero padding.  ``weight`` [D, H, W] > 0 lets points with evidence
    dominate their neighbourhood: a point without data takes its neighbours' displacement.
    """
    if kernel is None:
        return field
    w = torch.ones_like(field[:1]) if weight is None else weight[None].to(field)
    out = _filter(torch.cat([field * w, w], 0), kernel)
    return out[:3] / out[3:].clamp_min(1e-12)


def _labels(radius: int, step_mm: float, dtype, device) -> torch.Tensor:
    """[L, 3] candidate displacements (x, y, z along the grid axes, mm), z slowest, x fastest."""
    r = torch.arange(-radius, radius + 1, device=device)
    kz, ky, kx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([kx, ky, kz], -1).reshape(-1, 3).to(dtype) * step_mm


def _block_sum(x: torch.Tensor, s: int) -> torch.Tensor:
    """Sum over s×s×s blocks of the last three axes."""
    if s == 1:
        return x
    *lead, d, h, w = x.shape
    return x.reshape(*lead, d // s, s, h // s, s, w // s, s).sum((-5, -3, -1))


# ---------------------------------------------------------------------------------------- cost volume
def _cost_volume(pair: FeaturePair, pose: Transform, lat: _Lattices, scope: ProgressScope,
                 aggregation: Optional[torch.Tensor] = None):
    """Normalised data costs D [L, N] (L candidates, N control points z-major), and the confidence κ [N].

    Memory: the cost sums and, when candidates leave the moving map, the covered shares (float32,
    N × L each), plus the resampled maps (C channels on the sample grid and the moving lattice)
    and one step's copy of moving windows (≤ ``CHUNK_BYTES``).
    """
    device = pair.fixed.data.device
    fixed_data = pair.fixed.data.float()
    moving_data = pair.moving.data.float()
    c = fixed_data.shape[0]
    identity = AffineTransform.identity(1, dtype=torch.float64, device=device)
    pose64 = pose.to(device=device, dtype=torch.float64)

    # fixed features and weights at the samples; outside the fixed map the weight is zero
    with torch.no_grad():
        f = resample_tensor(fixed_data, pair.fixed.geometry, identity, lat.samples)[0]  # [C, d, h, w]
        w = resample_tensor(pair.weight.float()[None], pair.fixed.geometry, identity, lat.samples)[0, 0]
        w = w.clamp_min(0)
        scope(0.05, "dense: moving features through the pose")
        m = resample_tensor(moving_data, pair.moving.geometry, pose64, lat.moving)[0]  # [C, D, H, W]
        # where pose(q + d) leaves the moving map nothing is known: tracked, then filled neutrally
        inside = resample_tensor(torch.ones(1, *pair.moving.geometry.shape, device=device), pair.moving.geometry,
                                 pose64, lat.moving)[0, 0] > 0.5

    # Every comparison becomes one dot product over K channels, with the fixed weight ω folded into
    # the fixed side and the moving map's validity v into the moving side:
    #   dot: ω·v·(−f·m)              = [−ω f] · [v m]
    #   ssd: ω·v·|f − m|²            = [−2ω f, ω, ω|f|²] · [v m, v|m|², v]   (÷ C: mean over channels)
    valid = inside.float()
    everywhere = bool(inside.all())
    del inside
    ssd = pair.comparison == "ssd"
    if ssd:
        fixed_side = torch.cat([-2.0 * w * f, w[None], (w * (f * f).sum(0))[None]], 0) / c
        moving_side = torch.cat([m * valid, ((m * m).sum(0) * valid)[None], valid[None]], 0)
    else:
        fixed_side = -w * f
        moving_side = m * valid
    del f, m
    r, t, s = lat.radius, lat.step_ratio, lat.patch
    n = 2 * r + 1
    ds, hs, ws = fixed_side.shape[1:]
    cz, cy, cx = lat.cells
    k_channels = fixed_side.shape[0]
    fixed_cells = fixed_side.reshape(k_channels, cz, s, cy, s, cx, s)  # [K, cells_z, S, cells_y, S, cells_x, S]
    n_cells = cz * cy * cx
    n_labels = n ** 3
    sums = torch.empty(n_labels, n_cells, dtype=torch.float32, device=device)
    total = _block_sum(w, s).reshape(-1)  # Σ ω per cell
    # One step handles the n candidates along x of one (z, y) offset for a slab of cell rows: the
    # moving window of each sample, unfolded along x, is a strided view; the einsum copies it once
    # (K × samples × n floats, kept ≤ CHUNK_BYTES by the slab height) and contracts it cell by
    # cell.  Few large operations rather than one small one per candidate.
    per_row = k_channels * s * hs * ws * n * 4
    rows = max(1, min(cz, CHUNK_BYTES // max(1, per_row)))
    steps, done = n * n * (-(-cz // rows)), 0
    for kz in range(n):
        for ky in range(n):
            first = (kz * n + ky) * n
            for z0 in range(0, cz, rows):
                z1 = min(cz, z0 + rows)
                zs = slice(kz + z0 * s * t, kz + ((z1 * s) - 1) * t + 1, t)
                ys = slice(ky, ky + (hs - 1) * t + 1, t)
                # [K, z, y, x, n]: sample x at t·i, candidate kx at t·i + kx
                view = moving_side[:, zs, ys, :].unfold(3, n, 1)[:, :, :, : (ws - 1) * t + 1 : t]
                view = view.reshape(k_channels, z1 - z0, s, cy, s, cx, s, n)
                part = torch.einsum("kaibjcd,kaibjcdl->labc", fixed_cells[:, z0:z1], view)
                sums[first:first + n, z0 * cy * cx:z1 * cy * cx] = part.reshape(n, -1)
                done += 1
            scope(0.05 + 0.8 * done / steps, f"dense: cost volume, {first + n}/{n_labels} candidates")
    del moving_side, fixed_side, fixed_cells

    # Share of each cell's fixed weight whose candidate position lies inside the moving map (None:
    # all of it): for each of the S³ sample offsets, the validity read at every cell and
    # candidate is one unfolded (strided) view of the lattice, weighted by that sample's ω.
    covered = None
    if not everywhere:
        covered = torch.zeros(n, n, n, cz, cy, cx, dtype=torch.float32, device=device)
        w_cells = w.reshape(cz, s, cy, s, cx, s)
        step = s * t
        for mz in range(s):
            for my in range(s):
                for mx in range(s):
                    shifted = valid[mz * t:, my * t:, mx * t:]
                    windows = shifted.unfold(0, n, step).unfold(1, n, step).unfold(2, n, step)[:cz, :cy, :cx]
                    covered += w_cells[:, mz, :, my, :, mx] * windows.permute(3, 4, 5, 0, 1, 2)
        covered = covered.reshape(n_labels, n_cells)
        covered *= torch.where(total > 0, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))
    del valid

    # Pooling over neighbouring cells (a Gaussian window of patch_sigma_mm): the sums and the
    # covered weights are filtered alike, so the ratio below is a weighted mean over the window.
    # One cell alone (8 mm, a few hundred descriptor values) is too little evidence across
    # modalities; LC² itself compares 30 mm patches.
    if aggregation is not None:
        pooled_total = _filter(total.reshape(1, *lat.cells), aggregation).reshape(-1)
        for a in range(0, n_labels, 256):
            b = min(n_labels, a + 256)
            sums[a:b] = _filter(sums[a:b].reshape(b - a, *lat.cells), aggregation).reshape(b - a, -1)
            if covered is not None:
                shared = (covered[a:b] * total).reshape(b - a, *lat.cells)
                covered[a:b] = _filter(shared, aggregation).reshape(b - a, -1) / pooled_total.clamp_min(1e-30)
        total = pooled_total
    scope(0.9, "dense: normalising costs")

    # Candidates partly outside the moving map: the uncovered share of the weight counts at the
    # cell's mean dissimilarity, so leaving the map neither attracts nor repels a point.
    # (In place, a slab of candidates at a time, so the N × L arrays are never copied.)
    has_weight = total > 0
    inv_total = torch.where(has_weight, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))
    if covered is not None:
        covered_sum = covered.sum(0)  # [N]
        mean = sums.sum(0) / (covered_sum * total).clamp_min(1e-30)  # mean dissimilarity per cell
    cost = sums  # [L, N], filled in place
    for a in range(0, n_labels, 256):
        block = cost[a:a + 256]
        if covered is not None:
            block += (1.0 - covered[a:a + 256]) * (total * mean)
        block *= inv_total
    del covered

    # Normalisation: excess over each point's best label, divided by one global robust scale (the
    # median over weighted points of the mean excess).  A global scale, not a per-point one, keeps
    # flat cost profiles flat, so structure-less cells (air, homogeneous organs) follow the
    # regulariser instead of noise amplified to full strength.
    cost -= cost.min(0, keepdim=True).values
    spread = cost.mean(0)
    scale = spread[has_weight].median() if bool(has_weight.any()) else torch.ones((), device=device)
    # Confidence: the cell's total fixed weight against the median cell, saturating at 1 so a few
    # very high-variance cells (bone edges) do not turn rigid; zero weight → regulariser only.
    reference = total[has_weight].median() if bool(has_weight.any()) else torch.ones((), device=device)
    confidence = (total / reference.clamp_min(1e-30)).clamp(0.0, 1.0)
    cost *= (confidence / scale.clamp_min(1e-12))[None]
    return cost, confidence


def _coupled_argmin(cost: torch.Tensor, labels: torch.Tensor, v: Optional[torch.Tensor], theta: Optional[float],
                    chunk: int, radius: int, step_mm: float) -> torch.Tensor:
    """u(p) = argmin_d cost(d, p) + |d − v(p)|²/(2θ) → [N, 3] mm; θ None: data only (ties → smallest |d|).

    ``cost`` is [L, N]; ``chunk`` points at a time bound the coupled temporary to L × chunk.  The
    minimum is refined below the label step by a parabola through it and its two neighbours per
    axis: without this, rounding to the 2 mm lattice at every coupling step adds ~1 mm of noise
    that the smoothing only partly removes.
    """
    n = cost.shape[1]
    side = 2 * radius + 1
    out = torch.empty(n, 3, dtype=labels.dtype, device=labels.device)
    norm2 = (labels * labels).sum(1)[:, None]  # [L, 1]
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if theta is None:
            total = cost[:, a:b] + 1e-6 * norm2  # a tiny pull to zero only breaks ties
        else:
            # |d − v|² = |d|² − 2 d·v + |v|²; the last term does not change the argmin
            total = cost[:, a:b] + (norm2 - 2.0 * labels @ v[a:b].T) / (2.0 * theta)
        best = total.argmin(0)  # [n]
        u = labels[best].clone()
        columns = torch.arange(b - a, device=cost.device)
        centre = total[best, columns]
        # label index = (kz·side + ky)·side + kx; components of u are (x, y, z)
        for axis, stride in enumerate((1, side, side * side)):
            k = (best // stride) % side
            inner = (k > 0) & (k < side - 1)
            lo = total[(best - stride).clamp(0, total.shape[0] - 1), columns]
            hi = total[(best + stride).clamp(0, total.shape[0] - 1), columns]
            curvature = lo + hi - 2.0 * centre
            ok = inner & (curvature > 1e-12)
            delta = torch.where(ok, (lo - hi) / (2.0 * curvature.clamp_min(1e-12)), torch.zeros_like(centre))
            u[:, axis] += delta.clamp(-0.5, 0.5) * step_mm
        out[a:b] = u
    return out


def _to_grid(u: torch.Tensor, cells: tuple) -> torch.Tensor:
    """[N, 3] → [3, D, H, W]"""
    return u.T.reshape(3, *cells)


def _from_grid(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(3, -1).T


# ---------------------------------------------------------------------------------------- refinement
def _refine(pair: FeaturePair, pose: Transform, grid: ImageGeometry, field: torch.Tensor, settings: DenseSettings,
            scope: ProgressScope) -> torch.Tensor:
    """A few Adam steps of the weighted continuous dissimilarity plus a diffusion penalty."""
    from .objective import FeatureObjective

    objective = FeatureObjective(pair, max_points=int(settings.gradient_max_points))
    param = field.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([param], lr=float(settings.gradient_step_mm))
    pose = pose.detach()
    lam = float(settings.diffusion_weight)
    steps = int(settings.gradient_steps)
    for step in range(steps):
        optimiser.zero_grad()
        with torch.enable_grad():
            transform = CompositeTransform([pose, DisplacementFieldTransform(grid, param)])
            loss = -objective.value(transform)[0].float()
            if lam > 0:
                diffusion = sum(((param.diff(dim=d) / grid.spacing[0]) ** 2).mean() for d in (2, 3, 4))
                loss = loss + lam * diffusion
            loss.backward()
        optimiser.step()
        scope((step + 1) / steps, f"dense: refinement {step + 1}/{steps}")
    return param.detach()


# ---------------------------------------------------------------------------------------- entry point
def dense_displacement(pair: FeaturePair, pose: Transform, settings: DenseSettings | None = None,
                       progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelToken] = None) -> DisplacementFieldTransform:
    """The fixed-space displacement field u of x → pose(x + u(x)), on a grid over the fixed map.

    ``pose`` (batch 1, usually the rigid/affine result) maps fixed to moving space.  Returns a
    batch-1 :class:`DisplacementFieldTransform` (float32, on the maps' device) whose grid has spacing
    ``grid_spacing_mm``, covers the fixed map's box and shares its direction; the caller composes
    ``CompositeTransform([pose, field])``.  The pair's ``point_stride`` is not used: this stage
    samples the fixed map on its own grid (``patch_samples`` per cell).  The inputs are not
    modified.  Raises :class:`InvalidParameterError` for bad settings or inputs (before any heavy
    work) and :class:`~DeepMultimodalRegLib.errors.CancelledError` when ``cancel`` is set.
    """
    settings = (settings if settings is not None else DenseSettings()).validated()
    if not isinstance(pair, FeaturePair):
        raise InvalidParameterError("dense_displacement needs a FeaturePair (disa_features or mind_features)")
    if pair.comparison not in ("dot", "ssd"):
        raise InvalidParameterError(f"unknown feature comparison {pair.comparison!r}; use 'dot' or 'ssd'")
    fixed_data, moving_data = pair.fixed.data, pair.moving.data
    if fixed_data.dim() != 4 or moving_data.dim() != 4 or fixed_data.shape[0] != moving_data.shape[0]:
        raise InvalidParameterError(
            f"fixed and moving feature maps must be [C, D, H, W] with the same C, got "
            f"{tuple(pair.fixed.data.shape)} and {tuple(pair.moving.data.shape)}")
    if tuple(pair.weight.shape) != tuple(pair.fixed.data.shape[1:]):
        raise InvalidParameterError(
            f"the fixed weight {tuple(pair.weight.shape)} must lie on the fixed map's grid "
            f"{tuple(pair.fixed.data.shape[1:])}")
    if not isinstance(pose, Transform) or pose.batch_size != 1:
        raise InvalidParameterError("dense_displacement takes one pose (a transform of batch size 1)")
    if not bool((pair.weight > 0).any()):
        raise InvalidParameterError("no fixed location carries weight; nothing to register")

    scope = ProgressScope(progress, 0.0, 1.0, cancel)
    scope(0.0, "dense: preparing grids")
    lat = _lattices(pair.fixed.geometry, settings)
    n_cells, n_labels = int(np.prod(lat.cells)), settings.label_count
    need = n_cells * n_labels * 8
    if need > int(settings.max_cost_volume_bytes):
        raise InvalidParameterError(
            f"the dense cost volume would need {need / 1024 ** 3:.1f} GiB ({n_cells} grid points × {n_labels} "
            f"candidates) > max_cost_volume_bytes; increase grid_spacing_mm or search_step_mm, or reduce "
            "search_radius_mm")
    device = pair.fixed.data.device
    refine = settings.gradient_steps > 0
    search = scope.sub(0.0, 0.75 if refine else 0.9)
    aggregation = _gaussian_kernel(float(settings.patch_sigma_mm) / float(settings.grid_spacing_mm), torch.float32,
                                   device)
    with torch.no_grad():  # a pose that requires grad must not make the search build a graph
        cost, confidence = _cost_volume(pair, pose, lat, search, aggregation)
    # Smoothing weights: 1 for points with some evidence (at least EVIDENCE_FULL of the median
    # cell's weight), less below, down to CONFIDENCE_FLOOR without any: points without data (masked
    # out, outside the image) take their neighbours' displacement instead of dragging it towards
    # their own start at zero.  Elsewhere this is plain Gaussian smoothing, as in Heinrich 2014.
    smoothing_weight = ((confidence / EVIDENCE_FULL).clamp(max=1.0) + CONFIDENCE_FLOOR).reshape(lat.cells)

    coupling = scope.sub(0.75 if refine else 0.9, 0.85 if refine else 1.0)
    step = float(settings.search_step_mm)
    labels = _labels(lat.radius, step, torch.float32, device)
    kernel = _gaussian_kernel(float(settings.smoothing_sigma_mm) / float(settings.grid_spacing_mm), torch.float32,
                              device)
    chunk = max(1, (64 * 1024 ** 2) // (4 * n_labels))  # the coupled costs of ≤ 64 MiB at a time
    with torch.no_grad():
        u = _coupled_argmin(cost, labels, None, None, chunk, lat.radius, step)
        thetas = tuple(settings.thetas)
        for i, theta in enumerate(thetas):
            v = _from_grid(_smooth(_to_grid(u, lat.cells), kernel, smoothing_weight))
            coupling((i + 1) / (len(thetas) + 1), f"dense: coupling θ = {theta:g} mm²")
            u = _coupled_argmin(cost, labels, v, float(theta), chunk, lat.radius, step)
        v = _smooth(_to_grid(u, lat.cells), kernel, smoothing_weight)  # [3, D, H, W], mm along the grid axes
    del cost
    # grid-axis components → physical (x, y, z) components
    direction = torch.as_tensor(lat.control.direction_matrix, dtype=torch.float32, device=device)
    field = torch.einsum("ij,jzyx->izyx", direction, v)[None].contiguous()
    coupling(1.0, "dense: coupled optimisation done")

    if refine:
        field = _refine(pair, pose, lat.control, field, settings, scope.sub(0.85, 1.0))
    scope(1.0, "dense: done")
    return DisplacementFieldTransform(lat.control, field.float())
