"""The volume type: an image's voxels and its geometry, always together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidImageError
from .geometry import ImageGeometry


@dataclass
class Volume:
    """A scalar 3D image: ``data`` is a tensor indexed (z, y, x); ``geometry`` places it in LPS mm.

    The tensor keeps the file's dtype (labels stay integer) until a method asks for floats with
    :meth:`float`.  Functions that receive a Volume never modify its data in place.
    """

    data: torch.Tensor
    geometry: ImageGeometry
    name: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor):
            self.data = torch.as_tensor(np.asarray(self.data))
        if self.data.dim() != 3:
            raise InvalidImageError(f"volume data must be a 3D (z, y, x) array, got shape {tuple(self.data.shape)}")
        if tuple(self.data.shape) != self.geometry.shape:
            raise InvalidImageError(
                f"volume data shape {tuple(self.data.shape)} does not match its geometry {self.geometry.shape}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_numpy(cls, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   origin: Sequence[float] = (0.0, 0.0, 0.0),
                   direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1), name: str = "") -> "Volume":
        """Wrap a (z, y, x) array; spacing/origin/direction in physical (x, y, z) order."""
        array = np.asarray(array)
        geometry = ImageGeometry(shape=array.shape, spacing=tuple(spacing), origin=tuple(origin),
                                 direction=tuple(np.asarray(direction, dtype=float).reshape(-1)))
        return cls(torch.from_numpy(np.ascontiguousarray(array)), geometry, name=name)

    @classmethod
    def from_sitk(cls, image, name: str = "") -> "Volume":
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InvalidImageError(
                f"{name or 'the image'} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                "a scalar (grey-level) image is needed")
        geometry = ImageGeometry.from_sitk(image)
        array = sitk.GetArrayFromImage(image)
        array = array.reshape(geometry.shape)
        if array.dtype == np.uint16:  # torch has no uint16 arithmetic worth using
            array = array.astype(np.int32)
        elif array.dtype == np.uint32:
            array = array.astype(np.int64)
        return cls(torch.from_numpy(np.ascontiguousarray(array)), geometry, name=name)

    def to_sitk(self):
        """A SimpleITK image with this volume's voxels and geometry (a copy)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.numpy(), isVector=False)
        self.geometry.copy_to_sitk(image)
        return image

    # ------------------------------------------------------------------ views and copies
    def numpy(self) -> np.ndarray:
        return self.data.detach().cpu().numpy()

    def float(self) -> "Volume":
        return self.with_data(self.data.float())

    def to(self, device: torch.device | str) -> "Volume":
        return self.with_data(self.data.to(device))

    def with_data(self, data: torch.Tensor, name: str | None = None) -> "Volume":
        """A new volume on the same grid holding ``data``."""
        return Volume(data, self.geometry, name=self.name if name is None else name,
                      metadata=dict(self.metadata))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __repr__(self) -> str:
        g = self.geometry
        return (f"Volume(name={self.name!r}, shape(z,y,x)={g.shape}, spacing(x,y,z)="
                f"{tuple(round(s, 4) for s in g.spacing)}, dtype={self.data.dtype}, device={self.data.device})")
