"""The registration objective over precomputed feature maps (DISA paper, eq. 2).

    f(α) = Σ_p w(p) · s(φ(F)[p], φ(M)(T_α(p)))  /  Σ_p w(p)

over fixed locations p (physical LPS points of the fixed feature grid), with s the dot product
(DISA) or minus the mean squared difference (MIND-SSC).  The moving map is sampled trilinearly at
the transformed points, so the gradient with respect to the transform parameters comes from the
resampling of the precomputed maps only; the CNN is never run again.  On the CPU the moving map is
sampled by a channels-last weighted gather (:mod:`.trilinear`, 2.4–3.7× faster than ``grid_sample``
there); on a GPU by ``grid_sample``.  Both follow the same rules and the tests compare them.

Many transforms are evaluated at once (a batch of poses: the starts of a global search).  Points
that fall outside the moving map compare with a zero vector, which, for DISA, is "no similarity".
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError
from ..transforms.base import Transform
from ..transforms.sampling import apply_affine, physical_to_grid_matrix, sample_grid
from .features import FeaturePair
from .trilinear import ChannelsLastMap


#: fixed points drawn per kept cell of the fixed map, and the seed of their positions
OVERSAMPLE, POINT_SEED = 2, 0


def _fixed_locations(pair: FeaturePair, max_points: int | None, oversample: int = OVERSAMPLE,
                     seed: int = POINT_SEED) -> torch.Tensor:
    """Continuous (i, j, k) indices [N, 3] into the fixed map of the compared locations.

    Why not the map's own voxels: the fixed and moving maps share a lattice (same spacing, same
    axes), so with every point on a lattice node all points have the same fractional offset in the
    moving map.  A trilinearly interpolated sum is then multilinear in the translation within a
    cell, and its maximum sits on a cell vertex: the optimum snaps to multiples of the 8 mm DISA
    grid.  Points jittered uniformly inside their cell have different offsets, so the kinks of the
    interpolation no longer line up and the objective varies smoothly at sub-cell scale.

    Cells are the map's voxels every ``point_stride`` (weight > 0); with ``max_points`` the
    heaviest cells are kept, ``oversample`` points in each.  Cells of equal weight are kept in a seeded
    random order, not in memory order.  Why: under equal weights (the affine stage's support weights)
    every cell ties, and a stable sort kept the first cells in memory order, i.e. the lowest z-slices
    only (on the chest CT slices 0–4 of 27): a slab that cannot pin the scale along z, and the
    affine stage stretched the chest 12% along it (docs/benchmarks.md).  Deterministic all the same.
    """
    weight = pair.weight
    s = pair.point_stride
    keep = torch.zeros_like(weight, dtype=torch.bool)
    keep[::s, ::s, ::s] = True
    keep &= weight > 0
    index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    if max_points is not None and index.numel() * oversample > max_points:
        # its own generator: the jitter below stays what it was (weights without ties keep their points)
        tie_order = torch.Generator().manual_seed(seed + 1)
        shuffled = torch.randperm(index.numel(), generator=tie_order).to(index.device)
        w = weight.reshape(-1)[index[shuffled]]
        order = shuffled[torch.sort(w, descending=True, stable=True).indices[:max(1, max_points // oversample)]]
        index = index[torch.sort(order).values]  # keep memory order (cache friendly)
    d, h, wd = weight.shape
    k, rem = index // (h * wd), index % (h * wd)
    j, i = rem // wd, rem % wd
    cells = torch.stack([i, j, k], 1).double().repeat_interleave(oversample, 0)
    g = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(cells.shape, generator=g, dtype=torch.float64) - 0.5) * s
    upper = torch.tensor([wd - 1, h - 1, d - 1], dtype=torch.float64)
    return (cells + jitter.to(cells.device)).clamp(min=torch.zeros(3, dtype=torch.float64), max=upper)


def _sample_at_indices(data: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples [N, C] of data [C, D, H, W] at continuous indices (i, j, k) inside the grid."""
    size = torch.tensor([data.shape[3], data.shape[2], data.shape[1]], dtype=torch.float64, device=ijk.device)
    grid = (2 * ijk / (size - 1).clamp_min(1) - 1).to(data.dtype)
    out = torch.nn.functional.grid_sample(data[None], grid.reshape(1, -1, 1, 1, 3), mode="bilinear",
                                          padding_mode="border", align_corners=True)
    return out.reshape(data.shape[0], -1).T.contiguous()


class FeatureObjective:
    """Similarity of a batch of transforms (fixed → moving) under one :class:`FeaturePair`.

    ``value(transform)`` returns [B] (higher is better), differentiable with respect to the
    transform's tensors.  ``max_points`` bounds the number of fixed locations (in the heaviest cells).
    ``sampler``: how the moving map is read, "gather" (:mod:`.trilinear`), "grid_sample", or "auto"
    (gather on the CPU, where it was measured faster; grid_sample elsewhere).
    """

    def __init__(self, pair: FeaturePair, max_points: int | None = None, sampler: str = "auto"):
        if pair.comparison not in ("dot", "ssd"):
            raise InvalidParameterError(f"unknown feature comparison {pair.comparison!r}")
        if sampler not in ("auto", "gather", "grid_sample"):
            raise InvalidParameterError(f"sampler must be 'auto', 'gather' or 'grid_sample', got {sampler!r}")
        self.pair = pair
        device = pair.fixed.data.device
        ijk = _fixed_locations(pair, max_points).to(device)
        if ijk.shape[0] == 0:
            raise InvalidParameterError("no fixed location carries weight; nothing to register")
        m = torch.as_tensor(pair.fixed.geometry.index_to_physical_matrix(), dtype=torch.float64, device=device)
        #: [N, 3] physical points (float64: the transforms are float64)
        self.points = ijk @ m[:3, :3].T + m[:3, 3]
        w = _sample_at_indices(pair.weight[None].to(pair.fixed.data.dtype), ijk)[:, 0].clamp_min(0)
        self.weights = w / w.sum().clamp_min(1e-30)
        #: [N, C] fixed features at the points
        self.fixed_features = _sample_at_indices(pair.fixed.data, ijk)
        self.moving = pair.moving.data
        # where the moving map is sampled from: rows for the CPU gather, or grid_sample's [C, D, H, W]
        gather = sampler == "gather" or (sampler == "auto" and device.type == "cpu")
        self._gather = ChannelsLastMap(self.moving) if gather else None
        geometry = pair.moving.geometry
        to_moving = geometry.physical_to_index_matrix() if self._gather is not None else physical_to_grid_matrix(geometry)
        self._to_moving = torch.as_tensor(to_moving, dtype=torch.float64, device=device)
        # constants of value(), computed once: the points in the maps' dtype (linear transforms) and,
        # for DISA, the fixed features with the weights folded in
        self._points_lowp = self.points.to(self.moving.dtype)
        self._points_rows = self._points_lowp.T.contiguous()[None]  # [1, 3, N]
        self._weighted_fixed = (self.fixed_features * self.weights[:, None]).reshape(-1)  # [N·C]
        #: number of single-transform evaluations so far
        self.evaluations = 0

    @property
    def point_count(self) -> int:
        return int(self.points.shape[0])

    def _composed(self, transform: Transform) -> torch.Tensor:
        """[B, 4, 4] fixed-physical → moving-map matrices of a linear transform, in the maps' dtype:
        the transform and the map's physical-to-map matrix composed in float64 first, so the N points
        go through one small matmul in the maps' dtype instead of two float64 passes."""
        h = self._to_moving @ transform.homogeneous().to(self._to_moving.dtype)
        return h.to(self.moving.dtype)

    def _moving_coordinates(self, transform: Transform) -> torch.Tensor:
        """[B, N, 3] coordinates in the moving map of the transformed fixed points: continuous indices
        for the CPU gather, ``grid_sample`` coordinates on a GPU.  Linear transforms go through
        :meth:`_composed`; other transforms map the points in float64.  Same values either way
        (tests compare them)."""
        if transform.is_linear:
            h = self._composed(transform)
            return torch.einsum("nj,bij->bni", self._points_lowp, h[:, :3, :3]) + h[:, None, :3, 3]
        mapped = transform.transform_points(self.points)  # [B, N, 3] float64
        return apply_affine(mapped, self._to_moving).to(self.moving.dtype)

    def sampled_moving(self, transform: Transform) -> torch.Tensor:
        """[B, N, C] moving features at the transformed fixed points (zero outside the moving map:
        ITK's rule)."""
        if self._gather is not None and transform.is_linear:
            # the gather wants coordinate rows [3, B·N]: produce them directly (A·Pᵀ + t per pose)
            h = self._composed(transform)
            rows = torch.baddbmm(h[:, :3, 3:], h[:, :3, :3], self._points_rows.expand(h.shape[0], 3, -1))
            rows = rows[0] if rows.shape[0] == 1 else rows.transpose(0, 1).reshape(3, -1)
            return self._gather.sample_columns(rows).reshape(h.shape[0], -1, self._gather.channels)
        coordinates = self._moving_coordinates(transform)
        if self._gather is not None:
            return self._gather.sample(coordinates)
        return sample_grid(self.moving, self.pair.moving.geometry, coordinates).transpose(1, 2)

    def value(self, transform: Transform) -> torch.Tensor:
        """[B] weighted mean similarity of each transform of the batch."""
        sampled = self.sampled_moving(transform)
        self.evaluations += transform.batch_size
        if self.pair.comparison == "dot":
            # Σ_n Σ_c w_n f_nc m_bnc as one matrix-vector product over the flattened (n, c)
            return (sampled.reshape(sampled.shape[0], -1) @ self._weighted_fixed).double()
        local = -((sampled - self.fixed_features) ** 2).mean(-1)
        return (local * self.weights).sum(-1).double()
