"""Global search for rigid MS-ODE: many starting poses, pruned level by level (not in the paper).

A trained rigid MS-ODE captures the answer from the identity pose when the rotation is moderate; far
from it (the paper's ±75° test) its coarse levels can settle in a wrong basin.  A global search runs
the same ODE from a grid of starting rotations θ_0 (all at the centre-of-mass alignment, as a single
start is), as one batch, and keeps after each pyramid level only the ``keep[l]`` states whose MIND-SSC
distance to the fixed image on that level is lowest; the last survivor is the answer.  The coarse
levels are cheap (8³–32³ voxels), so most of the search happens where it costs little; the finest
level runs for the few survivors only.  Every start follows exactly the single-start dynamics, so
``starts = identity only`` reproduces :meth:`MSODE.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidParameterError
from ..progress import CancelToken
from .dynamics import CountingField, segment_bounds, solve_segment
from .model import MSODE, PairBatch
from .solvers import SolverSpec

#: default grid step between starting rotations about each axis; a trained ±75° model captures
#: rotations of ±25° about its start on every case measured (docs/benchmarks.md), so a 50° step leaves
#: every pose within 25° per axis of a start
DEFAULT_STEP_DEG = 50.0
DEFAULT_RANGE_DEG = 50.0


def rotation_starts(range_deg: float = DEFAULT_RANGE_DEG, step_deg: float = DEFAULT_STEP_DEG,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """θ_0 of every start [K, 6]: Euler angles on a grid over ±``range_deg`` per axis (identity first), no shift.

    Each axis gets the nodes linspace(−r, r, n) with n odd, the smallest with spacing ≤ ``step_deg``
    (so 0 is always a node); K = n³."""
    if not (range_deg >= 0) or not (step_deg > 0):
        raise InvalidParameterError(f"need range_deg ≥ 0 and step_deg > 0, got {range_deg} and {step_deg}")
    if range_deg > 180:
        raise InvalidParameterError(f"range_deg must be ≤ 180 (Euler angles), got {range_deg}")
    half = math.ceil(range_deg / step_deg) if range_deg > 0 else 0
    nodes = torch.linspace(-range_deg, range_deg, 2 * half + 1, dtype=torch.float64) if half else torch.zeros(1, dtype=torch.float64)
    grid = torch.cartesian_prod(nodes, nodes, nodes).reshape(-1, 3)
    order = torch.argsort(grid.abs().sum(1), stable=True)  # identity first, then by distance
    angles = torch.deg2rad(grid[order])
    return torch.cat([angles, torch.zeros_like(angles)], dim=1).to(dtype=dtype, device=device)


def default_keep(starts: int, levels: int) -> tuple[int, ...]:
    """Survivors after each level: a third of the starts after the coarsest, then halves, two into
    the finest level, one after it.

    Chosen on 12 held-out ±75° Kirby21 cases (benchmark seed 7, not the benchmark's own cases): the
    best start that ends < 2 mm ranked ≤ 3rd of 27 by the MIND-SSC distance after the 8³ level and
    ≤ 2nd after the 16³ and the 32³ levels, in every case
    (``python benchmarks/msode_multistart_pruning.py --seed 7 --cases 6``)."""
    keep, n = [], starts
    for level in range(levels):
        if level == levels - 1:
            n = 1
        elif level == levels - 2:
            n = min(n, 2)
        else:
            n = max(1, math.ceil(n / (3 if level == 0 else 2)))
        keep.append(n)
    return tuple(keep)


@dataclass
class MultistartInfo:
    """What the search did: starts, survivors and NFE per level, the losses of the survivors."""

    starts: int
    keep: tuple[int, ...]
    nfe: list[int] = field(default_factory=list)  # evaluations of f per level, summed over the starts
    #: per level: (index of each start that ran it, its MIND-SSC distance at the end of the level)
    level_losses: list[list[tuple[int, float]]] = field(default_factory=list)
    #: per level: θ at the end of the level of every start that ran it [k, 6] (same order), for diagnostics
    level_states: list[torch.Tensor] = field(default_factory=list)
    chosen_start: int = 0

    @property
    def total_nfe(self) -> int:
        """Batched evaluations of f (each evaluates every surviving start at once)."""
        return int(sum(self.nfe))

    @property
    def pose_evaluations(self) -> int:
        """Evaluations of f summed over the starts: the work a one-at-a-time search would do."""
        return int(sum(n * len(losses) for n, losses in zip(self.nfe, self.level_losses)))


def _repeat_pair(pairs: PairBatch, count: int) -> PairBatch:
    rep = lambda xs: [x.expand(count, *x.shape[1:]) for x in xs]  # noqa: E731 — views, no copies
    return PairBatch(rep(pairs.fixed), rep(pairs.moving), pairs.fixed_geometries, pairs.moving_geometries,
                     pairs.c_fixed.expand(count, 3), pairs.c_moving.expand(count, 3))


def multistart_solve(model: MSODE, pairs: PairBatch, starts: torch.Tensor, keep: Optional[Sequence[int]] = None,
                     solvers: Optional[Sequence[SolverSpec]] = None, cancel: Optional[CancelToken] = None,
                     on_level: Optional[Callable[[int, torch.Tensor], None]] = None) -> tuple[torch.Tensor, MultistartInfo]:
    """θ(T) [1, 6] of the best start of a rigid ``model`` on one pair, and the search's record.

    ``starts`` [K, 6] are the θ_0; ``keep[l]`` states continue after level l (default
    :func:`default_keep`; more than one survivor of the last level is kept for diagnostics only, the
    best of them is returned)."""
    c = model.config
    if c.kind != "rigid":
        raise InvalidParameterError(f"global MS-ODE search is implemented for rigid models, not {c.kind}")
    if pairs.batch != 1:
        raise InvalidParameterError(f"global search registers one pair at a time, got a batch of {pairs.batch}")
    if starts.dim() != 2 or starts.shape[1] != 6 or starts.shape[0] < 1:
        raise InvalidParameterError(f"starts must be [K, 6] with K ≥ 1, got {tuple(starts.shape)}")
    keep = tuple(keep) if keep is not None else default_keep(starts.shape[0], c.levels)
    if len(keep) != c.levels or any(k < 1 for k in keep) or any(b > a for a, b in zip(keep, keep[1:])):
        raise InvalidParameterError(f"keep must give {c.levels} positive, non-increasing survivor counts, got {keep}")
    solvers = tuple(solvers or c.solver_specs())
    info = MultistartInfo(starts=int(starts.shape[0]), keep=keep)
    alive = torch.arange(starts.shape[0], device=starts.device)
    theta = starts.to(pairs.fixed[-1])
    for level, (t0, t1) in enumerate(segment_bounds(c.levels, c.total_time)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        level_field = model.level_field(_repeat_pair(pairs, len(alive)), level)
        counter = CountingField(level_field, cancel)
        theta = solve_segment(counter, theta, t0, t1, solvers[level])
        info.nfe.append(counter.nfe)
        with torch.no_grad():
            loss = level_field.mind_distance(theta)
        n = min(keep[level], len(alive))
        best = torch.argsort(loss, stable=True)[:n]
        info.level_losses.append([(int(i), float(v)) for i, v in zip(alive.tolist(), loss.tolist())])
        info.level_states.append(theta.detach().clone())
        alive, theta = alive[best], theta[best]
        if on_level is not None:
            on_level(level, theta)
    info.chosen_start = int(alive[0])
    return theta[:1], info
