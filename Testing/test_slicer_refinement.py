"""ROI-driven refinement on real MRML: the end-of-interaction event starts an RSO step that changes
the transform node inside the box more than outside; a new event cancels and replaces a running
step; undo/redo restore the exact fields; the inputs are never written."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
slicer = pytest.importorskip("slicer", reason="slicer-core provides MRML")
pytest.importorskip("monai", reason="the deep registration needs MONAI")

from DeepMultimodalRegLib.image.volume import Volume  # noqa: E402
from DeepMultimodalRegLib.region import Box  # noqa: E402
from DeepMultimodalRegLib.synthetic import smooth_random_deformation  # noqa: E402
from DeepMultimodalRegLib.transforms.resample import warp_volume  # noqa: E402
from DeepMultimodalRegMRML import parameters as P  # noqa: E402
from DeepMultimodalRegMRML.coordinates import lps_from_ras_points  # noqa: E402
from DeepMultimodalRegMRML.jobs import SUCCEEDED  # noqa: E402
from DeepMultimodalRegMRML.logic import RegistrationLogic  # noqa: E402
from DeepMultimodalRegMRML.refinement import END_INTERACTION, RoiRefinement, worst_similarity_center  # noqa: E402
from DeepMultimodalRegMRML.volumes import node_from_volume  # noqa: E402

SETTINGS = {"Device": "cpu", "IsoIterations": 2, "RsoIterations": 6, "ComputeMaps": True,
            "DeepWeights": "untrained", "ShowMovingUnderTransform": True}


@pytest.fixture(scope="module")
def ct_pair(pelvis_ct):
    crop = pelvis_ct.data[30:70, 20:68, 20:68]
    geometry = pelvis_ct.geometry
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ (np.array([20, 20, 30]) * np.asarray(geometry.spacing))
    fixed = Volume(crop.contiguous(), type(geometry)(tuple(crop.shape), geometry.spacing, tuple(origin),
                                                     geometry.direction), name="pelvis")
    deformation = smooth_random_deformation(fixed.geometry, 6.0, 40.0, seed=3)
    moving = warp_volume(fixed, deformation, fixed.geometry, default_value=-1000.0)
    moving.name = "pelvis deformed"
    return fixed, moving


@pytest.fixture()
def refined_scene(ct_pair):
    scene = slicer.vtkMRMLScene()
    fixed, moving = ct_pair
    fixed_node = node_from_volume(scene, fixed, name="fixed")
    moving_node = node_from_volume(scene, moving, name="moving")
    logic = RegistrationLogic(scene)
    for name, value in SETTINGS.items():
        P.set(logic.parameter_node(), name, value)
    logic.register(fixed_node, moving_node, method="deep", settings=SETTINGS)
    refinement = RoiRefinement(logic)
    yield scene, logic, refinement, fixed_node, moving_node
    scene.Clear(1)


def _node_field(logic):
    return slicer.util.arrayFromGridTransform(logic.last_outputs.transform_node).copy()


def test_releasing_the_roi_refines_inside_the_box_more_than_outside(refined_scene, ct_pair):
    scene, logic, refinement, fixed_node, moving_node = refined_scene
    fixed_voxels = slicer.util.arrayFromVolume(fixed_node).copy()
    moving_voxels = slicer.util.arrayFromVolume(moving_node).copy()
    fixed = ct_pair[0]
    center_lps = fixed.geometry.center
    roi = refinement.place_roi(center_ras=lps_from_ras_points(center_lps), size_mm=(45.0, 45.0, 36.0))
    assert logic.parameter_node().GetNodeReference(P.REFINEMENT_ROI) is roi
    before = _node_field(logic)
    jacobian_node = logic.parameter_node().GetNodeReference(P.JACOBIAN_MAP)
    jacobian_before = slicer.util.arrayFromVolume(jacobian_node).copy()

    roi.InvokeEvent(END_INTERACTION)  # what Slicer fires when the user releases a handle
    assert refinement.job is not None
    assert refinement.job.wait(timeout=600) == SUCCEEDED
    after = _node_field(logic)
    change = np.linalg.norm(after - before, axis=-1)  # [k, j, i] on the fixed grid

    box = Box(tuple(center_lps), (45.0, 45.0, 36.0))
    inside = box.mask(fixed.geometry).numpy()
    far = ~Box(tuple(center_lps), (90.0, 90.0, 72.0)).mask(fixed.geometry).numpy()
    assert change[inside].mean() > 0.0
    assert change[inside].mean() > 2 * change[far].mean()
    assert len(refinement.review_boxes) == 1 and refinement.review_boxes[0].GetLocked()
    # the review maps follow the refined result, in the same nodes
    assert logic.parameter_node().GetNodeReference(P.JACOBIAN_MAP) is jacobian_node
    assert not np.array_equal(slicer.util.arrayFromVolume(jacobian_node), jacobian_before)
    assert len(refinement.history()) == 3  # general, iso, rso
    assert np.array_equal(slicer.util.arrayFromVolume(fixed_node), fixed_voxels)
    assert np.array_equal(slicer.util.arrayFromVolume(moving_node), moving_voxels)

    # undo restores the exact previous field in the transform node; redo brings the step back
    assert refinement.undo()
    assert np.array_equal(_node_field(logic), before)
    assert refinement.redo()
    assert np.array_equal(_node_field(logic), after)


def test_moving_the_roi_again_cancels_the_running_step_and_starts_a_new_one(refined_scene, ct_pair):
    scene, logic, refinement, *_ = refined_scene
    P.set(logic.parameter_node(), "RsoIterations", 40)
    roi = refinement.place_roi(center_ras=lps_from_ras_points(ct_pair[0].geometry.center), size_mm=(40.0, 40.0, 30.0))
    roi.InvokeEvent(END_INTERACTION)
    first = refinement.job
    center = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(center)
    roi.SetCenterWorld(*(np.asarray(center) + (6.0, 0.0, 0.0)))
    roi.InvokeEvent(END_INTERACTION)
    second = refinement.job
    assert second is not first
    assert second.wait(timeout=600) == SUCCEEDED, repr(second.error)
    assert first.poll() in ("cancelled", "succeeded")  # it may have finished before the cancel arrived
    steps = [s.split(":")[0] for s in refinement.history()]
    assert steps.count("rso") == (1 if first.status == "cancelled" else 2)


def test_auto_refine_off_ignores_the_event_and_cancel_applies_nothing(refined_scene, ct_pair):
    scene, logic, refinement, *_ = refined_scene
    roi = refinement.place_roi(center_ras=lps_from_ras_points(ct_pair[0].geometry.center), size_mm=(40.0, 40.0, 30.0))
    P.set(logic.parameter_node(), "AutoRefine", False)
    roi.InvokeEvent(END_INTERACTION)
    assert refinement.job is None
    before, nodes = _node_field(logic), scene.GetNumberOfNodes()
    P.set(logic.parameter_node(), "RsoIterations", 200)
    job = refinement.refine()
    job.cancel()
    assert job.wait(timeout=600) == "cancelled"
    assert np.array_equal(_node_field(logic), before) and scene.GetNumberOfNodes() == nodes
    assert len(refinement.history()) == 2


def test_worst_similarity_centre_finds_the_disagreeing_region():
    from DeepMultimodalRegLib.image.geometry import ImageGeometry

    geometry = ImageGeometry((20, 20, 20), spacing=(2.0, 2.0, 2.0))
    similarity = torch.full((20, 20, 20), 0.9)
    similarity[4:8, 12:16, 2:6] = 0.1  # voxel block centred at index (i, j, k) = (3.5, 13.5, 5.5)
    centre = worst_similarity_center(Volume(similarity, geometry), (8.0, 8.0, 8.0))
    assert np.allclose(centre, (7.0, 27.0, 11.0), atol=2.1)


def test_worst_similarity_box_stays_inside_the_image():
    from DeepMultimodalRegLib.image.geometry import ImageGeometry

    geometry = ImageGeometry((20, 20, 20), spacing=(2.0, 2.0, 2.0))
    similarity = torch.full((20, 20, 20), 0.9)
    similarity[0:3, 0:3, 0:3] = 0.0  # the worst agreement sits in a corner
    centre = worst_similarity_center(Volume(similarity, geometry), (12.0, 12.0, 12.0))
    box = Box(tuple(centre), (12.0, 12.0, 12.0))
    assert box.mask(geometry).sum() == 7 ** 3  # the whole box (6 mm half-width = 3 voxels) is inside
