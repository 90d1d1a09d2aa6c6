"""A finer pyramid level under a trained rigid MS-ODE model with ``gradient_input``.

    python -m DeepMultimodalRegLib.training.msode_extend IN.pt OUT.pt [--gain 1.0] [--solver "F(0.2)"]

Why: trained at 32³ × 8 mm (what 2 CPU cores allow), the learned levels bring most real pairs
within a few mm, then stop at the precision the 8 mm similarity allows (1–4 mm on held-out
Kirby21).  Adding level L + 1 on the 2× finer grid (same field of view) continues the dynamics
there over one more segment of the same length: the time segments of the learned levels are
unchanged, [0, T] → [0, T·(L + 1)/L].  The new level's network is untrained (zero head), so it is a
gradient flow on the MIND-SSC distance at the finer grid, its speed ``gain`` × the model's
descent rate (the network's gain bias holds log(gain)); it can be fine-tuned like any level.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from ..fileio import atomic_output
from ..msode.model import MSODE
from ..msode.networks import RigidField, input_channels


def add_finer_level(model: MSODE, gain: float = 1.0, solver: str = "F(0.2)", seed: int = 0) -> MSODE:
    """``model`` with one more, finer level (see the module's text); ``model`` is not modified."""
    c = model.config
    if c.kind != "rigid" or not c.gradient_input:
        raise InvalidParameterError("a finer level can only be added to a rigid MS-ODE model with gradient_input "
                                    "(an untrained level of any other model would not move θ)")
    if not gain > 0:
        raise InvalidParameterError(f"the new level's gain must be positive, got {gain}")
    solvers = "-".join(str(s) for s in c.solver_specs()) + "-" + solver
    config = replace(c, levels=c.levels + 1, size=c.size * 2, spacing_mm=c.spacing_mm / 2,
                     total_time=c.total_time * (c.levels + 1) / c.levels, solvers=solvers)
    config.solver_specs()  # fails early on an unreadable solver
    extended = MSODE(config)
    with torch.no_grad():
        for old, new in zip(model.fields, extended.fields):
            new.load_state_dict(old.state_dict())
        # a level of its own seed (not the one MSODE(config) drew after the copied levels), so
        # that the new level's weights do not depend on how many levels the model had
        torch.manual_seed(seed)
        finest = RigidField(input_channels(c.inputs), c.width, gradient_input=True)
        finest.gain_head.bias.fill_(math.log(gain))
        extended.fields[-1] = finest
    return extended.to(next(model.parameters()).device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path, help="a trained rigid MS-ODE model (gradient_input)")
    p.add_argument("out", type=Path)
    p.add_argument("--gain", type=float, default=1.0, help="speed of the new level's flow, × the descent rate")
    # F(0.2) (5 steps) ended as close as F(0.1) on msode.py's 24 rigid cases, in two-thirds of the time
    p.add_argument("--solver", default="F(0.2)", help="the new level's solver (paper notation; default F(0.2))")
    args = p.parse_args(argv)
    model = MSODE.from_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    extended = add_finer_level(model, args.gain, args.solver)
    with atomic_output(args.out) as tmp:
        torch.save(extended.state_dict_with_config(), tmp)
    c = extended.config
    print(f"{args.out}: {c.levels} levels, finest {c.size}^3 x {c.spacing_mm} mm, T = {c.total_time:g}, solvers {c.solvers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
