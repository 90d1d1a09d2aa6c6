"""Batched L-BFGS: many independent minimisations run as one batch on the device.

A global search starts hundreds of local optimisations; running them one after another would cost
hundreds of times one run.  Here every start keeps its own L-BFGS memory and its own backtracking
(Armijo) line search, but each objective call evaluates all still-active starts in one batch.
Starts that have converged leave the batch, so late iterations only pay for the stragglers.

Units: the coordinates are expected in comparable units (mm, see :mod:`.parametrization`), which
lets the first step be a plain, bounded gradient step of ``initial_step`` mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..progress import CancelToken, ProgressCallback, no_progress

#: Armijo constant of the backtracking line search
ARMIJO_C1 = 1e-4


@dataclass
class BatchedResult:
    x: torch.Tensor  # [B, P]
    loss: torch.Tensor  # [B]
    iterations: int  # iterations of the longest-running start
    evaluations: int  # single-start objective evaluations, summed over starts
    converged: torch.Tensor  # [B] bool


def _loss_and_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach()


def _two_loop(grad: torch.Tensor, s: torch.Tensor, y: torch.Tensor, rho: torch.Tensor, newest: torch.Tensor,
              gamma: torch.Tensor) -> torch.Tensor:
    """L-BFGS direction −H·g for a batch; history slots with rho = 0 are empty and change nothing.

    ``s``, ``y`` [B, m, P] are ring buffers whose most recent slot is ``newest`` [B].
    """
    b, m, _ = s.shape
    q = grad.clone()
    order = (newest[:, None] - torch.arange(m, device=grad.device)[None, :]) % m  # newest first
    alphas = torch.zeros(b, m, dtype=grad.dtype, device=grad.device)
    rows = torch.arange(b, device=grad.device)
    for k in range(m):
        slot = order[:, k]
        sk, yk, rk = s[rows, slot], y[rows, slot], rho[rows, slot]
        a = rk * (sk * q).sum(1)
        alphas[:, k] = a
        q = q - a[:, None] * yk
    r = gamma[:, None] * q
    for k in reversed(range(m)):
        slot = order[:, k]
        sk, yk, rk = s[rows, slot], y[rows, slot], rho[rows, slot]
        beta = rk * (yk * r).sum(1)
        r = r + sk * (alphas[:, k] - beta)[:, None]
    return -r


def batched_lbfgs(loss_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iterations: int = 50,
                  history: int = 8, initial_step: float = 2.0, max_step: float = 20.0, x_tolerance: float = 0.01,
                  f_tolerance: float = 1e-7, line_search_steps: int = 6, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> BatchedResult:
    """Minimise ``loss_fn`` ([n, P] → [n]) from every row of ``x0`` [B, P] independently.

    A start stops when its accepted step moves no coordinate by more than ``x_tolerance``, when its
    loss improves by less than ``f_tolerance`` (absolute), or when the line search fails twice in a
    row.  Steps are capped at ``max_step`` in every coordinate (mm), which keeps a start from
    jumping across the image on a flat objective.
    """
    progress = progress or no_progress
    x = x0.detach().clone()
    b, p = x.shape
    device, dtype = x.device, x.dtype
    loss, grad = _loss_and_grad(loss_fn, x)
    evaluations = b
    s = torch.zeros(b, history, p, dtype=dtype, device=device)
    y = torch.zeros_like(s)
    rho = torch.zeros(b, history, dtype=dtype, device=device)
    newest = torch.zeros(b, dtype=torch.long, device=device)
    gamma = torch.ones(b, dtype=dtype, device=device)
    has_history = torch.zeros(b, dtype=torch.bool, device=device)
    failures = torch.zeros(b, dtype=torch.long, device=device)
    converged = torch.zeros(b, dtype=torch.bool, device=device)
    iterations = 0
    for it in range(max_iterations):
        if cancel is not None:
            cancel.raise_if_cancelled()
        active = torch.nonzero(~converged).squeeze(1)
        if active.numel() == 0:
            break
        iterations = it + 1
        xa, la, ga = x[active], loss[active], grad[active]
        direction = _two_loop(ga, s[active], y[active], rho[active], newest[active], gamma[active])
        # no history yet (or a non-descent direction): a gradient step of initial_step mm
        steepest = -ga * (initial_step / ga.abs().amax(1, keepdim=True).clamp_min(1e-30))
        slope = (direction * ga).sum(1)
        use_steepest = ~has_history[active] | ~(slope < 0)
        direction = torch.where(use_steepest[:, None], steepest, direction)
        slope = (direction * ga).sum(1)
        cap = (max_step / direction.abs().amax(1).clamp_min(1e-30)).clamp(max=1.0)
        alpha = cap.clone()
        accepted = torch.zeros_like(la, dtype=torch.bool)
        new_x, new_loss, new_grad = xa.clone(), la.clone(), ga.clone()
        for _ in range(line_search_steps):
            trying = torch.nonzero(~accepted).squeeze(1)
            if trying.numel() == 0:
                break
            xt = xa[trying] + alpha[trying, None] * direction[trying]
            lt, gt = _loss_and_grad(loss_fn, xt)
            evaluations += trying.numel()
            ok = torch.isfinite(lt) & (lt <= la[trying] + ARMIJO_C1 * alpha[trying] * slope[trying])
            good = trying[ok]
            new_x[good], new_loss[good], new_grad[good] = xt[ok], lt[ok], gt[ok]
            accepted[good] = True
            alpha[trying[~ok]] *= 0.25
        step = new_x - xa
        dy = new_grad - ga
        sy = (step * dy).sum(1)
        update = accepted & (sy > 1e-12)
        slot = (newest[active] + 1) % history
        rows = active[update]
        if rows.numel():
            s[rows, slot[update]] = step[update]
            y[rows, slot[update]] = dy[update]
            rho[rows, slot[update]] = 1.0 / sy[update]
            newest[rows] = slot[update]
            gamma[rows] = sy[update] / (dy[update] ** 2).sum(1)
            has_history[rows] = True
        improvement = la - new_loss
        x[active], loss[active], grad[active] = new_x, new_loss, new_grad
        failed = ~accepted
        failures[active] = torch.where(failed, failures[active] + 1, torch.zeros_like(failures[active]))
        # a failed line search restarts that start's memory (its curvature model was wrong)
        reset = active[failed]
        rho[reset] = 0
        has_history[reset] = False
        small_step = accepted & (step.abs().amax(1) < x_tolerance)
        small_gain = accepted & (improvement.abs() < f_tolerance) & has_history[active]
        converged[active] = small_step | small_gain | (failures[active] >= 2)
        progress((it + 1) / max_iterations, f"iteration {it + 1}: {int((~converged).sum())} of {b} starts active")
    return BatchedResult(x, loss, iterations, evaluations, converged)
