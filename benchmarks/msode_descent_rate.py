"""The descent rate P of MS-ODE's ``gradient_input``: how far the untrained model (a pure gradient
flow on the MIND-SSC distance) gets on synthetic training-style pairs, per candidate rate.

    python benchmarks/msode_descent_rate.py --rates 0,5000,10000,20000,40000
    python benchmarks/msode_descent_rate.py --kind bspline --rates 0,1e4,3e4,1e5,3e5,1e6,2e6,5e6,1e7,2e7,4e7 --solvers "F(0.2)-F(0.2)-F(0.25)"

Pairs: ``training/msode_data.make_batch`` on the recipe's anatomies (voxelmorph T1, MNI152, Colin27)
at 32³ × 8 mm, 3 levels, rotations U(±25°) and translations U(±20 mm) (``--kind bspline``: B-spline
motions, 8 intervals per axis, coefficients N(0, (8 mm)²), the training's), validation-style generator
seed 100000 (the training runs draw from seed 0).  Rate 0 is the centre-of-mass start.  Reported per
rate: median and per-pair RMSE(φ) over the fixed brain, and the count under 2 mm.  Used to pick the
defaults (``MSODEConfig.descent_rate``: 2e4 rigid, 1e5 B-spline, where no rate helped); nothing is trained here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepMultimodalRegLib.msode.model import MSODE, MSODEConfig  # noqa: E402
from DeepMultimodalRegLib.msode.solvers import parse_solvers  # noqa: E402
from DeepMultimodalRegLib.training.msode_data import MotionSettings, load_prepared_anatomies, make_batch  # noqa: E402
from DeepMultimodalRegLib.training.msode_train import mapped_points  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("rigid", "bspline"), default="rigid")
    p.add_argument("--rates", default="0,5000,10000,20000,40000", help="comma list; 0 = no flow (the start)")
    p.add_argument("--rotation-deg", type=float, default=25.0)
    p.add_argument("--solvers", default="F(0.1)-F(0.1)-F(0.1)")
    p.add_argument("--batches", type=int, default=3, help="batches of 4 pairs")
    p.add_argument("--cache", type=Path, default=ROOT / "out" / "msode_prepared_32x8")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    anatomies = load_prepared_anatomies(None, 32, 8.0, args.cache)
    generator = torch.Generator().manual_seed(100_000)
    motion = MotionSettings(args.rotation_deg, 20.0)
    batches = [make_batch(anatomies, args.kind, 4, 3, motion, generator, 0.25) for _ in range(args.batches)]
    solvers = parse_solvers(args.solvers)
    for rate in (float(r) for r in args.rates.split(",") if r):
        config = MSODEConfig(kind=args.kind, size=32, spacing_mm=8.0, gradient_input=rate > 0,
                             descent_rate=rate if rate > 0 else 1.0)
        torch.manual_seed(0)
        model = MSODE(config).eval()
        errors = []
        with torch.no_grad():
            for batch in batches:
                theta, _, fields = model.solve(batch.pairs, solvers=solvers)
                points, _ = mapped_points(model, fields, theta)
                sq = ((points - batch.truth_points) ** 2).sum(-1) * batch.weight
                errors += (sq.flatten(1).sum(1) / batch.weight.flatten(1).sum(1)).sqrt().tolist()
        e = torch.tensor(errors)
        print(f"rate {rate:g}: median RMSE(phi) {float(e.median()):.2f} mm, {int((e < 2).sum())}/{len(e)} under 2 mm, "
              f"per pair {[round(v, 1) for v in errors]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
