"""8-bit DISA descriptors (the paper quantises its feature vectors to 8 bits for speed).

Scale choice
------------
Quantisation is symmetric with a **per-volume scale** ``scale = max|x| / 127`` (one float per
descriptor map): ``q = round(x / scale)`` in [-127, 127] and ``x ≈ q · scale``.  A fixed scale of
1/127 would also be safe, since every descriptor has norm ≤ 1 so every component lies in [-1, 1];
but the largest component of a 16-channel unit vector is usually well below 1, so the fixed scale
would leave part of the int8 range unused and raise the rounding error by the same factor.  The
per-volume scale never clips, costs one max over the map, and costs nothing at comparison time:
:func:`int8_dot` multiplies by both scales once at the end.  A caller that wants one scale for
several maps (e.g. to compare codes directly) passes ``scale=1/127`` explicitly.

The value -128 is never produced, so negation of a code never overflows.
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError

#: The largest code magnitude (symmetric range [-127, 127]).
INT8_MAX = 127
#: Fixed scale that covers any descriptor with norm ≤ 1 (offered for callers; not the default).
UNIT_NORM_SCALE = 1.0 / INT8_MAX
#: Elements (channels × voxels) processed at once by :func:`int8_dot`.
_CHUNK_ELEMENTS = 1 << 22


def quantize(descriptors: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """Symmetric int8 codes of a float descriptor map and the scale that maps them back.

    ``scale=None`` uses the per-volume scale max|x| / 127 (1/127 for an all-zero map).  With an
    explicit ``scale``, values beyond ±127·scale are clipped.
    """
    if not descriptors.is_floating_point():
        raise InvalidParameterError(f"quantize expects float descriptors, got {descriptors.dtype}")
    if scale is None:
        peak = float(descriptors.detach().abs().max()) if descriptors.numel() else 0.0
        scale = peak / INT8_MAX if peak > 0 else UNIT_NORM_SCALE
    scale = float(scale)
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise InvalidParameterError(f"the quantisation scale must be a positive finite number, got {scale}")
    q = torch.round(descriptors.detach() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(codes: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float descriptors ``codes · scale``."""
    if codes.dtype != torch.int8:
        raise InvalidParameterError(f"dequantize expects int8 codes, got {codes.dtype}")
    return codes.to(dtype) * float(scale)


def int8_dot(a_q: torch.Tensor, scale_a: float, b_q: torch.Tensor, scale_b: float,
             weights: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Σ_p w(p) ⟨a[p], b[p]⟩ over two int8 descriptor maps [C, D, H, W] on the same grid.

    Works in z-chunks of ``chunk`` slices (default: about 4M elements per chunk): the channel dot
    product of each voxel is computed exactly in int32 (|value| ≤ C·127² ≪ 2³¹); without weights
    the chunk sums are exact int64; with weights (a [D, H, W] float map) each voxel's weighted value
    is formed in float32 and summed in float64.  No float copy of a whole map is made.
    Returns a 0-d float64 tensor on the maps' device (already multiplied by both scales).
    """
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8:
        raise InvalidParameterError(f"int8_dot expects int8 codes, got {a_q.dtype} and {b_q.dtype}")
    if a_q.dim() != 4 or a_q.shape != b_q.shape:
        raise InvalidParameterError(
            f"int8_dot needs two [C, D, H, W] maps on the same grid, got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if a_q.device != b_q.device:
        raise InvalidParameterError(f"the two maps are on different devices ({a_q.device}, {b_q.device})")
    channels, depth, height, width = a_q.shape
    if weights is not None:
        if tuple(weights.shape) != (depth, height, width):
            raise InvalidParameterError(
                f"weights must have the grid's shape {(depth, height, width)}, got {tuple(weights.shape)}")
        weights = weights.to(a_q.device)
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, channels * height * width))
    chunk = int(chunk)
    if chunk < 1:
        raise InvalidParameterError(f"chunk must be a positive number of slices, got {chunk}")

    exact = torch.zeros((), dtype=torch.int64, device=a_q.device)
    weighted = torch.zeros((), dtype=torch.float64, device=a_q.device)
    for z0 in range(0, depth, chunk):
        z1 = min(depth, z0 + chunk)
        per_voxel = (a_q[:, z0:z1].to(torch.int32) * b_q[:, z0:z1].to(torch.int32)).sum(dim=0, dtype=torch.int32)
        if weights is None:
            exact += per_voxel.sum(dtype=torch.int64)
        else:
            # int32 values ≤ 16·127² are exact in float32
            weighted += (per_voxel.to(torch.float32) * weights[z0:z1].to(torch.float32)).sum(dtype=torch.float64)
    total = exact.to(torch.float64) if weights is None else weighted
    return total * (float(scale_a) * float(scale_b))
