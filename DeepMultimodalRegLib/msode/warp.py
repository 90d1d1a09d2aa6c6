"""Warping the moving image by θ on a pyramid level, for the three parameterisations.

Every map sends fixed-grid physical points (LPS mm) to moving-space points, the library's
convention; the moving image is then sampled there (trilinear, ITK's inside rule, 0 outside).

* rigid:  T(x) = R(r)·(x − c_f) + c_m + t,  θ = (rx, ry, rz, tx, ty, tz) (radians, mm), R in ITK's
  Euler order; c_f, c_m are the fixed and moving centres of mass (θ = 0 superimposes them).
  Exported as ``RigidTransform((r, c_m − c_f + t), centre c_f)``.
* B-spline: T(x) = P(x + u(x)), u the cubic B-spline of the coefficients θ [B, 3, gz, gy, gx] on
  ITK's control grid of the finest working grid, evaluated separably on every level's grid.
* dense: T(x) = P(x + u(x)), θ = u itself, [B, 3, D, H, W] in mm on the level's grid (×2 trilinear
  upsampling between levels).
P is a fixed linear pre-transform: the translation c_m − c_f, or the result of a rigid MS-ODE
(hybrid).  Exported as ``CompositeTransform([P, BSpline | DisplacementField])`` (ITK order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..image.geometry import ImageGeometry
from ..transforms.bspline import axis_weight_matrix
from ..transforms.linear import RigidTransform, euler_zxy_matrix
from ..transforms.sampling import (affine_index_grid, index_to_sampling_matrix, physical_to_grid_matrix,
                                  sample_at_points, sample_grid)


def grid_points(geometry: ImageGeometry, device=None, dtype=torch.float32) -> torch.Tensor:
    """Physical positions of the voxel centres, [D, H, W, 3]."""
    return geometry.physical_grid(device=device, dtype=dtype)


def rigid_homogeneous(theta: torch.Tensor, c_fixed: torch.Tensor, c_moving: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] of T(x) = R(r)(x − c_f) + c_m + t."""
    r = euler_zxy_matrix(theta[:, :3])
    offset = c_moving + theta[:, 3:] - (r @ c_fixed.unsqueeze(-1)).squeeze(-1)
    h = torch.zeros(theta.shape[0], 4, 4, dtype=theta.dtype, device=theta.device)
    h[:, :3, :3] = r
    h[:, :3, 3] = offset
    h[:, 3, 3] = 1
    return h


def rigid_export(theta: torch.Tensor, c_fixed: torch.Tensor, c_moving: torch.Tensor) -> RigidTransform:
    """θ as the library's rigid transform (centre c_f), for ITK export."""
    p = torch.cat([theta[:, :3], theta[:, 3:] + c_moving - c_fixed], dim=1)
    return RigidTransform(p.detach().double(), c_fixed.detach().double())


def translation_homogeneous(c_fixed: torch.Tensor, c_moving: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(c_fixed.shape[0], 6, dtype=c_fixed.dtype, device=c_fixed.device)
    return rigid_homogeneous(zero, c_fixed, c_moving)


def apply_homogeneous(h: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points`` [D, H, W, 3] (shared) or [B, D, H, W, 3] mapped by h [B, 4, 4]."""
    a, t = h[:, :3, :3].to(points.dtype), h[:, :3, 3].to(points.dtype)
    if points.dim() == 4:
        return torch.einsum("dhwj,bij->bdhwi", points, a) + t[:, None, None, None, :]
    return torch.einsum("bdhwj,bij->bdhwi", points, a) + t[:, None, None, None, :]


def sample_moving(moving: torch.Tensor, geometry: ImageGeometry, mapped: torch.Tensor) -> torch.Tensor:
    """moving [B, C, D', H', W'] (on ``geometry``) sampled at mapped points [B, D, H, W, 3] → [B, C, D, H, W]."""
    return sample_at_points(moving, geometry, mapped, mode="bilinear", default_value=0.0)


def rigid_sampling_grid(theta: torch.Tensor, c_fixed: torch.Tensor, c_moving: torch.Tensor,
                        fixed_geometry: ImageGeometry, moving_geometry: ImageGeometry) -> torch.Tensor:
    """``grid_sample`` coordinates [B, D, H, W, 3] in the moving image of T_θ(x) at every voxel x of
    ``fixed_geometry``: the fixed grid's index → physical map, T_θ and the moving image's physical →
    grid map composed into one affine map first (in float64), then applied by broadcast sums.

    The same points as mapping the physical grid by T_θ and converting to grid coordinates (to float32
    rounding; 1e-13 in float64), in one pass over the voxels instead of two, forward and backward.  At 64³,
    with MIND-SSC's forward and backward around it, the saving is within the 2-core VM's noise (61 → 57 ms
    in one A/B, 82 → 87 ms in another; docs/benchmarks.md, "MS-ODE hybrid")."""
    m = index_to_sampling_matrix(rigid_homogeneous(theta, c_fixed, c_moving), fixed_geometry, moving_geometry)
    return affine_index_grid(m.to(theta.dtype), 0, *fixed_geometry.shape)


def homogeneous_sampling_grid(h: torch.Tensor, points: torch.Tensor, moving_geometry: ImageGeometry) -> torch.Tensor:
    """``grid_sample`` coordinates in the moving image of ``points`` [D, H, W, 3] or [B, D, H, W, 3] mapped by
    h [B, 4, 4]: the moving image's physical → grid map folded into h first (one pass over the points)."""
    to_grid = torch.as_tensor(physical_to_grid_matrix(moving_geometry), dtype=torch.float64, device=h.device)
    m = (to_grid @ h.double()).to(h.dtype)
    return apply_homogeneous(m, points)


def sample_moving_grid(moving: torch.Tensor, geometry: ImageGeometry, grid: torch.Tensor) -> torch.Tensor:
    """moving [B, C, D', H', W'] (on ``geometry``) sampled at its ``grid_sample`` coordinates [B, D, H, W, 3]."""
    return sample_grid(moving, geometry, grid, mode="bilinear", default_value=0.0)


class BSplineBasis:
    """Separable evaluation of a cubic B-spline on the control grid ``control`` at the voxel
    centres of ``level`` (both LPS-aligned): three [n, g] weight matrices, one per axis."""

    def __init__(self, control: ImageGeometry, level: ImageGeometry, device=None, dtype=torch.float32):
        to_control = control.physical_to_index_matrix() @ level.index_to_physical_matrix()
        self.matrices = []  # x, y, z
        for axis in range(3):
            n, g = level.size_xyz[axis], control.size_xyz[axis]
            index = float(to_control[axis, axis]) * torch.arange(n, dtype=torch.float64) + float(to_control[axis, 3])
            self.matrices.append(axis_weight_matrix(index, g).to(device=device, dtype=dtype))

    def __call__(self, coefficients: torch.Tensor) -> torch.Tensor:
        """[B, 3, gz, gy, gx] → displacement [B, 3, D, H, W] (mm, x/y/z components)."""
        mx, my, mz = (m.to(coefficients.dtype) for m in self.matrices)
        out = torch.einsum("bcijk,xk->bcijx", coefficients, mx)
        out = torch.einsum("bcijx,yj->bciyx", out, my)
        return torch.einsum("bciyx,zi->bczyx", out, mz)


def field_points(points: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """x + u(x): points [D, H, W, 3] plus a displacement [B, 3, D, H, W] → [B, D, H, W, 3]."""
    return points.unsqueeze(0) + displacement.movedim(1, -1)


def upsample_field(field: torch.Tensor) -> torch.Tensor:
    """A dense field on a level grid carried to the next finer grid (×2 per axis, same box):
    trilinear, cell-centred (the values at the fine voxel centres of the coarse field's trilinear
    interpolation, edges clamped as ITK's displacement-field transform)."""
    return F.interpolate(field, scale_factor=2, mode="trilinear", align_corners=False)


def gradient_penalty(displacement: torch.Tensor, spacing_mm: float) -> torch.Tensor:
    """Mean squared forward difference of a field [B, 3, D, H, W] per mm (L_reg = E‖∇φ‖²)."""
    dz = displacement[:, :, 1:] - displacement[:, :, :-1]
    dy = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    dx = displacement[..., 1:] - displacement[..., :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / spacing_mm ** 2
