"""Local and global search for a linear pose over precomputed feature maps.

* **local**: from the initial pose (image centres aligned, unless the caller gives one), L-BFGS on
  the coarse level (feature maps pooled to ~16 mm blocks: smoother, wider basin, small maps that
  stay in cache), then on the full-resolution maps from both the coarse result and the initial
  pose; the better of the two on the full-resolution similarity is the result.
* **global** (the DISA paper's search): ``starts`` random poses drawn uniformly within ±``range_deg``
  about every axis and ±``range_mm`` along every axis around the initial pose (the initial pose is
  start 0), all optimised together as one batch on the coarse level; the ``keep`` best distinct
  results are then refined on the full-resolution maps and the best one wins.

Starts are processed in chunks sized to a memory budget, so a large search never has to fit at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import InvalidParameterError
from ..progress import CancelToken, ProgressCallback, ProgressScope
from .features import FeaturePair
from .objective import FeatureObjective
from .optimize import BatchedResult, batched_lbfgs
from .parametrization import Parametrization, perturbed_poses

#: bytes a start may use per fixed location and feature channel during a batched evaluation with
#: its backward pass (sampled values, gradients, grid coordinates): an estimate with headroom, not a
#: measurement; lower ``memory_budget_bytes`` if a device still runs out
BYTES_PER_SAMPLE = 48


@dataclass
class SearchSettings:
    search: str = "local"  # local | global
    starts: int = 500
    #: the paper's abdominal range; the brain preset is ±10° / ±25 mm
    range_deg: float = 40.0
    range_mm: float = 150.0
    coarse_points: int = 3000
    fine_points: int = 12000
    coarse_iterations: int = 30
    fine_iterations: int = 60
    keep: int = 8
    memory_budget_bytes: int = 1 << 30
    #: a coarse-level start stops when its step moves no coordinate by more than this (mm) or its
    #: similarity gains less than this (absolute).  Why looser than the fine level's 0.01 mm / 1e-7:
    #: the coarse maps are 16 mm blocks, and the fine level refines the kept results anyway; on the
    #: Kirby21 T2 case of docs/benchmarks.md it halves the coarse stage's evaluations (13090 -> 6746
    #: for 500 starts) with the same best similarity.
    coarse_x_tolerance_mm: float = 0.1
    coarse_f_tolerance: float = 1e-5

    def validate(self) -> None:
        if self.search not in ("local", "global"):
            raise InvalidParameterError(f"search must be 'local' or 'global', got {self.search!r}")
        if self.starts < 1 or self.keep < 1:
            raise InvalidParameterError("a global search needs at least one start and keeps at least one")
        if self.range_deg < 0 or self.range_mm < 0:
            raise InvalidParameterError("search ranges are non-negative (degrees, millimetres)")
        if self.coarse_x_tolerance_mm <= 0 or self.coarse_f_tolerance < 0:
            raise InvalidParameterError("the coarse level's stopping tolerances must be positive (mm) and non-negative")


@dataclass
class SearchOutcome:
    x: torch.Tensor  # [1, P] best coordinates
    similarity: float
    evaluations: int
    iterations: int
    stages: dict = field(default_factory=dict)  # stage → seconds
    #: every pose refined on the full-resolution maps [K, P], best first, and their similarities [K]:
    #: the runners-up let a caller re-rank the best few with a costlier test (``refine="disa"``)
    candidates: Optional[torch.Tensor] = None
    candidate_similarities: Optional[torch.Tensor] = None


def random_starts(parametrization: Parametrization, x_init: torch.Tensor, count: int, range_deg: float,
                  range_mm: float, seed: int) -> torch.Tensor:
    """``count`` poses around ``x_init`` [1, P]; row 0 is ``x_init`` itself, the others add a rigid motion
    drawn uniformly within ±range_deg about and ±range_mm along every axis (reproducible by ``seed``)."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(count - 1, 6, generator=g, dtype=torch.float64) * 2 - 1
    others = perturbed_poses(parametrization, x_init, u[:, :3] * math.radians(range_deg), u[:, 3:] * range_mm)
    return torch.cat([x_init, others.to(x_init)])


def _chunk_size(objective: FeatureObjective, budget: int) -> int:
    per_start = objective.point_count * objective.pair.channels * BYTES_PER_SAMPLE
    return max(1, int(budget // max(1, per_start)))


def optimise_in_chunks(objective: FeatureObjective, parametrization: Parametrization, x0: torch.Tensor,
                       iterations: int, budget: int, progress: ProgressScope,
                       cancel: Optional[CancelToken], **tolerances) -> BatchedResult:
    """Batched L-BFGS over the rows of ``x0``, ``chunk`` rows at a time (memory bound); ``tolerances``:
    ``x_tolerance``/``f_tolerance`` of :func:`~.optimize.batched_lbfgs` (its defaults otherwise)."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        return -objective.value(parametrization.transform(x)) + parametrization.penalty(x)

    chunk = _chunk_size(objective, budget)
    results = []
    for c0 in range(0, x0.shape[0], chunk):
        sub = progress.sub(c0 / x0.shape[0], min(1.0, (c0 + chunk) / x0.shape[0]))
        results.append(batched_lbfgs(loss, x0[c0:c0 + chunk], max_iterations=iterations, progress=sub, cancel=cancel,
                                     **tolerances))
    return BatchedResult(torch.cat([r.x for r in results]), torch.cat([r.loss for r in results]),
                         max(r.iterations for r in results), sum(r.evaluations for r in results),
                         torch.cat([r.converged for r in results]))


def _distinct_best(x: torch.Tensor, loss: torch.Tensor, keep: int, min_distance_mm: float = 2.0) -> torch.Tensor:
    """Indices of up to ``keep`` lowest losses whose coordinates differ by more than ``min_distance_mm``."""
    chosen: list[int] = []
    for i in torch.argsort(loss).tolist():
        if not math.isfinite(float(loss[i])):
            continue
        if all(float((x[i] - x[j]).abs().max()) > min_distance_mm for j in chosen):
            chosen.append(i)
        if len(chosen) == keep:
            break
    return torch.as_tensor(chosen or [int(torch.argmin(loss))])


def search_pose(pair: FeaturePair, parametrization: Parametrization, x_init: torch.Tensor, settings: SearchSettings,
                seed: int = 0, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> SearchOutcome:
    """Find the coordinates that maximise the feature similarity (minus the parametrisation's penalty)."""
    settings.validate()
    x_init = x_init.to(device=pair.fixed.data.device, dtype=torch.float64)
    if settings.search == "global":
        x0 = random_starts(parametrization, x_init.cpu(), settings.starts, settings.range_deg, settings.range_mm,
                           seed).to(x_init.device)
        return optimise_starts(pair, parametrization, x0, settings, settings.keep, progress, cancel)
    return optimise_starts(pair, parametrization, x_init, settings, 1, progress, cancel, refine_starts=True)


def optimise_starts(pair: FeaturePair, parametrization: Parametrization, x0: torch.Tensor, settings: SearchSettings,
                    keep: int, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                    refine_starts: bool = False) -> SearchOutcome:
    """All rows of ``x0`` optimised together on the coarse level; the ``keep`` best distinct results
    (and, with ``refine_starts``, the starts themselves) refined on the full-resolution maps."""
    scope = ProgressScope(progress)
    device = pair.fixed.data.device
    x0 = x0.to(device=device, dtype=torch.float64)
    stages: dict[str, float] = {}
    coarse = FeatureObjective(pair.coarse(), settings.coarse_points)
    fine = FeatureObjective(pair, settings.fine_points)
    t0 = time.perf_counter()
    first = optimise_in_chunks(coarse, parametrization, x0, settings.coarse_iterations,
                               settings.memory_budget_bytes, scope.sub(0.0, 0.6), cancel,
                               x_tolerance=settings.coarse_x_tolerance_mm, f_tolerance=settings.coarse_f_tolerance)
    stages["coarse_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    refine = first.x[_distinct_best(first.x, first.loss, keep)]
    if refine_starts:
        # The start itself is refined on the full-resolution maps too, and the better of the two wins
        # on that objective.  Why: the pooled maps can have their optimum elsewhere (on a CT whose
        # descriptors vary little, a local search started at the true pose followed the coarse level
        # 188 mm away although the full-resolution similarity was higher at the start).
        refine = torch.cat([refine, x0])
    second = optimise_in_chunks(fine, parametrization, refine, settings.fine_iterations,
                                settings.memory_budget_bytes, scope.sub(0.6, 1.0), cancel)
    stages["fine_s"] = time.perf_counter() - t1
    order = _distinct_best(second.x, second.loss, second.x.shape[0])
    best = int(order[0])
    with torch.no_grad():
        similarities = fine.value(parametrization.transform(second.x[order])).detach()
    return SearchOutcome(second.x[best:best + 1].detach(), float(similarities[0]),
                         first.evaluations + second.evaluations, first.iterations + second.iterations, stages,
                         second.x[order].detach(), similarities)
