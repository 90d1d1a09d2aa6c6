"""Known answers for tests and benchmarks: a second contrast of a real scan, and smooth deformations.

No same-patient multimodal pair with a known deformation is publicly obtainable, so accuracy is
measured on a real scan and a label-driven synthetic contrast of it (the other "modality"),
misaligned by a known smooth deformation.  Everything here is deterministic per ``seed``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidImageError, InvalidParameterError
from .image.geometry import ImageGeometry
from .image.volume import Volume
from .transforms.bspline import control_grid_for_domain, cubic_bspline_weights
from .transforms.displacement import DisplacementFieldTransform
from .transforms.jacobian import jacobian_determinant
from .transforms.linear import AffineTransform
from .transforms.resample import resample_tensor

#: knots of the random intensity transfer applied to the original scan (see synthesize_contrast)
TRANSFER_KNOTS = 6
#: standard deviation of the random intensity offset of each label (intensities span about [0, 1])
LABEL_JITTER = 0.15
#: most voxels a synthetic displacement grid may have (3 float32 components each: 48 MiB)
MAX_FIELD_VOXELS = 4_000_000


def _gaussian_blur(data: torch.Tensor, sigma_voxels: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a [D, H, W] tensor; ``sigma_voxels`` per array axis (z, y, x); edges replicated."""
    out = data[None, None]
    for axis, sigma in enumerate(sigma_voxels):
        if sigma <= 1e-3:
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=out.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out[0, 0]


def synthesize_contrast(volume: Volume, labels: Volume, seed: int, bias: float = 0.2, noise: float = 0.03) -> Volume:
    """A second "modality" of ``volume`` driven by its label map (float32, same grid, values ~[0, 1]).

    * A random, non-monotone, piecewise-linear transfer (``TRANSFER_KNOTS`` knots) maps the original
      intensities, denoised by a 1-voxel blur and scaled to [0, 1] by their 1st–99th percentiles.
      Non-monotone: no global intensity map relates the two images.
    * Every label, the background (0) included, gets its own intensity: the transfer of the label's
      median intensity plus a random offset (σ = ``LABEL_JITTER``), so organs get new label-driven
      contrasts while labels of one tissue (lung lobes, vertebrae) stay alike instead of drawing
      edges no modality shows.  Each voxel mixes its label's intensity with its own transferred
      intensity, by a random weight per label (30–90 % texture): this keeps sub-label anatomy
      (vessels in a lobe) and the contrast between air, fat and unlabelled muscle that the
      background label lumps together (a constant background would erase the body outline).
    * Partial-volume blur (Gaussian, σ = 0.5 voxel), a smooth multiplicative bias field
      exp(bias · b(x)) with b a random quadratic over the box scaled to [−1, 1], and Gaussian
      noise of standard deviation ``noise``.

    ``labels`` is resampled (nearest neighbour) onto ``volume``'s grid if it lies elsewhere.
    Neither input is modified.
    """
    if not isinstance(volume, Volume) or not isinstance(labels, Volume):
        raise InvalidParameterError("synthesize_contrast takes a volume and its label map as Volumes")
    if not (math.isfinite(bias) and bias >= 0 and math.isfinite(noise) and noise >= 0):
        raise InvalidParameterError(f"bias and noise must be ≥ 0, got bias={bias!r}, noise={noise!r}")
    g = torch.Generator().manual_seed(int(seed))
    data = volume.data.detach().cpu().float()
    if labels.geometry.same_grid(volume.geometry):
        lab = labels.data.detach().cpu()
    else:
        identity = AffineTransform.identity(1, dtype=torch.float64)
        lab = resample_tensor(labels.data.detach().cpu().float()[None], labels.geometry, identity, volume.geometry,
                              interpolation="nearest")[0, 0]
    lab = lab.round().long()
    if int(lab.min()) < 0:
        raise InvalidImageError(f"{labels.name or 'the label map'} holds negative labels; labels are ids ≥ 0")
    values, index = torch.unique(lab, return_inverse=True)

    # robust [0, 1] scale of the original intensities: the 1st–99th percentile
    sample = data.reshape(-1)
    if sample.numel() > 1_000_000:
        sample = sample[torch.randperm(sample.numel(), generator=g)[:1_000_000]]
    lo, hi = torch.quantile(sample.double(), torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    if hi <= lo:
        raise InvalidImageError(f"{volume.name or 'the volume'} is constant; it has no contrast to transform")
    # the transfer sees anatomy, not the first scan's own noise (which a steep stretch of a random
    # transfer would amplify into a texture no second modality shares): a 1-voxel blur first
    x = ((_gaussian_blur(data, (1.0, 1.0, 1.0)) - lo) / (hi - lo)).clamp(0.0, 1.0).double()
    knots = torch.rand(TRANSFER_KNOTS, generator=g, dtype=torch.float64)
    position = x * (TRANSFER_KNOTS - 1)
    left = position.floor().long().clamp(max=TRANSFER_KNOTS - 2)
    frac = position - left
    transfer = knots[left] * (1 - frac) + knots[left + 1] * frac

    # A label's own intensity: the transfer of its median original intensity plus a random offset.
    # Labels of one tissue (lung lobes, vertebrae, ribs) thus stay alike instead of drawing edges
    # that no modality shows between them, while different tissues get unrelated contrasts.
    count = values.numel()
    # per-label medians from a label × 256-bin histogram (one bincount instead of a pass per label)
    bins = (x.reshape(-1) * 255).round().long()
    histogram = torch.bincount(index.reshape(-1) * 256 + bins, minlength=count * 256).reshape(count, 256)
    cumulative = histogram.cumsum(1)
    medians = (cumulative < (cumulative[:, -1:] + 1) // 2).sum(1).to(torch.float64) / 255
    m_position = medians * (TRANSFER_KNOTS - 1)
    m_left = m_position.floor().long().clamp(max=TRANSFER_KNOTS - 2)
    m_frac = m_position - m_left
    level = knots[m_left] * (1 - m_frac) + knots[m_left + 1] * m_frac
    level = level + LABEL_JITTER * torch.randn(count, generator=g, dtype=torch.float64)
    # how much of the voxel's own (transferred) intensity shows through: texture and sub-label anatomy
    # (vessels in a lung lobe) that a label map does not draw
    texture = 0.3 + 0.6 * torch.rand(count, generator=g, dtype=torch.float64)
    out = level[index] * (1 - texture[index]) + texture[index] * transfer

    out = _gaussian_blur(out.float(), (0.5, 0.5, 0.5)).double()

    if bias > 0:
        # normalised coordinates in [−1, 1] per array axis; a random quadratic polynomial of them
        axes = [torch.linspace(-1, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
                for n in volume.shape]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        terms = [xx, yy, zz, xx * yy, yy * zz, xx * zz, xx * xx, yy * yy, zz * zz]
        coefficients = torch.randn(len(terms), generator=g, dtype=torch.float64)
        field = sum(c * t for c, t in zip(coefficients, terms))
        field = field - field.mean()
        field = field / field.abs().max().clamp_min(1e-12)
        out = out * torch.exp(bias * field)
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=g, dtype=torch.float64)
    name = f"{volume.name or 'volume'}_synthetic_contrast_seed{int(seed)}"
    return Volume(out.float(), volume.geometry, name=name, metadata={"synthetic": True, "seed": int(seed)})


#: Hounsfield units of air and of water: a CT voxel's non-air fraction is (HU − AIR) / (WATER − AIR)
AIR_HU, WATER_HU = -1000.0, 0.0
#: the weakest signal a tissue gives in the MR-like contrast, as a fraction of the brightest
MIN_TISSUE_SIGNAL = 0.15


def mr_like_contrast_of_ct(ct: Volume, labels: Volume, seed: int, bias: float = 0.2, noise: float = 0.03) -> Volume:
    """An MR-like second contrast of a CT in Hounsfield units: :func:`synthesize_contrast` times proton density.

    :func:`synthesize_contrast` draws any contrast, including ones where air, lung and soft tissue
    come out one grey and the chest wall vanishes, which no MR sequence produces: air gives no MR
    signal and lung parenchyma very little (it is ~85% air). Here the label-driven contrast (with its
    bias field, without noise) is rescaled so that every tissue gives at least ``MIN_TISSUE_SIGNAL``
    of the brightest, multiplied by the voxel's non-air fraction from its HU (air 0, lung ≈ 0.15,
    water and denser 1; blurred by half a voxel like the rest), and then gets Gaussian noise of
    standard deviation ``noise``. Which tissue is bright and which is dark stays random per ``seed``.
    Neither input is modified.
    """
    if not isinstance(ct, Volume):
        raise InvalidParameterError("mr_like_contrast_of_ct takes the CT as a Volume (Hounsfield units)")
    if not (math.isfinite(noise) and noise >= 0):
        raise InvalidParameterError(f"noise must be ≥ 0, got {noise!r}")
    tissue = synthesize_contrast(ct, labels, seed, bias=bias, noise=0.0).data.double()
    low, high = float(tissue.min()), float(tissue.max())
    signal = MIN_TISSUE_SIGNAL + (1.0 - MIN_TISSUE_SIGNAL) * (tissue - low) / max(high - low, 1e-12)
    hu = ct.data.detach().cpu().double()
    non_air = ((hu - AIR_HU) / (WATER_HU - AIR_HU)).clamp(0.0, 1.0)
    out = signal * _gaussian_blur(non_air.float(), (0.5, 0.5, 0.5)).double()
    if noise > 0:
        # a stream apart from synthesize_contrast's draws for the same seed
        g = torch.Generator().manual_seed(int(seed) * 2 + 1)
        out = out + noise * torch.randn(out.shape, generator=g, dtype=torch.float64)
    name = f"{ct.name or 'ct'}_mr_like_contrast_seed{int(seed)}"
    return Volume(out.float(), ct.geometry, name=name, metadata={"synthetic": True, "mr_like": True, "seed": int(seed)})


def _covering_grid(geometry: ImageGeometry, spacing: float, margin_mm: float = 0.0) -> ImageGeometry:
    """An isotropic grid of ``spacing`` whose box (edge to edge) covers ``geometry``'s box plus
    ``margin_mm`` on every side; same centre and direction."""
    size = np.maximum(1, np.ceil((geometry.extent_mm + 2 * margin_mm) / spacing - 1e-6)).astype(int)
    origin = np.asarray(geometry.center) - geometry.direction_matrix @ (spacing * (size - 1) / 2.0)
    return ImageGeometry(shape=(int(size[2]), int(size[1]), int(size[0])), spacing=(spacing,) * 3,
                         origin=tuple(origin), direction=geometry.direction)


def _bspline_on_grid(coefficients: torch.Tensor, control: ImageGeometry, grid: ImageGeometry) -> torch.Tensor:
    """A cubic B-spline [3, *control.shape] evaluated at every node of ``grid`` (same direction).

    Both grids share their axes, so the spline is separable: one [nodes × control points] weight
    matrix per axis, three matrix products (BSplineTransform's gather per point would be far slower).
    """
    to_control = control.physical_to_index_matrix() @ grid.index_to_physical_matrix()
    out = coefficients
    for axis_xyz in range(3):
        dim = 3 - axis_xyz  # array dim of this axis in [3, D, H, W]
        nodes = torch.arange(grid.size_xyz[axis_xyz], dtype=torch.float64)
        index = float(to_control[axis_xyz, axis_xyz]) * nodes + float(to_control[axis_xyz, 3])
        size = control.size_xyz[axis_xyz]
        base = (torch.floor(index).long() - 1).clamp(0, size - 4)
        weights = cubic_bspline_weights(index - (base + 1).to(index.dtype))  # [n, 4]
        matrix = torch.zeros(nodes.numel(), size, dtype=torch.float64)
        for m in range(4):
            matrix[torch.arange(nodes.numel()), base + m] += weights[:, m]
        out = torch.movedim(torch.tensordot(matrix, torch.movedim(out, dim, 0), dims=([1], [0])), 0, dim)
    return out


def smooth_random_deformation(geometry: ImageGeometry, max_displacement_mm: float, control_spacing_mm: float,
                              seed: int) -> DisplacementFieldTransform:
    """A random smooth displacement field x → x + u(x) over ``geometry`` with max |u| = ``max_displacement_mm``.

    u is a cubic B-spline with standard-normal coefficients on a control grid of about
    ``control_spacing_mm``, rasterised on an isotropic grid (about 12 nodes per control interval,
    coarser only to stay under ``MAX_FIELD_VOXELS``) that covers the image box plus a margin of
    twice the amplitude: the field is zero outside its grid, and that edge must stay out of reach
    of the image and of the inverse map (:func:`invert_displacement`).  u is scaled so the largest
    vector length over the nodes inside the image box equals the requested amplitude.  The
    returned field *is* the ground truth, its trilinear interpolation included.  The gradient is
    about amplitude / spacing, so modest amplitudes (a fifth of the spacing or less) never fold;
    a field that would fold anywhere (det J ≤ 0) is refused with an
    :class:`InvalidParameterError`, since a folded "truth" has no meaning.
    """
    if not (math.isfinite(max_displacement_mm) and max_displacement_mm >= 0):
        raise InvalidParameterError(f"max_displacement_mm must be ≥ 0, got {max_displacement_mm!r}")
    if not (math.isfinite(control_spacing_mm) and control_spacing_mm > 0):
        raise InvalidParameterError(f"control_spacing_mm must be positive, got {control_spacing_mm!r}")
    spacing = max(min(geometry.spacing), control_spacing_mm / 12.0)
    margin = 2.0 * max_displacement_mm + spacing
    while np.prod(np.ceil((geometry.extent_mm + 2 * margin) / spacing)) > MAX_FIELD_VOXELS:
        spacing *= 1.25
    grid = _covering_grid(geometry, spacing, margin)
    control = control_grid_for_domain(grid, control_spacing_mm=control_spacing_mm)
    g = torch.Generator().manual_seed(int(seed))
    coefficients = torch.randn(3, *control.shape, generator=g, dtype=torch.float64)
    field = _bspline_on_grid(coefficients, control, grid)  # [3, D, H, W], physical (x, y, z) components
    # the nodes inside the image box set the scale
    index = grid.physical_grid(dtype=torch.float64).reshape(-1, 3) @ torch.as_tensor(
        geometry.physical_to_index_matrix()[:3, :3]).T + torch.as_tensor(geometry.physical_to_index_matrix()[:3, 3])
    inside = ((index >= -0.5) & (index <= torch.tensor(geometry.size_xyz, dtype=torch.float64) - 0.5)).all(1)
    lengths = torch.linalg.norm(field, dim=0).reshape(-1)
    peak = float(lengths[inside].max()) if bool(inside.any()) else float(lengths.max())
    field = field * (max_displacement_mm / peak if peak > 0 else 0.0)
    transform = DisplacementFieldTransform(grid, field[None].float())
    if max_displacement_mm > 0:
        det = jacobian_determinant(transform, grid).data
        if float(det.min()) <= 0:
            raise InvalidParameterError(
                f"a random deformation of {max_displacement_mm} mm with control spacing {control_spacing_mm} mm folds "
                f"(min Jacobian determinant {float(det.min()):.2f}); lower the amplitude or widen the spacing")
    return transform


def invert_displacement(transform: DisplacementFieldTransform, iterations: int = 30) -> DisplacementFieldTransform:
    """The inverse x → x + w(x) of a smooth, non-folding displacement field, on the same grid.

    Fixed-point iteration w(x) = −u(x + w(x)) (converges when |∇u| < 1).  Useful when a moving
    image is made by warping: moving(y) = image(T(y)) is aligned with the image by T⁻¹.
    """
    if transform.batch_size != 1:
        raise InvalidParameterError("invert_displacement takes one field (batch size 1)")
    grid = transform.geometry
    points = grid.physical_grid(device=transform.field.device, dtype=torch.float64)
    forward = DisplacementFieldTransform(grid, transform.field.double())
    w = torch.zeros_like(points)
    for _ in range(int(iterations)):
        w = -forward.displacement(points + w)[0]
    return DisplacementFieldTransform(grid, w.permute(3, 0, 1, 2)[None].to(transform.field.dtype))
