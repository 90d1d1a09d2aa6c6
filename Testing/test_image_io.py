"""Volumes: geometry against SimpleITK, every format SimpleITK reads, normalisation, bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.errors import ImageReadError, InvalidImageError, OutputPathError
from DeepMultimodalRegLib.image import (ImageGeometry, Volume, ct_window, percentile_scale, read_volume,
                                        validate_registration_input, write_volume, zscore)

from conftest import shared_scan


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("scan", ["ct_chest_lidc0001/ct.nii.gz", "mr_kirby21_113/t1_mprage.nii.gz",
                                  "ct_pelvis_ts/ct.nii.gz"])
def test_geometry_matches_simpleitk_index_to_point(scan):
    image = sitk.ReadImage(str(shared_scan(scan)))
    geometry = ImageGeometry.from_sitk(image)
    m = geometry.index_to_physical_matrix()
    for index in [(0, 0, 0), (5, 17, 3), tuple(s - 1 for s in image.GetSize())]:
        expected = image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])
        assert np.allclose(m[:3, :3] @ index + m[:3, 3], expected, atol=1e-6)
    point = (12.5, -30.25, 7.0)
    expected_index = image.TransformPhysicalPointToContinuousIndex(point)
    inv = geometry.physical_to_index_matrix()
    assert np.allclose(inv[:3, :3] @ point + inv[:3, 3], expected_index, atol=1e-6)
    # the (z, y, x) array convention
    volume = Volume.from_sitk(image)
    assert volume.shape == tuple(reversed(image.GetSize()))


def test_physical_grid_matches_simpleitk(pelvis_ct):
    image = pelvis_ct.to_sitk()
    grid = pelvis_ct.geometry.physical_grid(dtype=torch.float64)
    for k, j, i in [(0, 0, 0), (3, 50, 7), (111, 100, 121)]:
        assert np.allclose(grid[k, j, i].numpy(), image.TransformIndexToPhysicalPoint((i, j, k)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_write_read_round_trip_every_format(suffix, sample_t1, tmp_path):
    path = write_volume(sample_t1, tmp_path / f"t1{suffix}")
    back = read_volume(path)
    assert back.geometry.same_grid(sample_t1.geometry, tolerance_mm=1e-4)
    assert torch.equal(back.data, sample_t1.data)
    assert back.data.dtype == sample_t1.data.dtype


def test_dicom_series_folder(sample_t1, tmp_path):
    image = sitk.Cast(sample_t1.to_sitk(), sitk.sitkInt16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        s.SetMetaData("0008|0060", "MR")
        s.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2")
        s.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                                     direction[1], direction[4], direction[7])))
        s.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    volume = read_volume(folder)
    assert volume.shape == sample_t1.shape
    # GDCM may order the slices the other way round; the physical image must be the same
    from DeepMultimodalRegLib.transforms import RigidTransform, resample

    same_place = resample(volume, RigidTransform.identity(), sample_t1.geometry, interpolation="nearest")[0]
    assert torch.equal(same_place.round().to(torch.int32), sample_t1.data.to(torch.int32))


def test_normalisation_helpers_against_numpy(sample_t2):
    data = sample_t2.numpy().astype(np.float64)
    before = sample_t2.data.clone()
    scaled = percentile_scale(sample_t2, 2, 98).numpy()
    lo, hi = np.percentile(data, [2, 98])
    assert np.allclose(scaled, np.clip((data - lo) / (hi - lo), 0, 1), atol=1e-4)
    z = zscore(sample_t2).numpy()
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    assert torch.equal(sample_t2.data, before)  # inputs are never modified
    hu = Volume.from_numpy(np.array([[[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]]]))
    assert np.allclose(ct_window(hu).numpy().ravel(), [0, 0, 0.5, 1, 1])


# ---------------------------------------------------------------------------------- bad input
def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageReadError, match="cannot read"):
        read_volume(junk)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="DICOM"):
        read_volume(empty)


def test_two_d_image_is_refused_where_3d_is_needed(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((32, 40)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "slice.nii.gz"))
    volume = read_volume(tmp_path / "slice.nii.gz")
    assert volume.geometry.is_2d()
    with pytest.raises(InvalidImageError, match="2D"):
        validate_registration_input(volume, "moving", method="disa-rigid")


def test_constant_nan_and_inf_images_are_refused():
    flat = Volume.from_numpy(np.full((8, 8, 8), 7.0, dtype=np.float32), name="flat")
    with pytest.raises(InvalidImageError, match="constant"):
        validate_registration_input(flat, "fixed")
    for bad in (np.nan, np.inf):
        data = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
        data[3, 4, 5] = bad
        with pytest.raises(InvalidImageError, match="NaN or Inf"):
            validate_registration_input(Volume.from_numpy(data), "fixed")


def test_non_orthonormal_direction_is_refused(tmp_path):
    header = tmp_path / "sheared.mhd"
    (tmp_path / "sheared.raw").write_bytes(np.arange(4 * 5 * 6, dtype=np.float32).tobytes())
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementType = MET_FLOAT\n"
                      "ElementSpacing = 1 1 1\nOffset = 0 0 0\nTransformMatrix = 1 0 0 0.4 1 0 0 0 1\n"
                      "ElementDataFile = sheared.raw\n")
    with pytest.raises(InvalidImageError, match="not orthonormal"):
        read_volume(header)


def test_vector_image_is_refused_as_volume(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), dtype=np.float32), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "vec.nii.gz"))
    with pytest.raises(InvalidImageError, match="components"):
        read_volume(tmp_path / "vec.nii.gz")


def test_output_never_overwrites_an_input_and_needs_a_writable_place(sample_t1, tmp_path):
    source = write_volume(sample_t1, tmp_path / "input.nii.gz")
    digest = _md5(source)
    with pytest.raises(OutputPathError, match="input"):
        write_volume(sample_t1, source, protected=[source])
    assert _md5(source) == digest
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="not writable"):
        write_volume(sample_t1, blocker / "out.nii.gz")


def test_failed_write_leaves_the_previous_file_intact(sample_t1, tmp_path, monkeypatch):
    target = write_volume(sample_t1, tmp_path / "out.nii.gz")
    digest = _md5(target)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(RuntimeError):
        write_volume(sample_t1, target)
    assert _md5(target) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temporary left behind
