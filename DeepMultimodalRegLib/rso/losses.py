"""Losses of the general model, ISO and RSO: image similarity (whole image or inside a mask) and
smoothness of the displacement.

Similarity: mean squared error (the paper's), local normalised cross-correlation (MONAI's
``LocalNormalizedCrossCorrelationLoss``), or — for multimodal pairs, beyond the paper — DISA
descriptors (the negative dot product of the fixed image's descriptors with the warped moving
image's, weighted by the fixed image's local variance; the descriptor maps are computed once and
warped, never recomputed, as in DISA registration).  All are averaged over a voxel mask so RSO
restricts them to the box (paper eq. 6).  Smoothness: MONAI's ``DiffusionLoss`` (mean squared first derivatives of the
displacement, in working voxels).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import InvalidParameterError

SIMILARITIES = ("mse", "ncc", "disa")
#: LNCC window (working voxels)
NCC_KERNEL = 7
#: default weight of the diffusion regulariser for each similarity (intensities in [0, 1])
DEFAULT_SMOOTHNESS = {"mse": 0.01, "ncc": 0.5, "disa": 0.1}
#: similarity of RSO steps on a finer local grid, by the session's similarity.  MSE sessions refine
#: with local NCC: under CBCT-like intensity shifts and cupping the box-only MSE optimum is pulled
#: off the anatomy, NCC is blind to local affine intensity changes (measured on both benchmark CTs,
#: docs/benchmarks.md, RSO section)
DEFAULT_FINE_SIMILARITY = {"mse": "ncc"}
#: ... and their regulariser weight where it differs from DEFAULT_SMOOTHNESS (mse, when asked for
#: explicitly: 0.1 beat 0.01 on both benchmark CTs)
DEFAULT_FINE_SMOOTHNESS = {"mse": 0.1}

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
        if self.kind == "disa":  # descriptor maps: the fixed one carries the location weights
            return -(warped * fixed).sum(dim=1, keepdim=True)
        return self._ncc(warped, fixed)  # -LNCC per voxel

    def __call__(self, warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(self.voxelwise(warped, fixed), mask)


def disa_targets(fixed, moving, grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What the ``disa`` similarity compares, on the working grid ``grid``: the fixed image's DISA
    descriptors times its location weights (normalised to mean 1), and the moving image's
    descriptors, each [1, 16, D, H, W].  The descriptors come from the shipped DISA network at its
    own 2 mm / 8 mm grids and are interpolated onto the working grid once."""
    from ..disa.features import disa_features
    from ..transforms.linear import AffineTransform
    from ..transforms.resample import resample_tensor

    pair = disa_features(fixed, moving, device)
    identity = AffineTransform.identity(dtype=torch.float64)

    def on_grid(data, geometry):
        return resample_tensor(data.float().cpu(), geometry, identity, grid)

    weight = on_grid(pair.weight[None], pair.fixed.geometry)
    weight = weight / weight[weight > 0].mean().clamp_min(1e-12)
    fixed_map = on_grid(pair.fixed.data, pair.fixed.geometry) * weight
    moving_map = on_grid(pair.moving.data, pair.moving.geometry)
    return fixed_map.to(device), moving_map.to(device)


def smoothness(field_voxels: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser of a [B, 3, D, H, W] displacement (MONAI ``DiffusionLoss``)."""
    from monai.losses import DiffusionLoss

    return DiffusionLoss()(field_voxels)
