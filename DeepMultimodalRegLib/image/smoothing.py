"""Gaussian anti-aliasing before resampling to a coarser grid: ITK's discrete Gaussian, run in torch.

:func:`discrete_gaussian` gives what SimpleITK's ``DiscreteGaussian(image, variance, max_kernel_width,
max_error, useImageSpacing=True)`` gives (to float32 rounding; tested against it on real scans): per
axis, ITK's sampled-Bessel Gaussian kernel for the variance in voxel units, applied separably with
replicate (zero-flux Neumann) borders.  The kernel itself is ITK's: it is read off SimpleITK's filter
applied to a unit impulse, once per (variance, error, width), so no coefficient is re-derived here.

Why not call SimpleITK on the whole volume: its filter runs 4-5× slower on the CPU than the same
separable sums in torch (a 168×168×142 volume, 5-tap kernel, 2 threads: 75 ms against 15 ms), and
MS-ODE anti-aliases both images of every registration (docs/benchmarks.md, "MS-ODE hybrid").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from .volume import Volume

#: the settings every caller of this library uses (those of its former SimpleITK calls)
DEFAULT_MAX_ERROR = 0.01
DEFAULT_MAX_KERNEL_WIDTH = 64


@lru_cache(maxsize=64)
def itk_gaussian_kernel(variance_voxels: float, max_error: float = DEFAULT_MAX_ERROR,
                        max_kernel_width: int = DEFAULT_MAX_KERNEL_WIDTH) -> tuple[float, ...]:
    """ITK's 1D discrete Gaussian kernel (odd length, sums to 1) for a variance in voxel² units: the
    response of SimpleITK's DiscreteGaussian to a unit impulse (float64), trimmed to its support."""
    import SimpleITK as sitk

    if not variance_voxels > 0:
        return (1.0,)
    width = int(max_kernel_width)
    impulse = np.zeros((1, 1, 2 * width + 1))
    impulse[0, 0, width] = 1.0
    image = sitk.GetImageFromArray(impulse)  # float64, unit spacing
    response = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [float(variance_voxels), 0.0, 0.0], width,
                                                            float(max_error), True))[0, 0]
    radius = int(np.max(np.abs(np.nonzero(response)[0] - width)))
    return tuple(float(v) for v in response[width - radius:width + radius + 1])


def discrete_gaussian(volume: Volume, variance_mm2, max_error: float = DEFAULT_MAX_ERROR,
                      max_kernel_width: int = DEFAULT_MAX_KERNEL_WIDTH) -> Volume:
    """``volume`` smoothed by a Gaussian of ``variance_mm2`` (one value, or one per axis x, y, z, in mm²),
    as SimpleITK's ``DiscreteGaussian(..., useImageSpacing=True)``; a new float32 volume on the same grid
    (the input is not modified)."""
    variances = np.broadcast_to(np.asarray(variance_mm2, dtype=np.float64), (3,))
    if not np.all(np.isfinite(variances)) or np.any(variances < 0):
        raise InvalidParameterError(f"Gaussian variances must be finite and ≥ 0 (mm²), got {variance_mm2!r}")
    spacing = np.asarray(volume.geometry.spacing, dtype=np.float64)  # x, y, z
    data = volume.data.float()[None, None]
    for axis_xyz in range(3):
        kernel = itk_gaussian_kernel(float(variances[axis_xyz] / spacing[axis_xyz] ** 2), float(max_error),
                                     int(max_kernel_width))
        data = _convolve_axis(data, kernel, dim=4 - axis_xyz)  # tensor dims: z = 2, y = 3, x = 4
    return volume.with_data(data[0, 0])


def antialias_variances(spacing, spacing_mm: float) -> list[float]:
    """Gaussian variances (mm², per axis of ``spacing``) before resampling to ``spacing_mm``: σ = (spacing_mm −
    spacing) / 2, zero along an axis already as coarse (the rule MS-ODE's working grids and DISA's 2 mm grid share)."""
    return [max(0.0, 0.5 * (float(spacing_mm) - s)) ** 2 for s in spacing]


def antialias_for_spacing(volume: Volume, spacing_mm: float) -> Volume:
    """``volume`` smoothed before resampling it to ``spacing_mm`` (:func:`antialias_variances`); the volume
    itself (float32) when no axis needs smoothing."""
    variances = antialias_variances(volume.geometry.spacing, spacing_mm)
    if max(variances) > 0:
        return discrete_gaussian(volume, variances)
    return volume.float()


def _convolve_axis(x: torch.Tensor, kernel: tuple[float, ...], dim: int) -> torch.Tensor:
    """A symmetric 1D kernel along ``dim`` of [1, 1, D, H, W], replicate borders: a weighted sum of shifted
    views (several times faster on the CPU than conv3d with a 1D kernel, as for local_stats.box_mean_valid)."""
    radius = len(kernel) // 2
    if radius == 0:
        return x
    pads = [0] * 6
    pads[2 * (4 - dim)] = pads[2 * (4 - dim) + 1] = radius
    padded = F.pad(x, tuple(pads), mode="replicate")
    n = x.shape[dim]
    total = padded.narrow(dim, 0, n) * kernel[0]
    for shift in range(1, len(kernel)):
        total.add_(padded.narrow(dim, shift, n), alpha=kernel[shift])
    return total
