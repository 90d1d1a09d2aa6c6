"""Realistic simulated X-rays of a CT at a known pose (for tests and benchmarks, never for training
the projector on its own output).

Compared with the projector's own DRR, the simulated X-ray differs as a real one would:

* another attenuation model: water attenuates ``mu_water`` (default 0.017/mm instead of the
  projector's 0.02) and bone (HU > 150) ``bone_boost`` times more than linear in HU (a harder
  spectrum's photo-electric effect in calcium);
* quantum noise: ``photons`` per pixel in the open field, Poisson counts, then −log(I/I₀);
* detector blur: a Gaussian of ``blur_px`` pixels;
* an intensity non-linearity (gamma ``gamma`` on the normalised log image) and a 12-bit range.
"""

from __future__ import annotations

import numpy as np
import torch

from ..image.volume import Volume
from .drr import DRRProjector
from .geometry import CarmGeometry


def realistic_attenuation(ct: Volume, mu_water: float = 0.017, bone_boost: float = 1.6,
                          bone_hu: float = 150.0) -> torch.Tensor:
    hu = ct.data.float()
    mu = mu_water * (1.0 + hu / 1000.0)
    bone = (hu - bone_hu).clamp_min(0.0)
    mu = mu + mu_water * (bone_boost - 1.0) * bone / 1000.0
    return mu.clamp_min(0.0)


def gaussian_blur(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    if sigma_px <= 0:
        return image
    radius = max(1, int(3 * sigma_px + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma_px ** 2))
    k = k / k.sum()
    img = image[None, None].float()
    img = torch.nn.functional.pad(img, (radius, radius, radius, radius), mode="replicate")
    img = torch.nn.functional.conv2d(img, k.reshape(1, 1, 1, -1))
    img = torch.nn.functional.conv2d(img, k.reshape(1, 1, -1, 1))
    return img[0, 0]


def simulate_xray(ct: Volume, geometry: CarmGeometry, pose, seed: int = 0, photons: float = 2e4,
                  blur_px: float = 0.8, gamma: float = 0.7, mu_water: float = 0.017, bone_boost: float = 1.6,
                  step_mm: float | None = None) -> torch.Tensor:
    """A realistic X-ray [H, W] (float32, 0…4095, bone bright) of ``ct`` at ``pose``."""
    rng = np.random.default_rng(seed)
    projector = DRRProjector(ct, geometry, step_mm=step_mm,
                             attenuation=realistic_attenuation(ct.float(), mu_water, bone_boost))
    with torch.no_grad():
        line = projector.render(torch.as_tensor(pose, dtype=torch.float64).reshape(1, 6))[0].double().numpy()
    counts = rng.poisson(photons * np.exp(-line)).astype(np.float64)
    log_image = -np.log(np.maximum(counts, 1.0) / photons)
    blurred = gaussian_blur(torch.from_numpy(log_image).float(), blur_px).double().numpy()
    top = max(float(np.percentile(blurred, 99.9)), 1e-6)
    normalised = np.clip(blurred / top, 0.0, 1.0) ** gamma
    return torch.from_numpy((4095.0 * normalised).astype(np.float32))
