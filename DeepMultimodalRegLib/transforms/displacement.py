"""Dense displacement field: a physical (x, y, z) displacement in mm at every voxel of a grid.

Evaluated as ITK's DisplacementFieldTransform: trilinear interpolation of the field, clamped at
the border voxels, and zero displacement outside [-0.5, size - 0.5) in continuous index.
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError
from ..image.geometry import ImageGeometry
from .base import DisplacementTransform, Transform
from .sampling import sample_at_points


class DisplacementFieldTransform(DisplacementTransform):
    """x → x + u(x) with u sampled from ``field`` [B, 3, D, H, W] defined on ``geometry``."""

    kind = "displacement"

    def __init__(self, geometry: ImageGeometry, field: torch.Tensor):
        f = torch.as_tensor(field)
        if f.dim() == 4:
            f = f.unsqueeze(0)
        if f.dim() != 5 or f.shape[1] != 3 or tuple(f.shape[2:]) != geometry.shape:
            raise InvalidParameterError(
                f"a displacement field must be [B, 3, {', '.join(map(str, geometry.shape))}], got {tuple(f.shape)}")
        self.geometry = geometry
        self.field = f if f.is_floating_point() else f.float()

    @classmethod
    def zeros(cls, geometry: ImageGeometry, batch: int = 1, dtype=torch.float32, device=None):
        return cls(geometry, torch.zeros(batch, 3, *geometry.shape, dtype=dtype, device=device))

    @classmethod
    def from_transform(cls, transform: Transform, geometry: ImageGeometry, dtype=torch.float32):
        """Rasterise any transform on ``geometry``: u(x) = T(x) − x at every voxel centre."""
        points = geometry.physical_grid(device=transform.device, dtype=torch.float64)
        mapped = transform.transform_grid(geometry)
        field = (mapped.double() - points).permute(0, 4, 1, 2, 3).to(dtype)
        return cls(geometry, field)

    @property
    def batch_size(self) -> int:
        return self.field.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.field]

    def displacement(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        pts = self.expand_points(points, batched)
        sampled = sample_at_points(self.field, self.geometry, pts.to(self.field.dtype), default_value=0.0)
        return sampled.movedim(1, -1).to(points.dtype)

    def with_tensor(self, tensor: torch.Tensor) -> "DisplacementFieldTransform":
        return DisplacementFieldTransform(self.geometry, tensor)
