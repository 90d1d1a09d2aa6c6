"""Patch-pair sampling for DISA training, dense: one forward pass per crop gives every descriptor.

One *crop pair* is a cube of ``CROP`` voxels from each of two scans.  The network's descriptors sit
on every 4th voxel of a crop; the ones at least ``MARGIN`` voxels from the crop's faces are the
*sites* (11³ = 1331 per crop).  For each of K anchor sites in the fitted crop, picked with
probability ∝ the local variance of its patch (the LC² weight), the LC² target against **every**
site of the other crop is computed at once (radii 3, 5, 7: cross moments by 3D convolution with the
anchor patch as kernel, the other moments by box filters); then, as in the paper, t ~ U[0, 1] is
drawn and the site whose target is closest to t is the partner.  This spreads the targets evenly
over [0, 1] and costs a few convolutions per crop pair instead of one network pass per patch.

Which scan is fitted and which supplies the gradient is drawn at random (the paper's "we randomly
pick it from either CT or MR"); the descriptor dot product is symmetric, so the network learns the
average of both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..metrics.lc2 import DISA_RADII, LC2_RIDGE, lc2_of_patches_everywhere
from ..metrics.local_stats import box_mean_valid

#: crop side in voxels: 4·16 + 1, so flips map the descriptor grid (every 4th voxel) onto itself
CROP = 65
#: distance of the outermost site from the crop's faces (≥ the largest patch radius, 7)
MARGIN = 12
STRIDE = 4


def site_indices(crop: int = CROP, margin: int = MARGIN) -> torch.Tensor:
    """Voxel indices along one axis of the sites of a crop: multiples of 4 in [margin, crop−1−margin]."""
    return torch.arange(margin, crop - margin, STRIDE)


@dataclass
class CropPair:
    fitted: torch.Tensor  # [CROP]^3 float, the image whose patches are fitted
    regressor: torch.Tensor  # [CROP]^3, the image whose intensity + gradient magnitude fit them
    anchors: torch.Tensor  # [K, 3] site coordinates (descriptor-grid index) in the fitted crop
    partners: torch.Tensor  # [K, 3] site coordinates in the regressor crop
    targets: torch.Tensor  # [K] DISA targets (mean LC² over radii 3, 5, 7)


def random_crop_origin(shape, generator: torch.Generator, data: torch.Tensor | None = None, tries: int = 8):
    """A crop corner inside the volume; prefers crops whose centre region is not background."""
    best, best_score = None, -1.0
    for _ in range(tries):
        corner = [int(torch.randint(0, max(1, s - CROP + 1), (1,), generator=generator)) for s in shape]
        if data is None:
            return corner
        c = [x + CROP // 2 for x in corner]
        centre = data[c[0] - 8:c[0] + 8, c[1] - 8:c[1] + 8, c[2] - 8:c[2] + 8]
        score = float(centre.std())
        if score > best_score:
            best, best_score = corner, score
        if score > 0.3:
            break
    return best


def crop(volume: torch.Tensor, corner) -> torch.Tensor:
    k, j, i = corner
    return volume[k:k + CROP, j:j + CROP, i:i + CROP]


def targets_against_all_sites(fitted: torch.Tensor, regressor: torch.Tensor, anchors_vox: torch.Tensor,
                              radii=DISA_RADII, ridge: float = LC2_RIDGE) -> torch.Tensor:
    """DISA targets [K, S, S, S] of K fitted-crop patches against the patches at every site of the
    regressor crop (S sites per axis): the mean over radii of :func:`lc2_of_patches_everywhere`
    on the region that just holds every site's patch (no padding needed)."""
    sites = site_indices(regressor.shape[0])
    lo, hi = int(sites[0]), int(sites[-1])
    values = []
    for r in radii:
        # one extra site on each side, dropped after: the gradient magnitude at the region's faces
        # is one-sided, and this keeps it out of every kept patch
        m = r + STRIDE
        region = regressor[(slice(lo - m, hi + m + 1),) * 3]
        lc2 = lc2_of_patches_everywhere(fitted, anchors_vox, region, r, STRIDE, pad=False, ridge=ridge)
        values.append(lc2[:, 1:-1, 1:-1, 1:-1])
    return torch.stack(values).mean(0).float()


def site_weights(fitted: torch.Tensor, radius: int = max(DISA_RADII)) -> torch.Tensor:
    """LC² weight of every site of a crop: the local variance of its patch, [S, S, S]."""
    sites = site_indices(fitted.shape[0])
    lo, hi = int(sites[0]), int(sites[-1])
    region = fitted.double()[(slice(lo - radius, hi + radius + 1),) * 3][None, None]
    mean, mean_sq = box_mean_valid(torch.cat([region, region * region], 1), radius, STRIDE)[0]
    return (mean_sq - mean * mean).clamp_min(0).float()


def _jittered(corner, shape, jitter: int, generator: torch.Generator):
    """``corner`` shifted by a random integer in [-jitter, jitter] per axis, kept inside the volume."""
    if jitter <= 0:
        return corner
    shift = torch.randint(-jitter, jitter + 1, (3,), generator=generator).tolist()
    return tuple(int(min(max(c + d, 0), n - CROP)) for c, d, n in zip(corner, shift, shape))


def _crops_and_anchors(fitted_volume: torch.Tensor, regressor_volume: torch.Tensor, anchors: int,
                       generator: torch.Generator, aligned: bool, jitter: int = 0):
    """The two crops and ``anchors`` anchor sites [K, 3] (site-grid indices) of the fitted crop,
    drawn with probability ∝ the local variance of their patch (the LC² weight).  ``aligned`` crops
    sit at the same place up to ``jitter`` voxels per axis."""
    corner_f = random_crop_origin(fitted_volume.shape, generator, fitted_volume)
    corner_r = (_jittered(corner_f, regressor_volume.shape, jitter, generator) if aligned
                else random_crop_origin(regressor_volume.shape, generator, regressor_volume))
    f = crop(fitted_volume, corner_f)
    r = crop(regressor_volume, corner_r)
    return f, r, anchor_sites(f, anchors, generator)


def anchor_sites(fitted: torch.Tensor, anchors: int, generator: torch.Generator) -> torch.Tensor:
    """``anchors`` sites [K, 3] (site-grid indices) of a crop, drawn with probability ∝ the local
    variance of their patch (the LC² weight), with replacement."""
    s = len(site_indices(fitted.shape[0]))
    # drawn on the CPU whatever the crops' device: the generator (and so the run's reproducibility) lives there
    w = site_weights(fitted).reshape(-1).cpu()
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())
    flat = torch.multinomial(w + 1e-3 / w.numel(), anchors, replacement=True, generator=generator)
    return torch.stack([flat // (s * s), (flat // s) % s, flat % s], 1)


def sample_crop_pair(fitted_volume: torch.Tensor, regressor_volume: torch.Tensor, anchors: int,
                     generator: torch.Generator, aligned: bool = False) -> CropPair:
    """Crops of two prepared scans and ``anchors`` (anchor, partner, target) triples sampled as the
    paper does.  ``aligned`` takes both crops at the same place (co-registered scans only), which
    yields the high-LC² pairs that unrelated crops rarely contain."""
    f, r, anchors_f = _crops_and_anchors(fitted_volume, regressor_volume, anchors, generator, aligned)
    sites = site_indices(f.shape[0])
    s = len(sites)
    targets_all = targets_against_all_sites(f, r, sites[anchors_f]).reshape(anchors, -1)  # [K, S³]
    t = torch.rand(anchors, 1, generator=generator).to(targets_all.device)
    pick = (targets_all - t).abs().argmin(1)
    chosen = targets_all.gather(1, pick[:, None])[:, 0]
    pick = pick.cpu()  # site indices live with the anchors' (CPU)
    partner_sites = torch.stack([pick // (s * s), (pick // s) % s, pick % s], 1)
    first = int(sites[0]) // STRIDE  # descriptor index of site 0
    return CropPair(f.float(), r.float(), anchors_f + first, partner_sites + first, chosen)


@dataclass
class Augmentation:
    """One random rigid symmetry of the cube (axis permutation + flips) shared by both crops, and an
    independent sign and affine intensity change per crop: none of them changes the LC² target."""

    permutation: tuple[int, int, int]
    flips: tuple[int, ...]
    intensity: tuple[tuple[float, float], tuple[float, float]]

    @classmethod
    def random(cls, generator: torch.Generator) -> "Augmentation":
        perm = tuple(int(v) for v in torch.randperm(3, generator=generator))
        flips = tuple(d for d in range(3) if bool(torch.rand(1, generator=generator) < 0.5))
        intensity = []
        for _ in range(2):
            sign = -1.0 if bool(torch.rand(1, generator=generator) < 0.5) else 1.0
            scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=generator))
            shift = float(torch.empty(1).uniform_(-1.0, 1.0, generator=generator))
            intensity.append((sign * scale, shift))
        return cls(perm, flips, (intensity[0], intensity[1]))  # type: ignore[arg-type]

    def image(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Augment a crop [D, H, W] (which = 0 for the fitted crop, 1 for the regressor crop)."""
        a, b = self.intensity[which]
        x = x.permute(*self.permutation)
        if self.flips:
            x = x.flip(self.flips)
        return a * x + b

    def undo_on_descriptors(self, d: torch.Tensor) -> torch.Tensor:
        """Bring a descriptor map [B, C, D, H, W] of an augmented crop back to the crop's own axes."""
        if self.flips:
            d = d.flip([f + 2 for f in self.flips])
        inverse = [0] * 3
        for i, p in enumerate(self.permutation):
            inverse[p] = i
        return d.permute(0, 1, *(v + 2 for v in inverse))


@dataclass
class DenseCropPair:
    """A crop pair with the targets of K anchors against **every** site of the other crop."""

    fitted: torch.Tensor
    regressor: torch.Tensor
    anchors: torch.Tensor  # [K, 3] descriptor-grid indices in the fitted crop
    targets: torch.Tensor  # [K, S, S, S] targets against every site of the regressor crop


def sample_dense_crop_pair(fitted_volume: torch.Tensor, regressor_volume: torch.Tensor, anchors: int,
                           generator: torch.Generator, aligned: bool = False, jitter: int = 0) -> DenseCropPair:
    """Like :func:`sample_crop_pair`, but keeps every candidate: K × S³ pairs per crop pair from the
    same two network passes (the loss then flattens the target distribution, see
    :func:`equalised_weights`, which is what the paper's t-sampling does one pair at a time)."""
    f, r, anchors_f = _crops_and_anchors(fitted_volume, regressor_volume, anchors, generator, aligned, jitter)
    return dense_pair_of_crops(f, r, anchors_f)


def dense_pair_of_crops(fitted: torch.Tensor, regressor: torch.Tensor, anchors: torch.Tensor) -> DenseCropPair:
    """The dense targets of ``anchors`` (site-grid indices [K, 3] in ``fitted``) against every site
    of ``regressor``, packed with the crops."""
    sites = site_indices(fitted.shape[0])
    targets = targets_against_all_sites(fitted, regressor, sites[anchors])
    first = int(sites[0]) // STRIDE
    return DenseCropPair(fitted.float(), regressor.float(), anchors + first, targets)


#: bias-field strength and noise of the label-driven contrasts drawn for training (as the MS-ODE
#: recipe's; intensities ~[0, 1] before the z-score)
SYNTHETIC_BIAS, SYNTHETIC_NOISE = 0.2, 0.03


def synthetic_crop(image_crop: torch.Tensor, label_crop: torch.Tensor, seed: int) -> torch.Tensor:
    """A new label-driven contrast of one crop (:func:`~DeepMultimodalRegLib.synthetic.synthesize_contrast`:
    random intensity per label mixed with a random transfer of the real one, bias field, noise), z-scored."""
    from ..image import ImageGeometry, Volume
    from ..synthetic import synthesize_contrast

    geometry = ImageGeometry(shape=tuple(image_crop.shape))
    out = synthesize_contrast(Volume(image_crop.float().cpu(), geometry), Volume(label_crop.cpu(), geometry), seed,
                              bias=SYNTHETIC_BIAS, noise=SYNTHETIC_NOISE).data.to(image_crop.device)
    return (out - out.mean()) / out.std().clamp_min(1e-6)


def sample_synthetic_crop_pair(volume: torch.Tensor, labels: torch.Tensor, anchors: int, generator: torch.Generator,
                               jitter: int = 0, real_probability: float = 0.5) -> DenseCropPair:
    """A co-registered crop pair of one labelled scan: two label-driven contrasts of the same place
    (or, with ``real_probability``, the scan itself and one such contrast), the second shifted by up to
    ``jitter`` voxels per axis; which crop is fitted is drawn at random.  Unlike the few real
    co-registered scans, every such pair shows a new contrast mapping of the same anatomy, which is
    what registration asks of the descriptors: the same place looks alike whatever the contrast."""
    corner = random_crop_origin(volume.shape, generator, volume)
    other = _jittered(corner, volume.shape, jitter, generator)
    seeds = torch.randint(2 ** 31 - 1, (2,), generator=generator).tolist()
    real = bool(torch.rand(1, generator=generator) < real_probability)
    first = crop(volume, corner) if real else synthetic_crop(crop(volume, corner), crop(labels, corner), seeds[0])
    second = synthetic_crop(crop(volume, other), crop(labels, other), seeds[1])
    if bool(torch.rand(1, generator=generator) < 0.5):
        first, second = second, first
    return dense_pair_of_crops(first, second, anchor_sites(first, anchors, generator))


def t_sampling_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-pair loss weights equal to the probability that the paper's sampler picks each pair.

    ``targets`` is [K, ...]: K anchors, each against every candidate site.  The paper draws
    t ~ U[0, 1] for an anchor and takes the candidate whose target is closest to t, so candidate j
    is picked with probability equal to the length of its cell of [0, 1] (from halfway to the next
    lower target to halfway to the next higher one; the lowest cell starts at 0, the highest ends
    at 1); candidates with equal targets share their cell.  Each anchor's weights sum to 1 / K.

    This is the paper's sampling in expectation, anchor by anchor: every anchor's best match weighs
    most (the highest target alone gets 1 − its midpoint).  The resulting target distribution
    depends on how many candidates an anchor has: the paper's are all patches of a whole volume,
    here the 1331 sites of a crop, so a network fitted this way is calibrated to crops
    (docs/benchmarks.md, DISA loss weighting A/B).
    """
    k = targets.shape[0]
    values = targets.reshape(k, -1).clamp(0, 1).double()
    n = values.shape[1]
    ordered, order = values.sort(1)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2
    lower = torch.cat([torch.zeros_like(ordered[:, :1]), midpoints], 1)
    upper = torch.cat([midpoints, torch.ones_like(ordered[:, :1])], 1)
    cells = upper - lower
    # ties share their cells: a group id per run of equal values (unique across anchors)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = (starts.long().cumsum(1) - 1 + n * torch.arange(k, device=targets.device)[:, None]).reshape(-1)
    total = torch.zeros(k * n, dtype=cells.dtype, device=cells.device).index_add_(0, group, cells.reshape(-1))
    count = torch.zeros_like(total).index_add_(0, group, torch.ones_like(total))
    shared = (total / count.clamp_min(1))[group].reshape(k, n)
    weights = torch.empty_like(shared).scatter_(1, order, shared)
    return (weights / k).to(targets.dtype).reshape(targets.shape)


def equalised_weights(targets: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Per-pair loss weights that give every target bin of [0, 1] the same total weight: the
    histogram-flattening that the paper's t-sampling achieves by drawing t ~ U[0, 1]."""
    index = (targets.clamp(0, 1) * bins).long().clamp_max(bins - 1)
    counts = torch.bincount(index.reshape(-1), minlength=bins).to(targets.dtype)
    weights = 1.0 / counts.clamp_min(1.0)
    return weights[index] / (counts > 0).sum()
