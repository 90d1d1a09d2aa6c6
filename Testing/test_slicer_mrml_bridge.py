"""The Slicer module's MRML bridge against real MRML (the ``slicer-core`` package).

Oracles that the bridge did not write: MRML's own readers and writers (volume archetype storage,
ITK transform storage) and SimpleITK reading what they wrote; the ROI node's own point-in-ROI
test; the library's transforms for the point maps.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "DeepMultimodalReg"))

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package `slicer` is not MRML
    pytest.fail("the installed `slicer` package is not slicer-core; pip uninstall slicer; pip install slicer-core",
                pytrace=False)

from DeepMultimodalRegLib.image.geometry import ImageGeometry  # noqa: E402
from DeepMultimodalRegLib.image.volume import Volume  # noqa: E402
from DeepMultimodalRegLib.region import Box  # noqa: E402
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform  # noqa: E402
from DeepMultimodalRegLib.transforms.linear import AffineTransform, RigidTransform  # noqa: E402
from DeepMultimodalRegMRML import parameters as P  # noqa: E402
from DeepMultimodalRegMRML.coordinates import lps_from_ras_points  # noqa: E402
from DeepMultimodalRegMRML.roi import box_from_roi, roi_from_box  # noqa: E402
from DeepMultimodalRegMRML.transform_nodes import set_transform_node, transform_points_ras  # noqa: E402
from DeepMultimodalRegMRML.volumes import node_from_volume, volume_from_node  # noqa: E402


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    return RigidTransform(torch.tensor([[ax, ay, az, 0, 0, 0]], dtype=torch.float64)).matrix[0].numpy()


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()  # the default colour tables, as in the Slicer application
    colours.SetMRMLScene(s)
    yield s
    colours.SetMRMLScene(None)
    s.Clear(1)


def _oblique_volume(shape=(7, 9, 11)) -> Volume:
    rng = np.random.default_rng(0)
    direction = _rotation(0.3, -0.2, 0.5) @ np.diag([-1.0, 1.0, 1.0])  # oblique, with a flip
    geometry = ImageGeometry(shape=shape, spacing=(0.7, 1.3, 2.1), origin=(12.5, -40.0, 7.25),
                             direction=tuple(direction.reshape(-1)))
    return Volume(torch.from_numpy(rng.normal(size=shape).astype(np.float32)), geometry, name="oblique")


# ---------------------------------------------------------------------------------------------- volumes
def test_volume_round_trip_keeps_voxels_and_oblique_geometry_exactly(scene):
    volume = _oblique_volume()
    node = node_from_volume(scene, volume, name="oblique")
    back = volume_from_node(node)
    assert torch.equal(back.data, volume.data)
    assert back.geometry.same_grid(volume.geometry, tolerance_mm=1e-9)
    assert back.geometry.shape == volume.geometry.shape


@pytest.mark.parametrize("flip", [False, True], ids=["right-handed", "left-handed"])
def test_volume_geometry_matches_what_mrml_and_simpleitk_read_from_the_same_file(scene, tmp_path, flip):
    # SimpleITK writes an oblique NRRD; MRML's own reader loads it; the bridge must agree with SimpleITK
    volume = _oblique_volume()
    if not flip:
        volume = Volume(volume.data, ImageGeometry(volume.shape, volume.geometry.spacing, volume.geometry.origin,
                                                   tuple(_rotation(0.3, -0.2, 0.5).reshape(-1))))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    loaded = volume_from_node(node)
    reference_image = sitk.ReadImage(str(path))
    if not flip:
        reference = Volume.from_sitk(reference_image)
        assert loaded.geometry.same_grid(reference.geometry, tolerance_mm=1e-4)
        assert torch.allclose(loaded.data, reference.data.float())
    else:
        # MRML stores a left-handed grid with its k axis reversed: the same voxels at the same places
        same_place = sitk.Resample(loaded.to_sitk(), reference_image, sitk.Transform(), sitk.sitkNearestNeighbor)
        assert np.array_equal(sitk.GetArrayFromImage(same_place), sitk.GetArrayFromImage(reference_image))


def test_xray_is_a_single_slice_volume_node(scene):
    xray = Volume(torch.rand(1, 32, 48), ImageGeometry((1, 32, 48), spacing=(0.5, 0.5, 1.0)), name="xray")
    node = node_from_volume(scene, xray)
    assert node.GetImageData().GetDimensions() == (48, 32, 1)
    back = volume_from_node(node)
    assert back.geometry.is_2d() and torch.equal(back.data, xray.data)


def test_bad_volume_nodes_are_refused(scene):
    from DeepMultimodalRegLib.errors import InvalidImageError

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidImageError, match="no voxels"):
        volume_from_node(empty, "fixed")
    with pytest.raises(InvalidImageError, match="no fixed"):
        volume_from_node(None, "fixed")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(InvalidImageError, match="not a scalar volume"):
        volume_from_node(model, "moving")


# ---------------------------------------------------------------------------------------------- transforms
def _ras_points(n=20, seed=1):
    return np.random.default_rng(seed).uniform(-60, 60, size=(n, 3))


def _library_map_ras(transform, points_ras) -> np.ndarray:
    lps = torch.as_tensor(lps_from_ras_points(points_ras), dtype=torch.float64)
    return lps_from_ras_points(transform.transform_points(lps.to(transform.dtype))[0].double().numpy())


def test_rigid_result_as_linear_transform_node_maps_points_like_the_library(scene):
    rigid = RigidTransform(torch.tensor([[0.1, -0.2, 0.3, 5.0, -7.0, 11.0]], dtype=torch.float64),
                           center=(10.0, 20.0, -5.0))
    node = set_transform_node(scene, rigid, _oblique_volume().geometry)
    assert node.IsA("vtkMRMLLinearTransformNode")
    points = _ras_points()
    assert np.abs(transform_points_ras(node, points) - _library_map_ras(rigid, points)).max() < 1e-9


def test_linear_transform_node_written_by_mrml_is_read_by_simpleitk_as_the_library_transform(scene, tmp_path):
    affine = AffineTransform(torch.tensor([[1.05, 0.02, -0.03, 0.01, 0.97, 0.04, 0.0, -0.02, 1.1, 3.0, -4.0, 8.0]],
                                          dtype=torch.float64))
    node = set_transform_node(scene, affine, _oblique_volume().geometry)
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "result.tfm"))
    assert storage.WriteData(node)
    itk = sitk.ReadTransform(str(tmp_path / "result.tfm"))
    points = _ras_points()
    lps = lps_from_ras_points(points)
    expected = affine.transform_points(torch.as_tensor(lps))[0].numpy()
    read = np.array([itk.TransformPoint(tuple(p)) for p in lps])
    assert np.abs(read - expected).max() < 1e-6


def test_deformable_result_as_grid_transform_node_maps_points_within_a_tenth_of_a_mm(scene):
    geometry = ImageGeometry(shape=(12, 14, 16), spacing=(4.0, 3.5, 5.0), origin=(-30.0, -25.0, -20.0),
                             direction=tuple(_rotation(0.2, 0.1, -0.3).reshape(-1)))
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 3, 4, 4, generator=generator, dtype=torch.float64) * 4
    field = torch.nn.functional.interpolate(coarse, size=geometry.shape, mode="trilinear", align_corners=True)
    deformable = DisplacementFieldTransform(geometry, field)
    node = set_transform_node(scene, deformable, geometry)
    assert node.IsA("vtkMRMLGridTransformNode")
    # points well inside the grid, at arbitrary (non-voxel) positions
    index = np.random.default_rng(2).uniform(1, np.array(geometry.size_xyz) - 2, size=(50, 3))
    m = geometry.index_to_physical_matrix()
    lps = index @ m[:3, :3].T + m[:3, 3]
    ras = lps_from_ras_points(lps)
    error = np.linalg.norm(transform_points_ras(node, ras) - _library_map_ras(deformable, ras), axis=1)
    assert error.max() < 0.1
    assert float(deformable.field.abs().max()) > 1.0  # the check above is not vacuous


def test_nonlinear_composite_is_rasterised_on_the_fixed_grid(scene):
    from DeepMultimodalRegLib.transforms.composite import CompositeTransform

    geometry = ImageGeometry(shape=(10, 10, 10), spacing=(3.0, 3.0, 3.0), origin=(-15.0, -15.0, -15.0))
    field = torch.zeros(1, 3, 10, 10, 10, dtype=torch.float64)
    field[:, 0] = torch.linspace(-2, 2, 10, dtype=torch.float64)[None, :, None, None]
    composite = CompositeTransform([RigidTransform(torch.tensor([[0, 0, 0.1, 4.0, 0, 0]], dtype=torch.float64)),
                                    DisplacementFieldTransform(geometry, field)])
    node = set_transform_node(scene, composite, geometry)
    ras = lps_from_ras_points(np.random.default_rng(3).uniform(-10, 10, size=(30, 3)))
    assert np.abs(transform_points_ras(node, ras) - _library_map_ras(composite, ras)).max() < 0.1


# ---------------------------------------------------------------------------------------------- ROI
def test_rotated_roi_becomes_the_box_mrml_itself_considers_inside(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    object_to_world = np.eye(4)
    object_to_world[:3, :3] = _rotation(0.4, -0.3, 0.7)
    object_to_world[:3, 3] = (10.0, -20.0, 30.0)
    from DeepMultimodalRegMRML.coordinates import vtk_matrix_from_array

    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix_from_array(object_to_world))
    roi.SetSize(40.0, 25.0, 60.0)
    box = box_from_roi(roi)
    points = np.random.default_rng(4).uniform(-35, 35, size=(4000, 3)) + (10.0, -20.0, 30.0)
    inside_mrml = np.array([roi.IsPointInROIWorld(tuple(p)) for p in points])
    inside_box = box.contains(torch.as_tensor(lps_from_ras_points(points))).numpy()
    assert 200 < inside_mrml.sum() < 3800  # both outcomes are exercised
    assert (inside_mrml == inside_box).mean() > 0.999  # points on a face may round either way
    assert np.allclose(box.center, lps_from_ras_points([10.0, -20.0, 30.0]))
    assert np.allclose(sorted(box.size), [25.0, 40.0, 60.0])


def test_box_back_to_roi_node_round_trips(scene):
    axes = _rotation(0.1, 0.2, -0.4)
    box = Box(center=(5.0, 6.0, -7.0), size=(10.0, 20.0, 30.0), axes=tuple(axes.reshape(-1)))
    roi = roi_from_box(scene, box)
    again = box_from_roi(roi)
    assert np.allclose(again.center, box.center) and np.allclose(again.size, box.size)
    assert np.allclose(again.axes_matrix, box.axes_matrix, atol=1e-9)


def test_roi_under_the_fixed_volume_transform_is_brought_into_fixed_space(scene):
    fixed = node_from_volume(scene, _oblique_volume(), name="fixed")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "fixed pose")
    from DeepMultimodalRegMRML.coordinates import vtk_matrix_from_array

    to_parent = np.eye(4)
    to_parent[:3, 3] = (100.0, 0.0, 0.0)  # fixed volume displayed 100 mm to the right
    shift.SetMatrixTransformToParent(vtk_matrix_from_array(to_parent))
    fixed.SetAndObserveTransformNodeID(shift.GetID())
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(110.0, 5.0, 0.0)
    roi.SetSize(10.0, 10.0, 10.0)
    box = box_from_roi(roi, fixed)
    assert np.allclose(box.center, lps_from_ras_points([10.0, 5.0, 0.0]))


# ---------------------------------------------------------------------------------------------- parameters
def test_parameter_node_round_trips_through_a_saved_scene(scene, tmp_path):
    node = P.find_or_create_parameter_node(scene)
    P.set(node, "Method", "mind-affine")
    P.set(node, "Search", "global")
    P.set(node, "RsoIterations", 250)
    P.set(node, "AutoRefine", False)
    P.set(node, "RangeDeg", 12.5)
    fixed = node_from_volume(scene, _oblique_volume(), name="fixed")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    node.SetNodeReferenceID(P.FIXED_VOLUME, fixed.GetID())
    node.SetNodeReferenceID(P.REFINEMENT_ROI, roi.GetID())
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reopened = slicer.vtkMRMLScene()
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Connect()
    again = P.find_or_create_parameter_node(reopened)
    assert P.settings(again) == {**P.settings(node)}
    assert P.get(again, "RsoIterations") == 250 and P.get(again, "AutoRefine") is False
    assert again.GetNodeReference(P.FIXED_VOLUME).GetName() == "fixed"
    assert again.GetNodeReference(P.REFINEMENT_ROI).GetName() == "box"


def test_parameter_values_are_checked(scene):
    from DeepMultimodalRegLib.errors import InvalidParameterError

    node = P.find_or_create_parameter_node(scene)
    assert P.find_or_create_parameter_node(scene) is node or \
        P.find_or_create_parameter_node(scene).GetID() == node.GetID()
    with pytest.raises(InvalidParameterError):
        P.set(node, "Method", "no-such-method")
    node.SetParameter("RsoIterations", "many")
    with pytest.raises(InvalidParameterError, match="RsoIterations"):
        P.get(node, "RsoIterations")
