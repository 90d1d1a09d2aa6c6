"""Checks that turn unusable images into a clear error before any heavy work."""

from __future__ import annotations

import torch

from ..errors import InvalidImageError
from .volume import Volume


def require_finite(volume: Volume, role: str = "image") -> None:
    """NaN or Inf voxels would silently poison every similarity and gradient."""
    data = volume.data
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data)).sum())
        raise InvalidImageError(
            f"the {role} volume{_named(volume)} has {bad} NaN or Inf voxels; replace them "
            "(e.g. with the background value) before registering")


def require_not_constant(volume: Volume, role: str = "image") -> None:
    data = volume.data
    if data.numel() == 0 or bool(data.max() == data.min()):
        raise InvalidImageError(
            f"the {role} volume{_named(volume)} is empty or constant (every voxel = "
            f"{data.flatten()[0].item() if data.numel() else 'n/a'}); there is nothing to register")


def require_3d(volume: Volume, role: str = "image", minimum_size: int = 4, method: str = "this method") -> None:
    shape = volume.geometry.shape
    if volume.geometry.is_2d():
        raise InvalidImageError(
            f"the {role} volume{_named(volume)} is 2D (shape z,y,x = {shape}); {method} needs 3D volumes")
    if min(shape) < minimum_size:
        raise InvalidImageError(
            f"the {role} volume{_named(volume)} has only {min(shape)} voxels along one axis (shape z,y,x = "
            f"{shape}); {method} needs at least {minimum_size}")


def validate_registration_input(volume: Volume, role: str, method: str = "this method",
                                require_volume: bool = True) -> None:
    """All checks an input of a 3D registration must pass, in the order a user would fix them."""
    if require_volume:
        require_3d(volume, role, method=method)
    require_finite(volume, role)
    require_not_constant(volume, role)


def _named(volume: Volume) -> str:
    return f" '{volume.name}'" if volume.name else ""
