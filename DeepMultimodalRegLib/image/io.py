"""Reading and writing volumes in every format SimpleITK reads (NIfTI, NRRD, MHA, DICOM series)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ImageReadError
from ..fileio import atomic_output, check_output_path
from .volume import Volume


def read_image_sitk(path: str | os.PathLike):
    """Read a file, or the largest DICOM series in a folder, as a SimpleITK image."""
    import SimpleITK as sitk

    p = Path(path).expanduser()
    if not p.exists():
        raise ImageReadError(f"image not found: {p}")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(p))
            if not series:
                raise ImageReadError(f"no DICOM series found in folder {p}")
            # the series with the most slices is the one a user means in a typical export folder
            files = max((reader.GetGDCMSeriesFileNames(str(p), s) for s in series), key=len)
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(p))
    except ImageReadError:
        raise
    except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Unable" in line), first[0] if first else "")
        raise ImageReadError(f"cannot read {p} as an image ({detail.strip()[:200]})") from exc


def read_volume(path: str | os.PathLike, name: str | None = None) -> Volume:
    """Read a scalar volume (a 2D image becomes a single-slice volume) with its geometry in LPS mm."""
    image = read_image_sitk(path)
    return Volume.from_sitk(image, name=name if name is not None else _stem(Path(path)))


def write_volume(volume: Volume, path: str | os.PathLike, protected: Iterable[str | os.PathLike] = (),
                 dtype: np.dtype | None = None, compress: bool = True) -> Path:
    """Write atomically; refuse to overwrite any of the ``protected`` input files."""
    import SimpleITK as sitk

    out = check_output_path(path, protected)
    image = volume.to_sitk() if dtype is None else volume.with_data(
        volume.data.to(_torch_dtype(dtype))).to_sitk()
    with atomic_output(out) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return out


def _torch_dtype(dtype):
    import torch

    return {np.dtype("float32"): torch.float32, np.dtype("int16"): torch.int16,
            np.dtype("uint8"): torch.uint8, np.dtype("int32"): torch.int32,
            np.dtype("float64"): torch.float64}[np.dtype(dtype)]


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name
