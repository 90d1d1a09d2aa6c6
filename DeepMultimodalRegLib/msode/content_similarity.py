"""The learned modality-independent similarity of MS-ODE (paper eq. 4): L2 distance of 3D content features.

The 3D content feature E^c_3D(x) of a volume is assembled from the 2D content encoder E^c of the
translation model (:mod:`.translation`) applied to N stacks of adjacent slices (the encoder's
channels) taken along the three axes in turn, at random positions.  Fixed and warped moving
images are cut at the *same* positions, so the features compare like with like; the distance is
the mean squared difference over all feature maps:

    L_sim = mean ‖E^c_3D(x_moving ∘ φ) − E^c_3D(x_fixed)‖²

It is differentiable with respect to the warped image (slicing, resampling and the encoder are),
so MS-ODE can train on it.  Volumes on another grid spacing than the encoder was trained at are
resampled to it first (trilinear, so still differentiable); intensities are expected in [0, 1]
(MS-ODE's working-grid images are).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from ..weights.manifest import WeightsError, load_state_dict
from .translation import ContentEncoder, Translator

#: name of the shipped translation model in weights/manifest.json
TRANSLATION_MODEL_NAME = "msode_translation"
_CACHE: dict = {}


@dataclass(frozen=True)
class FrozenEncoder:
    """A content encoder in eval mode with its parameters frozen, and the settings it was trained at."""

    network: ContentEncoder
    slices: int
    spacing_mm: float


def load_content_encoder(weights=None, device="cpu") -> FrozenEncoder:
    """E^c of the shipped translation model (SHA-256 checked), or of a ``state_dict`` file / mapping."""
    if weights is None and str(device) in _CACHE:  # the shipped one is read and hashed once per device
        return _CACHE[str(device)]
    if weights is None:
        try:
            state = load_state_dict(TRANSLATION_MODEL_NAME)
        except WeightsError as exc:
            raise WeightsError(f"{exc}. Train one with `deepmmreg train translation` and pass its weights file") from None
    elif isinstance(weights, (str, Path)):
        if not Path(weights).is_file():
            raise InvalidParameterError(f"translation weights not found: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, dict):
        state = weights
    else:
        raise InvalidParameterError(f"weights must be None, a file path or a state_dict, got {type(weights).__name__}")
    translator = Translator.from_state_dict(state)
    network = translator.content.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    encoder = FrozenEncoder(network, translator.config.slices, translator.config.spacing_mm)
    if weights is None:
        _CACHE[str(device)] = encoder
    return encoder


def slice_plan(shape: tuple[int, int, int], count: int, slices: int, generator: torch.Generator,
               central_fraction: float = 0.7) -> list[tuple[int, int]]:
    """``count`` (axis, centre index) pairs, axes taking turns, centres uniform in the central part
    of each axis (the brain; the edges of a working grid are mostly background)."""
    half = slices // 2
    plan = []
    for k in range(count):
        axis = k % 3
        n = shape[axis]
        if n < slices:
            raise InvalidParameterError(f"a volume of {n} voxels along axis {axis} has no {slices}-slice stack")
        margin = max(half, int(round(n * (1 - central_fraction) / 2)))
        low, high = margin, max(margin, n - 1 - margin)
        plan.append((axis, low + int(torch.randint(high - low + 1, (1,), generator=generator))))
    return plan


def slice_stack(volume: torch.Tensor, axis: int, centre: int, slices: int) -> torch.Tensor:
    """[B, 1, D, H, W] → [B, slices, ·, ·]: the slices around ``centre`` along ``axis`` as channels."""
    half = slices // 2
    data = volume[:, 0].movedim(axis + 1, 1)
    return data[:, centre - half:centre + half + 1]


def to_encoder_spacing(volume: torch.Tensor, spacing_mm: float | None, encoder_spacing: float) -> torch.Tensor:
    if spacing_mm is None or abs(spacing_mm - encoder_spacing) < 1e-3 * encoder_spacing:
        return volume
    return F.interpolate(volume, scale_factor=spacing_mm / encoder_spacing, mode="trilinear", align_corners=False)


def content_features(volume: torch.Tensor, encoder: FrozenEncoder, plan) -> list[torch.Tensor]:
    """E^c of each planned slice stack of ``volume`` [B, 1, D, H, W] (already at the encoder's spacing)."""
    return [encoder.network(slice_stack(volume, axis, centre, encoder.slices)) for axis, centre in plan]


def content_distance(warped: torch.Tensor, fixed: torch.Tensor, encoder: FrozenEncoder | None = None,
                     count: int = 12, spacing_mm: float | None = None, generator: torch.Generator | None = None,
                     per_batch: bool = False) -> torch.Tensor:
    """Paper eq. 4 between ``warped`` and ``fixed`` [B, 1, D, H, W] on one grid of ``spacing_mm``.

    ``count`` slice stacks (N), placed by ``generator`` (default: seed 0, so a registration sees
    the same similarity on every call)."""
    if warped.shape != fixed.shape:
        raise InvalidParameterError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} differ in shape")
    encoder = encoder or load_content_encoder(device=warped.device)
    warped = to_encoder_spacing(warped, spacing_mm, encoder.spacing_mm)
    fixed = to_encoder_spacing(fixed, spacing_mm, encoder.spacing_mm)
    plan = slice_plan(tuple(fixed.shape[2:]), count, encoder.slices, generator or torch.Generator().manual_seed(0))
    per = sum(((a - b) ** 2).mean(dim=(1, 2, 3)) for a, b in
              zip(content_features(warped, encoder, plan), content_features(fixed, encoder, plan))) / len(plan)
    return per if per_batch else per.mean()
