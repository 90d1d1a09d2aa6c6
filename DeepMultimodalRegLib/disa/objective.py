"""The registration objective over precomputed feature maps (DISA paper, eq. 2).

    f(α) = Σ_p w(p) · s(φ(F)[p], φ(M)(T_α(p)))  /  Σ_p w(p)

over fixed locations p (physical LPS points of the fixed feature grid), with s the dot product
(DISA) or minus the mean squared difference (MIND-SSC).  The moving map is sampled trilinearly at
the transformed points, so the gradient with respect to the transform parameters comes from the
resampling of the precomputed maps only; the CNN is never run again.

Many transforms are evaluated at once (a batch of poses: the starts of a global search).  Points
that fall outside the moving map compare with a zero vector, which, for DISA, is "no similarity".
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError
from ..transforms.base import Transform
from ..transforms.sampling import apply_affine, physical_to_grid_matrix, sample_grid
from .features import FeaturePair


def _fixed_locations(pair: FeaturePair, max_points: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into the fixed map of the locations used, and their weights.

    With ``max_points`` the heaviest locations are kept (deterministic: a stable sort on weight),
    which is where the fixed image has structure; the weights of the rest are dropped.
    """
    weight = pair.weight
    s = pair.point_stride
    keep = torch.zeros_like(weight, dtype=torch.bool)
    keep[::s, ::s, ::s] = True
    keep &= weight > 0
    index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    w = weight.reshape(-1)[index]
    if max_points is not None and index.numel() > max_points:
        order = torch.sort(w, descending=True, stable=True).indices[:max_points]
        order = torch.sort(order).values  # keep memory order (cache friendly)
        index, w = index[order], w[order]
    return index, w


class FeatureObjective:
    """Similarity of a batch of transforms (fixed → moving) under one :class:`FeaturePair`.

    ``value(transform)`` returns [B] (higher is better), differentiable with respect to the
    transform's tensors.  ``max_points`` bounds the number of fixed locations (the heaviest ones).
    """

    def __init__(self, pair: FeaturePair, max_points: int | None = None):
        if pair.comparison not in ("dot", "ssd"):
            raise InvalidParameterError(f"unknown feature comparison {pair.comparison!r}")
        self.pair = pair
        device = pair.fixed.data.device
        index, w = _fixed_locations(pair, max_points)
        if index.numel() == 0:
            raise InvalidParameterError("no fixed location carries weight; nothing to register")
        grid = pair.fixed.geometry
        d, h, wd = grid.shape
        k, rem = index // (h * wd), index % (h * wd)
        j, i = rem // wd, rem % wd
        ijk = torch.stack([i, j, k], 1).double()
        m = torch.as_tensor(grid.index_to_physical_matrix(), dtype=torch.float64, device=device)
        #: [N, 3] physical points (float64: the transforms are float64)
        self.points = ijk @ m[:3, :3].T + m[:3, 3]
        self.weights = (w / w.sum()).to(pair.fixed.data.dtype)
        #: [N, C] fixed features at the points
        self.fixed_features = pair.fixed.data.reshape(pair.channels, -1)[:, index].T.contiguous()
        self.moving = pair.moving.data
        self._to_grid = torch.as_tensor(physical_to_grid_matrix(pair.moving.geometry), dtype=torch.float64,
                                        device=device)
        #: number of single-transform evaluations so far
        self.evaluations = 0

    @property
    def point_count(self) -> int:
        return int(self.points.shape[0])

    def value(self, transform: Transform) -> torch.Tensor:
        """[B] weighted mean similarity of each transform of the batch."""
        mapped = transform.transform_points(self.points)  # [B, N, 3] float64
        grid = apply_affine(mapped, self._to_grid).to(self.moving.dtype)  # float32 maps: fast sampling
        sampled = sample_grid(self.moving, self.pair.moving.geometry, grid)  # [B, C, N]
        self.evaluations += transform.batch_size
        f = self.fixed_features.T.unsqueeze(0)  # [1, C, N]
        if self.pair.comparison == "dot":
            local = (sampled * f).sum(1)
        else:
            local = -((sampled - f) ** 2).mean(1)
        return (local * self.weights).sum(-1).double()
