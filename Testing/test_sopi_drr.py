"""SOPI projector: C-arm geometry, pose convention, DRR against analytic line integrals, pose
gradients against finite differences, point projection, SE(3) distances, field-of-view checks."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.image import Volume
from DeepMultimodalRegLib.sopi.drr import MU_WATER_PER_MM, DRRProjector, check_field_of_view, check_hu_like
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry, read_geometry, write_geometry
from DeepMultimodalRegLib.sopi.pose import (as_pose_tensor, carm_to_ct_matrix, ct_to_carm_matrix,
                                            geodesic_distance, matrix_to_pose, pose_errors, pose_matrix)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _phantom(n=48, spacing=2.0, kind="cube", half_voxels=10, value_hu=1000.0):
    """A (z, y, x) CT centred on the origin: a cube of ±half_voxels voxels, or a Gaussian blob."""
    c = (np.arange(n) - (n - 1) / 2)
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    if kind == "cube":
        inside = (np.abs(xx) <= half_voxels) & (np.abs(yy) <= half_voxels) & (np.abs(zz) <= half_voxels)
        hu = np.where(inside, value_hu, -1000.0)
    else:  # Gaussian blob of attenuation, sigma in mm
        sigma = 12.0
        r2 = (xx ** 2 + yy ** 2 + zz ** 2) * spacing ** 2
        hu = -1000.0 + 1000.0 * np.exp(-r2 / (2 * sigma ** 2))  # μ = μ_water · exp(...)
    origin = -(n - 1) / 2 * spacing
    return Volume.from_numpy(hu.astype(np.float32), spacing=(spacing,) * 3, origin=(origin,) * 3, name=kind)


def _rays_in_ct(geometry: CarmGeometry, pose, ct: Volume):
    """Source and unit ray directions (to each pixel centre) in CT LPS mm, and source→pixel lengths."""
    m = carm_to_ct_matrix(as_pose_tensor(pose), ct.geometry.center)[0].numpy()
    pix = geometry.pixel_centers(dtype=torch.float64).reshape(-1, 3).numpy()
    src = np.asarray(geometry.source_position)
    s = m[:3, :3] @ src + m[:3, 3]
    p = pix @ m[:3, :3].T + m[:3, 3]
    d = p - s
    return s, d / np.linalg.norm(d, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- geometry
def test_geometry_json_round_trip_and_shipped_file(tmp_path):
    from conftest import REPO

    shipped = read_geometry(REPO / "Resources" / "Geometry" / "carm_geometry.json")
    assert shipped.source_to_detector_mm == pytest.approx(1011.7)
    assert shipped.shape == (256, 256)
    assert shipped.pixel_spacing_mm[0] == pytest.approx(0.19959 * 4)
    g = CarmGeometry(source_to_isocenter_mm=550, detector_rows=40, detector_cols=30, pixel_spacing_mm=(1.2, 1.1),
                     principal_point_mm=(2.0, -3.0))
    assert read_geometry(write_geometry(g, tmp_path / "g.json")) == g
    small = shipped.resized(64)
    assert small.pixel_spacing_mm[0] * 64 == pytest.approx(shipped.pixel_spacing_mm[0] * 256)


@pytest.mark.parametrize("change, message", [
    ({"source_to_detector_mm": -1000}, "source_to_detector_mm must be positive"),
    ({"source_to_isocenter_mm": 2000}, "source_to_isocenter_mm must lie between"),
    ({"detector_rows": 0}, "smaller than one pixel"),
    ({"detector_cols": 2.5}, "whole number"),
    ({"pixel_spacing_mm": [0.5, -1]}, "pixel_spacing_mm must be positive"),
    ({"pixel_spacing_mm": "abc"}, "pixel_spacing_mm"),
    ({"source_to_detector_mm": None}, "must be a number"),
])
def test_geometry_rejects_impossible_values(tmp_path, change, message):
    data = CarmGeometry().as_dict()
    data.update(change)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidParameterError, match=message):
        read_geometry(path)


def test_geometry_file_missing_or_incomplete(tmp_path):
    with pytest.raises(InvalidParameterError, match="not found"):
        read_geometry(tmp_path / "nope.json")
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"source_to_detector_mm": 1000}))
    with pytest.raises(InvalidParameterError, match="missing source_to_isocenter_mm"):
        read_geometry(path)
    path.write_text("{not json")
    with pytest.raises(InvalidParameterError, match="cannot read"):
        read_geometry(path)


def test_geometry_from_dicom_tags():
    import SimpleITK as sitk

    from DeepMultimodalRegLib.sopi.geometry import geometry_from_dicom_tags

    image = sitk.Image(30, 20, sitk.sitkUInt16)
    assert geometry_from_dicom_tags(image) is None
    image.SetMetaData("0018|1110", "1100.5")
    image.SetMetaData("0018|1111", "700")
    image.SetMetaData("0018|1164", "0.3\\0.25")
    g = geometry_from_dicom_tags(image)
    assert (g.source_to_detector_mm, g.source_to_isocenter_mm, g.shape, g.pixel_spacing_mm) == (
        1100.5, 700.0, (20, 30), (0.3, 0.25))


# ---------------------------------------------------------------------------------- pose
def test_pose_matrix_follows_paper_composition_and_round_trips():
    pose = torch.tensor([[12.0, -7.0, 25.0, 10.0, -4.0, 3.0]], dtype=torch.float64)
    a = pose_matrix(pose)[0].numpy()
    rx, ry, rz = np.deg2rad([12.0, -7.0, 25.0])
    mx = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    my = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    mz = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    np.testing.assert_allclose(a[:3, :3], mx @ my @ mz, atol=1e-12)  # A = M_t · M_rx · M_ry · M_rz
    np.testing.assert_allclose(a[:3, 3], [10.0, -4.0, 3.0])
    np.testing.assert_allclose(matrix_to_pose(pose_matrix(pose)).numpy(), pose.numpy(), atol=1e-9)
    c = (3.0, -20.0, 40.0)
    both = ct_to_carm_matrix(pose, c) @ carm_to_ct_matrix(pose, c)
    np.testing.assert_allclose(both[0].numpy(), np.eye(4), atol=1e-12)


def test_nominal_pose_is_an_ap_view():
    """θ = 0: the CT centre sits at the isocentre, the beam runs anterior → posterior (LPS +y)."""
    c = np.array([5.0, -3.0, 100.0])
    m = ct_to_carm_matrix(torch.zeros(1, 6, dtype=torch.float64), c)[0].numpy()
    np.testing.assert_allclose(m[:3, :3] @ c + m[:3, 3], 0, atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ [0, 1, 0], [1, 0, 0], atol=1e-12)  # posterior = along the beam
    np.testing.assert_allclose(m[:3, :3] @ [0, 0, 1], [0, 0, -1], atol=1e-12)  # superior = up the image


def test_geodesic_distance_known_cases():
    zero = torch.zeros(1, 6, dtype=torch.float64)
    # pure rotation by 30° about an axis: distance 30° in radians (× weight)
    assert geodesic_distance(zero, [[30.0, 0, 0, 0, 0, 0]]).item() == pytest.approx(math.radians(30))
    assert geodesic_distance(zero, [[0, 0, 30.0, 0, 0, 0]], mm_per_radian=100).item() == pytest.approx(
        100 * math.radians(30))
    # pure translation: Euclidean length
    assert geodesic_distance(zero, [[0, 0, 0, 3.0, 4.0, 12.0]]).item() == pytest.approx(13.0)
    # a screw motion (rotation about x with translation along x): sqrt(θ² + t²)
    assert geodesic_distance(zero, [[40.0, 0, 0, 5.0, 0, 0]]).item() == pytest.approx(
        math.hypot(math.radians(40), 5.0))
    # symmetric and left-invariant
    a, b = [[10.0, -5, 20, 3, 4, -2]], [[-3.0, 8, 2, -6, 1, 9]]
    assert geodesic_distance(a, b).item() == pytest.approx(geodesic_distance(b, a).item(), rel=1e-9)
    g = pose_matrix([[7.0, 3, -9, 12, -5, 4]])
    ma, mb = g @ pose_matrix(a), g @ pose_matrix(b)
    assert geodesic_distance(matrix_to_pose(ma), matrix_to_pose(mb)).item() == pytest.approx(
        geodesic_distance(a, b).item(), rel=1e-6)
    # near 180°
    assert geodesic_distance(zero, [[179.99, 0, 0, 0, 0, 0]]).item() == pytest.approx(math.radians(179.99), rel=1e-4)
    rot, trans = pose_errors([[0, 0, 10.0, 3.0, 0, 4.0]], zero)
    assert rot[0] == pytest.approx(10.0) and trans[0] == pytest.approx(5.0)


# ---------------------------------------------------------------------------------- DRR values
@pytest.mark.parametrize("pose", [(0, 0, 0, 0, 0, 0), (10.0, 25.0, -15.0, 30.0, 8.0, -6.0)])
def test_drr_of_cube_matches_analytic_chords(pose):
    ct = _phantom(n=49, kind="cube", half_voxels=10)  # odd n: voxel centres at integer offsets, 21 voxels across
    geometry = CarmGeometry().resized(40)
    drr = DRRProjector(ct, geometry, step_mm=0.5).render([pose])[0].double().numpy().ravel()
    s, d = _rays_in_ct(geometry, pose, ct)
    half = 10.5 * 2.0  # cube faces half a voxel beyond the outer voxel centres (mm)
    with np.errstate(divide="ignore", invalid="ignore"):
        ta, tb = (-half - s) / d, (half - s) / d
    t0, t1 = np.minimum(ta, tb).max(1), np.maximum(ta, tb).min(1)
    chord = np.clip(t1 - t0, 0, None)
    expected = 0.04 * chord  # μ = 0.02 · (1 + 1000/1000)
    # keep rays that enter and leave through faces at least 3 voxels from any edge
    margin = half - 6.0
    p0, p1 = s + t0[:, None] * d, s + t1[:, None] * d

    def clean(p):
        inner = np.abs(p) <= margin
        return inner.sum(1) >= 2  # the two coordinates other than the face normal are inside

    keep = (chord > 0) & clean(p0) & clean(p1)
    assert keep.sum() > 50
    np.testing.assert_allclose(drr[keep], expected[keep], rtol=2e-3, atol=2e-4)
    with np.errstate(divide="ignore", invalid="ignore"):  # rays missing the box grown by one voxel: nothing
        ga, gb = (-half - 2.0 - s) / d, (half + 2.0 - s) / d
    miss = np.minimum(ga, gb).max(1) >= np.maximum(ga, gb).min(1)
    assert miss.sum() > 100 and np.all(drr[miss] < 1e-6)


def test_drr_of_gaussian_blob_matches_analytic_integral():
    ct = _phantom(n=64, kind="gauss")
    geometry = CarmGeometry().resized(32)
    pose = (5.0, -10.0, 20.0, 15.0, 4.0, -3.0)
    drr = DRRProjector(ct, geometry).render([pose])[0].double().numpy().ravel()
    s, d = _rays_in_ct(geometry, pose, ct)
    centre = np.zeros(3)
    closest = s + ((centre - s) * d).sum(1, keepdims=True) * d
    dist2 = (closest ** 2).sum(1)
    sigma = 12.0
    expected = MU_WATER_PER_MM * sigma * math.sqrt(2 * math.pi) * np.exp(-dist2 / (2 * sigma ** 2))
    np.testing.assert_allclose(drr, expected, atol=0.01 * expected.max())


def test_batching_and_chunking_do_not_change_the_drr():
    ct = _phantom(kind="gauss")
    geometry = CarmGeometry().resized(24)
    poses = torch.tensor([[0, 0, 0, 0, 0, 0], [10.0, -5, 3, 20, 4, -7]], dtype=torch.float64)
    big = DRRProjector(ct, geometry).render(poses)
    small = DRRProjector(ct, geometry, chunk_samples=5000).render(poses)
    one = DRRProjector(ct, geometry).render(poses[1:])
    torch.testing.assert_close(big, small)
    torch.testing.assert_close(big[1:], one)


def test_bright_voxel_lands_where_the_geometry_projects_it():
    n, spacing = 40, 2.0
    hu = np.full((n, n, n), -1000.0, dtype=np.float32)
    k, j, i = 25, 14, 9  # (z, y, x) index of the bright voxel, off centre
    hu[k, j, i] = 30000.0
    ct = Volume.from_numpy(hu, spacing=(spacing,) * 3, origin=(-39.0, 10.0, 50.0))
    geometry = CarmGeometry().resized(64)
    pose = (8.0, -12.0, 15.0, 20.0, -5.0, 7.0)
    drr = DRRProjector(ct, geometry, step_mm=0.25).render([pose])[0].double().numpy()
    point = ct.geometry.index_to_physical_matrix() @ np.array([i, j, k, 1.0])
    in_carm = ct_to_carm_matrix(as_pose_tensor(pose), ct.geometry.center)[0].numpy() @ point
    row, col = geometry.project(in_carm[:3])
    rr, cc = np.unravel_index(np.argmax(drr), drr.shape)
    window = drr[rr - 3:rr + 4, cc - 3:cc + 4]
    w = window / window.sum()
    gr, gcol = np.mgrid[rr - 3:rr + 4, cc - 3:cc + 4]
    assert (w * gr).sum() == pytest.approx(row, abs=0.3)
    assert (w * gcol).sum() == pytest.approx(col, abs=0.3)


# ---------------------------------------------------------------------------------- gradients
def test_drr_pose_gradient_matches_finite_differences():
    ct = _phantom(n=48, kind="gauss")
    geometry = CarmGeometry().resized(16)
    projector = DRRProjector(ct, geometry, step_mm=1.0)
    weights = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 16))).float()
    pose = torch.tensor([[4.0, -6.0, 9.0, 12.0, 5.0, -4.0]], dtype=torch.float64, requires_grad=True)
    loss = (projector.render(pose)[0] * weights).sum()
    (grad,) = torch.autograd.grad(loss, pose)
    fd = []
    for a in range(6):
        h = 0.25
        plus, minus = pose.detach().clone(), pose.detach().clone()
        plus[0, a] += h
        minus[0, a] -= h
        with torch.no_grad():
            fd.append(((projector.render(plus)[0] * weights).sum() - (projector.render(minus)[0] * weights).sum())
                      .item() / (2 * h))
    fd = np.asarray(fd)
    np.testing.assert_allclose(grad[0].numpy(), fd, rtol=0.03, atol=0.01 * np.abs(fd).max())


def test_gradients_flow_through_chunks_and_batches():
    ct = _phantom(kind="gauss")
    projector = DRRProjector(ct, CarmGeometry().resized(12), chunk_samples=3000)
    pose = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    projector.render(pose).sum().backward()
    assert pose.grad is not None and torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- checks
def test_field_of_view_errors():
    ct = _phantom(kind="cube")
    projector = DRRProjector(ct, CarmGeometry().resized(16))
    check_field_of_view(projector, [(0, 0, 0, 0, 0, 0)])
    with pytest.raises(InvalidParameterError, match="outside the detector's field of view"):
        check_field_of_view(projector, [(0, 0, 0, 0, 500.0, 0)])
    with pytest.raises(InvalidParameterError, match="behind the X-ray source"):
        check_field_of_view(projector, [(0, 0, 0, -590.0, 0, 0)])


def test_hu_check_warns_for_non_ct_intensities():
    ct = _phantom(kind="cube")
    assert check_hu_like(ct) is None
    mr_like = ct.with_data(torch.rand(ct.shape) * 400)
    assert "Hounsfield" in check_hu_like(mr_like)


def test_render_drr_warns_on_mr_like_volume(caplog):
    from DeepMultimodalRegLib.sopi.register import validate_ct

    ct = _phantom(kind="cube")
    with caplog.at_level(logging.WARNING):
        validate_ct(ct.with_data(torch.rand(ct.shape) * 400 + 10))
    assert "Hounsfield" in caplog.text
