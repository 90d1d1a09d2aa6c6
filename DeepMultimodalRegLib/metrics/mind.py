"""MIND-SSC: the modality independent neighbourhood descriptor with self-similarity context.

Heinrich et al., MICCAI 2013 ("Towards realtime multimodal fusion for image-guided interventions
using self-similarities"); the definitions follow the authors' public PyTorch implementation
(``MINDSSC`` in the Learn2Reg / deeds tool chain), read for its facts:

* **12 channels.**  Take the six-neighbourhood of a voxel, the offsets ±e_z, ±e_y, ±e_x, scaled by
  the ``dilation`` d.  Each channel compares the two points of one of the 12 pairs of these six
  whose (unscaled) squared distance is 2 (i.e. two orthogonal neighbours; opposite neighbours,
  distance² 4, are not paired).  Channel order is the reference's (:data:`MIND_SSC_PAIRS`, offsets
  in (z, y, x) tensor order).
* **Patch distance** of pair (p, q) at voxel x:
  ``D_c(x) = mean over the cube of side 2r+1 around x of (I(y + d·p) − I(y + d·q))²`` — shifts with
  replicate (edge) padding, then the squared differences box-filtered with replicate padding.
* **Normalisation** (as in the reference): ``D'_c = D_c − min_c D_c`` (per voxel);
  ``V = mean_c D'_c``; V is clamped to ``[1e-3·m, 1e3·m]`` where m is the mean of V over the image
  (per batch item here; the reference takes the mean over the whole batch tensor, the same for
  B = 1; m is floored at the dtype's tiny so a constant image gives descriptors of 1, not NaN).
  Descriptor = ``exp(−D'_c / V)``.  Subtracting the minimum is the same as dividing ``exp(−D_c/V)``
  by its maximum over the 12 channels, so the descriptor **is max-normalised** (max = 1 per
  voxel), as the reference's.
* Invariant to affine intensity changes a·I + b with a ≠ 0 (D and V both scale by a²).

:func:`mind_ssd` is the registration distance: the mean squared difference of two descriptors
(**lower is better**, 0 for identical images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidImageError
from .local_stats import as_5d, box_mean, box_mean_adjoint, check_radius, fold_replicate_padding

#: the 12 pairs (p, q) of six-neighbourhood offsets (dz, dy, dx) compared by the MIND-SSC channels
MIND_SSC_PAIRS = (
    ((1, 0, 0), (0, -1, 0)),
    ((0, 1, 0), (-1, 0, 0)),
    ((0, -1, 0), (-1, 0, 0)),
    ((0, 1, 0), (1, 0, 0)),
    ((0, -1, 0), (0, 0, -1)),
    ((0, 1, 0), (0, 0, 1)),
    ((0, 0, -1), (-1, 0, 0)),
    ((1, 0, 0), (0, 0, 1)),
    ((0, 1, 0), (0, 0, -1)),
    ((0, 0, 1), (0, -1, 0)),
    ((1, 0, 0), (0, 0, -1)),
    ((0, 0, 1), (-1, 0, 0)),
)
#: V is clamped to [MIND_VARIANCE_CLAMP[0]·m, MIND_VARIANCE_CLAMP[1]·m], m = mean of V over the image
MIND_VARIANCE_CLAMP = (1e-3, 1e3)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors ``[B, 12, D, H, W]`` of ``image`` ``[D, H, W]``, ``[B, D, H, W]`` or ``[B, 1, D, H, W]``.

    ``radius``: half-width of the box over which patch distances are averaged (cube of side
    2·radius+1); ``dilation``: spacing of the six-neighbourhood in voxels.  Computed in the input's
    float dtype (float32 for integer input) on its device; differentiable.
    """
    data = image.data if not isinstance(image, torch.Tensor) and hasattr(image, "data") else image
    x, _ = as_5d(data, "image for MIND-SSC")
    radius = check_radius(radius, "MIND radius", minimum=0)
    dilation = check_radius(dilation, "MIND dilation")
    if not x.is_floating_point():
        x = x.float()
    # the sum of finite voxels is finite unless they are near float's limit: the full check only then
    if x.is_floating_point() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise InvalidImageError("the image for MIND-SSC has NaN or Inf voxels; replace them before computing "
                                "descriptors")
    if torch.is_grad_enabled() and x.requires_grad:
        return _MindSSC.apply(x, radius, dilation)
    return _mind_parts(x, radius, dilation)[0]


def _pair_views(padded: torch.Tensor, dilation: int, shape) -> dict:
    """The six neighbours I(x + d·o) of every voxel, as views of the replicate-padded image."""
    d = dilation
    depth, height, width = shape

    def shifted(offset):
        oz, oy, ox = (d + d * o for o in offset)
        return padded[:, :, oz:oz + depth, oy:oy + height, ox:ox + width]

    return {o: shifted(o) for pair in MIND_SSC_PAIRS for o in pair}


def _mind_parts(x: torch.Tensor, radius: int, dilation: int):
    """The descriptor of [B, 1, D, H, W] ``x`` and what its analytic backward needs.

    Plain torch operations, so autograd can differentiate this too (Testing/test_lc2_mind.py checks
    :class:`_MindSSC`'s backward against that)."""
    padded = F.pad(x, (dilation,) * 6, mode="replicate")
    shifts = _pair_views(padded, dilation, x.shape[-3:])
    sq = torch.cat([(shifts[p] - shifts[q]) ** 2 for p, q in MIND_SSC_PAIRS], dim=1)  # 12 pairs, not voxels
    dist = box_mean(sq, radius)
    nearest, nearest_channel = dist.min(dim=1, keepdim=True)
    dist = dist - nearest
    var0 = dist.mean(dim=1, keepdim=True)
    mean_var = var0.mean(dim=(2, 3, 4), keepdim=True)
    m = mean_var.clamp_min(torch.finfo(var0.dtype).tiny)
    var = torch.maximum(torch.minimum(var0, MIND_VARIANCE_CLAMP[1] * m), MIND_VARIANCE_CLAMP[0] * m)
    # a flat image gives var = a fraction of the smallest normal float, a denormal that becomes 0 once
    # denormals are flushed (the deep session's optimiser turns that on process-wide): keep it normal
    var = var.clamp_min(torch.finfo(var.dtype).tiny)
    return torch.exp(-dist / var), (padded, dist, nearest_channel, var0, mean_var, var)


def _tie_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The share of ∂min(a, b) that goes to ``a`` (autograd's rule: all where a < b, half at ties)."""
    return (a < b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)


class _MindSSC(torch.autograd.Function):
    """MIND-SSC with a hand-written backward pass.

    Why: autograd's backward of the descriptor (shifted views, box means, the per-voxel minimum and
    the clamped variance) costs about twice the forward on the CPU, much of it in zero-filled full-size
    gradients of every slice (forward and backward together: 1.39x faster this way at 64³,
    benchmarks/kernel_speedups.py).  MS-ODE asks for this gradient at every ODE step (the descent input).
    The forward is :func:`_mind_parts`, unchanged; the backward follows its chain rule term by term,
    autograd's conventions at ties included, and matches autograd to float rounding (tested)."""

    @staticmethod
    def forward(ctx, x, radius, dilation):
        out, (padded, dist, nearest_channel, var0, mean_var, var) = _mind_parts(x, radius, dilation)
        ctx.radius, ctx.dilation = radius, dilation
        ctx.save_for_backward(out, padded, dist, nearest_channel, var0, mean_var, var)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, padded, dist, nearest_channel, var0, mean_var, var = ctx.saved_tensors
        tiny = torch.finfo(var.dtype).tiny
        low, high = MIND_VARIANCE_CLAMP
        m = mean_var.clamp_min(tiny)
        # out = exp(−dist / var)
        a = grad_out * out
        g_var = (a * dist).sum(dim=1, keepdim=True) / (var * var)
        # var = clamp_min(max(min(var0, high·m), low·m), tiny)
        upper = torch.minimum(var0, high * m)
        lower_bounded = torch.maximum(upper, low * m)
        g_var = g_var * (lower_bounded >= tiny).to(g_var.dtype)
        g_upper = g_var * _tie_split(low * m, upper)  # max(upper, low·m) → upper where upper > low·m
        g_m = low * (g_var - g_upper).sum(dim=(2, 3, 4), keepdim=True)
        g_var0 = g_upper * _tie_split(var0, high * m)
        g_m = g_m + high * (g_upper - g_var0).sum(dim=(2, 3, 4), keepdim=True)
        # m = clamp_min(mean(var0), tiny); var0 = mean over channels of dist
        g_var0 = g_var0 + g_m * (mean_var >= tiny).to(g_m.dtype) / var0[0, 0].numel()
        g_dist = torch.addcdiv(g_var0 / len(MIND_SSC_PAIRS), a, var, value=-1)  # −a/var + ∂var0/∂dist terms
        # dist = raw − min over channels (the gradient of min goes to the channel it returned)
        g_dist.scatter_add_(1, nearest_channel, -g_dist.sum(dim=1, keepdim=True))
        g_sq = box_mean_adjoint(g_dist, ctx.radius)
        # sq_c = (I(x + d·p) − I(x + d·q))², each neighbour a view of the padded image.  Where the pair's
        # difference is 0 its term is 0 even if g_sq overflowed (a flat image's variance floor is the smallest
        # float), which autograd's chain would turn into 0·inf = NaN
        guard = not bool(torch.isfinite(g_sq.sum()))  # one read; any inf or NaN makes the sum non-finite
        g_sq = g_sq * 2
        g_padded = torch.zeros_like(padded)
        shifts = _pair_views(padded, ctx.dilation, out.shape[-3:])
        g_shifts = _pair_views(g_padded, ctx.dilation, out.shape[-3:])
        for c, (p, q) in enumerate(MIND_SSC_PAIRS):
            diff = shifts[p] - shifts[q]
            g_diff = diff * g_sq[:, c:c + 1]
            if guard:
                g_diff = torch.where(diff == 0, 0.0, g_diff)
            g_shifts[p].add_(g_diff)
            g_shifts[q].sub_(g_diff)
        return fold_replicate_padding(g_padded, ctx.dilation), None, None


def mind_ssd(desc_a: torch.Tensor, desc_b: torch.Tensor, mask: torch.Tensor | None = None,
             per_batch: bool = False) -> torch.Tensor:
    """Mean squared difference of two MIND descriptors ``[B, C, D, H, W]`` (lower is better; 0 when equal).

    Batches broadcast (B = 1 against B = N).  ``mask`` (``[D, H, W]`` or broadcastable to
    ``[B, 1, D, H, W]``, bool or weights) restricts the mean to the masked voxels.  Returns a scalar,
    or ``[B]`` with ``per_batch``.  Differentiable.
    """
    for t, role in ((desc_a, "first descriptor"), (desc_b, "second descriptor")):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise InvalidImageError(f"the {role} must be a [B, C, D, H, W] tensor (from mind_ssc), got "
                                    f"{tuple(getattr(t, 'shape', ()))}")
    if desc_a.shape[1:] != desc_b.shape[1:]:
        raise InvalidImageError(f"the two descriptors must have the same channels and grid, got "
                                f"{tuple(desc_a.shape)} and {tuple(desc_b.shape)}; resample the moving image "
                                "onto the fixed grid first")
    sq = ((desc_a - desc_b) ** 2).mean(dim=1, keepdim=True)  # [B, 1, D, H, W]
    if mask is None:
        per = sq.mean(dim=(1, 2, 3, 4))
    else:
        w = mask if mask.dim() == 5 else mask.reshape(1, 1, *mask.shape[-3:])
        w = w.to(device=sq.device, dtype=sq.dtype).expand_as(sq)
        total = w.sum(dim=(1, 2, 3, 4))
        per = (sq * w).sum(dim=(1, 2, 3, 4)) / total.clamp_min(torch.finfo(sq.dtype).tiny)
    return per if per_batch else per.mean()
