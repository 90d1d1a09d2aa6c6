"""Training data for per-patient SOPI: random poses and X-ray-like images of one CT.

Poses follow the paper's distribution about the nominal AP view (rotations N(0, 20°) per axis;
translations N(0, 100) along the beam, N(0, 30) along the detector columns, N(0, 15) mm along its
rows) and are re-drawn when they are not a plausible radiograph (:func:`plausible_poses`: the CT's
box within ``min_source_mm`` of the source, through the detector plane, or more than half off the
detector) — the same rule as the benchmark's, which imports it.

Targets are the projector's own line integrals made X-ray-like with *random* physics (domain
randomisation; nothing here uses the benchmark's simulator or its fixed parameters): bone
attenuating 1–2× more than linear in HU, a global attenuation scale, Poisson noise at a random
dose, detector blur and an intensity gamma.
"""

from __future__ import annotations

import torch

from ..sopi.drr import DRRProjector
from ..sopi.optimize import blur
from ..sopi.patient import PatientKit
from ..sopi.pose import ct_to_carm_matrix

#: the paper's pose distribution (degrees ×3, mm ×3) about the nominal view
PAPER_SIGMA = (20.0, 20.0, 20.0, 100.0, 30.0, 15.0)


def plausible_poses(projector: DRRProjector, poses: torch.Tensor, min_source_mm: float = 150.0,
                    min_fraction: float = 0.5) -> torch.Tensor:
    """[B] bool: the CT lies between source and detector, at least ``min_source_mm`` from the source,
    and at least ``min_fraction`` of the detector's rays cross its box."""
    corners = torch.as_tensor(projector.ct_geometry.corner_points(), dtype=torch.float64)
    m = ct_to_carm_matrix(poses.double(), projector.ct_center)
    x = torch.einsum("bij,nj->bni", m[:, :3, :3], corners)[..., 0] + m[:, None, 0, 3]
    geo = projector.geometry
    ok = (x.amin(1) + geo.source_to_isocenter_mm >= min_source_mm) & (x.amax(1) < geo.detector_x_mm)
    return ok & (projector.footprint(poses.double()) > min_fraction)


def sample_poses(generator: torch.Generator, n: int, projector: DRRProjector,
                 sigma=PAPER_SIGMA, center: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` plausible poses [n, 6] ~ N(center, diag(sigma)²) (center: the nominal view, or [n, 6];
    sigma: [6], or [n, 6] for one spread per pose)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(n, 6)
    out = torch.zeros(n, 6, dtype=torch.float64)
    todo = torch.arange(n)
    for _ in range(200):
        base = torch.zeros(len(todo), 6, dtype=torch.float64) if center is None else center[todo].double()
        draw = base + torch.randn(len(todo), 6, generator=generator, dtype=torch.float64) * sigma[todo]
        ok = plausible_poses(projector, draw)
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            return out
    out[todo] = torch.zeros(len(todo), 6, dtype=torch.float64) if center is None else center[todo].double()
    return out


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


@torch.no_grad()
def xray_like(kit: PatientKit, poses: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """X-ray-like images [B, H, W] of the kit's CT at ``poses`` with random acquisition physics."""
    b = poses.shape[0]
    line = kit.projector.render(poses).double()
    if kit.bone_projector is not None:
        line = line + _uniform(generator, b, 0.0, 1.0)[:, None, None] * kit.bone_projector.render(poses).double()
    line = line * _uniform(generator, b, 0.75, 1.15)[:, None, None]
    photons = torch.exp(_uniform(generator, b, 8.5, 11.5))[:, None, None]  # ≈ 5·10³ … 10⁵ per pixel
    counts = torch.poisson(photons * torch.exp(-line), generator=generator).clamp_min(1.0)
    image = -torch.log(counts / photons)
    sigmas = _uniform(generator, b, 0.0, 1.0)
    image = torch.stack([blur(image[i].float(), float(sigmas[i])) for i in range(b)]).double()
    top = torch.quantile(image.flatten(1), 0.999, dim=1).clamp_min(1e-6)[:, None, None]
    gamma = _uniform(generator, b, 0.5, 1.3)[:, None, None]
    return (image / top).clamp(0.0, 1.0).pow(gamma).float()
