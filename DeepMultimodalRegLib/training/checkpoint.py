"""Resumable training: one checkpoint file per run folder, written atomically.

Every training recipe (DISA, the RSO general model, MS-ODE) keeps the same four things so that a
time-boxed run on a small machine can be continued where it stopped: the network weights, the
optimiser state, the random generator (so the resumed run draws what an uninterrupted one would)
and the recipe's own progress record (a dataclass, stored as JSON with the run's config).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..fileio import atomic_output

State = TypeVar("State")


def load_checkpoint(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer,
                    generator: torch.Generator, state: State, map_location: Any = "cpu") -> State:
    """Restore ``model``, ``optimiser`` and ``generator`` from ``path`` if it exists; returns the saved
    progress record (of ``state``'s type), or ``state`` itself for a fresh run."""
    if not Path(path).exists():
        return state
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    generator.set_state(saved["generator"].cpu())  # generator states live on the CPU
    return type(state)(**json.loads(saved["state"]))


def save_checkpoint(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer,
                    generator: torch.Generator, state, config) -> None:
    with atomic_output(path) as tmp:
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "generator": generator.get_state(), "state": json.dumps(asdict(state)),
                    "config": json.dumps(asdict(config))}, tmp)


def time_to_stop(cancel, started: float, max_minutes: float | None) -> bool:
    """True when the run was cancelled or has used its wall-time budget (then it checkpoints and ends)."""
    import time

    if cancel is not None and cancel.cancelled:
        return True
    return max_minutes is not None and (time.perf_counter() - started) / 60 > max_minutes
