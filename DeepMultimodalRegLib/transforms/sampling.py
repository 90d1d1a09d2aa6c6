"""Sampling images at physical points, with ITK's boundary rules, batched and differentiable.

This is the one place that turns physical LPS points into ``grid_sample`` coordinates.  The rules
follow ITK so that the library resamples exactly as SimpleITK and Slicer do:

* a point is inside an image when its continuous index lies in [-0.5, size - 0.5) on every axis;
* inside, linear interpolation clamps to the edge voxels (``padding_mode='border'``,
  ``align_corners=True`` makes index 0 and index size-1 the grid's end points);
* outside, the result is the default value (0 for displacement fields).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..image.geometry import ImageGeometry


def physical_to_continuous_index(points: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Continuous (i, j, k) index of physical points ``[..., 3]`` in ``geometry``."""
    m = torch.as_tensor(geometry.physical_to_index_matrix(), dtype=points.dtype, device=points.device)
    return points @ m[:3, :3].T + m[:3, 3]


def continuous_index_to_grid(index: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Continuous index (i, j, k) → ``grid_sample`` coordinates in [-1, 1] (align_corners=True)."""
    size = torch.as_tensor(geometry.size_xyz, dtype=index.dtype, device=index.device)
    denom = (size - 1).clamp_min(1.0)
    # an axis of size 1 (a single slice) maps every index to its only sample
    grid = 2.0 * index / denom - 1.0
    return torch.where(size > 1, grid, torch.zeros_like(grid))


def inside_mask(index: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """ITK's IsInsideBuffer: continuous index within [-0.5, size - 0.5) on every axis."""
    size = torch.as_tensor(geometry.size_xyz, dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index < size - 0.5)).all(dim=-1)


def sample_at_points(data: torch.Tensor, geometry: ImageGeometry, points: torch.Tensor,
                     mode: str = "bilinear", default_value: float = 0.0) -> torch.Tensor:
    """Sample images at physical points.

    data:    [C, D, H, W] (one image, shared by every batch element) or [B, C, D, H, W]
    points:  [B, *S, 3] physical LPS points (x, y, z)
    returns: [B, C, *S]

    ``mode`` is ``grid_sample``'s: 'bilinear' (trilinear in 3D) or 'nearest'.  Gradients flow to
    ``points`` (and so to transform parameters) and to ``data``.
    """
    batch = points.shape[0]
    spatial = points.shape[1:-1]
    index = physical_to_continuous_index(points, geometry)
    grid = continuous_index_to_grid(index, geometry).to(data.dtype if data.is_floating_point() else points.dtype)
    image = data if data.is_floating_point() else data.float()
    if image.dim() == 4:
        # One image, many point sets: fold the batch into the output's spatial axes instead of
        # copying the image B times.
        flat = grid.reshape(1, batch, -1, 1, 3)
        out = F.grid_sample(image.unsqueeze(0), flat, mode=mode, padding_mode="border", align_corners=True)
        out = out.reshape(image.shape[0], batch, -1).transpose(0, 1)  # [B, C, N]
    else:
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image batch {image.shape[0]} does not match point batch {batch}")
        flat = grid.reshape(batch, -1, 1, 1, 3)
        if image.shape[0] == 1 and batch > 1:
            return sample_at_points(image[0], geometry, points, mode, default_value)
        out = F.grid_sample(image, flat, mode=mode, padding_mode="border", align_corners=True)
        out = out.reshape(batch, image.shape[1], -1)
    mask = inside_mask(index, geometry).reshape(batch, 1, -1)
    out = torch.where(mask, out, torch.as_tensor(default_value, dtype=out.dtype, device=out.device))
    return out.reshape(batch, out.shape[1], *spatial)
