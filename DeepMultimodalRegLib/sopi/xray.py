"""X-ray and DRR images on disk: reading and checking an X-ray, writing a DRR as a 2D image."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import InvalidImageError
from ..fileio import atomic_output, check_output_path
from ..image.io import read_image_sitk
from .geometry import CarmGeometry, geometry_from_dicom_tags

log = logging.getLogger(__name__)


def xray_array(image, name: str = "X-ray") -> torch.Tensor:
    """The X-ray's pixels as a float tensor [H, W] from a SimpleITK image; clear errors if not 2D."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(f"the {name} has {image.GetNumberOfComponentsPerPixel()} components per pixel; "
                                "a grey-level radiograph is needed")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim == 3:
        singleton = [i for i, n in enumerate(array.shape) if n == 1]
        if not singleton:
            raise InvalidImageError(
                f"the {name} is a 3D image (shape z,y,x = {array.shape}); register2d3d needs a single 2D radiograph")
        array = np.squeeze(array, axis=singleton[0])
    if array.ndim != 2:
        raise InvalidImageError(f"the {name} must be a 2D image, got {array.ndim} dimensions (shape {array.shape})")
    if min(array.shape) < 8:
        raise InvalidImageError(f"the {name} is only {array.shape[0]}×{array.shape[1]} pixels; it needs at least 8×8")
    if not np.all(np.isfinite(array)):
        raise InvalidImageError(f"the {name} has NaN or Inf pixels; replace them before registering")
    if float(array.max()) == float(array.min()):
        raise InvalidImageError(f"the {name} is constant (every pixel = {array.flat[0]}); there is nothing to register")
    return torch.from_numpy(np.ascontiguousarray(array))


def read_xray(path: str | os.PathLike) -> tuple[torch.Tensor, CarmGeometry | None]:
    """Read an X-ray ([H, W] float tensor) and, if its DICOM tags carry one, its C-arm geometry."""
    image = read_image_sitk(path)
    pixels = xray_array(image, f"X-ray '{Path(path).name}'")
    try:
        geometry = geometry_from_dicom_tags(image)
    except Exception as exc:  # a broken optional tag must not stop a registration that has --geometry
        log.warning("ignoring the X-ray's DICOM geometry tags: %s", exc)
        geometry = None
    return pixels, geometry


def fit_geometry_to_xray(geometry: CarmGeometry, shape: tuple[int, int]) -> CarmGeometry:
    """The geometry sampled like the X-ray: same physical detector, the X-ray's pixel count.

    Raises if the X-ray's aspect ratio does not match the detector's (then it is not this detector).
    """
    rows, cols = shape
    if (rows, cols) == geometry.shape:
        return geometry
    if abs(rows / cols - geometry.detector_rows / geometry.detector_cols) > 0.01 * rows / cols:
        raise InvalidImageError(
            f"the X-ray is {rows}×{cols} pixels but the C-arm geometry's detector is {geometry.detector_rows}×"
            f"{geometry.detector_cols}: the aspect ratios differ, so the X-ray was not taken with this geometry")
    log.info("X-ray is %d×%d pixels; sampling the %d×%d detector of the geometry at that size",
             rows, cols, geometry.detector_rows, geometry.detector_cols)
    return geometry.resized(rows, cols)


def write_drr(drr: torch.Tensor, geometry: CarmGeometry, path: str | os.PathLike,
              protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a DRR [H, W] as a 2D image with the detector's pixel spacing, atomically.

    The origin is the detector-plane position (C-arm y, z in mm) of pixel (0, 0), so that reading
    it back gives a single-slice image of shape (1, H, W).
    """
    import SimpleITK as sitk

    out = check_output_path(path, protected)
    array = drr.detach().cpu().float().numpy()
    if array.ndim == 3:
        array = array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    sr, sc = geometry.pixel_spacing_mm
    image.SetSpacing((sc, sr))
    image.SetOrigin((-(geometry.detector_cols - 1) / 2 * sc + geometry.principal_point_mm[1],
                     -(geometry.detector_rows - 1) / 2 * sr + geometry.principal_point_mm[0]))
    with atomic_output(out) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return out
