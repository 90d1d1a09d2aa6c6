"""2D image similarities for 2D/3D registration: NCC, gradient correlation, NGI, gradient difference.

All take images ``[..., H, W]`` (leading batch dimensions broadcast) and return a similarity per
image pair, **higher is better**, differentiable with respect to both images.  Gradients are Sobel
derivatives on the interior (the one-pixel border is left out).  An optional ``mask`` [H, W]
(bool or 0/1) restricts every sum to its pixels.

* NCC: Pearson correlation of the intensities.
* GC (gradient correlation, Penney 1998): mean of the NCCs of the horizontal and vertical Sobel
  derivatives.
* NGI (normalised gradient information, after Pluim 2000): GI(a', b') / GI(a', a') of the
  standardised images (zero mean, unit variance), with GI(a, b) = Σ w(α)·min(|∇a|, |∇b|),
  w(α) = (cos 2α + 1)/2 and α the angle between the gradients; it is 1 when b's gradients match
  a's in direction (either sign) and are at least as strong.
* GD (gradient difference, Penney 1998): mean over pixels of A_r/(A_r + (∂_r a − s ∂_r b)²) +
  A_c/(A_c + (∂_c a − s ∂_c b)²) over 2, with A the variance of a's derivative and s the
  least-squares intensity scale of b's derivatives onto a's; 1 for b = a (or any positive scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives along rows (d/dr) and columns (d/dc) on the interior: each [..., H−2, W−2]."""
    lead = image.shape[:-2]
    x = image.reshape(-1, 1, *image.shape[-2:]).float() if not image.dtype == torch.float64 else \
        image.reshape(-1, 1, *image.shape[-2:])
    k_c = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    k = torch.stack([k_c.T, k_c]).unsqueeze(1)  # [2, 1, 3, 3]: d/dr, d/dc
    g = F.conv2d(x, k)
    return g[:, 0].reshape(*lead, *g.shape[-2:]), g[:, 1].reshape(*lead, *g.shape[-2:])


def _weights(mask, shape, like: torch.Tensor, interior: bool) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=like.device).to(like.dtype)
    if interior:
        m = m[..., 1:-1, 1:-1]
    return m


def _ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        w = torch.ones(a.shape[-2:], dtype=a.dtype, device=a.device)
    total = w.sum().clamp_min(EPS)
    ma = (a * w).sum((-2, -1), keepdim=True) / total
    mb = (b * w).sum((-2, -1), keepdim=True) / total
    da, db = a - ma, b - mb
    cov = (w * da * db).sum((-2, -1))
    va, vb = (w * da * da).sum((-2, -1)), (w * db * db).sum((-2, -1))
    return cov / torch.sqrt(va * vb + EPS)


def ncc(a: torch.Tensor, b: torch.Tensor, mask=None) -> torch.Tensor:
    """Normalised cross-correlation in [−1, 1]."""
    a, b = torch.broadcast_tensors(a, b)
    return _ncc(a, b, _weights(mask, a.shape, a, interior=False))


def gradient_correlation(a: torch.Tensor, b: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean NCC of the two Sobel derivative images, in [−1, 1]."""
    a, b = torch.broadcast_tensors(a, b)
    ar, ac = sobel(a)
    br, bc = sobel(b)
    w = _weights(mask, a.shape, ar, interior=True)
    return 0.5 * (_ncc(ar, br, w) + _ncc(ac, bc, w))


def gradient_information(a: torch.Tensor, b: torch.Tensor, mask=None) -> torch.Tensor:
    """GI(a, b) = mean over pixels of w(α) · min(|∇a|, |∇b|)."""
    a, b = torch.broadcast_tensors(a, b)
    ar, ac = sobel(a)
    br, bc = sobel(b)
    na = torch.sqrt(ar * ar + ac * ac + EPS)
    nb = torch.sqrt(br * br + bc * bc + EPS)
    cos = (ar * br + ac * bc) / (na * nb)
    weight = cos * cos  # (cos 2α + 1) / 2 = cos² α
    gi = weight * torch.minimum(na, nb)
    w = _weights(mask, a.shape, ar, interior=True)
    if w is None:
        return gi.mean((-2, -1))
    return (gi * w).sum((-2, -1)) / w.sum().clamp_min(EPS)


def standardise(image: torch.Tensor, mask=None) -> torch.Tensor:
    """(image − mean) / standard deviation, per image (over ``mask`` if given)."""
    w = _weights(mask, image.shape, image, interior=False)
    if w is None:
        w = torch.ones(image.shape[-2:], dtype=image.dtype, device=image.device)
    total = w.sum().clamp_min(EPS)
    mean = (image * w).sum((-2, -1), keepdim=True) / total
    var = (w * (image - mean) ** 2).sum((-2, -1), keepdim=True) / total
    return (image - mean) / torch.sqrt(var + EPS)


def ngi(a: torch.Tensor, b: torch.Tensor, mask=None) -> torch.Tensor:
    """Normalised gradient information GI(a', b') / GI(a', a') of the standardised images, in [0, 1].

    Standardising first makes it independent of either image's intensity scale (a DRR's line
    integrals and an X-ray's grey values differ by orders of magnitude; without it, min(|∇a|, |∇b|)
    is always the DRR's and NGI rewards any pose with strong DRR edges).
    """
    a, b = torch.broadcast_tensors(a, b)
    a, b = standardise(a, mask), standardise(b, mask)
    return gradient_information(a, b, mask) / gradient_information(a, a, mask).clamp_min(EPS)


def gradient_difference(a: torch.Tensor, b: torch.Tensor, mask=None) -> torch.Tensor:
    """Penney's gradient difference, normalised to [0, 1] (1 = identical up to a positive scale)."""
    a, b = torch.broadcast_tensors(a, b)
    ar, ac = sobel(a)
    br, bc = sobel(b)
    w = _weights(mask, a.shape, ar, interior=True)
    if w is None:
        w = torch.ones(ar.shape[-2:], dtype=ar.dtype, device=ar.device)
    total = w.sum().clamp_min(EPS)
    s = (w * (ar * br + ac * bc)).sum((-2, -1), keepdim=True) / (w * (br * br + bc * bc)).sum(
        (-2, -1), keepdim=True).clamp_min(EPS)
    terms = []
    for ga, gb in ((ar, br), (ac, bc)):
        mean = (w * ga).sum((-2, -1), keepdim=True) / total
        var = (w * (ga - mean) ** 2).sum((-2, -1), keepdim=True) / total + EPS
        diff = ga - s * gb
        terms.append((w * var / (var + diff * diff)).sum((-2, -1)) / total)
    return 0.5 * (terms[0] + terms[1])


SIMILARITIES = {"ncc": ncc, "gc": gradient_correlation, "ngi": ngi, "gd": gradient_difference}
