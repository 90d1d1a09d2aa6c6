"""The module's Logic end to end on real MRML: nodes in, registration, nodes out; cancel; failures."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
slicer = pytest.importorskip("slicer", reason="slicer-core provides MRML")

from DeepMultimodalRegLib.errors import InvalidParameterError  # noqa: E402
from DeepMultimodalRegLib.evaluation import misaligned_copy  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import RigidTransform  # noqa: E402
from DeepMultimodalRegMRML import parameters as P  # noqa: E402
from DeepMultimodalRegMRML.coordinates import array_from_vtk_matrix, lps_from_ras_points  # noqa: E402
from DeepMultimodalRegMRML.jobs import CANCELLED, FAILED, SUCCEEDED  # noqa: E402
from DeepMultimodalRegMRML.logic import RegistrationLogic  # noqa: E402
from DeepMultimodalRegMRML.transform_nodes import transform_points_ras  # noqa: E402
from DeepMultimodalRegMRML.volumes import node_from_volume  # noqa: E402


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(s)
    yield s
    colours.SetMRMLScene(None)
    s.Clear(1)


@pytest.fixture(scope="module")
def misaligned_pair(sample_t1, sample_t2):
    truth = RigidTransform(torch.tensor([[math.radians(5), 0, math.radians(-4), 6.0, -3.0, 2.0]],
                                        dtype=torch.float64), torch.as_tensor(sample_t1.geometry.center))
    return sample_t1, misaligned_copy(sample_t2, truth), truth


def _snapshot(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVolume(node).copy(), array_from_vtk_matrix(matrix), node.GetMTime()


def test_rigid_registration_from_nodes_to_nodes(scene, misaligned_pair):
    fixed, moving, truth = misaligned_pair
    fixed_node = node_from_volume(scene, fixed, name="T1")
    moving_node = node_from_volume(scene, moving, name="T2 moved")
    fixed_before, moving_before = _snapshot(fixed_node), _snapshot(moving_node)

    logic = RegistrationLogic(scene)
    outputs = logic.register(fixed_node, moving_node, method="mind-rigid", settings={"Device": "cpu"})

    # the transform node maps fixed points where the known motion puts them
    assert outputs.transform_node.IsA("vtkMRMLLinearTransformNode")
    inside = fixed.geometry.center + np.random.default_rng(0).uniform(-30, 30, size=(20, 3))
    ras = lps_from_ras_points(inside)
    expected = lps_from_ras_points(truth.transform_points(torch.as_tensor(inside))[0].numpy())
    assert np.linalg.norm(transform_points_ras(outputs.transform_node, ras) - expected, axis=1).max() < 2.0

    # inputs unchanged (voxels, geometry); the moving node is placed under the result for review
    for node, before in ((fixed_node, fixed_before), (moving_node, moving_before)):
        now = _snapshot(node)
        assert np.array_equal(now[0], before[0]) and np.array_equal(now[1], before[1])
    assert moving_node.GetParentTransformNode() is outputs.transform_node
    assert fixed_node.GetParentTransformNode() is None

    # warped volume on the fixed grid, review maps with colour tables, all recorded in the parameter node
    assert outputs.warped_node.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()
    parameter_node = logic.parameter_node()
    assert parameter_node.GetNodeReference(P.OUTPUT_TRANSFORM) is outputs.transform_node
    assert parameter_node.GetNodeReference(P.OUTPUT_VOLUME) is outputs.warped_node
    similarity = parameter_node.GetNodeReference(P.SIMILARITY_MAP)
    assert similarity is not None and similarity.GetDisplayNode().GetColorNodeID()
    values = slicer.util.arrayFromVolume(similarity)
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.mean() > 0.05
    assert parameter_node.GetNodeReference(P.JACOBIAN_MAP) is None  # rigid: no Jacobian map
    assert "mind-rigid" in outputs.summary


def test_second_run_reuses_the_output_nodes(scene, misaligned_pair):
    fixed, moving, _ = misaligned_pair
    fixed_node = node_from_volume(scene, fixed, name="T1")
    moving_node = node_from_volume(scene, moving, name="T2")
    logic = RegistrationLogic(scene)
    first = logic.register(fixed_node, moving_node, method="mind-rigid",
                           settings={"Device": "cpu", "ComputeMaps": False})
    count = scene.GetNumberOfNodes()
    second = logic.register(fixed_node, moving_node, method="mind-rigid",
                            settings={"Device": "cpu", "ComputeMaps": False},
                            output_transform_node=first.transform_node, output_volume_node=first.warped_node)
    assert second.transform_node is first.transform_node and second.warped_node is first.warped_node
    assert scene.GetNumberOfNodes() == count


def test_cancel_leaves_the_scene_as_it_was(scene, misaligned_pair):
    fixed, moving, _ = misaligned_pair
    fixed_node = node_from_volume(scene, fixed, name="T1")
    moving_node = node_from_volume(scene, moving, name="T2")
    logic = RegistrationLogic(scene)
    nodes_before = scene.GetNumberOfNodes()
    done = []
    job = logic.start_registration(fixed_node, moving_node, method="mind-rigid", on_done=done.append,
                                   settings={"Device": "cpu", "Search": "global", "Starts": 64})
    job.cancel()
    assert job.wait(timeout=120) == CANCELLED
    assert scene.GetNumberOfNodes() == nodes_before and not done
    assert moving_node.GetParentTransformNode() is None


def test_background_registration_applies_on_poll_and_failures_are_handed_back(scene, misaligned_pair):
    fixed, moving, _ = misaligned_pair
    fixed_node = node_from_volume(scene, fixed, name="T1")
    moving_node = node_from_volume(scene, moving, name="T2")
    logic = RegistrationLogic(scene)
    done = []
    job = logic.start_registration(fixed_node, moving_node, method="mind-rigid", on_done=done.append,
                                   settings={"Device": "cpu", "ComputeMaps": False})
    assert job.wait(timeout=300) == SUCCEEDED and len(done) == 1
    assert done[0].transform_node.GetScene() is scene

    failures = []
    mask = node_from_volume(scene, fixed.with_data(torch.zeros_like(fixed.data)), name="empty mask")
    job = logic.start_registration(fixed_node, moving_node, method="mind-rigid", on_failure=failures.append,
                                   fixed_mask_node=mask, settings={"Device": "cpu"})
    assert job.wait(timeout=120) == FAILED and len(failures) == 1
    assert "mask" in str(failures[0]).lower()


def test_bad_requests_fail_before_any_work(scene, sample_t1):
    from DeepMultimodalRegLib.errors import DeepMMRegError, NotAvailableError

    node = node_from_volume(scene, sample_t1, name="T1")
    logic = RegistrationLogic(scene)
    with pytest.raises(DeepMMRegError, match="same node"):
        logic.register(node, node)
    with pytest.raises(DeepMMRegError, match="both"):
        logic.register(node, None)
    with pytest.raises(DeepMMRegError, match="unknown method"):
        logic.register(node, node_from_volume(scene, sample_t1, name="copy"), method="elastix")
    with pytest.raises(DeepMMRegError, match="search"):
        logic.register(node, node_from_volume(scene, sample_t1, name="copy"), settings={"Search": "sideways"})
    # --- msode (issue 8): msode-rigid is available now; a method without a runner stands in for it
    from DeepMultimodalRegLib.methods import registry

    saved_runner, saved_import = registry.METHODS["msode-rigid"].runner, registry._try_import
    registry.METHODS["msode-rigid"].runner, registry._try_import = None, lambda module: None
    try:
        with pytest.raises(NotAvailableError):
            logic.register(node, node_from_volume(scene, sample_t1, name="copy"), method="msode-rigid")
    finally:
        registry.METHODS["msode-rigid"].runner, registry._try_import = saved_runner, saved_import
    # --- end msode


def test_disa_result_gets_a_local_disa_map_that_agrees_with_local_lc2(scene, misaligned_pair):
    from DeepMultimodalRegLib.transforms.linear import AffineTransform
    from DeepMultimodalRegLib.transforms.resample import warp_volume
    from DeepMultimodalRegMRML.volumes import volume_from_node

    fixed, moving, _ = misaligned_pair
    logic = RegistrationLogic(scene)
    logic.register(node_from_volume(scene, fixed, name="T1"), node_from_volume(scene, moving, name="T2"),
                   method="disa-rigid", settings={"Device": "cpu"})
    node = logic.parameter_node()
    disa = volume_from_node(node.GetNodeReference(P.DISA_MAP))
    lc2 = volume_from_node(node.GetNodeReference(P.SIMILARITY_MAP))
    assert disa.geometry.spacing[0] == pytest.approx(8.0)  # the descriptor grid
    lc2_on_disa = warp_volume(lc2, AffineTransform.identity(), disa.geometry).data.flatten().numpy()
    values = disa.data.flatten().numpy()
    keep = lc2_on_disa > 0  # inside the LC² map's field of view
    assert keep.sum() > 50
    assert np.corrcoef(values[keep], lc2_on_disa[keep])[0, 1] > 0.2


def test_status_text_carries_the_known_limits_of_the_weights_used():
    from types import SimpleNamespace

    from DeepMultimodalRegMRML.logic import summarise

    plain = SimpleNamespace(method="mind-rigid", seconds=2.0, device="cpu", figures={})
    assert "\n" not in summarise(plain)
    disa = SimpleNamespace(method="disa-rigid", seconds=2.0, device="cpu",
                           figures={"weights_status": "preliminary: 2 mm off on T2"})
    assert summarise(disa).splitlines()[1] == "Weights: preliminary: 2 mm off on T2"
    assert "bfloat16" not in summarise(disa)
    fast = SimpleNamespace(method="disa-rigid", seconds=2.0, device="cpu", figures={"disa_precision": "bfloat16"})
    assert summarise(fast) == "disa-rigid: 2.0 s on cpu (DISA network in bfloat16)"


def test_refine_setting_reaches_disa_methods_only(scene, misaligned_pair):
    fixed, moving, _ = misaligned_pair
    fixed_node = node_from_volume(scene, fixed, name="T1")
    moving_node = node_from_volume(scene, moving, name="T2")
    logic = RegistrationLogic(scene)
    settings = {"Device": "cpu", "Refine": "mind", "Search": "global", "Starts": 8}
    disa = logic.prepare(fixed_node, moving_node, method="disa-rigid", settings=settings)
    assert disa.options.extra == {"starts": 8, "range_deg": 40.0, "range_mm": 150.0, "refine": "mind"}
    mind = logic.prepare(fixed_node, moving_node, method="mind-rigid", settings=settings)
    assert "refine" not in mind.options.extra
    default = logic.prepare(fixed_node, moving_node, method="disa-rigid", settings={"Device": "cpu"})
    assert default.options.extra == {"refine": "disa"}  # the library's default polish, said explicitly
    with pytest.raises(InvalidParameterError, match="refine"):
        logic.prepare(fixed_node, moving_node, method="disa-rigid", settings={"Device": "cpu", "Refine": "lc2"})


def test_global_search_reaches_msode_rigid_without_the_random_start_settings(scene, misaligned_pair):
    """MS-ODE's global search starts from its own rotation grid: the module's random-start settings
    (Starts, RangeMm) would be refused by it, so only the search mode is passed."""
    fixed, moving, _ = misaligned_pair
    logic = RegistrationLogic(scene)
    request = logic.prepare(node_from_volume(scene, fixed, name="T1"), node_from_volume(scene, moving, name="T2"),
                            method="msode-rigid", settings={"Device": "cpu", "Search": "global", "Starts": 8})
    assert request.options.search == "global" and request.options.extra == {}


def test_msode_model_files_reach_the_runner_and_bad_ones_fail_before_any_work(scene, misaligned_pair, tmp_path):
    """The module's MS-ODE model fields: msode-bspline|dense|rigid get ``weights``, msode-hybrid gets its
    deformable (and, if set, rigid) stage's file; a missing file, a file of the wrong kind and a method
    with neither a file nor a shipped or built-in model (msode-dense) are refused in ``prepare``, before any
    volume is copied."""
    from DeepMultimodalRegLib.errors import NotAvailableError
    from DeepMultimodalRegLib.msode.model import MSODE
    from test_msode_training import tiny_config

    fixed, moving, _ = misaligned_pair
    fixed_node, moving_node = node_from_volume(scene, fixed, name="T1"), node_from_volume(scene, moving, name="T2")
    files = {}
    for kind in ("rigid", "bspline"):
        files[kind] = str(tmp_path / f"{kind}.pt")
        torch.save(MSODE(tiny_config(kind).model_config()).state_dict_with_config(), files[kind])
    logic = RegistrationLogic(scene)

    def prepare(method, **settings):
        return logic.prepare(fixed_node, moving_node, method=method, settings={"Device": "cpu", **settings})

    assert prepare("msode-bspline", MsodeWeights=files["bspline"]).options.extra == {"weights": files["bspline"]}
    hybrid = prepare("msode-hybrid", MsodeWeights=files["bspline"], MsodeRigidWeights=files["rigid"])
    assert hybrid.options.extra == {"weights_deformable": files["bspline"], "weights_rigid": files["rigid"]}
    assert prepare("msode-hybrid", MsodeWeights=files["bspline"]).options.extra == {"weights_deformable": files["bspline"]}
    assert prepare("msode-rigid").options.extra == {}  # the shipped rigid model
    with pytest.raises(InvalidParameterError, match="does not exist"):
        prepare("msode-bspline", MsodeWeights=str(tmp_path / "missing.pt"))
    with pytest.raises(NotAvailableError, match="rigid model, a bspline model is needed"):
        prepare("msode-bspline", MsodeWeights=files["rigid"])
    with pytest.raises(NotAvailableError, match="no trained MS-ODE dense model is shipped"):
        prepare("msode-dense")
    assert prepare("msode-hybrid").options.extra == {}  # the shipped rigid model, then the built-in flow
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    with pytest.raises(InvalidParameterError, match="is not an MS-ODE dense model file"):
        prepare("msode-dense", MsodeWeights=str(not_a_model))
    # and the file drives the registration: the tiny untrained B-spline model runs through compute
    request = prepare("msode-bspline", MsodeWeights=files["bspline"], ComputeMaps=False)
    result, _, _ = logic.compute(request)
    assert result.method == "msode-bspline" and result.figures["nfe_total"] > 0

