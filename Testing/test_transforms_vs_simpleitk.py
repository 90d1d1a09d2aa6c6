"""Every transform type against SimpleITK's resampler on real scans (the oracle), file round trips,
batched vs one-by-one, and gradients vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.transforms import (AffineTransform, BSplineTransform, CompositeTransform,
                                             DisplacementFieldTransform, RigidTransform, read_transform, resample,
                                             write_transform)


def _random_transform(kind: str, volume, seed: int):
    g = torch.Generator().manual_seed(seed)
    center = torch.as_tensor(volume.geometry.center)
    geometry = volume.geometry

    def rigid():
        angles = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.4  # ±11°
        shifts = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 20  # ±10 mm
        return RigidTransform(torch.cat([angles, shifts]), center)

    def bspline():
        b = BSplineTransform.zeros(geometry, control_spacing_mm=60.0, dtype=torch.float64)
        return BSplineTransform(b.grid, 5 * torch.randn(b.coefficients.shape, generator=g, dtype=torch.float64))

    if kind == "rigid":
        return rigid()
    if kind == "affine":
        m = torch.eye(3, dtype=torch.float64) + 0.08 * (torch.rand(3, 3, generator=g, dtype=torch.float64) - 0.5)
        return AffineTransform.from_matrix(m, torch.randn(3, generator=g, dtype=torch.float64) * 5, center)
    if kind == "bspline":
        return bspline()
    if kind == "displacement":
        grid = geometry.resampled(8.0)
        field = 4 * torch.randn(1, 3, *grid.shape, generator=g)
        return DisplacementFieldTransform(grid, field)
    if kind == "composite":
        return CompositeTransform([rigid(), bspline()])
    raise ValueError(kind)


KINDS = ["rigid", "affine", "bspline", "displacement", "composite"]
SUFFIX = {"rigid": ".tfm", "affine": ".tfm", "bspline": ".tfm", "displacement": ".h5", "composite": ".h5"}


def _sitk_resample(image, transform_path, default):
    t = sitk.ReadTransform(str(transform_path))
    return sitk.GetArrayFromImage(sitk.Resample(image, image, t, sitk.sitkLinear, default, sitk.sitkFloat32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scan", ["pelvis_ct", "brain_t1_real_crop"])
def test_exported_file_resamples_like_simpleitk(kind, scan, request, tmp_path):
    volume = request.getfixturevalue(scan)
    transform = _random_transform(kind, volume, seed=KINDS.index(kind))
    path = write_transform(transform, tmp_path / f"t{SUFFIX[kind]}")
    default = float(volume.data.min())
    expected = _sitk_resample(volume.to_sitk(), path, default)
    ours = resample(volume, transform, volume.geometry, default_value=default)[0].numpy()
    # compare inside the overlap: where SimpleITK found the point inside the moving image
    ones = sitk.Image(volume.to_sitk().GetSize(), sitk.sitkFloat32) + 1
    ones.CopyInformation(volume.to_sitk())
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, ones, sitk.ReadTransform(str(path)),
                                                  sitk.sitkNearestNeighbor, 0.0)) > 0
    assert inside.mean() > 0.5
    value_range = float(volume.data.max() - volume.data.min())
    mad = np.abs(expected - ours)[inside].mean()
    assert mad < 0.01 * value_range, f"{kind}: mean abs difference {mad:.4g} vs range {value_range:.4g}"
    # and far tighter in fact: same interpolation rules, so only float rounding differs
    assert mad < 1e-4 * value_range


@pytest.mark.parametrize("kind", KINDS)
def test_points_match_simpleitk_transform_point(kind, pelvis_ct, tmp_path):
    transform = _random_transform(kind, pelvis_ct, seed=10 + KINDS.index(kind))
    path = write_transform(transform, tmp_path / f"t{SUFFIX[kind]}")
    st = sitk.ReadTransform(str(path))
    g = torch.Generator().manual_seed(3)
    points = torch.as_tensor(pelvis_ct.geometry.center) + 120 * (torch.rand(200, 3, generator=g, dtype=torch.float64) - 0.5)
    ours = transform.transform_points(points.to(transform.dtype))[0].double().numpy()
    theirs = np.array([st.TransformPoint(tuple(p)) for p in points.numpy()])
    assert np.abs(ours - theirs).max() < 1e-3  # mm


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".tfm", ".h5"])
def test_file_round_trip(kind, suffix, pelvis_ct, tmp_path):
    transform = _random_transform(kind, pelvis_ct, seed=20 + KINDS.index(kind))
    if kind in ("displacement", "composite") and suffix == ".tfm":
        from DeepMultimodalRegLib.errors import TransformFileError
        if kind == "displacement":
            with pytest.raises(TransformFileError):
                write_transform(transform, tmp_path / f"t{suffix}")
            return
    path = write_transform(transform, tmp_path / f"t{suffix}")
    back = read_transform(path)
    assert type(back) is type(transform)
    points = pelvis_ct.geometry.physical_grid(dtype=torch.float64)[::10, ::10, ::10].reshape(-1, 3)
    a = transform.transform_points(points.to(transform.dtype))[0].double()
    b = back.transform_points(points.to(back.dtype))[0].double()
    assert torch.allclose(a, b, atol=1e-4)


def test_displacement_field_image_round_trip(pelvis_ct, tmp_path):
    bspline = _random_transform("bspline", pelvis_ct, seed=5)
    path = write_transform(bspline, tmp_path / "field.nii.gz", reference=pelvis_ct.geometry)
    field = read_transform(path)
    assert isinstance(field, DisplacementFieldTransform)
    # at the voxel centres the rasterised field reproduces the B-spline exactly (float32 storage)
    points = pelvis_ct.geometry.physical_grid(dtype=torch.float64)[::7, ::7, ::7].reshape(-1, 3)
    assert torch.allclose(field.transform_points(points.float())[0].double(),
                          bspline.transform_points(points)[0], atol=1e-3)
    # and SimpleITK reads the same file as a displacement-field transform
    st = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    p = points[100].tolist()
    assert np.allclose(st.TransformPoint(p), bspline.transform_points(points[100:101])[0, 0].numpy(), atol=1e-3)


@pytest.mark.parametrize("kind", ["rigid", "affine", "bspline"])
def test_batched_resampling_equals_one_by_one(kind, pelvis_ct):
    transforms = [_random_transform(kind, pelvis_ct, seed=s) for s in range(4)]
    if kind == "bspline":
        batch = BSplineTransform(transforms[0].grid, torch.cat([t.coefficients for t in transforms]))
    else:
        batch = type(transforms[0])(torch.cat([t.parameters for t in transforms]), transforms[0].center[0])
    small = pelvis_ct.geometry.resampled(6.0)
    together = resample(pelvis_ct, batch, small, chunk_bytes=2 * 1024 ** 2)  # force several slabs
    for i, t in enumerate(transforms):
        alone = resample(pelvis_ct, t, small)
        assert torch.allclose(together[i], alone[0], atol=1e-3)


def _small_smooth_volume():
    from DeepMultimodalRegLib.image import Volume

    z, y, x = torch.meshgrid(torch.linspace(-1, 1, 12), torch.linspace(-1, 1, 14), torch.linspace(-1, 1, 16),
                             indexing="ij")
    data = torch.exp(-3 * (x ** 2 + 2 * y ** 2 + 0.5 * z ** 2)) + 0.3 * torch.sin(3 * x + 2 * z)
    return Volume(data.double(), __import__("DeepMultimodalRegLib").image.ImageGeometry(
        shape=(12, 14, 16), spacing=(2.0, 1.5, 2.5), origin=(-10.0, 5.0, 3.0)))


def test_gradients_match_finite_differences_rigid_affine():
    volume = _small_smooth_volume()
    center = torch.as_tensor(volume.geometry.center)
    reference = volume.geometry

    def loss_rigid(p):
        return (resample(volume, RigidTransform(p, center), reference)[0] ** 2).sum()

    p = torch.tensor([[0.05, -0.03, 0.04, 1.3, -0.7, 0.9]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_rigid, (p,), eps=1e-6, atol=1e-4, rtol=1e-3)

    def loss_affine(p):
        return (resample(volume, AffineTransform(p, center), reference)[0] ** 2).sum()

    # an irregular matrix: no voxel lands exactly on the image's edge, where ITK's inside rule jumps
    noise = 0.03 * torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = torch.cat([torch.eye(3, dtype=torch.float64).reshape(9) + noise, torch.tensor([0.5, -1.1, 0.3],
                                                                                      dtype=torch.float64)])
    a = a.reshape(1, 12).requires_grad_(True)
    assert torch.autograd.gradcheck(loss_affine, (a,), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_gradients_match_finite_differences_bspline_and_field():
    volume = _small_smooth_volume()
    reference = volume.geometry
    b = BSplineTransform.zeros(reference, mesh_size=(2, 2, 2), dtype=torch.float64)
    coeffs = (0.5 * torch.randn(b.coefficients.shape, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: (resample(volume, BSplineTransform(b.grid, c), reference)[0] ** 2).sum(),
                                    (coeffs,), eps=1e-6, atol=1e-4, rtol=1e-3)
    grid = reference.resampled(5.0)
    field = (0.4 * torch.randn(1, 3, *grid.shape, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: (resample(volume, DisplacementFieldTransform(grid, f), reference)[0] ** 2).sum(),
        (field,), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_composite_order_is_itk_order(pelvis_ct):
    r = _random_transform("rigid", pelvis_ct, 1)
    b = _random_transform("bspline", pelvis_ct, 2)
    p = torch.as_tensor(pelvis_ct.geometry.center).reshape(1, 3) + torch.tensor([[10.0, -20.0, 5.0]], dtype=torch.float64)
    expected = r.transform_points(b.transform_points(p)[0])[0]
    assert torch.allclose(CompositeTransform([r, b]).transform_points(p)[0], expected)
    assert not torch.allclose(CompositeTransform([b, r]).transform_points(p)[0], expected, atol=1e-3)


def test_inverse_of_linear(pelvis_ct):
    t = _random_transform("affine", pelvis_ct, 4)
    p = torch.randn(50, 3, dtype=torch.float64) * 50
    back = t.inverse().transform_points(t.transform_points(p)[0])[0]
    assert torch.allclose(back, p, atol=1e-9)
