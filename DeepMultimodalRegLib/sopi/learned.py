"""SOPI at registration time: RTPI gives the start pose, the fine stage's gradient steps refine it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..image.volume import Volume
from .fine import FineSettings, refine_pose
from .geometry import CarmGeometry
from .model_dir import SopiModel


@dataclass
class SopiOutcome:
    pose: np.ndarray  # [6] after the fine stage
    rtpi_pose: np.ndarray  # [6] the RTPI start
    history: list = field(default_factory=list)
    drr_count: int = 0
    seconds_rtpi: float = 0.0
    seconds_fine: float = 0.0


def xray_for_model(xray: torch.Tensor, model_geometry: CarmGeometry) -> torch.Tensor:
    """The X-ray area-averaged to the model's detector (the same physical detector, fewer pixels)."""
    return F.interpolate(xray.float()[None, None], size=model_geometry.shape, mode="area")[0, 0]


@torch.no_grad()
def run_sopi(model: SopiModel, ct: Volume, xray: torch.Tensor, settings: FineSettings | None = None,
             check=lambda: None) -> SopiOutcome:
    """SOPI's pose for ``xray`` [H, W] (taken with the model's C-arm): RTPI, then the fine stage."""
    settings = settings or FineSettings()
    t0 = time.perf_counter()
    kit = model.kit(ct)
    x = xray_for_model(xray, kit.geometry)
    start = (model.rtpi(kit.ct_cube, x[None, None]).double()[0] * model.sigma)
    t1 = time.perf_counter()
    check()
    pose, history = refine_pose(model.fine, kit.render, kit.mask_render, x, start, settings, check)
    rotating = min(settings.iterations, settings.rotation_iterations)
    drrs = rotating * 7 + (settings.iterations - rotating) * 4
    return SopiOutcome(pose=pose.numpy(), rtpi_pose=start.numpy(), history=history, drr_count=drrs,
                       seconds_rtpi=t1 - t0, seconds_fine=time.perf_counter() - t1)
