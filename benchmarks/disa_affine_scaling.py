"""The affine stage's weighting: scale sweeps and the 5%-scaling case, LC² variance weights vs equal weights.

    python benchmarks/disa_affine_scaling.py                 (≈ 5 min on 2 CPU cores)

Kirby21 subject 113 at 2 mm, fixed T1, moving T2 or FLAIR (co-registered real contrasts).

1. *Scale sweep*: the DISA objective (dot product, the engine's descriptors) of the co-registered
   pair at the isotropic scalings s = 0.97 … 1.05 of the fixed → moving map about the fixed centre,
   with the fixed locations weighted by LC²'s local variance ("variance") and equally wherever the
   image has structure ("support", :func:`DeepMultimodalRegLib.disa.features.support_weights`).
   The truth is s = 1; where each profile peaks is the objective's scale bias.
2. *The 5%-scaling case* of ``Testing/test_disa_registration.py::test_affine_with_5_percent_scaling_recovered``
   (rotation (6°, 3°, −5°), translation (−6, 5, 4) mm, scales (1.05, 0.96, 1.03), moving field of view
   +20 mm), registered by ``disa-affine`` and ``mind-affine`` with each ``affine_weighting``: mean
   error over 3000 brain points and the singular values of the found matrix (truth: 1.05, 1.03, 0.96).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepMultimodalRegLib.disa.features import feature_pair, support_weights  # noqa: E402
from DeepMultimodalRegLib.disa.objective import FeatureObjective  # noqa: E402
from DeepMultimodalRegLib.disa.register import AFFINE_WEIGHTINGS  # noqa: E402
from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy, target_registration_error  # noqa: E402
from DeepMultimodalRegLib.image.io import read_volume  # noqa: E402
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method  # noqa: E402
from DeepMultimodalRegLib.training.scans import default_data_dir  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import AffineTransform, RigidTransform  # noqa: E402
from disa_descriptor import machine_info  # noqa: E402
from disa_optimum_bias import FILES, at_2mm  # noqa: E402

SCALES = (0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05)
#: the unit test's case: rotation (degrees), translation (mm), scales along the fixed axes
CASE_DEG, CASE_MM, CASE_SCALES = (6.0, 3.0, -5.0), (-6.0, 5.0, 4.0), (1.05, 0.96, 1.03)


def scale_sweep(fixed, moving) -> dict:
    center = torch.as_tensor(fixed.geometry.center, dtype=torch.float64)
    params = torch.zeros(len(SCALES), 12, dtype=torch.float64)
    params[:, [0, 4, 8]] = torch.tensor(SCALES, dtype=torch.float64)[:, None]
    scalings = AffineTransform(params, center)
    pair = feature_pair("disa", fixed, moving, torch.device("cpu"))
    out = {}
    for weighting in AFFINE_WEIGHTINGS:
        weighted = pair if weighting == "variance" else dataclasses.replace(pair, weight=support_weights(pair.weight))
        with torch.no_grad():
            values = FeatureObjective(weighted, 12000).value(scalings)
        out[weighting] = {"peak_scale": SCALES[int(values.argmax())], "values": [round(float(v), 5) for v in values]}
    return out


def scaling_case(fixed, other, points) -> dict:
    center = torch.as_tensor(fixed.geometry.center, dtype=torch.float64)
    rigid = RigidTransform(torch.tensor([[math.radians(a) for a in CASE_DEG] + list(CASE_MM)], dtype=torch.float64),
                           center)
    matrix = rigid.homogeneous()[0, :3, :3] @ torch.diag(torch.tensor(CASE_SCALES, dtype=torch.float64))
    truth = AffineTransform.from_matrix(matrix[None], rigid.translation, center)
    moving = misaligned_copy(other, truth, margin_mm=20)
    out = {}
    for method in ("disa-affine", "mind-affine"):
        for weighting in AFFINE_WEIGHTINGS:
            result = get_method(method).runner(fixed, moving, RegistrationOptions(
                search="local", device="cpu", seed=0, extra={"affine_weighting": weighting}))
            error = target_registration_error(result.transform, truth, points)["mean_mm"]
            singular = torch.linalg.svdvals(result.transform.matrix[0])
            out[f"{method} {weighting}"] = {"mean_error_mm": round(error, 3),
                                            "singular_values": [round(float(v), 4) for v in singular]}
            print(f"  {method:12s} {weighting:8s} error {error:.2f} mm, singular values "
                  f"{', '.join(f'{float(v):.3f}' for v in singular)}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contrasts", default="t2,flair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = default_data_dir() / "mr_kirby21_113"
    t1 = at_2mm(read_volume(folder / FILES["t1"]))
    points = foreground_points(t1, 3000, seed=1)  # as the unit test
    record = {"benchmark": "disa_affine_scaling", "machine": machine_info([torch.device("cpu")]),
              "scales": list(SCALES), "case": {"deg": CASE_DEG, "mm": CASE_MM, "scales": CASE_SCALES}, "contrasts": {}}
    for name in args.contrasts.split(","):
        other = at_2mm(read_volume(folder / FILES[name]))
        sweep = scale_sweep(t1, other)  # the co-registered pair as it is: the truth is the identity
        print(f"{name}: scale sweep peaks: " + ", ".join(f"{w} {v['peak_scale']}" for w, v in sweep.items()), flush=True)
        record["contrasts"][name] = {"scale_sweep": sweep, "scaling_case": scaling_case(t1, other, points)}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=float))
    return record


if __name__ == "__main__":
    main()
