"""C-arm imaging geometry: where the X-ray source and every detector pixel sit.

The **C-arm frame** (mm) has its origin at the isocentre (the point the pose places the CT's
centre at when the translation is zero):

* +x runs along the principal ray, from the source towards the detector;
* +y runs along the detector's columns (increasing column index);
* +z runs along the detector's rows (increasing row index, i.e. down the displayed image);

which is right-handed (x × y = z).  The source sits at (−source_to_isocenter, 0, 0); the detector
plane is x = source_to_detector − source_to_isocenter; pixel (row r, column c) has its centre at
``y = (c − (W−1)/2)·spacing_col + principal_point[1]``, ``z = (r − (H−1)/2)·spacing_row +
principal_point[0]``.  The principal-point offset is where the detector centre lies relative to the
foot of the perpendicular from the source on the detector (0, 0 for a centred detector).

The paper's defaults (SOPI, Chen 2023, Perlove PLX118F C-arm): source-to-detector 1011.7 mm, a
1024² detector of 0.19959 mm pixels downsampled to 256² (pixel 0.79836 mm).  The paper does not
state the source-to-isocentre distance; 600 mm (magnification ≈ 1.7, a typical mobile C-arm) is
this library's default and is written into every geometry file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..fileio import atomic_output, check_output_path

PAPER_SOURCE_TO_DETECTOR_MM = 1011.7
PAPER_DETECTOR_PIXELS = 256
PAPER_FULL_PIXEL_MM = 0.19959
PAPER_FULL_PIXELS = 1024
DEFAULT_SOURCE_TO_ISOCENTER_MM = 600.0

_REQUIRED = ("source_to_detector_mm", "source_to_isocenter_mm", "detector_rows", "detector_cols",
             "pixel_spacing_mm")


@dataclass(frozen=True)
class CarmGeometry:
    """Intrinsics of a cone-beam projection (all lengths in mm).

    pixel_spacing_mm is (row spacing, column spacing), the DICOM ImagerPixelSpacing order;
    principal_point_mm is (offset along the rows' direction z, offset along the columns' direction y).
    """

    source_to_detector_mm: float = PAPER_SOURCE_TO_DETECTOR_MM
    source_to_isocenter_mm: float = DEFAULT_SOURCE_TO_ISOCENTER_MM
    detector_rows: int = PAPER_DETECTOR_PIXELS
    detector_cols: int = PAPER_DETECTOR_PIXELS
    pixel_spacing_mm: tuple[float, float] = (PAPER_FULL_PIXEL_MM * PAPER_FULL_PIXELS / PAPER_DETECTOR_PIXELS,) * 2
    principal_point_mm: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        def number(name: str, value: Any) -> float:
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise InvalidParameterError(f"C-arm geometry: {name} must be a number, got {value!r}") from None
            if not math.isfinite(v):
                raise InvalidParameterError(f"C-arm geometry: {name} must be finite, got {value!r}")
            return v

        sdd = number("source_to_detector_mm", self.source_to_detector_mm)
        sid = number("source_to_isocenter_mm", self.source_to_isocenter_mm)
        if sdd <= 0:
            raise InvalidParameterError(f"C-arm geometry: source_to_detector_mm must be positive, got {sdd}")
        if sid <= 0 or sid >= sdd:
            raise InvalidParameterError(
                f"C-arm geometry: source_to_isocenter_mm must lie between 0 and the source-to-detector distance "
                f"({sdd} mm), got {sid}")
        sizes = []
        for name in ("detector_rows", "detector_cols"):
            v = number(name, getattr(self, name))
            if v != int(v) or v < 1:
                raise InvalidParameterError(
                    f"C-arm geometry: {name} must be a whole number of pixels ≥ 1 (the detector cannot be smaller "
                    f"than one pixel), got {getattr(self, name)!r}")
            sizes.append(int(v))
        spacing = _pair(self.pixel_spacing_mm, "pixel_spacing_mm", number)
        if min(spacing) <= 0:
            raise InvalidParameterError(f"C-arm geometry: pixel_spacing_mm must be positive, got {spacing}")
        principal = _pair(self.principal_point_mm, "principal_point_mm", number)
        object.__setattr__(self, "source_to_detector_mm", sdd)
        object.__setattr__(self, "source_to_isocenter_mm", sid)
        object.__setattr__(self, "detector_rows", sizes[0])
        object.__setattr__(self, "detector_cols", sizes[1])
        object.__setattr__(self, "pixel_spacing_mm", spacing)
        object.__setattr__(self, "principal_point_mm", principal)

    # ------------------------------------------------------------------ derived
    @property
    def shape(self) -> tuple[int, int]:
        """Detector (rows, cols) = (H, W)."""
        return (self.detector_rows, self.detector_cols)

    @property
    def detector_x_mm(self) -> float:
        """x of the detector plane in the C-arm frame."""
        return self.source_to_detector_mm - self.source_to_isocenter_mm

    @property
    def source_position(self) -> tuple[float, float, float]:
        return (-self.source_to_isocenter_mm, 0.0, 0.0)

    @property
    def magnification(self) -> float:
        """Magnification of an object at the isocentre."""
        return self.source_to_detector_mm / self.source_to_isocenter_mm

    def pixel_centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """C-arm-frame positions of all pixel centres, shape (H, W, 3)."""
        h, w = self.shape
        sr, sc = self.pixel_spacing_mm
        r = (torch.arange(h, device=device, dtype=torch.float64) - (h - 1) / 2) * sr + self.principal_point_mm[0]
        c = (torch.arange(w, device=device, dtype=torch.float64) - (w - 1) / 2) * sc + self.principal_point_mm[1]
        zz, yy = torch.meshgrid(r, c, indexing="ij")
        xx = torch.full_like(zz, self.detector_x_mm)
        return torch.stack([xx, yy, zz], dim=-1).to(dtype)

    def project(self, points: np.ndarray | torch.Tensor) -> np.ndarray:
        """Continuous (row, col) detector indices of C-arm-frame points [..., 3] (perspective projection)."""
        p = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
        depth = p[..., 0] + self.source_to_isocenter_mm  # distance from the source along the principal ray
        scale = self.source_to_detector_mm / depth
        y, z = p[..., 1] * scale, p[..., 2] * scale
        col = (y - self.principal_point_mm[1]) / self.pixel_spacing_mm[1] + (self.detector_cols - 1) / 2
        row = (z - self.principal_point_mm[0]) / self.pixel_spacing_mm[0] + (self.detector_rows - 1) / 2
        return np.stack([row, col], axis=-1)

    def resized(self, rows: int, cols: int | None = None) -> "CarmGeometry":
        """The same physical detector sampled with rows × cols pixels (pixel spacing scaled)."""
        cols = rows if cols is None else cols
        return replace(self, detector_rows=rows, detector_cols=cols,
                       pixel_spacing_mm=(self.pixel_spacing_mm[0] * self.detector_rows / rows,
                                         self.pixel_spacing_mm[1] * self.detector_cols / cols))

    # ------------------------------------------------------------------ files
    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_spacing_mm"] = list(self.pixel_spacing_mm)
        d["principal_point_mm"] = list(self.principal_point_mm)
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "the geometry") -> "CarmGeometry":
        if not isinstance(data, dict):
            raise InvalidParameterError(f"{source}: expected a JSON object with keys {', '.join(_REQUIRED)}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise InvalidParameterError(f"{source}: missing {', '.join(missing)} (needed: {', '.join(_REQUIRED)})")
        known = {"source_to_detector_mm", "source_to_isocenter_mm", "detector_rows", "detector_cols",
                 "pixel_spacing_mm", "principal_point_mm"}
        kwargs = {k: data[k] for k in known if k in data}
        try:
            return cls(**kwargs)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{source}: {exc}") from None


def _pair(value: Any, name: str, number) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        items = list(value)
    except TypeError:
        raise InvalidParameterError(f"C-arm geometry: {name} must be a number or a pair, got {value!r}") from None
    if len(items) != 2:
        raise InvalidParameterError(f"C-arm geometry: {name} must have 2 values, got {len(items)}")
    return (number(name, items[0]), number(name, items[1]))


def read_geometry(path: str | os.PathLike) -> CarmGeometry:
    """Read a C-arm geometry JSON file (keys as :meth:`CarmGeometry.as_dict`; extra keys are ignored)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidParameterError(f"C-arm geometry file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParameterError(f"cannot read C-arm geometry {p}: {exc}") from None
    return CarmGeometry.from_dict(data, source=str(p))


def write_geometry(geometry: CarmGeometry, path: str | os.PathLike, protected=()) -> Path:
    out = check_output_path(path, protected)
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(geometry.as_dict(), indent=2) + "\n", encoding="utf-8")
    return out


# DICOM tags of an X-ray image that carry its projection geometry
_DICOM_SDD = "0018|1110"  # Distance Source to Detector
_DICOM_SOD = "0018|1111"  # Distance Source to Patient
_DICOM_IMAGER_SPACING = "0018|1164"  # Imager Pixel Spacing (row, col)
_DICOM_PIXEL_SPACING = "0028|0030"


def geometry_from_dicom_tags(image, fallback: CarmGeometry | None = None) -> CarmGeometry | None:
    """A geometry from an X-ray's DICOM tags (a SimpleITK image read from DICOM), or None if absent.

    Distance Source to Detector (0018,1110) is required; Distance Source to Patient (0018,1111),
    Imager Pixel Spacing (0018,1164) and the image size fill the rest, else ``fallback``'s values.
    """
    keys = set(image.GetMetaDataKeys())
    if _DICOM_SDD not in keys:
        return None
    base = fallback or CarmGeometry()

    def numbers(key: str) -> list[float] | None:
        if key not in keys:
            return None
        try:
            return [float(v) for v in image.GetMetaData(key).strip().split("\\") if v.strip()]
        except ValueError:
            raise InvalidParameterError(f"DICOM tag {key} is not numeric: {image.GetMetaData(key)!r}") from None

    sdd = numbers(_DICOM_SDD)[0]
    sod = numbers(_DICOM_SOD)
    spacing = numbers(_DICOM_IMAGER_SPACING) or numbers(_DICOM_PIXEL_SPACING)
    size = image.GetSize()
    return CarmGeometry(source_to_detector_mm=sdd,
                        source_to_isocenter_mm=sod[0] if sod else base.source_to_isocenter_mm,
                        detector_rows=size[1], detector_cols=size[0],
                        pixel_spacing_mm=tuple(spacing[:2]) if spacing else base.pixel_spacing_mm,
                        principal_point_mm=base.principal_point_mm)
