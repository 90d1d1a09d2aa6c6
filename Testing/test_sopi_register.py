"""SOPI optimisation baselines on a real CT, and the drr / register2d3d command line with bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.cli.main import main
from DeepMultimodalRegLib.image import Volume, read_volume
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry, write_geometry
from DeepMultimodalRegLib.sopi.optimize import OptimizerSettings, optimize_pose
from DeepMultimodalRegLib.sopi.pose import pose_errors
from DeepMultimodalRegLib.sopi.simulate import simulate_xray


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def test_opt_gc_recovers_a_small_pose_offset_on_a_real_ct(pelvis_ct):
    """A realistic X-ray (other attenuation, noise, blur, gamma) of the real pelvis CT at a known pose."""
    geometry = CarmGeometry().resized(48)
    truth = np.array([3.0, -2.0, 2.5, 6.0, 4.0, -3.0])
    xray = simulate_xray(pelvis_ct, geometry, truth, seed=2)
    settings = OptimizerSettings(coarse_size=24, fine_size=48, coarse_ct_mm=6.0, fine_ct_mm=3.0, starts=0, keep=1,
                                 coarse_evaluations=150, fine_evaluations=120)
    result = optimize_pose(pelvis_ct, xray, geometry, "opt-gc", init_pose=np.zeros(6), settings=settings)
    rot, trans = pose_errors(result.pose, truth)
    start_rot, start_trans = pose_errors(np.zeros(6), truth)
    assert rot[0] < 1.0 and trans[0] < 3.0, (result.pose, rot, trans)  # the paper's success: < 3° and < 3 mm
    assert rot[0] < start_rot[0] / 3 and trans[0] < start_trans[0] / 2
    assert result.similarity > result.initial_similarity


# ---------------------------------------------------------------------------------- command line
def _tiny_ct(path, hu_like=True):
    rng = np.random.default_rng(0)
    n = 28
    c = np.arange(n) - (n - 1) / 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    hu = np.where(xx ** 2 + yy ** 2 + (zz / 1.3) ** 2 < 11 ** 2, 40.0, -1000.0)
    hu[(np.abs(xx - 2) < 2.5) & (np.abs(yy + 1) < 2.5)] = 900.0  # a "spine" along z
    hu[(np.abs(zz - 5) < 1.5) & (np.abs(yy) < 6) & (xx > -8) & (xx < 3)] = 700.0  # a cross bar
    hu += rng.normal(0, 5, hu.shape)
    if not hu_like:
        hu = (hu + 1000) / 10
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    image.SetOrigin((-40.0, -40.0, 100.0))
    sitk.WriteImage(image, str(path))
    return path


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_drr_then_register2d3d_recovers_the_pose(tmp_path, capsys):
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    geometry = write_geometry(CarmGeometry().resized(32), tmp_path / "g.json")
    drr_path = tmp_path / "drr.nii.gz"
    code, _, err = _run(["drr", ct, "--geometry", geometry, "--pose=4,-3,5,10,3,-2", "-o", drr_path], capsys)
    assert code == 0, err
    drr = read_volume(drr_path)
    assert drr.shape == (1, 32, 32)
    assert drr.geometry.spacing[0] == pytest.approx(0.79836 * 256 / 32)
    assert float(drr.data.max()) > 0.5  # a line integral through ~60 mm of tissue and bone
    out = tmp_path / "reg"
    code, stdout, err = _run(["register2d3d", ct, drr_path, "--geometry", geometry,  # no --model: opt-gc by default
                              "--starts", "8", "-o", out], capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["method"] == "opt-gc"
    assert sorted(p.name for p in out.iterdir()) == ["drr.nii.gz", "pose.json", "report.json", "report.png",
                                                     "transform.tfm"]
    pose = json.loads((out / "pose.json").read_text())
    assert list(pose) == ["rx", "ry", "rz", "tx", "ty", "tz"]
    rot, trans = pose_errors([pose[k] for k in pose], [4, -3, 5, 10, 3, -2])
    assert rot[0] < 2.0 and trans[0] < 5.0, pose
    # the transform file maps C-arm-frame points to CT points: the isocentre goes to where the pose puts it
    from DeepMultimodalRegLib.sopi.pose import carm_to_ct_matrix

    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    m = carm_to_ct_matrix(torch.tensor([[pose[k] for k in pose]], dtype=torch.float64),
                          Volume.from_sitk(sitk.ReadImage(str(ct))).geometry.center)[0].numpy()
    for p in ([0.0, 0.0, 0.0], [30.0, -10.0, 5.0]):
        np.testing.assert_allclose(tfm.TransformPoint(p), m[:3, :3] @ p + m[:3, 3], atol=1e-6)
    # the written DRR is drr --pose at the written pose
    again = tmp_path / "again.nii.gz"
    assert _run(["drr", ct, "--geometry", geometry, f"--pose={','.join(str(pose[k]) for k in pose)}", "-o", again],
                capsys)[0] == 0
    np.testing.assert_allclose(read_volume(again).numpy(), read_volume(out / "drr.nii.gz").numpy(), atol=1e-4)


def test_cli_bad_input_fails_early_and_writes_nothing(tmp_path, capsys):
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    geometry = write_geometry(CarmGeometry().resized(32), tmp_path / "g.json")
    out = tmp_path / "out"
    # an X-ray that is a 3D volume
    code, _, err = _run(["register2d3d", ct, ct, "--geometry", geometry, "--method", "opt-gc", "-o", out], capsys)
    assert code == 2 and "3D image" in err and "single 2D radiograph" in err
    # a missing geometry file, and impossible values
    code, _, err = _run(["drr", ct, "--geometry", tmp_path / "none.json", "--pose", "0,0,0,0,0,0", "-o",
                         tmp_path / "d.nii.gz"], capsys)
    assert code == 2 and "geometry file not found" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CarmGeometry().as_dict(), "source_to_detector_mm": -5}))
    code, _, err = _run(["drr", ct, "--geometry", bad, "--pose", "0,0,0,0,0,0", "-o", tmp_path / "d.nii.gz"], capsys)
    assert code == 2 and "must be positive" in err
    # a pose that puts the CT off the detector
    code, _, err = _run(["drr", ct, "--geometry", geometry, "--pose", "0,0,0,0,400,0", "-o", tmp_path / "d.nii.gz"],
                        capsys)
    assert code == 2 and "field of view" in err
    # an X-ray whose aspect ratio does not fit the detector
    xray = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 40)).astype(np.float32))
    sitk.WriteImage(xray, str(tmp_path / "x.nii.gz"))
    code, _, err = _run(["register2d3d", ct, tmp_path / "x.nii.gz", "--geometry", geometry, "--method", "opt-ncc",
                         "-o", out], capsys)
    assert code == 2 and "aspect ratios differ" in err
    # the learned methods are a later version
    code, _, err = _run(["register2d3d", ct, tmp_path / "x.nii.gz", "--geometry", geometry, "--method", "sopi+opt",
                         "-o", out], capsys)
    assert code == 2 and "not available yet" in err and "opt-gc" in err
    assert not out.exists() and not (tmp_path / "d.nii.gz").exists()


def test_cli_drr_warns_when_the_ct_is_not_in_hu(tmp_path, capsys, caplog):
    ct = _tiny_ct(tmp_path / "mr.nii.gz", hu_like=False)
    geometry = write_geometry(CarmGeometry().resized(16), tmp_path / "g.json")
    with caplog.at_level(logging.WARNING):
        code, _, err = _run(["drr", ct, "--geometry", geometry, "--pose", "0,0,0,0,0,0", "-o",
                             tmp_path / "d.nii.gz"], capsys)
    assert code == 0 and "does not look like Hounsfield units" in caplog.text
