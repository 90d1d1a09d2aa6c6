"""Resampling a moving image onto a reference grid through a (batched) transform.

Memory is bounded by processing the reference grid in slabs of slices; the budget can be set per
call.  The result for B transforms is ``[B, C, D, H, W]`` (or ``[B, D, H, W]`` for a scalar
volume).  Gradients flow to the transform parameters.
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume
from .base import Transform
from .linear import LinearTransform
from .sampling import affine_index_grid, index_to_sampling_matrix, sample_at_points, sample_grid

#: default working-memory budget of one resampling slab (points, indices, grid, output)
DEFAULT_CHUNK_BYTES = 512 * 1024 ** 2
_BYTES_PER_POINT = 4 * 3 * 6  # float32 xyz: grid points, mapped points, index, grid coords, masks

INTERPOLATION_MODES = {"linear": "bilinear", "nearest": "nearest"}


def resample_tensor(data: torch.Tensor, geometry: ImageGeometry, transform: Transform,
                    reference: ImageGeometry, interpolation: str = "linear", default_value: float = 0.0,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Resample ``data`` [C, D, H, W] (placed by ``geometry``) onto ``reference``: ``[B, C, *reference.shape]``.

    Integer data is resampled as float32; ``out_dtype`` defaults to the (float) data's dtype.
    """
    if interpolation not in INTERPOLATION_MODES:
        raise InvalidParameterError(f"interpolation must be one of {sorted(INTERPOLATION_MODES)}, got {interpolation!r}")
    if data.dim() != 4:
        raise InvalidParameterError(f"data must be [C, D, H, W], got {tuple(data.shape)}")
    mode = INTERPOLATION_MODES[interpolation]
    b, c = transform.batch_size, data.shape[0]
    depth, height, width = reference.shape
    point_dtype = transform.dtype if transform.dtype in (torch.float32, torch.float64) else torch.float32
    slab = max(1, int(chunk_bytes // max(1, b * height * width * (_BYTES_PER_POINT + 4 * c))))
    needs_grad = torch.is_grad_enabled() and (data.requires_grad or any(t.requires_grad for t in transform.tensors()))
    image = data if data.is_floating_point() else data.float()
    out_dtype = out_dtype or image.dtype  # float64 data stays float64 (gradient checks need it)

    # a linear transform composes with both grids into one affine map: reference index → grid
    index_to_grid = _linear_index_to_grid(transform, geometry, reference) if isinstance(transform, LinearTransform) else None
    pieces = []
    out = None if needs_grad else torch.empty(b, c, depth, height, width, dtype=out_dtype, device=data.device)
    for z0 in range(0, depth, slab):
        z1 = min(depth, z0 + slab)
        if index_to_grid is not None:
            grid = affine_index_grid(index_to_grid.to(image.dtype), z0, z1, height, width)
            values = sample_grid(image, geometry, grid, mode=mode, default_value=default_value)
        else:
            mapped = transform.transform_grid(reference, (z0, z1), point_dtype).to(data.device)  # [B, d, H, W, 3]
            values = sample_at_points(image, geometry, mapped, mode=mode, default_value=default_value)
        if out is None:
            pieces.append(values.to(out_dtype))
        else:
            out[:, :, z0:z1] = values
    return torch.cat(pieces, dim=2) if out is None else out


def _linear_index_to_grid(transform: LinearTransform, geometry: ImageGeometry,
                          reference: ImageGeometry) -> torch.Tensor:
    """[B, 3, 4]: reference voxel index (i, j, k, 1) → moving grid coordinates, through the transform."""
    return index_to_sampling_matrix(transform.homogeneous(), reference, geometry)


def resample(moving: Volume, transform: Transform, reference: ImageGeometry, interpolation: str = "linear",
             default_value: float = 0.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Warp a scalar volume by each of B transforms: ``[B, D, H, W]`` on ``reference``."""
    out = resample_tensor(moving.data.unsqueeze(0), moving.geometry, transform, reference,
                          interpolation, default_value, chunk_bytes)
    return out[:, 0]


def warp_volume(moving: Volume, transform: Transform, reference: ImageGeometry | Volume,
                interpolation: str = "linear", default_value: float = 0.0) -> Volume:
    """The moving volume resampled onto the reference grid by one transform, as a new Volume."""
    if isinstance(reference, Volume):
        reference = reference.geometry
    if transform.batch_size != 1:
        raise InvalidParameterError(f"warp_volume takes one transform, got a batch of {transform.batch_size}")
    data = resample(moving, transform, reference, interpolation, default_value)[0]
    if interpolation == "nearest" and not moving.data.is_floating_point():
        data = data.round().to(moving.data.dtype)
    return Volume(data.detach(), reference, name=f"{moving.name}_warped" if moving.name else "warped")
