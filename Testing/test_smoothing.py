"""ITK's discrete Gaussian run in torch (image/smoothing.py) against SimpleITK's own filter on real scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_scan
from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.image import ImageGeometry, Volume, read_volume
from DeepMultimodalRegLib.image.smoothing import discrete_gaussian, itk_gaussian_kernel


def _simpleitk_gaussian(volume, variances):
    import SimpleITK as sitk

    out = sitk.DiscreteGaussian(volume.float().to_sitk(), [float(v) for v in variances], 64, 0.01, True)
    return torch.from_numpy(sitk.GetArrayFromImage(out))


@pytest.mark.parametrize("scan, crop, variances", [
    # the chest CT, anisotropic (0.70 × 0.70 × 2.5 mm): DISA's 2 mm preparation (σ 0.65 mm in x, y, none in z)
    ("ct_chest_lidc0001/ct.nii.gz", (slice(40, 80), slice(150, 330), slice(140, 360)), (0.648 ** 2, 0.648 ** 2, 0.0)),
    # Kirby21 FLAIR (1.2 × 1 × 1 mm) as MS-ODE anti-aliases it for its 4 mm grid
    ("mr_kirby21_113/flair.nii.gz", (slice(40, 120), slice(60, 180), slice(40, 150)), (1.4 ** 2, 1.5 ** 2, 1.5 ** 2)),
    # a wide kernel (variance 9 mm² on 1 mm voxels: 13+ taps), reaching past the crop's edges
    ("mr_kirby21_113/t1_mprage.nii.gz", (slice(120, 132), slice(100, 140), slice(60, 100)), (9.0, 9.0, 9.0)),
])
def test_matches_simpleitk_discrete_gaussian_on_real_scans(scan, crop, variances):
    full = read_volume(shared_scan(scan)).float()
    data = full.data[crop].clone()
    volume = Volume(data, ImageGeometry(shape=tuple(data.shape), spacing=full.geometry.spacing))
    before = volume.data.clone()
    ours = discrete_gaussian(volume, variances).data
    reference = _simpleitk_gaussian(volume, variances)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    scale = float(reference.abs().max())
    assert float((ours - reference).abs().max()) <= 2e-6 * scale
    assert torch.equal(volume.data, before)  # the input is not modified
    assert not torch.equal(ours, before)  # it did smooth


def test_kernel_is_itks_and_normalised():
    kernel = np.asarray(itk_gaussian_kernel(0.25))
    assert len(kernel) % 2 == 1 and kernel.argmax() == len(kernel) // 2
    assert np.allclose(kernel, kernel[::-1], rtol=0, atol=1e-15)
    assert abs(kernel.sum() - 1.0) < 1e-12
    # a wider Gaussian has a longer kernel; variance 0 is the identity
    assert len(itk_gaussian_kernel(4.0)) > len(kernel)
    assert itk_gaussian_kernel(0.0) == (1.0,)


def test_constant_image_stays_constant_and_bad_variance_is_refused(pelvis_ct):
    flat = pelvis_ct.with_data(torch.full_like(pelvis_ct.data, -350.0))
    assert torch.allclose(discrete_gaussian(flat, 4.0).data, flat.data)
    with pytest.raises(InvalidParameterError, match="variances"):
        discrete_gaussian(pelvis_ct, (-1.0, 1.0, 1.0))
    with pytest.raises(InvalidParameterError, match="variances"):
        discrete_gaussian(pelvis_ct, float("nan"))
