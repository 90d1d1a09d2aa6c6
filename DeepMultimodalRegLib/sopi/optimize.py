"""Optimisation-based 2D/3D registration: the ``opt-ncc``, ``opt-gc`` and ``opt-ngi`` baselines.

All three run the same code; only the similarity differs.  The search is coarse to fine, as
optimisation-based 2D/3D registration usually is:

1. **global sampling** (coarse level: small detector, CT averaged to ``coarse_ct_mm``, X-ray and
   DRRs blurred by ``coarse_blur_px`` — without it GC and NGI, whose optima are narrow, were found
   by neither the sampling nor Powell in most benchmark cases, while NCC was): the start
   pose and ``starts`` random poses around it (uniform within ±``range_deg`` per rotation and
   ±``range_mm`` per translation) are rendered in batches and scored;
2. **multi-start Powell** (scipy, derivative free) from the ``keep`` best of them, coarse level;
3. **Powell refinement** of the best result at the fine level (larger detector, finer CT).

The similarity is computed between the X-ray and the DRR (the X-ray's bone should be bright, as
on a displayed radiograph; this DRR renders line integrals of attenuation).  Every random choice
takes the seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from ..metrics.similarity2d import SIMILARITIES
from ..progress import CancelToken, ProgressScope
from .drr import DRRProjector
from .geometry import CarmGeometry
from .pose import as_pose_tensor

log = logging.getLogger(__name__)

OPT_METHODS = {"opt-ncc": "ncc", "opt-gc": "gc", "opt-ngi": "ngi"}


@dataclass
class OptimizerSettings:
    coarse_size: int = 32  # detector pixels along the longer side, coarse level
    fine_size: int = 64  # detector pixels along the longer side, fine level
    coarse_ct_mm: float = 4.0  # CT voxel size (mm) at the coarse level
    fine_ct_mm: float = 2.0
    coarse_blur_px: float = 3.0  # Gaussian blur of X-ray and DRRs at the coarse level (widens gradient metrics' basins)
    step_voxels: float = 1.0  # DRR sample spacing along the rays, in (smallest) CT voxels, both levels
    starts: int = 96  # random poses scored at the coarse level
    keep: int = 3  # best poses refined by Powell at the coarse level
    range_deg: float = 30.0
    range_mm: tuple[float, float, float] = (150.0, 60.0, 30.0)  # tx (beam: depth is the least certain), ty, tz
    coarse_evaluations: int = 250  # Powell function evaluations per start, coarse level
    fine_evaluations: int = 150
    #: Powell's unit step per parameter (degrees ×3, mm ×3): the optimiser works in these units
    scales: tuple[float, ...] = (4.0, 4.0, 4.0, 20.0, 4.0, 4.0)
    batch: int = 16  # poses rendered together during global sampling
    seed: int = 0


@dataclass
class OptimizationResult:
    pose: np.ndarray  # [6] degrees, mm
    similarity: float  # at the fine level
    initial_similarity: float
    evaluations: int
    seconds: float
    stages: list[dict] = field(default_factory=list)


def coarsen_ct(ct: Volume, target_mm: float) -> Volume:
    """Average the CT (HU clamped at −1000) in blocks of ≈ ``target_mm`` (per axis, never finer)."""
    factors = [max(1, int(round(target_mm / s))) for s in ct.geometry.spacing]  # (x, y, z)
    data = ct.data.float().clamp_min(-1000.0)
    if factors == [1, 1, 1]:
        return ct.with_data(data)
    kz, ky, kx = factors[2], factors[1], factors[0]
    pooled = F.avg_pool3d(data[None, None], kernel_size=(kz, ky, kx), stride=(kz, ky, kx), ceil_mode=True,
                          count_include_pad=False)[0, 0]
    g = ct.geometry
    spacing = tuple(s * k for s, k in zip(g.spacing, factors))
    shift = g.direction_matrix @ ((np.asarray(factors) - 1) / 2 * np.asarray(g.spacing))
    geometry = ImageGeometry(shape=tuple(pooled.shape), spacing=spacing, origin=tuple(np.asarray(g.origin) + shift),
                             direction=g.direction)
    return Volume(pooled.contiguous(), geometry, name=ct.name)


def resize_xray(xray: torch.Tensor, geometry: CarmGeometry, size: int) -> tuple[torch.Tensor, CarmGeometry]:
    """Area-average the X-ray [H, W] so its longer side has ``size`` pixels (never enlarge)."""
    h, w = xray.shape[-2:]
    factor = max(h, w) / size
    if factor <= 1:
        return xray.float(), geometry
    rows, cols = max(1, round(h / factor)), max(1, round(w / factor))
    small = F.interpolate(xray.float()[None, None], size=(rows, cols), mode="area")[0, 0]
    return small, geometry.resized(rows, cols)


def blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] images (replicated borders); identity for sigma 0."""
    if sigma_px <= 0:
        return images
    radius = max(1, int(3 * sigma_px + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-x ** 2 / (2 * sigma_px ** 2))
    k = k / k.sum()
    shape = images.shape
    img = F.pad(images.reshape(-1, 1, *shape[-2:]), (radius,) * 4, mode="replicate")
    img = F.conv2d(F.conv2d(img, k.reshape(1, 1, 1, -1)), k.reshape(1, 1, -1, 1))
    return img.reshape(shape)


class PoseObjective:
    """−similarity(X-ray, DRR(pose)) at one resolution level, counting evaluations."""

    def __init__(self, ct: Volume, xray: torch.Tensor, geometry: CarmGeometry, metric: str, device, step_mm=None,
                 blur_px: float = 0.0):
        self.projector = DRRProjector(ct, geometry, device=device, step_mm=step_mm)
        self.blur_px = float(blur_px)
        self.xray = blur(xray.to(self.projector.device).float(), self.blur_px)
        self.similarity = SIMILARITIES[metric]
        self.evaluations = 0

    @torch.no_grad()
    def scores(self, poses: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(np.atleast_2d(poses), dtype=torch.float64)
        drr = blur(self.projector.render(p), self.blur_px)
        self.evaluations += p.shape[0]
        s = self.similarity(self.xray, drr).double().cpu().numpy()
        return np.nan_to_num(s, nan=-1.0)


def _powell(objective: PoseObjective, start: np.ndarray, scales: np.ndarray, max_evaluations: int,
            check: Callable[[], None]) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    def f(x):
        check()
        return -float(objective.scores(start + x * scales)[0])

    res = minimize(f, np.zeros(6), method="Powell",
                   options={"maxfev": max_evaluations, "xtol": 1e-2, "ftol": 1e-5, "disp": False})
    return start + res.x * scales, -float(res.fun)


def optimize_pose(ct: Volume, xray: torch.Tensor, geometry: CarmGeometry, method: str = "opt-gc",
                  init_pose=(0, 0, 0, 0, 0, 0), settings: OptimizerSettings | None = None, device="cpu",
                  progress=None, cancel: CancelToken | None = None) -> OptimizationResult:
    """Find the pose (degrees, mm) whose DRR best matches ``xray`` [H, W] under ``method``'s similarity."""
    if method not in OPT_METHODS:
        raise InvalidParameterError(f"unknown optimisation method {method!r}; choose one of {', '.join(OPT_METHODS)}")
    settings = settings or OptimizerSettings()
    metric = OPT_METHODS[method]
    scope = ProgressScope(progress, cancel=cancel)
    check = (lambda: cancel.raise_if_cancelled()) if cancel is not None else (lambda: None)
    t_start = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    init = as_pose_tensor(init_pose)[0].numpy().astype(np.float64)
    scales = np.asarray(settings.scales, dtype=np.float64)
    stages = []

    scope(0.0, "preparing coarse level")
    xc, gc = resize_xray(xray, geometry, settings.coarse_size)
    ct_coarse = coarsen_ct(ct, settings.coarse_ct_mm)
    coarse = PoseObjective(ct_coarse, xc, gc, metric, device,
                           step_mm=settings.step_voxels * min(ct_coarse.geometry.spacing),
                           blur_px=settings.coarse_blur_px)
    # 1. global sampling
    half = np.array([settings.range_deg] * 3 + list(settings.range_mm), dtype=np.float64)
    candidates = np.concatenate([init[None], init + rng.uniform(-1, 1, (settings.starts, 6)) * half])
    scores = []
    for i in range(0, len(candidates), settings.batch):
        check()
        scores.append(coarse.scores(candidates[i:i + settings.batch]))
        scope(0.25 * min(1.0, (i + settings.batch) / len(candidates)), "global sampling")
    scores = np.concatenate(scores)
    initial_coarse = float(scores[0])
    order = np.argsort(-scores)[:max(1, settings.keep)]
    stages.append({"stage": "global sampling", "poses": len(candidates), "best": float(scores[order[0]]),
                   "seconds": round(time.perf_counter() - t_start, 2)})
    # 2. multi-start Powell, coarse
    best_pose, best_score = candidates[order[0]], float(scores[order[0]])
    for n, idx in enumerate(order):
        pose, score = _powell(coarse, candidates[idx], scales, settings.coarse_evaluations, check)
        if score > best_score:
            best_pose, best_score = pose, score
        scope(0.25 + 0.45 * (n + 1) / len(order), f"coarse Powell {n + 1}/{len(order)}")
    stages.append({"stage": "coarse Powell", "starts": len(order), "best": best_score,
                   "seconds": round(time.perf_counter() - t_start, 2)})
    # 3. fine refinement
    xf, gf = resize_xray(xray, geometry, settings.fine_size)
    ct_fine = coarsen_ct(ct, settings.fine_ct_mm)
    fine = PoseObjective(ct_fine, xf, gf, metric, device, step_mm=settings.step_voxels * min(ct_fine.geometry.spacing))
    initial = float(fine.scores(init)[0])
    pose, score = _powell(fine, best_pose, scales / 4, settings.fine_evaluations, check)
    start_score = float(fine.scores(best_pose)[0])
    if start_score > score:
        pose, score = best_pose, start_score
    stages.append({"stage": "fine Powell", "best": score, "seconds": round(time.perf_counter() - t_start, 2)})
    scope(1.0, "done")
    log.info("%s: coarse %.4f → fine %.4f (initial %.4f / %.4f)", method, best_score, score, initial_coarse, initial)
    return OptimizationResult(pose=pose, similarity=score, initial_similarity=initial,
                              evaluations=coarse.evaluations + fine.evaluations,
                              seconds=time.perf_counter() - t_start, stages=stages)
