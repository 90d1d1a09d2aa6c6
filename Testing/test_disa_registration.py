"""The feature-based registration engine (disa-*, mind-*, lc2-rigid): optimiser, objective, search,
and accuracy against known transforms applied to real co-registered scans."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepMultimodalRegLib.disa.features import (FeatureMap, FeaturePair, cosine_pair, disa_features, mind_features,
                                                support_weights, unit_length_pair)
from DeepMultimodalRegLib.disa.objective import FeatureObjective
from DeepMultimodalRegLib.disa.optimize import batched_lbfgs
from DeepMultimodalRegLib.disa.parametrization import (AffineParametrization, PoseWithBSpline, RigidParametrization,
                                                       perturbed_poses)
from DeepMultimodalRegLib.disa.search import random_starts
from DeepMultimodalRegLib.errors import CancelledError, InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy, target_registration_error
from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.image.io import read_volume
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method
from DeepMultimodalRegLib.progress import CancelToken
from DeepMultimodalRegLib.transforms.linear import AffineTransform, RigidTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume

from conftest import shared_scan

CPU = torch.device("cpu")


def _at_2mm(volume: Volume) -> Volume:
    return warp_volume(volume.float(), RigidTransform.identity(), volume.geometry.resampled(2.0))


@pytest.fixture(scope="module")
def kirby():
    """Kirby21 subject 113 T1 and T2 (co-registered, skull-stripped), resampled to 2 mm."""
    t1 = _at_2mm(read_volume(shared_scan("mr_kirby21_113/t1_mprage.nii.gz")))
    t2 = _at_2mm(read_volume(shared_scan("mr_kirby21_113/t2.nii.gz")))
    return t1, t2, foreground_points(t1, 3000, seed=1)


def _rigid(deg, mm, center) -> RigidTransform:
    p = [math.radians(a) for a in deg] + list(mm)
    return RigidTransform(torch.tensor([p], dtype=torch.float64), torch.as_tensor(center))


def _register(method, fixed, moving, search="local", **extra):
    return get_method(method).runner(fixed, moving, RegistrationOptions(search=search, device="cpu", seed=0,
                                                                        extra=extra))


# ----------------------------------------------------------------------------------- optimiser
def test_batched_lbfgs_solves_each_start_independently():
    """Rosenbrock from three starts in one batch: each reaches (1, 1), and the batch gives the same
    answer as running a start on its own (the starts do not share memory or step sizes)."""

    def rosenbrock(x):
        return (1 - x[:, 0]) ** 2 + 100 * (x[:, 1] - x[:, 0] ** 2) ** 2

    starts = torch.tensor([[-1.2, 1.0], [2.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    batch = batched_lbfgs(rosenbrock, starts, max_iterations=300, initial_step=0.1, max_step=1.0,
                          x_tolerance=1e-9, f_tolerance=0.0)
    assert torch.allclose(batch.x, torch.ones(3, 2, dtype=torch.float64), atol=1e-4)
    single = batched_lbfgs(rosenbrock, starts[1:2], max_iterations=300, initial_step=0.1, max_step=1.0,
                           x_tolerance=1e-9, f_tolerance=0.0)
    assert torch.allclose(single.x, batch.x[1:2], atol=1e-8)
    assert batch.evaluations > 3


def test_batched_lbfgs_respects_cancel():
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        batched_lbfgs(lambda x: (x ** 2).sum(1), torch.ones(2, 3, dtype=torch.float64), cancel=token)


# ------------------------------------------------------------------------------ parametrisation
def test_parametrizations_round_trip_and_perturb_in_fixed_space():
    center = torch.tensor([10.0, -20.0, 5.0], dtype=torch.float64)
    pose = _rigid((7, -12, 20), (3, -4, 9), [0.0, 0.0, 0.0])
    for p in (RigidParametrization(center, 60.0), AffineParametrization(center, 60.0)):
        x = p.initial(pose)
        assert torch.allclose(p.transform(x).homogeneous(), pose.homogeneous(), atol=1e-10)
    rigid_p = RigidParametrization(center, 60.0)
    x = rigid_p.initial(pose)
    angles = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    shifts = torch.tensor([[5.0, 0.0, -7.0]], dtype=torch.float64)
    moved = rigid_p.transform(perturbed_poses(rigid_p, x, angles, shifts)).homogeneous()[0]
    extra = RigidTransform(torch.cat([angles, shifts], 1), center).homogeneous()[0]
    assert torch.allclose(moved, pose.homogeneous()[0] @ extra, atol=1e-10)


def test_random_starts_are_reproducible_and_within_range():
    center = torch.zeros(3, dtype=torch.float64)
    p = RigidParametrization(center, 50.0)
    x0 = p.initial(RigidTransform.identity(center=center))
    a = random_starts(p, x0, 50, 10.0, 25.0, seed=3)
    b = random_starts(p, x0, 50, 10.0, 25.0, seed=3)
    c = random_starts(p, x0, 50, 10.0, 25.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], x0[0])
    params = p.transform(a).parameters
    assert float(params[:, :3].abs().max()) <= math.radians(10.0) + 1e-9
    assert float(params[:, 3:].abs().max()) <= 25.0 + 1e-9
    assert float(params[:, 3:].abs().max()) > 20.0  # the range is used, not just the centre


# ------------------------------------------------------------------------------------ objective
def test_objective_gradient_matches_finite_differences(sample_t1, sample_t2):
    """The analytic gradient (through the resampling of the precomputed maps) against central
    differences of the objective itself, in float64, for rigid and B-spline coordinates."""
    pair = disa_features(sample_t1, sample_t2, CPU)
    pair64 = FeaturePair(FeatureMap(pair.fixed.data.double(), pair.fixed.geometry),
                         FeatureMap(pair.moving.data.double(), pair.moving.geometry), pair.weight.double(),
                         "dot", 1)
    objective = FeatureObjective(pair64, 500)
    center = torch.as_tensor(sample_t1.geometry.center, dtype=torch.float64)
    spline = PoseWithBSpline(RigidParametrization(center, 50.0), sample_t1.geometry, control_spacing_mm=60.0)
    g = torch.Generator().manual_seed(0)
    x = spline.initial(_rigid((3, -2, 4), (2.3, -1.7, 3.1), center.tolist()))
    x[:, 6:] = torch.randn(x.shape[1] - 6, generator=g, dtype=torch.float64) * 0.5
    x.requires_grad_(True)
    value = objective.value(spline.transform(x))
    grad, = torch.autograd.grad(value.sum(), x)
    picks = [0, 1, 2, 3, 4, 5] + torch.randperm(x.shape[1] - 6, generator=g)[:6].add(6).tolist()
    h = 1e-4
    for i in picks:
        step = torch.zeros_like(x)
        step[0, i] = h
        with torch.no_grad():
            numeric = (objective.value(spline.transform(x + step)) - objective.value(spline.transform(x - step))) / (2 * h)
        assert float(numeric) == pytest.approx(float(grad[0, i]), rel=1e-3, abs=1e-7), i


def test_objective_of_linear_transforms_equals_sampling_the_mapped_points(sample_t1, sample_t2):
    """The composed fast path for rigid/affine poses against the general route: map the points with
    the transform, sample the moving map with the library's ITK-rule sampler, weight the dot products.
    Large offsets put part of the points outside the moving map (they must count as zero)."""
    from DeepMultimodalRegLib.transforms.sampling import sample_at_points

    pair = disa_features(sample_t1, sample_t2, CPU)
    objective = FeatureObjective(pair, 3000)
    center = torch.as_tensor(sample_t1.geometry.center, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    params = torch.cat([(torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5) * 0.8,
                        (torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5) * 200], 1)
    for transform in (RigidTransform(params, center), AffineTransform.from_linear(RigidTransform(params, center))):
        fast = objective.value(transform)
        mapped = transform.transform_points(objective.points)  # [B, N, 3] float64
        sampled = sample_at_points(pair.moving.data.double(), pair.moving.geometry, mapped)  # [B, C, N]
        reference = ((sampled * objective.fixed_features.T.double()).sum(1) * objective.weights.double()).sum(-1)
        inside_fraction = float((sampled.abs().sum(1) > 0).double().mean())
        assert 0.2 < inside_fraction < 0.99  # the check covers points on both sides of the boundary
        assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-6)


def test_a_point_budget_under_equal_weights_spreads_over_the_whole_map():
    """Equal (support) weights tie every cell: the cells kept under a point budget must still cover
    the whole map, not the first ones in memory order (the lowest slices, which let the affine stage
    stretch the chest CT 12% along z).  Unequal weights still keep the heaviest cells; both are
    deterministic."""
    shape = (27, 34, 45)  # the chest CT's 8 mm map
    geometry = ImageGeometry(shape=shape, spacing=(8.0, 8.0, 8.0))
    features = FeatureMap(torch.zeros(16, *shape), geometry)
    equal = FeaturePair(features, features, torch.ones(shape), "dot")
    objective = FeatureObjective(equal, 12000)
    z = objective.points[:, 2] / 8.0  # (k of each point; the map's origin is 0)
    assert objective.point_count == 12000
    counts = torch.histc(z, bins=3, min=-0.5, max=shape[0] - 0.5)
    assert float(counts.min()) > 0.8 * 12000 / 3, counts  # every third of the slab holds its share
    assert torch.equal(objective.points, FeatureObjective(equal, 12000).points)
    graded = torch.arange(shape[0], dtype=torch.float32)[:, None, None].expand(shape).contiguous() + 1
    heaviest = FeatureObjective(FeaturePair(features, features, graded, "dot"), 12000)
    assert float((heaviest.points[:, 2] / 8.0).min()) > 0.5 * shape[0]  # the top slices only


@pytest.mark.parametrize("kind", ["disa", "mind"])
def test_gather_and_grid_sample_samplers_give_the_same_objective_and_gradient(sample_t1, sample_t2, kind):
    """The CPU's channels-last gather against grid_sample (the GPU's sampler, run here on the CPU):
    values and pose gradients for a batch of poses, part of each outside the moving map."""
    # DISA: the unit-length maps the rigid stages compare by default
    pair = unit_length_pair(disa_features(sample_t1, sample_t2, CPU)) if kind == "disa" else \
        mind_features(sample_t1, sample_t2, CPU)
    center = torch.as_tensor(sample_t1.geometry.center, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    params = torch.cat([(torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5) * 0.6,
                        (torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5) * 120], 1)
    results = []
    for sampler in ("gather", "grid_sample"):
        objective = FeatureObjective(pair, 3000, sampler=sampler)
        x = params.clone().requires_grad_(True)
        value = objective.value(RigidTransform(x, center))
        grad, = torch.autograd.grad(value.sum(), x)
        results.append((value.detach(), grad))
        # one pose alone (the single-pose layout of the gather) gives that pose's value in the batch
        alone = objective.value(RigidTransform(params[2:3], center))
        assert torch.allclose(alone, value[2:3].detach(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    # atol: 5e-4 of the largest component.  On the (default) unit-length DISA maps the two samplers'
    # float32 corner weights put one small translation component 1.7e-4 of that apart (2e-5 absolute)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-3, atol=5e-4 * float(results[1][1].abs().max()))
    with pytest.raises(InvalidParameterError, match="sampler"):
        FeatureObjective(pair, 3000, sampler="nearest")


def test_feature_maps_of_the_inputs_are_not_modified(sample_t1, sample_t2):
    before = (sample_t1.data.clone(), sample_t2.data.clone())
    mind_features(sample_t1, sample_t2, CPU)
    disa_features(sample_t1, sample_t2, CPU)
    assert torch.equal(before[0], sample_t1.data) and torch.equal(before[1], sample_t2.data)



def test_disa_features_do_not_depend_on_the_sign_of_either_image(sample_t1, sample_t2):
    """LC² ignores the sign of either image; the engine's (sign-symmetric) DISA maps do too, exactly,
    where the raw network output does not.  ``moving_modality`` is given because a negated MR would
    otherwise be guessed to be a CT."""
    negative = sample_t2.with_data(-sample_t2.data.float())
    plain = disa_features(sample_t1, sample_t2, CPU, moving_modality="MR")
    flipped = disa_features(sample_t1, negative, CPU, moving_modality="MR")
    assert torch.allclose(plain.moving.data, flipped.moving.data, rtol=0, atol=1e-5)
    raw = disa_features(sample_t1, sample_t2, CPU, moving_modality="MR", sign_symmetric=False)
    raw_flipped = disa_features(sample_t1, negative, CPU, moving_modality="MR", sign_symmetric=False)
    assert (raw.moving.data - raw_flipped.moving.data).abs().max() > 1e-2
    with pytest.raises(InvalidParameterError, match="unknown option"):  # a misspelt option is refused
        _register("disa-rigid", sample_t1, sample_t2, disa_sign_symetric=False)


def test_local_search_keeps_the_start_when_the_coarse_level_points_elsewhere():
    """Feature maps built so the pooled (coarse) level and the full-resolution level disagree: four
    channels of checkerboard-signed noise, identical in fixed and moving (a sharp full-resolution
    peak at the identity that 2×2×2 pooling cancels exactly), and one smooth blob channel whose
    moving copy sits 40 mm away (all that the pooled maps see).  Started at the identity, the coarse level alone
    would carry the pose 40 mm off; the local search must return the identity, whose full-resolution
    similarity is higher."""
    from DeepMultimodalRegLib.disa.search import SearchSettings, search_pose
    from DeepMultimodalRegLib.image.geometry import ImageGeometry

    n, spacing = 40, 4.0
    geometry = ImageGeometry(shape=(n, n, n), spacing=(spacing,) * 3, origin=(-(n - 1) * spacing / 2,) * 3)
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn(4, n // 2, n // 2, n // 2, generator=g, dtype=torch.float64)
    blocks = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    i = torch.arange(n)
    checkerboard = (-1.0) ** (i[:, None, None] + i[None, :, None] + i[None, None, :]).double()
    noise = 4.0 * blocks * checkerboard
    axis = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")

    def blob(shift_x_mm):
        return torch.exp(-((x - shift_x_mm) ** 2 + y ** 2 + z ** 2) / (2 * 25.0 ** 2))[None]

    fixed = torch.cat([noise, blob(0.0)])
    moving = torch.cat([noise, blob(40.0)])
    pair = FeaturePair(FeatureMap(fixed, geometry), FeatureMap(moving, geometry), torch.ones(n, n, n,
                       dtype=torch.float64), "dot", 1)
    p = RigidParametrization(torch.zeros(3, dtype=torch.float64), 50.0)
    x0 = p.initial(RigidTransform.identity(center=(0.0, 0.0, 0.0)).to(dtype=torch.float64))
    coarse = FeatureObjective(pair.coarse(), 3000)
    coarse_only = batched_lbfgs(lambda v: -coarse.value(p.transform(v)), x0.clone(), 30)
    drifted = p.transform(coarse_only.x).parameters[0]
    assert float(drifted[3:].norm()) > 20  # the construction works: the coarse level drifts
    outcome = search_pose(pair, p, x0, SearchSettings(search="local", coarse_points=3000, fine_points=12000))
    found = p.transform(outcome.x).parameters[0]  # radians, mm
    assert float(found[3:].norm()) < 2.0 and float(found[:3].abs().max()) < math.radians(0.5)

# ------------------------------------------------------------------------------ known transforms
def test_rigid_15mm_10deg_recovered_by_local_search(kirby):
    """Kirby21 T2 moved by a known 10° / 15 mm rigid transform, registered onto the T1."""
    t1, t2, points = kirby
    truth = _rigid((10, -4, 3), (9, -8, 9), t1.geometry.center)  # |t| = 15.1 mm
    moving = misaligned_copy(t2, truth, margin_mm=20)
    initial = target_registration_error(RigidTransform.identity(center=t1.geometry.center), truth, points)
    assert initial["mean_mm"] > 15
    for method, bound, extra in (("mind-rigid", 1.5, {}),
                                 ("disa-rigid", DISA_RIGID_BOUND_MM, {"disa_precision": "float32"}),
                                 ("disa-rigid", DISA_RIGID_BOUND_MM, {"disa_precision": "bfloat16"})):
        result = _register(method, t1, moving, **extra)
        error = target_registration_error(result.transform, truth, points)
        assert error["mean_mm"] < bound, (method, error)
        assert result.figures["evaluations"] > 0
        sim = result.figures[f"{method.split('-')[0]}_similarity_after"]
        assert sim > result.figures[f"{method.split('-')[0]}_similarity_before"]
        # the shipped DISA weights' known limits travel with their results; MIND-SSC has no weights
        assert ("weights_status" in result.figures) == method.startswith("disa")
        assert result.figures.get("disa_precision") == extra.get("disa_precision")


def test_disa_search_refined_on_mind_features_reaches_mind_accuracy(kirby):
    """refine="mind": DISA's rigid search, then a local MIND-SSC polish from its pose — under the
    issue's 1.5 mm on the 15 mm / 10° case, where the DISA optimum alone lies ~2 mm off (T2)."""
    t1, t2, points = kirby
    truth = _rigid((10, -4, 3), (9, -8, 9), t1.geometry.center)
    moving = misaligned_copy(t2, truth, margin_mm=20)
    result = _register("disa-rigid", t1, moving, refine="mind")
    assert target_registration_error(result.transform, truth, points)["mean_mm"] < 1.5
    assert result.figures["refine"] == "mind" and result.method == "disa-rigid"
    assert [step.name for step in result.history] == ["features", "rigid (local)", "rigid refinement (MIND-SSC, local)"]
    for method, refine in (("mind-rigid", "mind"), ("disa-rigid", "lc2")):
        with pytest.raises(InvalidParameterError, match="refine"):
            _register(method, t1, moving, refine=refine)


def test_resampled_disa_polish_removes_the_drift_of_a_far_turned_moving_image(kirby):
    """refine="disa": started at the truth of a 35° case, the plain DISA local search drifts away
    (the descriptors do not turn with the image); describing the moving image again, resampled at
    the found pose, and searching the residual brings it back within the 2 mm success threshold.
    The result stays one rigid transform (the pose composed with the residual)."""
    t1, t2, points = kirby
    truth = _rigid((-35, 20, 15), (5, 10, -8), t1.geometry.center)
    moving = misaligned_copy(t2, truth, margin_mm=30)
    plain = _register("disa-rigid", t1, moving, initial=truth, refine="none")
    polished = _register("disa-rigid", t1, moving, initial=truth, refine="disa")
    plain_error = target_registration_error(plain.transform, truth, points)["mean_mm"]
    polished_error = target_registration_error(polished.transform, truth, points)["mean_mm"]
    assert polished_error < 2.0 and polished_error < plain_error, (plain_error, polished_error)
    assert isinstance(polished.transform, RigidTransform) and polished.figures["refine"] == "disa"
    assert [step.name for step in polished.history][-1].startswith("rigid refinement (DISA, moving resampled")


def test_affine_with_5_percent_scaling_recovered(kirby):
    t1, t2, points = kirby
    rigid = _rigid((6, 3, -5), (-6, 5, 4), t1.geometry.center)
    scale = torch.diag(torch.tensor([1.05, 0.96, 1.03], dtype=torch.float64))
    h = rigid.homogeneous()[0]
    truth = AffineTransform.from_matrix((h[:3, :3] @ scale)[None], rigid.translation, t1.geometry.center)
    moving = misaligned_copy(t2, truth, margin_mm=20)
    for method, bound in (("mind-affine", 1.5), ("disa-affine", DISA_AFFINE_BOUND_MM)):
        result = _register(method, t1, moving)
        assert result.transform.is_linear
        error = target_registration_error(result.transform, truth, points)
        assert error["mean_mm"] < bound, (method, error)


def test_disa_deformable_halves_a_known_smooth_deformation_without_folding(kirby):
    """The issue's deformable case on real contrasts: Kirby21 T2 moved by a known cubic B-spline field
    (8 mm largest displacement, 60 mm control spacing; the benchmark's case 0, not a chosen one) onto
    T1.  Mean error over brain points must at least halve, with < 0.5% negative Jacobians."""
    from DeepMultimodalRegLib.synthetic import invert_displacement, smooth_random_deformation

    t1, t2, points = kirby
    truth = smooth_random_deformation(t1.geometry, 8.0, 60.0, seed=0)
    moving = warp_volume(t2, invert_displacement(truth), t1.geometry)  # fixed x ↔ moving truth(x)
    before = target_registration_error(RigidTransform.identity(center=t1.geometry.center), truth, points)["mean_mm"]
    result = _register("disa-deformable", t1, moving)
    after = target_registration_error(result.transform, truth, points)["mean_mm"]
    assert before > 3.0  # the case is not trivial
    assert after < 0.5 * before, (before, after)
    assert result.figures["folding_percent"] < 0.5
    # the dense stage ran on the 4 mm à trous maps, compared by their cosine
    assert any(s.name == "features for the dense stage (DISA (stride 2, 4 mm), cosine)" for s in result.history)


def test_affine_stage_weighting_is_recorded_and_checked(sample_t1, sample_t2):
    """The affine stage says which weights it used (support on DISA features by default, variance on
    MIND-SSC's, either on request), and an unknown weighting is refused before any work."""
    for method, asked, expected in (("disa-affine", None, "support"), ("mind-affine", None, "variance"),
                                     ("mind-affine", "support", "support")):
        extra = {} if asked is None else {"affine_weighting": asked}
        result = _register(method, sample_t1, sample_t2, fine_iterations=2, coarse_iterations=2, **extra)
        step = [s for s in result.history if s.name == "affine (local)"][0]
        assert step.figures["weighting"] == expected, (method, asked)
    with pytest.raises(InvalidParameterError, match="affine_weighting"):
        _register("disa-affine", sample_t1, sample_t2, affine_weighting="uniform")


def test_disa_precision_is_resolved_for_the_machine_recorded_and_checked(sample_t1, sample_t2, monkeypatch):
    """disa_precision="auto" (the default) is bfloat16 exactly where the CPU computes it natively; the
    result says which ran; an unknown precision is refused before any work."""
    from DeepMultimodalRegLib.disa import register as register_module
    from DeepMultimodalRegLib.disa.register import disa_precision

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(register_module, "native_bfloat16", lambda device, answer=native: answer)
        assert disa_precision({}, CPU) == disa_precision({"disa_precision": "auto"}, CPU) == expected
        assert disa_precision({"disa_precision": "float32"}, CPU) == "float32"
        assert disa_precision({"disa_precision": "bfloat16"}, CPU) == "bfloat16"
    result = _register("disa-rigid", sample_t1, sample_t2, fine_iterations=2, coarse_iterations=2)
    assert result.figures["disa_precision"] == "float32"  # native_bfloat16 still answers False here
    with pytest.raises(InvalidParameterError, match="disa_precision"):
        _register("disa-rigid", sample_t1, sample_t2, disa_precision="half")


def test_native_bfloat16_follows_the_cpu_instruction_set(monkeypatch):
    from DeepMultimodalRegLib.device import native_bfloat16

    for flags, expected in (({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                            ({"avx512_f": True, "avx2": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags)
        assert native_bfloat16(CPU) is expected
    assert native_bfloat16(torch.device("cuda")) is False  # GPUs keep float32 (not measured in bfloat16)


def test_support_weights_are_equal_where_the_fixed_image_has_structure():
    weight = torch.tensor([[[0.0, 1e-5, 2e-3], [0.5, 1.0, 0.0]]])
    assert torch.equal(support_weights(weight), torch.tensor([[[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]))
    assert torch.equal(support_weights(weight, floor=0.0), (weight > 0).float())
    with pytest.raises(InvalidParameterError, match="floor"):
        support_weights(weight, floor=1.0)


def test_cosine_pair_compares_unit_descriptors_with_equal_weights():
    torch.manual_seed(3)
    grid = ImageGeometry(shape=(3, 4, 5), spacing=(4.0, 4.0, 4.0))
    fixed, moving = torch.randn(16, 3, 4, 5), torch.randn(16, 3, 4, 5)
    weight = torch.rand(3, 4, 5)
    weight[0] = 0.0
    pair = FeaturePair(FeatureMap(fixed.clone(), grid), FeatureMap(moving.clone(), grid), weight.clone(), "dot", 1, "DISA")
    out = cosine_pair(pair)
    assert torch.allclose(torch.linalg.vector_norm(out.fixed.data, dim=0), torch.ones(3, 4, 5), atol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(out.moving.data, dim=0), torch.ones(3, 4, 5), atol=1e-6)
    # the direction is kept: the dot product of the outputs is the cosine of the inputs
    cosine = torch.nn.functional.cosine_similarity(fixed, moving, dim=0)
    assert torch.allclose((out.fixed.data * out.moving.data).sum(0), cosine, atol=1e-6)
    assert torch.equal(out.weight, support_weights(weight)) and bool((out.weight[0] == 0).all())
    assert torch.equal(pair.fixed.data, fixed) and torch.equal(pair.weight, weight)  # input untouched
    with pytest.raises(InvalidParameterError, match="cosine"):
        cosine_pair(FeaturePair(pair.fixed, pair.moving, weight, "ssd"))


def test_unit_length_pair_compares_the_cosine_and_new_maps_follow(sample_t1, sample_t2):
    """:func:`unit_length_pair` scales the centred descriptors to unit length (what the rigid stages
    compare by default); maps computed later for the pair are scaled alike."""
    from DeepMultimodalRegLib.disa.features import with_new_fixed, with_new_moving

    plain = disa_features(sample_t1, sample_t2, CPU)
    unit = unit_length_pair(plain)
    assert unit.unit_length and not plain.unit_length
    for a, b in ((unit.fixed, plain.fixed), (unit.moving, plain.moving)):
        norms = torch.linalg.vector_norm(b.data, dim=0, keepdim=True)
        assert torch.allclose(a.data, b.data / norms, atol=1e-5)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)  # the plain maps are not unit already
    again = with_new_moving(unit, sample_t2, CPU)
    assert again.unit_length and torch.allclose(again.moving.data, unit.moving.data, atol=1e-5)
    turned = with_new_fixed(unit, sample_t1, CPU)
    assert turned.unit_length and torch.allclose(turned.fixed.data, unit.fixed.data, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="disa_comparison"):
        _register("disa-rigid", sample_t1, sample_t2, disa_comparison="cos")


def test_global_search_is_deterministic_and_finds_a_distant_pose(kirby):
    t1, t2, points = kirby
    truth = _rigid((30, -25, 20), (45, -40, 30), t1.geometry.center)
    moving = misaligned_copy(t2, truth, margin_mm=80)
    options = dict(starts=48, range_deg=40.0, range_mm=60.0)
    first = _register("mind-rigid", t1, moving, "global", **options)
    second = _register("mind-rigid", t1, moving, "global", **options)
    assert torch.equal(first.transform.parameters, second.transform.parameters)
    assert target_registration_error(first.transform, truth, points)["mean_mm"] < 2.0
    assert first.figures["starts"] == 48 and first.figures["evaluations"] > 48


def _central_crop(volume: Volume, shape) -> Volume:
    """The central ``shape`` (z, y, x) voxels of ``volume``, with their physical placement."""
    start = [(n - s) // 2 for n, s in zip(volume.geometry.shape, shape)]
    data = volume.data[start[0]:start[0] + shape[0], start[1]:start[1] + shape[1], start[2]:start[2] + shape[2]]
    origin = volume.geometry.index_to_physical_matrix() @ np.array([start[2], start[1], start[0], 1.0])
    grid = volume.geometry.__class__(shape=tuple(shape), spacing=volume.geometry.spacing, origin=tuple(origin[:3]),
                                     direction=volume.geometry.direction)
    return Volume(data.clone(), grid, name=volume.name)


def test_lc2_rigid_improves_lc2_and_the_alignment(sample_t1, sample_t2):
    fixed = _central_crop(sample_t1, (40, 56, 56))  # direct LC² is slow: a crop keeps the test short
    points = foreground_points(fixed, 1000)
    truth = _rigid((4, -3, 2), (4, -3, 3), fixed.geometry.center)
    moving = misaligned_copy(_central_crop(sample_t2, (40, 56, 56)), truth)
    result = _register("lc2-rigid", fixed, moving, max_evaluations=150)
    assert result.figures["lc2_similarity_after"] > result.figures["lc2_similarity_before"]
    before = target_registration_error(RigidTransform.identity(center=fixed.geometry.center), truth, points)
    after = target_registration_error(result.transform, truth, points)
    assert after["mean_mm"] < 0.5 * before["mean_mm"]
    with pytest.raises(InvalidParameterError):
        _register("lc2-rigid", fixed, moving, "global")


# ------------------------------------------------------------------------------------ bad input
def test_bad_options_and_masks_fail_early(sample_t1, sample_t2):
    with pytest.raises(InvalidParameterError, match="unknown option"):
        _register("mind-rigid", sample_t1, sample_t2, strats=10)
    with pytest.raises(InvalidParameterError):
        _register("mind-rigid", sample_t1, sample_t2, "sideways")
    with pytest.raises(InvalidParameterError, match="coarse level"):  # a stopping rule that never stops
        _register("mind-rigid", sample_t1, sample_t2, coarse_x_tolerance_mm=0.0)
    with pytest.raises(InvalidParameterError, match="dense_descriptor_stride"):
        _register("disa-deformable", sample_t1, sample_t2, dense_descriptor_stride=8)
    with pytest.raises(InvalidParameterError, match="dense_disa_comparison"):
        _register("disa-deformable", sample_t1, sample_t2, dense_disa_comparison="cos")
    far = Volume(torch.ones(8, 8, 8), sample_t1.geometry.__class__(shape=(8, 8, 8), spacing=(1, 1, 1),
                                                                   origin=(5000.0, 5000.0, 5000.0)))
    with pytest.raises(InvalidImageError, match="mask"):
        get_method("mind-rigid").runner(sample_t1, sample_t2, RegistrationOptions(device="cpu", fixed_mask=far))


def test_mask_on_another_grid_is_resampled_and_no_overlap_warns(sample_t1, sample_t2):
    # a box mask over the middle of the fixed image, on a coarser grid of its own
    grid = sample_t1.geometry.resampled(5.0)
    data = torch.zeros(grid.shape)
    d, h, w = grid.shape
    data[d // 4:3 * d // 4, h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
    mask = Volume(data, grid, name="box")
    result = get_method("mind-rigid").runner(sample_t1, sample_t2, RegistrationOptions(device="cpu", fixed_mask=mask))
    assert result.figures["feature_points"] > 0
    shifted = sample_t2.geometry.__class__(shape=sample_t2.geometry.shape, spacing=sample_t2.geometry.spacing,
                                           origin=tuple(np.asarray(sample_t2.geometry.origin) + 900.0),
                                           direction=sample_t2.geometry.direction)
    with pytest.warns(RuntimeWarning, match="do not overlap"):
        get_method("mind-rigid").runner(sample_t1, Volume(sample_t2.data, shifted, name="far"),
                                        RegistrationOptions(device="cpu"))


def test_written_transform_resamples_in_simpleitk_like_the_warped_output(tmp_path, sample_t1, sample_t2):
    truth = _rigid((5, 0, -4), (6, -3, 2), sample_t1.geometry.center)
    moving = misaligned_copy(sample_t2, truth)
    result = _register("mind-rigid", sample_t1, moving)
    paths = result.save(tmp_path / "out")
    tfm = sitk.ReadTransform(str(paths["transform"]))
    reference = sitk.ReadImage(str(paths["warped"]))
    oracle = sitk.Resample(moving.to_sitk(), reference, tfm, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    diff = np.abs(sitk.GetArrayFromImage(oracle) - sitk.GetArrayFromImage(reference))
    assert float(diff.mean()) < 1e-3 * float(np.abs(sitk.GetArrayFromImage(reference)).max())


#: The issue's target for DISA is 1.5 mm (as MIND-SSC reaches on the same engine above).  disa-rigid
#: now polishes by default (refine="disa"): 0.52 mm on the rigid case (1.42 mm without the polish;
#: measured 2026-12-06 with the distilled weights), so the rigid bound is the issue's.  The affine
#: stage weighs its locations equally (affine_weighting="support"): 1.26 mm on the affine case, where
#: LC²'s variance weights let the head's rim set the scale (2.2 mm), so its bound is the issue's too.
DISA_RIGID_BOUND_MM = 1.5
DISA_AFFINE_BOUND_MM = 1.5


def test_a_search_larger_than_the_memory_budget_runs_in_chunks_with_the_same_result(sample_t1, sample_t2):
    """Starts are independent, so splitting them into memory-sized chunks must not change anything."""
    from DeepMultimodalRegLib.disa.search import SearchSettings, search_pose

    pair = disa_features(sample_t1, sample_t2, CPU)
    center = torch.as_tensor(sample_t1.geometry.center, dtype=torch.float64)
    p = RigidParametrization(center, 50.0)
    x0 = p.initial(RigidTransform.identity(center=center))
    common = dict(search="global", starts=12, range_deg=10.0, range_mm=20.0, coarse_iterations=5,
                  fine_iterations=5, keep=2, fine_points=2000, coarse_points=500)
    whole = search_pose(pair, p, x0, SearchSettings(**common), seed=1)
    chunked = search_pose(pair, p, x0, SearchSettings(**common, memory_budget_bytes=1), seed=1)  # one start a chunk
    # the same up to float32 rounding: the maps are float32 and a batch of 12 poses sums its dot
    # products in another order than a batch of one, which ten L-BFGS iterations amplify to ~2e-4
    # (rad, mm) on this pair; a chunking error would move starts by whole poses
    assert torch.allclose(whole.x, chunked.x, atol=1e-3)
    assert whole.evaluations == chunked.evaluations


# ------------------------------------------------------------------------- orientation bank
def _blob_volume(geometry, rotation=None):
    """Three Gaussian blobs of different sizes and heights at asymmetric places (no symmetry a rotation
    could confuse), sampled at the physical points of ``geometry`` mapped by ``rotation`` (if any)."""
    from DeepMultimodalRegLib.image.volume import Volume

    d, h, w = geometry.shape
    k, j, i = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    ijk = torch.stack([i, j, k], -1).reshape(-1, 3).double()  # (i, j, k) of every voxel, z-y-x memory order
    m = torch.as_tensor(geometry.index_to_physical_matrix(), dtype=torch.float64)
    points = ijk @ m[:3, :3].T + m[:3, 3]
    if rotation is not None:
        points = rotation.transform_points(points)[0]
    data = torch.zeros(points.shape[0], dtype=torch.float64)
    for centre, sigma, height in (((20, 0, 0), 12, 1.0), ((-15, 18, 5), 8, 0.7), ((0, -10, 22), 6, 0.5)):
        data += height * torch.exp(-((points - torch.tensor(centre)) ** 2).sum(1) / (2 * sigma ** 2))
    return Volume(data.reshape(d, h, w).float(), geometry)


def test_orientation_bank_members_and_pose_bookkeeping():
    """bank_search on rotation-invariant features (the intensity itself, compared by dot product), with an
    identity member that sees nothing (a zero fixed map): the pose can then only come from a turned
    member, which must carry its result back to the fixed → moving convention.  A moving image turned
    by (35°, −30°, 25°) is found to < 1 mm; a wrong composition (T∘R vs R∘T, R vs R⁻¹) misses by far."""
    from DeepMultimodalRegLib.disa.orientation_bank import bank_rotations, bank_search
    from DeepMultimodalRegLib.disa.search import SearchSettings
    from DeepMultimodalRegLib.image.geometry import ImageGeometry

    assert bank_rotations(10.0) == [(0.0, 0.0, 0.0)]
    members = bank_rotations(40.0)
    assert len(members) == 9 and members[0] == (0.0, 0.0, 0.0)
    assert all(abs(abs(a) - math.radians(24.0)) < 1e-12 for m in members[1:] for a in m)

    n, spacing = 36, 3.0
    geometry = ImageGeometry(shape=(n, n, n), spacing=(spacing,) * 3, origin=(-(n - 1) * spacing / 2,) * 3)
    truth = _rigid((35, -30, 25), (6, -4, 5), (0.0, 0.0, 0.0))
    fixed = _blob_volume(geometry)
    moving = _blob_volume(geometry, truth.inverse())  # moving(truth(x)) = fixed(x)

    def as_pair(volume):
        # the compared points go to the heaviest cells: the blobs, as LC²'s weights would
        return FeaturePair(FeatureMap(volume.data[None], geometry), FeatureMap(moving.data[None], geometry),
                           volume.data + 0.01, "dot", 1)

    def turned_pair(rotation):
        return as_pair(_blob_volume(geometry, rotation))

    p = RigidParametrization(torch.zeros(3, dtype=torch.float64), 30.0)
    x0 = p.initial(RigidTransform.identity(center=(0.0, 0.0, 0.0)).to(dtype=torch.float64))
    settings = SearchSettings(search="global", starts=64, range_deg=40.0, range_mm=10.0, keep=4)
    blind = as_pair(fixed.with_data(torch.zeros_like(fixed.data)))
    outcome = bank_search(blind, p, x0, settings, turned_pair, seed=0)
    found = p.transform(outcome.x)
    points = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    error = target_registration_error(found, truth, points)["mean_mm"]
    assert error < 1.0, error
    assert outcome.candidates.shape[0] >= 2 and outcome.stages["bank_members"] == 9
    assert bool((outcome.candidate_similarities[:-1] >= outcome.candidate_similarities[1:]).all())
