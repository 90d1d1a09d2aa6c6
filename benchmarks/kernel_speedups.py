"""Benchmark: CPU speed-ups of 2026-12-07, each against the code path it replaced.

1. Warping a real scan through a B-spline (an MS-ODE hybrid's deformable stage, laid on the LPS-aligned
   64³ × 4 mm working grid) onto the scan's own 2 mm grid: ``BSplineTransform.transform_grid`` (separable
   sums) against ``transform_points`` of every voxel centre (64 gathers per voxel), the path resampling
   took before.  The whole warp (``warp_volume``) is timed beside SimpleITK's resampler through the same
   transform written as an ITK file.
2. ``box_mean`` (shifted views) against replicate padding + three ``avg_pool3d`` passes, on a
   12-channel 64³ tensor (MIND-SSC's patch distances on the working grid), forward and forward + backward.
3. MIND-SSC's hand-written backward (twelfth session) against autograd through the same forward, for the
   MIND-SSC distance of a 64³ image to a fixed descriptor (the slope MS-ODE takes at every 64³ step).

4. Gaussian anti-aliasing (thirteenth session): ``image.smoothing.discrete_gaussian`` (ITK's kernel, applied in
   torch) against SimpleITK's ``DiscreteGaussian`` itself, as DISA's 2 mm preparation smooths the real chest CT
   (0.70 × 0.70 × 2.5 mm, 512 × 512 × 133) and Kirby21 FLAIR (1.2 × 1 × 1 mm).
5. MS-ODE's rigid warp at 64³ (thirteenth session): the fixed grid's voxel indices mapped to the moving image's
   sampling coordinates by one folded affine map (``msode.warp.rigid_sampling_grid``) against physical points
   mapped by T_θ, then converted (the path it replaced), forward and backward through a MIND-SSC distance.

6. DISA's network in bfloat16 (fourteenth session): one sign-symmetric pass of the shipped weights over the
   chest CT and Kirby21 T1/T2 prepared for the 2 mm grid, ``precision="bfloat16"`` against float32; the maps'
   relative difference is reported, not required to vanish (bfloat16 keeps 8 significant bits).

Each of the first five pairs is checked for equal outputs first (1e-9 mm for the warp points; bit for bit for the box means;
gradients to float rounding for MIND-SSC, whose forward is shared).

    python benchmarks/kernel_speedups.py [--threads 2] [--repeats 5] [--only ROWS] [--json out/kernel_speedups.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEEPMMREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bspline_warp(repeats: int) -> dict:
    import SimpleITK as sitk

    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.msode.grids import working_grid
    from DeepMultimodalRegLib.transforms import BSplineTransform
    from DeepMultimodalRegLib.transforms.bspline import control_grid_for_domain
    from DeepMultimodalRegLib.transforms.itk_io import write_transform
    from DeepMultimodalRegLib.transforms.resample import warp_volume

    scan = read_volume(SHARED / "mr_kirby21_113" / "flair.nii.gz", name="kirby21_flair").float()
    reference = scan.geometry.resampled(2.0)
    control = control_grid_for_domain(working_grid(reference), mesh_size=(8, 8, 8))
    g = torch.Generator().manual_seed(0)
    transform = BSplineTransform(control, 8.0 * torch.randn(1, 3, *control.shape, dtype=torch.float64, generator=g))

    points = reference.physical_grid(dtype=torch.float64)
    per_point = transform.transform_points(points)
    grid = transform.transform_grid(reference)
    difference = float((per_point - grid).abs().max())
    seconds = {
        "per_point_s": best_time(lambda: transform.transform_points(reference.physical_grid(dtype=torch.float64)),
                                 repeats),
        "grid_s": best_time(lambda: transform.transform_grid(reference), repeats),
        # the whole warp (points, then trilinear sampling), as SimpleITK's resampler does it below
        "warp_volume_s": best_time(lambda: warp_volume(scan, transform, reference), repeats),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = write_transform(transform, Path(folder) / "bspline.tfm")
        itk_transform = sitk.ReadTransform(str(path))
        image, ref = scan.to_sitk(), sitk.Image(reference.size_xyz, sitk.sitkFloat32)
        reference.copy_to_sitk(ref)
        seconds["simpleitk_resample_s"] = best_time(
            lambda: sitk.Resample(image, ref, itk_transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32), repeats)
    return {"grid": list(reference.shape), "control_grid": list(control.shape), "max_difference_mm": difference,
            **{k: round(v, 4) for k, v in seconds.items()},
            "speedup": round(seconds["per_point_s"] / seconds["grid_s"], 1)}


def box_means(repeats: int) -> dict:
    from DeepMultimodalRegLib.metrics.local_stats import box_mean

    def pooled(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1,) * 6, mode="replicate")
        x = F.avg_pool3d(x, kernel_size=(3, 1, 1), stride=1)
        x = F.avg_pool3d(x, kernel_size=(1, 3, 1), stride=1)
        return F.avg_pool3d(x, kernel_size=(1, 1, 3), stride=1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 12, 64, 64, 64, generator=g)
    weights = torch.rand(1, 12, 64, 64, 64, generator=g)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    same_values = torch.equal(box_mean(a, 1), pooled(b))
    same_gradients = torch.equal(torch.autograd.grad((box_mean(a, 1) * weights).sum(), a)[0],
                                 torch.autograd.grad((pooled(b) * weights).sum(), b)[0])

    def forward_backward(fn):
        def run():
            v = x.clone().requires_grad_(True)
            torch.autograd.grad((fn(v) * weights).sum(), v)
        return run

    with torch.no_grad():
        forward = {"box_mean_s": best_time(lambda: box_mean(x, 1), repeats),
                   "avg_pool3d_s": best_time(lambda: pooled(x), repeats)}
    both = {"box_mean_s": best_time(forward_backward(lambda v: box_mean(v, 1)), repeats),
            "avg_pool3d_s": best_time(forward_backward(pooled), repeats)}
    return {"shape": list(x.shape), "bit_identical_values": same_values, "bit_identical_gradients": same_gradients,
            "forward": {k: round(v, 4) for k, v in forward.items()},
            "forward_backward": {k: round(v, 4) for k, v in both.items()},
            "speedup_forward": round(forward["avg_pool3d_s"] / forward["box_mean_s"], 1),
            "speedup_forward_backward": round(both["avg_pool3d_s"] / both["box_mean_s"], 1)}


def mind_backward(repeats: int) -> dict:
    from DeepMultimodalRegLib.metrics.mind import _mind_parts, mind_ssc, mind_ssd

    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, 64, 64, 64, generator=g).cumsum(2)  # smooth along one axis, like anatomy
    fixed = mind_ssc(torch.randn(1, 1, 64, 64, 64, generator=g).cumsum(3), 1, 1)
    paths = {"analytic": lambda v: mind_ssc(v, 1, 1), "autograd": lambda v: _mind_parts(v, 1, 1)[0]}

    def gradient(path):
        v = image.clone().requires_grad_(True)
        return torch.autograd.grad(mind_ssd(paths[path](v), fixed), v)[0]

    a, b = gradient("analytic"), gradient("autograd")
    times = {f"{path}_s": best_time(lambda path=path: gradient(path), repeats) for path in paths}
    return {"shape": list(image.shape), "max_relative_gradient_difference": float((a - b).abs().max() / b.abs().max()),
            "forward_backward": {k: round(v, 4) for k, v in times.items()},
            "speedup_forward_backward": round(times["autograd_s"] / times["analytic_s"], 2)}


def antialiasing(repeats: int) -> dict:
    import SimpleITK as sitk

    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.image.smoothing import antialias_variances, discrete_gaussian

    out = {}
    for name, path in (("chest_ct", SHARED / "ct_chest_lidc0001" / "ct.nii.gz"),
                       ("kirby21_flair", SHARED / "mr_kirby21_113" / "flair.nii.gz")):
        scan = read_volume(path, name=name).float()
        variances = antialias_variances(scan.geometry.spacing, 2.0)  # DISA's preparation for its 2 mm grid
        image = scan.to_sitk()
        ours = discrete_gaussian(scan, variances).data
        theirs = torch.from_numpy(sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, variances, 64, 0.01, True)))
        out[name] = {"shape": list(scan.shape), "spacing_mm": [round(v, 4) for v in scan.geometry.spacing],
                     "variance_mm2": [round(v, 4) for v in variances],
                     "max_relative_difference": float((ours - theirs).abs().max() / theirs.abs().max()),
                     "torch_s": round(best_time(lambda: discrete_gaussian(scan, variances), repeats), 4),
                     "simpleitk_s": round(best_time(lambda: sitk.DiscreteGaussian(image, variances, 64, 0.01, True),
                                                    repeats), 4)}
        out[name]["speedup"] = round(out[name]["simpleitk_s"] / out[name]["torch_s"], 2)
    return out


def msode_rigid_warp(repeats: int) -> dict:
    from DeepMultimodalRegLib.image.geometry import ImageGeometry
    from DeepMultimodalRegLib.metrics.mind import mind_ssc, mind_ssd
    from DeepMultimodalRegLib.msode.warp import (apply_homogeneous, grid_points, rigid_homogeneous, rigid_sampling_grid,
                                                 sample_moving, sample_moving_grid)

    fixed_grid = ImageGeometry(shape=(64, 64, 64), spacing=(4.0,) * 3, origin=(-126.0, -130.0, -118.0))
    moving_grid = ImageGeometry(shape=(84, 84, 84), spacing=(4.0,) * 3, origin=(-166.0, -170.0, -158.0))
    g = torch.Generator().manual_seed(2)
    moving = F.avg_pool3d(torch.rand(1, 1, 88, 88, 88, generator=g), 5, 1)
    fixed = mind_ssc(F.avg_pool3d(torch.rand(1, 1, 68, 68, 68, generator=g), 5, 1), 1, 1)
    c_f, c_m = torch.tensor([[2.0, -4.0, 6.0]]), torch.tensor([[-1.0, 3.0, 2.0]])
    theta0 = torch.tensor([[0.3, -0.2, 0.25, 4.0, -3.0, 2.0]])
    points = grid_points(fixed_grid)

    def points_path(th):
        return sample_moving(moving, moving_grid, apply_homogeneous(rigid_homogeneous(th, c_f, c_m), points))

    def folded_path(th):
        return sample_moving_grid(moving, moving_grid, rigid_sampling_grid(th, c_f, c_m, fixed_grid, moving_grid))

    def slope(warp):
        th = theta0.clone().requires_grad_(True)
        return torch.autograd.grad(mind_ssd(mind_ssc(warp(th), 1, 1), fixed), th)[0]

    a, b = slope(folded_path), slope(points_path)
    times = {"folded_s": best_time(lambda: slope(folded_path), repeats),
             "points_s": best_time(lambda: slope(points_path), repeats)}
    return {"grid": list(fixed_grid.shape), "max_warp_difference": float((folded_path(theta0) - points_path(theta0)).abs().max()),
            "max_relative_slope_difference": float((a - b).abs().max() / b.abs().max()),
            "warp_mind_forward_backward": {k: round(v, 4) for k, v in times.items()},
            "speedup": round(times["points_s"] / times["folded_s"], 2)}


def disa_bfloat16(repeats: int) -> dict:
    """One sign-symmetric DISA pass (the shipped weights) over real scans prepared for the 2 mm grid, in float32
    and in bfloat16 (``compute_descriptors(precision=...)``): time and how far the maps differ."""
    from DeepMultimodalRegLib.device import native_bfloat16
    from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa
    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.networks.disa_net import compute_descriptors, load_disa_network

    model = load_disa_network("disa")
    out = {"native_bfloat16": native_bfloat16(torch.device("cpu"))}
    for name, path in (("chest_ct", SHARED / "ct_chest_lidc0001" / "ct.nii.gz"),
                       ("kirby21_t1", SHARED / "mr_kirby21_113" / "t1_mprage.nii.gz"),
                       ("kirby21_t2", SHARED / "mr_kirby21_113" / "t2.nii.gz")):
        prepared = prepare_for_disa(read_volume(path, name=name))

        def run(precision):
            return compute_descriptors(model, prepared, "cpu", sign_symmetric=True, precision=precision)[0]

        full, half = run("float32"), run("bfloat16")
        out[name] = {"grid": list(prepared.shape),
                     "relative_map_difference": float((half - full).norm() / full.norm()),
                     "max_descriptor_difference": float((half - full).norm(dim=0).max()),
                     "float32_s": round(best_time(lambda: run("float32"), repeats), 4),
                     "bfloat16_s": round(best_time(lambda: run("bfloat16"), repeats), 4)}
        out[name]["speedup"] = round(out[name]["float32_s"] / out[name]["bfloat16_s"], 2)
    return out


#: the rows, by the name --only takes
ROWS = {"bspline_warp": bspline_warp, "box_mean": box_means, "mind_backward": mind_backward,
        "antialiasing": antialiasing, "msode_rigid_warp": msode_rigid_warp, "disa_bfloat16": disa_bfloat16}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant (the fastest is kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the record here")
    ap.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to run, from {', '.join(ROWS)}")
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    record = {"benchmark": "CPU speed-ups: B-spline grid warp, box means, MIND-SSC backward, anti-aliasing, "
                           "MS-ODE rigid warp, DISA in bfloat16",
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": args.threads,
                          "load_average_at_start": list(os.getloadavg())}}
    record.update({row: ROWS[row](args.repeats) for row in rows})
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
