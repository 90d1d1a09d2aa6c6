"""Library transforms → MRML transform nodes that Slicer's Transforms module can apply, harden or invert.

The library's transforms map fixed-space points to moving-space points, which is exactly the
"transform from parent" of a Slicer transform node: a moving volume placed under the node is then
displayed aligned with the fixed volume, and hardening resamples it as the library does.

- linear results → ``SetMatrixTransformFromParent`` with the 4×4 matrix re-expressed in RAS;
- everything else → a ``vtkOrientedGridTransform`` (trilinear displacement grid, as ITK's
  displacement-field transform) set as the node's transform from parent.  A displacement field
  keeps its own grid; other non-linear transforms (B-spline, compositions) are rasterised on the
  fixed image's grid.
"""

from __future__ import annotations

import numpy as np
import slicer
import torch
import vtk
from vtk.util import numpy_support

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.transforms.base import Transform
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform
from DeepMultimodalRegLib.transforms.linear import LinearTransform

from .coordinates import FLIP, array_from_vtk_matrix, flip_point_map, vtk_matrix_from_array


def linear_matrix_lps(transform: Transform) -> np.ndarray:
    """The 4×4 homogeneous matrix of a single linear transform (fixed LPS → moving LPS)."""
    if transform.batch_size != 1:
        raise InvalidParameterError(f"one transform is needed, got a batch of {transform.batch_size}")
    if isinstance(transform, LinearTransform):
        return transform.homogeneous()[0].detach().double().cpu().numpy()
    # a composition of linear transforms: read the matrix off the images of four points
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    mapped = transform.transform_points(points.to(transform.dtype))[0].double().cpu().numpy()
    matrix = np.eye(4)
    matrix[:3, 3] = mapped[0]
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T
    return matrix


def displacement_field_on(transform: Transform, reference: ImageGeometry) -> DisplacementFieldTransform:
    """The transform as a displacement field: its own grid if it is one, else rasterised on ``reference``."""
    if isinstance(transform, DisplacementFieldTransform):
        return transform.select(0) if transform.batch_size > 1 else transform
    with torch.no_grad():
        return DisplacementFieldTransform.from_transform(transform.select(0) if transform.batch_size > 1 else transform,
                                                         reference)


def grid_transform_from_field(field: DisplacementFieldTransform) -> "slicer.vtkOrientedGridTransform":
    """A VTK oriented grid transform evaluating the same displacements (in RAS) at the same points."""
    geometry = field.geometry
    vectors = field.field[0].detach().double().cpu().numpy()  # [3, D, H, W], LPS (x, y, z)
    vectors = np.moveaxis(vectors, 0, -1) * FLIP.diagonal()[:3]  # [D, H, W, 3] in RAS
    image = vtk.vtkImageData()
    image.SetDimensions(*geometry.size_xyz)
    image.SetSpacing(*geometry.spacing)
    image.SetOrigin(*(FLIP[:3, :3] @ np.asarray(geometry.origin)))
    flat = np.ascontiguousarray(vectors.reshape(-1, 3))
    array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(array)
    direction = np.eye(4)
    direction[:3, :3] = FLIP[:3, :3] @ geometry.direction_matrix
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    grid.SetGridDirectionMatrix(vtk_matrix_from_array(direction))
    grid.SetInterpolationModeToLinear()  # ITK's displacement-field transform interpolates linearly
    return grid


def set_transform_node(scene, transform: Transform, reference: ImageGeometry, node=None, name: str = "registration"):
    """Put ``transform`` into ``node`` (created if None: linear or grid transform node) and return it."""
    if node is None:
        class_name = "vtkMRMLLinearTransformNode" if transform.is_linear else "vtkMRMLGridTransformNode"
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    if transform.is_linear:
        node.SetMatrixTransformFromParent(vtk_matrix_from_array(flip_point_map(linear_matrix_lps(transform))))
    else:
        node.SetAndObserveTransformFromParent(grid_transform_from_field(displacement_field_on(transform, reference)))
    return node


def transform_points_ras(node, points_ras) -> np.ndarray:
    """Map RAS points with the node's transform from parent (what Slicer does when resampling)."""
    vtk_transform = node.GetTransformFromParent()
    return np.array([vtk_transform.TransformPoint(tuple(float(v) for v in p)) for p in np.asarray(points_ras)])


def matrix_from_parent_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(matrix)
    return array_from_vtk_matrix(matrix)
