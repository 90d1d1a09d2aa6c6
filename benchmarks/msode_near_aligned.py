"""MS-ODE rigid on nearly aligned pairs: what the shipped model does alone, and with the runner's guard.

    python benchmarks/msode_near_aligned.py            (≈ 2 min on 2 cores)

Held-out Kirby21 #113 at 2 mm (as ``benchmarks/msode.py`` loads it).  Cases: the co-registered
FLAIR and T2 as they are (truth: the identity), and FLAIR moved by (r, −r, r/2)° and (s, −s, s/2) mm
for (r, s) = (0°, 8 mm), (3°, 0), (15°, 8 mm) on its own grid.  Per case, RMSE(φ) over 2000 T1 brain
voxels of: the centre-of-mass start; ``MSODE.solve`` alone at the end of each level (no guard); that
result after 10/20/30 more Euler steps (0.2) of the 4 mm flow; and the runner (local and global search),
which keeps the start when the result scores worse on MIND-SSC (``kept_start``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msode import load_pairs, rmse  # noqa: E402
from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy  # noqa: E402
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method  # noqa: E402
from DeepMultimodalRegLib.msode.runner import load_model, prepare_pair  # noqa: E402
from DeepMultimodalRegLib.msode.warp import rigid_export  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import RigidTransform  # noqa: E402


def main() -> int:
    torch.set_num_threads(2)
    fixed, movings = load_pairs(default_data_dir())
    points = foreground_points(fixed, 2000, seed=0)
    centre = fixed.geometry.center
    identity = RigidTransform.identity(1, center=centre)
    cases = [(f"{name} as acquired", moving, identity) for name, moving in movings.items()]
    for deg, shift in ((0, 8.0), (3, 0.0), (15, 8.0)):
        p = [math.radians(deg), math.radians(-deg), math.radians(deg / 2), shift, -shift, shift / 2]
        truth = RigidTransform(torch.tensor([p], dtype=torch.float64), centre)
        cases.append((f"flair {deg} deg / {shift:g} mm", misaligned_copy(movings["flair"], truth), truth))
    model = load_model("rigid")
    for name, moving, truth in cases:
        pairs = prepare_pair(fixed, moving, model, "cpu")
        export = lambda th: rmse(rigid_export(th, pairs.c_fixed, pairs.c_moving), truth, points)  # noqa: E731
        with torch.no_grad():
            theta, info, fields = model.solve(pairs)
            levels = [round(export(s), 1) for s in info.segment_end_states]
            more, th = [], theta.clone()
            for step in range(30):
                th = th + 0.2 * fields[-1](torch.tensor(float(model.config.total_time)), th)
                if step % 10 == 9:
                    more.append(round(export(th), 1))
        row = {"start": round(export(torch.zeros_like(theta)), 1), "per level (no guard)": levels,
               "+10/20/30 flow steps": more}
        for search in ("local", "global"):
            result = get_method("msode-rigid").runner(fixed, moving, RegistrationOptions(device="cpu", search=search))
            row[search] = (round(rmse(result.transform, truth, points), 2), bool(result.figures.get("kept_start")))
        print(name, row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
