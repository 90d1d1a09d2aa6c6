"""The MS-ODE dynamics: dθ/dt = f^(l)(x_moving ∘ φ_θ, x_fixed, t) solved level by level (paper eq. 2–3).

[0, T] is split into L equal segments; segment l (coarse to fine) is integrated with torchdiffeq at
pyramid level l with its own vector field f^(l) and its own solver.  θ at the end of segment l is
handed to segment l + 1 (``handover``: identity for rigid and B-spline parameters, ×2 upsampling
for a dense field whose grid doubles).  Back-propagation through the solver is either direct, per-
segment checkpointed (memory of one segment) or by the adjoint method (torchdiffeq's
``odeint_adjoint``).  Every evaluation of f counts towards the number of function evaluations
(NFE) and polls the cancel token, so a long adaptive solve stops between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import InvalidParameterError
from ..progress import CancelToken
from .solvers import SolverSpec

BACKPROP_MODES = ("direct", "checkpoint", "adjoint")


class CountingField(nn.Module):
    """Wraps a vector field ``f(t, θ)``: counts evaluations and polls a cancel token."""

    def __init__(self, field_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 cancel: Optional[CancelToken] = None):
        super().__init__()
        self.field_fn = field_fn  # an nn.Module is registered as a submodule (adjoint needs its parameters)
        self.cancel = cancel
        self.nfe = 0

    def forward(self, t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        self.nfe += 1
        return self.field_fn(t, theta)


@dataclass
class SolveInfo:
    """What the solver did: NFE per level and the state at every level boundary."""

    nfe: list[int] = field(default_factory=list)
    boundaries: list[tuple[float, float]] = field(default_factory=list)
    #: θ at the end of each segment (detached), before any handover
    segment_end_states: list[torch.Tensor] = field(default_factory=list)

    @property
    def total_nfe(self) -> int:
        return int(sum(self.nfe))


def segment_bounds(levels: int, total_time: float) -> list[tuple[float, float]]:
    """[(l−1)T/L, lT/L] for l = 1..L."""
    if levels < 1:
        raise InvalidParameterError(f"the number of pyramid levels must be ≥ 1, got {levels}")
    if not total_time > 0:
        raise InvalidParameterError(f"the integration time T must be positive, got {total_time}")
    return [(total_time * l / levels, total_time * (l + 1) / levels) for l in range(levels)]


def solve_segment(field_fn: nn.Module, theta: torch.Tensor, t0: float, t1: float, solver: SolverSpec,
                  backprop: str = "direct") -> torch.Tensor:
    """θ(t1) from θ(t0) = ``theta`` under dθ/dt = field_fn(t, θ)."""
    import torchdiffeq

    t = torch.tensor([t0, t1], dtype=theta.dtype, device=theta.device)
    kwargs = solver.odeint_kwargs()
    try:
        if backprop == "adjoint":
            params = tuple(p for p in field_fn.parameters() if p.requires_grad)
            out = torchdiffeq.odeint_adjoint(field_fn, theta, t, adjoint_params=params, **kwargs)[-1]
        elif backprop == "checkpoint" and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(lambda th: torchdiffeq.odeint(field_fn, th, t, **kwargs)[-1], theta, use_reentrant=False)
        else:
            out = torchdiffeq.odeint(field_fn, theta, t, **kwargs)[-1]
    except AssertionError as exc:  # torchdiffeq reports an exhausted step budget with an assert
        if "max_num_steps" in str(exc):
            raise InvalidParameterError(
                f"the adaptive solver {solver} needed more than {solver.max_steps} steps on [{t0:g}, {t1:g}]; "
                "loosen its tolerance or use a fixed step") from exc
        raise
    return out


def integrate_multiscale(fields: Sequence[Callable], theta0: torch.Tensor, total_time: float,
                         solvers: Sequence[SolverSpec], handover: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                         backprop: str = "direct", cancel: Optional[CancelToken] = None,
                         on_level: Optional[Callable[[int, torch.Tensor], None]] = None) -> tuple[torch.Tensor, SolveInfo]:
    """Integrate dθ/dt = fields[l](t, θ) over the L segments of [0, T]; returns θ(T) and :class:`SolveInfo`.

    ``handover(l, θ)`` turns the state at the end of segment l into the start of segment l + 1.
    """
    if backprop not in BACKPROP_MODES:
        raise InvalidParameterError(f"backprop must be one of {BACKPROP_MODES}, got {backprop!r}")
    if len(solvers) != len(fields):
        raise InvalidParameterError(f"{len(fields)} levels need {len(fields)} solvers, got {len(solvers)}")
    info = SolveInfo(boundaries=segment_bounds(len(fields), total_time))
    theta = theta0
    for level, (field_fn, solver, (t0, t1)) in enumerate(zip(fields, solvers, info.boundaries)):
        counter = field_fn if isinstance(field_fn, CountingField) else CountingField(field_fn, cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
            counter.cancel = cancel
        before = counter.nfe
        theta = solve_segment(counter, theta, t0, t1, solver, backprop)
        info.nfe.append(counter.nfe - before)
        info.segment_end_states.append(theta.detach().clone())
        if on_level is not None:
            on_level(level, theta)
        if handover is not None and level + 1 < len(fields):
            theta = handover(level, theta)
    return theta, info
