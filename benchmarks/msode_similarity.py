"""MS-ODE's similarities side by side: profiles against a known rotation on held-out Kirby21 pairs.

    python benchmarks/msode_similarity.py                      (≈ 8 min on 2 busy CPU cores, 1 thread)
    python benchmarks/msode_similarity.py --size 64 --spacing 4   (the MS-ODE model's default grid)

**Pairs** — Kirby21 subject 113 (held out from every MS-ODE and translation training): fixed T1,
moving FLAIR or T2 (co-registered by the data set, so the true pose is the identity), each put on
MS-ODE's working grid (``msode.grids.prepare``; default 48³ voxels of 5 mm, what ``train msode``
uses) — exactly what L_sim sees while MS-ODE trains and registers.

**Profile** — the moving image rotated about the grid centre by α ∈ [−90°, 90°] (10° steps, and
every 1° within ±8°) about each LPS axis in turn (``msode.warp``), and L_sim(warped, fixed) for
``mind`` (MIND-SSC SSD), ``disa`` (shipped DISA descriptors) and ``content`` (the shipped
translation model's content encoder, paper eq. 4, N = 12 stacks).  A good similarity has its
minimum at α = 0 and a wide *basin*: the range of α from which L_sim decreases monotonically
towards its minimum (what a gradient-following optimiser such as MS-ODE can descend); and a
peaked one (the rise of L_sim within ±10°, as a fraction of its range over ±90°: how sharply the
minimum is defined).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepMultimodalRegLib.image.io import read_volume  # noqa: E402
from DeepMultimodalRegLib.msode.grids import prepare  # noqa: E402
from DeepMultimodalRegLib.msode.similarity import SIMILARITIES, similarity_loss  # noqa: E402
from DeepMultimodalRegLib.msode.warp import apply_homogeneous, grid_points, rigid_homogeneous, sample_moving  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402

AXES = ("x (L-R)", "y (P-A)", "z (I-S)")


def rotated(moving: torch.Tensor, geometry, axis: int, degrees: float) -> torch.Tensor:
    theta = torch.zeros(1, 6)
    theta[0, axis] = math.radians(degrees)
    centre = torch.tensor(geometry.center, dtype=torch.float32)[None]
    points = apply_homogeneous(rigid_homogeneous(theta, centre, centre), grid_points(geometry))
    return sample_moving(moving, geometry, points)


def basin(angles: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """The interval around the minimum over which the profile rises monotonically on both sides."""
    k = int(np.argmin(values))
    lo = k
    while lo > 0 and values[lo - 1] > values[lo]:
        lo -= 1
    hi = k
    while hi < len(values) - 1 and values[hi + 1] > values[hi]:
        hi += 1
    return float(angles[lo]), float(angles[hi])


def rise(angles: np.ndarray, values: np.ndarray, at: float = 10.0) -> float:
    """How peaked the profile is about the truth: the mean rise at ±``at``° over the profile's range
    (1: all of the range is reached within ``at``°; near 0: a flat bottom, a vague minimum)."""
    zero = values[int(np.argmin(np.abs(angles)))]
    near = np.mean([values[int(np.argmin(np.abs(angles - a)))] for a in (-at, at)])
    return float((near - zero) / max(values.max() - values.min(), 1e-12))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--spacing", type=float, default=5.0)
    p.add_argument("--similarities", default=",".join(SIMILARITIES))
    p.add_argument("--max-deg", type=float, default=90.0)
    p.add_argument("--step-deg", type=float, default=10.0)
    p.add_argument("--fine-deg", type=float, default=8.0, help="also every 1° within ±this (where the minimum lies)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "msode_similarity_2026-11-21.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = (Path(args.data_dir) if args.data_dir else default_data_dir()) / "mr_kirby21_113"
    prepared = {name: prepare(read_volume(folder / f"{file}.nii.gz").float(), args.size, args.spacing)
                for name, file in (("t1", "t1_mprage"), ("flair", "flair"), ("t2", "t2"))}
    geometry = prepared["t1"].geometry
    fixed = prepared["t1"].data[None, None]
    coarse = np.arange(-args.max_deg, args.max_deg + 1e-9, args.step_deg)
    angles = np.unique(np.concatenate([coarse, np.arange(-args.fine_deg, args.fine_deg + 1e-9, 1.0)]))
    records = []
    for pair in ("flair", "t2"):
        moving = prepared[pair].data[None, None]
        for axis in range(3):
            warped = [rotated(moving, geometry, axis, float(a)) for a in angles]
            for kind in [s for s in args.similarities.split(",") if s]:
                start = time.perf_counter()
                with torch.no_grad():
                    values = np.array([float(similarity_loss(w, fixed, kind, spacing_mm=args.spacing)) for w in warped])
                seconds = (time.perf_counter() - start) / len(angles)
                lo, hi = basin(angles, values)
                rec = {"pair": f"{pair}->t1", "axis": AXES[axis], "similarity": kind,
                       "argmin_deg": float(angles[int(np.argmin(values))]), "basin_deg": [lo, hi],
                       "rise_10deg": rise(angles, values),
                       "seconds_per_evaluation": seconds, "profile": [round(v, 6) for v in values.tolist()]}
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": "2026-11-21", "grid": f"{args.size}^3 x {args.spacing} mm",
                                    "angles_deg": angles.tolist(), "records": records}, indent=1))
    print(table(records))
    return 0


def table(records) -> str:
    lines = ["| similarity | profiles with minimum at 0° (±1°) | median |minimum| ° | median basin width ° | "
             "narrowest basin ° | median rise at ±10° | ms per evaluation |", "|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["similarity"] for r in records):
        rs = [r for r in records if r["similarity"] == kind]
        at_zero = sum(abs(r["argmin_deg"]) <= 1 for r in rs)
        widths = [r["basin_deg"][1] - r["basin_deg"][0] for r in rs]
        lines.append(f"| {kind} | {at_zero}/{len(rs)} | {np.median([abs(r['argmin_deg']) for r in rs]):.0f} | "
                     f"{np.median(widths):.0f} | {min(widths):.0f} | {np.median([r['rise_10deg'] for r in rs]):.2f} | "
                     f"{1000 * np.median([r['seconds_per_evaluation'] for r in rs]):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
