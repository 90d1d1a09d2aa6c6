"""The model's working grid: a fixed isotropic spacing over the fixed image, padded to a multiple of 16.

The network sees both images resampled onto this grid (same direction as the fixed image, centred
on it), so its displacement output in working voxels (i, j, k) maps to physical LPS millimetres by
``direction @ (spacing * d)``.  The field is brought back to the fixed image's own grid by
trilinear interpolation at the fixed voxel centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from ..transforms.displacement import DisplacementFieldTransform
from ..transforms.linear import AffineTransform
from ..transforms.resample import resample_tensor
from .model import GRID_MULTIPLE

#: largest working grid picked automatically (voxels): keeps one CPU step within a few seconds
MAX_AUTO_VOXELS = 128 ** 3


#: smallest grid size per axis: the U-Net's 1/16 bottleneck needs ≥ 2 voxels (instance norm)
MIN_GRID_SIZE = 2 * GRID_MULTIPLE


def padded_size(n: int, multiple: int = GRID_MULTIPLE) -> int:
    return int(max(MIN_GRID_SIZE, math.ceil(n / multiple) * multiple))


def working_geometry(fixed: ImageGeometry, spacing_mm: float, multiple: int = GRID_MULTIPLE) -> ImageGeometry:
    """An isotropic grid of ``spacing_mm`` covering ``fixed``'s box, each size a multiple of ``multiple``,
    centred on the fixed image, with its direction."""
    size = np.ceil(fixed.extent_mm / spacing_mm - 1e-6).astype(int)  # (x, y, z)
    size = np.array([padded_size(int(n), multiple) for n in size])
    origin = np.asarray(fixed.center) - fixed.direction_matrix @ (spacing_mm * (size - 1) / 2.0)
    return ImageGeometry(shape=(int(size[2]), int(size[1]), int(size[0])), spacing=(float(spacing_mm),) * 3,
                         origin=tuple(origin), direction=fixed.direction)


def choose_spacing(fixed: ImageGeometry, requested: float | None, trained: float,
                   max_voxels: int = MAX_AUTO_VOXELS) -> float:
    """The requested spacing, or (``None``) the weights' training spacing, widened until the padded
    grid has at most ``max_voxels`` voxels."""
    if requested is not None:
        return float(requested)
    spacing = max(float(trained), min(fixed.spacing))
    while working_geometry(fixed, spacing).voxel_count() > max_voxels:
        spacing *= 1.1
    return spacing


def to_working(volume: Volume, grid: ImageGeometry) -> torch.Tensor:
    """``volume`` (float) resampled onto ``grid`` in physical space: [D, H, W]; 0 outside the volume.

    Downsampling blurs first (Gaussian, sigma = half the spacing ratio) so the coarse grid is not aliased."""
    data = volume.data.float()
    ratio = np.asarray(grid.spacing) / np.asarray(volume.geometry.spacing)  # (x, y, z)
    sigma_zyx = [max(0.0, (r - 1.0) / 2.0) for r in ratio[::-1]]
    if max(sigma_zyx) > 0.25:
        data = _blur(data, sigma_zyx)
    identity = AffineTransform.identity(dtype=torch.float64, device=data.device)
    return resample_tensor(data[None], volume.geometry, identity, grid)[0, 0]


def _blur(data: torch.Tensor, sigma_zyx) -> torch.Tensor:
    out = data[None, None]
    for axis, sigma in enumerate(sigma_zyx):
        if sigma <= 0.25:
            continue
        radius = max(1, int(math.ceil(2.5 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=out.dtype, device=out.device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = (k / k.sum()).reshape([1, 1] + [len(x) if a == axis else 1 for a in range(3)])
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k)
    return out[0, 0]


def voxels_to_mm(field_voxels: torch.Tensor, grid: ImageGeometry) -> torch.Tensor:
    """[B, 3, ...] displacement in working voxels (i, j, k) → physical LPS mm (x, y, z)."""
    m = torch.as_tensor(grid.direction_matrix @ np.diag(grid.spacing), dtype=field_voxels.dtype,
                        device=field_voxels.device)
    return torch.einsum("pc,bc...->bp...", m, field_voxels)


def mm_to_voxels(field_mm: torch.Tensor, grid: ImageGeometry) -> torch.Tensor:
    m = torch.as_tensor(np.diag(1.0 / np.asarray(grid.spacing)) @ grid.direction_matrix.T, dtype=field_mm.dtype,
                        device=field_mm.device)
    return torch.einsum("pc,bc...->bp...", m, field_mm)


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """grid_sample coordinates (x, y, z) of every voxel of a (D, H, W) grid: [1, D, H, W, 3] (align_corners)."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype)
            for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)[None]


def warp_on_grid(image: torch.Tensor, field_voxels: torch.Tensor, offset=(0, 0, 0),
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """The spatial transformer: ``image`` [B, C, D, H, W] sampled at (index + offset + d) for a
    displacement ``field_voxels`` [B, 3, d, h, w] given on the sub-block starting at ``offset`` (z, y, x)
    of the image's grid; 0 outside the image.  Returns [B, C, d, h, w]; differentiable in the field."""
    size_zyx = image.shape[2:]
    d, h, w = field_voxels.shape[2:]
    if base is None:
        base = _block_index(size_zyx, offset, (d, h, w), field_voxels.device, field_voxels.dtype)
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in size_zyx[::-1]], device=field_voxels.device,
                         dtype=field_voxels.dtype)  # x, y, z
    coords = (base + field_voxels.movedim(1, -1)) * scale - 1.0
    return F.grid_sample(image, coords, mode="bilinear", padding_mode="zeros", align_corners=True)


def _block_index(size_zyx, offset, shape, device, dtype) -> torch.Tensor:
    z = torch.arange(offset[0], offset[0] + shape[0], device=device, dtype=dtype)
    y = torch.arange(offset[1], offset[1] + shape[1], device=device, dtype=dtype)
    x = torch.arange(offset[2], offset[2] + shape[2], device=device, dtype=dtype)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)[None]


def field_to_fixed(field_voxels: torch.Tensor, grid: ImageGeometry, fixed: ImageGeometry) -> DisplacementFieldTransform:
    """The working-grid displacement [1, 3, *grid.shape] (voxels) as a DisplacementFieldTransform on
    the fixed image's grid (mm, trilinear interpolation at the fixed voxel centres)."""
    field_mm = voxels_to_mm(field_voxels.detach().float(), grid)[0]
    identity = AffineTransform.identity(dtype=torch.float64, device=field_mm.device)
    on_fixed = resample_tensor(field_mm, grid, identity, fixed)  # [1, 3, D, H, W]
    return DisplacementFieldTransform(fixed, on_fixed.float())


@dataclass
class Crop:
    """A block of the working grid: start (z, y, x) and size, both multiples-of-16 friendly."""

    start: tuple[int, int, int]
    shape: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape))  # type: ignore[return-value]

    @property
    def full(self) -> bool:
        return False


def crop_around(bounds: tuple[slice, slice, slice], grid_shape, multiple: int = GRID_MULTIPLE) -> Crop:
    """The smallest block holding ``bounds`` whose sizes are multiples of ``multiple``, shifted to
    stay inside the grid (the grid's sizes are multiples of ``multiple`` too)."""
    start, shape = [], []
    for sl, n in zip(bounds, grid_shape):
        size = min(n, padded_size(sl.stop - sl.start, multiple))
        centre = (sl.start + sl.stop) / 2.0
        s = int(round(centre - size / 2.0))
        s = max(0, min(n - size, s))
        start.append(s)
        shape.append(size)
    return Crop(tuple(start), tuple(shape))  # type: ignore[arg-type]
