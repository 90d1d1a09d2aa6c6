"""Accuracy against a known answer: target registration error between two transforms.

These compare a method's transform with the transform that produced the misalignment, never a
method's output with itself.
"""

from __future__ import annotations

import numpy as np
import torch

from .image.volume import Volume
from .transforms.base import Transform


def foreground_points(volume: Volume, count: int = 2000, seed: int = 0, threshold: float | None = None) -> torch.Tensor:
    """Physical positions of ``count`` random voxels above ``threshold`` (default: the 50th
    percentile of non-zero voxels), the evaluation points of a target registration error."""
    data = volume.data.float()
    if threshold is None:
        nonzero = data[data != 0]
        threshold = float(nonzero.median()) if nonzero.numel() else float(data.mean())
    idx = torch.nonzero(data > threshold)
    if idx.shape[0] == 0:
        idx = torch.nonzero(torch.ones_like(data, dtype=torch.bool))
    g = torch.Generator().manual_seed(seed)
    pick = idx[torch.randperm(idx.shape[0], generator=g)[:count]]
    ijk = pick.flip(-1).double()  # (k, j, i) → (i, j, k)
    m = torch.as_tensor(volume.geometry.index_to_physical_matrix(), dtype=torch.float64)
    return ijk @ m[:3, :3].T + m[:3, 3]


def target_registration_error(estimate: Transform, truth: Transform, points: torch.Tensor) -> dict:
    """Distances ‖estimate(x) − truth(x)‖ in mm over physical points x (fixed space)."""
    with torch.no_grad():
        a = estimate.select(0).transform_points(points.to(estimate.dtype))[0].double()
        b = truth.select(0).transform_points(points.to(truth.dtype))[0].double()
    d = torch.linalg.norm(a - b, dim=-1).numpy()
    return {"mean_mm": float(np.mean(d)), "median_mm": float(np.median(d)), "p95_mm": float(np.percentile(d, 95)),
            "max_mm": float(np.max(d)), "points": int(d.size)}


def misaligned_copy(volume: Volume, truth: Transform, margin_mm: float = 0.0, name: str | None = None) -> Volume:
    """``volume`` moved by a known transform: moving(y) = volume(truth⁻¹(y)), so fixed x ↔ moving truth(x).

    The copy lies on the volume's grid widened by ``margin_mm`` on every side (as a scan with a
    larger field of view would), so a large known motion does not push anatomy out of the image.
    ``truth`` must be invertible (a linear transform).
    """
    from .transforms.resample import warp_volume

    grid = volume.geometry
    if margin_mm > 0:
        extra = np.ceil(margin_mm / np.asarray(grid.spacing)).astype(int)  # voxels per side (x, y, z)
        origin = np.asarray(grid.origin) - grid.direction_matrix @ (extra * np.asarray(grid.spacing))
        shape = tuple(int(n + 2 * e) for n, e in zip(grid.shape, extra[::-1]))
        grid = type(grid)(shape=shape, spacing=grid.spacing, origin=tuple(origin), direction=grid.direction)
    moved = warp_volume(volume.float(), truth.inverse(), grid)
    moved.name = name or f"{volume.name}_moved"
    return moved
