"""Scalar volume node ↔ library Volume, with exact geometry.

Slicer stores a volume's geometry as one IJK→RAS matrix; the library as LPS spacing, origin and
direction (SimpleITK's convention).  Both index arrays as (k, j, i) = (z, y, x).  The voxels are
copied exactly once in each direction: out of VTK's memory into a float32 torch tensor (so that no
library code can ever write into the input node), and from the result tensor into a new node.

A 2D X-ray is a single-slice volume node: the same code handles it (shape (1, H, W)).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer
import torch
import vtk

from DeepMultimodalRegLib.errors import InvalidImageError
from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.image.volume import Volume

from .coordinates import FLIP, array_from_vtk_matrix, vtk_matrix_from_array

SCALAR_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")


def _check_scalar_volume(node, role: str) -> None:
    if node is None:
        raise InvalidImageError(f"no {role} volume selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):  # label maps derive from scalar volumes
        raise InvalidImageError(f"the {role} ({node.GetName()}) is a {node.GetClassName()}, not a scalar volume")
    image = node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfPoints() == 0:
        raise InvalidImageError(f"the {role} volume '{node.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InvalidImageError(f"the {role} volume '{node.GetName()}' has "
                                f"{image.GetNumberOfScalarComponents()} components; a scalar volume is needed")


def geometry_from_node(node) -> ImageGeometry:
    """The node's voxel grid in LPS (its own grid: a parent transform is not applied)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    ijk_to_lps = FLIP @ array_from_vtk_matrix(ijk_to_ras)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise InvalidImageError(f"volume '{node.GetName()}' has a zero voxel size")
    dims = node.GetImageData().GetDimensions()  # (i, j, k)
    return ImageGeometry(shape=(dims[2], dims[1], dims[0]), spacing=tuple(spacing),
                         origin=tuple(ijk_to_lps[:3, 3]), direction=tuple((columns / spacing).reshape(-1)))


def volume_from_node(node, role: str = "input", dtype=np.float32) -> Volume:
    """A library Volume holding a copy of the node's voxels and its exact geometry."""
    _check_scalar_volume(node, role)
    view = slicer.util.arrayFromVolume(node)  # VTK's memory, not a copy
    data = torch.from_numpy(np.array(view, dtype=dtype, copy=True))
    return Volume(data, geometry_from_node(node), name=node.GetName())


def ijk_to_ras_matrix(geometry: ImageGeometry) -> vtk.vtkMatrix4x4:
    return vtk_matrix_from_array(FLIP @ geometry.index_to_physical_matrix())


def node_from_volume(scene, volume: Volume, name: str = "", node=None,
                     class_name: str = "vtkMRMLScalarVolumeNode"):
    """Write ``volume`` into ``node`` (or a new node of ``class_name`` added to ``scene``)."""
    if node is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name or volume.name or "volume"))
    array = volume.data.detach().cpu().numpy()
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(ijk_to_ras_matrix(volume.geometry))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def optional_volume_from_node(node, role: str) -> Optional[Volume]:
    return None if node is None else volume_from_node(node, role)
