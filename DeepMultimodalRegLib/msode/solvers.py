"""ODE solver settings of MS-ODE, per pyramid level, in the paper's notation.

The paper (Xu et al., MICCAI 2021, section 3.1) writes a level's solver as ``A(tol)`` (adaptive
step size with tolerance ``tol``) or ``F(h)`` (fixed step ``h``).  Here ``A`` is torchdiffeq's
``adaptive_heun`` (Heun–Euler embedded pair, rtol = atol = tol) and ``F`` is fixed-step ``euler``
(Fig. 2b draws the single-scale network with Euler's solver); ``heun2`` (fixed-step Heun) and every
other torchdiffeq method can be named explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidParameterError

FIXED_METHODS = ("euler", "heun2", "midpoint", "rk4", "heun3")
ADAPTIVE_METHODS = ("adaptive_heun", "bosh3", "dopri5", "fehlberg2")
#: aliases accepted in solver strings
ALIASES = {"heun": "heun2"}
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"


@dataclass(frozen=True)
class SolverSpec:
    """One level's solver: ``method`` with a fixed ``step`` or an adaptive tolerance ``tol``."""

    method: str = "euler"
    step: float | None = 0.1
    tol: float | None = None
    #: adaptive solvers give up (with a clear error) after this many steps
    max_steps: int = 1000

    def __post_init__(self) -> None:
        method = ALIASES.get(self.method, self.method)
        object.__setattr__(self, "method", method)
        if method in FIXED_METHODS:
            if self.step is None or not (self.step > 0):
                raise InvalidParameterError(f"fixed-step solver {method!r} needs a positive step, got {self.step}")
        elif method in ADAPTIVE_METHODS:
            if self.tol is None or not (self.tol > 0):
                raise InvalidParameterError(f"adaptive solver {method!r} needs a positive tolerance, got {self.tol}")
        else:
            raise InvalidParameterError(
                f"unknown ODE solver {self.method!r}; use one of {', '.join(FIXED_METHODS + ADAPTIVE_METHODS)}")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def odeint_kwargs(self) -> dict:
        if self.adaptive:
            return {"method": self.method, "rtol": self.tol, "atol": self.tol,
                    "options": {"max_num_steps": self.max_steps}}
        return {"method": self.method, "options": {"step_size": self.step}}

    def __str__(self) -> str:
        return f"A({self.tol:g})" if self.adaptive else f"F({self.step:g})" + ("" if self.method == "euler" else f"[{self.method}]")


def parse_solver(text: str) -> SolverSpec:
    """``"A(1e-3)"`` → adaptive Heun, ``"F(0.1)"`` → Euler step 0.1, ``"heun2:0.2"`` / ``"dopri5:1e-4"``."""
    text = text.strip()
    m = re.fullmatch(r"([AF])\(\s*([0-9.eE+-]+)\s*\)", text)
    if m:
        value = float(m.group(2))
        return SolverSpec("adaptive_heun", None, value) if m.group(1) == "A" else SolverSpec("euler", value)
    m = re.fullmatch(r"([a-z_0-9]+):([0-9.eE+-]+)", text)
    if m:
        method = ALIASES.get(m.group(1), m.group(1))
        value = float(m.group(2))
        return SolverSpec(method, None, value) if method in ADAPTIVE_METHODS else SolverSpec(method, value)
    raise InvalidParameterError(f"cannot read solver {text!r}; write A(1e-3), F(0.1), heun2:0.2 or dopri5:1e-4")


def parse_solvers(text: str) -> tuple[SolverSpec, ...]:
    """``"A(1e-3)-A(1e-3)-F(0.1)"`` (the paper's notation) → one spec per level, coarse to fine."""
    parts = re.findall(r"[AF]\([^)]*\)|[a-z_0-9]+:" + _NUMBER, text)
    if not parts:
        raise InvalidParameterError(f"no solver found in {text!r}")
    return tuple(parse_solver(p) for p in parts)


#: the paper's settings (section 3.1), coarse to fine, with L = T = 3
PAPER_SOLVERS = {
    "rigid": parse_solvers("A(1e-3)-A(1e-3)-F(0.1)"),
    "bspline": parse_solvers("F(0.2)-F(0.2)-F(0.25)"),
    "dense": parse_solvers("F(0.2)-F(0.2)-F(0.5)"),
}
PAPER_LEVELS = 3
PAPER_T = 3.0
