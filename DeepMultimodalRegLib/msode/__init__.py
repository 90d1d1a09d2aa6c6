"""MS-ODE: a learned registration optimiser as a multi-scale neural ODE (Xu et al., MICCAI 2021).

dθ/dt = f^(l)(x_moving ∘ φ_θ, x_fixed, t) is integrated with torchdiffeq over [0, T], segment l of
L at pyramid level l with its own network (:mod:`.dynamics`, :mod:`.model`), for rigid, B-spline
and dense parameterisations (:mod:`.networks`, :mod:`.warp`); hybrid = rigid then B-spline.

Importing this package registers ``msode-rigid|bspline|dense|hybrid`` in the method catalogue.
"""

from functools import partial

from ..methods.registry import register_method
from .dynamics import SolveInfo, integrate_multiscale
from .model import MSODE, MSODEConfig, PairBatch
from .runner import load_model, run_msode
from .solvers import PAPER_SOLVERS, SolverSpec, parse_solvers

for _kind in ("rigid", "bspline", "dense", "hybrid"):
    register_method(f"msode-{_kind}", partial(run_msode, _kind))

__all__ = ["MSODE", "MSODEConfig", "PairBatch", "SolveInfo", "SolverSpec", "PAPER_SOLVERS", "integrate_multiscale",
           "parse_solvers", "load_model", "run_msode"]
