"""Intensity normalisation shared by the methods: CT window, percentile scaling, z-score.

Each returns a new float volume on the same grid; the input is never modified.
"""

from __future__ import annotations

import torch

from .volume import Volume


def ct_window(volume: Volume, low: float = -1000.0, high: float = 1000.0) -> Volume:
    """Map HU in [low, high] linearly to [0, 1], clipping outside (default (HU+1000)/2000)."""
    data = volume.data.float()
    return volume.with_data(((data - low) / (high - low)).clamp(0.0, 1.0))


def robust_percentiles(data: torch.Tensor, low: float, high: float, mask: torch.Tensor | None = None,
                       max_samples: int = 2_000_000) -> tuple[float, float]:
    """Percentiles (0–100) of the voxels (inside ``mask``); subsampled evenly on large volumes."""
    values = data.float().reshape(-1) if mask is None else data.float()[mask.bool()]
    if values.numel() == 0:
        return 0.0, 1.0
    if values.numel() > max_samples:
        step = values.numel() // max_samples + 1
        values = values[::step]
    q = torch.quantile(values, torch.tensor([low / 100.0, high / 100.0], dtype=values.dtype,
                                             device=values.device))
    return float(q[0]), float(q[1])


def percentile_scale(volume: Volume, low: float = 1.0, high: float = 99.0, clip: bool = True,
                     nonzero_only: bool = False) -> Volume:
    """Map the ``low``/``high`` percentiles to 0/1 (MR, whose units are arbitrary).

    ``nonzero_only`` computes the percentiles over non-zero voxels, which suits skull-stripped
    scans whose background is exactly zero.
    """
    data = volume.data.float()
    mask = data != 0 if nonzero_only else None
    lo, hi = robust_percentiles(data, low, high, mask)
    scaled = (data - lo) / max(hi - lo, 1e-12)
    if clip:
        scaled = scaled.clamp(0.0, 1.0)
    return volume.with_data(scaled)


def zscore(volume: Volume, mask: torch.Tensor | None = None) -> Volume:
    """Zero mean, unit standard deviation (over ``mask`` if given)."""
    data = volume.data.float()
    values = data if mask is None else data[mask.bool()]
    mean = values.mean()
    std = values.std().clamp_min(1e-12)
    return volume.with_data((data - mean) / std)
