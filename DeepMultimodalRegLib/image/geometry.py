"""Image geometry: where each voxel of a (z, y, x) array sits in physical LPS millimetres.

The convention is SimpleITK's: ``spacing``, ``origin`` and the columns of ``direction`` are given
in physical (x, y, z) order, while arrays are indexed (z, y, x).  A voxel with array index
(k, j, i) sits at ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidImageError

#: How far from orthonormal a direction matrix may be (NIfTI headers store float32 matrices).
ORTHONORMAL_TOLERANCE = 1e-4


def _as_triplet(values: Sequence[float], name: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != 3:
        raise InvalidImageError(f"{name} must have 3 values (x, y, z), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise InvalidImageError(f"{name} contains NaN or Inf: {tuple(arr)}")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageGeometry:
    """The sampling grid of a 3D image in physical LPS space.

    shape:     array shape (z, y, x), the number of voxels along each array axis
    spacing:   voxel size in mm, physical order (x, y, z)
    origin:    physical position (x, y, z) of the centre of voxel (0, 0, 0)
    direction: 3x3 matrix whose columns are the physical directions of the i, j, k axes
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InvalidImageError(f"image shape must be 3 positive sizes (z, y, x), got {self.shape}")
        spacing = _as_triplet(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise InvalidImageError(f"voxel spacing must be positive, got {spacing} mm")
        origin = _as_triplet(self.origin, "origin")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(-1)
        if direction.size != 9 or not np.all(np.isfinite(direction)):
            raise InvalidImageError("direction must be a finite 3x3 matrix")
        m = direction.reshape(3, 3)
        deviation = np.abs(m.T @ m - np.eye(3)).max()
        if deviation > ORTHONORMAL_TOLERANCE:
            raise InvalidImageError(
                "the image's direction matrix is not orthonormal (sheared or scaled axes, deviation "
                f"{deviation:.2g}); resample it onto an orthonormal grid first, e.g. with Slicer's "
                "'Resample Scalar/Vector/DWI Volume' or by hardening its transform"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", tuple(float(v) for v in direction))

    # ------------------------------------------------------------------ conversions
    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Number of voxels in physical (x, y, z) order, as SimpleITK's ``GetSize``."""
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping a continuous index (i, j, k, 1) to LPS mm (x, y, z, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping LPS mm to a continuous index (i, j, k)."""
        m = np.eye(4)
        inv = np.diag(1.0 / np.asarray(self.spacing)) @ self.direction_matrix.T
        m[:3, :3] = inv
        m[:3, 3] = -inv @ np.asarray(self.origin)
        return m

    def corner_points(self) -> np.ndarray:
        """Physical positions of the 8 corner voxel centres, shape (8, 3)."""
        last = np.asarray(self.size_xyz, dtype=np.float64) - 1
        idx = np.array([[a, b, c] for a in (0, last[0]) for b in (0, last[1]) for c in (0, last[2])])
        m = self.index_to_physical_matrix()
        return idx @ m[:3, :3].T + m[:3, 3]

    @property
    def center(self) -> np.ndarray:
        """Physical position of the centre of the image (middle of the voxel-centre box)."""
        mid = (np.asarray(self.size_xyz, dtype=np.float64) - 1) / 2
        m = self.index_to_physical_matrix()
        return m[:3, :3] @ mid + m[:3, 3]

    @property
    def extent_mm(self) -> np.ndarray:
        """Physical size (x, y, z) covered by the voxels, edge to edge."""
        return np.asarray(self.size_xyz) * np.asarray(self.spacing)

    def voxel_count(self) -> int:
        return int(np.prod(self.shape))

    def is_2d(self) -> bool:
        """True for a single slice (any axis of size 1): what an X-ray or a 2D file becomes."""
        return min(self.shape) == 1

    # ------------------------------------------------------------------ grids
    def physical_grid(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      z_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Physical position of every voxel centre, shape (D, H, W, 3), last axis (x, y, z).

        ``z_range`` (start, stop) restricts the grid to a slab of slices so that callers can
        bound memory on large grids.
        """
        z0, z1 = z_range if z_range is not None else (0, self.shape[0])
        k = torch.arange(z0, z1, device=device, dtype=torch.float64)
        j = torch.arange(self.shape[1], device=device, dtype=torch.float64)
        i = torch.arange(self.shape[2], device=device, dtype=torch.float64)
        kk, jj, ii = torch.meshgrid(k, j, i, indexing="ij")
        idx = torch.stack([ii, jj, kk], dim=-1)
        m = torch.as_tensor(self.index_to_physical_matrix(), device=device, dtype=torch.float64)
        pts = idx @ m[:3, :3].T + m[:3, 3]
        return pts.to(dtype)

    def resampled(self, spacing: Sequence[float] | float) -> "ImageGeometry":
        """A grid with another spacing covering the same physical box (edge to edge), same direction."""
        new_spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        size = np.maximum(1, np.round(self.extent_mm / new_spacing)).astype(int)
        # keep the box centred: first voxel centre half a new voxel in from the old edge
        old_edge = -0.5 * np.asarray(self.spacing)
        first = old_edge + 0.5 * new_spacing + (self.extent_mm - size * new_spacing) / 2
        origin = self.direction_matrix @ first + np.asarray(self.origin)
        return ImageGeometry(shape=(int(size[2]), int(size[1]), int(size[0])),
                             spacing=tuple(new_spacing), origin=tuple(origin), direction=self.direction)

    def same_grid(self, other: "ImageGeometry", tolerance_mm: float = 1e-3) -> bool:
        """True when both grids put the same voxels at the same physical places."""
        return (self.shape == other.shape
                and np.allclose(self.index_to_physical_matrix(), other.index_to_physical_matrix(),
                                atol=tolerance_mm))

    # ------------------------------------------------------------------ SimpleITK
    @classmethod
    def from_sitk(cls, image) -> "ImageGeometry":
        size = list(image.GetSize())
        spacing = list(image.GetSpacing())
        origin = list(image.GetOrigin())
        direction = list(image.GetDirection())
        if image.GetDimension() == 2:
            # a 2D image becomes a single-slice volume lying in its own plane
            size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
            d = direction
            direction = [d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0]
        elif image.GetDimension() != 3:
            raise InvalidImageError(f"only 2D and 3D images are supported, this one is {image.GetDimension()}D")
        return cls(shape=(size[2], size[1], size[0]), spacing=tuple(spacing), origin=tuple(origin),
                   direction=tuple(direction))

    def copy_to_sitk(self, image) -> None:
        """Stamp this geometry onto a SimpleITK image of the same size."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
