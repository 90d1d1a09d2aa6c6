"""CBCT-like artefacts on a CT in normalised units ((HU + 1000) / 2000): noise, streaks, shading and
an intensity shift — what separates a planning CT from a cone-beam CT (training pairs, benchmark)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def cbct_artefacts(image: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """``image`` [D, H, W] (z, y, x; axial slices along z) with random CBCT-like artefacts added.

    * Gaussian noise (σ 0.005–0.03, i.e. 10–60 HU), lightly smoothed;
    * streaks: a few straight lines through the body in every axial slice (±0.01–0.04);
    * cupping/shading: a smooth radial darkening towards the centre of each slice (up to 0.03);
    * global intensity change: scale 0.95–1.05, offset ±0.02.
    ``strength`` scales every amplitude.  Returns a new tensor; the input is not modified.
    """
    d, h, w = image.shape
    out = image.clone()
    dev, dt = image.device, image.dtype
    # streaks, the same lines on every slice of a slab
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=dev, dtype=dt), torch.linspace(-1, 1, w, device=dev, dtype=dt),
                            indexing="ij")
    streaks = torch.zeros(h, w, device=dev, dtype=dt)
    cy, cx = _uniform(generator, -0.2, 0.2), _uniform(generator, -0.2, 0.2)
    for _ in range(int(torch.randint(2, 7, (1,), generator=generator))):
        angle = _uniform(generator, 0, math.pi)
        distance = (xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle)
        width = _uniform(generator, 0.005, 0.02)
        amplitude = _uniform(generator, 0.01, 0.04) * (1 if float(torch.rand(1, generator=generator)) < 0.5 else -1)
        streaks += amplitude * torch.exp(-0.5 * (distance / width) ** 2)
    body = (image > 0.3).to(dt)  # streaks show inside the patient, not in the air around
    out += strength * streaks[None] * body
    # cupping
    radius2 = (xx ** 2 + yy ** 2)
    out -= strength * _uniform(generator, 0.0, 0.03) * (1 - radius2.clamp(max=1))[None] * body
    # noise, slightly correlated like reconstructed CBCT noise
    sigma = strength * _uniform(generator, 0.005, 0.03)
    noise = torch.randn(image.shape, generator=generator, dtype=dt).to(dev)
    noise = F.avg_pool3d(noise[None, None], 3, stride=1, padding=1)[0, 0] * math.sqrt(27.0)  # keep σ
    out += sigma * noise
    # global intensity change
    out = out * (1 + strength * _uniform(generator, -0.05, 0.05)) + strength * _uniform(generator, -0.02, 0.02)
    return out
