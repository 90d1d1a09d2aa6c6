"""How an optimiser's flat vector x [B, P] becomes a batch of transforms, in comparable units.

Quasi-Newton methods behave best when a unit step means about the same in every coordinate, so
every coordinate of x is in millimetres of displacement: a rotation angle θ is stored as θ·R and a
matrix entry a as a·R, where R (``radius_mm``) is the typical distance of the compared points from
the centre of rotation.  A unit change of any coordinate then moves those points by about 1 mm.
"""

from __future__ import annotations

import abc
import math

import torch

from ..image.geometry import ImageGeometry
from ..transforms.base import Transform
from ..transforms.bspline import BSplineTransform, control_grid_for_domain
from ..transforms.composite import CompositeTransform
from ..transforms.linear import AffineTransform, LinearTransform, RigidTransform


class Parametrization(abc.ABC):
    """Base: ``size`` coordinates; ``transform(x)``; ``initial(pose)`` maps a linear pose to x."""

    size: int = 0
    pose_size: int = 0

    @abc.abstractmethod
    def transform(self, x: torch.Tensor) -> Transform:
        """The batch of transforms of coordinates x [B, P]."""

    @abc.abstractmethod
    def initial(self, pose: LinearTransform) -> torch.Tensor:
        """Coordinates [n, P] of a batch of n linear poses (any deformation part zero)."""

    @property
    def pose_parametrization(self) -> "Parametrization":
        """The linear part (itself for rigid and affine)."""
        return self

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        """[B] regulariser added to the objective to be minimised (zero for linear transforms)."""
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


class RigidParametrization(Parametrization):
    """x = (R·rx, R·ry, R·rz, tx, ty, tz) about ``center`` (ITK Euler ZXY angles, mm)."""

    size = pose_size = 6

    def __init__(self, center, radius_mm: float):
        self.center = torch.as_tensor(center, dtype=torch.float64)
        self.radius = float(radius_mm)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1 / self.radius] * 3 + [1.0] * 3, dtype=x.dtype, device=x.device)

    def transform(self, x: torch.Tensor) -> RigidTransform:
        return RigidTransform(x[:, :6] * self._scale(x), self.center.to(x.device))

    def initial(self, pose: LinearTransform) -> torch.Tensor:
        rigid = _as_rigid(pose, self.center)
        return rigid.parameters / self._scale(rigid.parameters)


class AffineParametrization(Parametrization):
    """x = (R·(A − I) row by row, t) about ``center``: 12 coordinates, ITK's AffineTransform layout."""

    size = pose_size = 12

    def __init__(self, center, radius_mm: float):
        self.center = torch.as_tensor(center, dtype=torch.float64)
        self.radius = float(radius_mm)

    def transform(self, x: torch.Tensor) -> AffineTransform:
        eye = torch.eye(3, dtype=x.dtype, device=x.device).reshape(1, 9)
        params = torch.cat([eye + x[:, :9] / self.radius, x[:, 9:12]], 1)
        return AffineTransform(params, self.center.to(x.device))

    def initial(self, pose: LinearTransform) -> torch.Tensor:
        affine = _recentred_affine(pose, self.center)
        eye = torch.eye(3, dtype=torch.float64).reshape(1, 9)
        return torch.cat([(affine.matrix.reshape(-1, 9) - eye) * self.radius, affine.translation], 1)


class PoseWithBSpline(Parametrization):
    """A linear pose plus a coarse cubic B-spline over the fixed domain, optimised jointly.

    The transform is ``CompositeTransform([pose, bspline])``: the B-spline deforms fixed space, the
    pose carries it into moving space.  The coordinates are the pose's, then the control-point
    displacements in mm.  ``penalty`` is a bending-like smoothness term: the squared differences of
    neighbouring control-point displacements (mm²), weighted by ``smoothness``.
    """

    def __init__(self, pose: Parametrization, domain: ImageGeometry, control_spacing_mm: float = 40.0,
                 smoothness: float = 1e-3):
        self.pose = pose
        self.grid = control_grid_for_domain(domain, control_spacing_mm=control_spacing_mm)
        self.pose_size = pose.size
        self.size = pose.size + 3 * math.prod(self.grid.shape)
        self.smoothness = float(smoothness)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.pose_size:].reshape(x.shape[0], 3, *self.grid.shape)

    def transform(self, x: torch.Tensor) -> CompositeTransform:
        spline = BSplineTransform(self.grid, self.coefficients(x))
        return CompositeTransform([self.pose.transform(x[:, :self.pose_size]), spline])

    def initial(self, pose: LinearTransform) -> torch.Tensor:
        head = self.pose.initial(pose)
        return torch.cat([head, torch.zeros(head.shape[0], self.size - self.pose_size, dtype=head.dtype)], 1)

    @property
    def pose_parametrization(self) -> Parametrization:
        return self.pose

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coefficients(x)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for axis in (2, 3, 4):
            total = total + (torch.diff(c, dim=axis) ** 2).flatten(1).mean(1)
        return self.smoothness * total


def _recentred_affine(pose: LinearTransform, center: torch.Tensor) -> AffineTransform:
    """The same maps as the batch ``pose`` written about ``center``: translation t' = A c + o − c."""
    h = pose.homogeneous().double()
    a, offset = h[:, :3, :3], h[:, :3, 3]
    c = center.double().to(a.device)
    translation = (a @ c) + offset - c
    return AffineTransform.from_matrix(a, translation, c)


def _as_rigid(pose: LinearTransform, center: torch.Tensor) -> RigidTransform:
    """Euler ZXY angles of rotation poses written about ``center`` (each matrix must be a rotation)."""
    affine = _recentred_affine(pose, center)
    r = affine.matrix
    # R = Rz Rx Ry: r[2,1] = sin(rx); r[2,0] = -cos(rx) sin(ry); r[0,1] = -sin(rz) cos(rx)
    rx = torch.asin(r[:, 2, 1].clamp(-1, 1))
    ry = torch.atan2(-r[:, 2, 0], r[:, 2, 2])
    rz = torch.atan2(-r[:, 0, 1], r[:, 1, 1])
    params = torch.cat([torch.stack([rx, ry, rz], 1), affine.translation], 1)
    return RigidTransform(params, center)


def coordinates_of(parametrization: Parametrization, h: torch.Tensor) -> torch.Tensor:
    """Coordinates [B, P] of the linear maps given as [B, 4, 4] homogeneous matrices (for composing poses)."""
    return parametrization.initial(AffineTransform.from_matrix(h[:, :3, :3], h[:, :3, 3], (0.0, 0.0, 0.0)))


def perturbed_poses(parametrization: Parametrization, x_init: torch.Tensor, angles_rad: torch.Tensor,
                    shifts_mm: torch.Tensor) -> torch.Tensor:
    """Coordinates of the pose of ``x_init`` [1, P] preceded by n extra rigid motions about the centre.

    The extra motion acts in fixed space first (x → pose(extra(x))), so a start "looks" from a
    rotated and shifted fixed frame.  Any deformation coordinates are copied from ``x_init``.
    """
    pose_p = parametrization.pose_parametrization
    base = pose_p.transform(x_init[:, :pose_p.size]).homogeneous()[0]
    extra = RigidTransform(torch.cat([angles_rad, shifts_mm], 1).to(base), pose_p.center.to(base.device))
    poses = coordinates_of(pose_p, base @ extra.homogeneous())
    tail = x_init[:, pose_p.size:].expand(poses.shape[0], -1)
    return torch.cat([poses.to(x_init), tail], 1)


def nearest_rotation_pose(pose: LinearTransform) -> AffineTransform:
    """A linear pose with its matrix replaced by the closest rotation (polar decomposition), so an
    affine initial transform can start a rigid search."""
    h = pose.homogeneous()[0].double()
    u, _, vt = torch.linalg.svd(h[:3, :3])
    r = u @ vt
    if torch.det(r) < 0:  # a reflection is not a pose: flip the least significant axis
        u = u.clone()
        u[:, -1] = -u[:, -1]
        r = u @ vt
    return AffineTransform.from_matrix(r[None], h[None, :3, 3], (0.0, 0.0, 0.0))
