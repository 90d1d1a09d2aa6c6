"""LC² — linear correlation of linear combination (Wein et al. 2008), patch-wise and volume-wise.

Definitions (the NumPy reference in ``Testing/test_lc2_mind.py`` uses exactly these):

* **Fitted and regressor images.**  The *first* image ``a`` (the fixed image in
  :func:`volume_lc2`, the ultrasound in Wein et al.) is the one being fitted.  Within a patch of
  n voxels, ``a`` is approximated by least squares as ``β_b·b + β_g·|∇b| + β_0`` from the *second*
  image ``b`` (the moving image): its intensity, its gradient magnitude and a constant.
* **Gradient magnitude** ``|∇b|``: central differences in voxel units with replicate padding,
  ``g_z[k] = (b[k+1] − b[k−1]) / 2`` (indices clamped to the image), same for y and x,
  ``|∇b| = √(g_z² + g_y² + g_x²)``; computed on the **whole** second image before patches are cut,
  so the border voxels of a patch use their neighbours outside it
  (:func:`~DeepMultimodalRegLib.metrics.local_stats.gradient_magnitude`).
* **Ridge** (``ridge = 1e-6`` by default, :data:`LC2_RIDGE`): the penalty ``n·ε·(Var_b·β_b² +
  Var_g·β_g²)`` (the intercept is not penalised), i.e. ε times each regressor's own patch variance
  — equivalently, the regressors are standardised to unit variance within the patch and ε is added
  to the diagonal of their 2×2 correlation matrix.  It keeps the 2×2 solve well conditioned when
  ``b`` and ``|∇b|`` are (nearly) collinear and leaves the result invariant to affine changes of
  either image.
* **LC²** of a patch = R² = 1 − SS_res / SS_tot of that fit (the fraction of the variance of ``a``
  explained), clamped to [0, 1].
* **Variance floor** (:data:`LC2_VARIANCE_FLOOR` = 1e-12): a patch of ``a`` whose variance is
  ≤ 1e-12 × its mean square counts as constant and gets LC² = 0 (never NaN); a regressor (``b`` or
  ``|∇b|``) whose patch variance is ≤ 1e-12 × its mean square counts as constant and is left out of
  the fit (it carries no information beyond the intercept).
* **Borders**: patches reaching past the image repeat the edge voxel (replicate padding), in
  :func:`lc2_at_points`, :func:`lc2_map` and :func:`volume_lc2` alike.

All arithmetic runs in float64 on the input's device (local moments E[x²] − E[x]² need it);
results come back in the input's float dtype (float32 for integer input).  The dense engine
:func:`lc2_map` first standardises each image globally (zero mean, unit variance; LC² is invariant
to this), box-filters the nine local moments of a, b, g and solves the normal equations in closed
form at every voxel.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidImageError, InvalidParameterError
from .local_stats import (as_5d, box_mean, box_mean_valid, check_centres, check_radius, extract_patches,
                          gradient_magnitude, safe_sqrt)

#: ridge ε, relative to each regressor's patch variance
LC2_RIDGE = 1e-6
#: a patch (or regressor) with variance ≤ this × its mean square counts as constant
LC2_VARIANCE_FLOOR = 1e-12
#: the patch radii whose LC² the DISA network is trained to approximate (cubes of side 7, 11, 15)
DISA_RADII = (3, 5, 7)

_MAX_GATHER = 1 << 22  # voxels gathered per chunk in lc2_at_points (≈ 32 MiB per float64 tensor)


# ---------------------------------------------------------------------------------------------- core
def lc2_from_moments(vaa, saa, vbb, sbb, vgg, sgg, vbg, vab, vag, ridge: float) -> torch.Tensor:
    """LC² from central moments (per-voxel: variances, covariances; s** are mean squares for the floors)."""
    floor = LC2_VARIANCE_FLOOR
    has_a = vaa > floor * saa
    has_b = vbb > floor * sbb
    has_g = vgg > floor * sgg
    one = torch.ones_like(vaa)
    zero = torch.zeros_like(vaa)
    # standardise the regressors (a constant one becomes the zero regressor)
    kb = torch.where(has_b, 1.0 / safe_sqrt(torch.where(has_b, vbb, one)), zero)
    kg = torch.where(has_g, 1.0 / safe_sqrt(torch.where(has_g, vgg, one)), zero)
    rbb, rgg = has_b.to(vaa.dtype), has_g.to(vaa.dtype)
    rbg = (vbg * kb * kg).clamp(-1.0, 1.0)
    cb, cg = vab * kb, vag * kg
    # (R + εI) β = c, closed form; det ≥ ε(r_bb + r_gg) + ε² > 0 by Cauchy–Schwarz
    pb, pg = rbb + ridge, rgg + ridge
    det = pb * pg - rbg * rbg
    beta_b = (pg * cb - rbg * cg) / det
    beta_g = (pb * cg - rbg * cb) / det
    # SS_tot − SS_res (per voxel of the patch) = 2 βᵀc − βᵀ R β   (R without the ridge)
    explained = 2 * (beta_b * cb + beta_g * cg) - (beta_b * beta_b * rbb + 2 * beta_b * beta_g * rbg
                                                   + beta_g * beta_g * rgg)
    lc2 = torch.where(has_a, explained / torch.where(has_a, vaa, one), zero)
    return lc2.clamp(0.0, 1.0)


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    if not dtypes:
        return torch.float32
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _tensor(x, role: str) -> torch.Tensor:
    data = getattr(x, "data", x) if not isinstance(x, torch.Tensor) else x  # a Volume gives its .data
    if not isinstance(data, torch.Tensor):
        raise InvalidImageError(f"the {role} must be a torch tensor or a Volume, got {type(x).__name__}")
    return data


def _check_ridge(ridge: float) -> float:
    if not (ridge > 0):
        raise InvalidParameterError(f"the LC² ridge must be > 0 (e.g. {LC2_RIDGE}), got {ridge!r}")
    return float(ridge)


def _check_finite(x: torch.Tensor, role: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InvalidImageError(f"the {role} has NaN or Inf voxels; replace them (e.g. with the background value) "
                                "before computing LC²")


# ------------------------------------------------------------------------------------------- patches
def patch_lc2(a_patches: torch.Tensor, b_patches: torch.Tensor, b_grad_patches: torch.Tensor,
              ridge: float = LC2_RIDGE) -> torch.Tensor:
    """LC² of batches of flattened patches ``[..., n]`` → ``[...]``.

    ``a_patches`` is fitted as a linear combination of ``b_patches``, ``b_grad_patches`` (the gradient
    magnitude of the second image, cut at the same voxels) and a constant; see the module docstring
    for the ridge and the variance floor.  Differentiable.
    """
    a, b, g = (_tensor(t, "patch batch") for t in (a_patches, b_patches, b_grad_patches))
    if not (a.shape == b.shape == g.shape) or a.dim() == 0:
        raise InvalidParameterError(
            f"a_patches, b_patches and b_grad_patches must have the same shape [..., n], got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(g.shape)}")
    if a.shape[-1] < 2:
        raise InvalidParameterError(f"a patch needs at least 2 voxels, got n = {a.shape[-1]}")
    ridge = _check_ridge(ridge)
    out_dtype = _out_dtype(a, b, g)
    a, b, g = a.double(), b.double(), g.double()
    a0 = a - a.mean(-1, keepdim=True)
    b0 = b - b.mean(-1, keepdim=True)
    g0 = g - g.mean(-1, keepdim=True)
    m = lambda x, y: (x * y).mean(-1)  # noqa: E731
    lc2 = lc2_from_moments(m(a0, a0), m(a, a), m(b0, b0), m(b, b), m(g0, g0), m(g, g),
                            m(b0, g0), m(a0, b0), m(a0, g0), ridge)
    return lc2.to(out_dtype)


def lc2_at_points(a: torch.Tensor, b: torch.Tensor, centres_a, centres_b, radius: int,
                  ridge: float = LC2_RIDGE, return_weight: bool = False):
    """Patch LC² between cubes of side 2r+1 of ``a`` around ``centres_a`` and of ``b`` around ``centres_b``.

    ``a`` and ``b`` are ``[D, H, W]`` tensors (or Volumes; they may have different grids); centres are
    ``[N, 3]`` integer voxel indices (k, j, i) inside each image.  ``b``'s gradient magnitude is
    computed on the whole of ``b``.  Returns ``[N]`` LC² values; with ``return_weight`` also ``[N]``
    variances of the ``a`` patches (the LC² weights, in ``a``'s intensity units squared).
    """
    a, b = _tensor(a, "first image"), _tensor(b, "second image")
    for x, role in ((a, "first image"), (b, "second image")):
        if x.dim() != 3:
            raise InvalidImageError(f"the {role} must be a 3D volume [D, H, W], got shape {tuple(x.shape)}")
    radius = check_radius(radius)
    ridge = _check_ridge(ridge)
    ca = check_centres(centres_a, a.shape, "centres_a").to(a.device)
    cb = check_centres(centres_b, b.shape, "centres_b").to(b.device)
    if ca.shape[0] != cb.shape[0]:
        raise InvalidParameterError(f"centres_a and centres_b must list the same number of points, got "
                                    f"{ca.shape[0]} and {cb.shape[0]}")
    out_dtype = _out_dtype(a, b)
    a64, b64 = a.double(), b.double()
    g64 = gradient_magnitude(b64)
    n = (2 * radius + 1) ** 3
    chunk = max(1, _MAX_GATHER // n)
    values, weights = [], []
    for s in range(0, ca.shape[0], chunk):  # chunks of points (bounded memory), not voxels
        pa = extract_patches(a64, ca[s:s + chunk], radius)
        pb = extract_patches(b64, cb[s:s + chunk], radius)
        pg = extract_patches(g64, cb[s:s + chunk], radius)
        values.append(patch_lc2(pa, pb, pg, ridge))
        if return_weight:
            weights.append(pa.var(-1, unbiased=False))
    lc2 = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=a.device)
    lc2 = lc2.to(out_dtype)
    if return_weight:
        w = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64, device=a.device)
        return lc2, w.to(out_dtype)
    return lc2


def disa_target(a: torch.Tensor, b: torch.Tensor, centres_a, centres_b, radii: Sequence[int] = DISA_RADII,
                ridge: float = LC2_RIDGE) -> torch.Tensor:
    """The DISA training target: the mean of patch LC² over ``radii`` (3, 5, 7 → cubes of 7, 11, 15 voxels).

    Same arguments as :func:`lc2_at_points`; returns ``[N]``.
    """
    radii = [check_radius(r, "each radius") for r in radii]
    if not radii:
        raise InvalidParameterError("disa_target needs at least one patch radius, e.g. (3, 5, 7)")
    values = [lc2_at_points(a, b, centres_a, centres_b, r, ridge) for r in radii]
    return torch.stack(values).mean(0)


# --------------------------------------------------------------------------------------------- dense
def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − mean) / std per batch item ([B,1,D,H,W], float64, statistics detached) and the std used."""
    dims = (1, 2, 3, 4)
    mean = x.detach().mean(dims, keepdim=True)
    std = x.detach().std(dims, keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant image: centred zeros
    return (x - mean) / std, std


def lc2_map(a: torch.Tensor, b: torch.Tensor, radius: int = 3, stride: int = 1, ridge: float = LC2_RIDGE,
            return_weight: bool = False):
    """Patch LC² (``a`` fitted from ``b``, ``|∇b|``) at every voxel of two images on the SAME grid.

    ``a`` is ``[D, H, W]``; ``b`` is ``[D, H, W]`` or a batch ``[B, D, H, W]`` (e.g. the moving image
    warped by B candidate transforms).  Patches are cubes of side 2·radius+1 centred on the voxels
    whose indices are multiples of ``stride``; output ``[D', H', W']`` (or ``[B, D', H', W']``) with
    D' = ⌈D/stride⌉.  At voxel v it equals ``lc2_at_points(a, b, [v], [v], radius)``.

    Engine: global standardisation of a and b, box filters (replicate padding) of the local moments
    a, a², b, g, b², g², bg, ab, ag, and the closed-form 2×2 ridge solve of the module docstring, all
    vectorised.  With ``return_weight`` also returns the local variance of ``a`` (``a``'s units²).
    Differentiable with respect to both images.
    """
    a, b = _tensor(a, "first image"), _tensor(b, "second image")
    if a.dim() != 3:
        raise InvalidImageError(f"the first image must be a 3D volume [D, H, W], got shape {tuple(a.shape)}")
    if b.dim() not in (3, 4) or tuple(b.shape[-3:]) != tuple(a.shape):
        raise InvalidImageError(
            f"the two images must be on the same grid: first image {tuple(a.shape)}, second image "
            f"{tuple(b.shape)}; resample the moving image onto the fixed grid first (warp_volume)")
    radius = check_radius(radius)
    stride = check_radius(stride, "stride")
    ridge = _check_ridge(ridge)
    out_dtype = _out_dtype(a, b)
    a5, _ = as_5d(a.double(), "first image")
    b5, _ = as_5d(b.double(), "second image")
    a5, a_std = _standardise(a5)
    b5, _ = _standardise(b5)
    g5 = gradient_magnitude(b5)
    ma = box_mean(torch.cat([a5, a5 * a5], dim=1), radius, stride)  # [1, 2, ...]
    mb = box_mean(torch.cat([b5, g5, b5 * b5, g5 * g5, b5 * g5, a5 * b5, a5 * g5], dim=1), radius, stride)
    ea, eaa = ma[:, 0], ma[:, 1]
    eb, eg, ebb, egg, ebg, eab, eag = mb.unbind(1)
    vaa = (eaa - ea * ea).clamp_min(0.0)
    vbb = (ebb - eb * eb).clamp_min(0.0)
    vgg = (egg - eg * eg).clamp_min(0.0)
    lc2 = lc2_from_moments(vaa, eaa, vbb, ebb, vgg, egg, ebg - eb * eg, eab - ea * eb, eag - ea * eg, ridge)
    if b.dim() == 3:
        lc2 = lc2[0]
    lc2 = lc2.to(out_dtype)
    if return_weight:
        weight = (vaa * a_std[:, 0] ** 2)[0].to(out_dtype)
        return lc2, weight
    return lc2


def volume_lc2(fixed: torch.Tensor, moving_warped: torch.Tensor, radius: int = 3, stride: int = 1,
               mask: torch.Tensor | None = None, ridge: float = LC2_RIDGE) -> torch.Tensor:
    """The volume LC² similarity (higher is better, in [0, 1]) of two images on the same grid.

    The **fixed** image is the one fitted: each of its patches is approximated from the moving
    image's intensity and gradient magnitude (Wein et al. 2008, where the fitted image is the
    ultrasound).  Patch LC² (side 2·radius+1) at every voxel — or every ``stride``-th — is averaged
    with weights equal to the local variance of the fixed image: Σ w·LC² / Σ w.  ``mask`` (fixed grid,
    ``[D, H, W]``, bool or weights) multiplies the weights, e.g. to leave out voxels where the warped
    moving image has no data.  Constant images (Σ w = 0) give 0.

    ``moving_warped`` may be a batch ``[B, D, H, W]``; the result is then ``[B]``, else a scalar
    tensor.  Differentiable with respect to the moving image (and, through it, a transform).
    """
    fixed, moving = _tensor(fixed, "fixed image"), _tensor(moving_warped, "warped moving image")
    _check_finite(fixed, "fixed image")
    _check_finite(moving, "warped moving image")
    lc2, w = lc2_map(fixed, moving, radius, stride, ridge, return_weight=True)
    w = w.double()
    if mask is not None:
        m = _tensor(mask, "mask")
        if tuple(m.shape) != tuple(fixed.shape):
            raise InvalidImageError(f"the mask must be on the fixed grid {tuple(fixed.shape)}, got {tuple(m.shape)}")
        w = w * m[::stride, ::stride, ::stride].to(device=w.device, dtype=w.dtype)
    total = w.sum()
    num = (lc2.double() * w).sum((-3, -2, -1))
    value = torch.where(total > 0, num / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(num))
    return value.to(_out_dtype(fixed, moving))


# ------------------------------------------------------------------------------ one patch, everywhere
def lc2_of_patches_everywhere(a: torch.Tensor, centres_a, b: torch.Tensor, radius: int, stride: int = 1,
                              pad: bool = True, ridge: float = LC2_RIDGE) -> torch.Tensor:
    """LC² of K patches of ``a`` (around ``centres_a`` [K, 3]) against the patch of ``b`` at every
    voxel of ``b`` whose indices are multiples of ``stride``: ``[K, D', H', W']``.

    The LC² similarity map of the paper's Fig. 1, and the DISA sampler's "all candidate patches".
    ``pad=False`` skips the replicate padding: output q then sits on voxel ``radius + stride·q`` of
    ``b`` (for callers that pass a region holding every patch).  Equal to :func:`lc2_at_points`
    pair by pair; see :func:`lc2_patches_against_volume` for how it is computed.
    """
    a, b = _tensor(a, "first image"), _tensor(b, "second image")
    radius = check_radius(radius)
    ca = check_centres(centres_a, a.shape, "centres_a").to(a.device)
    lc2 = lc2_patches_against_volume(extract_patches(a.double(), ca, radius), b, radius, stride, pad, ridge)
    return lc2.to(_out_dtype(a, b))


def _standardised_with_gradient(b: torch.Tensor, radius: int, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` z-scored in float64 (LC² is invariant to it; it keeps the moments well scaled) and its
    gradient magnitude, both [1, 1, D, H, W], replicate-padded by ``radius`` when ``pad``."""
    b64 = b.double()
    b64 = (b64 - b64.mean()) / b64.std().clamp_min(1e-12)
    g64 = gradient_magnitude(b64)
    b64, g64 = b64[None, None], g64[None, None]
    if pad:
        b64 = F.pad(b64, (radius,) * 6, mode="replicate")
        g64 = F.pad(g64, (radius,) * 6, mode="replicate")
    return b64, g64


def _patch_kernels(patches: torch.Tensor, radius: int) -> torch.Tensor:
    """Flattened patches [K, n] as centred 3D convolution kernels [K, 1, s, s, s].  A centred kernel
    gives cov(x, patch) directly (E[x·p0] = E[(x − x̄)·p0]), with no E[xy] − E[x]E[y] cancellation."""
    side = 2 * radius + 1
    return (patches - patches.mean(1, keepdim=True)).reshape(-1, 1, side, side, side)


def lc2_patches_against_volume(a_patches: torch.Tensor, b: torch.Tensor, radius: int, stride: int = 1,
                               pad: bool = True, ridge: float = LC2_RIDGE) -> torch.Tensor:
    """LC² of K given patches (``a_patches`` [K, (2r+1)³], fitted) against the patch of ``b`` at every
    ``stride``-th voxel of ``b`` (the regressor: its intensity and gradient magnitude): ``[K, D', H', W']``,
    float64.

    Cross moments come from a 3D convolution of ``b`` (and its gradient magnitude) with the centred
    patches as kernels; the other moments from box filters; then the closed-form fit of
    :func:`patch_lc2`.  ``pad`` as in :func:`lc2_of_patches_everywhere`.
    """
    radius = check_radius(radius)
    ridge = _check_ridge(ridge)
    bb, gg = _standardised_with_gradient(_tensor(b, "second image"), radius, pad)
    patches = a_patches.double().to(bb.device)
    n = patches.shape[1]
    a0 = patches - patches.mean(1, keepdim=True)
    shape = (-1, 1, 1, 1)
    vaa, saa = (a0 * a0).mean(1).reshape(shape), (patches * patches).mean(1).reshape(shape)
    kernel = _patch_kernels(patches, radius)
    cov_ab = F.conv3d(bb, kernel, stride=stride)[0] / n
    cov_ag = F.conv3d(gg, kernel, stride=stride)[0] / n
    eb, eg, ebb, egg, ebg = box_mean_valid(torch.cat([bb, gg, bb * bb, gg * gg, bb * gg], 1), radius, stride)[0]
    return lc2_from_moments(vaa, saa, (ebb - eb * eb).clamp_min(0), ebb, (egg - eg * eg).clamp_min(0), egg,
                            ebg - eb * eg, cov_ab, cov_ag, ridge)


def lc2_volume_against_patches(a: torch.Tensor, b_patches: torch.Tensor, g_patches: torch.Tensor, radius: int,
                               stride: int = 1, pad: bool = True, ridge: float = LC2_RIDGE) -> torch.Tensor:
    """The other direction of :func:`lc2_patches_against_volume`: LC² of the patch of ``a`` at every
    ``stride``-th voxel (fitted) against K given regressor patches (intensity ``b_patches`` and gradient
    magnitude ``g_patches``, [K, (2r+1)³], cut from an image whose gradient was computed whole):
    ``[K, D', H', W']``, float64."""
    radius = check_radius(radius)
    ridge = _check_ridge(ridge)
    aa, _ = _standardised_with_gradient(_tensor(a, "first image"), radius, pad)
    pb, pg = b_patches.double().to(aa.device), g_patches.double().to(aa.device)
    n = pb.shape[1]
    shape = (-1, 1, 1, 1)
    b0, g0 = pb - pb.mean(1, keepdim=True), pg - pg.mean(1, keepdim=True)
    vbb, sbb = (b0 * b0).mean(1).reshape(shape), (pb * pb).mean(1).reshape(shape)
    vgg, sgg = (g0 * g0).mean(1).reshape(shape), (pg * pg).mean(1).reshape(shape)
    vbg = (b0 * g0).mean(1).reshape(shape)
    cov_ab = F.conv3d(aa, _patch_kernels(pb, radius), stride=stride)[0] / n
    cov_ag = F.conv3d(aa, _patch_kernels(pg, radius), stride=stride)[0] / n
    ea, eaa = box_mean_valid(torch.cat([aa, aa * aa], 1), radius, stride)[0]
    return lc2_from_moments((eaa - ea * ea).clamp_min(0), eaa, vbb, sbb, vgg, sgg, vbg, cov_ab, cov_ag, ridge)


def patch_lc2_matrix(a_patches: torch.Tensor, b_patches: torch.Tensor, g_patches: torch.Tensor,
                     ridge: float = LC2_RIDGE) -> torch.Tensor:
    """LC² of every fitted patch (``a_patches`` [Ka, n]) against every regressor patch (intensity
    ``b_patches`` and gradient magnitude ``g_patches``, [Kb, n]): ``[Ka, Kb]``, float64.  The cross
    moments of all pairs are two matrix products; equal to :func:`patch_lc2` pair by pair."""
    ridge = _check_ridge(ridge)
    a, b, g = a_patches.double(), b_patches.double(), g_patches.double()
    n = a.shape[1]
    a0, b0, g0 = (x - x.mean(1, keepdim=True) for x in (a, b, g))
    col = lambda x, y: (x * y).mean(1)[:, None]  # noqa: E731  per fitted patch
    row = lambda x, y: (x * y).mean(1)[None, :]  # noqa: E731  per regressor patch
    return lc2_from_moments(col(a0, a0), col(a, a), row(b0, b0), row(b, b), row(g0, g0), row(g, g), row(b0, g0),
                            a0 @ b0.T / n, a0 @ g0.T / n, ridge)
