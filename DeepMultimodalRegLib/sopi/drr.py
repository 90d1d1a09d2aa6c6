"""Differentiable digitally reconstructed radiographs (the role of ProST in the SOPI paper).

A DRR pixel is the line integral of the linear attenuation μ (1/mm, from HU) along the ray from
the source to the pixel's centre:  ``DRR(r, c) = ∫ μ(x) ds``  (dimensionless, = −log(I/I₀)), so
bone is bright as on a displayed radiograph.  μ is sampled trilinearly (``torch.grid_sample``)
at ``samples_per_ray`` midpoints of the segment where the ray crosses the CT's box, so the DRR is
differentiable with respect to the pose (and the volume).  Poses are batched; rays are processed
in chunks so that memory stays bounded (under autograd each chunk is checkpointed).

Accuracy note: the CT's box is taken out to where trilinear interpolation against the zero
padding reaches zero (one voxel beyond the outer voxel centres), so μ is zero at both ends of each
segment and moving the segment ends with the pose adds no boundary term: the gradient of the
sampled integral is the gradient of the rendered image.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidImageError, InvalidParameterError
from ..image.volume import Volume
from .geometry import CarmGeometry
from .pose import as_pose_tensor, carm_to_ct_matrix, ct_to_carm_matrix

log = logging.getLogger(__name__)

#: linear attenuation of water at ~70 keV effective energy, 1/mm (0.2 /cm)
MU_WATER_PER_MM = 0.02
#: samples per chunk of rays × poses (bounds the memory of one grid_sample call: ~16 bytes each)
DEFAULT_CHUNK_SAMPLES = 4_000_000


def hu_to_attenuation(hu: torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> torch.Tensor:
    """μ = μ_water · (1 + HU/1000), clamped at 0 (air and padding below −1000 HU attenuate nothing)."""
    return (mu_water * (1.0 + hu.float() / 1000.0)).clamp_min(0.0)


def check_hu_like(ct: Volume) -> str | None:
    """A warning text if the CT's intensities do not look like Hounsfield units, else None.

    HU-like: air near −1000 (the 1st percentile below −500) and soft tissue present around 0.
    """
    data = ct.data.float().flatten()
    if data.numel() > 2_000_000:
        data = data[torch.randperm(data.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    q = torch.quantile(data, torch.tensor([0.01, 0.5, 0.99]))
    low, _median, high = (float(v) for v in q)
    if low > -500 or high < -200 or high > 5000:
        return (f"the CT '{ct.name}' does not look like Hounsfield units (1st/99th percentiles {low:.0f}/{high:.0f}; "
                "expected air near −1000 and tissue near 0): the DRR's attenuation will be wrong")
    return None


class DRRProjector:
    """Renders DRRs of one CT with one C-arm geometry; ``projector(poses)`` → [B, H, W].

    ``step_mm`` bounds the distance between samples along a ray (default: half the smallest voxel
    spacing); every ray gets the same number of samples, ``ceil(box diagonal / step_mm)``, spread
    over its own chord, so a pixel's value does not depend on the other poses in the batch.
    """

    def __init__(self, ct: Volume, geometry: CarmGeometry, device: torch.device | str = "cpu",
                 step_mm: float | None = None, mu_water: float = MU_WATER_PER_MM,
                 chunk_samples: int = DEFAULT_CHUNK_SAMPLES, attenuation: torch.Tensor | None = None) -> None:
        if ct.geometry.is_2d() or min(ct.shape) < 2:
            raise InvalidImageError(f"the CT '{ct.name}' must be a 3D volume with at least 2 voxels per axis, "
                                    f"got shape (z, y, x) = {ct.shape}")
        self.geometry = geometry
        self.ct_geometry = ct.geometry
        self.device = torch.device(device)
        mu = attenuation if attenuation is not None else hu_to_attenuation(ct.data, mu_water)
        self.mu = mu.to(self.device, torch.float32).reshape(1, 1, *ct.shape).contiguous()
        self.ct_center = tuple(float(v) for v in ct.geometry.center)
        self.step_mm = float(step_mm) if step_mm is not None else 0.5 * min(ct.geometry.spacing)
        if not self.step_mm > 0:
            raise InvalidParameterError(f"the DRR step must be positive, got {step_mm}")
        diagonal = float(np.linalg.norm(np.asarray(ct.geometry.extent_mm) + 2 * np.asarray(ct.geometry.spacing)))
        self.samples_per_ray = max(2, int(math.ceil(diagonal / self.step_mm)))
        self.chunk_samples = int(chunk_samples)
        # pixel centres and the source in the C-arm frame (pose independent)
        pix = geometry.pixel_centers(dtype=torch.float64).reshape(-1, 3)
        self._pixels = torch.cat([pix, torch.ones(pix.shape[0], 1, dtype=torch.float64)], dim=1)
        self._source = torch.tensor([*geometry.source_position, 1.0], dtype=torch.float64)
        self._ray_length = (pix - self._source[:3]).norm(dim=1)  # mm, source to pixel
        size_xyz = torch.tensor(ct.geometry.size_xyz, dtype=torch.float64)
        self._box_lo = torch.full((3,), -1.0, dtype=torch.float64)
        self._box_hi = size_xyz  # trilinear weights against the zero padding vanish at index −1 and N
        # index (i, j, k) → grid_sample's normalised coordinates (align_corners=True)
        self._index_scale = 2.0 / (size_xyz - 1).clamp_min(1.0)
        self._p2i = torch.as_tensor(ct.geometry.physical_to_index_matrix(), dtype=torch.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.shape

    # ------------------------------------------------------------------ geometry of the rays
    def ct_to_carm(self, poses) -> torch.Tensor:
        return ct_to_carm_matrix(poses, self.ct_center)

    def _rays(self, poses: torch.Tensor):
        """Per pose and pixel: ray origin and direction in CT index space, and the chord [t0, t1]."""
        m = self._p2i.to(poses.device) @ carm_to_ct_matrix(poses, self.ct_center)  # C-arm → CT index, [B, 4, 4]
        origin = (m @ self._source.to(poses.device))[:, :3]  # [B, 3]
        ends = torch.einsum("bij,nj->bni", m, self._pixels.to(poses.device))[..., :3]  # [B, N, 3]
        direction = ends - origin[:, None, :]
        with torch.no_grad():  # chord ends: μ is zero there, so they carry no gradient (see module doc)
            d = direction.detach()
            safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
            o = origin.detach()[:, None, :]
            ta = (self._box_lo.to(d.device) - o) / safe
            tb = (self._box_hi.to(d.device) - o) / safe
            t0 = torch.minimum(ta, tb).amax(-1).clamp_min(0.0)
            t1 = torch.maximum(ta, tb).amin(-1).clamp_max(1.0)
            t1 = torch.maximum(t1, t0)
        return origin, direction, t0, t1

    def footprint(self, poses) -> torch.Tensor:
        """Fraction of detector pixels whose ray crosses the CT box, per pose [B]."""
        with torch.no_grad():
            _, _, t0, t1 = self._rays(as_pose_tensor(poses).detach())
            return ((t1 - t0) > 0).double().mean(-1)

    # ------------------------------------------------------------------ rendering
    def __call__(self, poses) -> torch.Tensor:
        return self.render(poses)

    def render(self, poses) -> torch.Tensor:
        """DRRs [B, H, W] (float32) for poses [B, 6] (degrees, mm); differentiable w.r.t. the poses."""
        poses = as_pose_tensor(poses, device=None)
        poses = poses.to(torch.float64)
        origin, direction, t0, t1 = self._rays(poses)
        b, n = direction.shape[:2]
        s = self.samples_per_ray
        scale = self._index_scale.to(poses.device)
        # normalised grid coordinates: g = (o + t d) * scale − 1
        o_n = (origin * scale - 1.0).float().to(self.device)
        d_n = (direction * scale).float().to(self.device)
        t0f, t1f = t0.float().to(self.device), t1.float().to(self.device)
        seg_mm = ((t1 - t0) * self._ray_length.to(poses.device)).float().to(self.device)  # chord length per ray
        rays_per_chunk = max(1, self.chunk_samples // (s * b))
        frac = (torch.arange(s, device=self.device, dtype=torch.float32) + 0.5) / s  # midpoints
        out = []
        use_checkpoint = torch.is_grad_enabled() and (o_n.requires_grad or d_n.requires_grad or self.mu.requires_grad)
        for start in range(0, n, rays_per_chunk):
            sl = slice(start, min(n, start + rays_per_chunk))
            args = (self.mu, o_n, d_n[:, sl], t0f[:, sl], t1f[:, sl], seg_mm[:, sl], frac)
            if use_checkpoint:
                out.append(checkpoint(_integrate, *args, use_reentrant=False))
            else:
                out.append(_integrate(*args))
        drr = torch.cat(out, dim=1)
        return drr.reshape(b, *self.shape)


def _integrate(mu, o_n, d_n, t0, t1, seg_mm, frac):
    """Midpoint-rule line integrals for one chunk of rays: [B, R]."""
    b, r = d_n.shape[:2]
    t = t0[..., None] + (t1 - t0)[..., None] * frac  # [B, R, S]
    pts = o_n[:, None, None, :] + t[..., None] * d_n[:, :, None, :]  # [B, R, S, 3] in (x, y, z) = (i, j, k)
    vol = mu.expand(b, -1, -1, -1, -1) if b > 1 else mu
    samples = F.grid_sample(vol, pts.unsqueeze(1), mode="bilinear", padding_mode="zeros", align_corners=True)
    return samples.reshape(b, r, -1).mean(-1) * seg_mm  # mean μ × chord = Σ μ_k Δs


# ---------------------------------------------------------------------------------- checks
def check_field_of_view(projector: DRRProjector, poses, minimum_fraction: float = 0.0) -> None:
    """Raise if a pose puts the CT behind the source, beyond the detector, or off the detector."""
    poses = as_pose_tensor(poses)
    corners = torch.as_tensor(projector.ct_geometry.corner_points(), dtype=torch.float64)
    m = projector.ct_to_carm(poses)
    pts = torch.einsum("bij,nj->bni", m[:, :3, :3], corners) + m[:, None, :3, 3]
    geo = projector.geometry
    fraction = projector.footprint(poses)
    for i in range(poses.shape[0]):
        depth = pts[i, :, 0] + geo.source_to_isocenter_mm
        pose_text = ", ".join(f"{v:g}" for v in poses[i].tolist())
        if float(depth.min()) <= 0:
            raise InvalidParameterError(
                f"pose ({pose_text}) puts part of the CT at or behind the X-ray source; move it towards the "
                f"detector (increase tx) — the source is {geo.source_to_isocenter_mm:g} mm before the isocentre")
        if float(fraction[i]) <= minimum_fraction:
            raise InvalidParameterError(
                f"pose ({pose_text}) puts the CT outside the detector's field of view (no ray crosses it); "
                "check the translation (ty, tz are in mm in the detector plane at the isocentre)")
        if float(pts[i, :, 0].max()) >= geo.detector_x_mm:
            log.warning("pose (%s) puts part of the CT beyond the detector plane", pose_text)
