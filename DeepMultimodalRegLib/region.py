"""A box in physical space: the region a clinician draws for region-specific refinement (RSO).

The box lives in the fixed image's physical LPS millimetres, like every other geometry in the
library.  It may be rotated (a Slicer Markups ROI can be), so it carries its own axes.  It knows
which voxels of a grid it covers (``mask``) and which index range bounds it (``index_bounds``), so
RSO can restrict its loss to the box and crop its input around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidParameterError
from .image.geometry import ImageGeometry

#: How far from orthonormal the box axes may be.
AXES_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Box:
    """An oriented box: ``center`` (x, y, z) and edge lengths ``size`` along its own axes, in LPS mm.

    ``axes`` is a 3×3 matrix stored row-major whose *columns* are the box's axes in LPS (identity
    for a box aligned with the physical axes).
    """

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    axes: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        center = np.asarray(self.center, dtype=np.float64).reshape(-1)
        size = np.asarray(self.size, dtype=np.float64).reshape(-1)
        axes = np.asarray(self.axes, dtype=np.float64).reshape(-1)
        if center.size != 3 or size.size != 3 or axes.size != 9:
            raise InvalidParameterError("a box needs a centre (3 values), a size (3 values) and 3x3 axes")
        if not (np.all(np.isfinite(center)) and np.all(np.isfinite(size)) and np.all(np.isfinite(axes))):
            raise InvalidParameterError("the box contains NaN or Inf")
        if np.any(size <= 0):
            raise InvalidParameterError(f"the box size must be positive along every axis, got {tuple(size)} mm")
        matrix = axes.reshape(3, 3)
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=AXES_TOLERANCE):
            raise InvalidParameterError("the box axes must be orthonormal (a rotation, possibly with a flip)")
        object.__setattr__(self, "center", tuple(float(v) for v in center))
        object.__setattr__(self, "size", tuple(float(v) for v in size))
        object.__setattr__(self, "axes", tuple(float(v) for v in axes))

    @classmethod
    def from_text(cls, text: str) -> "Box":
        """An axis-aligned box from ``"cx,cy,cz,sx,sy,sz"`` (the command line's ``--roi``)."""
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 6:
            raise InvalidParameterError(f"a box is 'cx,cy,cz,sx,sy,sz' in mm (6 numbers), got {text!r}")
        return cls(tuple(values[:3]), tuple(values[3:]))

    @property
    def axes_matrix(self) -> np.ndarray:
        return np.asarray(self.axes, dtype=np.float64).reshape(3, 3)

    def corners(self) -> np.ndarray:
        """The 8 corners in LPS mm, shape (8, 3)."""
        half = np.asarray(self.size) / 2
        signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=np.float64)
        return (signs * half) @ self.axes_matrix.T + np.asarray(self.center)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean tensor: which physical points ``(..., 3)`` lie inside the box (faces included)."""
        axes = torch.as_tensor(self.axes_matrix, dtype=points.dtype, device=points.device)
        center = torch.as_tensor(self.center, dtype=points.dtype, device=points.device)
        half = torch.as_tensor(self.size, dtype=points.dtype, device=points.device) / 2
        local = (points - center) @ axes  # coordinates along the box axes
        return (local.abs() <= half * (1 + 1e-9)).all(dim=-1)

    def falloff(self, points: torch.Tensor, width_mm: float) -> torch.Tensor:
        """1 inside the box, falling linearly to 0 at ``width_mm`` outside it, at ``points`` [..., 3]
        (float64 LPS mm): the weight with which a refinement of the box replaces what was there."""
        axes = torch.as_tensor(self.axes_matrix, dtype=torch.float64, device=points.device)
        local = (points.double() - torch.as_tensor(self.center, dtype=torch.float64, device=points.device)) @ axes
        excess = (local.abs() - torch.as_tensor(self.size, dtype=torch.float64, device=points.device) / 2).clamp_min(0)
        return (1.0 - torch.linalg.norm(excess, dim=-1) / float(width_mm)).clamp(0.0, 1.0)

    def mask(self, geometry: ImageGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean (D, H, W) mask of the voxels of ``geometry`` whose centres lie in the box.

        Only the slab of slices that can meet the box is tested, so a small box on a large CT
        costs little."""
        result = torch.zeros(geometry.shape, dtype=torch.bool, device=device)
        bounds = self.index_bounds(geometry)
        if bounds is None:
            return result
        z = bounds[0]
        points = geometry.physical_grid(device=device, dtype=torch.float64, z_range=(z.start, z.stop))
        result[z] = self.contains(points)
        return result

    def index_bounds(self, geometry: ImageGeometry, margin_mm: float | Sequence[float] = 0.0
                     ) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the smallest index block holding the box grown by ``margin_mm``
        on every side, clipped to the grid; ``None`` when that block misses the grid entirely."""
        margin = np.broadcast_to(np.asarray(margin_mm, dtype=np.float64), (3,))
        grown = Box(self.center, tuple(np.asarray(self.size) + 2 * margin), self.axes)
        index = grown.corners() @ geometry.physical_to_index_matrix()[:3, :3].T + geometry.physical_to_index_matrix()[:3, 3]
        low = np.floor(index.min(axis=0)).astype(int)
        high = np.ceil(index.max(axis=0)).astype(int) + 1
        size_xyz = np.asarray(geometry.size_xyz)
        low = np.clip(low, 0, size_xyz)
        high = np.clip(high, 0, size_xyz)
        if np.any(high <= low):
            return None
        return tuple(slice(int(low[a]), int(high[a])) for a in (2, 1, 0))  # type: ignore[return-value]

    def overlaps(self, geometry: ImageGeometry) -> bool:
        """True when at least one voxel centre of ``geometry`` lies in the box."""
        return bool(self.mask(geometry).any())
