"""Composition of transforms, in ITK's CompositeTransform order.

``CompositeTransform([A, B])`` maps x → A(B(x)): the **last** transform is applied first, exactly
as ITK's and SimpleITK's CompositeTransform (and as a .h5 composite file lists them).  A typical
"rigid then B-spline" result is ``CompositeTransform([rigid, bspline])``: the B-spline deforms
fixed space, then the rigid pose carries it into moving space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import InvalidParameterError
from .base import Transform

if TYPE_CHECKING:
    from ..image.geometry import ImageGeometry


class CompositeTransform(Transform):
    kind = "composite"

    def __init__(self, transforms: Sequence[Transform]):
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t.transforms if isinstance(t, CompositeTransform) else [t])
        if not flat:
            raise InvalidParameterError("a composite transform needs at least one transform")
        sizes = {t.batch_size for t in flat} - {1}
        if len(sizes) > 1:
            raise InvalidParameterError(f"composed transforms have incompatible batch sizes {sorted(sizes)}")
        self.transforms = flat

    @property
    def batch_size(self) -> int:
        return max(t.batch_size for t in self.transforms)

    @property
    def is_linear(self) -> bool:
        return all(t.is_linear for t in self.transforms)

    def tensors(self) -> list[torch.Tensor]:
        return [x for t in self.transforms for x in t.tensors()]

    def transform_points(self, points: torch.Tensor, batched: bool = False) -> torch.Tensor:
        return self._carry_through(points, batched, list(reversed(self.transforms)))

    def transform_grid(self, reference: "ImageGeometry", z_range: tuple[int, int] | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first-applied transform maps the grid its own (possibly faster) way; the rest carry the points on."""
        first = self.transforms[-1]
        mapped = first.transform_grid(reference, z_range, dtype or first.dtype)
        return self._carry_through(mapped, True, list(reversed(self.transforms[:-1])))

    def _carry_through(self, points: torch.Tensor, batched: bool, transforms: list[Transform]) -> torch.Tensor:
        """``points`` through ``transforms`` in the order given."""
        current, is_batched = points, batched
        for t in transforms:
            if is_batched and t.batch_size == 1 and current.shape[0] > 1:
                # a single transform applied to every element of a batch: fold the batch into points
                b = current.shape[0]
                current = t.transform_points(current.reshape(-1, 3)).reshape(b, *current.shape[1:])
            else:
                current = t.transform_points(current, batched=is_batched)
            is_batched = True
        return current.expand(self.batch_size, *current.shape[1:])

    def select(self, index: int) -> "CompositeTransform":
        return CompositeTransform([t.select(index if t.batch_size > 1 else 0) for t in self.transforms])

    def to(self, device=None, dtype=None) -> "CompositeTransform":
        return CompositeTransform([t.to(device, dtype) for t in self.transforms])

    def detach(self) -> "CompositeTransform":
        return CompositeTransform([t.detach() for t in self.transforms])
