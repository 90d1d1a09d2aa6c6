"""Trilinear sampling of a feature map stored channels-last, as one weighted gather.

The registration objective samples a 12–16-channel map at thousands of points per pose.  Stored
[C, D, H, W] (what ``grid_sample`` reads), the C values of one corner lie in C different planes, so
every corner of every point costs C scattered reads; PyTorch's 3-D ``grid_sample`` CPU kernel is also
not vectorised.  Stored [D·H·W, C], a corner is one contiguous row (16 float32 = one cache line), and
trilinear interpolation is a weighted sum of 8 rows: exactly ``embedding_bag(mode="sum")`` with the
interpolation weights as ``per_sample_weights``, a fused, vectorised kernel.  The backward pass is
written out (:class:`_TrilinearGather`): the derivative along each axis is the same gather with the
derivative of the weights, three more ``embedding_bag`` calls, instead of autograd through a dozen
broadcast products.  Points go through in chunks that stay in the cache (a batch of 64 poses of
12,000 points would otherwise stream ~100 MB of indices and weights through memory).

Same rules as :func:`..transforms.sampling.sample_grid` (tests compare the two, and with SciPy): a
point outside ITK's inside region [-0.5, size - 0.5) per axis samples a zero vector; inside it,
coordinates are clamped to the outermost voxel centres (``grid_sample``'s "border"), where the
derivative is zero.  The map itself is a constant: no gradient flows to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: points per chunk: indices, weights and samples of a chunk (~3 MB at 16 channels) stay in the cache
CHUNK_POINTS = 16384


class ChannelsLastMap:
    """A [C, D, H, W] map kept as rows [D·H·W, C] for :meth:`sample`."""

    def __init__(self, data: torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"expected a [C, D, H, W] map, got shape {tuple(data.shape)}")
        c, d, h, w = data.shape
        self.channels = c
        self.rows = data.detach().permute(1, 2, 3, 0).reshape(-1, c).contiguous()
        # an axis of one voxel has no "+1" neighbour: its corner offset is 0 (its weight is 0 anyway)
        step = [int(w > 1), w * int(h > 1), w * h * int(d > 1)]
        self.offsets = torch.tensor([dz * step[2] + dy * step[1] + dx * step[0]
                                     for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], device=data.device)
        # per-axis constants as [3, 1] columns for the [3, P] coordinate rows of :meth:`_corners`
        size = torch.tensor([[w], [h], [d]], dtype=data.dtype, device=data.device)
        self._inside_low, self._inside_high = torch.full_like(size, -0.5), size - 0.5
        self._upper, self._low_limit = size - 1, (size - 2).clamp_min(0)
        # float row strides: the base row as one small matmul; exact while rows < 2**24 (float32)
        self._strides = torch.tensor([[1.0, w, w * h]], dtype=torch.float64 if d * h * w >= 2 ** 24 else data.dtype,
                                     device=data.device)

    def sample(self, ijk: torch.Tensor) -> torch.Tensor:
        """Trilinear samples [..., C] at continuous indices ``ijk`` [..., 3] (x, y, z), differentiable
        with respect to ``ijk``; zero outside the map (see the module docstring)."""
        out = self.sample_columns(ijk.to(self.rows.dtype).reshape(-1, 3).T)
        return out.reshape(*ijk.shape[:-1], self.channels)

    def sample_columns(self, xyz: torch.Tensor) -> torch.Tensor:
        """:meth:`sample` for coordinates given as rows [3, P] (x, y, z): samples [P, C].  The layout
        the per-axis arithmetic wants; a caller that can produce it directly saves a transpose."""
        xyz = xyz.to(self.rows.dtype).contiguous()
        if torch.is_grad_enabled() and xyz.requires_grad:
            return _TrilinearGather.apply(xyz, self)
        return _TrilinearGather.forward(None, xyz, self)  # no autograd bookkeeping for value-only calls

    def _corners(self, xyz: torch.Tensor, with_moves: bool = False):
        """For points ``xyz`` [3, P]: corner rows [P, 8], the fractional positions (fx, fy, fz) [3, P],
        the inside mask [P], and (``with_moves``; else None) the mask of points whose position moves
        the sample, inside and not clamped [P].  Per-axis contiguous rows: broadcasting over a strided
        [P, 3] is slow."""
        inside = xyz.ge(self._inside_low).logical_and_(xyz.lt(self._inside_high)).all(0)
        clamped = torch.minimum(xyz.clamp_min(0), self._upper)
        low = torch.minimum(clamped.floor(), self._low_limit)
        frac = clamped.sub_(low)
        base = (self._strides @ low.to(self._strides.dtype))[0].long()
        index = base[:, None] + self.offsets
        moves = None
        if with_moves:
            moves = inside & xyz.gt(0).logical_and_(xyz.lt(self._upper)).all(0)
        return index, frac, inside, moves


def _weights(frac: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """[P, 8] trilinear corner weights, corners ordered (z, y, x) as :attr:`ChannelsLastMap.offsets`;
    zero for points outside the map.  Built as an outer product of the per-axis pairs (1 − f, f):
    four tensor operations instead of a dozen, which is what a 12,000-point evaluation pays for."""
    pairs = torch.stack((1 - frac, frac), 1)  # [3 axes (x, y, z), 2, P]
    pairs[2].mul_(inside)
    zy = pairs[2][:, None] * pairs[1][None]  # [2 (z), 2 (y), P]
    return (zy[:, :, None] * pairs[0][None, None]).reshape(8, -1).T.contiguous()


def _weight_derivatives(frac: torch.Tensor, moves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d(corner weights)/dx, /dy, /dz, each [P, 8]; zero where the sample does not move with the point."""
    fx, fy, fz = frac
    gx, gy, gz = 1 - fx, 1 - fy, 1 - fz
    m = moves.to(frac.dtype)
    zy = (gz * gy * m, gz * fy * m, fz * gy * m, fz * fy * m)
    zx = (gz * gx * m, gz * fx * m, fz * gx * m, fz * fx * m)
    yx = (gy * gx * m, gy * fx * m, fy * gx * m, fy * fx * m)
    d_x = torch.stack([w for a in zy for w in (-a, a)], 1)
    d_y = torch.stack([zx[0].neg(), zx[1].neg(), zx[0], zx[1], zx[2].neg(), zx[3].neg(), zx[2], zx[3]], 1)
    d_z = torch.stack([-yx[0], -yx[1], -yx[2], -yx[3], yx[0], yx[1], yx[2], yx[3]], 1)
    return d_x, d_y, d_z


class _TrilinearGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xyz: torch.Tensor, grid: ChannelsLastMap) -> torch.Tensor:
        if ctx is not None:
            ctx.save_for_backward(xyz)
            ctx.grid = grid
        chunks = []
        for p0 in range(0, xyz.shape[1], CHUNK_POINTS):
            index, frac, inside, _ = grid._corners(xyz[:, p0:p0 + CHUNK_POINTS])
            chunks.append(F.embedding_bag(index, grid.rows, mode="sum", per_sample_weights=_weights(frac, inside)))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xyz, = ctx.saved_tensors
        grid = ctx.grid
        grad = torch.empty_like(xyz)
        for p0 in range(0, xyz.shape[1], CHUNK_POINTS):
            index, frac, _, moves = grid._corners(xyz[:, p0:p0 + CHUNK_POINTS], with_moves=True)
            g = grad_out[p0:p0 + CHUNK_POINTS]
            for axis, weights in enumerate(_weight_derivatives(frac, moves)):
                # the derivative of the sample along an axis: the same gather with the weights' derivative
                along = F.embedding_bag(index, grid.rows, mode="sum", per_sample_weights=weights)
                grad[axis, p0:p0 + CHUNK_POINTS] = (along * g).sum(-1)
        return grad, None
