"""The 6-DOF pose of a CT in the C-arm frame, and distances between poses on SE(3).

A pose θ = (rx, ry, rz in degrees, tx, ty, tz in mm) places the CT in the C-arm frame (see
:mod:`.geometry`) as in the SOPI paper's eq. 2–3:

    A(θ) = M_t · M_rx · M_ry · M_rz,      p_carm = A(θ) · [B · (p_lps − c); 1]

where ``c`` is the centre of the CT (LPS mm) and ``B`` is the fixed *nominal view*: the
antero-posterior projection of a supine patient, source anterior, detector posterior, with the
patient's left along the detector columns and the feet down the rows:

    C-arm x (beam)    = LPS +y (posterior)
    C-arm y (columns) = LPS +x (patient's left)
    C-arm z (rows)    = LPS −z (towards the feet)

So θ = 0 is an AP view of the CT centred on the isocentre; rx rotates about the beam, ry about
the column axis, rz about the row axis (all in the C-arm frame, applied z first), tx moves the CT
along the beam (towards the detector), ty along the columns and tz down the rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidParameterError

#: LPS direction → C-arm direction of the nominal (θ = 0) AP view
NOMINAL_VIEW = np.array([[0.0, 1.0, 0.0],
                         [1.0, 0.0, 0.0],
                         [0.0, 0.0, -1.0]])

POSE_KEYS = ("rx", "ry", "rz", "tx", "ty", "tz")


def as_pose_tensor(pose, dtype=torch.float64, device=None) -> torch.Tensor:
    """Poses as a [B, 6] tensor (degrees, mm); accepts a sequence, an array, a tensor or a dict."""
    if isinstance(pose, dict):
        try:
            pose = [float(pose[k]) for k in POSE_KEYS]
        except KeyError as exc:
            raise InvalidParameterError(f"a pose needs the keys {', '.join(POSE_KEYS)}; {exc} is missing") from None
    t = torch.as_tensor(pose, dtype=dtype, device=device) if not isinstance(pose, torch.Tensor) else pose
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] != 6:
        raise InvalidParameterError(f"a pose has 6 values (rx, ry, rz in degrees, tx, ty, tz in mm), got shape "
                                    f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InvalidParameterError(f"a pose contains NaN or Inf: {t.tolist()}")
    return t


def rotation_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """R = R_x · R_y · R_z (paper eq. 2–3) for angles [B, 3] in degrees → [B, 3, 3]."""
    a = torch.deg2rad(angles_deg)
    rx, ry, rz = a.unbind(-1)
    cx, sx, cy, sy, cz, sz = rx.cos(), rx.sin(), ry.cos(), ry.sin(), rz.cos(), rz.sin()
    one, zero = torch.ones_like(rx), torch.zeros_like(rx)
    mx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    my = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    mz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return mx @ my @ mz


def pose_matrix(pose) -> torch.Tensor:
    """A(θ) = M_t · M_rx · M_ry · M_rz as [B, 4, 4] homogeneous matrices (differentiable)."""
    p = as_pose_tensor(pose)
    r = rotation_matrix(p[:, :3])
    top = torch.cat([r, p[:, 3:, None]], dim=-1)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=p.dtype, device=p.device).expand(p.shape[0], 1, 4)
    return torch.cat([top, bottom], dim=1)


def matrix_to_pose(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of :func:`pose_matrix` for [B, 4, 4] (or [4, 4]) rigid matrices → [B, 6] (degrees, mm).

    R = R_x(a) R_y(b) R_z(c) has R[0, 2] = sin b; away from b = ±90° the angles are unique in
    (−180°, 180°] × [−90°, 90°] × (−180°, 180°].
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    r = m[:, :3, :3]
    b = torch.asin(r[:, 0, 2].clamp(-1.0, 1.0))
    a = torch.atan2(-r[:, 1, 2], r[:, 2, 2])
    c = torch.atan2(-r[:, 0, 1], r[:, 0, 0])
    angles = torch.rad2deg(torch.stack([a, b, c], dim=-1))
    return torch.cat([angles, m[:, :3, 3]], dim=-1)


def ct_to_carm_matrix(pose, ct_center: Sequence[float]) -> torch.Tensor:
    """[B, 4, 4] maps CT LPS points (x, y, z, 1) to the C-arm frame: A(θ) · [B · (p − c); 1]."""
    a = pose_matrix(pose)
    base = torch.eye(4, dtype=a.dtype, device=a.device)
    base[:3, :3] = torch.as_tensor(NOMINAL_VIEW, dtype=a.dtype, device=a.device)
    c = torch.as_tensor(np.asarray(ct_center, dtype=np.float64), dtype=a.dtype, device=a.device)
    base[:3, 3] = -(base[:3, :3] @ c)
    return a @ base


def carm_to_ct_matrix(pose, ct_center: Sequence[float]) -> torch.Tensor:
    """[B, 4, 4] maps C-arm-frame points to CT LPS points (the inverse of :func:`ct_to_carm_matrix`)."""
    m = ct_to_carm_matrix(pose, ct_center)
    r, t = m[:, :3, :3], m[:, :3, 3:]
    rt = r.transpose(1, 2)
    top = torch.cat([rt, -rt @ t], dim=-1)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(m.shape[0], 1, 4)
    return torch.cat([top, bottom], dim=1)


# --------------------------------------------------------------------------- SE(3) distances
def so3_log(r: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ω [B, 3] (radians) of rotation matrices [B, 3, 3]."""
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    w = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], dim=-1)
    sin = torch.sin(angle)
    small = sin.abs() < 1e-6
    scale = torch.where(small, 0.5 + angle ** 2 / 12, angle / (2 * torch.where(small, torch.ones_like(sin), sin)))
    omega = w * scale.unsqueeze(-1)
    # near 180° the antisymmetric part vanishes: take the axis from the symmetric part instead
    near_pi = (math.pi - angle) < 1e-3
    if bool(near_pi.any()):
        sym = (r + torch.eye(3, dtype=r.dtype, device=r.device)) / 2
        col = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
        axis = sym[torch.arange(r.shape[0]), :, col]
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        omega = torch.where(near_pi.unsqueeze(-1), axis * angle.unsqueeze(-1), omega)
    return omega


def se3_log(matrix: torch.Tensor) -> torch.Tensor:
    """Twists (ω [rad], v [mm]) [B, 6] of rigid [B, 4, 4] matrices: exp of the twist gives the matrix."""
    r, t = matrix[:, :3, :3], matrix[:, :3, 3]
    omega = so3_log(r)
    theta = omega.norm(dim=-1, keepdim=True)
    wx = _skew(omega)
    small = theta < 1e-6
    safe = torch.where(small, torch.ones_like(theta), theta)
    # V^-1 = I − ½[ω]× + (1/θ²)(1 − θ sinθ / (2(1 − cosθ))) [ω]×²
    coef = torch.where(small, torch.full_like(theta, 1 / 12),
                       (1 - safe * torch.sin(safe) / (2 * (1 - torch.cos(safe)))) / safe ** 2)
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    v_inv = eye - 0.5 * wx + coef.unsqueeze(-1) * (wx @ wx)
    v = (v_inv @ t.unsqueeze(-1)).squeeze(-1)
    return torch.cat([omega, v], dim=-1)


def _skew(w: torch.Tensor) -> torch.Tensor:
    x, y, z = w.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(-1, 3, 3)


def geodesic_distance(pose_a, pose_b, mm_per_radian: float = 1.0) -> torch.Tensor:
    """Left-invariant geodesic distance on SE(3) between poses: ‖log(A(a)⁻¹ A(b))‖.

    The rotation part (radians) is weighted by ``mm_per_radian`` so that both parts are in mm:
    ``sqrt((mm_per_radian · |ω|)² + |v|²)``.
    """
    a, b = pose_matrix(pose_a), pose_matrix(pose_b)
    rel = torch.linalg.inv(a) @ b
    xi = se3_log(rel)
    return torch.sqrt((mm_per_radian * xi[:, :3].norm(dim=-1)) ** 2 + xi[:, 3:].norm(dim=-1) ** 2)


def pose_errors(estimate, truth) -> tuple[np.ndarray, np.ndarray]:
    """Rotation error (degrees, angle of R_est R_trueᵀ) and translation error (mm, ‖t_est − t_true‖).

    The translation error is how far the CT's centre lands from where it should be in the C-arm frame.
    """
    a, b = pose_matrix(estimate), pose_matrix(truth)
    rel = a[:, :3, :3] @ b[:, :3, :3].transpose(1, 2)
    rot = torch.rad2deg(so3_log(rel).norm(dim=-1))
    trans = (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1)
    return rot.numpy(), trans.numpy()


def pose_to_dict(pose) -> dict[str, float]:
    p = as_pose_tensor(pose)[0].tolist()
    return {k: float(v) for k, v in zip(POSE_KEYS, p)}
