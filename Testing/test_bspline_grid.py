"""B-spline transforms evaluated on a whole grid (``transform_grid``): the separable path must give the
per-point values, on aligned, flipped and permuted grids, slab by slab, with gradients; turned grids
take the per-point path."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.transforms import BSplineTransform, CompositeTransform, RigidTransform
from DeepMultimodalRegLib.transforms.bspline import control_grid_for_domain
from DeepMultimodalRegLib.transforms.resample import resample

TURNED = Rotation.from_euler("zxy", [10, 5, -7], degrees=True).as_matrix()
DIRECTIONS = {  # (control grid's domain direction, reference direction)
    "same, turned": (TURNED, TURNED),
    "x flipped": (np.eye(3), np.diag([-1.0, 1.0, 1.0])),
    "axes permuted": (np.eye(3), np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])),
    "turned 20 deg (per-point path)": (np.eye(3), Rotation.from_euler("z", 20, degrees=True).as_matrix()),
}


def _bspline(direction: np.ndarray, batch: int = 2, seed: int = 0) -> BSplineTransform:
    domain = ImageGeometry(shape=(20, 24, 22), spacing=(2.0, 1.5, 2.5), origin=(3.0, -4.0, 7.0),
                           direction=tuple(direction.flatten()))
    grid = control_grid_for_domain(domain, mesh_size=(5, 4, 6))
    g = torch.Generator().manual_seed(seed)
    return BSplineTransform(grid, 8 * torch.randn(batch, 3, *grid.shape, dtype=torch.float64, generator=g))


def _reference(direction: np.ndarray, centre=(25.0, 14.0, 31.0)) -> ImageGeometry:
    """Another spacing and size than the control grid's domain, centred near it and reaching past it
    (zero displacement there)."""
    shape_zyx, spacing = (19, 21, 26), np.array([1.7, 2.1, 1.9])
    half = direction @ (spacing * (np.array(shape_zyx[::-1]) - 1) / 2)
    return ImageGeometry(shape=shape_zyx, spacing=tuple(spacing), origin=tuple(np.asarray(centre) - half),
                         direction=tuple(direction.flatten()))


@pytest.mark.parametrize("case", sorted(DIRECTIONS))
def test_grid_values_equal_per_point_values(case, monkeypatch):
    from DeepMultimodalRegLib.transforms.base import Transform

    control_direction, reference_direction = DIRECTIONS[case]
    transform = _bspline(control_direction)
    reference = _reference(reference_direction)
    expected = transform.transform_points(reference.physical_grid(dtype=torch.float64))
    per_point_calls = []
    per_point = Transform.transform_grid
    monkeypatch.setattr(Transform, "transform_grid",
                        lambda self, *a, **k: per_point_calls.append(1) or per_point(self, *a, **k))
    got = transform.transform_grid(reference)
    # aligned, flipped and permuted grids take the separable path, turned ones the per-point one
    assert bool(per_point_calls) == ("per-point path" in case)
    assert got.shape == expected.shape == (2, *reference.shape, 3)
    assert float((got - expected).abs().max()) < 1e-9
    assert float((transform.transform_grid(reference, (4, 9)) - expected[:, 4:9]).abs().max()) < 1e-9
    # the displacement is not trivially zero on this grid
    assert float((expected - reference.physical_grid(dtype=torch.float64)).abs().max()) > 5.0


def test_composite_grid_equals_points_and_resampling_keeps_gradients():
    bspline = _bspline(np.eye(3), batch=1)
    reference = _reference(np.diag([-1.0, 1.0, 1.0]))
    rigid = RigidTransform(torch.tensor([[0.1, -0.05, 0.2, 3.0, -2.0, 1.0]], dtype=torch.float64),
                           torch.tensor(reference.center, dtype=torch.float64))
    composite = CompositeTransform([rigid, bspline])
    points = reference.physical_grid(dtype=torch.float64)
    assert float((composite.transform_grid(reference) - composite.transform_points(points)).abs().max()) < 1e-9

    coefficients = bspline.coefficients.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    volume = Volume(torch.rand(*reference.shape, generator=g, dtype=torch.float64), reference)
    warped = resample(volume, CompositeTransform([rigid, BSplineTransform(bspline.grid, coefficients)]), reference)
    gradient, = torch.autograd.grad(warped.square().sum(), coefficients)
    assert torch.isfinite(gradient).all() and float(gradient.abs().max()) > 0
