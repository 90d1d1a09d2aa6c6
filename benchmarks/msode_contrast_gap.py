"""Is MS-ODE's miss on real scans a contrast gap?  The same seeded rigid cases with T1 itself as moving.

    python benchmarks/msode_contrast_gap.py --weights out/msode_r25/msode_rigid.pt --cases 6 \\
        --out docs/msode_contrast_gap_<date>.json

The moving image of ``benchmarks/msode.py``'s rigid cases (Kirby21 #113 at 2 mm, never trained on;
the same seeded motions, ``--rotation-deg`` about the fixed centre, U(±20 mm), 40 mm wider field of
view) is, in turn, the fixed T1 itself, FLAIR and T2.  With T1 → T1 there is no contrast to bridge:
if a model is no better there than across contrasts, what it misses is not the contrast.  Each case
runs the given weights and an untrained model of the same configuration (zero-started output head,
so its pose is MS-ODE's starting point, the centre-of-mass alignment).  RMSE(φ) over 2000 brain
voxels, as in ``benchmarks/msode.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import msode as bench  # noqa: E402  (the benchmark's pairs, cases and RMSE(φ))

from DeepMultimodalRegLib.evaluation import foreground_points  # noqa: E402
from DeepMultimodalRegLib.fileio import atomic_output  # noqa: E402
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method  # noqa: E402
from DeepMultimodalRegLib.msode.model import MSODE  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import RigidTransform  # noqa: E402


def untrained_like(weights: Path, folder: Path) -> Path:
    """A state file of a freshly initialised MSODE with the configuration stored in ``weights``."""
    config = MSODE.from_state_dict(torch.load(weights, map_location="cpu", weights_only=True)).config
    torch.manual_seed(0)
    path = folder / "untrained.pt"
    torch.save(MSODE(config).state_dict_with_config(), path)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="an msode-rigid state file (train msode --kind rigid)")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--rotation-deg", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=2026, help="benchmarks/msode.py's default: the same cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(f"docs/msode_contrast_gap_{datetime.date.today()}.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import DeepMultimodalRegLib.msode  # noqa: F401  (registers msode-*)

    fixed, contrasts = bench.load_pairs(args.data_dir or default_data_dir())
    contrasts = {"t1": fixed, **contrasts}
    points = foreground_points(fixed, 2000, seed=0)
    centre = torch.tensor(fixed.geometry.center, dtype=torch.float64)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"untrained": untrained_like(args.weights, Path(tmp)), "trained": args.weights}
        for name, contrast in contrasts.items():
            rng = np.random.default_rng(args.seed)  # every contrast gets the same motions
            for case in range(args.cases):
                f, moving, truth, pts, _ = bench.make_case("rigid", fixed, contrast, rng, args.rotation_deg,
                                                           bench.MotionSettings(), case, points)
                row = {"moving": name, "case": case,
                       "initial_rmse_mm": bench.rmse(RigidTransform.identity(1, center=centre), truth, pts)}
                for label, weights in models.items():
                    options = RegistrationOptions(device="cpu", extra={"weights": str(weights)})
                    result = get_method("msode-rigid").runner(f, moving, options)
                    row[f"{label}_rmse_mm"] = bench.rmse(result.transform, truth, pts)
                runs.append(row)
                print(f"{name} case {case}: initial {row['initial_rmse_mm']:.1f} mm, untrained "
                      f"{row['untrained_rmse_mm']:.1f} mm, trained {row['trained_rmse_mm']:.1f} mm", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in runs if r["moving"] == name)
                      for key in ("initial_rmse_mm", "untrained_rmse_mm", "trained_rmse_mm")}
               for name in contrasts}
    record = {"benchmark": "MS-ODE rigid: T1 itself vs FLAIR / T2 as moving, same seeded cases",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "date": str(datetime.datetime.now(datetime.timezone.utc)), "runs": runs, "median": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))
    for name, row in summary.items():
        print(f"{name}: median RMSE(φ) initial {row['initial_rmse_mm']:.1f}, untrained {row['untrained_rmse_mm']:.1f}, "
              f"trained {row['trained_rmse_mm']:.1f} mm")
    return record


if __name__ == "__main__":
    main()
