"""Similarity maps (the DISA paper's Fig. 1): how alike one point of a source image is to every
point of a target image, by DISA-LC², by LC² itself and by MIND-SSC.

A person judges a descriptor by these pictures: a good one lights up the corresponding anatomy and
little else.  :func:`similarity_maps` computes the three maps, :func:`write_similarity_map_png`
draws them, :func:`map_agreement` gives the numbers a benchmark reports.

Grids
-----
Both volumes are first prepared as the network expects (:func:`~.preprocess.prepare_for_disa`:
resampled to ``spacing_mm``, z-scored).  Every map lives on the **descriptor grid of the prepared
target** (:func:`~DeepMultimodalRegLib.networks.disa_net.descriptor_geometry`: same origin and
direction, spacing × 4, map voxel q on prepared-target voxel 4q):

* **DISA**: the source descriptor at the point (trilinear in the source descriptor map, at the
  physical point) dotted with every target descriptor.  Descriptors have norm ≤ 1, so the dot
  product is in [−1, 1]; it approximates LC² (in [0, 1]) once the network is trained.
* **LC²**: the mean over patch radii 3, 5, 7 (:data:`~DeepMultimodalRegLib.metrics.DISA_RADII`, the
  DISA training target) of the patch LC² of the prepared source around the point's nearest voxel
  (the fitted image) against the prepared target's patch at every voxel 4q
  (:func:`~DeepMultimodalRegLib.metrics.lc2.lc2_of_patches_everywhere`, stride 4, replicate padding).
* **MIND-SSC**: MIND-SSC descriptors (12 channels) of both prepared images; SSD(q) = the mean over the
  12 channels of the squared difference between the source descriptor at the point's nearest
  voxel and the target descriptor at voxel 4q; similarity = exp(−SSD / σ) in (0, 1] with **σ = the
  median SSD over the whole map** (so half of the map is above e⁻¹ ≈ 0.37 by construction: the
  map shows *where* MIND is most similar, on a scale set by the image itself).

The maps are sampled every 4 target voxels (8 mm at 2 mm), the grid the DISA descriptors live on.
Patch LC² is sharp: for the co-registered sample T1/T2 at the brain centre it is 0.75 with the
patches aligned and about 0.2 two voxels (4 mm) off, so the LC² peak is brightest when the point
falls on (or near) a map-grid position of the target, and dimmer in between.  The position of the
peak, which is what the maps are read for, does not depend on this.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InvalidImageError, InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from ..progress import CancelToken, ProgressCallback, ProgressScope
from .preprocess import DISA_SPACING_MM, prepare_for_disa

__all__ = ["SimilarityMaps", "similarity_maps", "map_agreement", "foreground_mask", "upsample_map",
           "write_similarity_map_png", "MAP_NAMES", "MAP_STRIDE"]

#: the three maps, in display order
MAP_NAMES = ("disa", "lc2", "mind")
#: map voxel q sits on prepared-target voxel MAP_STRIDE·q (the DISA network's output stride)
MAP_STRIDE = 4
#: background threshold of :func:`map_agreement`, in standard deviations of the prepared target
FOREGROUND_THRESHOLD_Z = 0.25

_TITLES = {"disa": "DISA-LC²", "lc2": "LC²", "mind": "MIND-SSC"}


@dataclass
class SimilarityMaps:
    """The three similarity maps of one source point over a target image (see the module docstring).

    ``disa``, ``lc2`` and ``mind`` are Volumes on the same grid: the descriptor grid of the prepared
    target (``geometry``).  ``maxima`` / ``maxima_voxel`` give, per map name, the physical LPS
    position (mm) and the (k, j, i) map voxel of its maximum.  ``seconds`` times each map (DISA
    includes both descriptor passes).  ``source`` and ``target`` are the prepared (resampled,
    z-scored) volumes; ``source_voxel`` is the point's nearest voxel (k, j, i) of the prepared source.
    """

    point_lps: tuple[float, float, float]
    source_voxel: tuple[int, int, int]
    source: Volume
    target: Volume
    disa: Volume
    lc2: Volume
    mind: Volume
    maxima: dict[str, tuple[float, float, float]]
    maxima_voxel: dict[str, tuple[int, int, int]]
    mind_sigma: float
    seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    model_name: str = ""

    @property
    def geometry(self) -> ImageGeometry:
        """The common grid of the three maps."""
        return self.disa.geometry

    def maps(self) -> dict[str, Volume]:
        """The maps by name, in display order (disa, lc2, mind)."""
        return {name: getattr(self, name) for name in MAP_NAMES}


# ------------------------------------------------------------------------------------------ helpers
def _point_tensor(point_lps) -> torch.Tensor:
    try:
        p = torch.as_tensor(np.asarray(point_lps, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"the source point must be 3 numbers (x, y, z) in LPS mm, got {point_lps!r}") from exc
    if p.numel() != 3 or not bool(torch.isfinite(p).all()):
        raise InvalidParameterError(f"the source point must be 3 finite numbers (x, y, z) in LPS mm, got {point_lps!r}")
    return p


def _continuous_index(geometry: ImageGeometry, points: torch.Tensor) -> torch.Tensor:
    """Continuous (i, j, k) index of physical points [..., 3] (float64)."""
    from ..transforms.sampling import physical_to_continuous_index

    return physical_to_continuous_index(points.double(), geometry)


def _inside(geometry: ImageGeometry, point: torch.Tensor) -> bool:
    """ITK's rule: the continuous index lies in [-0.5, size - 0.5) on every axis."""
    idx = _continuous_index(geometry, point[None])[0]
    size = torch.as_tensor(geometry.size_xyz, dtype=torch.float64)
    return bool(((idx >= -0.5) & (idx < size - 0.5)).all())


def _sample_clamped(data: torch.Tensor, geometry: ImageGeometry, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``data`` [C, D, H, W] at physical points [N, 3], clamped to the grid's
    voxel-centre box (a descriptor grid does not reach the last input voxels; there the edge
    descriptor is the right value, not the default 0).  Returns [N, C]."""
    from ..transforms.sampling import sample_at_points

    idx = _continuous_index(geometry, points)
    upper = torch.as_tensor(geometry.size_xyz, dtype=torch.float64, device=idx.device) - 1
    idx = torch.minimum(idx.clamp_min(0.0), upper)
    m = torch.as_tensor(geometry.index_to_physical_matrix(), dtype=torch.float64, device=idx.device)
    clamped = idx @ m[:3, :3].T + m[:3, 3]
    out = sample_at_points(data.float(), geometry, clamped.to(device=data.device, dtype=torch.float32)[None])
    return out[0].T  # [N, C]


def _argmax_voxel(values: torch.Tensor) -> tuple[int, int, int]:
    flat = int(torch.argmax(values.reshape(-1)))
    d, h, w = values.shape
    return (flat // (h * w), (flat // w) % h, flat % w)


def _voxel_to_physical(geometry: ImageGeometry, voxel) -> tuple[float, float, float]:
    k, j, i = voxel
    m = geometry.index_to_physical_matrix()
    p = m[:3, :3] @ np.array([i, j, k], dtype=np.float64) + m[:3, 3]
    return tuple(float(v) for v in p)  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_volume(volume, role: str) -> None:
    if not isinstance(volume, Volume):
        raise InvalidParameterError(
            f"the {role} must be a Volume (data with its geometry), got {type(volume).__name__}")
    if volume.geometry.is_2d():
        raise InvalidImageError(f"the {role} volume{' ' + repr(volume.name) if volume.name else ''} is 2D "
                                f"(shape z,y,x = {volume.geometry.shape}); similarity maps need 3D volumes")


# ------------------------------------------------------------------------------------------ maps
def _lc2_map(a: torch.Tensor, b: torch.Tensor, voxel, scope) -> torch.Tensor:
    """Mean over DISA_RADII of the LC² of a's patch at ``voxel`` against b's patch at every voxel 4q."""
    from ..metrics.lc2 import DISA_RADII, lc2_of_patches_everywhere

    centre = torch.tensor([voxel], dtype=torch.long, device=a.device)
    total = None
    for n, r in enumerate(DISA_RADII):
        scope(0.3 + 0.5 * n / len(DISA_RADII), f"LC² map, patch radius {r}")
        m = lc2_of_patches_everywhere(a, centre, b, r, stride=MAP_STRIDE, pad=True)[0]
        total = m if total is None else total + m
    return total / len(DISA_RADII)


def _mind_map(a: torch.Tensor, b: torch.Tensor, voxel) -> tuple[torch.Tensor, float]:
    """exp(−SSD/σ) of a's MIND-SSC vector at ``voxel`` against b's at every voxel 4q; σ = median SSD."""
    from ..metrics.mind import mind_ssc

    anchor = mind_ssc(a.float())[0][:, voxel[0], voxel[1], voxel[2]].clone()
    target = mind_ssc(b.float())[0][:, ::MAP_STRIDE, ::MAP_STRIDE, ::MAP_STRIDE]
    ssd = ((target - anchor[:, None, None, None]) ** 2).mean(0).double()
    sigma = float(ssd.median().clamp_min(1e-12))
    return torch.exp(-ssd / sigma).float(), sigma


def similarity_maps(source: Volume, target: Volume, point_lps: Sequence[float], model: Optional[torch.nn.Module] = None,
                    device: str | torch.device = "auto", spacing_mm: float = DISA_SPACING_MM,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                    ) -> SimilarityMaps:
    """DISA, LC² and MIND-SSC similarity of the source point ``point_lps`` (x, y, z LPS mm) to every
    point of ``target`` (the paper's Fig. 1); see the module docstring for the definitions and grids.

    ``model``: a :class:`~DeepMultimodalRegLib.networks.DISANet` (e.g. freshly initialised in tests);
    None loads the shipped network (:func:`~DeepMultimodalRegLib.networks.load_disa_network`, which
    raises ``WeightsError`` when no weights are installed).  The point must lie inside the source
    volume (:class:`InvalidParameterError` otherwise).  Inputs are not modified.
    """
    from ..networks.disa_net import compute_descriptors, descriptor_geometry, load_disa_network

    _check_volume(source, "source")
    _check_volume(target, "target")
    point = _point_tensor(point_lps)
    if not _inside(source.geometry, point):
        lo = source.geometry.corner_points().min(0)
        hi = source.geometry.corner_points().max(0)
        raise InvalidParameterError(
            f"the point ({', '.join(f'{v:.1f}' for v in point.tolist())}) LPS mm is outside the source volume"
            f"{' ' + repr(source.name) if source.name else ''} (it spans x {lo[0]:.1f}…{hi[0]:.1f}, y {lo[1]:.1f}…"
            f"{hi[1]:.1f}, z {lo[2]:.1f}…{hi[2]:.1f} mm); pick a point inside the source image")
    if not (spacing_mm > 0 and math.isfinite(spacing_mm)):
        raise InvalidParameterError(f"spacing_mm must be a positive number of mm (e.g. 2.0), got {spacing_mm!r}")
    dev = resolve_device(device)
    scope = ProgressScope(progress, cancel=cancel)
    model_name = "caller's model"
    if model is None:
        model = load_disa_network("disa")
        model_name = "shipped network 'disa'"

    scope(0.0, "preparing the volumes (resample, z-score)")
    prep_s = prepare_for_disa(source, spacing_mm)
    prep_t = prepare_for_disa(target, spacing_mm)
    idx = _continuous_index(prep_s.geometry, point[None])[0]  # (i, j, k)
    size = torch.as_tensor(prep_s.geometry.size_xyz, dtype=torch.float64)
    ijk = torch.minimum(idx.round().clamp_min(0), size - 1).long().tolist()
    voxel = (int(ijk[2]), int(ijk[1]), int(ijk[0]))
    map_geometry = descriptor_geometry(prep_t.geometry)
    seconds: dict[str, float] = {}

    # DISA: source descriptor at the point · every target descriptor
    scope(0.1, "DISA descriptors")
    _sync(dev)
    t0 = time.perf_counter()
    desc_s, geom_s = compute_descriptors(model, prep_s, dev)
    desc_t, geom_t = compute_descriptors(model, prep_t, dev)
    anchor = _sample_clamped(desc_s, geom_s, point[None].to(desc_s.device))[0]  # [16]
    disa = torch.einsum("c,cdhw->dhw", anchor.to(desc_t.dtype), desc_t)
    _sync(dev)
    seconds["disa"] = time.perf_counter() - t0
    if not geom_t.same_grid(map_geometry):  # (descriptor_geometry is the grid by construction)
        raise RuntimeError("internal error: the target descriptor grid is not the map grid")
    del desc_s, desc_t

    # LC² and MIND-SSC (a CUDA out-of-memory error retries on the CPU, with a warning)
    def on(device_: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = prep_s.data.to(device_), prep_t.data.to(device_)
        _sync(device_)
        t0 = time.perf_counter()
        lc2_ = _lc2_map(a, b, voxel, scope)
        _sync(device_)
        seconds["lc2"] = time.perf_counter() - t0
        scope(0.85, "MIND-SSC map")
        t0 = time.perf_counter()
        mind_, sigma_ = _mind_map(a, b, voxel)
        _sync(device_)
        seconds["mind"] = time.perf_counter() - t0
        return lc2_, mind_, sigma_

    device_label = str(dev)
    try:
        lc2, mind, sigma = on(dev)
    except torch.cuda.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warnings.warn("GPU out of memory computing the LC² / MIND-SSC similarity maps; computing them on the CPU "
                      "(slower)", RuntimeWarning, stacklevel=2)
        lc2, mind, sigma = on(torch.device("cpu"))
        device_label = f"{dev} (LC² and MIND on the CPU: GPU out of memory)"
    for name, m in (("LC²", lc2), ("MIND", mind)):  # output q sits on voxel 4q: the same grid as DISA
        if tuple(m.shape) != map_geometry.shape:
            raise RuntimeError(
                f"internal error: {name} map {tuple(m.shape)} is not on the map grid {map_geometry.shape}")

    values = {"disa": disa.float().cpu(), "lc2": lc2.float().cpu(), "mind": mind.cpu()}
    vols = {name: Volume(v.contiguous(), map_geometry, name=f"{name}_similarity") for name, v in values.items()}
    maxima_voxel = {name: _argmax_voxel(v) for name, v in values.items()}
    maxima = {name: _voxel_to_physical(map_geometry, vx) for name, vx in maxima_voxel.items()}
    scope(1.0, "similarity maps done")
    return SimilarityMaps(point_lps=tuple(float(v) for v in point.tolist()), source_voxel=voxel, source=prep_s,
                          target=prep_t, disa=vols["disa"], lc2=vols["lc2"], mind=vols["mind"], maxima=maxima,
                          maxima_voxel=maxima_voxel, mind_sigma=sigma, seconds=seconds, device=device_label,
                          model_name=model_name)


# ------------------------------------------------------------------------------------------ numbers
def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    if x.numel() < 3:
        return float("nan")
    x0, y0 = x - x.mean(), y - y.mean()
    den = float(torch.sqrt((x0 * x0).sum() * (y0 * y0).sum()))
    return float((x0 * y0).sum()) / den if den > 0 else float("nan")


def foreground_mask(maps: SimilarityMaps, threshold: float = FOREGROUND_THRESHOLD_Z) -> torch.Tensor:
    """Map voxels whose prepared-target voxel (4q) is not background, bool on the map grid.

    Background is the intensity of the image's border: a voxel is foreground when its z-score
    differs from the median z-score of the outer shell of the prepared target by more than
    ``threshold``.  (A plain |z| > threshold would keep the background of a skull-stripped MR or the
    air of a CT, which sit far from the mean, and drop mid-grey tissue.)
    """
    z = maps.target.data.float()
    shell = torch.cat([z[0].reshape(-1), z[-1].reshape(-1), z[:, 0].reshape(-1), z[:, -1].reshape(-1),
                       z[:, :, 0].reshape(-1), z[:, :, -1].reshape(-1)])
    background = shell.median()
    grid = z[::MAP_STRIDE, ::MAP_STRIDE, ::MAP_STRIDE]
    return (grid - background).abs() > threshold


def map_agreement(maps: SimilarityMaps, threshold: float = FOREGROUND_THRESHOLD_Z) -> dict[str, Any]:
    """Numbers a benchmark reports about one set of maps.

    * ``pearson_disa_lc2``, ``pearson_mind_lc2``: Pearson correlation over the target's foreground
      map voxels (:func:`foreground_mask`) of the raw DISA dot products (not clipped) and of the MIND
      map with the LC² map (NaN when a map is constant there or fewer than 3 voxels remain);
    * ``distance_disa_lc2_max_mm``, ``distance_mind_lc2_max_mm``: distance between the maxima;
    * ``distance_{disa,lc2,mind}_max_to_point_mm``: distance of each maximum from the source point's
      physical position (the right answer when the two scans are aligned);
    * ``foreground_voxels``, ``threshold_z``, ``mind_sigma``, ``seconds_{disa,lc2,mind}``.
    """
    mask = foreground_mask(maps, threshold)
    lc2 = maps.lc2.data[mask]
    out: dict[str, Any] = {
        "pearson_disa_lc2": _pearson(maps.disa.data[mask], lc2),
        "pearson_mind_lc2": _pearson(maps.mind.data[mask], lc2),
    }
    pos = {name: np.asarray(p) for name, p in maps.maxima.items()}
    point = np.asarray(maps.point_lps)
    out["distance_disa_lc2_max_mm"] = float(np.linalg.norm(pos["disa"] - pos["lc2"]))
    out["distance_mind_lc2_max_mm"] = float(np.linalg.norm(pos["mind"] - pos["lc2"]))
    for name in MAP_NAMES:
        out[f"distance_{name}_max_to_point_mm"] = float(np.linalg.norm(pos[name] - point))
    out["foreground_voxels"] = int(mask.sum())
    out["threshold_z"] = float(threshold)
    out["mind_sigma"] = maps.mind_sigma
    for name in MAP_NAMES:
        if name in maps.seconds:
            out[f"seconds_{name}"] = float(maps.seconds[name])
    return out


# ------------------------------------------------------------------------------------------ figure
def upsample_map(map_volume: Volume, geometry: ImageGeometry) -> torch.Tensor:
    """A map (on the descriptor grid) trilinearly interpolated at every voxel of ``geometry``
    (e.g. the prepared target), clamped to the map's edge values beyond its last voxel."""
    pts = geometry.physical_grid(dtype=torch.float64).reshape(-1, 3)
    data = map_volume.data.float()[None]
    out = []
    for s in range(0, pts.shape[0], 1 << 20):
        out.append(_sample_clamped(data, map_volume.geometry, pts[s:s + (1 << 20)])[:, 0])
    return torch.cat(out).reshape(geometry.shape)


def _display_values(name: str, values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0.0, 1.0)  # DISA: dot products clipped to [0, 1]; LC², MIND already inside


def _fmt_point(p) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in p) + ")"


def _plane_offset_mm(geometry: ImageGeometry, voxel_a, voxel_b, plane: str) -> float:
    """Distance (mm) between two voxels of ``geometry`` along the normal of ``plane``."""
    pa = np.asarray(_voxel_to_physical(geometry, voxel_a))
    pb = np.asarray(_voxel_to_physical(geometry, voxel_b))
    return float(abs(pa - pb)[{"axial": 2, "coronal": 1, "sagittal": 0}[plane]])


def write_similarity_map_png(maps: SimilarityMaps, path: str | os.PathLike, title: str = "") -> Path:
    """Draw the maps as a 1600-px-wide PNG, written atomically (an earlier file survives a failure).

    Rows: axial, coronal, sagittal (radiological convention, patient-direction letters, physical
    aspect ratio, as in ``report.png``).  Columns: the prepared source through the point (green
    cross-hair), then the DISA-LC², LC² and MIND-SSC maps as semi-transparent heat maps (upsampled
    from the 8 mm map grid to the 2 mm target grid) over the target slices that pass through the
    **LC² maximum**; each map's maximum is circled (dashed when it lies off the shown slice, with
    its distance).  One colour bar, 0–1; the DISA dot products are clipped to [0, 1] for display.
    """
    import matplotlib.patheffects as pe
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    from ..fileio import atomic_output, check_output_path
    from ..reporting.figures import (DPI, FIGURE_WIDTH_IN, display_limits, draw_plane, normalise_for_display,
                                     plane_pixel_position, plane_pixel_mm, planes_through)

    out = check_output_path(path)
    agreement = map_agreement(maps)
    src, tgt = maps.source, maps.target
    planes = list(planes_through(tgt, (0, 0, 0)))
    # target voxel (2 mm grid) of the LC² maximum: map voxel q sits on voxel 4q
    lc2_vox = tuple(MAP_STRIDE * v for v in maps.maxima_voxel["lc2"])
    src_slices = {p: normalise_for_display(a, limits=display_limits(src.data))
                  for p, a in planes_through(src, maps.source_voxel).items()}
    tgt_slices = {p: normalise_for_display(a, limits=display_limits(tgt.data))
                  for p, a in planes_through(tgt, lc2_vox).items()}
    heat = {}
    for name in MAP_NAMES:
        up = upsample_map(maps.maps()[name], tgt.geometry)
        heat[name] = {p: _display_values(name, a) for p, a in planes_through(Volume(up, tgt.geometry), lc2_vox).items()}
    cmap = colormaps["turbo"]

    # ---- layout (inches)
    width = FIGURE_WIDTH_IN
    left, right, gap, source_gap = 0.55, 1.05, 0.08, 0.28
    header, col_head = 1.0, 0.95
    ncols = 4
    col_w = (width - left - right - source_gap - gap * (ncols - 1)) / ncols
    pix = {("s", p): plane_pixel_mm(src.geometry, p) for p in planes}
    pix.update({("t", p): plane_pixel_mm(tgt.geometry, p) for p in planes})

    def extent(which: str, plane: str, image: np.ndarray) -> tuple[float, float]:
        px = pix[(which, plane)]
        return image.shape[1] * px[0], image.shape[0] * px[1]

    aspects = {p: max(extent("s", p, src_slices[p])[1] / extent("s", p, src_slices[p])[0],
                      extent("t", p, tgt_slices[p])[1] / extent("t", p, tgt_slices[p])[0]) for p in planes}
    row_h = {p: col_w * aspects[p] for p in planes}
    gap_y = 0.12
    footer = 1.5
    height = header + col_head + sum(row_h.values()) + gap_y * (len(planes) - 1) + footer

    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 0.15 / height, title or "Similarity maps: how alike is the marked source point to each "
             "point of the target?", ha="center", va="top", fontsize=15, fontweight="bold")
    fig.text(0.5, 1 - 0.50 / height,
             "Radiological convention: patient's right on the image's left (letters R/L, A/P, S/I mark patient "
             "directions); physical aspect ratio.  Warm colours = similar, cool = dissimilar.",
             ha="center", va="top", fontsize=9.5, color="#333333")
    fig.text(0.5, 1 - 0.74 / height,
             f"Source point {_fmt_point(maps.point_lps)} LPS mm (green cross-hair).  Target slices pass through "
             f"the LC² maximum {_fmt_point(maps.maxima['lc2'])}; ○ = each map's maximum "
             "(dashed: off this slice, by the distance shown).", ha="center", va="top", fontsize=9.5,
             color="#333333")

    x_of = [left]
    for c in range(1, ncols):
        x_of.append(x_of[-1] + col_w + (source_gap if c == 1 else gap))
    col_titles = [
        "slices through the marked point\n(prepared: resampled, z-scored)",
        f"{_TITLES['disa']} (network dot product)\n{maps.model_name}; clipped to [0, 1]",
        "LC² (the metric DISA approximates)\nmean over patch radii 3, 5, 7 voxels",
        "MIND-SSC\nexp(−SSD/σ), σ = median SSD",
    ]
    for c, text in enumerate(col_titles):
        fig.text((x_of[c] + col_w / 2) / width, 1 - (header + 0.36) / height, text, ha="center", va="top",
                 fontsize=10, fontweight="bold" if c else "normal", color="#1a1a1a", linespacing=1.35)
    fig.text((x_of[0] + col_w / 2) / width, 1 - (header + 0.05) / height, f"SOURCE: {src.name or 'source'}",
             ha="center", va="top", fontsize=11, fontweight="bold", color="#1a1a1a")
    fig.text((x_of[1] + x_of[3] + col_w) / 2 / width, 1 - (header + 0.05) / height,
             f"TARGET: {tgt.name or 'target'} — slices through the LC² maximum", ha="center", va="top", fontsize=11,
             fontweight="bold", color="#1a1a1a")
    for x_a, x_b in ((x_of[0], x_of[0] + col_w), (x_of[1], x_of[3] + col_w)):
        fig.add_artist(Line2D([x_a / width, x_b / width], [1 - (header + 0.29) / height] * 2, color="#888888",
                              linewidth=0.8))

    outline = [pe.withStroke(linewidth=3, foreground="black")]

    def add_axes(c: int, y_top: float, which: str, plane: str, image: np.ndarray):
        w_mm, h_mm = extent(which, plane, image)
        w = col_w
        h = w * h_mm / w_mm
        if h > row_h[plane]:
            h = row_h[plane]
            w = h * w_mm / h_mm
        x0 = x_of[c] + (col_w - w) / 2
        y0 = y_top + (row_h[plane] - h) / 2
        ax = fig.add_axes([x0 / width, 1 - (y0 + h) / height, w / width, h / height])
        ax.set_facecolor("black")
        return ax

    def centre_mm(geometry, voxel, plane, which) -> tuple[float, float]:
        col, row = plane_pixel_position(geometry, voxel, plane)
        px = pix[(which, plane)]
        return (col + 0.5) * px[0], (row + 0.5) * px[1]

    y = header + col_head
    for plane in planes:
        fig.text(0.28 / width, 1 - (y + row_h[plane] / 2) / height, plane, ha="center", va="center", rotation=90,
                 fontsize=11, fontweight="bold", color="#1a1a1a")
        # source with cross-hair
        ax = add_axes(0, y, "s", plane, src_slices[plane])
        draw_plane(ax, src_slices[plane], plane, pix[("s", plane)], cmap="gray", vmin=0, vmax=1,
                   scale_bar=(plane == planes[0]))
        cx, cy = centre_mm(src.geometry, maps.source_voxel, plane, "s")
        w_mm, _ = extent("s", plane, src_slices[plane])
        g0, g1 = 0.025 * w_mm, 0.09 * w_mm
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ax.plot([cx + dx * g0, cx + dx * g1], [cy + dy * g0, cy + dy * g1], color="#39ff14", linewidth=2.2,
                    solid_capstyle="butt", path_effects=outline)
        ax.plot([cx], [cy], marker="o", markersize=3.5, color="#39ff14", markeredgecolor="black",
                markeredgewidth=0.8)
        # target heat maps
        for c, name in enumerate(MAP_NAMES, start=1):
            img = tgt_slices[plane]
            ax = add_axes(c, y, "t", plane, img)
            draw_plane(ax, img, plane, pix[("t", plane)], cmap="gray", vmin=0, vmax=1)
            h = heat[name][plane]
            rgba = cmap(h)
            rgba[..., 3] = 0.30 + 0.45 * h
            rows, cols = img.shape
            px = pix[("t", plane)]
            ax.imshow(rgba, extent=(0, cols * px[0], rows * px[1], 0), interpolation="bilinear", zorder=1)
            ax.set_xlim(0, cols * px[0])
            ax.set_ylim(rows * px[1], 0)
            vox = tuple(MAP_STRIDE * v for v in maps.maxima_voxel[name])
            mx, my = centre_mm(tgt.geometry, vox, plane, "t")
            off = _plane_offset_mm(tgt.geometry, vox, lc2_vox, plane)
            in_plane = off < 0.5 * min(tgt.geometry.spacing)
            radius = 0.06 * cols * px[0]
            circle = Circle((mx, my), radius, fill=False, edgecolor="white", linewidth=2.0,
                                               linestyle="-" if in_plane else (0, (3, 2)), path_effects=outline,
                                               zorder=3)
            ax.add_patch(circle)
            label = "max" if in_plane else f"max {off:.0f} mm off-slice"
            ax.text(mx, my - radius * 1.25, label, ha="center", va="bottom", color="white", fontsize=7.5,
                    path_effects=[pe.withStroke(linewidth=2.2, foreground="black")], zorder=4)
        y += row_h[plane] + gap_y

    # colour bar
    top = header + col_head
    bar_h = min(3.2, y - gap_y - top)
    cax = fig.add_axes([(x_of[-1] + col_w + 0.22) / width, 1 - (top + 0.2 + bar_h) / height, 0.16 / width,
                        bar_h / height])
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    bar.set_ticks([0, 0.25, 0.5, 0.75, 1.0])
    bar.ax.tick_params(labelsize=8)
    cax.set_title("similarity", fontsize=8.5, pad=6)
    bar.set_label("0 = unlike  ·  1 = alike\n(DISA clipped to [0, 1])", fontsize=8)

    # footer: the numbers
    def f(v: float, digits: int = 2) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    lines = [
        f"Maxima (LPS mm): DISA {_fmt_point(maps.maxima['disa'])}, LC² {_fmt_point(maps.maxima['lc2'])}, "
        f"MIND {_fmt_point(maps.maxima['mind'])}.   Distance from the LC² maximum: DISA "
        f"{f(agreement['distance_disa_lc2_max_mm'], 0)} mm, MIND {f(agreement['distance_mind_lc2_max_mm'], 0)} mm.",
        f"The LC² maximum is {f(agreement['distance_lc2_max_to_point_mm'], 0)} mm from the source point's "
        "coordinates (where the answer lies only if the two scans are aligned).",
        f"Agreement with LC² over the target's {agreement['foreground_voxels']} foreground map voxels: "
        f"Pearson r(DISA, LC²) = {f(agreement['pearson_disa_lc2'])}, r(MIND, LC²) = "
        f"{f(agreement['pearson_mind_lc2'])}.   MIND σ = {maps.mind_sigma:.3g}.",
        f"Maps computed every {MAP_STRIDE} voxels ({MAP_STRIDE * min(tgt.geometry.spacing):.0f} mm grid) of the "
        f"prepared images ({min(tgt.geometry.spacing):g} mm, z-scored) and interpolated for display.   Time on "
        f"{maps.device}: DISA {maps.seconds.get('disa', float('nan')):.2f} s (both descriptor maps), LC² "
        f"{maps.seconds.get('lc2', float('nan')):.2f} s, MIND {maps.seconds.get('mind', float('nan')):.2f} s.",
    ]
    y0 = height - footer + 0.28
    for n, line in enumerate(lines):
        fig.text(left / width, 1 - (y0 + 0.26 * n) / height, line, ha="left", va="top", fontsize=9,
                 color="#1a1a1a", wrap=False)

    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return out
