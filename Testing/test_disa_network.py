"""The DISA descriptor network, its output grid, slab-wise inference, int8 descriptors and weights.

Oracles: the layer arithmetic of the published network (90,752 parameters), impulse responses
(which input voxels each descriptor depends on), the network's own single pass (for crops and
slabs), float64 dot products (for int8), and the weights manifest's own hash check.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.image import ImageGeometry, Volume
from DeepMultimodalRegLib.networks import (EXPECTED_PARAMETERS, LEAKY_SLOPE, OUTPUT_STRIDE, RECEPTIVE_FIELD,
                                           DISANet, compute_descriptors, count_parameters, dequantize,
                                           descriptor_geometry, int8_dot, load_disa_network,
                                           pad_to_receptive_field, quantize)
from DeepMultimodalRegLib.networks import disa_net
from DeepMultimodalRegLib.networks.disa_net import BlurPool3d, LAYER_KERNELS, receptive_field_of
from DeepMultimodalRegLib.weights import manifest
from DeepMultimodalRegLib.weights.manifest import WeightsError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DISANet().eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def t1_block(sample_t1):
    """A z-scored 64³ block of the embedded T1 (real anatomy, 2 mm)."""
    data = sample_t1.data.float()
    block = data[32:96, 32:96, 20:84]
    block = (block - block.mean()) / block.std()
    return block.contiguous()


# ---------------------------------------------------------------------------- architecture
def test_parameter_count_is_the_published_90752(model):
    assert count_parameters(model) == EXPECTED_PARAMETERS == 90_752
    per_layer = [count_parameters(m) for m in model.layers]
    # conv 1→8, res 8, conv 8→16, blur, res 16, conv 16→32, blur, res 32, 1×1 conv 32→16 (no bias)
    assert per_layer == [224, 3472, 3472, 0, 13856, 13856, 0, 55360, 512]
    assert model.layers[8].bias is None
    norms = (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in model.modules())
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {LEAKY_SLOPE} == {0.01}


def test_blur_kernels_are_fixed_normalised_buffers(model):
    blurs = [m for m in model.modules() if isinstance(m, BlurPool3d)]
    assert [b.channels for b in blurs] == [16, 32]
    param_ids = {id(p) for p in model.parameters()}
    for b in blurs:
        assert id(b.f) not in param_ids
        assert any(b.f is buf for buf in model.buffers())
        assert b.f.shape == (b.channels, 1, 5, 5, 5)
        sums = b.f.sum(dim=(1, 2, 3, 4))
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
        binomial = torch.tensor([1.0, 4, 6, 4, 1])
        expected = binomial[:, None, None] * binomial[None, :, None] * binomial[None, None, :] / 4096
        assert torch.allclose(b.f[0, 0], expected)
    assert not any(k.endswith(".f") for k in model.state_dict())  # a constant, not a weight


def test_residual_block_adds_the_skip_after_the_second_activation():
    torch.manual_seed(1)
    block = disa_net.ResidualBlock(4).eval()
    x = torch.randn(1, 4, 6, 6, 6)
    conv1, conv2 = block.layers[0][0], block.layers[1][0]
    act = torch.nn.functional.leaky_relu
    expected = x + act(conv2(act(conv1(x), 0.01)), 0.01)
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_residual_block_without_autograd_adds_in_place_and_leaves_its_input_alone():
    torch.manual_seed(1)
    block = disa_net.ResidualBlock(4).eval()
    x = torch.randn(1, 4, 6, 6, 6)
    before = x.clone()
    with torch.enable_grad():
        recorded = block(x)
    with torch.inference_mode():
        in_place = block(x)
    assert torch.equal(x, before)
    assert torch.allclose(in_place, recorded, atol=1e-7)


@pytest.mark.parametrize("stride", [2, 1])
def test_blur_pool_equals_scipy_replicate_padded_blur_at_every_size(stride):
    """The blur is a zero-padded convolution with its edge planes redone; scipy's 'nearest' mode is
    the replicate padding it must equal, on axes from 1 voxel (every output an edge) to 12."""
    import itertools

    from scipy import ndimage

    blur = BlurPool3d(2).double()
    kernel = blur.f[0, 0].double().numpy()
    rng = np.random.default_rng(3)
    for shape in itertools.product((1, 2, 3, 5, 6), (4, 7), (2, 11, 12)):
        x = rng.normal(size=(1, 2, *shape))
        with torch.no_grad():
            got = blur(torch.from_numpy(x), stride=stride).numpy()
        for c in range(2):
            want = ndimage.correlate(x[0, c], kernel, mode="nearest")[::stride, ::stride, ::stride]
            assert got.shape[2:] == want.shape, shape
            np.testing.assert_allclose(got[0, c], want, atol=1e-12, err_msg=str(shape))
    # training back-propagates through the overwritten edge planes: the gradient must follow them
    x = torch.from_numpy(rng.normal(size=(1, 2, 5, 4, 6))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: blur(v, stride=stride), (x,))


@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 30, 29), (8, 9, 10), (21, 16, 13)])
def test_output_grid_is_input_over_four_rounded_up(model, shape):
    with torch.no_grad():
        y = model(torch.randn(1, 1, *shape))
    assert y.shape == (1, 16) + tuple(-(-n // 4) for n in shape)


def test_descriptor_norms_are_at_most_one_for_large_activations(model):
    torch.manual_seed(2)
    with torch.no_grad():
        y = model(1000.0 * torch.randn(2, 1, 24, 20, 16))
    norms = torch.linalg.vector_norm(y, dim=1)
    assert norms.max() <= 1 + 1e-6
    assert (norms > 0.999).float().mean() > 0.9  # the large inputs really did hit the clip


def test_receptive_field_and_output_centres_from_an_impulse():
    """Descriptor (k, j, i) changes iff the perturbed input voxel is within ±24 of (4k, 4j, 4i)."""
    assert receptive_field_of(LAYER_KERNELS) == RECEPTIVE_FIELD == 49
    torch.manual_seed(3)
    net = DISANet().double().eval()
    shape, impulse = (60, 56, 52), (28, 26, 25)
    x = torch.randn(1, 1, *shape, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, impulse[0], impulse[1], impulse[2]] += 50.0
    with torch.no_grad():
        diff = (net(x2) - net(x)).abs().amax(dim=(0, 1))
    # expected: the descriptors whose physical centre (descriptor_geometry) lies within ±24 input
    # voxels of the impulse along every axis
    geom = ImageGeometry(shape=shape, spacing=(0.7, 1.3, 2.1), origin=(5.0, -3.0, 40.0),
                         direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
    dgeom = descriptor_geometry(geom)
    assert dgeom.shape == tuple(diff.shape)
    centres_mm = dgeom.physical_grid(dtype=torch.float64).reshape(-1, 3).numpy()
    to_index = geom.physical_to_index_matrix()
    centres_idx = centres_mm @ to_index[:3, :3].T + to_index[:3, 3]  # (i, j, k) in the input grid
    offsets = np.abs(centres_idx - np.asarray(impulse[::-1], float)).reshape(*dgeom.shape, 3)
    half = RECEPTIVE_FIELD // 2
    expected = (offsets <= half + 1e-6).all(axis=-1)
    changed = diff.numpy() > 0
    assert not changed[~expected].any()  # nothing outside the receptive field moves, bit for bit
    # and along each axis the full ±24 extent moves (corners of the cube fall below float64
    # resolution: the product of the kernels' edge taps is tiny, so test the axis profiles)
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        assert np.array_equal(changed.any(axis=others), expected.any(axis=others))
        assert expected.any(axis=others).sum() in (12, 13)  # 49 voxels / stride 4


# ---------------------------------------------------------------------------- geometry
def test_descriptor_geometry_places_voxel_k_on_input_voxel_4k():
    angle = np.deg2rad(25.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
    geom = ImageGeometry(shape=(37, 40, 45), spacing=(0.9, 1.1, 2.5), origin=(12.5, -40.0, 7.25),
                         direction=tuple(direction.reshape(-1)))
    dgeom = descriptor_geometry(geom)
    assert dgeom.shape == (10, 10, 12)
    assert np.allclose(dgeom.spacing, (3.6, 4.4, 10.0))
    assert dgeom.direction == geom.direction
    rng = np.random.default_rng(0)
    for _ in range(20):
        k, j, i = (int(rng.integers(0, n)) for n in dgeom.shape)
        p_desc = dgeom.index_to_physical_matrix() @ np.array([i, j, k, 1.0])
        p_input = geom.index_to_physical_matrix() @ np.array([4 * i, 4 * j, 4 * k, 1.0])
        assert np.allclose(p_desc, p_input, atol=1e-9)
    # the last descriptor along each axis sits on an input voxel, never beyond the image
    last = np.array(dgeom.size_xyz) - 1
    assert np.all(4 * last <= np.array(geom.size_xyz) - 1)


# ---------------------------------------------------------------------------- fully convolutional
def test_crop_descriptors_equal_the_interior_of_the_full_volume(model64, t1_block):
    full = t1_block.double()  # (64, 64, 64); float64 so that any leak of the border shows
    offset = (8, 4, 4)  # multiples of 4: the crop's grid is a sub-grid of the full one
    crop = full[offset[0]:, offset[1]:, offset[2]:]  # (56, 60, 60)
    with torch.no_grad():
        y_full = model64(full[None, None])[0]
        y_crop = model64(crop[None, None])[0]
    half = RECEPTIVE_FIELD // 2
    ranges = []
    for n, o in zip(crop.shape, offset):
        ks = [k for k in range(-(-n // 4)) if 4 * k - half >= 0 and 4 * k + half <= n - 1]
        assert ks, "crop too small to have an interior"
        ranges.append((ks[0], ks[-1] + 1, o // 4))
    (a0, a1, da), (b0, b1, db), (c0, c1, dc) = ranges
    interior_crop = y_crop[:, a0:a1, b0:b1, c0:c1]
    interior_full = y_full[:, a0 + da:a1 + da, b0 + db:b1 + db, c0 + dc:c1 + dc]
    assert interior_crop.shape[1:] == (2, 3, 3)
    assert torch.allclose(interior_crop, interior_full, rtol=0, atol=1e-12)
    # and the comparison is not vacuous: at the crop's own border the descriptors do differ
    assert (y_crop[:, 0, 0, 0] - y_full[:, da, db, dc]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [4, 9, 30])
def test_slabs_equal_a_single_pass(model64, chunk):
    """In float64 so that a halo even slightly short of the receptive field shows (~1e-7)."""
    torch.manual_seed(7)
    x = torch.randn(1, 1, 61, 12, 10, dtype=torch.float64)  # depth not a multiple of 4
    with torch.no_grad():
        one = model64(x)
        slabs = disa_net._run_slabs(model64, x, chunk)
    assert one.shape == slabs.shape == (1, 16, 16, 3, 3)
    assert torch.allclose(one, slabs, rtol=0, atol=1e-12)


def test_compute_descriptors_in_slabs_equals_one_pass(model, t1_block):
    data = t1_block[:61, :49, :50].contiguous()
    volume = Volume(data, ImageGeometry(shape=data.shape, spacing=(2.0, 2.0, 2.0)))
    one, g1 = compute_descriptors(model, volume, device="cpu")
    slabs, g2 = compute_descriptors(model, volume, device="cpu", chunk=24)
    assert g1 == g2 == descriptor_geometry(volume.geometry)
    assert one.shape == slabs.shape == (16, 16, 13, 13)
    assert torch.allclose(one, slabs, rtol=0, atol=1e-6)
    with pytest.raises(InvalidParameterError):
        compute_descriptors(model, volume, device="cpu", chunk=0)


def test_compute_descriptors_on_a_real_volume(model, sample_t1):
    block = sample_t1.data[40:88, 40:100, 30:86]
    volume = Volume(block, ImageGeometry(shape=block.shape, spacing=sample_t1.geometry.spacing,
                                         origin=sample_t1.geometry.origin,
                                         direction=sample_t1.geometry.direction), name="t1 block")
    before = volume.data.clone()
    model.train()
    desc, geom = compute_descriptors(model, volume.float(), device="cpu")
    assert model.training  # restored
    model.eval()
    assert torch.equal(volume.data, before)
    assert desc.dtype == torch.float32 and desc.device.type == "cpu"
    assert desc.shape == (16,) + geom.shape == (16, 12, 15, 14)
    assert geom.origin == volume.geometry.origin and np.allclose(geom.spacing, (8.0, 8.0, 8.0))
    assert torch.linalg.vector_norm(desc, dim=0).max() <= 1 + 1e-6
    with pytest.raises(InvalidImageError, match="NaN or Inf"):
        bad = volume.float().data.clone()
        bad[3, 3, 3] = float("nan")
        compute_descriptors(model, volume.with_data(bad), device="cpu")



def test_bfloat16_descriptors_are_float32_close_to_float32_ones_and_within_the_unit_ball(t1_block):
    """precision="bfloat16" runs the layers in bfloat16 and hands back float32 descriptors, within about
    1% of the float32 pass (the shipped weights on real anatomy; 1.0–1.5% on the shared scans' whole maps)."""
    model = load_disa_network("disa")
    data = t1_block[:56, :60, :52].contiguous()
    volume = Volume(data, ImageGeometry(shape=data.shape, spacing=(2.0, 2.0, 2.0)))
    full, grid = compute_descriptors(model, volume, device="cpu", sign_symmetric=True)
    half, half_grid = compute_descriptors(model, volume, device="cpu", sign_symmetric=True, precision="bfloat16")
    assert half.dtype == torch.float32 and half.shape == full.shape and half_grid == grid
    relative = float((half - full).norm() / full.norm())
    assert 0.0 < relative < 0.03, relative  # it did run in bfloat16, and stays close
    assert torch.linalg.vector_norm(half, dim=0).max() <= 1 + 1e-6
    with pytest.raises(InvalidParameterError, match="precision"):
        compute_descriptors(model, volume, device="cpu", precision="float16")


def test_sign_symmetric_descriptors_are_the_mean_over_the_sign_and_sign_invariant(model, t1_block):
    data = t1_block[:49, :53, :50].contiguous()
    volume = Volume(data, ImageGeometry(shape=data.shape, spacing=(2.0, 2.0, 2.0)))
    raw, _ = compute_descriptors(model, volume, device="cpu")
    raw_negative, _ = compute_descriptors(model, volume.with_data(-data), device="cpu")
    assert (raw - raw_negative).abs().max() > 1e-3  # the network alone is not sign invariant
    sym, geometry = compute_descriptors(model, volume, device="cpu", sign_symmetric=True)
    sym_negative, _ = compute_descriptors(model, volume.with_data(-data), device="cpu", sign_symmetric=True)
    assert geometry == descriptor_geometry(volume.geometry) and sym.shape == raw.shape
    # oracle: the two raw passes averaged by hand
    assert torch.allclose(sym, 0.5 * (raw + raw_negative), rtol=0, atol=1e-6)
    assert torch.allclose(sym, sym_negative, rtol=0, atol=1e-6)
    assert torch.linalg.vector_norm(sym, dim=0).max() <= 1 + 1e-6
    slabs, _ = compute_descriptors(model, volume, device="cpu", chunk=24, sign_symmetric=True)
    assert torch.allclose(sym, slabs, rtol=0, atol=1e-6)

def test_a_constant_border_is_skipped_with_the_same_descriptors(model, t1_block, monkeypatch):
    """Real anatomy padded with a constant along z (as a moving image on a widened grid is): the
    network runs on the content and the border it sees only, and every descriptor whose receptive
    field lies inside the volume equals the full pass; the others are the constant's descriptor."""
    from DeepMultimodalRegLib.networks import disa_border

    monkeypatch.setattr(disa_border, "MAX_CROP_FRACTION", 0.9)  # a small test volume saves less than 40%
    content = t1_block[:24, :24, :24]
    background = float(content.min()) - 1.0
    x = torch.nn.functional.pad(content, (16, 16, 16, 16, 70, 62), value=background)[None, None]  # (156, 56, 56)
    seen = []

    def forward(v):
        seen.append(tuple(v.shape[2:]))
        return model(v)

    with torch.no_grad():
        trimmed = disa_border.forward_skipping_constant_border(forward, x)
        full = model(x)
    assert trimmed.shape == full.shape == (1, 16, 39, 14, 14)
    assert max(s[0] for s in seen) < 156  # the border was not run through the network
    half = RECEPTIVE_FIELD // 2
    inside = [[k for k in range(m) if 4 * k - half >= 0 and 4 * k + half <= n - 1]
              for n, m in zip(x.shape[2:], trimmed.shape[2:])]
    z, y, w = (slice(r[0], r[-1] + 1) for r in inside)
    assert torch.allclose(trimmed[:, :, z, y, w], full[:, :, z, y, w], rtol=0, atol=1e-5)
    # far from the content the descriptor is the constant one, which the full pass also gives there
    assert torch.allclose(trimmed[0, :, 6, 6:8, 6:8], full[0, :, 6, 6:8, 6:8], rtol=0, atol=1e-5)
    assert (full[0, :, 6, 6, 6] - full[0, :, 19, 6, 6]).abs().max() > 1e-3  # (content differs: not vacuous)
    # the library entry point takes the same path and gives the same result
    volume = Volume(x[0, 0], ImageGeometry(shape=tuple(x.shape[2:]), spacing=(2.0, 2.0, 2.0)))
    via_library, _ = compute_descriptors(model, volume, device="cpu")
    assert torch.allclose(via_library, trimmed[0], rtol=0, atol=1e-6)


def test_sign_symmetric_descriptors_skip_the_border_of_both_signs_in_one_batch(model, t1_block, monkeypatch):
    """The sign-symmetric library path runs the volume and its negative as one batch of two, each
    padded with its own constant (b and -b): inside the volume it equals the mean of two separate full
    passes, and the border is still not run through the network."""
    from DeepMultimodalRegLib.networks import disa_border

    monkeypatch.setattr(disa_border, "MAX_CROP_FRACTION", 0.9)
    content = t1_block[:24, :24, :24]
    background = float(content.min()) - 1.0
    x = torch.nn.functional.pad(content, (16, 16, 16, 16, 70, 62), value=background)[None, None]
    volume = Volume(x[0, 0], ImageGeometry(shape=tuple(x.shape[2:]), spacing=(2.0, 2.0, 2.0)))
    batches = []
    original = disa_net._forward
    monkeypatch.setattr(disa_net, "_forward", lambda m, u, *a: batches.append(tuple(u.shape)) or original(m, u, *a))
    sym, _ = compute_descriptors(model, volume, device="cpu", sign_symmetric=True)
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(-x))[0]
    assert all(b[0] == 2 for b in batches) and max(b[2] for b in batches) < 156
    half = RECEPTIVE_FIELD // 2
    inside = [[k for k in range(m) if 4 * k - half >= 0 and 4 * k + half <= n - 1]
              for n, m in zip(x.shape[2:], sym.shape[1:])]
    z, y, w = (slice(r[0], r[-1] + 1) for r in inside)
    assert torch.allclose(sym[:, z, y, w], expected[:, z, y, w], rtol=0, atol=1e-5)
    assert (expected[:, 6, 6, 6] - expected[:, 19, 6, 6]).abs().max() > 1e-3  # (content differs: not vacuous)


# ---------------------------------------------------------------------------- à trous (output stride 2)
def test_a_trous_map_is_the_trained_map_at_even_sites_and_the_shifted_network_at_odd_sites(model64):
    """Oracles: the stride-4 network itself.  Even sites of the stride-2 map are its output; the site
    (2k+1, 2j+1, 2i+1) is its output on the input shifted by 2 voxels along every axis (interior only,
    where neither pass sees the border)."""
    torch.manual_seed(11)
    x = torch.randn(1, 1, 67, 66, 69, dtype=torch.float64)
    with torch.no_grad():
        trained = model64(x)
        fine = model64(x, output_stride=2)
        shifted = model64(x[:, :, 2:, 2:, 2:])
    assert fine.shape == (1, 16, 34, 33, 35)
    assert torch.allclose(fine[:, :, ::2, ::2, ::2], trained, rtol=0, atol=1e-12)
    half = RECEPTIVE_FIELD // 2
    inside = [[k for k in range(m) if 4 * k + 2 - half >= 2 and 4 * k + 2 + half <= n - 1]
              for n, m in zip(x.shape[2:], shifted.shape[2:])]
    assert all(len(r) >= 3 for r in inside)
    z, y, w = (slice(r[0], r[-1] + 1) for r in inside)
    odd = fine[:, :, 1::2, 1::2, 1::2]
    assert torch.allclose(odd[:, :, z, y, w], shifted[:, :, z, y, w], rtol=0, atol=1e-12)
    assert (odd[:, :, z, y, w] - trained[:, :, z, y, w]).abs().max() > 1e-3  # new sites, not copies
    with pytest.raises(InvalidParameterError, match="output stride"):
        model64(x, output_stride=3)


def test_a_trous_descriptors_through_the_library_keep_grid_slabs_border_and_padding(model, t1_block, monkeypatch):
    from DeepMultimodalRegLib.networks import disa_border

    data = t1_block[:61, :49, :50].contiguous()
    volume = Volume(data, ImageGeometry(shape=data.shape, spacing=(2.0, 2.0, 2.0), origin=(1.0, -2.0, 3.0)))
    one, grid = compute_descriptors(model, volume, device="cpu", output_stride=2)
    assert grid == descriptor_geometry(volume.geometry, 2)
    assert one.shape == (16, 31, 25, 25) and np.allclose(grid.spacing, (4.0, 4.0, 4.0))
    assert grid.origin == volume.geometry.origin
    coarse, _ = compute_descriptors(model, volume, device="cpu")
    assert torch.allclose(one[:, ::2, ::2, ::2], coarse, rtol=0, atol=1e-6)
    slabs, _ = compute_descriptors(model, volume, device="cpu", chunk=20, output_stride=2, sign_symmetric=True)
    sym, _ = compute_descriptors(model, volume, device="cpu", output_stride=2, sign_symmetric=True)
    assert torch.allclose(slabs, sym, rtol=0, atol=1e-6)
    # a volume thinner than the receptive field: padded, then cropped back on the stride-2 grid
    thin = Volume(data[:10].contiguous(), ImageGeometry(shape=(10, 49, 50), spacing=(2.0, 2.0, 2.0)))
    small, _ = compute_descriptors(model, thin, device="cpu", output_stride=2)
    padded, pads = pad_to_receptive_field(thin.data[None, None])
    with torch.no_grad():
        by_hand = model(padded, output_stride=2)[0]
    z0 = pads[0][0] // 2
    assert small.shape == (16, 5, 25, 25) and torch.allclose(small, by_hand[:, z0:z0 + 5], rtol=0, atol=1e-6)
    # a wide constant border is skipped with the same descriptors inside
    monkeypatch.setattr(disa_border, "MAX_CROP_FRACTION", 0.9)
    content = t1_block[:24, :24, :24]
    x = torch.nn.functional.pad(content, (16, 16, 16, 16, 70, 62), value=float(content.min()) - 1.0)
    bordered = Volume(x, ImageGeometry(shape=tuple(x.shape), spacing=(2.0, 2.0, 2.0)))
    trimmed, _ = compute_descriptors(model, bordered, device="cpu", output_stride=2)
    with torch.no_grad():
        full = model(x[None, None], output_stride=2)[0]
    half = RECEPTIVE_FIELD // 2
    inside = [[k for k in range(m) if 2 * k - half >= 0 and 2 * k + half <= n - 1]
              for n, m in zip(x.shape, trimmed.shape[1:])]
    z, y, w = (slice(r[0], r[-1] + 1) for r in inside)
    assert trimmed.shape == full.shape == (16, 78, 28, 28)
    assert torch.allclose(trimmed[:, z, y, w], full[:, z, y, w], rtol=0, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="output stride"):
        compute_descriptors(model, volume, device="cpu", output_stride=1)


def test_a_volume_without_constant_border_takes_the_plain_pass(model, t1_block):
    from DeepMultimodalRegLib.networks import disa_border

    seen = []
    x = t1_block[None, None]
    with torch.no_grad():
        out = disa_border.forward_skipping_constant_border(lambda v: seen.append(tuple(v.shape)) or model(v), x)
        assert torch.equal(out, model(x))
    assert seen == [tuple(x.shape)]


# ---------------------------------------------------------------------------- small volumes
def test_small_volumes_are_padded_without_warning_and_keep_their_grid(model):
    torch.manual_seed(4)
    data = torch.randn(8, 20, 60)
    volume = Volume(data, ImageGeometry(shape=data.shape, spacing=(1.0, 1.5, 2.0), origin=(1, 2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        desc, geom = compute_descriptors(model, volume, device="cpu")
    assert geom == descriptor_geometry(volume.geometry)
    assert desc.shape == (16, 2, 5, 15)
    # oracle: pad by hand (replicate, low side a multiple of 4), run once, crop
    padded, pads = pad_to_receptive_field(data[None, None])
    assert padded.shape[2:] == (49, 49, 60) and pads[2] == (0, 0)
    assert all(lo % OUTPUT_STRIDE == 0 and lo + n + hi == max(n, 49)
               for (lo, hi), n in zip(pads, data.shape))
    assert torch.equal(padded[0, 0, pads[0][0]:pads[0][0] + 8, pads[1][0]:pads[1][0] + 20], data)
    with torch.no_grad():
        y = model(padded)[0]
    z0, y0 = pads[0][0] // 4, pads[1][0] // 4
    assert torch.allclose(desc, y[:, z0:z0 + 2, y0:y0 + 5, :15], atol=1e-6)
    # a volume at least RECEPTIVE_FIELD along every axis is passed through untouched
    big = torch.zeros(1, 1, 49, 50, 51)
    same, pads = pad_to_receptive_field(big)
    assert same is big and pads == [(0, 0)] * 3


@pytest.mark.parametrize("shape", [(7, 30, 30), (30, 5, 30), (1, 64, 64)])
def test_too_thin_volumes_are_refused(model, shape):
    volume = Volume(torch.randn(shape), ImageGeometry(shape=shape))
    with pytest.raises(InvalidImageError, match="at least 8 voxels"):
        compute_descriptors(model, volume, device="cpu")
    with pytest.raises(InvalidImageError):
        pad_to_receptive_field(torch.randn(1, 1, *shape))


# ---------------------------------------------------------------------------- int8 descriptors
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=0, keepdim=True)


def test_int8_quantisation_and_dot_product_accuracy():
    g = torch.Generator().manual_seed(5)
    a = _unit(torch.randn(16, 20, 24, 28, generator=g))
    b = _unit(a + 0.6 * torch.randn(a.shape, generator=g))  # related maps, as after registration
    weights = torch.rand(20, 24, 28, generator=g)
    a_q, sa = quantize(a)
    b_q, sb = quantize(b)
    assert a_q.dtype == torch.int8 and int(a_q.min()) >= -127
    assert sa == pytest.approx(float(a.abs().max()) / 127)
    assert (dequantize(a_q, sa) - a).abs().max() <= sa / 2 + 1e-7
    for w in (None, weights):
        ref = (a.double() * b.double()).sum(0)
        ref = float(ref.sum() if w is None else (ref * w.double()).sum())
        got = float(int8_dot(a_q, sa, b_q, sb, weights=w))
        assert abs(got - ref) / abs(ref) < 0.01
        # the chunked integer arithmetic is exact: it equals the float64 dot of the dequantised codes
        deq = (dequantize(a_q, sa, torch.float64) * dequantize(b_q, sb, torch.float64)).sum(0)
        exact = float(deq.sum() if w is None else (deq * w.double()).sum())
        assert got == pytest.approx(exact, rel=1e-9)
        assert float(int8_dot(a_q, sa, b_q, sb, weights=w, chunk=1)) == pytest.approx(got, rel=1e-12)
    # a fixed unit-norm scale also works (never clips descriptors of norm <= 1)
    q, s = quantize(a, scale=1 / 127)
    assert s == pytest.approx(1 / 127) and (dequantize(q, s) - a).abs().max() <= s / 2 + 1e-7
    with pytest.raises(InvalidParameterError):
        int8_dot(a_q, sa, b_q[:, :-1], sb)
    with pytest.raises(InvalidParameterError):
        int8_dot(a_q, sa, b_q, sb, weights=weights[:-1])


# ---------------------------------------------------------------------------- weights
def test_unknown_weights_name_is_a_clear_weights_error():
    with pytest.raises(WeightsError, match="no DISA weights named 'no-such-net'"):
        load_disa_network("no-such-net")


def test_shipped_weights_load_and_give_finite_unit_bounded_descriptors(sample_t1):
    from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa
    from DeepMultimodalRegLib.weights import load_manifest, verify_weights

    entry = next(e for e in load_manifest() if e.name == "disa")
    verify_weights(entry)  # the SHA-256 in the manifest matches the file
    assert entry.path.stat().st_size < 1024 ** 2
    model = load_disa_network("disa")
    assert count_parameters(model) == 90_752
    descriptors, geometry = compute_descriptors(model, prepare_for_disa(sample_t1), device="cpu")
    assert bool(torch.isfinite(descriptors).all())
    norms = descriptors.norm(dim=0)
    assert float(norms.max()) <= 1 + 1e-5 and float(norms.mean()) > 0.05  # not a dead network


@pytest.fixture
def temp_weights(tmp_path, monkeypatch):
    """A private weights folder + manifest; returns a function that registers a state_dict."""
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps({"models": []}))
    original = manifest.load_manifest
    monkeypatch.setattr(manifest, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(manifest, "MANIFEST", manifest_path)
    # load_manifest's default path is bound at import time: point it at the private manifest
    monkeypatch.setattr(manifest, "load_manifest", lambda path=manifest_path: original(path))

    def register(name: str, state: dict, sha256: str | None = None) -> str:
        file = f"{name}.pt"
        torch.save(state, tmp_path / file)
        digest = sha256 or hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()
        data = json.loads(manifest_path.read_text())
        data["models"].append(dict(name=name, method="disa", file=file, sha256=digest,
                                   parameters=EXPECTED_PARAMETERS, card=f"{name}.md"))
        manifest_path.write_text(json.dumps(data))
        return file

    return register


def test_valid_weights_load_and_match(temp_weights):
    torch.manual_seed(6)
    trained = DISANet()
    temp_weights("disa_ok", trained.state_dict())
    loaded = load_disa_network("disa_ok")
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # a checkpoint laid out like the official training output (torch.compile prefix, blur kernels
    # stored as tensors) loads into the same network
    official = {f"_orig_mod.{k}": v for k, v in trained.state_dict().items()}
    official["_orig_mod.layers.3.f"] = disa_net.binomial_kernel_3d(16)
    official["_orig_mod.layers.6.f"] = disa_net.binomial_kernel_3d(32)
    temp_weights("disa_official", official)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_disa_network("disa_official")(x), trained.eval()(x))


def test_corrupted_weights_are_refused_naming_the_file(temp_weights):
    file = temp_weights("disa_bad", DISANet().state_dict(), sha256="0" * 64)
    with pytest.raises(WeightsError, match="corrupt") as info:
        load_disa_network("disa_bad")
    assert file in str(info.value)


def test_weights_of_another_architecture_are_refused(temp_weights):
    state = DISANet().state_dict()
    state["layers.8.weight"] = torch.zeros(8, 32, 1, 1, 1)
    file = temp_weights("disa_wrong", state)
    with pytest.raises(WeightsError, match="do not fit") as info:
        load_disa_network("disa_wrong")
    assert file in str(info.value)
