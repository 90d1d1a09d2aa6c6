"""How MS-ODE's global search may prune: the rank, by MIND-SSC after each level, of the best start
that ends under 2 mm, with every start run through every level.

    python benchmarks/msode_multistart_pruning.py --seed 7 --cases 6     (≈ 15 min on 2 cores)

Cases: ``benchmarks/msode.py``'s ±75° rigid cases of ``--seed`` (7 chose ``default_keep``'s 9-5-2-1;
the benchmark's own seed is 2026), ``--cases`` per pair.  For each case: the truth, the final error,
how many of the 27 starts end under 2 mm, and per level (8³, 16³, 32³) the best rank (0 = first) of
those starts.  Pruning after level l is safe when ``keep[l]`` exceeds every case's rank there.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msode import load_pairs, make_case, rmse  # noqa: E402
from DeepMultimodalRegLib.evaluation import foreground_points  # noqa: E402
from DeepMultimodalRegLib.msode.multistart import multistart_solve, rotation_starts  # noqa: E402
from DeepMultimodalRegLib.msode.runner import load_model, prepare_pair  # noqa: E402
from DeepMultimodalRegLib.msode.warp import rigid_export  # noqa: E402
from DeepMultimodalRegLib.training.msode_data import MotionSettings  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cases", type=int, default=6, help="cases per pair (FLAIR→T1, T2→T1)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed, movings = load_pairs(default_data_dir())
    points = foreground_points(fixed, 2000, seed=0)
    rng = np.random.default_rng(args.seed)
    model = load_model("rigid")
    starts = rotation_starts()
    everyone = (starts.shape[0],) * model.config.levels
    for pair, contrast in movings.items():
        for case in range(args.cases):
            f, m, truth, pts, _ = make_case("rigid", fixed, contrast, rng, 75.0, MotionSettings(), case, points)
            pairs = prepare_pair(f, m, model, "cpu")
            with torch.no_grad():
                theta, info = multistart_solve(model, pairs, starts, keep=everyone)
            error = lambda th: rmse(rigid_export(th[None], pairs.c_fixed, pairs.c_moving), truth, pts)  # noqa: E731
            final = {i: error(th) for (i, _), th in zip(info.level_losses[-1], info.level_states[-1])}
            good = {i for i, e in final.items() if e < 2.0}
            ranks = []
            for losses in info.level_losses[:-1]:
                order = [i for i, _ in sorted(losses, key=lambda item: item[1])]
                ranks.append(min((order.index(i) for i in good), default=None))
            print(f"{pair} case {case}: truth {[round(math.degrees(v), 1) for v in truth.parameters[0, :3].tolist()]} deg, "
                  f"chosen {error(theta[0]):.2f} mm, {len(good)}/27 starts end < 2 mm, best rank of those per level "
                  f"{ranks}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
