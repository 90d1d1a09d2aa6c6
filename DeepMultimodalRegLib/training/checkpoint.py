"""Resumable training: one checkpoint file per run folder, written atomically.

Every training recipe (DISA, the RSO general model, MS-ODE) keeps the same four things so that a
time-boxed run on a small machine can be continued where it stopped: the network weights, the
optimiser state, the random generator (so the resumed run draws what an uninterrupted one would)
and the recipe's own progress record (a dataclass, stored as JSON with the run's config).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..fileio import atomic_output

State = TypeVar("State")


@dataclass
class TrainingState:
    """The progress record of a single-stage recipe (DISA, the RSO general model, MS-ODE, translation)."""

    step: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)  # per step or running averages, as the recipe keeps them
    validation: list = field(default_factory=list)  # one dict per validation round


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


def write_run_records(out: Path, summary: dict, history: list | None = None) -> None:
    """``summary.json`` (and ``history.json`` when given) of a finished or stopped run, atomically."""
    with atomic_output(Path(out) / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    if history is not None:
        with atomic_output(Path(out) / "history.json") as tmp:
            tmp.write_text(json.dumps(history))
