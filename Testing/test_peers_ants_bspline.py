"""Benchmark peers: ANTsPy rigid / SyN (optional, skipped without antspyx) and SimpleITK rigid + B-spline.

Every case is a real Kirby21 scan on a 40³ grid of 4 mm that keeps the scan's x-flipped direction,
moved by a known transform, so the point maps are checked against the truth and against each
tool's own point mapping (ANTs' ``apply_transforms_to_points``, SimpleITK's ``TransformPoint``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_scan

SIZE, SPACING = 40, 4.0


def _threads_one():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@pytest.fixture(scope="module")
def kirby_small(one_torch_thread):
    """(T1, T2) of Kirby21 on a 40³ × 4 mm grid centred on the scan, with the scan's own direction."""
    from DeepMultimodalRegLib.image.geometry import ImageGeometry
    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.msode.grids import resample_onto

    _threads_one()
    t1 = read_volume(shared_scan("mr_kirby21_113/t1_mprage.nii.gz")).float()
    t2 = read_volume(shared_scan("mr_kirby21_113/t2.nii.gz")).float()
    g = t1.geometry
    origin = np.asarray(g.center) - g.direction_matrix @ np.full(3, SPACING * (SIZE - 1) / 2)
    grid = ImageGeometry(shape=(SIZE,) * 3, spacing=(SPACING,) * 3, origin=tuple(origin), direction=g.direction)
    return resample_onto(t1, grid), resample_onto(t2, grid)


def _rmse(estimate, truth, points) -> float:
    a = estimate.select(0).transform_points(points)[0].double()
    b = truth.select(0).transform_points(points)[0].double()
    return float(torch.sqrt(((a - b) ** 2).sum(-1).mean()))


def _rigid(fixed, degrees, shift_mm):
    from DeepMultimodalRegLib.transforms.linear import RigidTransform

    theta = torch.tensor([*np.radians(degrees), *shift_mm], dtype=torch.float64)
    return RigidTransform(theta, torch.tensor(fixed.geometry.center, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ ANTsPy
@pytest.fixture(scope="module")
def ants_module():
    pytest.importorskip("ants", reason="antspyx (optional benchmark peer, extra 'benchmarks') is not installed")
    from DeepMultimodalRegLib.peers.ants_registration import import_ants

    return import_ants(threads=1)


def test_ants_rigid_recovers_known_motion_and_matches_ants_points(kirby_small, ants_module, tmp_path):
    from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy
    from DeepMultimodalRegLib.peers.ants_registration import ants_transform_points, register_ants

    t1, t2 = kirby_small
    truth = _rigid(t1, (10.0, -8.0, 12.0), (6.0, -4.0, 5.0))
    moving = misaligned_copy(t2, truth, margin_mm=20.0)
    points = foreground_points(t1, 1000, seed=0)
    result = register_ants(t1, moving, "rigid", threads=1, seed=0, output_prefix=tmp_path / "rigid_")
    assert _rmse(result.transform, truth, points) < 1.5
    assert _rmse(_rigid(t1, (0, 0, 0), (0, 0, 0)), truth, points) > 10  # the motion was not trivial
    ours = result.transform.transform_points(points)[0].numpy()
    assert np.abs(ours - ants_transform_points(result.figures["fwdtransforms"], points)).max() < 1e-3
    assert result.seconds > 0 and result.warped.geometry.same_grid(t1.geometry)


def test_ants_syn_point_map_is_affine_after_warp_as_ants_applies_it(kirby_small, ants_module, tmp_path):
    """The SyN files [1Warp, 0GenericAffine] map a fixed point x to A(W(x)); W(A(x)) would be wrong."""
    from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy
    from DeepMultimodalRegLib.peers.ants_registration import ants_transform_points, register_ants
    from DeepMultimodalRegLib.transforms.composite import CompositeTransform

    t1, t2 = kirby_small
    truth = _rigid(t1, (6.0, 4.0, -5.0), (3.0, 2.0, -4.0))
    moving = misaligned_copy(t2, truth, margin_mm=20.0)
    points = foreground_points(t1, 500, seed=1)
    result = register_ants(t1, moving, "syn", threads=1, seed=0, output_prefix=tmp_path / "syn_",
                           reg_iterations=(20, 10, 0))
    reference = ants_transform_points(result.figures["fwdtransforms"], points)
    ours = result.transform.transform_points(points)[0].numpy()
    assert np.abs(ours - reference).max() < 1e-3
    affine, warp = result.transform.transforms
    swapped = CompositeTransform([warp, affine]).transform_points(points)[0].numpy()
    assert np.abs(swapped - reference).max() > 10 * np.abs(ours - reference).max()
    # a sanity bound only: SyN on a 40³ crop of T2 → T1 bends the rigid truth by a few mm at the crop's edges
    assert _rmse(result.transform, truth, points) < 0.5 * _rmse(_rigid(t1, (0, 0, 0), (0, 0, 0)), truth, points)


def test_ants_missing_raises_not_available(monkeypatch):
    import builtins

    from DeepMultimodalRegLib.errors import NotAvailableError
    from DeepMultimodalRegLib.peers import ants_registration

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ants" or name.startswith("ants."):
            raise ImportError("No module named 'ants'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(NotAvailableError, match="antspyx"):
        ants_registration.import_ants()


# ------------------------------------------------------------------------------ SimpleITK B-spline
def test_sitk_bspline_point_map_matches_simpleitk_and_recovers_smooth_deformation(kirby_small):
    import SimpleITK as sitk

    from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy
    from DeepMultimodalRegLib.peers.simpleitk_bspline import register_rigid_bspline_mattes
    from DeepMultimodalRegLib.transforms.bspline import BSplineTransform, control_grid_for_domain
    from DeepMultimodalRegLib.transforms.composite import CompositeTransform
    from DeepMultimodalRegLib.transforms.itk_io import to_sitk
    from DeepMultimodalRegLib.transforms.resample import warp_volume

    _threads_one()
    t1, _ = kirby_small
    # known smooth deformation B (3 intervals per axis, σ = 5 mm) of the fixed, and a rigid motion R
    grid = control_grid_for_domain(t1.geometry, mesh_size=(3, 3, 3))
    coefficients = torch.randn(1, 3, *grid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    deformation = BSplineTransform(grid, coefficients)
    rigid = _rigid(t1, (4.0, -3.0, 5.0), (3.0, -2.0, 2.0))
    fixed = warp_volume(t1, deformation, t1.geometry)  # fixed(x) = T1(B(x))
    moving = misaligned_copy(t1, rigid, margin_mm=16.0)  # moving(R(y)) = T1(y)
    truth = CompositeTransform([rigid, deformation])  # fixed x → moving R(B(x))
    points = foreground_points(fixed, 1000, seed=0)

    result = register_rigid_bspline_mattes(fixed, moving, control_spacing_mm=40.0, iterations=30,
                                           sampling_fraction=0.2, seed=0, shrink_factors=(2, 1),
                                           smoothing_sigmas=(1, 0))
    # the point map is SimpleITK's own composite (rigid added first) to round-off
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(to_sitk(result.transform.transforms[0]))
    composite.AddTransform(to_sitk(result.transform.transforms[1]))
    oracle = np.array([composite.TransformPoint(tuple(map(float, p))) for p in points.numpy()])
    assert np.abs(result.transform.transform_points(points)[0].numpy() - oracle).max() < 1e-6
    # and the B-spline stage recovers much of the deformation the rigid stage cannot
    initial = _rmse(_rigid(t1, (0, 0, 0), (0, 0, 0)), truth, points)
    rigid_only = _rmse(result.transform.transforms[0], truth, points)
    final = _rmse(result.transform, truth, points)
    assert final < 0.7 * rigid_only < initial, (initial, rigid_only, final)
    assert result.figures["bspline_iterations"] > 0 and len(result.history) == 2
