"""Local statistics shared by the patch metrics: box filters, gradient magnitude, patch extraction.

Everything works on tensors of any float dtype on any device (the input's), vectorised: box
filters are three separable ``avg_pool3d`` passes, patches are gathered with one index tensor.

Boundary rule (used by every metric here): **replicate** (edge) padding.  A box or a patch that
reaches past the image uses the nearest edge voxel, exactly like ``np.pad(..., mode="edge")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidImageError, InvalidParameterError


def as_5d(image: torch.Tensor, role: str = "image") -> tuple[torch.Tensor, int]:
    """View ``[D,H,W]`` as ``[1,1,D,H,W]`` and ``[B,D,H,W]`` as ``[B,1,D,H,W]``; return it and the input's rank."""
    if not isinstance(image, torch.Tensor):
        raise InvalidImageError(f"the {role} must be a torch tensor (z, y, x), got {type(image).__name__}")
    rank = image.dim()
    if rank == 3:
        return image[None, None], rank
    if rank == 4:
        return image[:, None], rank
    if rank == 5:
        if image.shape[1] != 1:
            raise InvalidImageError(f"the {role} must have one channel ([B, 1, D, H, W]), got shape "
                                    f"{tuple(image.shape)}")
        return image, rank
    raise InvalidImageError(f"the {role} must be a 3D volume [D, H, W] (or a batch [B, D, H, W] / "
                            f"[B, 1, D, H, W]), got shape {tuple(image.shape)}")


def check_radius(radius: int, name: str = "radius", minimum: int = 1) -> int:
    if isinstance(radius, bool) or int(radius) != radius or radius < minimum:
        raise InvalidParameterError(f"{name} must be an integer ≥ {minimum} (voxels), got {radius!r}")
    return int(radius)


def box_mean(x: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Mean over the cube of side ``2·radius+1`` around each voxel of ``x`` [N, C, D, H, W].

    Replicate padding at the borders; with ``stride`` s the output holds the voxels whose indices
    are multiples of s (shape ⌈D/s⌉ × ⌈H/s⌉ × ⌈W/s⌉).  Separable: three 1D means.
    """
    if radius == 0:
        return x[:, :, ::stride, ::stride, ::stride]
    return box_mean_valid(F.pad(x, (radius,) * 6, mode="replicate"), radius, stride)


def box_mean_valid(x: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Means over cubes of side 2r+1 at voxels r + stride·q of ``x`` [N, C, D, H, W], no padding
    (for callers whose input already holds every cube).  Separable, three 1D means.

    Each 1D mean is a sum of 2r + 1 shifted views divided by 2r + 1: the same values, bit for bit,
    as ``avg_pool3d`` with a (2r+1, 1, 1) kernel (forward and backward; Testing/test_lc2_mind.py), but
    several times faster on the CPU, where that pooling kernel is slow along every axis (12 × 64³, 2 threads:
    6.6× forward, 2.9× forward and backward; benchmarks/kernel_speedups.py, docs/benchmarks.md).
    """
    k = 2 * radius + 1
    for dim in (2, 3, 4):
        n = x.shape[dim] - k + 1
        total = x.narrow(dim, 0, n)
        for shift in range(1, k):
            total = total + x.narrow(dim, shift, n)
        if stride > 1:
            total = total[(slice(None),) * dim + (slice(None, None, stride),)]
        x = total / k
    return x


def box_mean_adjoint(grad: torch.Tensor, radius: int) -> torch.Tensor:
    """The transpose of :func:`box_mean` (stride 1) applied to ``grad`` [N, C, D, H, W]: the gradient
    of ⟨box_mean(x, radius), grad⟩ with respect to x, replicate padding included.

    For hand-written backward passes (MIND-SSC's).  Per axis: a box sum of ``grad`` with zero padding
    (what the interior receives), then on the r edge slices at each end the share of the padding voxels
    that replicate them: a padding voxel q < 0 copies voxel 0 and reaches the grad of voxels 0 … q + r,
    so voxel 0 gains Σ_{i<r} (r − i)·grad[i] (mirrored at the far end).  About half the memory passes of
    a zero-filled full-size buffer per shifted view, which autograd uses."""
    if radius == 0:
        return grad
    k = 2 * radius + 1
    g = grad / k ** 3
    for dim in (2, 3, 4):
        n = g.shape[dim]
        pad = [0, 0] * (4 - dim) + [radius, radius]
        padded = F.pad(g, pad)
        total = padded.narrow(dim, 0, n) + padded.narrow(dim, 1, n)
        for shift in range(2, k):
            total.add_(padded.narrow(dim, shift, n))
        for i in range(min(radius, n)):
            total.narrow(dim, 0, 1).add_(g.narrow(dim, i, 1), alpha=radius - i)
            total.narrow(dim, n - 1, 1).add_(g.narrow(dim, n - 1 - i, 1), alpha=radius - i)
        g = total
    return g


def fold_replicate_padding(grad: torch.Tensor, pad: int) -> torch.Tensor:
    """The transpose of ``F.pad(x, (pad,) * 6, mode="replicate")`` on [N, C, D, H, W]: the gradient of
    each padding voxel is added to the edge voxel it copied (replicate padding is separable, so axis by axis)."""
    if pad == 0:
        return grad
    g = grad
    for dim in (2, 3, 4):
        n = g.shape[dim] - 2 * pad
        inner = g.narrow(dim, pad, n).clone()
        inner.narrow(dim, 0, 1).add_(g.narrow(dim, 0, pad).sum(dim, keepdim=True))
        inner.narrow(dim, n - 1, 1).add_(g.narrow(dim, pad + n, pad).sum(dim, keepdim=True))
        g = inner
    return g


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x for x ≥ 0 with a finite gradient (0) where x = 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """|∇I| by central differences in voxel units, replicate padding; same shape as ``image``.

    ``g_z[k] = (I[min(k+1, D−1)] − I[max(k−1, 0)]) / 2`` and likewise along y and x;
    ``|∇I| = √(g_z² + g_y² + g_x²)``.  ``image`` is ``[D,H,W]``, ``[B,D,H,W]`` or ``[B,1,D,H,W]``.
    The square root has a finite (zero) gradient on flat regions.
    """
    x, rank = as_5d(image)
    p = F.pad(x, (1,) * 6, mode="replicate")
    gz = (p[:, :, 2:, 1:-1, 1:-1] - p[:, :, :-2, 1:-1, 1:-1]) / 2
    gy = (p[:, :, 1:-1, 2:, 1:-1] - p[:, :, 1:-1, :-2, 1:-1]) / 2
    gx = (p[:, :, 1:-1, 1:-1, 2:] - p[:, :, 1:-1, 1:-1, :-2]) / 2
    g = safe_sqrt(gz * gz + gy * gy + gx * gx)
    return g.reshape(image.shape)


def patch_offsets(radius: int, device=None) -> torch.Tensor:
    """[(2r+1)³, 3] integer (dz, dy, dx) offsets of a cube, row-major (z slowest, x fastest)."""
    r = torch.arange(-radius, radius + 1, device=device)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([dz.reshape(-1), dy.reshape(-1), dx.reshape(-1)], dim=-1)


def check_centres(centres: torch.Tensor, shape, role: str) -> torch.Tensor:
    c = torch.as_tensor(centres)
    if c.dim() != 2 or c.shape[-1] != 3:
        raise InvalidParameterError(f"{role} must be an [N, 3] array of (k, j, i) voxel indices, got shape "
                                    f"{tuple(c.shape)}")
    if c.is_floating_point():
        if not bool((c == c.round()).all()):
            raise InvalidParameterError(f"{role} must be integer voxel indices (k, j, i); got fractional values")
    c = c.long()
    if c.numel():
        upper = torch.as_tensor(shape, device=c.device)
        if bool((c < 0).any()) or bool((c >= upper).any()):
            raise InvalidParameterError(f"{role} has voxel indices outside the image of shape (z, y, x) = "
                                        f"{tuple(shape)}; patch centres must lie inside the image")
    return c


def extract_patches(volume: torch.Tensor, centres: torch.Tensor, radius: int) -> torch.Tensor:
    """Flattened cubes of side 2r+1 around integer ``centres`` [N, 3] (k, j, i) of ``volume`` [D, H, W].

    Returns ``[N, (2r+1)³]`` (row-major offsets, see :func:`patch_offsets`); voxels past the border
    repeat the edge voxel (replicate padding).
    """
    d, h, w = volume.shape
    offsets = patch_offsets(radius, device=volume.device)
    idx = centres.to(volume.device)[:, None, :] + offsets[None]
    k = idx[..., 0].clamp(0, d - 1)
    j = idx[..., 1].clamp(0, h - 1)
    i = idx[..., 2].clamp(0, w - 1)
    return volume.reshape(-1)[(k * h + j) * w + i]


def local_variance(image: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Variance of the cube of side ``2·radius+1`` around every ``stride``-th voxel of a [D, H, W] image.

    This is LC²'s patch weight (flat patches carry no structure, so they count little).  Computed in
    float64 so the E[x²] − E[x]² difference does not cancel; returns [⌈D/s⌉, ⌈H/s⌉, ⌈W/s⌉] ≥ 0.
    """
    x = image.double()[None, None]
    m = box_mean(torch.cat([x, x * x], 1), radius, stride)[0]
    return (m[1] - m[0] * m[0]).clamp_min(0.0)
