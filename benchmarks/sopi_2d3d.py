"""2D/3D registration on realistic simulated X-rays of real CTs: SOPI, SOPI+opt and the optimisation baselines.

For each real CT of ../shared/data (chest: LIDC-IDRI-0001; abdomen-pelvis: TotalSegmentator) and
each case, a true pose is drawn from the SOPI paper's distribution about the nominal AP view —
rotations N(0, 20°) about each axis, translations tx (along the beam) N(0, 100), ty N(0, 30),
tz N(0, 15) mm — re-drawn while it puts the CT's box within 150 mm of the source, through the
detector plane, or more than half off the detector.
The X-ray is simulated at that pose with :func:`DeepMultimodalRegLib.sopi.simulate.simulate_xray`
(another attenuation model with boosted bone, Poisson noise at 2·10⁴ photons, 0.8 px blur,
gamma 0.7, 12-bit), on the paper's detector reduced to ``--size`` pixels.  Each method then
registers from the nominal pose (θ = 0) with its default settings (``OptimizerSettings``; the same
code path for opt-gc, opt-ncc, opt-ngi), as ``deepmmreg register2d3d`` would.

Reported per method: mean rotation error (°, angle of R_est·R_trueᵀ), mean translation error (mm,
distance of the CT centre in the C-arm frame), failure rate (rotation > 3° or translation > 3 mm,
the paper's criterion), mean time.

SOPI and SOPI+opt need per-patient networks (``deepmmreg train sopi``), given per CT with
``--model chest=MODEL_DIR``; they run only on the CTs that have one.  SOPI registers from its RTPI
pose (the ``rtpi`` rows are that start on its own); SOPI+opt refines SOPI's pose with opt-gc (its
default search, centred on SOPI's pose instead of the nominal view), and its time includes SOPI's.
The model is loaded once per CT, outside the timing (as the baselines' settings are).

    .venv/bin/python benchmarks/sopi_2d3d.py --cases 4 --size 128 --threads 1 --json out/sopi_2d3d.json
    .venv/bin/python benchmarks/sopi_2d3d.py --cts chest --model chest=MODEL_DIR --cases 10 --json out/sopi.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from DeepMultimodalRegLib.image import read_volume  # noqa: E402
from DeepMultimodalRegLib.sopi.drr import DRRProjector  # noqa: E402
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry  # noqa: E402
from DeepMultimodalRegLib.sopi.learned import run_sopi  # noqa: E402
from DeepMultimodalRegLib.sopi.model_dir import load_model_dir  # noqa: E402
from DeepMultimodalRegLib.sopi.optimize import OptimizerSettings, coarsen_ct, optimize_pose  # noqa: E402
from DeepMultimodalRegLib.sopi.pose import pose_errors  # noqa: E402
from DeepMultimodalRegLib.sopi.simulate import simulate_xray  # noqa: E402
from DeepMultimodalRegLib.training.sopi_data import plausible_poses  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CTS = {"chest": DATA / "ct_chest_lidc0001" / "ct.nii.gz", "pelvis": DATA / "ct_pelvis_ts" / "ct.nii.gz"}
PAPER_SIGMA = np.array([20.0, 20.0, 20.0, 100.0, 30.0, 15.0])


def draw_pose(rng, projector: DRRProjector, min_source_mm: float = 150.0) -> np.ndarray:
    """A pose from the paper's distribution, re-drawn until plausible (the training sampler's rule)."""
    while True:
        pose = rng.normal(0.0, PAPER_SIGMA)
        if bool(plausible_poses(projector, torch.as_tensor(pose)[None], min_source_mm)[0]):
            return pose


def record(name, case, method, truth, found, seconds, **extra) -> dict:
    rot, trans = pose_errors(found, truth)
    start_rot, start_trans = pose_errors(np.zeros(6), truth)
    rec = {"ct": name, "case": case, "method": method, "truth": truth.round(3).tolist(),
           "found": np.round(found, 3).tolist(), "rotation_error_deg": float(rot[0]),
           "translation_error_mm": float(trans[0]), "start_rotation_deg": float(start_rot[0]),
           "start_translation_mm": float(start_trans[0]), "seconds": seconds, **extra}
    print(f"{name:<7} case {case} {method:<8} start {start_rot[0]:5.1f}° {start_trans[0]:6.1f} mm → "
          f"error {rot[0]:6.2f}° {trans[0]:7.2f} mm  {seconds:5.1f} s", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4, help="cases per CT")
    ap.add_argument("--size", type=int, default=128, help="simulated X-ray detector pixels per side (paper: 256)")
    ap.add_argument("--methods", default="opt-gc,opt-ncc,opt-ngi,sopi,sopi+opt")
    ap.add_argument("--cts", default="chest,pelvis")
    ap.add_argument("--model", action="append", default=[], metavar="CT=DIR",
                    help="per-patient SOPI model folder for a CT, e.g. chest=out/sopi_chest (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    models = dict(m.split("=", 1) for m in args.model)
    geometry = CarmGeometry().resized(args.size)
    settings = OptimizerSettings()
    records = []
    t_all = time.perf_counter()
    for ct_index, name in enumerate(args.cts.split(",")):
        ct = read_volume(CTS[name]).float()
        rng = np.random.default_rng(args.seed + 1000 * ct_index)
        sim_ct = coarsen_ct(ct, 1.0)  # simulate from the CT at ≤ 1 mm in-plane
        probe = DRRProjector(coarsen_ct(ct, 4.0), geometry)
        model = load_model_dir(models[name], ct, geometry) if name in models else None
        for case in range(args.cases):
            truth = draw_pose(rng, probe)
            xray = simulate_xray(sim_ct, geometry, truth, seed=int(rng.integers(1 << 31)))
            case_settings = OptimizerSettings(**{**vars(settings), "seed": args.seed + case})
            sopi = None
            for method in methods:
                if method.startswith("sopi"):
                    if model is None:
                        continue
                    if sopi is None:
                        t0 = time.perf_counter()
                        sopi = run_sopi(model, ct, xray)
                        sopi_seconds = time.perf_counter() - t0
                        records.append(record(name, case, "rtpi", truth, sopi.rtpi_pose, sopi.seconds_rtpi))
                    if method == "sopi":
                        records.append(record(name, case, method, truth, sopi.pose, sopi_seconds,
                                              rtpi_seconds=sopi.seconds_rtpi, fine_seconds=sopi.seconds_fine))
                        continue
                    t0 = time.perf_counter()
                    res = optimize_pose(ct, xray, geometry, "opt-gc", init_pose=sopi.pose, settings=case_settings)
                    records.append(record(name, case, method, truth, res.pose, sopi_seconds + time.perf_counter() - t0,
                                          similarity=res.similarity, evaluations=res.evaluations))
                    continue
                t0 = time.perf_counter()
                res = optimize_pose(ct, xray, geometry, method, init_pose=np.zeros(6), settings=case_settings)
                records.append(record(name, case, method, truth, res.pose, time.perf_counter() - t0,
                                      similarity=res.similarity, evaluations=res.evaluations))
    methods = [m for m in ["rtpi"] + methods if any(r["method"] == m for r in records)]
    summary = {}
    for method in methods:
        rs = [r for r in records if r["method"] == method]
        fail = [r["rotation_error_deg"] > 3 or r["translation_error_mm"] > 3 for r in rs]
        summary[method] = {"cases": len(rs),
                           "rotation_error_deg": float(np.mean([r["rotation_error_deg"] for r in rs])),
                           "translation_error_mm": float(np.mean([r["translation_error_mm"] for r in rs])),
                           "median_rotation_error_deg": float(np.median([r["rotation_error_deg"] for r in rs])),
                           "median_translation_error_mm": float(np.median([r["translation_error_mm"] for r in rs])),
                           "failure_rate": float(np.mean(fail)),
                           "seconds": float(np.mean([r["seconds"] for r in rs]))}
    print(f"\n{'method':<9} {'cases':>5} {'rot °':>8} {'trans mm':>9} {'median °':>9} {'median mm':>10} "
          f"{'failures':>9} {'time s':>7}")
    for method, s in summary.items():
        if method == "ratios":
            continue
        print(f"{method:<9} {s['cases']:>5} {s['rotation_error_deg']:8.2f} {s['translation_error_mm']:9.2f} "
              f"{s['median_rotation_error_deg']:9.2f} {s['median_translation_error_mm']:10.2f} "
              f"{100 * s['failure_rate']:8.0f}% {s['seconds']:7.1f}")
    baselines = {m: s for m, s in summary.items() if m.startswith("opt-")}
    if baselines and "sopi" in summary:
        best = min(baselines, key=lambda m: (baselines[m]["failure_rate"], baselines[m]["seconds"]))
        summary["ratios"] = {"best_baseline": best,
                             "sopi_speedup": baselines[best]["seconds"] / summary["sopi"]["seconds"],
                             "sopi_opt_speedup": baselines[best]["seconds"] / summary["sopi+opt"]["seconds"]
                             if "sopi+opt" in summary else None}
        print(f"SOPI is {summary['ratios']['sopi_speedup']:.1f}× faster than the best optimisation baseline ({best})")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "records": records, "size": args.size, "models": models,
                                         "threads": args.threads, "settings": vars(settings),
                                         "torch": torch.__version__, "python": platform.python_version(),
                                         "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
