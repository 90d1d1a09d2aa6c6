"""The ``deepmmreg`` command line: apply against SimpleITK, models, the not-yet-available commands,
bad input (one line, exit code 2, inputs untouched), and the demo."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.cli.main import main
from DeepMultimodalRegLib.image import write_volume
from DeepMultimodalRegLib.transforms import BSplineTransform, RigidTransform, write_transform


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def pelvis_files(pelvis_ct, tmp_path):
    moving = write_volume(pelvis_ct, tmp_path / "moving.nii.gz")
    params = torch.tensor([0.12, -0.08, 0.2, 8.0, -5.0, 3.0], dtype=torch.float64)
    rigid = write_transform(RigidTransform(params, torch.as_tensor(pelvis_ct.geometry.center)), tmp_path / "rigid.tfm")
    b = BSplineTransform.zeros(pelvis_ct.geometry, control_spacing_mm=80.0, dtype=torch.float64)
    coeffs = 6 * torch.randn(b.coefficients.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    field = write_transform(BSplineTransform(b.grid, coeffs), tmp_path / "field.nii.gz", reference=pelvis_ct.geometry)
    return {"moving": moving, "rigid": rigid, "field": field, "dir": tmp_path}


@pytest.mark.parametrize("kind", ["rigid", "field"])
def test_apply_matches_simpleitk_resample(kind, pelvis_files):
    f = pelvis_files
    out = f["dir"] / f"out_{kind}.nii.gz"
    assert main(["apply", str(f[kind]), str(f["moving"]), "--reference", str(f["moving"]), "-o", str(out),
                 "--default-value", "-1024"]) == 0
    image = sitk.ReadImage(str(f["moving"]), sitk.sitkFloat32)
    if kind == "rigid":
        transform = sitk.ReadTransform(str(f["rigid"]))
    else:
        transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(f["field"])), sitk.sitkVectorFloat64))
    expected = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    value_range = float(expected.max() - expected.min())
    assert np.abs(ours - expected).mean() < 1e-4 * value_range
    assert np.abs(ours - expected).max() < 0.01 * value_range


def test_apply_keeps_labels_integer_with_nearest(tmp_path):
    from conftest import shared_scan

    labels = sitk.ReadImage(str(shared_scan("ct_pelvis_ts/ct_slab_labels.nii.gz")))
    src = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels, str(src))
    t = write_transform(RigidTransform(torch.tensor([0.0, 0.0, 0.1, 3.0, 0.0, 0.0], dtype=torch.float64),
                                       labels.TransformContinuousIndexToPhysicalPoint(
                                           [s / 2 for s in labels.GetSize()])), tmp_path / "r.tfm")
    out = tmp_path / "warped_labels.nii.gz"
    assert main(["apply", str(t), str(src), "--reference", str(src), "-o", str(out)]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.issubdtype(warped.dtype, np.integer)
    assert set(np.unique(warped)) <= set(np.unique(sitk.GetArrayFromImage(labels)))


def _run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_bad_inputs_give_one_line_and_exit_code_2(pelvis_files, tmp_path, capsys):
    f = pelvis_files
    before = {k: _md5(f[k]) for k in ("moving", "rigid", "field")}
    out = str(tmp_path / "o.nii.gz")
    cases = {
        "missing moving": ["apply", str(f["rigid"]), str(tmp_path / "none.nii.gz"), "--reference", str(f["moving"]), "-o", out],
        "image as transform": ["apply", str(f["moving"]), str(f["moving"]), "--reference", str(f["moving"]), "-o", out],
        "garbage transform": ["apply", str(_junk(tmp_path / "junk.tfm")), str(f["moving"]), "--reference",
                              str(f["moving"]), "-o", out],
        "overwrite input": ["apply", str(f["rigid"]), str(f["moving"]), "--reference", str(f["moving"]), "-o",
                            str(f["moving"])],
        "unwritable output": ["apply", str(f["rigid"]), str(f["moving"]), "--reference", str(f["moving"]), "-o",
                              str(f["rigid"]) + "/x.nii.gz"],
        "cuda without gpu": (["apply", str(f["rigid"]), str(f["moving"]), "--reference", str(f["moving"]), "-o", out,
                              "--device", "cuda"] if not torch.cuda.is_available() else None),
        "nan voxels": ["apply", str(f["rigid"]), str(_nan_image(tmp_path)), "--reference", str(f["moving"]), "-o", out],
    }
    for name, args in cases.items():
        if args is None:
            continue
        code, err = _run_cli(args, capsys)
        assert code == 2, name
        assert err.startswith("deepmmreg apply: error:") and "\n" not in err, (name, err)
    assert {k: _md5(f[k]) for k in before} == before
    assert not (tmp_path / "o.nii.gz").exists()


def _junk(path):
    path.write_text("#Insight Transform File V1.0\nthis is not a transform\n")
    return path


def _nan_image(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "nan.mha"  # (ITK's NIfTI reader turns NaN into 0 by itself)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    return path


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["register", "f", "m", "-o", "o", "--method", "no-such-method"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["refine", "f", "m", "--init", "i", "-o", "o", "--mode", "rso"])  # rso needs --roi
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["drr", "ct", "--geometry", "g", "--pose", "1,2,3", "-o", "x"])
    assert exc.value.code == 2


def test_affine_weighting_and_descriptor_stride_choices_are_the_engines():
    """The CLI spells the choices out (its parser stays free of the torch-heavy engine import); they
    must be the engine's."""
    from DeepMultimodalRegLib.cli.main import build_parser
    from DeepMultimodalRegLib.disa.register import AFFINE_WEIGHTINGS, DENSE_DESCRIPTOR_STRIDES

    register = build_parser()._subparsers._group_actions[0].choices["register"]
    options = {s: a for a in register._actions for s in a.option_strings}
    assert tuple(options["--affine-weighting"].choices) == AFFINE_WEIGHTINGS
    assert set(options["--dense-descriptor-stride"].choices) == set(DENSE_DESCRIPTOR_STRIDES)


def test_models_lists_the_manifest(capsys):
    assert main(["models", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    from DeepMultimodalRegLib.weights import load_manifest

    assert [e["name"] for e in entries] == [e.name for e in load_manifest()]
    # the preliminary DISA weights say so, in the listing a user reads
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    disa_status = next(e["status"] for e in entries if e["name"] == "disa")
    assert disa_status.startswith("preliminary") and f"status: {disa_status}" in listing


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "DeepMultimodalRegLib", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "deepmmreg" in out.stdout


def test_demo_writes_a_report_and_the_peer_recovers_the_known_misalignment(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    initial = summary["results"][0]["tre"]["mean_mm"]
    assert initial > 5.0  # the known misalignment is real
    for entry in summary["results"][1:]:
        assert "error" not in entry, entry
        # the shipped DISA weights land 4–6 mm from the truth (docs/benchmarks.md); the others < 1 mm
        bound = 0.5 if entry["method"].startswith("disa") else 0.1
        assert entry["tre"]["mean_mm"] < bound * initial, entry
        folder = out / entry["folder"]
        for name in ("warped.nii.gz", "report.json", "report.png"):
            assert (folder / name).exists()
        assert (folder / "transform.tfm").exists() or (folder / "transform.h5").exists()
    assert "<table>" in (out / "index.html").read_text(encoding="utf-8")


def test_register_writes_the_design_outputs_and_recovers_a_known_motion(tmp_path, capsys):
    """``deepmmreg register`` on the sample T1 and a T2 moved by a known transform: the files of the
    design doc, inputs untouched, and the written transform undoes the motion."""
    from DeepMultimodalRegLib.demo import make_demo_pair
    from DeepMultimodalRegLib.evaluation import foreground_points, target_registration_error
    from DeepMultimodalRegLib.image.io import write_volume
    from DeepMultimodalRegLib.transforms.itk_io import read_transform

    fixed, moving, truth = make_demo_pair()
    f, m = write_volume(fixed, tmp_path / "t1.nii.gz"), write_volume(moving, tmp_path / "t2.nii.gz")
    stamp = (f.stat().st_mtime_ns, m.stat().st_mtime_ns)
    code = main(["register", str(f), str(m), "-o", str(tmp_path / "out"), "--method", "mind-rigid", "--device", "cpu"])
    assert code == 0
    out = tmp_path / "out"
    for name in ("transform.tfm", "warped.nii.gz", "report.json", "report.png"):
        assert (out / name).is_file(), name
    assert (f.stat().st_mtime_ns, m.stat().st_mtime_ns) == stamp
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "mind-rigid" and report["figures"]["evaluations"] > 0
    estimate = read_transform(out / "transform.tfm")
    points = foreground_points(fixed, 1000)
    assert target_registration_error(estimate, truth, points)["mean_mm"] < 1.0


def test_demo_deep_runs_general_iso_rso_on_the_ct_and_reports_in_box_errors(tmp_path, one_torch_thread):
    """``deepmmreg demo --deep``: the interactive workflow on the sample chest CT (a few iterations
    here), its step folders, the in-box errors against the known deformation, and the report section."""
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--methods", "mind-rigid", "--deep", "--iso", "2", "--rso", "3"]) == 0
    deep = json.loads((out / "summary.json").read_text())["deep_interactive"]
    assert "error" not in deep, deep
    assert list(deep["in_box"]) == ["general", "iso", "rso"]
    for step, errors in deep["in_box"].items():
        assert (out / deep["folder"] / step / "report.png").exists()
        assert errors["rmse_hu"] > 0 and errors["displacement_error_mm"] > 0
    assert (out / deep["folder"] / "rso" / "deep_session.json").exists()  # `deepmmreg refine` can continue it
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Interactive deep refinement" in page and f"{deep['folder']}/rso/report.png" in page


def test_training_runs_get_a_progress_bar_that_closes_however_they_end(monkeypatch):
    from DeepMultimodalRegLib.training import budget_args

    closed = []

    class Bar:
        def __init__(self, label):
            self.label = label

        def __call__(self, fraction, message=""):
            pass

        def close(self):
            closed.append(self.label)

    monkeypatch.setattr("DeepMultimodalRegLib.progress.TqdmProgress", Bar)

    def train(out, config, progress=None, data_dir=None):
        progress(1.0, "done")
        if config == "fail":
            raise RuntimeError("boom")
        return {"finished": config == "all", "out": out, "data_dir": data_dir}

    summary = budget_args.run_with_progress_bar("train x", train, "o", "all", data_dir="d")
    assert summary["out"] == "o" and summary["data_dir"] == "d" and closed == ["train x"]
    assert budget_args.run_state(summary) == "finished"
    assert budget_args.run_state({"finished": False}) == "stopped (run again to resume)"
    with pytest.raises(RuntimeError):
        budget_args.run_with_progress_bar("train y", train, "o", "fail")
    assert closed == ["train x", "train y"]
