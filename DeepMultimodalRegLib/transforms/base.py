"""The transform interface shared by every method.

A transform maps **fixed-space** physical points to **moving-space** physical points (LPS mm), the
resampling convention of ITK and of Slicer's "from parent" transforms: the warped moving image at a
fixed-space point x is ``moving(T(x))``.

Transforms are batched: a transform holds B parameter sets and maps points to B results at once
(global search evaluates many poses in one call).  Their tensors may require gradients; every
operation is differentiable with respect to them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the geometry module does not need the transforms
    from ..image.geometry import ImageGeometry


class Transform(abc.ABC):
    """A batch of B spatial transforms of one kind."""

    #: a short name used in reports and error messages
    kind: str = "transform"

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """B, the number of transforms held."""

    @property
    def is_linear(self) -> bool:
        return False

    @abc.abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the transform's parameters (for device, dtype and optimisers)."""

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype

    @abc.abstractmethod
    def transform_points(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Map physical points to ``[B, ..., 3]``.

        ``points`` is ``[..., 3]``, shared by all B transforms, or with ``batched=True`` it is
        ``[B, ..., 3]``, one point set per transform (as when composing transforms).
        """

    def transform_grid(self, reference: "ImageGeometry", z_range: tuple[int, int] | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """Map every voxel centre of ``reference`` (slices ``z_range``): ``[B, d, H, W, 3]`` in ``dtype``
        (default: the transform's).  The same values as ``transform_points`` of the grid's points;
        transforms that can use the grid's regular structure (a B-spline) override it to be faster."""
        dtype = dtype or self.dtype
        return self.transform_points(reference.physical_grid(device=self.device, dtype=dtype, z_range=z_range))

    @abc.abstractmethod
    def select(self, index: int) -> "Transform":
        """The ``index``-th transform of the batch, as a batch of one."""

    @abc.abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Transform":
        """The same transform with its tensors on another device / dtype."""

    @abc.abstractmethod
    def detach(self) -> "Transform":
        """The same transform with its tensors cut from the autograd graph."""

    def expand_points(self, points: torch.Tensor, batched: bool) -> torch.Tensor:
        """Give ``points`` a leading batch axis of size B (a broadcast view, not a copy)."""
        if batched:
            if points.shape[0] not in (1, self.batch_size):
                raise ValueError(f"points batch {points.shape[0]} does not match transform batch {self.batch_size}")
            return points.expand(self.batch_size, *points.shape[1:])
        return points.unsqueeze(0).expand(self.batch_size, *points.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch={self.batch_size})"


class DisplacementTransform(Transform):
    """x → x + u(x) for transforms held in one tensor of per-batch parameters (B-spline
    coefficients, a dense field): subclasses give u and how to rebuild themselves from a tensor."""

    @abc.abstractmethod
    def displacement(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """u at physical points, ``[B, ..., 3]`` in mm."""

    @abc.abstractmethod
    def with_tensor(self, tensor: torch.Tensor) -> "DisplacementTransform":
        """The same kind of transform, on the same grid, holding ``tensor`` [B, 3, ...]."""

    def transform_points(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        return self.expand_points(points, batched) + self.displacement(points, batched)

    def select(self, index: int) -> "DisplacementTransform":
        return self.with_tensor(self.tensors()[0][index:index + 1])

    def to(self, device=None, dtype=None) -> "DisplacementTransform":
        return self.with_tensor(self.tensors()[0].to(device=device, dtype=dtype))

    def detach(self) -> "DisplacementTransform":
        return self.with_tensor(self.tensors()[0].detach())
