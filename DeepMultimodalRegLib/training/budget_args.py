"""What every ``deepmmreg train ...`` recipe shares on the command line: ``--steps`` and ``--minutes``
checked the same way, a progress bar around the run, and the word for how the run ended."""

from __future__ import annotations

from ..errors import InvalidParameterError


def training_budget(args) -> tuple[int | None, float | None]:
    """(steps, minutes) from the parsed arguments; None where not given; refused when not positive."""
    steps = getattr(args, "steps", None)
    minutes = getattr(args, "minutes", None)
    if steps is not None and steps < 1:
        raise InvalidParameterError(f"--steps must be ≥ 1, got {steps}")
    if minutes is not None and not minutes > 0:
        raise InvalidParameterError(f"--minutes must be positive, got {minutes}")
    return steps, minutes


def run_with_progress_bar(label: str, train, *args, **kwargs) -> dict:
    """``train(*args, progress=bar, **kwargs)`` under a terminal progress bar named ``label``,
    closed however the run ends; returns the run's summary."""
    from ..progress import TqdmProgress

    bar = TqdmProgress(label)
    try:
        return train(*args, progress=bar, **kwargs)
    finally:
        bar.close()


def run_state(summary: dict) -> str:
    """How a time-boxed, resumable run ended, for its closing line."""
    return "finished" if summary["finished"] else "stopped (run again to resume)"
