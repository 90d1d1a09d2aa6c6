"""Benchmark: resample a 256³ volume with 64 rigid transforms at once (this library, torch) versus
SimpleITK's ResampleImageFilter one transform at a time (its own multithreading on).

Both produce the 64 warped volumes with trilinear interpolation; the torch results are checked
against SimpleITK's on a subset so the comparison is between equal outputs.

    python benchmarks/bench_batched_resampling.py [--size 256] [--transforms 64] [--device auto]

Prints a JSON line with the timings and the ratio; docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.device import describe_device, resolve_device
from DeepMultimodalRegLib.image import Volume
from DeepMultimodalRegLib.transforms import RigidTransform, resample, to_sitk

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEEPMMREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_cube(size: int, data_dir: Path = SHARED) -> Volume:
    """The real Kirby21 T1 resampled to a size³ grid covering its field of view."""
    image = sitk.ReadImage(str(Path(data_dir) / "mr_kirby21_113" / "t1_mprage.nii.gz"), sitk.sitkFloat32)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    spacing = [float(extent.max() / size)] * 3
    center = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(center) - direction @ (np.array(spacing) * (size - 1) / 2)
    cube = sitk.Resample(image, [size] * 3, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(cube, name="kirby21_t1_cube")


def random_rigid(n: int, center, seed: int) -> RigidTransform:
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * np.radians(20)
    shifts = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 30
    return RigidTransform(torch.cat([angles, shifts], 1), torch.as_tensor(center))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--transforms", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = resolve_device(args.device)
    volume = load_cube(args.size)
    transforms = random_rigid(args.transforms, volume.geometry.center, args.seed)
    image = volume.to_sitk()

    # SimpleITK: one by one, the result of each kept only until the next (as a loop over poses would)
    times_sitk = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.transforms):
            out = sitk.Resample(image, image, to_sitk(transforms, i), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        times_sitk.append(time.perf_counter() - start)
    last_sitk = sitk.GetArrayFromImage(out)

    # this library: all transforms in one call on the device (output kept: 64 × 256³ floats)
    data = volume.to(device)
    t = transforms.to(device, torch.float32)
    times_torch = []
    for _ in range(args.repeats + 1):  # first call warms up kernels / caches
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            warped = resample(data, t, volume.geometry)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times_torch.append(time.perf_counter() - start)
    times_torch = times_torch[1:]
    last_torch = warped[-1].cpu().numpy()
    value_range = float(last_sitk.max() - last_sitk.min())
    mad = float(np.abs(last_torch - last_sitk).mean() / value_range)

    result = {
        "benchmark": "batched rigid resampling", "size": args.size, "transforms": args.transforms,
        "device": describe_device(device), "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "simpleitk_one_by_one_s": round(min(times_sitk), 3), "torch_batched_s": round(min(times_torch), 3),
        "speedup_vs_simpleitk": round(min(times_sitk) / min(times_torch), 2),
        "mean_abs_diff_over_range": mad, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch": torch.__version__, "simpleitk": sitk.Version_VersionString(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
