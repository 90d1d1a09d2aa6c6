"""Losses of the general model, ISO and RSO: image similarity (whole image or inside a mask) and
smoothness of the displacement.

Similarity: mean squared error (the paper's), or local normalised cross-correlation (MONAI's
``LocalNormalizedCrossCorrelationLoss``), both averaged over a voxel mask so RSO restricts them to
the box (paper eq. 6).  Smoothness: MONAI's ``DiffusionLoss`` (mean squared first derivatives of the
displacement, in working voxels).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import InvalidParameterError

SIMILARITIES = ("mse", "ncc")
#: LNCC window (working voxels)
NCC_KERNEL = 7
#: default weight of the diffusion regulariser for each similarity (intensities in [0, 1])
DEFAULT_SMOOTHNESS = {"mse": 0.01, "ncc": 0.5}

# MONAI's DiffusionLoss indexes with a list (a torch deprecation warning each call, same result)
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype).expand_as(values)
    return (values * m).sum() / m.sum().clamp_min(1.0)


class Similarity:
    """Dissimilarity of the warped moving and the fixed image (lower is better), over a mask."""

    def __init__(self, kind: str):
        if kind not in SIMILARITIES:
            raise InvalidParameterError(f"similarity must be one of {', '.join(SIMILARITIES)} (or auto), got {kind!r}")
        self.kind = kind
        self._ncc = None
        if kind == "ncc":
            from monai.losses import LocalNormalizedCrossCorrelationLoss

            self._ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=NCC_KERNEL,
                                                            kernel_type="rectangular", reduction="none")

    def voxelwise(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return (warped - fixed) ** 2
        return self._ncc(warped, fixed)  # -LNCC per voxel

    def __call__(self, warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(self.voxelwise(warped, fixed), mask)


def smoothness(field_voxels: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser of a [B, 3, D, H, W] displacement (MONAI ``DiffusionLoss``)."""
    from monai.losses import DiffusionLoss

    return DiffusionLoss()(field_voxels)
