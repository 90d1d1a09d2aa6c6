"""2D/3D registration from MRML nodes: a CT volume node and an X-ray as a single-slice volume node."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
slicer = pytest.importorskip("slicer", reason="slicer-core provides MRML")

from DeepMultimodalRegLib.errors import DeepMMRegError, NotAvailableError  # noqa: E402
from DeepMultimodalRegLib.image.geometry import ImageGeometry  # noqa: E402
from DeepMultimodalRegLib.image.volume import Volume  # noqa: E402
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry, write_geometry  # noqa: E402
from DeepMultimodalRegLib.sopi.optimize import OptimizerSettings  # noqa: E402
from DeepMultimodalRegLib.sopi.pose import pose_errors  # noqa: E402
from DeepMultimodalRegLib.sopi.register import render_drr  # noqa: E402
from DeepMultimodalRegMRML.coordinates import lps_from_ras_points  # noqa: E402
from DeepMultimodalRegMRML.logic2d3d import apply_2d3d, compute_2d3d, prepare_2d3d, start_2d3d  # noqa: E402
from DeepMultimodalRegMRML.transform_nodes import transform_points_ras  # noqa: E402
from DeepMultimodalRegMRML.volumes import node_from_volume, volume_from_node  # noqa: E402

TRUTH = np.array([4.0, -3.0, 5.0, 8.0, 3.0, -2.0])


def _phantom_ct() -> Volume:
    """A water ellipsoid with a bony bar and a cross-bar (HU), 28³ voxels of 3 mm."""
    rng = np.random.default_rng(0)
    c = np.arange(28) - 13.5
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    hu = np.where(xx ** 2 + yy ** 2 + (zz / 1.3) ** 2 < 11 ** 2, 40.0, -1000.0)
    hu[(np.abs(xx - 2) < 2.5) & (np.abs(yy + 1) < 2.5)] = 900.0
    hu[(np.abs(zz - 5) < 1.5) & (np.abs(yy) < 6) & (xx > -8) & (xx < 3)] = 700.0
    hu += rng.normal(0, 5, hu.shape)
    return Volume(torch.from_numpy(hu.astype(np.float32)), ImageGeometry((28, 28, 28), (3.0, 3.0, 3.0),
                                                                        (-40.0, -40.0, 100.0)), name="phantom CT")


@pytest.fixture()
def scene_inputs(tmp_path):
    scene = slicer.vtkMRMLScene()
    ct = _phantom_ct()
    geometry = CarmGeometry().resized(32)
    xray = render_drr(ct, geometry, TRUTH, device="cpu")
    spacing = geometry.pixel_spacing_mm
    xray_volume = Volume(xray[None].float(), ImageGeometry((1, 32, 32), (spacing[1], spacing[0], 1.0)), name="xray")
    path = write_geometry(geometry, tmp_path / "carm.json")
    yield scene, node_from_volume(scene, ct), node_from_volume(scene, xray_volume), str(path)
    scene.Clear(1)


FAST = OptimizerSettings(coarse_size=16, fine_size=32, coarse_ct_mm=6.0, fine_ct_mm=3.0, starts=0, keep=1,
                         coarse_evaluations=150, fine_evaluations=150)


def test_ct_and_xray_nodes_give_the_pose_a_drr_overlay_and_a_transform_node(scene_inputs):
    scene, ct_node, xray_node, geometry = scene_inputs
    request = prepare_2d3d(ct_node, xray_node, geometry, method="opt-gc", device="cpu", optimizer_settings=FAST)
    result = compute_2d3d(request)
    outputs = apply_2d3d(scene, request, result)
    rotation, translation = pose_errors(result.pose, TRUTH)
    assert rotation[0] < 1.5 and translation[0] < 3.0, result.pose
    # the DRR lies on the X-ray's own grid, so it overlays the X-ray in the slice views
    assert outputs.drr_node.GetImageData().GetDimensions() == xray_node.GetImageData().GetDimensions()
    a, b = [np.zeros(16) for _ in range(2)]
    import vtk

    for node, out in ((outputs.drr_node, a), (xray_node, b)):
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        out[:] = [m.GetElement(r, c) for r in range(4) for c in range(4)]
    assert np.allclose(a, b)
    # the transform node maps C-arm-frame points as the library's transform does
    points = np.random.default_rng(0).uniform(-50, 50, size=(10, 3))
    expected = result.transform().transform_points(torch.as_tensor(points))[0].numpy()
    mapped = lps_from_ras_points(transform_points_ras(outputs.transform_node, lps_from_ras_points(points)))
    assert np.abs(mapped - expected).max() < 1e-6
    assert float(outputs.transform_node.GetAttribute("DeepMultimodalReg.pose.rz")) == pytest.approx(result.pose[2],
                                                                                                 abs=1e-5)
    assert "opt-gc" in outputs.summary


def test_2d3d_off_the_gui_thread_and_bad_inputs(scene_inputs):
    scene, ct_node, xray_node, geometry = scene_inputs
    done = []
    job = start_2d3d(scene, ct_node, xray_node, geometry, on_done=done.append, device="cpu", optimizer_settings=FAST)
    job.cancel()
    assert job.wait(timeout=300) == "cancelled" and not done
    with pytest.raises(DeepMMRegError, match="slices"):
        prepare_2d3d(ct_node, ct_node, geometry)  # a 3D volume is not an X-ray
    with pytest.raises(DeepMMRegError, match="geometry"):
        prepare_2d3d(ct_node, xray_node, "")
    with pytest.raises(NotAvailableError):
        prepare_2d3d(ct_node, xray_node, geometry, method="sopi")


def test_sopi_from_nodes_with_a_per_patient_model_folder(scene_inputs, tmp_path):
    """`sopi` from the CT and X-ray nodes with a (tiny) model trained on that CT: pose, DRR and
    transform nodes; a model for another CT is refused before any work."""
    from DeepMultimodalRegLib.sopi.patient import structure_mask
    from DeepMultimodalRegLib.training.sopi_train import SopiTrainingConfig, train_sopi

    scene, ct_node, xray_node, geometry = scene_inputs
    ct = volume_from_node(ct_node, "CT")
    tiny = SopiTrainingConfig(rtpi_steps=3, fine_steps=2, detector=32, ct_mm=6.0, ct_cube=16, similarity_size=16,
                              similarity_ct_mm=6.0, rtpi_batch=2, fine_batch=2, rtpi_width=8, fine_width=4,
                              validation_cases=1, fine_iterations=2, checkpoint_every=5)
    model = tmp_path / "sopi_model"
    train_sopi(ct, structure_mask(ct), CarmGeometry(), model, tiny)
    request = prepare_2d3d(ct_node, xray_node, geometry, method="sopi", device="cpu", model_dir=str(model))
    outputs = apply_2d3d(scene, request, compute_2d3d(request))
    assert outputs.summary.startswith("sopi:") and np.all(np.isfinite(outputs.result.pose))
    assert outputs.drr_node.GetImageData().GetDimensions() == xray_node.GetImageData().GetDimensions()
    other = node_from_volume(scene, ct.with_data(ct.data + 30.0, name="another CT"))
    with pytest.raises(DeepMMRegError, match="trained for the CT"):
        prepare_2d3d(other, xray_node, geometry, method="sopi", model_dir=str(model))
