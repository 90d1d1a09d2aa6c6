"""Jacobian determinant against SimpleITK's filter and known affines; device selection and seeding."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.device import InsufficientMemory, check_memory, resolve_device, seed_everything
from DeepMultimodalRegLib.errors import DeviceError
from DeepMultimodalRegLib.transforms import (AffineTransform, BSplineTransform, DisplacementFieldTransform,
                                             folding_fraction, jacobian_determinant)
from DeepMultimodalRegLib.transforms.itk_io import displacement_image


def test_jacobian_of_an_affine_is_its_determinant(pelvis_ct):
    m = torch.tensor([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.2]], dtype=torch.float64)
    t = AffineTransform.from_matrix(m, torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64))
    det = jacobian_determinant(t, pelvis_ct.geometry.resampled(9.0))
    assert np.allclose(det.numpy(), float(torch.linalg.det(m)), atol=1e-5)


def test_jacobian_of_a_field_matches_simpleitk(pelvis_ct):
    from DeepMultimodalRegLib.image import ImageGeometry

    # ITK's filter differentiates along the index axes scaled by spacing and ignores the direction
    # matrix, so it is only an oracle on an axis-aligned grid (ours uses the direction as well)
    g6 = pelvis_ct.geometry.resampled(6.0)
    grid = ImageGeometry(shape=g6.shape, spacing=(6.0, 5.0, 4.0), origin=g6.origin)
    g = torch.Generator().manual_seed(0)
    field = torch.nn.functional.avg_pool3d(6 * torch.randn(1, 3, *grid.shape, generator=g, dtype=torch.float64),
                                           3, 1, 1, count_include_pad=False)
    t = DisplacementFieldTransform(grid, field)
    ours = jacobian_determinant(t, grid).numpy()
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(displacement_image(t)))
    interior = (slice(1, -1),) * 3  # edges: both use one-sided differences, in slightly different ways
    assert np.allclose(ours[interior], theirs[interior], atol=1e-4)


def test_folding_is_detected():
    from DeepMultimodalRegLib.image import ImageGeometry

    grid = ImageGeometry(shape=(10, 10, 10), spacing=(1.0, 1.0, 1.0))
    b = BSplineTransform.zeros(grid, mesh_size=(2, 2, 2), dtype=torch.float64)
    smooth = jacobian_determinant(BSplineTransform(b.grid, 0.3 * torch.ones_like(b.coefficients)), grid)
    assert folding_fraction(smooth) == 0.0
    coeffs = torch.zeros_like(b.coefficients)
    coeffs[0, 0, :, :, 2] = 12.0  # a control column pushed far along x past its neighbours: the map folds
    folded = jacobian_determinant(BSplineTransform(b.grid, coeffs), grid)
    assert folding_fraction(folded) > 0.0


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no usable CUDA"):
            resolve_device("cuda")


def test_memory_check_refuses_impossible_jobs():
    check_memory(1024, torch.device("cpu"))
    with pytest.raises(InsufficientMemory, match="GiB"):
        check_memory(10 ** 15, torch.device("cpu"), "a petabyte job")


def test_seeding_is_deterministic():
    a = torch.rand(5, generator=seed_everything(42))
    b = torch.rand(5, generator=seed_everything(42))
    c = torch.rand(5, generator=seed_everything(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_device_report_explains_an_unusable_gpu(monkeypatch):
    import torch

    from DeepMultimodalRegLib import device as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_nvidia_gpu_present", lambda: False)
    summary, why = D.device_report()
    assert summary.startswith("CPU") and "no CUDA GPU" in why
    monkeypatch.setattr(D, "_nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in D.device_report()[1]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "driver" in D.device_report()[1]
