"""LC² and MIND-SSC against brute-force NumPy references written here, on random and real data.

The references follow the published definitions literally (per-patch ``np.linalg.lstsq`` on
[intensity, gradient magnitude, 1]; explicit shifts, pair loops and box sums for MIND-SSC), so they
share no code with the vectorised library.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.metrics import (LC2_RIDGE, MIND_SSC_PAIRS, disa_target, gradient_magnitude,
                                          lc2_at_points, lc2_map, mind_ssc, mind_ssd, patch_lc2, volume_lc2)
from DeepMultimodalRegLib.metrics.lc2 import (lc2_patches_against_volume, lc2_volume_against_patches,
                                              patch_lc2_matrix)
from DeepMultimodalRegLib.metrics.local_stats import extract_patches
from DeepMultimodalRegLib.transforms import RigidTransform, warp_volume

FLOOR = 1e-12


# ----------------------------------------------------------------------------- NumPy references
def np_gradient_magnitude(b: np.ndarray) -> np.ndarray:
    """Central differences in voxel units, edge padding."""
    p = np.pad(b.astype(np.float64), 1, mode="edge")
    gz = (p[2:, 1:-1, 1:-1] - p[:-2, 1:-1, 1:-1]) / 2
    gy = (p[1:-1, 2:, 1:-1] - p[1:-1, :-2, 1:-1]) / 2
    gx = (p[1:-1, 1:-1, 2:] - p[1:-1, 1:-1, :-2]) / 2
    return np.sqrt(gz ** 2 + gy ** 2 + gx ** 2)


def np_patch(volume: np.ndarray, centre, r: int) -> np.ndarray:
    p = np.pad(volume.astype(np.float64), r, mode="edge")
    k, j, i = (int(c) for c in centre)
    return p[k:k + 2 * r + 1, j:j + 2 * r + 1, i:i + 2 * r + 1].ravel()


def np_patch_lc2(a: np.ndarray, b: np.ndarray, g: np.ndarray, eps: float = LC2_RIDGE) -> float:
    """R² of the ridge least-squares fit a ≈ β_b b + β_g g + β_0.

    The ridge penalty is n·ε·(var_b β_b² + var_g β_g²), as extra rows of the least-squares system.
    """
    a, b, g = (np.asarray(x, dtype=np.float64) for x in (a, b, g))
    n = a.size
    ss_tot = float(((a - a.mean()) ** 2).sum())
    if ss_tot / n <= FLOOR * float((a ** 2).mean()):
        return 0.0
    design = np.stack([b, g, np.ones(n)], axis=1)
    ridge = np.diag([math.sqrt(n * eps * b.var()), math.sqrt(n * eps * g.var()), 0.0])
    beta = np.linalg.lstsq(np.vstack([design, ridge]), np.concatenate([a, np.zeros(3)]), rcond=None)[0]
    residual = a - design @ beta
    return float(np.clip(1.0 - residual @ residual / ss_tot, 0.0, 1.0))


def np_lc2_at(a_vol, b_vol, ca, cb, r):
    g_vol = np_gradient_magnitude(b_vol)
    return np.array([np_patch_lc2(np_patch(a_vol, p, r), np_patch(b_vol, q, r), np_patch(g_vol, q, r))
                     for p, q in zip(ca, cb)])


def np_mind_ssc(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """[12, D, H, W] by explicit shifts (edge padding), a loop over the pairs and box sums."""
    img = image.astype(np.float64)
    depth, height, width = img.shape
    d = dilation

    def shift(offset):
        p = np.pad(img, d, mode="edge")
        oz, oy, ox = (d + d * o for o in offset)
        return p[oz:oz + depth, oy:oy + height, ox:ox + width]

    dist = np.zeros((12, depth, height, width))
    for c, (p, q) in enumerate(MIND_SSC_PAIRS):
        sq = np.pad((shift(p) - shift(q)) ** 2, radius, mode="edge")
        total = np.zeros((depth, height, width))
        for dz, dy, dx in itertools.product(range(2 * radius + 1), repeat=3):
            total += sq[dz:dz + depth, dy:dy + height, dx:dx + width]
        dist[c] = total / (2 * radius + 1) ** 3
    dist = dist - dist.min(axis=0, keepdims=True)
    var = dist.mean(axis=0, keepdims=True)
    m = var.mean()
    var = np.clip(var, 1e-3 * m, 1e3 * m)
    return np.exp(-dist / var)


# ----------------------------------------------------------------------------- helpers
def _foreground_centres(volume: np.ndarray, count: int, seed: int, threshold=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    thr = np.percentile(volume, 60) if threshold is None else threshold
    candidates = np.argwhere(volume > thr)
    return candidates[rng.choice(len(candidates), size=count, replace=False)]


@pytest.fixture(scope="module")
def t1t2(sample_t1, sample_t2):
    return sample_t1.data.double(), sample_t2.data.double()


# ----------------------------------------------------------------------------- LC²
def test_patch_lc2_matches_numpy_on_random_patches():
    rng = np.random.default_rng(0)
    n_patches, n = 40, 7 ** 3
    b = rng.normal(size=(n_patches, n))
    g = np.abs(rng.normal(size=(n_patches, n))) + 0.3 * b
    coef = rng.normal(size=(n_patches, 3))
    noise = rng.uniform(0.05, 3.0, size=(n_patches, 1))
    a = coef[:, :1] * b + coef[:, 1:2] * g + coef[:, 2:] + noise * rng.normal(size=(n_patches, n))
    a[0] = rng.normal(size=n)  # unrelated: LC² near 0
    b[1] = 2 * g[1] - 1  # the two regressors collinear: the ridge keeps the fit stable
    a[1] = 3 * b[1] + 0.1 * rng.normal(size=n)
    for k, delta in zip(range(2, 6), (3e-2, 3e-3, 1e-3, 3e-4)):  # nearly collinear: here the ridge decides
        u = rng.normal(size=n)
        g[k] = b[k] + delta * u
        a[k] = u + 0.3 * rng.normal(size=n)
    ours = patch_lc2(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(g)).numpy()
    ref = np.array([np_patch_lc2(a[k], b[k], g[k]) for k in range(n_patches)])
    assert np.allclose(ours, ref, atol=1e-4), np.abs(ours - ref).max()
    assert ref.min() < 0.05 and ref.max() > 0.9  # the set spans the range
    assert ours[1] > 0.99
    # without the ridge the nearly collinear fits would explain ≈ 0.9 of a; the ridge shrinks the tiny-δ ones
    assert ref[2] > 0.85 and ref[5] < 0.5


def test_lc2_at_points_matches_numpy_on_real_scans(t1t2, pelvis_ct):
    t1, t2 = t1t2
    a_np, b_np = t1.numpy(), t2.numpy()
    centres = _foreground_centres(a_np, 24, seed=1)
    edge = np.array([[0, 0, 0], [127, 64, 101], [5, 127, 50]])  # patches past the border: edge padding
    ca = np.concatenate([centres, edge])
    cb = ca.copy()
    cb[:12] += np.random.default_rng(2).integers(-6, 7, size=(12, 3))  # misaligned pairs too
    cb = np.clip(cb, 0, np.array(b_np.shape) - 1)
    for r in (3, 5):
        ours = lc2_at_points(t1, t2, torch.from_numpy(ca), torch.from_numpy(cb), r).numpy()
        ref = np_lc2_at(a_np, b_np, ca, cb, r)
        assert np.allclose(ours, ref, atol=1e-4), np.abs(ours - ref).max()
        assert ref[12:24].mean() > 0.3  # co-registered T1/T2 patches are well explained
    # two different grids (MR T1 fitted from the real pelvis CT), float32 input
    ct = pelvis_ct.data
    cc = _foreground_centres(ct.numpy(), 16, seed=3, threshold=100.0)
    ours = lc2_at_points(t1.float(), ct, torch.from_numpy(centres[:16]), torch.from_numpy(cc), 3)
    assert ours.dtype == torch.float32
    ref = np_lc2_at(a_np, ct.numpy(), centres[:16], cc, 3)
    assert np.allclose(ours.numpy(), ref, atol=1e-4)


def test_patch_sets_against_volumes_match_numpy_in_both_directions(t1t2):
    """The teacher's building blocks (given patches against every strided voxel of a volume, fitted or
    regressor, and patch set against patch set) equal the NumPy reference pair by pair."""
    t1, t2 = (x[30:70, 40:80, 30:66] for x in t1t2)  # a real crop, foreground and background
    a_np, b_np = t1.numpy(), t2.numpy()
    g_np = np_gradient_magnitude(b_np)
    r, stride = 3, 4
    landmarks = torch.tensor([[20, 20, 18], [12, 25, 9], [30, 8, 27]])
    a_patches = extract_patches(t1, landmarks, r)
    b_patches = extract_patches(t2, landmarks, r)
    g_patches = extract_patches(gradient_magnitude(t2), landmarks, r)
    forward = lc2_patches_against_volume(a_patches, t2, r, stride)  # landmark of t1 fitted by t2's patches
    backward = lc2_volume_against_patches(t1, b_patches, g_patches, r, stride)  # t1's patches fitted by the landmarks of t2
    assert forward.shape == backward.shape == (3, 10, 10, 9)
    rng = np.random.default_rng(3)
    for _ in range(12):
        k = int(rng.integers(3))
        q = [int(rng.integers(n)) for n in forward.shape[1:]]
        site = [stride * v for v in q]
        ref_f = np_patch_lc2(np_patch(a_np, landmarks[k], r), np_patch(b_np, site, r), np_patch(g_np, site, r))
        ref_b = np_patch_lc2(np_patch(a_np, site, r), np_patch(b_np, landmarks[k], r), np_patch(g_np, landmarks[k], r))
        assert abs(float(forward[k, q[0], q[1], q[2]]) - ref_f) < 1e-4
        assert abs(float(backward[k, q[0], q[1], q[2]]) - ref_b) < 1e-4
    matrix = patch_lc2_matrix(a_patches, b_patches, g_patches)
    for i in range(3):
        for j in range(3):
            ref = np_patch_lc2(np_patch(a_np, landmarks[i], r), np_patch(b_np, landmarks[j], r),
                               np_patch(g_np, landmarks[j], r))
            assert abs(float(matrix[i, j]) - ref) < 1e-4


def test_disa_target_is_the_mean_over_radii_3_5_7(t1t2):
    t1, t2 = t1t2
    ca = _foreground_centres(t1.numpy(), 10, seed=4)
    cb = np.clip(ca + np.array([2, -3, 1]), 0, np.array(t2.shape) - 1)
    ours = disa_target(t1, t2, torch.from_numpy(ca), torch.from_numpy(cb)).numpy()
    ref = np.mean([np_lc2_at(t1.numpy(), t2.numpy(), ca, cb, r) for r in (3, 5, 7)], axis=0)
    assert np.allclose(ours, ref, atol=1e-4)


def test_lc2_invariant_to_affine_intensity_changes(t1t2):
    t1, t2 = t1t2
    ca = torch.from_numpy(_foreground_centres(t1.numpy(), 20, seed=5))
    cb = ca.flip(0)
    base = lc2_at_points(t1, t2, ca, cb, 3)
    assert base.max() > 0.2
    for scale, shift in ((2.5, -7.0), (-0.3, 100.0)):  # first image: any a ≠ 0
        assert torch.allclose(lc2_at_points(scale * t1 + shift, t2, ca, cb, 3), base, atol=1e-6)
    for scale, shift in ((-1.0, 0.0), (-4.0, 30.0), (0.01, 5.0)):  # second image: up to sign (|∇b| recomputed)
        assert torch.allclose(lc2_at_points(t1, scale * t2 + shift, ca, cb, 3), base, atol=1e-6)


def test_constant_first_patch_gives_zero_not_nan(t1t2):
    t1, t2 = t1t2
    n = 7 ** 3
    b = torch.randn(3, n, dtype=torch.float64)
    g = torch.rand(3, n, dtype=torch.float64)
    a = torch.tensor([0.0, 1.0, 1234.5], dtype=torch.float64)[:, None].expand(3, n)
    out = patch_lc2(a, b, g)
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))
    # a constant second patch explains nothing either
    flat = torch.ones(3, n, dtype=torch.float64)
    assert patch_lc2(b, flat, torch.zeros_like(flat)).abs().max() == 0
    # background corner of the real T1 (all zeros) and constant volumes
    corner = torch.tensor([[0, 0, 0]])
    assert lc2_at_points(t1, t2, corner, corner, 3).item() == 0.0
    const = torch.full((12, 12, 12), 7.0)
    noise = torch.randn(12, 12, 12)
    for fixed, moving in ((const, noise), (noise, const), (const, const)):
        value = volume_lc2(fixed, moving, radius=2)
        assert torch.isfinite(value) and value.item() == 0.0
        assert torch.isfinite(lc2_map(fixed, moving, 2)).all()


@pytest.mark.parametrize("radius,stride", [(3, 1), (2, 3)])
def test_dense_map_equals_patch_lc2_at_every_sampled_voxel(radius, stride):
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(1, 1, 22, 20, 18, generator=g, dtype=torch.float64)
    base = torch.nn.functional.avg_pool3d(noise, 3, 1, 1)[0, 0]
    base = base / base.std()
    a = 100 + 40 * base ** 2 + 20 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    b = -3 * base + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    dense, weight = lc2_map(a, b, radius, stride=stride, return_weight=True)
    assert dense.shape == tuple(math.ceil(s / stride) for s in a.shape)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in dense.shape], indexing="ij"), -1).reshape(-1, 3)
    centres = idx * stride  # every sampled voxel, borders included
    points, w_points = lc2_at_points(a, b, centres, centres, radius, return_weight=True)
    assert torch.allclose(dense.reshape(-1), points, atol=1e-6)
    assert torch.allclose(weight.reshape(-1), w_points, rtol=1e-6, atol=1e-8)
    assert 0.05 < points.mean() < 0.95
    # the volume similarity is the local-variance-weighted mean of these patch values
    expected = (points * w_points).sum() / w_points.sum()
    assert abs(volume_lc2(a, b, radius, stride=stride).item() - expected.item()) < 1e-9
    assert abs(expected.item() - points.mean().item()) > 1e-3  # the weighting matters here
    # a batch of moving images gives one map each
    batch = lc2_map(a, torch.stack([b, a]), radius, stride=stride)
    assert torch.allclose(batch[0], dense) and torch.allclose(batch[1], torch.ones_like(dense), atol=1e-5)


def test_volume_lc2_prefers_the_registered_pair_and_has_a_finite_gradient(sample_t1, sample_t2):
    # the co-registered T1/T2 pair, both resampled onto a 4 mm grid (keeps the test fast)
    grid = sample_t1.geometry.resampled(4.0)
    centre = grid.index_to_physical_matrix() @ np.array([*((np.array(grid.shape[::-1]) - 1) / 2), 1.0])
    identity = RigidTransform.identity(center=centre[:3])
    fixed = warp_volume(sample_t1.float(), identity, grid).data
    aligned_t2 = warp_volume(sample_t2.float(), identity, grid).data
    moved = RigidTransform(torch.tensor([0.12, -0.08, 0.1, 6.0, -5.0, 4.0], dtype=torch.float64), centre[:3])
    warped = warp_volume(sample_t2.float(), moved, grid).data
    aligned = volume_lc2(fixed, aligned_t2, radius=3)
    misaligned = volume_lc2(fixed, warped, radius=3)
    assert 0.3 < aligned.item() <= 1.0
    assert aligned.item() > misaligned.item() + 0.1, (aligned, misaligned)
    moving = warped.clone().requires_grad_(True)
    value = volume_lc2(fixed, moving, radius=3)
    value.backward()
    assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0
    # a small step along the gradient increases the similarity
    with torch.no_grad():
        step = moving + 0.5 * moving.grad / moving.grad.abs().max() * warped.std()
    assert volume_lc2(fixed, step, radius=3) > value.detach()
    # masks and batches (stride 2)
    mask = torch.zeros(fixed.shape, dtype=torch.bool)
    mask[10:50, 10:50, 10:40] = True
    both = volume_lc2(fixed, torch.stack([aligned_t2, warped]), radius=3, stride=2, mask=mask)
    assert both.shape == (2,) and both[0] > both[1] + 0.1


def test_volume_lc2_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(7)
    fixed = torch.randn(6, 7, 5, generator=g, dtype=torch.float64)
    moving = (fixed ** 2 + 0.5 * torch.randn(6, 7, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: volume_lc2(fixed, m, radius=1), (moving,), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_lc2_rejects_bad_input():
    a = torch.rand(8, 8, 8)
    with pytest.raises(InvalidImageError, match="same grid"):
        volume_lc2(a, torch.rand(8, 8, 9))
    with pytest.raises(InvalidParameterError, match="radius"):
        lc2_map(a, a, radius=0)
    with pytest.raises(InvalidParameterError, match="outside the image"):
        lc2_at_points(a, a, torch.tensor([[8, 0, 0]]), torch.tensor([[0, 0, 0]]), 1)
    bad = a.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidImageError, match="NaN"):
        volume_lc2(bad, a)


def test_gradient_magnitude_matches_numpy(t1t2):
    _, t2 = t1t2
    crop = t2[40:52, 50:61, 30:40]
    assert np.allclose(gradient_magnitude(crop).numpy(), np_gradient_magnitude(crop.numpy()), atol=1e-9)


# ----------------------------------------------------------------------------- MIND-SSC
def test_mind_pairs_are_the_twelve_distance_two_pairs_of_the_six_neighbourhood():
    six = [tuple(s * e for e in row) for row in np.eye(3, dtype=int).tolist() for s in (1, -1)]
    expected = {frozenset((p, q)) for p, q in itertools.combinations(six, 2)
                if sum((x - y) ** 2 for x, y in zip(p, q)) == 2}
    assert len(expected) == 12
    assert {frozenset(pair) for pair in MIND_SSC_PAIRS} == expected


@pytest.mark.parametrize("radius,dilation", [(1, 2), (2, 1)])
def test_mind_ssc_matches_numpy_on_a_real_crop(brain_t1_real_crop, radius, dilation):
    crop = brain_t1_real_crop.data[20:32, 30:44, 25:41].double()
    ours = mind_ssc(crop, radius=radius, dilation=dilation)
    assert ours.shape == (1, 12, *crop.shape)
    ref = np_mind_ssc(crop.numpy(), radius, dilation)
    assert np.allclose(ours[0].numpy(), ref, atol=1e-4), np.abs(ours[0].numpy() - ref).max()
    # float32 input agrees too, and the descriptor is max-normalised
    ours32 = mind_ssc(crop.float(), radius=radius, dilation=dilation)
    assert ours32.dtype == torch.float32 and np.allclose(ours32[0].numpy(), ref, atol=1e-4)
    assert torch.allclose(ours.amax(1), torch.ones_like(ours[:, 0]))


def test_mind_ssc_invariances_and_shapes(brain_t1_real_crop):
    crop = brain_t1_real_crop.data[:24, :24, :24].double()
    base = mind_ssc(crop)
    assert torch.allclose(mind_ssc(3.7 * crop + 250.0), base, atol=1e-6)
    assert torch.allclose(mind_ssc(0.01 * crop - 3.0), base, atol=1e-6)
    batch = mind_ssc(torch.stack([crop, crop.flip(0)])[:, None])
    assert batch.shape == (2, 12, 24, 24, 24)
    assert torch.allclose(batch[:1], base)
    constant = mind_ssc(torch.full((6, 6, 6), 3.0))
    assert torch.equal(constant, torch.ones_like(constant))
    with pytest.raises(InvalidImageError):
        mind_ssc(torch.rand(2, 3, 6, 6, 6))


def test_mind_ssd_is_zero_for_identical_images_and_grows_with_misalignment(sample_t1):
    fixed = sample_t1.float()
    sub = fixed.data[30:94, 30:94, 20:84]
    desc = mind_ssc(sub)
    assert mind_ssd(desc, desc).item() == 0.0
    distances = []
    for shift_mm in (2.0, 4.0, 8.0):
        moved = warp_volume(fixed, RigidTransform(torch.tensor([0, 0, 0, shift_mm, 0, 0], dtype=torch.float64)),
                            fixed).data
        distances.append(mind_ssd(desc, mind_ssc(moved[30:94, 30:94, 20:84])).item())
    assert 0 < distances[0] < distances[1] < distances[2], distances
    # a mask restricts the mean to its voxels; batches give one value each
    moved_desc = mind_ssc(torch.stack([sub, sub.roll(2, 0)]))
    mask = torch.zeros(sub.shape, dtype=torch.bool)
    mask[10:40] = True
    per = mind_ssd(desc, moved_desc, mask=mask, per_batch=True)
    manual = ((desc - moved_desc[1:]) ** 2).mean(1)[0][mask].mean()
    assert per.shape == (2,) and per[0] < 1e-12 and torch.isclose(per[1], manual)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_metrics_follow_the_input_device():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(16, 18, 14, generator=g)
    b = (a ** 2 + 0.1 * torch.rand(16, 18, 14, generator=g)).requires_grad_(True)
    cpu = volume_lc2(a, b, radius=2)
    cpu.backward()
    b_gpu = b.detach().cuda().requires_grad_(True)
    gpu = volume_lc2(a.cuda(), b_gpu, radius=2)
    gpu.backward()
    assert gpu.device.type == "cuda" and abs(gpu.item() - cpu.item()) < 1e-5
    assert torch.allclose(b_gpu.grad.cpu(), b.grad, atol=1e-5)
    centres = torch.tensor([[3, 4, 5], [0, 17, 13]])
    assert torch.allclose(lc2_at_points(a.cuda(), b.detach().cuda(), centres, centres, 3).cpu(),
                          lc2_at_points(a, b.detach(), centres, centres, 3), atol=1e-6)
    assert torch.allclose(mind_ssc(a.cuda()).cpu(), mind_ssc(a), atol=1e-5)


def test_mind_ssc_of_a_flat_image_survives_flushed_denormals():
    """The deep session's optimiser flushes denormal floats to zero process-wide (for speed); MIND's
    variance floor must stay a normal float, or a flat image gives 0/0 = NaN descriptors."""
    torch.set_flush_denormal(True)
    try:
        constant = mind_ssc(torch.full((6, 6, 6), 3.0))
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(constant, torch.ones_like(constant))


@pytest.mark.parametrize("radius,stride,dtype", [(1, 1, torch.float32), (2, 1, torch.float64), (1, 2, torch.float32),
                                                 (3, 3, torch.float32)])
def test_box_mean_equals_separable_average_pooling_bit_for_bit(radius, stride, dtype):
    """box_mean sums shifted views (faster on the CPU); its values and gradients must stay exactly what
    replicate padding + three 1D ``avg_pool3d`` passes give, so no registration result moves."""
    import torch.nn.functional as F

    from DeepMultimodalRegLib.metrics.local_stats import box_mean

    g = torch.Generator().manual_seed(radius * 10 + stride)
    x = (100 * torch.rand(2, 3, 17, 11, 23, generator=g)).to(dtype)
    weights = torch.rand(2, 3, 17, 11, 23, generator=g).to(dtype)
    k = 2 * radius + 1

    def pooled(v):
        v = F.pad(v, (radius,) * 6, mode="replicate")
        v = F.avg_pool3d(v, kernel_size=(k, 1, 1), stride=(stride, 1, 1))
        v = F.avg_pool3d(v, kernel_size=(1, k, 1), stride=(1, stride, 1))
        return F.avg_pool3d(v, kernel_size=(1, 1, k), stride=(1, 1, stride))

    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, reference = box_mean(a, radius, stride), pooled(b)
    assert ours.shape == reference.shape and torch.equal(ours, reference)
    reduce = weights[:, :, ::stride, ::stride, ::stride]
    grad_ours, = torch.autograd.grad((ours * reduce).sum(), a)
    grad_reference, = torch.autograd.grad((reference * reduce).sum(), b)
    assert torch.equal(grad_ours, grad_reference)


# ----------------------------------------------------------------------------- MIND-SSC's hand-written backward
def _autograd_mind_gradient(x, weights, radius, dilation):
    """The gradient of ⟨MIND-SSC(x), weights⟩ that autograd derives from the forward's own operations."""
    from DeepMultimodalRegLib.metrics.mind import _mind_parts

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((_mind_parts(leaf, radius, dilation)[0] * weights).sum(), leaf)
    return grad


@pytest.mark.parametrize("radius,dilation", [(1, 1), (1, 2), (2, 1), (0, 1)])
def test_mind_ssc_backward_equals_autograd_on_a_real_crop(brain_t1_real_crop, radius, dilation):
    """mind_ssc's analytic backward (MS-ODE's slope at every ODE step) against autograd through the very
    same forward, on a batch of a real crop with a flat (background) block and a clamped variance."""
    crop = brain_t1_real_crop.data[18:30, 26:40, 22:38].double()
    second = crop.flip(1).clone()
    second[:4] = 0.0  # flat: the per-voxel variance is clamped from below there
    x = torch.stack([crop, second])[:, None]
    weights = torch.rand(2, 12, *crop.shape, generator=torch.Generator().manual_seed(radius + 3 * dilation),
                         dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad((mind_ssc(leaf, radius, dilation) * weights).sum(), leaf)
    reference = _autograd_mind_gradient(x, weights, radius, dilation)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    # the forward is unchanged: the same values with and without a recorded graph
    assert torch.equal(mind_ssc(leaf, radius, dilation).detach(), mind_ssc(x, radius, dilation))


def test_mind_ssc_backward_passes_gradcheck_and_a_flat_image_gets_zero_not_nan():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 5, 6, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: mind_ssc(v, 1, 1), (x,))
    assert torch.autograd.gradcheck(lambda v: mind_ssc(v, 1, 2) ** 2, (x,))
    flat = torch.full((1, 1, 5, 6, 5), 7.0, requires_grad=True)
    (grad,) = torch.autograd.grad(mind_ssc(flat).sum() + (mind_ssc(flat) * torch.rand(1, 12, 5, 6, 5)).sum(), flat)
    assert torch.equal(grad, torch.zeros_like(grad))  # autograd's own chain gives 0·inf = NaN here


@pytest.mark.parametrize("radius,shape", [(1, (2, 3, 7, 9, 6)), (2, (2, 3, 7, 9, 6)), (3, (1, 2, 2, 1, 5))])
def test_box_mean_adjoint_and_padding_fold_are_the_transposes_autograd_finds(radius, shape):
    import torch.nn.functional as F

    from DeepMultimodalRegLib.metrics.local_stats import box_mean, box_mean_adjoint, fold_replicate_padding

    g = torch.Generator().manual_seed(radius)
    x = torch.rand(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.rand(*shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad((box_mean(x, radius) * w).sum(), x)  # axes shorter than the radius too
    assert torch.allclose(box_mean_adjoint(w, radius), expected, rtol=1e-12, atol=1e-15)
    wp = torch.rand(*shape[:2], *(n + 2 * radius for n in shape[2:]), generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad((F.pad(x, (radius,) * 6, mode="replicate") * wp).sum(), x)
    assert torch.allclose(fold_replicate_padding(wp, radius), expected, rtol=1e-12, atol=1e-15)
