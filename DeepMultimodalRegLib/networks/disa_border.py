"""DISA descriptors of a volume with a wide constant border, without running the network over the border.

Why: a moving image is often padded with a constant well beyond its anatomy (resampled onto a
larger field of view, a CT's out-of-scan padding; the capture-range benchmark widens the moving
grid by 110 mm per side, which makes it 7× the fixed image's voxels).  Every descriptor whose
receptive field holds only that constant is the same vector, so the network only has to run on the
content and the layer of border around it that the content's descriptors see.

The result equals the full pass on every descriptor that sees content, and on every other one the
"constant" descriptor, computed on a small constant cube.  The one difference from a full pass:
descriptors within half a receptive field of the volume's own edge, where the network's zero
padding bends the full pass's output (an artefact of where the grid ends, not of the image).
"""

from __future__ import annotations

from typing import Callable

import torch

from .disa_net import HALF_RECEPTIVE_FIELD, OUTPUT_STRIDE, RECEPTIVE_FIELD, descriptor_shape

#: border voxels kept on each side of the content.  A descriptor that sees content lies within the
#: half receptive field (24) of it, and its own receptive field must stay clear of the crop's edge,
#: where the convolutions' zero padding would reach it: 2 × 24 + 1.
KEPT_BORDER = 2 * HALF_RECEPTIVE_FIELD + 1
#: crops start on a multiple of this (input voxels): descriptor cells of the crop then coincide with
#: the volume's, and so do the blocks of the search's 2× pooled coarse level
CROP_ALIGNMENT = 2 * OUTPUT_STRIDE
#: below this saving the plain pass is used (the crop's bookkeeping and the constant cube cost a little)
MAX_CROP_FRACTION = 0.6
#: side of the constant cube whose centre descriptor (cell 6, input voxel 24) sees only the cube
_CUBE = RECEPTIVE_FIELD + 3


def _content_bounds(x: torch.Tensor, value: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per axis (z, y, x) the [first, last + 1) voxel where any of the [B, D, H, W] volumes ``x`` differs
    from its own border ``value`` [B]; None if there is none."""
    content = (x != value[:, None, None, None]).any(dim=0)
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        along = content.any(dim=others[1]).any(dim=others[0])
        index = torch.nonzero(along).squeeze(1)
        if index.numel() == 0:
            return None
        bounds.append((int(index[0]), int(index[-1]) + 1))
    return bounds


def forward_skipping_constant_border(forward: Callable[[torch.Tensor], torch.Tensor],
                                     x: torch.Tensor, output_stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """``forward(x)`` for a [B, 1, D, H, W] input, with the network run only on its non-constant part.

    Each volume's border constant is the value of its first voxel, and the crop holds the content of
    all B (the sign-symmetric descriptors run a volume and its negative as one batch); volumes
    without such a border (or whose content fills most of the grid) take the plain pass.  ``forward``
    maps [B, 1, d, h, w] to [B, C, ceil(d/s), ceil(h/s), ceil(w/s)], s = ``output_stride`` (one network
    pass, or one in z-slabs).
    """
    s_out = output_stride
    if x.shape[1] != 1:
        return forward(x)
    shape = tuple(int(n) for n in x.shape[2:])
    value = x[:, 0, 0, 0, 0]
    bounds = _content_bounds(x[:, 0], value)
    starts, ends = [], []
    for (first, last), n in zip(bounds or [(0, 0)] * 3, shape):
        start = max(0, first - KEPT_BORDER) // CROP_ALIGNMENT * CROP_ALIGNMENT
        starts.append(start if bounds else 0)
        ends.append(min(n, last + KEPT_BORDER) if bounds else 0)
    crop_voxels = 1
    for s, e in zip(starts, ends):
        crop_voxels *= e - s
    total = shape[0] * shape[1] * shape[2]
    if crop_voxels > MAX_CROP_FRACTION * total:
        return forward(x)
    centre = RECEPTIVE_FIELD // 2 // s_out
    cube = value[:, None, None, None, None].expand(-1, 1, _CUBE, _CUBE, _CUBE).to(x.dtype).contiguous()
    constant = forward(cube)[:, :, centre, centre, centre]
    out_shape = descriptor_shape(shape, s_out)
    out = constant[:, :, None, None, None].expand(*constant.shape, *out_shape).clone()
    if bounds is None:
        return out
    crop = forward(x[:, :, starts[0]:ends[0], starts[1]:ends[1], starts[2]:ends[2]])
    kept_out, kept_crop = [], []
    for s, e, n, m in zip(starts, ends, shape, out_shape):
        # first and last + 1 descriptor cell whose receptive field lies in the crop (or at the volume's edge)
        lo = s // s_out + HALF_RECEPTIVE_FIELD // s_out if s > 0 else 0
        hi = (e - 1 - HALF_RECEPTIVE_FIELD) // s_out + 1 if e < n else m
        kept_out.append(slice(lo, hi))
        kept_crop.append(slice(lo - s // s_out, hi - s // s_out))
    out[(slice(None), slice(None), *kept_out)] = crop[(slice(None), slice(None), *kept_crop)]
    return out
