"""Dense deformable DISA vs MIND-SSC on real scans under a known smooth deformation.

``--pair ct`` (default): the LIDC-IDRI-0001 chest CT (body crop, 2 mm; the capture-range benchmark's
loader) is the fixed image and the moving image is its label-synthesised second contrast (random
intensity per label, bias field, noise).  ``--pair t2`` / ``flair``: Kirby21 #113 T1 is the fixed
image and its co-registered T2 / FLAIR the moving one (real contrasts; no labels, so no Dice).  The
moving image is warped by a known smooth random deformation (cubic B-spline, seeded by the case), so
every fixed point x corresponds to the moving point T(x).  Both methods run the same engine
(`disa-deformable`, `mind-deformable`: rigid → affine → dense discrete stage); we report, before and
after: the mean error ‖T̂(x) − T(x)‖ over body/brain points, the mean Dice of the labelled structures
(moving labels warped by T̂ against the fixed labels; CT only), the folding fraction of T̂, and the time.

    python benchmarks/disa_dense_deformable.py [--pair ct|t2|flair] [--cases 2] [--first-case 0]
        [--amplitude-mm 8] [--control-spacing-mm 60] [--dense-descriptor-stride 2|4]
        [--dense-disa-comparison cosine|dot] [--dense smoothing_sigma_mm=16,...] [--out docs/...json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from DeepMultimodalRegLib.disa.register import AFFINE_WEIGHTINGS, DENSE_DESCRIPTOR_STRIDES, DISA_COMPARISONS
from DeepMultimodalRegLib.evaluation import target_registration_error
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method
from DeepMultimodalRegLib.synthetic import invert_displacement, smooth_random_deformation
from DeepMultimodalRegLib.transforms.linear import RigidTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disa_capture_range import CT_CONTRASTS, load_pair  # noqa: E402  (the same pairs as the capture-range benchmark)
from disa_descriptor import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: labelled structures smaller than this (voxels at 2 mm) are left out of the Dice average
MIN_LABEL_VOXELS = 200


def log(message: str) -> None:
    print(f"[disa_dense_deformable {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mean_dice(a: torch.Tensor, b: torch.Tensor, labels: list[int]) -> float:
    scores = []
    for label in labels:
        x, y = a == label, b == label
        denominator = int(x.sum()) + int(y.sum())
        scores.append(2.0 * int((x & y).sum()) / denominator if denominator else 1.0)
    return float(np.mean(scores))


def _percent(value) -> str:
    """A folding percentage, or "n/a" for a linear method (no field, nothing to fold)."""
    return "n/a" if value is None else f"{value:.3f}%"


def _dice_text(before, after) -> str:
    return "" if before is None else f", Dice {before:.3f} → {after:.3f}"


def method_extra(args) -> dict:
    """The engine options the command line sets (each method's own defaults otherwise)."""
    from DeepMultimodalRegLib.disa.dense import DenseSettings

    extra = {"affine_weighting": args.affine_weighting} if args.affine_weighting else {}
    if args.dense_descriptor_stride:
        extra["dense_descriptor_stride"] = args.dense_descriptor_stride
    if args.dense_disa_comparison:
        extra["dense_disa_comparison"] = args.dense_disa_comparison
    if args.disa_comparison:
        extra["disa_comparison"] = args.disa_comparison
    if args.disa_precision:
        extra["disa_precision"] = args.disa_precision
    if args.dense:
        extra["dense"] = DenseSettings(**args.dense).validated()
    return extra


def run_case(pair, case: int, args) -> dict:
    fixed, labels = pair.fixed, pair.labels
    truth = smooth_random_deformation(fixed.geometry, args.amplitude_mm, args.control_spacing_mm, seed=case)
    inverse = invert_displacement(truth)
    contrast = pair.contrast(1000 + case)
    # moving(y) = contrast(T⁻¹(y)): fixed x corresponds to moving T(x)
    moving = warp_volume(contrast, inverse, fixed.geometry)
    moving.name = f"{contrast.name or 'contrast'}_deformed"
    identity = RigidTransform.identity(center=fixed.geometry.center)
    record = {"case": case,
              "before": {"mean_error_mm": target_registration_error(identity, truth, pair.points)["mean_mm"]}}
    moving_labels, present = None, []
    if labels is not None:
        moving_labels = warp_volume(labels.float(), inverse, fixed.geometry, interpolation="nearest")
        present = [int(v) for v in torch.unique(labels.data) if int(v) != 0
                   and int((labels.data == v).sum()) >= MIN_LABEL_VOXELS]
        record["labels_scored"] = len(present)
        record["before"]["dice"] = mean_dice(moving_labels.data.round(), labels.data, present)
    for method in args.methods:
        started = time.perf_counter()
        result = get_method(method).runner(fixed, moving, RegistrationOptions(device=args.device, seed=case,
                                                                               extra=method_extra(args)))
        seconds = time.perf_counter() - started
        row = {"mean_error_mm": target_registration_error(result.transform, truth, pair.points)["mean_mm"],
               "folding_percent": result.figures.get("folding_percent"), "seconds": round(seconds, 1),
               "stages": {h.name: round(h.seconds, 1) for h in result.history}}
        if "disa_precision" in result.figures:
            row["disa_precision"] = result.figures["disa_precision"]
        if moving_labels is not None:
            warped_labels = warp_volume(moving_labels, result.transform, fixed.geometry, interpolation="nearest")
            row["dice"] = mean_dice(warped_labels.data.round(), labels.data, present)
        record[method] = row
        before = record["before"]["mean_error_mm"]
        change = f" ({100 * (row['mean_error_mm'] / before - 1):+.0f}%)" if before > 0 else ""
        log(f"case {case} {method}: error {before:.2f} → {row['mean_error_mm']:.2f} mm{change}"
            f"{_dice_text(record['before'].get('dice'), row.get('dice'))}, "
            f"folding {_percent(row['folding_percent'])}, {seconds:.0f} s")
    return record


def _dense_overrides(text: str) -> dict:
    """``key=value,...`` → DenseSettings fields (numbers; ``thetas`` as ``50/15/5``)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = (tuple(float(v) for v in value.split("/")) if key.strip() == "thetas"
                            else int(value) if value.strip().isdigit() else float(value))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="ct", choices=("ct", "t2", "flair"),
                        help="ct: LIDC chest CT → synthetic contrast; t2/flair: Kirby21 T1 ← T2/FLAIR")
    parser.add_argument("--ct-contrast", choices=CT_CONTRASTS, default=CT_CONTRASTS[0],
                        help="ct: the second contrast, mr-like (air and lung dark) or arbitrary (records before 2026-12-07)")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--first-case", type=int, default=0, help="seed of the first case's deformation")
    parser.add_argument("--amplitude-mm", type=float, default=8.0, help="largest displacement of the known field")
    parser.add_argument("--control-spacing-mm", type=float, default=60.0)
    parser.add_argument("--methods", default="disa-deformable,mind-deformable")
    parser.add_argument("--affine-weighting", choices=AFFINE_WEIGHTINGS, default=None,
                        help="weights of the affine stage (default: each method's own, see disa/register.py)")
    parser.add_argument("--dense-descriptor-stride", type=int, choices=DENSE_DESCRIPTOR_STRIDES, default=None,
                        help="disa-deformable: DISA map of the dense stage (default: the engine's)")
    parser.add_argument("--dense-disa-comparison", choices=DISA_COMPARISONS, default=None,
                        help="disa-deformable: how the dense stage compares descriptors (default: the engine's)")
    parser.add_argument("--disa-comparison", choices=DISA_COMPARISONS, default=None,
                        help="disa-*: how the linear stages compare descriptors (default: the engine's)")
    parser.add_argument("--disa-precision", choices=("auto", "float32", "bfloat16"), default=None,
                        help="disa-*: the network passes' arithmetic (default: the library's, auto)")
    parser.add_argument("--dense", type=_dense_overrides, default=None,
                        help="dense-stage settings, e.g. smoothing_sigma_mm=16,patch_sigma_mm=8 (default: the engine's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / f"disa_dense_deformable_{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    pair = load_pair(args.pair, args.data_dir, points=2000, seed=0, ct_contrast=args.ct_contrast)
    record = {"benchmark": "disa_dense_deformable", "command": " ".join(sys.argv),
              "machine": machine_info([torch.device(args.device)]), "pair": pair.description,
              "deformation": {"amplitude_mm": args.amplitude_mm, "control_spacing_mm": args.control_spacing_mm},
              "options": {k: repr(v) for k, v in method_extra(args).items()}, "cases": []}
    for case in range(args.first_case, args.first_case + args.cases):
        record["cases"].append(run_case(pair, case, args))
        args.out.write_text(json.dumps(record, indent=2))
    for method in ["before"] + args.methods:
        rows = [c[method] for c in record["cases"]]
        dice = [r["dice"] for r in rows if "dice" in r]
        log(f"{method}: mean error {np.mean([r['mean_error_mm'] for r in rows]):.2f} mm"
            + (f", Dice {np.mean(dice):.3f}" if dice else ""))
    return record


if __name__ == "__main__":
    main()
