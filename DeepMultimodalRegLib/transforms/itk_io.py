"""Export and import of transforms as ITK transform files and displacement-field images.

Files written here are read by SimpleITK, ITK and Slicer and resample exactly as the library does:

* rigid        → Euler3DTransform (same parameters and centre)       .tfm / .txt / .h5
* affine       → AffineTransform (same matrix, translation, centre)  .tfm / .txt / .h5
* B-spline     → BSplineTransform of order 3 (same coefficient grid)  .tfm / .txt / .h5
* displacement → DisplacementFieldTransform                           .h5, or a vector image
                  (.nii.gz / .nrrd / .mha) holding the LPS displacement in mm
* composite    → CompositeTransform (same order)                      .h5 (or .tfm if no field)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import TransformFileError
from ..fileio import atomic_output, check_output_path
from ..image.geometry import ImageGeometry
from .base import Transform
from .bspline import SPLINE_ORDER, BSplineTransform
from .composite import CompositeTransform
from .displacement import DisplacementFieldTransform
from .linear import AffineTransform, LinearTransform, RigidTransform

TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat", ".xfm")
FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _has_suffix(path: Path, suffixes) -> bool:
    return any(path.name.lower().endswith(s) for s in suffixes)


# ---------------------------------------------------------------------------------- to SimpleITK
def to_sitk(transform: Transform, index: int = 0):
    """The ``index``-th transform of a batch as a SimpleITK transform."""
    import SimpleITK as sitk

    if isinstance(transform, CompositeTransform):
        parts = [to_sitk(t, index if t.batch_size > 1 else 0) for t in transform.transforms]
        composite = sitk.CompositeTransform(3)
        for part in parts:
            composite.AddTransform(part)
        return composite
    t = transform.select(index).detach().to("cpu", torch.float64)
    if isinstance(t, RigidTransform):
        p = t.parameters[0].tolist()
        out = sitk.Euler3DTransform()
        out.SetCenter(t.center[0].tolist())
        out.SetRotation(*p[:3])
        out.SetTranslation(p[3:])
        return out
    if isinstance(t, LinearTransform):
        out = sitk.AffineTransform(3)
        out.SetMatrix(t.matrix[0].reshape(-1).tolist())
        out.SetTranslation(t.translation[0].tolist())
        out.SetCenter(t.center[0].tolist())
        return out
    if isinstance(t, BSplineTransform):
        images = []
        for component in t.coefficients[0].numpy():
            image = sitk.GetImageFromArray(component.astype(np.float64))
            t.grid.copy_to_sitk(image)
            images.append(image)
        return sitk.BSplineTransform(images, SPLINE_ORDER)
    if isinstance(t, DisplacementFieldTransform):
        return sitk.DisplacementFieldTransform(displacement_image(t))
    raise TransformFileError(f"cannot export a {type(transform).__name__} to ITK")


def displacement_image(transform: DisplacementFieldTransform, index: int = 0, dtype=np.float64):
    """The field as a SimpleITK vector image (x, y, z components in LPS mm) on its own grid."""
    import SimpleITK as sitk

    field = transform.field[index].detach().cpu().numpy()  # [3, D, H, W]
    image = sitk.GetImageFromArray(np.moveaxis(field, 0, -1).astype(dtype), isVector=True)
    transform.geometry.copy_to_sitk(image)
    return image


# ---------------------------------------------------------------------------------- from SimpleITK
def from_sitk(transform, dtype=torch.float64) -> Transform:
    """A library transform (batch of one) equal to a SimpleITK transform."""
    import SimpleITK as sitk

    name = transform.GetName()
    if transform.GetDimension() != 3:
        raise TransformFileError(f"only 3D transforms are supported, this {name} is {transform.GetDimension()}D")
    if name == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        parts = [from_sitk(composite.GetNthTransform(i), dtype) for i in range(composite.GetNumberOfTransforms())]
        if not parts:
            raise TransformFileError("the composite transform is empty")
        return parts[0] if len(parts) == 1 else CompositeTransform(parts)
    if name == "Euler3DTransform":
        e = sitk.Euler3DTransform(transform)
        if not e.GetComputeZYX():
            return RigidTransform(torch.tensor(e.GetParameters(), dtype=dtype), torch.tensor(e.GetCenter(), dtype=dtype))
    if name == "BSplineTransform":
        b = sitk.BSplineTransform(transform)
        if b.GetOrder() != SPLINE_ORDER:
            raise TransformFileError(f"only cubic B-splines are supported, this one has order {b.GetOrder()}")
        images = b.GetCoefficientImages()
        grid = ImageGeometry.from_sitk(images[0])
        coefficients = np.stack([sitk.GetArrayFromImage(im) for im in images])
        return BSplineTransform(grid, torch.as_tensor(coefficients, dtype=dtype))
    if name == "DisplacementFieldTransform":
        field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        return displacement_from_image(field)
    if transform.IsLinear():
        return _linear_from_points(transform, dtype)
    raise TransformFileError(f"the transform type {name} is not supported; use a linear, B-spline or "
                             "displacement-field transform")


def _linear_from_points(transform, dtype) -> AffineTransform:
    """Any linear ITK transform (versor, similarity, translation, ...) as an affine, from 4 points."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
    matrix = np.stack(columns, axis=1)
    return AffineTransform.from_matrix(torch.as_tensor(matrix, dtype=dtype), torch.as_tensor(origin, dtype=dtype))


def displacement_from_image(image) -> DisplacementFieldTransform:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 3 or image.GetDimension() != 3:
        raise TransformFileError(
            f"a displacement field must be a 3D image with 3 components per voxel; this one is "
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
    geometry = ImageGeometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)  # [D, H, W, 3]
    field = torch.as_tensor(np.moveaxis(array, -1, 0).astype(np.float32))
    if not bool(torch.isfinite(field).all()):
        raise TransformFileError("the displacement field contains NaN or Inf values")
    return DisplacementFieldTransform(geometry, field)


# ---------------------------------------------------------------------------------- files
def write_transform(transform: Transform, path: str | os.PathLike, protected: Iterable = (),
                    reference: ImageGeometry | None = None, index: int = 0) -> Path:
    """Write one transform of a batch, atomically; the file type follows the suffix.

    A displacement-field image suffix (.nii.gz, .nrrd, .mha) writes u(x) = T(x) − x sampled on
    ``reference`` (or on the field's own grid for a displacement-field transform).
    """
    import SimpleITK as sitk

    out = check_output_path(path, protected)
    if _has_suffix(out, FIELD_IMAGE_SUFFIXES):
        t = transform.select(index)
        if not isinstance(t, DisplacementFieldTransform):
            if reference is None:
                raise TransformFileError(
                    f"writing a {transform.kind} transform as a displacement-field image needs a reference grid")
            t = DisplacementFieldTransform.from_transform(t, reference)
        with atomic_output(out) as tmp:
            sitk.WriteImage(displacement_image(t, dtype=np.float32), str(tmp), useCompression=True)
        return out
    if not _has_suffix(out, TRANSFORM_SUFFIXES):
        raise TransformFileError(f"unknown transform file type {out.name!r}; use .tfm, .h5, or .nii.gz for a field")
    if _contains_field(transform) and not _has_suffix(out, (".h5", ".hdf5")):
        raise TransformFileError(f"a displacement field cannot be stored in {out.suffix}; write .h5 or .nii.gz")
    with atomic_output(out) as tmp:
        sitk.WriteTransform(to_sitk(transform, index), str(tmp))
    return out


def _contains_field(transform: Transform) -> bool:
    if isinstance(transform, CompositeTransform):
        return any(_contains_field(t) for t in transform.transforms)
    return isinstance(transform, DisplacementFieldTransform)


def read_transform(path: str | os.PathLike, expect: tuple[type, ...] | None = None) -> Transform:
    """Read an ITK transform file or a displacement-field image.

    ``expect`` restricts the accepted transform classes (e.g. ``(LinearTransform,)`` where only a
    linear initialisation makes sense) and gives a clear error otherwise.
    """
    import SimpleITK as sitk

    p = Path(path).expanduser()
    if not p.exists():
        raise TransformFileError(f"transform file not found: {p}")
    if p.is_dir():
        raise TransformFileError(f"{p} is a folder; give a transform file (.tfm, .h5) or a displacement-field image")
    if _has_suffix(p, FIELD_IMAGE_SUFFIXES):
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise TransformFileError(f"cannot read {p} as a displacement-field image") from exc
        transform: Transform = displacement_from_image(image)
    else:
        try:
            t = sitk.ReadTransform(str(p))
        except RuntimeError as exc:
            raise TransformFileError(
                f"cannot read {p} as an ITK transform file (.tfm, .txt, .h5, .mat); is it an image? "
                "Displacement fields are read from .nii.gz, .nrrd or .mha") from exc
        transform = from_sitk(t)
    if expect is not None and not isinstance(transform, expect):
        wanted = " or ".join(cls.kind for cls in expect)
        raise TransformFileError(f"{p.name} holds a {transform.kind} transform, but a {wanted} transform is needed here")
    return transform
