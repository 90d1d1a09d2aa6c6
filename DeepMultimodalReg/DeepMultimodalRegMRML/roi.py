"""Markups ROI node (world RAS, possibly rotated) ↔ library Box (fixed-image LPS).

The ROI's object-to-world matrix holds its axes (columns) and its centre (translation), with any
parent transforms of the ROI applied.  When the fixed volume itself sits under a transform, world
coordinates are not its physical coordinates: the box is brought back through that transform
(which must be linear — a warped fixed volume has no single box).
"""

from __future__ import annotations

import numpy as np
import vtk

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.region import Box

from .coordinates import FLIP, array_from_vtk_matrix, vtk_matrix_from_array


def _world_to_local(node) -> np.ndarray:
    """4×4 map from world RAS to the node's own RAS (identity when it has no parent transform)."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InvalidParameterError(
            f"the fixed volume '{node.GetName()}' is under a non-linear transform ({parent.GetName()}); "
            "harden or remove that transform before drawing a refinement box")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(matrix)
    return array_from_vtk_matrix(matrix)


def box_from_roi(roi_node, fixed_node=None) -> Box:
    """The ROI as a box in the fixed volume's physical LPS space."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InvalidParameterError("a Markups ROI node is needed for region-specific refinement")
    if roi_node.GetNumberOfControlPoints() == 0 and not _has_size(roi_node):
        raise InvalidParameterError(f"the ROI '{roi_node.GetName()}' has not been placed yet")
    object_to_world = array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())
    object_to_lps = FLIP @ _world_to_local(fixed_node) @ object_to_world
    columns = object_to_lps[:3, :3]
    scale = np.linalg.norm(columns, axis=0)
    if np.any(scale <= 0):
        raise InvalidParameterError(f"the ROI '{roi_node.GetName()}' is flattened by its transform")
    size = np.asarray(roi_node.GetSize(), dtype=np.float64) * scale
    if np.any(size <= 0):
        raise InvalidParameterError(f"the ROI '{roi_node.GetName()}' has zero size {tuple(size)} mm")
    axes = columns / scale
    # a sheared parent transform would leave the axes non-orthogonal: snap to the nearest rotation
    u, _, vt = np.linalg.svd(axes)
    axes = u @ vt
    return Box(center=tuple(object_to_lps[:3, 3]), size=tuple(size), axes=tuple(axes.reshape(-1)))


def _has_size(roi_node) -> bool:
    return all(v > 0 for v in roi_node.GetSize())


def roi_from_box(scene, box: Box, name: str = "RefinementBox", node=None, fixed_node=None):
    """A Markups ROI node showing ``box`` (given in the fixed volume's LPS space)."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    box_to_lps = np.eye(4)
    box_to_lps[:3, :3] = box.axes_matrix
    box_to_lps[:3, 3] = box.center
    box_to_world = np.linalg.inv(_world_to_local(fixed_node)) @ FLIP @ box_to_lps
    # the ROI's own node coordinates are world coordinates when it has no parent transform
    node.SetAndObserveObjectToNodeMatrix(vtk_matrix_from_array(box_to_world))
    node.SetSize(*box.size)
    return node


def default_roi_size(fixed_geometry, fraction: float = 0.25, minimum_mm: float = 20.0) -> tuple:
    """A box a quarter of the fixed image's extent (at least 2 cm) per axis: a sensible first box."""
    extent = np.asarray(fixed_geometry.extent_mm, dtype=np.float64)
    return tuple(np.maximum(extent * fraction, np.minimum(minimum_mm, extent)))

