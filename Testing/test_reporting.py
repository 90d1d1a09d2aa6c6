"""Tests of report.json and report.png (DeepMultimodalRegLib.reporting).

Oracles: brute-force loops for the checkerboard, SimpleITK for resampling the "before" image,
physical (LPS) coordinates of a marker for the display orientation, the json module for the file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.image import ImageGeometry, Volume, read_volume
from DeepMultimodalRegLib.reporting import (checkerboard, middle_slices, normalise_for_display, report_panels,
                                            write_report_json, write_report_png)
from DeepMultimodalRegLib.reporting.figures import DPI, FIGURE_WIDTH_IN, display_limits, plane_pixel_mm
from DeepMultimodalRegLib.transforms import AffineTransform, RigidTransform, warp_volume

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _inverse(transform) -> AffineTransform:
    h = torch.linalg.inv(transform.homogeneous()[0])
    return AffineTransform.from_matrix(h[:3, :3], h[:3, 3])


@pytest.fixture(scope="module")
def brain():
    """T1 (fixed), T2 moved by a known rigid transform (moving), and T2 moved back (warped)."""
    t1 = read_volume(SAMPLE_DATA / "mr_brain_t1.nii.gz")
    t2 = read_volume(SAMPLE_DATA / "mr_brain_t2.nii.gz")
    known = RigidTransform(torch.tensor([math.radians(8), math.radians(-5), math.radians(10), 12.0, -8.0, 6.0],
                                        dtype=torch.float64), center=tuple(t1.geometry.center))
    moving = warp_volume(t2, known, t2.geometry)
    moving.name = "t2_moved"
    warped = warp_volume(moving, _inverse(known), t1.geometry)
    return {"t1": t1, "t2": t2, "moving": moving, "warped": warped, "known": known}


# ---------------------------------------------------------------------------- report.png
def test_report_png_is_written_and_shows_images(brain, tmp_path):
    import matplotlib.image as mpimg

    figures = {"similarity_before": 0.123456789, "similarity_after": np.float32(0.87654321), "seconds": 12.3456,
               "device": "cpu", "iterations": np.int64(150), "stages": {"nested": 1}, "nan": float("nan")}
    path = write_report_png(brain["t1"], brain["moving"], brain["warped"], tmp_path / "report.png",
                            title="test: t1 ← t2", figures=figures)
    assert path == tmp_path / "report.png" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left behind
    image = mpimg.imread(path)
    assert image.shape[1] == int(FIGURE_WIDTH_IN * DPI) == 1600
    assert 600 < image.shape[0] < 1600
    rgb = image[..., :3]
    assert rgb.std() > 0.15, "the figure looks blank"
    # the images are there: large dark (image background) and coloured (overlay) areas
    assert (rgb.max(-1) < 0.05).mean() > 0.2
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 0.3).mean() > 0.01


def test_report_png_same_result_for_unaligned_and_aligned_differs(brain, tmp_path):
    """A report of the registered result differs from one whose 'after' is the unregistered moving."""
    import matplotlib.image as mpimg

    t1, moving = brain["t1"], brain["moving"]
    good = mpimg.imread(write_report_png(t1, moving, brain["warped"], tmp_path / "good.png"))
    bad = mpimg.imread(write_report_png(t1, moving, moving, tmp_path / "bad.png"))
    assert good.shape == bad.shape
    width = good.shape[1]
    left, right = slice(0, width // 2), slice(width // 2, width)
    # the "before" half is identical, the "after" half is not
    assert np.array_equal(good[:, left], bad[:, left])
    assert np.abs(good[:, right] - bad[:, right]).mean() > 0.01


def test_difference_panels_drop_when_alignment_is_restored(brain):
    """Monomodal (T1 moved and moved back): the after difference is far below the before one."""
    t1, known = brain["t1"], brain["known"]
    moved = warp_volume(t1, known, t1.geometry)
    back = warp_volume(moved, _inverse(known), t1.geometry)
    panels = report_panels(t1, moved, back)
    assert panels.planes == ["axial", "coronal", "sagittal"]
    for plane in panels.planes:
        before = panels.difference("before", plane).mean()
        after = panels.difference("after", plane).mean()
        assert after < 0.5 * before, (plane, before, after)
    # multimodal T1/T2: the before and after difference panels differ too
    mm = report_panels(t1, brain["moving"], brain["warped"])
    for plane in mm.planes:
        assert not np.allclose(mm.difference("before", plane), mm.difference("after", plane), atol=0.05)


def test_before_panel_matches_simpleitk_resampling(brain):
    """'Before' = the moving image resampled onto the fixed grid by the identity (SimpleITK oracle)."""
    import SimpleITK as sitk

    t1, t2 = brain["t1"], brain["t2"]
    # a moving image on another grid: coarser, shifted, with y flipped
    reference = sitk.Image(45, 50, 40, sitk.sitkFloat32)
    reference.SetSpacing((2.5, 2.7, 3.1))
    reference.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    reference.SetOrigin((t1.geometry.center[0] - 60, t1.geometry.center[1] + 70, t1.geometry.center[2] - 55))
    moving_sitk = sitk.Resample(t2.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving = Volume.from_sitk(moving_sitk, name="t2_other_grid")
    expected_sitk = sitk.Resample(moving_sitk, t1.to_sitk(), sitk.Transform(), sitk.sitkLinear,
                                  display_limits(moving.data)[0], sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(expected_sitk)  # (z, y, x) on the fixed grid
    k = t1.shape[0] // 2
    # fixed grid: direction diag(-1, 1, 1) → x runs to the patient's right; axial display puts R on the left
    assert np.allclose(t1.geometry.direction_matrix, np.diag([-1, 1, 1]))
    expected_axial = normalise_for_display(expected[k, :, ::-1], limits=display_limits(moving.data))
    panels = report_panels(t1, moving, t1)
    got = panels.before["axial"]
    assert got.shape == expected_axial.shape
    close = np.abs(got - expected_axial) < 0.01
    assert close.mean() > 0.995
    assert expected_axial.std() > 0.1  # the slice is not empty


# ---------------------------------------------------------------------------- orientation
DIRECTIONS = {
    "identity (LPS)": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "x flipped (as the MR sample)": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    "y flipped (as the CT sample)": (1, 0, 0, 0, -1, 0, 0, 0, 1),
    "RAS-like": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "permuted axes, z flipped": (0, 1, 0, 1, 0, 0, 0, 0, -1),
}


@pytest.mark.parametrize("direction", list(DIRECTIONS.values()), ids=list(DIRECTIONS))
def test_display_orientation_follows_patient_directions(direction):
    """A marker in the patient's left-anterior-superior octant lands where the labels say it is."""
    geometry = ImageGeometry(shape=(9, 11, 13), spacing=(1.0, 1.5, 2.0), origin=(10.0, -20.0, 30.0),
                             direction=direction)
    points = geometry.physical_grid(dtype=torch.float64).numpy()
    centre = geometry.center
    eps = 1e-6
    # LPS: +x = patient left, −y = anterior, +z = superior (boundary planes included)
    marker = ((points[..., 0] >= centre[0] - eps) & (points[..., 1] <= centre[1] + eps)
              & (points[..., 2] >= centre[2] - eps)).astype(np.float32)
    volume = Volume.from_numpy(marker, spacing=geometry.spacing, origin=geometry.origin, direction=direction)
    slices = middle_slices(volume)
    assert set(slices) == {"axial", "coronal", "sagittal"}
    # corner that must be lit: axial (A top, L right), coronal (S top, L right), sagittal (S top, A left)
    lit = {"axial": (0, -1), "coronal": (0, -1), "sagittal": (0, 0)}
    for plane, image in slices.items():
        corners = {(r, c): image[r, c] for r in (0, -1) for c in (0, -1)}
        for corner, value in corners.items():
            assert value == (1.0 if corner == lit[plane] else 0.0), (plane, corner, image)
    # physical aspect ratio: each displayed plane spans the patient's extent along its two axes
    extent = {}
    m = geometry.direction_matrix
    for a in range(3):
        extent[int(np.argmax(np.abs(m[:, a])))] = geometry.size_xyz[a] * geometry.spacing[a]
    for plane, (h_axis, v_axis) in {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}.items():
        col_mm, row_mm = plane_pixel_mm(geometry, plane)
        rows, cols = slices[plane].shape
        assert math.isclose(cols * col_mm, extent[h_axis]) and math.isclose(rows * row_mm, extent[v_axis])


def test_single_slice_volumes_show_one_plane(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    base = np.zeros((1, 40, 60), np.float32)
    base[0, 10:30, 15:45] = 1.0
    fixed = Volume.from_numpy(base + 0.05 * rng.random(base.shape, dtype=np.float32), spacing=(0.5, 0.5, 1.0))
    moving = Volume.from_numpy(np.roll(base, 5, axis=2), spacing=(0.5, 0.5, 1.0))
    assert list(middle_slices(fixed)) == ["axial"]
    panels = report_panels(fixed, moving, fixed)
    assert panels.is_2d and panels.planes == ["axial"]
    assert panels.difference("before", "axial").mean() > panels.difference("after", "axial").mean()
    image = mpimg.imread(write_report_png(fixed, moving, fixed, tmp_path / "report.png", title="2D"))
    assert image.shape[1] == 1600 and image[..., :3].std() > 0.1


def test_constant_images_do_not_fail(tmp_path):
    const = Volume.from_numpy(np.full((6, 8, 10), 7.0, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(normalise_for_display(const.data), np.zeros((6, 8, 10), np.float32))
        path = write_report_png(const, const, const, tmp_path / "report.png")
    assert path.is_file()


# ---------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("shape,squares,spacing", [((64, 64), 8, None), ((30, 50), 5, None), ((37, 23), 4, None),
                                                   ((20, 40), 4, (2.0, 1.0)), ((7, 5), 1, None)])
def test_checkerboard_matches_brute_force(shape, squares, spacing):
    rng = np.random.default_rng(1)
    a, b = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32) + 2
    pixel = (1.0, 1.0) if spacing is None else spacing
    side_mm = max(shape[0] * pixel[0], shape[1] * pixel[1]) / squares
    block = (max(1, round(side_mm / pixel[0])), max(1, round(side_mm / pixel[1])))
    expected = np.empty(shape, np.float32)
    for r in range(shape[0]):
        for c in range(shape[1]):
            expected[r, c] = a[r, c] if (r // block[0] + c // block[1]) % 2 == 0 else b[r, c]
    got = checkerboard(a, b, squares=squares, spacing=spacing)
    assert np.array_equal(got, expected)
    if shape == (64, 64):  # 8 squares of 8 pixels across
        assert block == (8, 8)
        assert got[0, 0] == a[0, 0] and got[0, 8] == b[0, 8] and got[8, 8] == a[8, 8]
    if spacing == (2.0, 1.0):  # squares are square in mm: 5 rows × 10 columns of pixels
        assert block == (5, 10)
    with pytest.raises(ValueError):
        checkerboard(a, b[:-1])


def test_normalise_for_display_uses_percentiles():
    data = np.arange(1001, dtype=np.float64)
    out = normalise_for_display(data)
    lo, hi = np.percentile(data, [1, 99])
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert np.allclose(out[100:900], (data[100:900] - lo) / (hi - lo), atol=1e-6)
    with_nan = data.copy()
    with_nan[5] = np.nan
    assert np.isfinite(normalise_for_display(with_nan)).all()
    assert np.array_equal(normalise_for_display(torch.tensor([3.0, 3.0])), np.zeros(2, np.float32))


# ---------------------------------------------------------------------------- report.json
def test_report_json_round_trip(tmp_path):
    data = {
        "method": "disa-rigid",
        "figures": {"similarity_before": float("nan"), "similarity_after": np.float32(0.5), "inf": float("-inf"),
                    "iterations": np.int64(42), "converged": np.bool_(True), "np_nan": np.float64("nan")},
        "matrix": np.eye(2), "array_nan": np.array([1.0, np.nan, np.inf]),
        "tensor": torch.tensor([[1.5, float("nan")]]), "scalar_tensor": torch.tensor(3),
        "path": Path("/tmp/out/warped.nii.gz"), "tuple": (1, 2), "int_keys": {1: "a", np.int32(2): "b"},
        "name": "t1 ← t2",
    }
    path = write_report_json(data, tmp_path / "report.json")
    assert path == tmp_path / "report.json"
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "method"')  # indented
    loaded = json.loads(text)
    assert loaded["figures"] == {"similarity_before": None, "similarity_after": 0.5, "inf": None,
                                 "iterations": 42, "converged": True, "np_nan": None}
    assert loaded["matrix"] == [[1.0, 0.0], [0.0, 1.0]]
    assert loaded["array_nan"] == [1.0, None, None]
    assert loaded["tensor"] == [[1.5, None]] and loaded["scalar_tensor"] == 3
    assert loaded["path"] == "/tmp/out/warped.nii.gz" and loaded["tuple"] == [1, 2]
    assert loaded["int_keys"] == {"1": "a", "2": "b"} and loaded["name"] == "t1 ← t2"
    assert isinstance(loaded["figures"]["iterations"], int)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_json_write_leaves_earlier_report(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text('{"earlier": true}\n')

    def broken_dump(obj, handle, **kwargs):
        handle.write('{"partial": ')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_report_json({"method": "x"}, path)
    assert path.read_text() == '{"earlier": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_png_write_leaves_earlier_report(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "report.png"
    earlier = b"\x89PNG earlier report"
    path.write_bytes(earlier)
    volume = Volume.from_numpy(np.random.default_rng(2).random((8, 9, 10), dtype=np.float32))

    def broken_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half written")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_report_png(volume, volume, volume, path)
    assert path.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, DeepMultimodalRegLib.reporting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_registration_result_save_writes_both_reports(brain, tmp_path):
    """The consumer: RegistrationResult.save calls write_report_json / write_report_png."""
    result_module = pytest.importorskip("DeepMultimodalRegLib.result")
    t1 = brain["t1"]
    identity = RigidTransform.identity(center=tuple(t1.geometry.center))
    result = result_module.RegistrationResult(method="test", transform=identity, warped=t1, fixed=t1, moving=t1,
                                              figures={"similarity_after": float("nan"), "seconds": 0.5})
    paths = result.save(tmp_path / "out")
    report = json.loads(paths["report_json"].read_text())
    assert report["figures"]["similarity_after"] is None
    assert paths["report_png"].is_file()


def test_info_text_entries_never_overlap():
    from DeepMultimodalRegLib.reporting.figures import _info_lines, _layout_info

    lines = _info_lines({"similarity_before": 0.123456789, "device": "cuda", "nested": {"a": 1},
                         "stop": "optimizer stopped: " + "step too small " * 6, "huge": "x" * 500,
                         "iterations": np.int64(7), "tensor": torch.tensor([1.0, 2.0])})
    assert "similarity before: 0.1235" in lines and "iterations: 7" in lines and "tensor: (1, 2)" in lines
    assert not any(line.startswith("nested") for line in lines)
    cells, rows = _layout_info(lines, n_cols=4, chars_per_col=40)
    occupied = set()
    for row, col, text in cells:
        span = math.ceil((len(text) + 2) / 42)
        assert col + span <= 4 and len(text) <= 4 * 40 + 6
        for c in range(col, col + span):
            assert (row, c) not in occupied
            occupied.add((row, c))
    assert rows == max(r for r, _, _ in cells) + 1
