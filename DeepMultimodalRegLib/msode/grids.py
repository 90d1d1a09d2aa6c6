"""Working grids and image pyramids of MS-ODE.

Each image is resampled (Gaussian anti-aliasing first) onto its own *working grid*: ``size``³
isotropic voxels of ``spacing`` mm, axis-aligned with LPS (identity direction) and centred on the
image's box, so the networks always see a head in the same orientation whatever the file's voxel
order.  Intensities are scaled to [0, 1] by the 1st–99th percentiles of the non-zero voxels (MR
units are arbitrary; a skull-stripped background stays 0).  The pyramid halves the grid L − 1
times by 2×2×2 averaging; level grids cover the same box (``ImageGeometry.resampled``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidImageError, InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.normalize import percentile_scale
from ..image.smoothing import antialias_for_spacing
from ..image.volume import Volume

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def working_grid(geometry: ImageGeometry, size: int = 64, spacing_mm: float = 4.0) -> ImageGeometry:
    """An LPS-aligned ``size``³ grid centred on ``geometry``'s box; the spacing grows past
    ``spacing_mm`` only when the box would not fit."""
    corners = geometry.corner_points()
    extent = corners.max(0) - corners.min(0) + np.asarray(geometry.spacing)
    spacing = max(float(spacing_mm), float(extent.max()) / size)
    centre = geometry.center
    origin = centre - spacing * (size - 1) / 2.0
    return ImageGeometry(shape=(size, size, size), spacing=(spacing,) * 3, origin=tuple(origin),
                         direction=IDENTITY_DIRECTION)


def check_pyramid_size(size: int, levels: int) -> None:
    if size % (2 ** (levels - 1)) or size // (2 ** (levels - 1)) < 8:
        raise InvalidParameterError(
            f"a working grid of {size}³ cannot be halved {levels - 1} times down to at least 8³ voxels; "
            f"use a size divisible by {2 ** (levels - 1)} and ≥ {8 * 2 ** (levels - 1)}")


def level_geometries(grid: ImageGeometry, levels: int) -> list[ImageGeometry]:
    """The pyramid's grids, coarse to fine (the last is ``grid``)."""
    out = []
    for k in range(levels - 1, -1, -1):
        out.append(grid if k == 0 else grid.resampled(tuple(s * 2 ** k for s in grid.spacing)))
    return out


def resample_onto(volume: Volume, grid: ImageGeometry, antialias: bool = True, interpolation: str = "linear") -> Volume:
    """``volume`` resampled onto ``grid`` by SimpleITK (identity transform), Gaussian anti-aliased first
    (ITK's discrete Gaussian, run in torch: :func:`~DeepMultimodalRegLib.image.smoothing.antialias_for_spacing`)."""
    import SimpleITK as sitk

    source = volume.float().to("cpu")
    if antialias and interpolation == "linear":
        source = antialias_for_spacing(source, max(grid.spacing))
    image = source.to_sitk()
    reference = sitk.Image(grid.size_xyz, sitk.sitkFloat32)
    grid.copy_to_sitk(reference)
    method = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    out = sitk.Resample(image, reference, sitk.Transform(), method, 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, name=volume.name)


def normalise(data: torch.Tensor) -> torch.Tensor:
    """[0, 1] by the 1st–99th percentiles of the non-zero voxels, clipped."""
    if not bool(torch.isfinite(data).all()):
        raise InvalidImageError("the image has NaN or Inf voxels; MS-ODE needs finite intensities")
    geometry = ImageGeometry(shape=tuple(data.shape))
    return percentile_scale(Volume(data.float(), geometry), 1.0, 99.0, clip=True, nonzero_only=True).data


def prepare(volume: Volume, size: int = 64, spacing_mm: float = 4.0) -> Volume:
    """The working-grid copy of ``volume``: resampled, anti-aliased, scaled to [0, 1]."""
    grid = working_grid(volume.geometry, size, spacing_mm)
    resampled = resample_onto(volume, grid)
    if float(resampled.data.max() - resampled.data.min()) <= 0:
        raise InvalidImageError(f"{volume.name or 'the image'} is constant on the working grid; nothing to register")
    return resampled.with_data(normalise(resampled.data))


def pyramid(data: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``data`` [B, C, D, H, W] and its 2× averages, coarse to fine."""
    out = [data]
    for _ in range(levels - 1):
        out.append(F.avg_pool3d(out[-1], 2))
    return out[::-1]


def centre_of_mass(data: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Intensity-weighted centre [B, 3] (LPS mm) of ``data`` [B, 1, D, H, W] (≥ 0) on ``geometry``."""
    w = data.clamp_min(0).flatten(1)
    points = geometry.physical_grid(device=data.device, dtype=data.dtype).reshape(-1, 3)
    total = w.sum(1, keepdim=True)
    com = (w @ points) / total.clamp_min(1e-12)
    centre = torch.as_tensor(geometry.center, dtype=data.dtype, device=data.device)
    return torch.where(total > 0, com, centre.expand_as(com))
