"""Feature maps the registration engine compares: DISA descriptors or MIND-SSC, computed once.

The engine never looks at intensities while it optimises: it samples precomputed feature maps.
A :class:`FeaturePair` holds the fixed and moving maps, each on its own physical grid, the weight of
every fixed-map voxel (the fixed image's local variance, as LC² weights its patches, times a user
mask) and how two feature vectors are compared:

* ``dot``: DISA — the dot product of descriptors approximates LC² (higher is better);
* ``ssd``: MIND-SSC — minus the mean squared difference of the 12 channels (higher is better).

Both extractors start from the same preparation (2 mm isotropic, z-scored; :func:`prepare_for_disa`)
so comparisons between them run on identical code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidImageError, InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from ..metrics.local_stats import local_variance
from ..metrics.mind import mind_ssc
from ..networks.disa_net import OUTPUT_STRIDE, compute_descriptors, load_disa_network
from ..transforms.linear import AffineTransform
from ..transforms.resample import resample_tensor
from .preprocess import DISA_SPACING_MM, prepare_for_disa

#: half-width (voxels at 2 mm) of the cube whose variance weights a location: the largest DISA radius
WEIGHT_RADIUS = 7
#: MIND-SSC settings of the issue (radius, dilation) at the 2 mm working spacing
MIND_RADIUS, MIND_DILATION = 1, 2


@dataclass
class FeatureMap:
    """Feature vectors ``data`` [C, D, H, W] on the physical grid ``geometry``."""

    data: torch.Tensor
    geometry: ImageGeometry

    def pooled(self, factor: int = 2) -> "FeatureMap":
        """Average-pooled by ``factor`` per axis: a coarser level for the first iterations."""
        return FeatureMap(_pool(self.data, factor), pooled_geometry(self.geometry, factor))


@dataclass
class FeaturePair:
    fixed: FeatureMap
    moving: FeatureMap
    #: [D, H, W] on the fixed map's grid, ≥ 0; zero where a location must not count
    weight: torch.Tensor
    #: "dot" (DISA) or "ssd" (MIND-SSC)
    comparison: str
    #: fixed locations are taken every ``point_stride`` voxels of the fixed map (MIND maps are dense)
    point_stride: int = 1
    name: str = ""
    #: seconds spent computing the maps (the "features" stage of a report)
    seconds: float = 0.0
    #: pooling of the coarse search level: about 16 mm blocks (DISA's 8 mm maps ×2, MIND's 2 mm ×8)
    coarse_factor: int = 2
    #: DISA: the vector subtracted from both maps (:func:`centring_vector`), kept so that a moving map
    #: computed later (:func:`with_new_moving`) is centred alike and its similarities stay comparable
    centre: Optional[torch.Tensor] = None
    #: DISA: every centred descriptor was scaled to unit length (the dot product is their cosine);
    #: maps computed later for this pair (:func:`with_new_moving`, :func:`with_new_fixed`) are made alike
    unit_length: bool = False
    #: DISA: the arithmetic of the network passes that made the maps, and that maps computed later for
    #: this pair use too ("float32" or "bfloat16", :func:`~..networks.disa_net.compute_descriptors`)
    precision: str = "float32"

    def pooled(self, factor: int = 2) -> "FeaturePair":
        weight = _pool(self.weight[None], factor)[0]
        return FeaturePair(self.fixed.pooled(factor), self.moving.pooled(factor), weight, self.comparison,
                           max(1, self.point_stride // factor), self.name, self.seconds, 1,
                           unit_length=self.unit_length)

    def coarse(self) -> "FeaturePair":
        """The coarse level of the search (:attr:`coarse_factor`)."""
        return self.pooled(self.coarse_factor)

    @property
    def channels(self) -> int:
        return int(self.fixed.data.shape[0])


def _pool(data: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return data
    return F.avg_pool3d(data[None], kernel_size=factor, stride=factor, ceil_mode=True)[0]


def pooled_geometry(geometry: ImageGeometry, factor: int) -> ImageGeometry:
    """Grid of a ``factor``-pooled map: block k covers voxels [f·k, f·k + f − 1], centred on f·k + (f−1)/2."""
    shift = geometry.direction_matrix @ (np.asarray(geometry.spacing) * (factor - 1) / 2)
    return ImageGeometry(shape=tuple(-(-n // factor) for n in geometry.shape),
                         spacing=tuple(s * factor for s in geometry.spacing),
                         origin=tuple(np.asarray(geometry.origin) + shift), direction=geometry.direction)


def _mask_on(mask: Optional[Volume], grid: ImageGeometry, role: str) -> Optional[torch.Tensor]:
    """A user mask resampled (nearest neighbour) onto ``grid``; refused when it does not overlap it."""
    if mask is None:
        return None
    if not isinstance(mask, Volume):
        raise InvalidParameterError(f"the {role} mask must be a volume with its geometry")
    identity = AffineTransform.identity(1, dtype=torch.float64)
    on_grid = resample_tensor((mask.data != 0).float()[None], mask.geometry, identity, grid, interpolation="nearest")
    on_grid = on_grid[0, 0]
    if not bool(on_grid.any()):
        raise InvalidImageError(
            f"the {role} mask {mask.name or ''} has no voxel inside the {role} image's field of view; check that "
            "it belongs to this image (same patient space)")
    return on_grid


def location_weights(prepared_fixed: Volume, stride: int, fixed_mask: Optional[Volume],
                     grid: ImageGeometry) -> torch.Tensor:
    """LC²'s weight of each fixed location: the local variance (radius 7 at 2 mm) times the user mask."""
    weight = local_variance(prepared_fixed.data, WEIGHT_RADIUS, stride).float()
    mask = _mask_on(fixed_mask, grid, "fixed")
    if mask is not None:
        weight = weight * mask.to(weight)
    if not bool((weight > 0).any()):
        raise InvalidImageError("the fixed image has no structure where it is to be compared (flat, or masked out)")
    return weight


#: :func:`support_weights` counts a location when its LC² weight is at least this share of the largest
SUPPORT_FLOOR = 1e-3


def support_weights(weight: torch.Tensor, floor: float = SUPPORT_FLOOR) -> torch.Tensor:
    """Equal weights over the locations that carry any structure (LC² weight ≥ ``floor`` × its maximum;
    zero elsewhere, so a user mask still applies).  Why: weighted by local variance, the head's outer
    boundary (air against skin, the largest variance there is) dominates the objective, and where the
    descriptors of two contrasts place that boundary 1–3% apart, an affine search turns that into a
    scale error (docs/benchmarks.md, "affine scale bias"); equal weights let the interior anatomy
    decide the scale."""
    if not 0.0 <= floor < 1.0:
        raise InvalidParameterError(f"the support floor must lie in [0, 1), got {floor!r}")
    return (weight >= floor * weight.max()).logical_and_(weight > 0).to(weight.dtype)


def cosine_pair(pair: FeaturePair) -> FeaturePair:
    """``pair`` (DISA) as the dense deformable stage compares it: every descriptor scaled to unit length
    (the dot product becomes the cosine of the centred descriptors) and every structured fixed
    location weighted equally (:func:`support_weights`).

    Why: a dense stage picks, per 8 mm cell, the best of 2,197 shifts, and both LC²-style choices
    pull that pick away from the truth.  The dot product rewards a moving location for the length of
    its descriptor (strong structure) as well as for matching, and the variance weights let each
    cell's strongest edge decide.  On Kirby21 T2 → T1 with no deformation at all, the dense stage on
    the 4 mm maps moved brain points by 1.31 mm on average; with unit descriptors 1.04 mm, with equal
    weights 0.88 mm (ad hoc, docs/benchmarks.md); on two known deformations both together took the
    error 3.24 / 4.06 mm → 1.73 / 1.62 mm, against 2.15 / 2.04 mm as compared before.
    """
    return replace(unit_length_pair(pair), weight=support_weights(pair.weight), name=f"{pair.name}, cosine")


def unit_length_pair(pair: FeaturePair) -> FeaturePair:
    """``pair`` (DISA) with every centred descriptor scaled to unit length, so the dot product the
    engine maximises is their cosine; maps computed later for it (:func:`with_new_moving`,
    :func:`with_new_fixed`) are scaled alike (``unit_length``).  Weights are kept.

    Why: the dot product also rewards a moving location for the length of its descriptor (how much
    structure it has), which pulls the optimum off the truth.  Started at the truth on chest-CT
    synthetic contrasts, a local rigid search ended 0.22–1.04 mm off with the dot product and
    0.22–0.56 mm with the cosine (ad hoc; Kirby21 T2/FLAIR unchanged, 0.37–0.49 mm); the global search
    then brought 7 of 8 capture-range CT cases under 2 mm instead of 5 (docs/benchmarks.md).
    """
    if pair.comparison != "dot":
        raise InvalidParameterError("only DISA descriptors (a 'dot' pair) are compared by their cosine")

    def unit(feature_map: FeatureMap) -> FeatureMap:
        return FeatureMap(_compared(feature_map.data, 0.0, True), feature_map.geometry)

    return replace(pair, fixed=unit(pair.fixed), moving=unit(pair.moving), unit_length=True)


def _masked_moving(prepared: Volume, moving_mask: Optional[Volume]) -> Volume:
    """Outside the moving mask the moving image is set to its background level before features are made."""
    mask = _mask_on(moving_mask, prepared.geometry, "moving")
    if mask is None:
        return prepared
    background = float(prepared.data.min())
    return prepared.with_data(torch.where(mask > 0, prepared.data, torch.full_like(prepared.data, background)))


def disa_features(fixed: Volume, moving: Volume, device: torch.device, model: Optional[torch.nn.Module] = None,
                  fixed_mask: Optional[Volume] = None, moving_mask: Optional[Volume] = None,
                  fixed_modality: str | None = None, moving_modality: str | None = None,
                  sign_symmetric: bool = True, output_stride: int = OUTPUT_STRIDE,
                  precision: str = "float32") -> FeaturePair:
    """DISA descriptors of both volumes at the network's 2 mm spacing (descriptor grid 8 mm), centred
    (:func:`centring_vector`); :func:`unit_length_pair` turns them into the cosine the rigid stages use.

    ``sign_symmetric`` (default): descriptors averaged over the image and its negative
    (:func:`~DeepMultimodalRegLib.networks.disa_net.compute_descriptors`), which brings the
    similarity's optimum closer to the true pose on real contrasts; False gives the raw network.
    ``output_stride`` 2: the network run à trous, descriptors every 4 mm (the dense deformable
    stage's input; on the Kirby21 pair 3.4–6.1 s against the stride-4 pass's 3.1–3.4 s, 2 threads,
    docs/disa_dense_deformable_t2_2026-12-06b.json).
    ``precision``: the network's arithmetic, "float32" or "bfloat16" (faster on CPUs that have it natively);
    the pair keeps it for the maps computed for it later.
    """
    import time

    start = time.perf_counter()
    model = model if model is not None else load_disa_network("disa", device=device)
    phi_f, grid_f, weight = _disa_fixed_map(model, fixed, device, fixed_mask, fixed_modality, sign_symmetric,
                                            output_stride, precision)
    common = centring_vector(phi_f, weight)
    moving_map = _disa_moving_map(model, moving, device, moving_mask, moving_modality, sign_symmetric, common,
                                  False, output_stride, precision)
    name = "DISA" if output_stride == OUTPUT_STRIDE else f"DISA (stride {output_stride}, {DISA_SPACING_MM * output_stride:g} mm)"
    # the coarse search level pools to about 16 mm blocks whatever the map's own spacing
    return FeaturePair(FeatureMap(phi_f - common, grid_f), moving_map, weight, "dot", 1, name,
                       time.perf_counter() - start, coarse_factor=2 * OUTPUT_STRIDE // output_stride, centre=common,
                       precision=precision)


def _compared(descriptors: torch.Tensor, centre: torch.Tensor, unit_length: bool) -> torch.Tensor:
    """Descriptors as the engine compares them: centred, and scaled to unit length if ``unit_length``."""
    centred = descriptors - centre
    if not unit_length:
        return centred
    return centred / torch.linalg.vector_norm(centred, dim=0, keepdim=True).clamp_min(1e-6)


def _disa_fixed_map(model: torch.nn.Module, fixed: Volume, device: torch.device, fixed_mask: Optional[Volume],
                    fixed_modality: str | None, sign_symmetric: bool, output_stride: int = OUTPUT_STRIDE,
                    precision: str = "float32"):
    """Uncentred fixed descriptors, their grid and the LC² weight of every descriptor location."""
    f = prepare_for_disa(fixed, DISA_SPACING_MM, fixed_modality)
    phi_f, grid_f = compute_descriptors(model, f.to(device), device, sign_symmetric=sign_symmetric,
                                        output_stride=output_stride, precision=precision)
    return phi_f, grid_f, location_weights(f, output_stride, fixed_mask, grid_f).to(phi_f.device)


def _disa_moving_map(model: torch.nn.Module, moving: Volume, device: torch.device, moving_mask: Optional[Volume],
                     moving_modality: str | None, sign_symmetric: bool, common: torch.Tensor, unit_length: bool,
                     output_stride: int = OUTPUT_STRIDE, precision: str = "float32") -> FeatureMap:
    m = _masked_moving(prepare_for_disa(moving, DISA_SPACING_MM, moving_modality), moving_mask)
    phi_m, grid_m = compute_descriptors(model, m.to(device), device, sign_symmetric=sign_symmetric,
                                        output_stride=output_stride, precision=precision)
    return FeatureMap(_compared(phi_m, common, unit_length), grid_m)


def with_new_moving(pair: FeaturePair, moving: Volume, device: torch.device,
                    model: Optional[torch.nn.Module] = None, moving_mask: Optional[Volume] = None,
                    moving_modality: str | None = None, sign_symmetric: bool = True) -> FeaturePair:
    """``pair`` (DISA) with the moving map computed afresh from ``moving``: one forward pass instead of two.

    The fixed map, the weights and the centring vector are kept, so similarities of several such
    pairs (the moving image resampled at several candidate poses) are directly comparable.
    """
    import time

    if pair.comparison != "dot" or pair.centre is None:
        raise InvalidParameterError("only a DISA feature pair can take a new moving map")
    start = time.perf_counter()
    model = model if model is not None else load_disa_network("disa", device=device)
    moving_map = _disa_moving_map(model, moving, device, moving_mask, moving_modality, sign_symmetric, pair.centre,
                                  pair.unit_length, precision=pair.precision)
    return replace(pair, moving=moving_map, seconds=time.perf_counter() - start)


def with_new_fixed(pair: FeaturePair, fixed: Volume, device: torch.device,
                   model: Optional[torch.nn.Module] = None, fixed_mask: Optional[Volume] = None,
                   fixed_modality: str | None = None, sign_symmetric: bool = True) -> FeaturePair:
    """``pair`` (DISA) with the fixed map and weights computed afresh from ``fixed``; the moving map
    and the centring vector are kept, so its similarities stay on the scale of ``pair``'s."""
    import time

    if pair.comparison != "dot" or pair.centre is None:
        raise InvalidParameterError("only a DISA feature pair can take a new fixed map")
    start = time.perf_counter()
    model = model if model is not None else load_disa_network("disa", device=device)
    phi_f, grid_f, weight = _disa_fixed_map(model, fixed, device, fixed_mask, fixed_modality, sign_symmetric,
                                            precision=pair.precision)
    return replace(pair, fixed=FeatureMap(_compared(phi_f, pair.centre, pair.unit_length), grid_f), weight=weight,
                   seconds=time.perf_counter() - start)


def centring_vector(descriptors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weighted mean fixed descriptor c [C, 1, 1, 1], subtracted from both maps before registration.

    Why: the trained descriptors share a large common component (its norm is most of a descriptor's),
    which is how the dot product reproduces LC²'s baseline (~0.3 for unrelated patches).  With it,
    ⟨a, b⟩ contains the term ⟨c, b⟩ that rewards moving locations for their own content, whatever
    they are compared with, and the optimum drifts.  ⟨a − c, b − c⟩ differs from ⟨a, b⟩ by exactly
    −⟨c, a⟩ − ⟨c, b⟩ + ‖c‖², removing that bias; on Kirby21 T2→T1 it turns a 3% peak that a pose
    40 mm away exceeds into a clear single peak at the true pose (docs/benchmarks.md, DISA
    registration).  A common vector also keeps every map difference unchanged.
    """
    w = weight.to(descriptors.dtype)
    return ((descriptors * w).sum((1, 2, 3)) / w.sum().clamp_min(1e-12))[:, None, None, None]


def mind_features(fixed: Volume, moving: Volume, device: torch.device, fixed_mask: Optional[Volume] = None,
                  moving_mask: Optional[Volume] = None, fixed_modality: str | None = None,
                  moving_modality: str | None = None) -> FeaturePair:
    """MIND-SSC (r=1, d=2) of both volumes at 2 mm; fixed locations every 4 voxels, like DISA's grid."""
    import time

    start = time.perf_counter()
    f = prepare_for_disa(fixed, DISA_SPACING_MM, fixed_modality)
    m = _masked_moving(prepare_for_disa(moving, DISA_SPACING_MM, moving_modality), moving_mask)
    mind_f = mind_ssc(f.data.to(device).float(), MIND_RADIUS, MIND_DILATION)[0]
    mind_m = mind_ssc(m.data.to(device).float(), MIND_RADIUS, MIND_DILATION)[0]
    weight = location_weights(f, 1, fixed_mask, f.geometry).to(mind_f.device)
    return FeaturePair(FeatureMap(mind_f, f.geometry), FeatureMap(mind_m, m.geometry), weight, "ssd",
                       OUTPUT_STRIDE, "MIND-SSC", time.perf_counter() - start, coarse_factor=8)


def feature_pair(kind: str, fixed: Volume, moving: Volume, device: torch.device, **kwargs) -> FeaturePair:
    """``kind`` "disa" or "mind"."""
    if kind == "disa":
        return disa_features(fixed, moving, device, **kwargs)
    if kind == "mind":
        kwargs.pop("model", None)
        kwargs.pop("sign_symmetric", None)
        kwargs.pop("precision", None)
        return mind_features(fixed, moving, device, **kwargs)
    raise InvalidParameterError(f"unknown feature kind {kind!r}; use 'disa' or 'mind'")
