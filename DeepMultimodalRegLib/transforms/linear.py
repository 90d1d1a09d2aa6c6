"""Linear transforms: rigid (6 parameters) and affine (12), each about a fixed centre.

Both map x → A (x − c) + c + t, the form of ITK's MatrixOffsetTransformBase, so they export to
ITK's Euler3DTransform and AffineTransform with identical parameters.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from ..errors import InvalidParameterError
from .base import Transform


def _as_center(center, batch: int, like: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(center, dtype=like.dtype, device=like.device)
    if c.dim() == 1:
        c = c.unsqueeze(0)
    if c.shape[-1] != 3:
        raise InvalidParameterError(f"a transform centre has 3 coordinates (x, y, z), got {tuple(c.shape)}")
    return c.expand(batch, 3)


def euler_zxy_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[B, 3, 3]`` from angles (rx, ry, rz) in radians, R = Rz · Rx · Ry.

    This is ITK's Euler3DTransform order (its default, ComputeZYX off).
    """
    rx, ry, rz = angles.unbind(-1)
    cx, sx, cy, sy, cz, sz = torch.cos(rx), torch.sin(rx), torch.cos(ry), torch.sin(ry), torch.cos(rz), torch.sin(rz)
    one, zero = torch.ones_like(rx), torch.zeros_like(rx)
    rot_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    rot_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rot_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rot_z @ rot_x @ rot_y


class LinearTransform(Transform):
    """x → A (x − c) + c + t for a batch of parameter vectors [B, P] and centres c [B, 3].

    Subclasses say how the P parameters give the matrix A and the translation t.
    """

    kind = "linear"
    #: number of parameters per transform
    parameter_count: int = 0
    #: what the parameters are, for error messages
    parameter_names: str = ""

    def __init__(self, parameters: torch.Tensor, center: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0)):
        p = torch.as_tensor(parameters)
        if not p.is_floating_point():
            p = p.double()
        if p.dim() == 1:
            p = p.unsqueeze(0)
        if p.dim() != 2 or p.shape[-1] != self.parameter_count:
            raise InvalidParameterError(
                f"a {self.kind} transform has {self.parameter_count} parameters ({self.parameter_names}), "
                f"got shape {tuple(p.shape)}")
        self.parameters = p
        self._center = _as_center(center, p.shape[0], p)

    @property
    def is_linear(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.parameters.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.parameters, self._center]

    @property
    @abc.abstractmethod
    def matrix(self) -> torch.Tensor:
        """[B, 3, 3]"""

    @property
    def translation(self) -> torch.Tensor:
        """[B, 3]: the last three parameters in both ITK layouts."""
        return self.parameters[:, -3:]

    @property
    def center(self) -> torch.Tensor:
        """[B, 3]"""
        return self._center

    def homogeneous(self) -> torch.Tensor:
        """``[B, 4, 4]`` matrices acting on (x, y, z, 1)."""
        a = self.matrix
        offset = self.translation + self.center - (a @ self.center.unsqueeze(-1)).squeeze(-1)
        h = torch.zeros(a.shape[0], 4, 4, dtype=a.dtype, device=a.device)
        h[:, :3, :3] = a
        h[:, :3, 3] = offset
        h[:, 3, 3] = 1
        return h

    def transform_points(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        h = self.homogeneous().to(points.dtype)
        a, offset = h[:, :3, :3], h[:, :3, 3]
        if not batched:
            # one matmul for all B transforms: [N,3] @ [B,3,3]^T
            flat = points.reshape(-1, 3)
            out = torch.einsum("nj,bij->bni", flat, a) + offset[:, None, :]
            return out.reshape(a.shape[0], *points.shape)
        pts = self.expand_points(points, batched)
        flat = pts.reshape(pts.shape[0], -1, 3)
        out = torch.einsum("bnj,bij->bni", flat, a) + offset[:, None, :]
        return out.reshape(pts.shape)

    @classmethod
    def identity(cls, batch: int = 1, center=(0.0, 0.0, 0.0), dtype=torch.float64, device=None):
        return cls(cls._identity_parameters(batch, dtype, device), center)

    def inverse(self) -> "AffineTransform":
        """The inverse map (moving → fixed) about the same centre, as an affine transform."""
        inv = torch.linalg.inv(self.matrix)
        # x = A^-1 (y - c - t) + c  →  matrix A^-1, centre c, translation -A^-1 t
        translation = -(inv @ self.translation.unsqueeze(-1)).squeeze(-1)
        return AffineTransform.from_matrix(inv, translation, self.center)

    @classmethod
    @abc.abstractmethod
    def _identity_parameters(cls, batch: int, dtype, device) -> torch.Tensor:
        """Parameters [B, P] of the identity."""

    def select(self, index: int):
        return type(self)(self.parameters[index:index + 1], self._center[index])

    def to(self, device=None, dtype=None):
        return type(self)(self.parameters.to(device=device, dtype=dtype), self._center.to(device=device, dtype=dtype))

    def detach(self):
        return type(self)(self.parameters.detach(), self._center.detach())


class RigidTransform(LinearTransform):
    """Rotation about ``center`` then translation: parameters (rx, ry, rz, tx, ty, tz), radians and mm."""

    kind = "rigid"
    parameter_count = 6
    parameter_names = "rx, ry, rz in radians, tx, ty, tz in mm"

    @property
    def matrix(self) -> torch.Tensor:
        return euler_zxy_matrix(self.parameters[:, :3])

    @classmethod
    def _identity_parameters(cls, batch, dtype, device):
        return torch.zeros(batch, 6, dtype=dtype, device=device)


class AffineTransform(LinearTransform):
    """A general linear map about ``center``: parameters in ITK order (a11..a33 row-major, tx, ty, tz)."""

    kind = "affine"
    parameter_count = 12
    parameter_names = "9 matrix entries row by row, then tx, ty, tz in mm"

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, translation: torch.Tensor, center=(0.0, 0.0, 0.0)) -> "AffineTransform":
        m = torch.as_tensor(matrix)
        t = torch.as_tensor(translation, dtype=m.dtype, device=m.device)
        if m.dim() == 2:
            m, t = m.unsqueeze(0), t.reshape(1, 3)
        return cls(torch.cat([m.reshape(m.shape[0], 9), t], dim=-1), center)

    @classmethod
    def from_linear(cls, transform: LinearTransform) -> "AffineTransform":
        return cls.from_matrix(transform.matrix, transform.translation, transform.center)

    @property
    def matrix(self) -> torch.Tensor:
        return self.parameters[:, :9].reshape(-1, 3, 3)

    @classmethod
    def _identity_parameters(cls, batch, dtype, device):
        eye = torch.eye(3, dtype=dtype, device=device).reshape(1, 9).expand(batch, 9)
        return torch.cat([eye, torch.zeros(batch, 3, dtype=dtype, device=device)], dim=-1)
