"""RSO vs ISO on real CTs with a known breathing-like deformation and CBCT-like artefacts (issue 5).

For each case (chest CT LIDC-IDRI-0001, abdomen-pelvis CT):

* fixed  = the CT (resampled to ``--grid-mm``) with CBCT-like artefacts (noise, streaks, shading,
  intensity shift); the clean CT is kept to measure alignment;
* moving = the clean CT warped by a known deformation S: a superior–inferior stretch (breathing),
  a smooth random B-spline field and a local shift (a Gaussian bump); the truth fixed→moving is
  T = S⁻¹ (``invert_displacement``);
* general → ISO(``--iso-short``) [kept] → ISO continued to ``--iso-long`` iterations;
  the box: the ``--box-mm`` cube (mostly inside the body) where ISO(short) leaves the largest mean
  |warped − clean| above what the true transform itself leaves (its resampling floor) — the region
  ISO leaves misaligned, not merely the sharpest edges;
  from ISO(short), each undone before the next: RSO(``--rso``) on the whole image, on a crop of the
  working grid, and on a crop at the finer ``--rso-spacing`` (a residual on the current registration,
  with the session's fine-step similarity: local NCC for this MSE session); ``--fine-similarity
  mse:0.1`` and ``--fine-smoothness`` add the fine crop with other similarities / weights;
* measured in the box: RMSE (HU) between warped moving and clean fixed, and the mean displacement
  error (mm) against the truth, also for the true transform (the floor); wall time per iteration.

Usage: python benchmarks/rso_vs_iso.py [--cases chest,pelvis] [--working-spacing 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from DeepMultimodalRegLib.image.io import read_volume  # noqa: E402
from DeepMultimodalRegLib.rso import DeepRegistrationSession  # noqa: E402
from DeepMultimodalRegLib.rso.demo import cbct_pair, in_box_errors, known_deformation, worst_box  # noqa: E402
from DeepMultimodalRegLib.rso.losses import Similarity  # noqa: E402
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import AffineTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.resample import warp_volume  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CASES = {"chest": "ct_chest_lidc0001/ct.nii.gz", "pelvis": "ct_pelvis_ts/ct.nii.gz"}


def run_case(name: str, args) -> dict:
    ct = read_volume(DATA / CASES[name]).float()
    grid = ct.geometry.resampled(args.grid_mm)
    clean = warp_volume(ct, AffineTransform.identity(), grid, default_value=-1024.0)
    clean = clean.with_data(clean.data.clamp(-1024, 3071))
    clean.name = name
    fixed, moving, truth = cbct_pair(clean, seed=args.seed)
    _, bump = known_deformation(grid, seed=args.seed)
    body = clean.data > -500

    session = DeepRegistrationSession(fixed, moving, device=args.device, seed=args.seed, weights=args.weights,
                                      working_spacing_mm=args.working_spacing)
    out = {"case": name, "grid_mm": args.grid_mm, "working_spacing_mm": session.working_spacing_mm,
           "working_grid": list(session.grid.shape), "bump_centre_mm": [round(float(v), 1) for v in bump]}
    timings = {}

    def timed(label, fn):
        t = time.perf_counter()
        r = fn()
        timings[label] = time.perf_counter() - t
        print(f"  {name}: {label} {timings[label]:.1f} s", flush=True)
        return r

    general = timed("general", session.general)
    iso_short = timed(f"iso{args.iso_short}", lambda: session.iso(args.iso_short))
    from DeepMultimodalRegLib.result import RegistrationResult

    floor = RegistrationResult("truth", truth, warp_volume(moving, truth, grid, default_value=-1024.0), fixed, moving)
    error = (iso_short.warped.data - clean.data).abs() - (floor.warped.data - clean.data).abs()
    box = worst_box(error, body, grid, args.box_mm)
    out["box"] = {"center": [round(c, 1) for c in box.center], "size": list(box.size)}
    iso_long = timed(f"iso{args.iso_long}", lambda: session.iso(args.iso_long - args.iso_short))
    session.undo()
    rso_full = timed("rso_full", lambda: session.rso(box, args.rso, crop=False))
    session.undo()
    rso_crop = timed("rso_crop", lambda: session.rso(box, args.rso, crop=True, spacing_mm=session.working_spacing_mm))
    session.undo()
    rso_fine = timed("rso_fine", lambda: session.rso(box, args.rso, crop=True, spacing_mm=args.rso_spacing))
    extra = {}
    for weight in args.fine_smoothness:  # the fine crop again with other regulariser weights
        session.undo()
        extra[f"fine_smoothness_{weight:g}"] = timed(f"rso_fine_smoothness_{weight:g}", lambda: session.rso(
            box, args.rso, crop=True, spacing_mm=args.rso_spacing, smoothness_weight=weight))
    default_fine = session.fine_similarity
    for kind, weight in args.fine_similarity:  # ... and with other similarities (kind:weight)
        session.undo()
        session.fine_similarity = Similarity(kind)
        try:
            extra[f"fine_{kind}_{weight:g}"] = timed(f"rso_fine_{kind}_{weight:g}", lambda: session.rso(
                box, args.rso, crop=True, spacing_mm=args.rso_spacing, smoothness_weight=weight))
        finally:
            session.fine_similarity = default_fine
    out["fine_similarity"] = {"kind": default_fine.kind, "smoothness_weight": session.fine_smoothness_weight}
    identity = DisplacementFieldTransform.zeros(grid)
    none = RegistrationResult("identity", identity, moving, fixed, moving)
    out["metrics"] = {
        "identity": in_box_errors(none, clean, truth, box),
        "general": in_box_errors(general, clean, truth, box),
        f"iso{args.iso_short}": in_box_errors(iso_short, clean, truth, box),
        f"iso{args.iso_long}": in_box_errors(iso_long, clean, truth, box),
        f"iso{args.iso_short}+rso{args.rso}_full": in_box_errors(rso_full, clean, truth, box),
        f"iso{args.iso_short}+rso{args.rso}_crop": in_box_errors(rso_crop, clean, truth, box),
        f"iso{args.iso_short}+rso{args.rso}_fine": in_box_errors(rso_fine, clean, truth, box),
        **{f"iso{args.iso_short}+rso{args.rso}_{label}": in_box_errors(r, clean, truth, box)
           for label, r in extra.items()},
        "truth (resampling floor)": in_box_errors(floor, clean, truth, box),
    }
    out["rso_spacing_mm"] = rso_fine.figures.get("refine_spacing_mm", session.working_spacing_mm)
    out["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    out["seconds_per_iteration"] = {
        "iso_whole_image": round(timings[f"iso{args.iso_long}"] / (args.iso_long - args.iso_short), 3),
        "rso_full": round(timings["rso_full"] / args.rso, 3), "rso_crop": round(timings["rso_crop"] / args.rso, 3),
        "rso_fine": round(timings["rso_fine"] / args.rso, 3)}
    out["crop_shape"] = rso_crop.figures["crop"]
    out["fine_crop_shape"] = rso_fine.figures["crop"]
    out["working_grid_in_box_loss"] = {  # the loss RSO minimises (vs the CBCT-like fixed, working grid)
        k: [round(r.figures["in_box_loss_before"], 6), round(r.figures["in_box_loss_after"], 6)]
        for k, r in (("rso_full", rso_full), ("rso_crop", rso_crop), ("rso_fine", rso_fine))}
    m = out["metrics"]
    iso_rmse = m[f"iso{args.iso_long}"]["rmse_hu"]
    rso_rmse = m[f"iso{args.iso_short}+rso{args.rso}_full"]["rmse_hu"]
    crop_rmse = m[f"iso{args.iso_short}+rso{args.rso}_crop"]["rmse_hu"]
    fine_rmse = m[f"iso{args.iso_short}+rso{args.rso}_fine"]["rmse_hu"]
    out["targets"] = {
        "rso_fine_rmse_reduction_vs_iso_long": round(1 - fine_rmse / iso_rmse, 3),
        "rso_fine_rmse_vs_full_ratio": round(fine_rmse / rso_rmse, 3),
        "rso_fine_speedup_vs_full": round(timings["rso_full"] / timings["rso_fine"], 2),
        "rso_rmse_reduction_vs_iso_long": round(1 - rso_rmse / iso_rmse, 3),
        "rso_crop_rmse_reduction_vs_iso_long": round(1 - crop_rmse / iso_rmse, 3),
        "crop_vs_full_rmse_ratio": round(crop_rmse / rso_rmse, 3),
        "crop_speedup": round(timings["rso_full"] / timings["rso_crop"], 2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="chest,pelvis")
    p.add_argument("--grid-mm", type=float, default=2.0, help="grid of the fixed image (mm, isotropic)")
    p.add_argument("--working-spacing", type=float, default=6.0, help="the network's working grid (mm)")
    p.add_argument("--iso-short", type=int, default=100)
    p.add_argument("--iso-long", type=int, default=500)
    p.add_argument("--rso", type=int, default=400)
    p.add_argument("--box-mm", type=float, default=48.0)
    p.add_argument("--fine-smoothness", type=lambda t: [float(v) for v in t.split(",")], default=[],
                   help="also run the fine crop with these smoothness weights (comma-separated)")
    p.add_argument("--fine-similarity", type=lambda t: [(v.split(":")[0], float(v.split(":")[1]))
                                                        for v in t.split(",")], default=[],
                   help="also run the fine crop with these similarities and regulariser weights, e.g. mse:0.1")
    p.add_argument("--rso-spacing", type=float, default=None,
                   help="spacing (mm) of the fine RSO crop (default: the session's automatic choice)")
    p.add_argument("--weights", default=None, help="general-model weights (default: the shipped `general`)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python benchmarks/rso_vs_iso.py"] + (argv if argv is not None else sys.argv[1:])),
               "threads": torch.get_num_threads(), "cases": []}
    for name in args.cases.split(","):
        print(f"case {name}", flush=True)
        results["cases"].append(run_case(name.strip(), args))
        print(json.dumps(results["cases"][-1], indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
