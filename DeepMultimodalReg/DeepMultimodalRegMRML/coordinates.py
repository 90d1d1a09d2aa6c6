"""RAS (Slicer's world) ↔ LPS (the library, ITK, DICOM): the one place where the flip happens.

Both are right-handed patient coordinate systems in millimetres; they differ by a rotation of
180° about the superior axis, i.e. the diagonal matrix diag(−1, −1, 1).
"""

from __future__ import annotations

import numpy as np
import vtk

#: diag(−1, −1, 1, 1): maps a homogeneous RAS point to LPS and back (it is its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_from_ras_points(points) -> np.ndarray:
    """Points (..., 3) in RAS → LPS (and, the flip being its own inverse, LPS → RAS)."""
    points = np.asarray(points, dtype=np.float64)
    return points * FLIP.diagonal()[:3]


ras_from_lps_points = lps_from_ras_points


def flip_point_map(matrix: np.ndarray) -> np.ndarray:
    """A 4×4 map of points expressed in one system, re-expressed in the other: F · M · F."""
    return FLIP @ np.asarray(matrix, dtype=np.float64) @ FLIP


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix
