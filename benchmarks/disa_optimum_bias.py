"""Where the similarity's optimum sits: local registration started *at* the known pose.

    python benchmarks/disa_optimum_bias.py                       (≈ 3 min on 2 CPU cores)
    python benchmarks/disa_optimum_bias.py --disa-weights out/run/disa.pt   (candidate weights)

A search that starts at the true pose can only leave it if the similarity is higher elsewhere, so
the final error measures the bias of the objective itself — not the capture range, the global
search or the optimiser's convergence.  Kirby21 subject 113 at 2 mm: fixed T1; moving T1 (the same
image: any error is the objective's own), T2 and FLAIR (co-registered real contrasts), each moved
by known rigid transforms (a pure translation, 10° and 35° rotations) with the moving field of view
widened by ``--margin-mm``.  Error = mean distance over 3000 brain points between the found and the
true transform (``evaluation.target_registration_error``), and the mean displacement between them
(found − true, LPS mm).  ``--directions forward,reverse`` also swaps the roles (fixed = the other
contrast, moving = T1 under the same transform): a bias of the objective's own asymmetry (weights
from the fixed image only) keeps its sign when the roles swap, while a displacement of one
contrast's descriptors against the other's flips it.  Methods: ``disa-rigid`` and
``mind-rigid`` (the same engine, MIND-SSC features), local search, ``initial`` = the truth;
``disa-rigid-raw`` is ``disa-rigid`` on the raw network output instead of the sign-symmetric
descriptors the engine uses by default (``disa_sign_symmetric=False``); ``METHOD+R`` runs METHOD with
``refine=R`` (e.g. ``disa-rigid+disa``: the polish on the moving image resampled at the found pose);
a plain ``disa-*`` method runs with ``refine="none"`` (the objective's own optimum, which is what this
benchmark measures; the library polishes by default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy, target_registration_error  # noqa: E402
from DeepMultimodalRegLib.image.io import read_volume  # noqa: E402
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import RigidTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.resample import warp_volume  # noqa: E402
from disa_capture_range import candidate_disa_network  # noqa: E402
from disa_descriptor import machine_info  # noqa: E402

#: (rotation degrees about x, y, z; translation mm) of the known transforms
TRUTHS = (((0.0, 0.0, 0.0), (9.0, -8.0, 9.0)), ((10.0, -4.0, 3.0), (9.0, -8.0, 9.0)),
          ((-35.0, 20.0, 15.0), (5.0, 10.0, -8.0)))
FILES = {"t1": "t1_mprage.nii.gz", "t2": "t2.nii.gz", "flair": "flair.nii.gz"}


def at_2mm(volume):
    return warp_volume(volume.float(), RigidTransform.identity(), volume.geometry.resampled(2.0))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moving", default="t1,t2,flair", help="moving contrasts, from t1, t2, flair")
    ap.add_argument("--methods", default="disa-rigid,disa-rigid-raw,mind-rigid")
    ap.add_argument("--disa-weights", type=Path, default=None, help="a DISA state_dict instead of the shipped one")
    ap.add_argument("--directions", default="forward", help="forward (fixed T1), reverse (moving T1), or both")
    ap.add_argument("--margin-mm", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import DeepMultimodalRegLib.disa  # noqa: F401  (registers disa-*, mind-*)

    folder = (args.data_dir or default_data_dir()) / "mr_kirby21_113"
    t1 = at_2mm(read_volume(folder / FILES["t1"]))
    points = foreground_points(t1, 3000, seed=1)
    centre = torch.as_tensor(t1.geometry.center)
    model = candidate_disa_network(args.disa_weights, "cpu") if args.disa_weights else None
    rows = []
    for name, direction in [(n, d) for n in args.moving.split(",") for d in args.directions.split(",")]:
        contrast = t1 if name == "t1" else at_2mm(read_volume(folder / FILES[name]))
        fixed, moved = (t1, contrast) if direction == "forward" else (contrast, t1)
        for degrees, mm in TRUTHS:
            truth = RigidTransform(torch.tensor([[math.radians(a) for a in degrees] + list(mm)], dtype=torch.float64),
                                   centre)
            moving = misaligned_copy(moved, truth, margin_mm=args.margin_mm)
            for method in args.methods.split(","):
                extra = {"initial": truth}
                if model is not None and method.startswith("disa"):
                    extra["model"] = model
                library_method, _, refine = method.removesuffix("-raw").partition("+")
                if method.endswith("-raw"):
                    extra["disa_sign_symmetric"] = False
                if method.startswith("disa"):  # e.g. disa-rigid+disa: the library's refine option; plain: none
                    extra["refine"] = refine or "none"
                start = time.perf_counter()
                result = get_method(library_method).runner(fixed, moving, RegistrationOptions(search="local", device="cpu",
                                                                                      seed=0, extra=extra))
                error = target_registration_error(result.transform, truth, points)["mean_mm"]
                shift = (result.transform.transform_points(points.double()) - truth.transform_points(points.double()))
                shift = [round(float(v), 3) for v in shift.reshape(-1, 3).mean(0)]
                rows.append({"moving": name, "direction": direction, "rotation_deg": degrees, "translation_mm": mm,
                             "method": method, "error_from_truth_mm": error, "mean_displacement_mm": shift,
                             "seconds": time.perf_counter() - start})
                print(f"{name:5s} {direction:7s} rot {degrees} {method:14s} optimum {error:.2f} mm from the truth, "
                      f"mean displacement {shift} mm", flush=True)
    record = {"benchmark": "distance of the similarity optimum from the truth (local search started at the truth)",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine_info([torch.device("cpu")]), "rows": rows}
    if args.disa_weights:
        import hashlib

        record["disa_weights_sha256"] = hashlib.sha256(args.disa_weights.read_bytes()).hexdigest()
    print("\n| moving | method | " + " | ".join(f"{d[0]:g}°/{d[1]:g}°/{d[2]:g}°" for d, _ in TRUTHS) + " |")
    print("|---|---|" + "---|" * len(TRUTHS))
    for name in args.moving.split(","):
        for direction in args.directions.split(","):
            for method in args.methods.split(","):
                cells = [f"{r['error_from_truth_mm']:.2f}" for r in rows
                         if r["moving"] == name and r["method"] == method and r["direction"] == direction]
                label = name if direction == "forward" else f"{name} (reverse: fixed {name}, moving t1)"
                print(f"| {label} | {method} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
