"""Write the untrained B-spline gradient flow (:mod:`DeepMultimodalRegLib.msode.flow`) to a model file.

    python -m DeepMultimodalRegLib.training.msode_flow OUT.pt [--size 64] [--spacing 4] [--mesh 8] \\
        [--rate 1e6] [--solvers "F(0.2)-F(0.2)-F(0.25)"]

The file is what ``register --method msode-hybrid|msode-bspline --weights FILE`` reads (without
``--weights`` the same model is built in memory) and the start for fine-tuning with ``train msode --kind
bspline --gradient-input`` at the same grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..fileio import atomic_output
from ..msode.flow import DEFAULT_FLOW_RATE, DEFAULT_FLOW_SOLVERS, bspline_flow


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64, help="working grid voxels per axis (default 64)")
    p.add_argument("--spacing", type=float, default=4.0, help="working grid spacing in mm (default 4)")
    p.add_argument("--mesh", type=int, default=8, help="B-spline intervals per axis (default 8: 32 mm knots at 64 x 4 mm)")
    p.add_argument("--rate", type=float, default=DEFAULT_FLOW_RATE, help="descent rate P (default 1e6)")
    p.add_argument("--solvers", default=DEFAULT_FLOW_SOLVERS,
                   help=f"Euler steps per level, coarse to fine (default {DEFAULT_FLOW_SOLVERS}, the paper's B-spline setting)")
    args = p.parse_args(argv)
    model = bspline_flow(args.size, args.spacing, args.mesh, args.rate, args.solvers)
    with atomic_output(args.out) as tmp:
        torch.save(model.state_dict_with_config(), tmp)
    c = model.config
    print(f"{args.out}: untrained B-spline gradient flow, {c.size}^3 x {c.spacing_mm} mm, mesh {c.mesh}, "
          f"rate {c.descent_rate:g}, solvers {c.solvers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
