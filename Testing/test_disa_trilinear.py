"""The channels-last trilinear gather of the registration objective against independent samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from DeepMultimodalRegLib.disa.trilinear import ChannelsLastMap


def _points(shape_zyx, count, generator, dtype=torch.float64):
    """Continuous (x, y, z) indices over the map and a voxel beyond every side (some fall outside)."""
    size = torch.tensor(shape_zyx[::-1], dtype=dtype)
    return (torch.rand(count, 3, generator=generator, dtype=dtype) * (size + 2.0) - 1.0).reshape(2, -1, 3)


@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 1, 6)])  # the second has an axis of one voxel
def test_gather_equals_scipy_trilinear_with_itk_outside_rule(shape):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    ijk = _points(shape, 4000, g)
    out = ChannelsLastMap(data).sample(ijk)  # [2, N, 4]
    assert out.shape == (2, 2000, 4)
    flat = ijk.reshape(-1, 3).numpy()
    inside = np.all((flat >= -0.5) & (flat < np.array(shape[::-1]) - 0.5), axis=1)
    assert 0.1 < inside.mean() < 0.95  # both kinds of point are checked
    coordinates = flat[:, ::-1].T  # scipy wants (z, y, x) rows
    for c in range(4):
        # mode="nearest" clamps to the outermost voxels: grid_sample's "border", used inside ITK's region
        expected = ndimage.map_coordinates(data[c].numpy(), coordinates, order=1, mode="nearest") * inside
        np.testing.assert_allclose(out.reshape(-1, 4)[:, c].numpy(), expected, atol=1e-12)


def test_gather_equals_grid_sample_route_and_has_its_gradient():
    from DeepMultimodalRegLib.image.geometry import ImageGeometry
    from DeepMultimodalRegLib.transforms.sampling import sample_at_points

    g = torch.Generator().manual_seed(1)
    shape = (6, 8, 10)
    data = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    geometry = ImageGeometry(shape=shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                             direction=tuple(np.eye(3).ravel()))
    ijk = _points(shape, 600, g)  # identity geometry: indices are physical points
    reference = sample_at_points(data, geometry, ijk)  # [2, C, N]
    assert torch.allclose(ChannelsLastMap(data).sample(ijk), reference.transpose(1, 2), atol=1e-12)
    inner = (torch.rand(1, 40, 3, generator=g, dtype=torch.float64) * torch.tensor([8.6, 6.6, 4.6]) + 0.2)
    inner.requires_grad_(True)
    torch.autograd.gradcheck(lambda p: ChannelsLastMap(data).sample(p), (inner,))


def test_gather_gradient_over_several_chunks_equals_the_grid_sample_route(monkeypatch):
    """The backward pass finds each chunk's corners again: with chunks of 7 points, points inside get
    grid_sample's gradient, and points outside or in the clamped rim none (the module's rule)."""
    from DeepMultimodalRegLib.disa import trilinear
    from DeepMultimodalRegLib.image.geometry import ImageGeometry
    from DeepMultimodalRegLib.transforms.sampling import sample_at_points

    monkeypatch.setattr(trilinear, "CHUNK_POINTS", 7)
    g = torch.Generator().manual_seed(2)
    shape = (5, 7, 9)
    data = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    geometry = ImageGeometry(shape=shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                             direction=tuple(np.eye(3).ravel()))
    # x, y, z from 1.5 voxels before the grid to 1.5 beyond it
    points = torch.rand(2, 50, 3, generator=g, dtype=torch.float64) * torch.tensor([11.0, 9.0, 7.0]) - 1.5
    upstream = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    ours = points.clone().requires_grad_(True)
    (ChannelsLastMap(data).sample(ours) * upstream).sum().backward()
    theirs = points.clone().requires_grad_(True)
    (sample_at_points(data, geometry, theirs).transpose(1, 2) * upstream).sum().backward()
    # the module's rule: a point outside the voxel centres' box (clamped on some axis, or outside the
    # map) has no derivative on any axis; every other point has grid_sample's
    upper = torch.tensor([shape[2] - 1, shape[1] - 1, shape[0] - 1], dtype=torch.float64)
    moves = ((points > 0) & (points < upper)).all(-1, keepdim=True)
    assert 10 < int(moves.sum()) < 90
    assert torch.allclose(ours.grad, torch.where(moves, theirs.grad, torch.zeros_like(theirs.grad)), atol=1e-10)


def test_gather_refuses_a_map_without_channels():
    with pytest.raises(ValueError, match="C, D, H, W"):
        ChannelsLastMap(torch.zeros(4, 5, 6))
