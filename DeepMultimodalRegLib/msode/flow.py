"""An untrained B-spline MS-ODE model with ``gradient_input``: a gradient flow on MIND-SSC.

Why: the B-spline models trained on 2 CPU cores (32³ × 8 mm) made real hybrid cases worse, while
the untrained gradient-input model on a 64³ × 4 mm grid, whose body outputs zero so that
dθ/dt = −rate·∂L_sim/∂c, brought held-out Kirby21 hybrid motions from ≈ 4.5 mm after the rigid stage
to ≈ 3 mm (docs/benchmarks.md, "MS-ODE hybrid").  Nothing in it is learned, so it is not shipped as a
model file: while no trained B-spline model ships, ``register --method msode-hybrid|msode-bspline`` without
``--weights`` builds it here (:func:`bspline_flow`, seeded: the same model every time) and says so in its
report.  Written to a file (``python -m DeepMultimodalRegLib.training.msode_flow OUT.pt``), it is what ``--weights FILE``
reads and the starting point for fine-tuning with ``train msode --kind bspline --gradient-input`` at the
same grid.
"""

from __future__ import annotations

import torch

from .model import MSODE, MSODEConfig

#: chosen on the 6 seed-2026 hybrid cases of benchmarks/msode.py (3e5: 3.8 mm, 1e6: 2.9 mm, 3e6: 4.4 mm
#: median RMSE(φ)) and confirmed on 6 fresh seed-11 cases (3.0 mm)
DEFAULT_FLOW_RATE = 1e6
#: the paper's B-spline solvers (section 3.1).  The rate was chosen with F(0.2) at the finest level too;
#: on the 12 cases of both seeds the finest step of 0.25 (one 64³ step fewer) moved each RMSE(φ) by at
#: most 0.05 mm (docs/benchmarks.md, "MS-ODE hybrid")
DEFAULT_FLOW_SOLVERS = "F(0.2)-F(0.2)-F(0.25)"


def bspline_flow(size: int = 64, spacing_mm: float = 4.0, mesh: int = 8, rate: float = DEFAULT_FLOW_RATE,
                 solvers: str = DEFAULT_FLOW_SOLVERS, levels: int = 3, seed: int = 0) -> MSODE:
    """The untrained model (zero body output, unit gain), seeded so the file is reproducible."""
    config = MSODEConfig(kind="bspline", levels=levels, total_time=float(levels), solvers=solvers, size=size,
                         spacing_mm=spacing_mm, mesh=mesh, gradient_input=True, descent_rate=rate)
    config.solver_specs()  # fails early on an unreadable solver string
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        return MSODE(config).eval()
