"""MS-ODE warps against SimpleITK resampling of the exported transform files (the oracle)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.msode.grids import level_geometries, working_grid
from DeepMultimodalRegLib.msode.warp import (BSplineBasis, apply_homogeneous, field_points, grid_points,
                                             homogeneous_sampling_grid, rigid_export, rigid_homogeneous,
                                             rigid_sampling_grid, sample_moving, sample_moving_grid)
from DeepMultimodalRegLib.transforms.bspline import BSplineTransform, control_grid_for_domain
from DeepMultimodalRegLib.transforms.composite import CompositeTransform
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform
from DeepMultimodalRegLib.transforms.itk_io import write_transform


def smooth_image(geometry: ImageGeometry, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *geometry.shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(x, (1,) * 6, mode="replicate"), 3, 1)
    return x[0, 0]


def sitk_image(data: torch.Tensor, geometry: ImageGeometry):
    image = sitk.GetImageFromArray(data.numpy())
    geometry.copy_to_sitk(image)
    return image


def sitk_resample(moving: torch.Tensor, moving_geometry, reference: ImageGeometry, path) -> np.ndarray:
    transform = sitk.ReadTransform(str(path))
    ref = sitk.Image(reference.size_xyz, sitk.sitkFloat64)
    reference.copy_to_sitk(ref)
    out = sitk.Resample(sitk_image(moving, moving_geometry), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


@pytest.fixture
def grids():
    # an oblique, anisotropic moving scan and the LPS-aligned working grid of the fixed one
    c, s = np.cos(0.3), np.sin(0.3)
    moving_geometry = ImageGeometry(shape=(30, 34, 32), spacing=(4.0, 3.5, 4.5), origin=(-70.0, -55.0, -62.0),
                                    direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    fixed_scan = ImageGeometry(shape=(40, 44, 36), spacing=(3.0, 3.0, 3.2), origin=(-50.0, -61.0, -60.0))
    return moving_geometry, working_grid(fixed_scan, size=32, spacing_mm=4.0)


def compare(ours: torch.Tensor, theirs: np.ndarray, moving: torch.Tensor):
    ours = ours.numpy()
    inside = theirs != 0  # points mapped outside the moving image are 0 for both; compare where sampled
    assert inside.mean() > 0.3
    scale = float(moving.abs().max())
    assert np.abs(ours[inside] - theirs[inside]).max() < 1e-4 * scale
    assert np.abs(ours[~inside]).max() < 1e-3 * scale or (~inside).sum() == 0


def test_rigid_warp_matches_simpleitk(grids, tmp_path):
    moving_geometry, fixed_grid = grids
    moving = smooth_image(moving_geometry, 0)
    theta = torch.tensor([[0.2, -0.35, 0.5, 4.0, -7.0, 3.0]], dtype=torch.float64)
    c_f, c_m = torch.tensor([[3.0, -2.0, 5.0]], dtype=torch.float64), torch.tensor([[-4.0, 6.0, 1.0]], dtype=torch.float64)
    points = grid_points(fixed_grid, dtype=torch.float64)
    ours = sample_moving(moving[None, None], moving_geometry, apply_homogeneous(rigid_homogeneous(theta, c_f, c_m), points))
    path = write_transform(rigid_export(theta, c_f, c_m), tmp_path / "rigid.tfm")
    theirs = sitk_resample(moving, moving_geometry, fixed_grid, path)
    compare(ours[0, 0], theirs, moving)
    # the way MS-ODE's level fields warp (index → physical → T_θ → moving grid folded into one map), in
    # float64 and in the float32 of registration
    for dtype in (torch.float64, torch.float32):
        grid = rigid_sampling_grid(theta.to(dtype), c_f.to(dtype), c_m.to(dtype), fixed_grid, moving_geometry)
        folded = sample_moving_grid(moving[None, None].to(dtype), moving_geometry, grid)
        compare(folded[0, 0].double(), theirs, moving)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_bspline_warp_matches_simpleitk(grids, tmp_path, level):
    moving_geometry, fixed_grid = grids
    moving = smooth_image(moving_geometry, 1)
    control = control_grid_for_domain(fixed_grid, mesh_size=(4, 4, 4))
    coefficients = 6.0 * torch.randn(1, 3, *control.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c_f, c_m = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64), torch.tensor([[-2.0, 5.0, 4.0]], dtype=torch.float64)
    pre_theta = torch.tensor([[0.1, 0.05, -0.2, 2.0, 0.0, -1.0]], dtype=torch.float64)
    geometry = level_geometries(fixed_grid, 3)[level]  # the coarse levels evaluate the same spline
    points = grid_points(geometry, dtype=torch.float64)
    u = BSplineBasis(control, geometry, dtype=torch.float64)(coefficients)
    mapped = apply_homogeneous(rigid_homogeneous(pre_theta, c_f, c_m), field_points(points, u))
    ours = sample_moving(moving[None, None], moving_geometry, mapped)
    transform = CompositeTransform([rigid_export(pre_theta, c_f, c_m), BSplineTransform(control, coefficients)])
    path = write_transform(transform, tmp_path / "hybrid.h5")
    theirs = sitk_resample(moving, moving_geometry, geometry, path)
    compare(ours[0, 0], theirs, moving)
    # MS-ODE's level fields fold P and the moving grid map into one matrix
    grid = homogeneous_sampling_grid(rigid_homogeneous(pre_theta, c_f, c_m), field_points(points, u), moving_geometry)
    compare(sample_moving_grid(moving[None, None], moving_geometry, grid)[0, 0], theirs, moving)
    # and the separable evaluation is the library's (gather-based) B-spline
    direct = BSplineTransform(control, coefficients).displacement(points)[0].permute(3, 0, 1, 2)
    assert torch.allclose(u[0], direct, atol=1e-9)


def test_dense_warp_matches_simpleitk(grids, tmp_path):
    moving_geometry, fixed_grid = grids
    moving = smooth_image(moving_geometry, 3)
    field = 5.0 * smooth_image(ImageGeometry(shape=(3 * 32, 32, 32)), 4).reshape(3, 32, 32, 32)[None]
    c_f, c_m = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64), torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)
    zero = torch.zeros(1, 6, dtype=torch.float64)
    points = grid_points(fixed_grid, dtype=torch.float64)
    mapped = apply_homogeneous(rigid_homogeneous(zero, c_f, c_m), field_points(points, field))
    ours = sample_moving(moving[None, None], moving_geometry, mapped)
    transform = CompositeTransform([rigid_export(zero, c_f, c_m), DisplacementFieldTransform(fixed_grid, field)])
    path = write_transform(transform, tmp_path / "dense.h5")
    compare(ours[0, 0], sitk_resample(moving, moving_geometry, fixed_grid, path), moving)
