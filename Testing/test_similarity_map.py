"""Tests of the similarity-map tool (DeepMultimodalRegLib.disa.similarity_map, the DISA paper's Fig. 1).

Oracles: ``metrics.disa_target`` (patch-by-patch LC², written independently of the dense engine)
for the LC² map; the descriptors of ``compute_descriptors`` dotted by hand for the DISA map;
``mind_ssc`` for the MIND map; the co-registered real T1/T2 sample scans (and the same pair with a
known shift of the target) for where the LC² maximum must be; one-hot volumes for the display
positions.  Small crops of the sample scans and a randomly initialised network keep them fast.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.disa.similarity_map import (MAP_NAMES, MAP_STRIDE, SimilarityMaps, map_agreement,
                                                      similarity_maps, write_similarity_map_png)
from DeepMultimodalRegLib.errors import InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.image import ImageGeometry, Volume
from DeepMultimodalRegLib.metrics import disa_target, mind_ssc
from DeepMultimodalRegLib.networks import DISANet, compute_descriptors, descriptor_geometry, descriptor_shape

#: crop of the 2 mm sample brains, array index ranges (z, y, x): 64³ voxels around the brain centre
CROP = ((44, 108), (36, 100), (16, 80))


def _crop(volume: Volume) -> Volume:
    (k0, k1), (j0, j1), (i0, i1) = CROP
    return Volume.from_sitk(volume.to_sitk()[i0:i1, j0:j1, k0:k1], name=volume.name)


def _physical(geometry: ImageGeometry, voxel) -> np.ndarray:
    k, j, i = voxel
    m = geometry.index_to_physical_matrix()
    return m[:3, :3] @ np.array([i, j, k], dtype=np.float64) + m[:3, 3]


def _model(seed: int = 0) -> DISANet:
    torch.manual_seed(seed)
    return DISANet()


@pytest.fixture(scope="module")
def pair(sample_t1, sample_t2):
    t1, t2 = _crop(sample_t1), _crop(sample_t2)
    data = t1.data.float().numpy()
    centre = np.argwhere(data > 0).mean(0)  # centre of the brain (skull-stripped: background 0)
    return {"t1": t1, "t2": t2, "centre": _physical(t1.geometry, centre),
            # a voxel on the map grid (multiple of 4 from the origin), near the brain centre
            "grid_voxel": tuple(int(MAP_STRIDE * round(c / MAP_STRIDE)) for c in centre)}


@pytest.fixture(scope="module")
def maps(pair) -> SimilarityMaps:
    point = _physical(pair["t1"].geometry, pair["grid_voxel"])
    return similarity_maps(pair["t1"], pair["t2"], point, model=_model(), device="cpu")


# ------------------------------------------------------------------------------------------ grids
def test_the_three_maps_lie_on_the_target_descriptor_grid(maps, pair):
    grid = descriptor_geometry(maps.target.geometry)
    assert maps.target.geometry.shape == pair["t2"].geometry.shape  # the sample is already at 2 mm
    assert grid.shape == descriptor_shape(pair["t2"].geometry.shape) == (16, 16, 16)
    for name, vol in maps.maps().items():
        assert vol.geometry.same_grid(grid), name
        assert tuple(vol.data.shape) == grid.shape and vol.data.dtype == torch.float32
        assert bool(torch.isfinite(vol.data).all())
        k, j, i = maps.maxima_voxel[name]
        assert float(vol.data[k, j, i]) == float(vol.data.max())
        assert np.allclose(maps.maxima[name], _physical(grid, (k, j, i)))
    assert float(maps.lc2.data.min()) >= 0 and float(maps.lc2.data.max()) <= 1
    assert float(maps.disa.data.abs().max()) <= 1 + 1e-5  # descriptors have norm ≤ 1
    assert 0 < float(maps.mind.data.min()) and float(maps.mind.data.max()) <= 1
    # σ is the median SSD, so the median of the MIND map is exp(-1)
    assert float(maps.mind.data.median()) == pytest.approx(math.exp(-1), abs=0.02)
    assert maps.source_voxel == pair["grid_voxel"]
    assert set(maps.seconds) == set(MAP_NAMES)


def test_a_point_outside_the_source_is_refused_before_any_work(pair):
    g = pair["t1"].geometry
    outside = g.corner_points().max(0) + np.array([30.0, 0.0, 0.0])
    with pytest.raises(InvalidParameterError, match="outside the source volume"):
        similarity_maps(pair["t1"], pair["t2"], outside, model=None)  # refused before loading weights
    with pytest.raises(InvalidParameterError, match="finite"):
        similarity_maps(pair["t1"], pair["t2"], (float("nan"), 0.0, 0.0), model=_model())
    with pytest.raises(InvalidParameterError, match="3"):
        similarity_maps(pair["t1"], pair["t2"], (1.0, 2.0), model=_model())
    flat = Volume(torch.zeros(1, 32, 32), ImageGeometry((1, 32, 32), (2, 2, 2)))
    with pytest.raises(InvalidImageError, match="2D"):
        similarity_maps(flat, pair["t2"], (0.0, 0.0, 0.0), model=_model())
    # half a voxel beyond the last voxel centre is outside (ITK's rule), just inside is accepted
    last = _physical(g, (63, 63, 63))
    step = g.direction_matrix @ (0.49 * np.asarray(g.spacing))
    similarity_maps(pair["t1"], pair["t2"], last + step, model=_model())
    with pytest.raises(InvalidParameterError):
        similarity_maps(pair["t1"], pair["t2"], last + step * (0.51 / 0.49), model=_model())


# ------------------------------------------------------------------------------------------ values
def test_lc2_map_equals_the_patch_by_patch_oracle(maps):
    d, h, w = maps.geometry.shape
    qs = [(0, 0, 0), (d - 1, h - 1, w - 1), (0, h - 1, 3), maps.maxima_voxel["lc2"], (d // 2, 2, w // 2),
          (5, 9, 11)]
    centres_b = torch.tensor([[MAP_STRIDE * v for v in q] for q in qs])
    centres_a = torch.tensor([maps.source_voxel] * len(qs))
    expected = disa_target(maps.source.data, maps.target.data, centres_a, centres_b)
    got = torch.stack([maps.lc2.data[q] for q in qs])
    assert torch.allclose(got.double(), expected.double(), atol=1e-5), (got, expected)
    assert float(expected.max()) > 0.5  # the oracle is not trivially zero here


def test_disa_map_is_the_dot_product_of_descriptors(maps, pair):
    model = _model()
    desc_s, _ = compute_descriptors(model, maps.source, "cpu")
    desc_t, _ = compute_descriptors(model, maps.target, "cpu")
    k, j, i = (v // MAP_STRIDE for v in maps.source_voxel)  # the point lies on a descriptor voxel
    expected = torch.einsum("c,cdhw->dhw", desc_s[:, k, j, i], desc_t)
    assert torch.allclose(maps.disa.data, expected, atol=1e-5)
    # halfway between two descriptor voxels along x: the source descriptor is their mean (trilinear)
    g = maps.source.geometry
    point = (_physical(g, maps.source_voxel) + _physical(g, (maps.source_voxel[0], maps.source_voxel[1],
                                                              maps.source_voxel[2] + MAP_STRIDE))) / 2
    half = similarity_maps(pair["t1"], pair["t2"], point, model=model, device="cpu")
    anchor = (desc_s[:, k, j, i] + desc_s[:, k, j, i + 1]) / 2
    assert torch.allclose(half.disa.data, torch.einsum("c,cdhw->dhw", anchor, desc_t), atol=1e-5)
    assert not torch.allclose(half.disa.data, maps.disa.data, atol=1e-4)


def test_mind_map_follows_its_definition(maps):
    ms = mind_ssc(maps.source.data.float())[0]
    mt = mind_ssc(maps.target.data.float())[0][:, ::MAP_STRIDE, ::MAP_STRIDE, ::MAP_STRIDE]
    anchor = ms[:, maps.source_voxel[0], maps.source_voxel[1], maps.source_voxel[2]]
    ssd = ((mt - anchor[:, None, None, None]) ** 2).mean(0)
    assert maps.mind_sigma == pytest.approx(float(ssd.median()), rel=1e-5)
    assert torch.allclose(maps.mind.data, torch.exp(-ssd / maps.mind_sigma), atol=1e-5)


def test_a_point_is_most_similar_to_itself(pair):
    """Source = target and the point on the map grid: LC² and MIND peak at the point with value 1."""
    t1 = pair["t1"]
    point = _physical(t1.geometry, pair["grid_voxel"])
    steps = []
    same = similarity_maps(t1, t1, point, model=_model(), device="cpu",
                           progress=lambda fraction, message: steps.append((fraction, message)))
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    for name in ("lc2", "mind"):
        assert np.allclose(same.maxima[name], point, atol=1e-3), name
        assert float(getattr(same, name).data.max()) == pytest.approx(1.0, abs=1e-4)


def test_cancel_stops_before_the_work(pair):
    from DeepMultimodalRegLib.errors import CancelledError
    from DeepMultimodalRegLib.progress import CancelToken

    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        similarity_maps(pair["t1"], pair["t2"], pair["centre"], model=_model(), cancel=token)


# ------------------------------------------------------------------------------------------ real scans
def test_lc2_peak_is_at_the_corresponding_point_of_the_coregistered_t2(pair):
    """T1 → T2 of the same subject on the same grid: the LC² maximum for the brain centre lies within
    two map voxels (16 mm) of the same physical point; with the T2 shifted by a known 24 mm it moves
    with it."""
    point = pair["centre"]  # not on the map grid
    maps = similarity_maps(pair["t1"], pair["t2"], point, model=_model(), device="cpu")
    assert np.linalg.norm(np.asarray(maps.maxima["lc2"]) - point) <= 16.0
    shift = np.array([24.0, 0.0, -24.0])
    g = pair["t2"].geometry
    moved = Volume(pair["t2"].data, dataclasses.replace(g, origin=tuple(np.asarray(g.origin) + shift)),
                   name="t2_shifted")
    shifted = similarity_maps(pair["t1"], moved, point, model=_model(), device="cpu")
    assert np.linalg.norm(np.asarray(shifted.maxima["lc2"]) - (point + shift)) <= 16.0
    assert np.linalg.norm(np.asarray(shifted.maxima["lc2"]) - point) > 16.0


def test_map_agreement_numbers(maps):
    out = map_agreement(maps)
    total = int(np.prod(maps.geometry.shape))
    assert 0 < out["foreground_voxels"] < total  # the skull-stripped background is left out
    for key in ("pearson_disa_lc2", "pearson_mind_lc2"):
        assert -1 <= out[key] <= 1
    assert out["distance_lc2_max_to_point_mm"] == pytest.approx(
        float(np.linalg.norm(np.asarray(maps.maxima["lc2"]) - np.asarray(maps.point_lps))))
    # a map identical to LC² agrees perfectly; one anti-correlated disagrees
    twin = dataclasses.replace(maps, mind=maps.lc2, maxima=dict(maps.maxima, mind=maps.maxima["lc2"]),
                               disa=maps.lc2.with_data(-maps.lc2.data))
    out = map_agreement(twin)
    assert out["pearson_mind_lc2"] == pytest.approx(1.0, abs=1e-9)
    assert out["pearson_disa_lc2"] == pytest.approx(-1.0, abs=1e-9)
    assert out["distance_mind_lc2_max_mm"] == 0.0


# ------------------------------------------------------------------------------------------ figure
def test_similarity_png_is_written_1600_wide_and_shows_the_maps(maps, tmp_path):
    import matplotlib.image as mpimg

    path = write_similarity_map_png(maps, tmp_path / "simmap.png", title="test map")
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["simmap.png"]
    image = mpimg.imread(path)[..., :3]
    assert image.shape[1] == 1600 and 900 < image.shape[0] < 2400
    assert float(image.std()) > 0.1  # not blank
    # the heat maps put saturated colours on the page (grey images alone would not)
    saturation = image.max(-1) - image.min(-1)
    assert float((saturation > 0.4).mean()) > 0.02


def test_a_failed_png_write_leaves_the_earlier_file_intact(maps, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "simmap.png"
    path.write_bytes(b"earlier figure")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_similarity_map_png(maps, path)
    assert path.read_bytes() == b"earlier figure"
    assert [p.name for p in tmp_path.iterdir()] == ["simmap.png"]


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, 1, -1, 0, 0, 0, -1, 0)])
def test_display_position_of_a_voxel_matches_the_displayed_planes(direction):
    """plane_pixel_position (used for the markers) agrees with planes_through on a one-hot volume."""
    from DeepMultimodalRegLib.reporting.figures import plane_pixel_position, planes_through

    geometry = ImageGeometry((9, 11, 13), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0), direction)
    voxel = (2, 7, 4)
    data = torch.zeros(geometry.shape)
    data[voxel] = 1.0
    planes = planes_through(Volume(data, geometry), voxel)
    assert set(planes) == {"axial", "coronal", "sagittal"}
    for plane, image in planes.items():
        row, col = np.unravel_index(int(np.argmax(image)), image.shape)
        assert image[row, col] == 1.0
        assert plane_pixel_position(geometry, voxel, plane) == (col, row), plane
