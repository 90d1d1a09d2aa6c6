"""``--steps`` and ``--minutes`` of ``deepmmreg train ...``, checked the same way for every recipe."""

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
