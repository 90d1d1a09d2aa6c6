#!/usr/bin/env python
"""Regenerate the small sample volumes shipped in ``Resources/SampleData``.

The volumes are derived from real public scans kept outside the product in
``../shared/data`` (relative to the repository root); see ``LICENSES.md`` in this
folder for sources, processing and licences, and ``README.md`` for the file table.

Processing (deterministic; re-running overwrites the outputs with identical data):

* Intensity images are smoothed with a Gaussian of sigma = half the new spacing
  (in mm, per axis) before linear resampling, to avoid aliasing.
* Label maps are resampled with nearest neighbour, so no new ids appear.
* The new grid covers the same physical extent as the source (voxel edges aligned
  at the origin corner), with the same direction matrix.
* Kirby21 MR contrasts are scaled linearly (0 stays 0) so that the 99.9th
  percentile of the source foreground (voxels > 0) maps to 3000; negative source
  values (a few interpolation undershoots) are set to 0 first.
* CT stays in Hounsfield units, clipped to [-1024, 3071].
* Intensity images are written as int16, label maps as uint8, compressed NIfTI.

Usage::

    python Resources/SampleData/make_sample_data.py [--data-dir PATH] [--out-dir PATH]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SCRIPT_DIR = Path(__file__).resolve().parent
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / ".." / "shared" / "data"

MR_SPACING_MM = 2.0
CT_CHEST_SPACING_MM = 3.0
MR_TARGET_P999 = 3000.0
MR_PERCENTILE = 99.9
CT_MIN_HU, CT_MAX_HU = -1024.0, 3071.0
INT16_MIN, INT16_MAX = -32768.0, 32767.0


# --------------------------------------------------------------------------- geometry

def target_grid(image: sitk.Image, new_spacing: float) -> dict:
    """Grid with isotropic ``new_spacing`` covering the same physical extent as ``image``.

    The outer voxel edge at the origin corner is kept; the number of voxels per axis is
    the source extent divided by the new spacing, rounded up (so the grid covers the
    whole source extent, with a 0.001-voxel tolerance for float32 spacings such as
    1.2000000477; at most one partial voxel at the far end).
    """
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    old_size = np.array(image.GetSize(), dtype=float)
    spacing = np.full(image.GetDimension(), float(new_spacing))
    extent = old_size * old_spacing
    size = [max(1, int(math.ceil(e / s - 1e-3))) for e, s in zip(extent, spacing)]
    direction = np.array(image.GetDirection(), dtype=float).reshape(image.GetDimension(), -1)
    # First voxel centre moves by half the difference of spacings along each axis.
    origin = np.array(image.GetOrigin(), dtype=float) + direction @ ((spacing - old_spacing) / 2.0)
    return {
        "size": size,
        "spacing": tuple(float(s) for s in spacing),
        "origin": tuple(float(o) for o in origin),
        "direction": tuple(float(d) for d in direction.ravel()),
    }


def resample(image: sitk.Image, grid: dict, interpolator, default_value: float) -> sitk.Image:
    return sitk.Resample(
        image,
        grid["size"],
        sitk.Transform(),
        interpolator,
        grid["origin"],
        grid["spacing"],
        grid["direction"],
        float(default_value),
        image.GetPixelID(),
    )


def downsample_intensity(image: sitk.Image, new_spacing: float, background: float) -> sitk.Image:
    """Gaussian anti-aliasing (sigma = new_spacing / 2 mm per axis) then linear resampling."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    sigma = [new_spacing / 2.0] * image.GetDimension()
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma)
    return resample(smoothed, target_grid(image, new_spacing), sitk.sitkLinear, background)


def downsample_labels(labels: sitk.Image, new_spacing: float) -> sitk.Image:
    return resample(labels, target_grid(labels, new_spacing), sitk.sitkNearestNeighbor, 0)


# --------------------------------------------------------------------------- casting

def to_int16(float_array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    arr = np.clip(np.rint(float_array), INT16_MIN, INT16_MAX).astype(np.int16)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(reference)
    return out


def labels_to_compact_type(labels: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.min() < 0:
        raise ValueError("negative label ids")
    pixel = sitk.sitkUInt8 if arr.max() < 256 else sitk.sitkInt16
    return sitk.Cast(labels, pixel)


def write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)
    print(f"wrote {path.name}")


# --------------------------------------------------------------------------- products

def make_mr_brain(data_dir: Path, out_dir: Path) -> None:
    src = data_dir / "mr_kirby21_113"
    contrasts = {"t1": "t1_mprage.nii.gz", "t2": "t2.nii.gz", "flair": "flair.nii.gz"}
    reference_grid = None
    for name, filename in contrasts.items():
        image = sitk.ReadImage(str(src / filename), sitk.sitkFloat32)
        # Same physical grid for all three (the source contrasts are co-registered).
        grid = target_grid(image, MR_SPACING_MM)
        if reference_grid is None:
            reference_grid = grid
        elif grid != reference_grid:
            raise RuntimeError(f"{filename}: source grid differs from the T1 grid")

        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        arr[arr < 0] = 0.0  # rare interpolation undershoots in the processed source
        p999 = float(np.percentile(arr[arr > 0], MR_PERCENTILE))
        scale = MR_TARGET_P999 / p999
        clean = sitk.GetImageFromArray(arr.astype(np.float32))
        clean.CopyInformation(image)

        small = downsample_intensity(clean, MR_SPACING_MM, background=0.0)
        scaled = sitk.GetArrayFromImage(small).astype(np.float64) * scale
        scaled[scaled < 0] = 0.0
        out = to_int16(scaled, small)
        print(f"  {name}: source p{MR_PERCENTILE} = {p999:.6g}, scale = {scale:.6g}")
        write(out, out_dir / f"mr_brain_{name}.nii.gz")


def make_ct_chest(data_dir: Path, out_dir: Path) -> None:
    src = data_dir / "ct_chest_lidc0001"
    ct = sitk.ReadImage(str(src / "ct.nii.gz"), sitk.sitkFloat32)
    # Clip first so the -2048 outside-field-of-view padding does not bleed when smoothing.
    ct = sitk.Clamp(ct, sitk.sitkFloat32, CT_MIN_HU, CT_MAX_HU)
    small = downsample_intensity(ct, CT_CHEST_SPACING_MM, background=CT_MIN_HU)
    arr = np.clip(sitk.GetArrayFromImage(small).astype(np.float64), CT_MIN_HU, CT_MAX_HU)
    write(to_int16(arr, small), out_dir / "ct_chest.nii.gz")

    labels = sitk.ReadImage(str(src / "labels.nii.gz"))
    small_labels = labels_to_compact_type(downsample_labels(labels, CT_CHEST_SPACING_MM))
    before = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    after = set(np.unique(sitk.GetArrayViewFromImage(small_labels)).tolist())
    if not after <= before:
        raise RuntimeError(f"new label ids appeared: {sorted(after - before)}")
    lost = sorted(before - after)
    if lost:
        print(f"  note: label ids too small to survive {CT_CHEST_SPACING_MM} mm sampling: {lost}")
    write(small_labels, out_dir / "ct_chest_labels.nii.gz")

    shutil.copyfile(src / "labels.csv", out_dir / "ct_chest_labels.csv")
    print("wrote ct_chest_labels.csv")


def make_ct_pelvis(data_dir: Path, out_dir: Path) -> None:
    ct = sitk.ReadImage(str(data_dir / "ct_pelvis_ts" / "ct.nii.gz"), sitk.sitkFloat32)
    arr = np.clip(sitk.GetArrayFromImage(ct).astype(np.float64), CT_MIN_HU, CT_MAX_HU)
    write(to_int16(arr, ct), out_dir / "ct_pelvis.nii.gz")


def summarize(out_dir: Path) -> None:
    print("\nfile | size (x,y,z) | spacing | origin | direction | type | min | max")
    for path in sorted(out_dir.glob("*.nii.gz")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayViewFromImage(img)
        print(
            f"{path.name} | {img.GetSize()} | {tuple(round(s, 4) for s in img.GetSpacing())} | "
            f"{tuple(round(o, 4) for o in img.GetOrigin())} | "
            f"{tuple(round(d, 4) for d in img.GetDirection())} | "
            f"{img.GetPixelIDTypeAsString()} | {arr.min()} | {arr.max()}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder holding the public source scans (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=SCRIPT_DIR,
                        help="where to write the sample files (default: this script's folder)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    out_dir = args.out_dir.resolve()
    if not data_dir.is_dir():
        parser.error(f"data dir not found: {data_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # bit-identical reruns

    make_mr_brain(data_dir, out_dir)
    make_ct_chest(data_dir, out_dir)
    make_ct_pelvis(data_dir, out_dir)
    summarize(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
