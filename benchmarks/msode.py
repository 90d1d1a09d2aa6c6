"""MS-ODE vs SimpleITK and ANTsPy on held-out real brain MR pairs with the paper's simulated motions.

    python benchmarks/msode.py --cases 2                      (rigid motions; ≈ 12–15 min on 2 busy CPU cores)
    python benchmarks/msode.py --cases 1 --methods msode-rigid  (smoke test)
    python benchmarks/msode.py --motion bspline,hybrid --methods sitk-bspline,ants-syn,msode-hybrid \\
        --bspline-weights out/msode_bspline/msode_bspline.pt     (deformable motions)

**Pairs** — Kirby21 subject 113 (never used to train MS-ODE): FLAIR → T1 and T2 → T1, co-registered
by the data set, each resampled to 2 mm isotropic first (SimpleITK, anti-aliased) so that every
method reads the same, modest volumes.

**Motions** (``--motion rigid,bspline,hybrid``, each with ``--cases`` cases per pair, seeded):

* ``rigid`` — the paper's rigid test, rotations U(−75°, 75°) about each axis and translations
  U(−20, 20) mm per axis, about the fixed image's centre; and the same with rotations U(−25°, 25°),
  the range the shipped CPU-sized model was trained on (``--rotation-deg 75,25``).  The moving
  volume is ``misaligned_copy(contrast, truth, margin_mm=40)``; the fixed is the T1; truth φ = R.
* ``bspline`` — a cubic B-spline B on the fixed grid, 8 intervals per axis (``--bspline-mesh``),
  control-point displacements N(0, (8 mm)²) per component (``--bspline-sigma-mm``), drawn as
  MS-ODE's training motions are (``training/msode_data.py``).  B deforms the **fixed** image,
  fixed(x) = T1(B(x)) (no inverse of B is needed); the moving is the contrast on the same 40 mm
  wider grid; truth φ = B.
* ``hybrid`` — the same B, and a rigid R with rotations U(−40°, 40°) and translations U(−10, 10) mm
  (``--hybrid-rotation-deg``, ``--hybrid-translation-mm``) moving the contrast as for ``rigid``:
  fixed x ↔ moving R(B(x)), truth φ = ``CompositeTransform([R, B])``.

**Measures** — RMSE(φ): the root-mean-square distance ‖estimate(x) − φ(x)‖ between the estimated and
the true fixed → moving maps over 2000 brain voxels of the fixed image (above its median non-zero
value; for deformable motions, of the deformed fixed); success = RMSE(φ) < 2 mm; wall time of the
method call (preparing, solving, warping the full output); MS-ODE's number of function
evaluations; for a two-stage result (rigid or affine, then B-spline / SyN field), also the RMSE(φ) of
its first stage alone (``linear_stage_rmse_mm``); RMSE(x) (``rmse_x``, the paper's): the moving scan warped
by the estimate against it warped by the true map, over the fixed grid, as a fraction of the moving scan's
1st–99th percentile range (every method's transform warped by the library's resampler, outside the timed
call; records before 2026-12-07's thirteenth session lack it).  Kirby21 has no label map, so no Dice.

**Methods** — ``msode-rigid`` with the model's own solvers (the shipped model's: F(0.2)–F(0.2)–F(0.1)–F(0.2))
and with the solvers F(0.25)–F(0.5)–F(1) (``msode-rigid-train-solvers``); ``msode-rigid-global``: the same
model with ``--search global`` (27 starting rotations, ±50° per axis, pruned level by level; not in the
paper; ``msode/multistart.py``);
``msode-bspline`` (``--bspline-weights``) and ``msode-hybrid`` (the rigid model of ``--weights`` then
the B-spline model of ``--hybrid-weights``, else ``--bspline-weights``, else the built-in untrained
gradient flow, ``msode/flow.py``; ``msode-hybrid-global``: its rigid stage with the global search), in the
default list for deformable motions or when weights are given;
``sitk-mattes``: SimpleITK rigid, Mattes MI, 4-2-1 pyramid (``peers/simpleitk_rigid.py``);
``sitk-bspline``: that rigid then a cubic B-spline (≈ 35 mm knots, Mattes MI, L-BFGS-B stopped at 10
iterations per level, 4-2 pyramid; ``peers/simpleitk_bspline.py``); ``ants-rigid`` and ``ants-syn``:
ANTsPy ``Rigid`` and ``SyN`` (affine then SyN, ANTsPy's defaults, reg_iterations 40-20-0), Mattes MI, seeded
(``peers/ants_registration.py``; ``pip install 'deepmultimodalreg[benchmarks]'``, a method that
cannot run is recorded with its error).  Every peer runs with ``--threads`` threads (ITK's, for
ANTs through ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy  # noqa: E402
from DeepMultimodalRegLib.image.io import read_volume  # noqa: E402
from DeepMultimodalRegLib.image.normalize import robust_percentiles  # noqa: E402
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method  # noqa: E402
from DeepMultimodalRegLib.msode.grids import resample_onto  # noqa: E402
from DeepMultimodalRegLib.training.msode_data import MotionSettings, random_rigid  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402
from DeepMultimodalRegLib.transforms.bspline import BSplineTransform, control_grid_for_domain  # noqa: E402
from DeepMultimodalRegLib.transforms.composite import CompositeTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import RigidTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.resample import warp_volume  # noqa: E402

METHODS = ("msode-rigid", "msode-rigid-global", "msode-rigid-train-solvers", "sitk-mattes", "ants-rigid", "sitk-bspline",
           "ants-syn")
#: run by default when B-spline weights are given or the motions are deformable (without weights their
#: B-spline stage is the built-in untrained gradient flow: no trained B-spline model ships yet)
DEFORMABLE_MSODE_METHODS = ("msode-bspline", "msode-hybrid", "msode-hybrid-global")
MOTIONS = ("rigid", "bspline", "hybrid")


def load_pairs(data_dir: Path, spacing: float = 2.0):
    folder = data_dir / "mr_kirby21_113"
    vols = {}
    for name, file in (("t1", "t1_mprage"), ("t2", "t2"), ("flair", "flair")):
        v = read_volume(folder / f"{file}.nii.gz", name=f"kirby21_{name}").float()
        vols[name] = resample_onto(v, v.geometry.resampled(spacing))
        vols[name].name = f"kirby21_{name}"
    return vols["t1"], {"flair": vols["flair"], "t2": vols["t2"]}


def random_truth(fixed, rng: np.random.Generator, max_deg: float = 75.0) -> RigidTransform:
    angles = np.radians(rng.uniform(-max_deg, max_deg, 3))
    shift = rng.uniform(-20, 20, 3)
    return RigidTransform(torch.tensor(np.concatenate([angles, shift]), dtype=torch.float64),
                          torch.tensor(fixed.geometry.center, dtype=torch.float64))


def random_bspline(fixed, generator: torch.Generator, motion: MotionSettings) -> BSplineTransform:
    """MS-ODE's training B-spline motion on the fixed grid: ``mesh`` intervals per axis, N(0, σ²) coefficients."""
    control = control_grid_for_domain(fixed.geometry, mesh_size=(motion.mesh,) * 3)
    coefficients = torch.randn(1, 3, *control.shape, generator=generator, dtype=torch.float64) * motion.bspline_sigma_mm
    return BSplineTransform(control, coefficients)


def make_case(kind: str, fixed, contrast, rng: np.random.Generator, max_deg: float, motion: MotionSettings,
              case: int, fixed_points):
    """(fixed, moving, truth φ: fixed → moving, evaluation points, description) for one case."""
    name = f"{contrast.name}_{kind}{case}"
    if kind == "rigid":
        truth = random_truth(fixed, rng, max_deg)
        return fixed, misaligned_copy(contrast, truth, margin_mm=40.0, name=name), truth, fixed_points, {}
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31 - 1)))
    deformation = random_bspline(fixed, generator, motion)
    deformed = warp_volume(fixed, deformation, fixed.geometry)  # fixed(x) = T1(B(x))
    deformed.name = f"{fixed.name}_{kind}{case}"
    centre = torch.tensor(fixed.geometry.center, dtype=torch.float64)
    if kind == "hybrid":
        rigid = RigidTransform(random_rigid(1, motion, generator).double(), centre)
        truth = CompositeTransform([rigid, deformation])  # x → R(B(x))
    else:
        rigid = RigidTransform.identity(1, center=centre)
        truth = deformation
    moving = misaligned_copy(contrast, rigid, margin_mm=40.0, name=name)
    points = foreground_points(deformed, 2000, seed=0)
    with torch.no_grad():
        b = deformation.displacement(points)[0]
    info = {"truth_bspline_rms_mm": round(float(torch.sqrt((b ** 2).sum(-1).mean())), 2)}
    if kind == "hybrid":
        info.update(truth_deg=[round(math.degrees(v), 1) for v in rigid.parameters[0, :3].tolist()],
                    truth_mm=[round(v, 1) for v in rigid.parameters[0, 3:].tolist()])
    return deformed, moving, truth, points, info


def intensity_scale(moving) -> float:
    """The moving scan's intensity range for RMSE(x): its 1st–99th percentiles over non-zero voxels."""
    low, high = robust_percentiles(moving.data, 1.0, 99.0, moving.data != 0, max_samples=4_000_000)
    return high - low


def intensity_rmse(estimate, ideal: torch.Tensor, moving, fixed_geometry, scale: float) -> float:
    """RMSE(x): the moving scan warped by ``estimate`` against ``ideal`` (it warped by the true map), over
    the fixed grid, as a fraction of the moving scan's intensity range (the paper's RMSE(x), which it
    reports ×10⁻²).  Both from the library's resampler, so every method's estimate is warped alike."""
    with torch.no_grad():
        warped = warp_volume(moving.float(), estimate.to("cpu"), fixed_geometry).data.double()
    return float(torch.sqrt(((warped - ideal) ** 2).mean())) / scale


def rmse(estimate, truth, points) -> float:
    with torch.no_grad():
        a = estimate.select(0).transform_points(points.to(estimate.dtype))[0].double()
        b = truth.select(0).transform_points(points.to(truth.dtype))[0].double()
    return float(torch.sqrt(((a - b) ** 2).sum(-1).mean()))


def run_method(name: str, fixed, moving, args):
    import SimpleITK as sitk

    threads = args.threads
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if name == "sitk-mattes":
        from DeepMultimodalRegLib.peers.simpleitk_rigid import register_rigid_mattes

        return register_rigid_mattes(fixed, moving)
    if name == "sitk-bspline":
        from DeepMultimodalRegLib.peers.simpleitk_bspline import register_rigid_bspline_mattes

        return register_rigid_bspline_mattes(fixed, moving, seed=0)
    if name in ("ants-rigid", "ants-syn"):
        from DeepMultimodalRegLib.peers.ants_registration import register_ants

        return register_ants(fixed, moving, name.split("-", 1)[1], threads=threads, seed=0)
    options = RegistrationOptions(device="cpu")
    if name == "msode-bspline":
        options.extra = {"weights": args.bspline_weights}
        return get_method("msode-bspline").runner(fixed, moving, options)
    if name in ("msode-hybrid", "msode-hybrid-global"):
        options.search = "global" if name.endswith("global") else "local"
        options.extra = {"weights_deformable": args.hybrid_weights or args.bspline_weights}
        if args.weights:
            options.extra["weights_rigid"] = args.weights
        return get_method("msode-hybrid").runner(fixed, moving, options)  # either search
    options.extra = {"weights": args.weights} if args.weights else {}
    if name == "msode-rigid-global":
        options.search = "global"
    if name == "msode-rigid-train-solvers":
        options.extra["solvers"] = "F(0.25)-F(0.5)-F(1.0)"
    return get_method("msode-rigid").runner(fixed, moving, options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=2, help="cases per pair (FLAIR→T1, T2→T1), motion and rotation range")
    p.add_argument("--methods", default=None,
                   help=f"comma list (default: {','.join(METHODS)}, plus msode-bspline / msode-hybrid when "
                        "their weights are given)")
    p.add_argument("--motion", default="rigid", help="comma list of rigid, bspline, hybrid")
    p.add_argument("--weights", help="MS-ODE rigid weights (default: the shipped msode_rigid)")
    p.add_argument("--bspline-weights", help="MS-ODE B-spline weights for msode-bspline and msode-hybrid (default: "
                                             "the built-in untrained gradient flow)")
    p.add_argument("--hybrid-weights", help="MS-ODE B-spline weights for the hybrid's deformable stage "
                                            "(default: --bspline-weights)")
    p.add_argument("--label", default="",
                   help="suffix of the msode-* rows' method names in the records, to tell models apart when the "
                        "records of several invocations are merged with --table (e.g. +gi25)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's allocator as it is (by default freed memory is kept for reuse, as the "
                        "deepmmreg program does; DeepMultimodalRegLib/heap_reuse.py)")
    p.add_argument("--rotation-deg", default="75,25",
                   help="rigid motion: comma-separated rotation ranges U(±r) per axis, each with --cases cases per "
                        "pair (75: the paper's test; 25: the range the shipped CPU-sized model was trained on)")
    p.add_argument("--hybrid-rotation-deg", type=float, default=40.0)
    p.add_argument("--hybrid-translation-mm", type=float, default=10.0)
    p.add_argument("--bspline-sigma-mm", type=float, default=8.0)
    p.add_argument("--bspline-mesh", type=int, default=8, help="B-spline intervals per axis of the true motion")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "msode_benchmark.json",
                   help="the run's records (default out/msode_benchmark.json; a committed record under docs/ "
                        "is only written when named here)")
    p.add_argument("--table", type=Path, nargs="+", metavar="RECORDS",
                   help="print the table of saved records (several files: runs on identical cases, e.g. the "
                        "peers and the MS-ODE rows run apart) and exit")
    args = p.parse_args(argv)
    if args.table:
        records = [r for path in args.table for r in json.loads(path.read_text(encoding="utf-8"))["records"]]
        print(table(records, list(dict.fromkeys(r["method"] for r in records))))
        return 0
    from DeepMultimodalRegLib.heap_reuse import reuse_freed_memory

    # as `deepmmreg` does when run as a program; every method of the run (the peers too) shares the setting
    heap_reuse = False if args.system_malloc else reuse_freed_memory()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))  # ANTs' ITK, read once
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
    else:
        methods = list(METHODS)
    motions = [m for m in args.motion.split(",") if m]
    if not args.methods and (args.bspline_weights or args.hybrid_weights or set(motions) - {"rigid"}):
        methods += list(DEFORMABLE_MSODE_METHODS)
    unknown = [m for m in motions if m not in MOTIONS]
    if unknown:
        p.error(f"unknown motion(s) {unknown}; choose from {', '.join(MOTIONS)}")
    fixed, movings = load_pairs(Path(args.data_dir) if args.data_dir else default_data_dir())
    points = foreground_points(fixed, 2000, seed=0)
    # one generator per motion, each seeded alike: a motion's cases do not depend on which other motions
    # run (rigid cases are those of the earlier rigid-only benchmark; hybrid case k has the B-spline of
    # bspline case k, plus its rigid part)
    rngs = {kind: np.random.default_rng(args.seed) for kind in motions}
    records = []
    run_date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    ranges = [float(r) for r in args.rotation_deg.split(",") if r]
    deformable = MotionSettings(rotation_deg=args.hybrid_rotation_deg, translation_mm=args.hybrid_translation_mm,
                                bspline_sigma_mm=args.bspline_sigma_mm, mesh=args.bspline_mesh)
    plan = []
    for kind in motions:
        kind_ranges = ranges if kind == "rigid" else [args.hybrid_rotation_deg if kind == "hybrid" else 0.0]
        plan += [(kind, r, pc, c) for r in kind_ranges for pc in movings.items() for c in range(args.cases)]
    for kind, max_deg, (pair, contrast), case in plan:
        case_fixed, moving, truth, case_points, info = make_case(kind, fixed, contrast, rngs[kind], max_deg,
                                                                 deformable, case, points)
        identity = RigidTransform.identity(1, center=fixed.geometry.center)
        initial = rmse(identity, truth, case_points)
        with torch.no_grad():  # the ideal result: the moving scan warped by the true map (RMSE(x)'s reference)
            ideal = warp_volume(moving.float(), truth, case_fixed.geometry).data.double()
        scale = intensity_scale(moving)
        for method in methods:
            start = time.perf_counter()
            label = method + args.label if method.startswith("msode") else method
            base = {"motion": kind, "pair": f"{pair}->t1", "case": case, "range_deg": max_deg, "method": label}
            try:
                result = run_method(method, case_fixed, moving, args)
                error = rmse(result.transform, truth, case_points)
                rec = {**base, "initial_rmse_mm": initial,
                       "rmse_mm": error, "success": error < 2.0, "seconds": time.perf_counter() - start,
                       "nfe": result.figures.get("nfe", result.figures.get("nfe_total"))
                       if method.startswith("msode") else None}
                if isinstance(result.transform, CompositeTransform) and len(result.transform.transforms) > 1:
                    # the same map without its last (deformable) part: how much the deformable stage adds
                    linear = CompositeTransform(result.transform.transforms[:-1])
                    rec["linear_stage_rmse_mm"] = rmse(linear, truth, case_points)
                rec["rmse_x"] = intensity_rmse(result.transform, ideal, moving, case_fixed.geometry, scale)
                if kind == "rigid":
                    rec.update(truth_deg=[round(math.degrees(v), 1) for v in truth.parameters[0, :3].tolist()],
                               truth_mm=[round(v, 1) for v in truth.parameters[0, 3:].tolist()])
                rec.update(info)
            except Exception as exc:  # a failing method is a result too
                rec = {**base, "error": repr(exc)[:200]}
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"date": run_date, "cases_per_pair": args.cases, "motions": motions,
                                       "heap_reuse": heap_reuse, "records": records}, indent=1), encoding="utf-8")
            tmp.replace(args.out)
    print(table(records, list(dict.fromkeys(r["method"] for r in records))))
    return 0


def table(records, methods) -> str:
    lines = ["| motion | rotations | method | cases | success (RMSE(φ) < 2 mm) | median RMSE(φ) mm | mean RMSE(φ) mm | "
             "median RMSE(x) ×10⁻² | median initial mm | median time s | median NFE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    motions = [m for m in MOTIONS if any(r.get("motion", "rigid") == m for r in records)]
    for motion in motions:
        of_motion = [r for r in records if r.get("motion", "rigid") == motion]
        for rng in sorted({r.get("range_deg") for r in of_motion}, reverse=True):
            for m in methods:
                rs = [r for r in of_motion if r["method"] == m and "rmse_mm" in r and r.get("range_deg") == rng]
                if not rs:
                    continue
                e = np.array([r["rmse_mm"] for r in rs])
                nfe = [r["nfe"] for r in rs if r.get("nfe") is not None]
                rot = f"±{rng:g}°" if motion != "bspline" else "–"
                rx = [100 * r["rmse_x"] for r in rs if r.get("rmse_x") is not None]  # older records lack it
                lines.append(f"| {motion} | {rot} | {m} | {len(rs)} | {100 * np.mean(e < 2):.0f}% | {np.median(e):.1f} | "
                             f"{np.mean(e):.1f} | {f'{np.median(rx):.2f}' if rx else '–'} | "
                             f"{np.median([r['initial_rmse_mm'] for r in rs]):.1f} | "
                             f"{np.median([r['seconds'] for r in rs]):.1f} | {int(np.median(nfe)) if nfe else '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
