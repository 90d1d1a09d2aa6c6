"""Sampling images at physical points, with ITK's boundary rules, batched and differentiable.

This is the one place that turns physical LPS points into ``grid_sample`` coordinates.  The rules
follow ITK so that the library resamples exactly as SimpleITK and Slicer do:

* a point is inside an image when its continuous index lies in [-0.5, size - 0.5) on every axis;
* inside, linear interpolation clamps to the edge voxels (``padding_mode='border'``,
  ``align_corners=True`` makes index 0 and index size-1 the grid's end points);
* outside, the result is the default value (0 for displacement fields).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..image.geometry import ImageGeometry


def index_to_grid_matrix(geometry: ImageGeometry) -> np.ndarray:
    """4x4 map from a continuous index (i, j, k) to ``grid_sample`` coordinates (align_corners=True).

    An axis of size 1 gets scale 2 (denominator clamped to 1): grid_sample multiplies by size − 1 = 0,
    so every coordinate samples the single slice, and the inside test below still works.
    """
    denom = np.maximum(np.asarray(geometry.size_xyz, dtype=np.float64) - 1, 1.0)
    m = np.eye(4)
    m[:3, :3] = np.diag(2.0 / denom)
    m[:3, 3] = -1.0
    return m


def physical_to_grid_matrix(geometry: ImageGeometry) -> np.ndarray:
    """4x4 map from physical LPS points to ``grid_sample`` coordinates of ``geometry``."""
    return index_to_grid_matrix(geometry) @ geometry.physical_to_index_matrix()


def grid_bounds(geometry: ImageGeometry, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITK's inside region [-0.5, size - 0.5) expressed in grid coordinates, per axis (x, y, z)."""
    m = index_to_grid_matrix(geometry)
    size = np.asarray(geometry.size_xyz, dtype=np.float64)
    lo = np.diag(m[:3, :3]) * -0.5 + m[:3, 3]
    hi = np.diag(m[:3, :3]) * (size - 0.5) + m[:3, 3]
    return (torch.as_tensor(lo, dtype=dtype, device=device), torch.as_tensor(hi, dtype=dtype, device=device))


def apply_affine(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``points [..., 3]`` mapped by a 4x4 (or 3x4) ``matrix``; one fused addmm (fast for K = 3)."""
    m = matrix.to(points.dtype)
    flat = torch.addmm(m[:3, 3], points.reshape(-1, 3), m[:3, :3].T)
    return flat.reshape(points.shape)


def physical_to_continuous_index(points: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Continuous (i, j, k) index of physical points ``[..., 3]`` in ``geometry``."""
    return apply_affine(points, torch.as_tensor(geometry.physical_to_index_matrix(), device=points.device))


def index_to_sampling_matrix(h: torch.Tensor, reference: ImageGeometry, geometry: ImageGeometry) -> torch.Tensor:
    """[B, 3, 4] float64: a voxel index (i, j, k, 1) of ``reference`` → ``grid_sample`` coordinates in an image on
    ``geometry``, through the physical map h [B, 4, 4] (reference → image; differentiable in h)."""
    h = h.double()
    to_grid = torch.as_tensor(physical_to_grid_matrix(geometry), dtype=torch.float64, device=h.device)
    from_index = torch.as_tensor(reference.index_to_physical_matrix(), dtype=torch.float64, device=h.device)
    return (to_grid @ h @ from_index)[:, :3, :]


def affine_index_grid(m: torch.Tensor, z0: int, z1: int, height: int, width: int) -> torch.Tensor:
    """``m`` [B, 3, 4] applied to the voxel indices (i, j, k, 1) of slices z0 … z1 − 1 of a grid:
    [B, z1 − z0, H, W, 3], by three broadcast sums (several times faster than a per-voxel matrix product;
    differentiable with respect to ``m``)."""
    opts = dict(dtype=m.dtype, device=m.device)
    i = torch.arange(width, **opts)[None, :, None] * m[:, None, :, 0] + m[:, None, :, 3]
    j = torch.arange(height, **opts)[None, :, None] * m[:, None, :, 1]
    k = torch.arange(z0, z1, **opts)[None, :, None] * m[:, None, :, 2]
    return k[:, :, None, None, :] + j[:, None, :, None, :] + i[:, None, None, :, :]


def sample_grid(data: torch.Tensor, geometry: ImageGeometry, grid: torch.Tensor, mode: str = "bilinear",
                default_value: float = 0.0) -> torch.Tensor:
    """Sample at ``grid_sample`` coordinates ``[B, *S, 3]`` (x, y, z); returns ``[B, C, *S]``.

    ``data`` is [C, D, H, W] (one image shared by every batch element) or [B, C, D, H, W].
    """
    batch, spatial = grid.shape[0], grid.shape[1:-1]
    image = data if data.is_floating_point() else data.float()
    grid = grid.to(image.dtype)
    if image.dim() == 5 and image.shape[0] == 1 and batch > 1:
        image = image[0]
    if image.dim() == 4:
        # One image, many point sets: fold the batch into the output's spatial axes instead of
        # copying the image B times.
        out = F.grid_sample(image.unsqueeze(0), grid.reshape(1, batch, -1, 1, 3), mode=mode,
                            padding_mode="border", align_corners=True)
        out = out.reshape(image.shape[0], batch, -1).transpose(0, 1)  # [B, C, N]
    else:
        if image.shape[0] != batch:
            raise ValueError(f"image batch {image.shape[0]} does not match point batch {batch}")
        out = F.grid_sample(image, grid.reshape(batch, -1, 1, 1, 3), mode=mode, padding_mode="border",
                            align_corners=True).reshape(batch, image.shape[1], -1)
    lo, hi = grid_bounds(geometry, grid.dtype, grid.device)
    inside = ((grid >= lo) & (grid < hi)).all(dim=-1).reshape(batch, 1, -1)
    out = torch.where(inside, out, torch.as_tensor(default_value, dtype=out.dtype, device=out.device))
    return out.reshape(batch, out.shape[1], *spatial)


def sample_at_points(data: torch.Tensor, geometry: ImageGeometry, points: torch.Tensor,
                     mode: str = "bilinear", default_value: float = 0.0) -> torch.Tensor:
    """Sample images at physical points ``[B, *S, 3]``; returns ``[B, C, *S]``.

    ``mode`` is ``grid_sample``'s: 'bilinear' (trilinear in 3D) or 'nearest'.  Gradients flow to
    ``points`` (and so to transform parameters) and to ``data``.
    """
    grid = apply_affine(points, torch.as_tensor(physical_to_grid_matrix(geometry), device=points.device))
    return sample_grid(data, geometry, grid, mode, default_value)
