"""Jacobian determinant of a transform on a grid, for folding checks.

det J < 0 marks folding (the mapping turns inside out); det J = 1 is volume preserving.
"""

from __future__ import annotations

import numpy as np
import torch

from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from .base import Transform


def jacobian_determinant(transform: Transform, reference: ImageGeometry) -> Volume:
    """det(∂T/∂x) at every voxel of ``reference`` (central differences, one-sided at the edges)."""
    with torch.no_grad():
        mapped = transform.select(0).transform_grid(reference)[0].double()  # [D,H,W,3]
        # derivatives along the array axes k, j, i (dims 0, 1, 2), per unit index
        dims = [d for d in range(3) if reference.shape[d] > 1]
        grads = torch.gradient(mapped, dim=dims) if dims else []
        d_index = torch.zeros(*reference.shape, 3, 3, dtype=torch.float64, device=mapped.device)
        for d, g in zip(dims, grads):
            d_index[..., :, 2 - d] = g  # column for index axis (i, j, k) = (2, 1, 0) array dims
        for d in set(range(3)) - set(dims):
            # a single-slice axis: no deformation across it, the map is the grid itself
            d_index[..., :, 2 - d] = torch.as_tensor(reference.index_to_physical_matrix()[:3, 2 - d], dtype=torch.float64)
        index_to_physical = torch.as_tensor(reference.index_to_physical_matrix()[:3, :3], dtype=torch.float64,
                                            device=mapped.device)
        jac = d_index @ torch.linalg.inv(index_to_physical)
        det = torch.linalg.det(jac)
    return Volume(det.float().cpu(), reference, name="jacobian_determinant")


def folding_fraction(jacobian: Volume, mask: torch.Tensor | None = None) -> float:
    """Fraction of voxels (inside ``mask``) where the Jacobian determinant is ≤ 0."""
    det = jacobian.data if mask is None else jacobian.data[mask.bool()]
    return float((det <= 0).float().mean()) if det.numel() else float("nan")


def jacobian_summary(jacobian: Volume) -> dict:
    d = jacobian.numpy()
    return {"min": float(np.min(d)), "max": float(np.max(d)), "mean": float(np.mean(d)),
            "folding_fraction": float(np.mean(d <= 0))}
