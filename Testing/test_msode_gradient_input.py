"""MS-ODE rigid with ``gradient_input``: f is told the MIND-SSC descent direction.

The descent must be −P·∂L_sim/∂θ (checked against finite differences of the loss, not autograd);
an untrained model is then a gradient flow on L_sim, which on a real Kirby21 pair under a known
motion must close most of the gap; the option round-trips through a weights file and old weights
(without it) still load.
"""

import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy, target_registration_error
from DeepMultimodalRegLib.metrics.mind import mind_ssc, mind_ssd
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method
from DeepMultimodalRegLib.msode.model import CONFIG_KEY, MSODE, MSODEConfig
from DeepMultimodalRegLib.training.msode_data import MotionSettings, make_batch
from DeepMultimodalRegLib.transforms.linear import RigidTransform
from conftest import shared_scan
from test_msode_training import phantom_anatomy


def test_descent_is_the_preconditioned_negative_gradient_of_the_mind_distance():
    config = MSODEConfig(kind="rigid", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8,
                         gradient_input=True, descent_rate=3e3, descent_radius_mm=50.0)
    batch = make_batch([phantom_anatomy()], "rigid", 2, 2, MotionSettings(15.0, 8.0), torch.Generator().manual_seed(3),
                       real_t1_probability=0.0)
    pairs = batch.pairs.to(torch.float64)
    field = MSODE(config).double().level_fields(pairs)[-1]
    theta = torch.tensor([[0.05, -0.08, 0.03, 2.0, -3.0, 1.5], [-0.1, 0.02, 0.07, -4.0, 1.0, 2.5]], dtype=torch.float64)

    def loss(th):
        return mind_ssd(mind_ssc(field.warp(th), 1, 1), mind_ssc(pairs.fixed[-1], 1, 1), per_batch=True)

    # the loss is piecewise smooth (trilinear cells, MIND's minimum over channels) with kinks dense on a
    # 16³ grid: a small step keeps the central difference inside one piece
    h = 1e-7
    numeric = torch.zeros_like(theta)
    for k in range(6):
        step = torch.zeros_like(theta)
        step[:, k] = h
        numeric[:, k] = (loss(theta + step) - loss(theta - step)) / (2 * h)
    precondition = 3e3 * torch.tensor([1 / 50.0 ** 2] * 3 + [1.0] * 3, dtype=torch.float64)
    expected = -numeric * precondition
    assert float(expected.abs().max()) > 0  # the pairs are misaligned: a non-trivial slope
    atol = 1e-3 * float(expected.abs().max())
    torch.testing.assert_close(field.descent(theta), expected, rtol=2e-3, atol=atol)
    # the untrained field is exactly that descent (zero head, unit gain): a gradient flow
    with torch.no_grad():
        torch.testing.assert_close(field(torch.tensor(2.5, dtype=torch.float64), theta), expected, rtol=2e-3, atol=atol)


@pytest.fixture(scope="module")
def kirby21_pair():
    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.msode.grids import resample_onto

    out = []
    for file in ("t1_mprage", "t2"):
        v = read_volume(shared_scan(f"mr_kirby21_113/{file}.nii.gz")).float()
        out.append(resample_onto(v, v.geometry.resampled(4.0)))
    return out


def test_untrained_gradient_flow_closes_most_of_a_known_motion_on_real_t2_to_t1(kirby21_pair, tmp_path):
    """Kirby21 T2 moved by 10°/10 mm, registered onto T1: the paper's untrained f leaves the
    centre-of-mass start; the gradient-input model, untrained, must remove most of that error."""
    fixed, t2 = kirby21_pair
    centre = torch.tensor(fixed.geometry.center, dtype=torch.float64)
    truth = RigidTransform(torch.tensor([[math.radians(10), math.radians(-6), math.radians(4), 10.0, -6.0, 5.0]],
                                        dtype=torch.float64), centre)
    moving = misaligned_copy(t2, truth, margin_mm=40.0)
    points = foreground_points(fixed, 1000, seed=0)
    errors = {}
    for gradient_input in (False, True):
        config = MSODEConfig(kind="rigid", size=32, spacing_mm=8.0, solvers="F(0.1)-F(0.1)-F(0.1)",
                             gradient_input=gradient_input)
        weights = tmp_path / f"rigid_{gradient_input}.pt"
        torch.manual_seed(0)
        torch.save(MSODE(config).state_dict_with_config(), weights)
        result = get_method("msode-rigid").runner(fixed, moving, RegistrationOptions(extra={"weights": str(weights)}))
        errors[gradient_input] = target_registration_error(result.transform, truth, points)["mean_mm"]
    assert errors[False] > 5.0, errors  # the start is far enough off to tell
    assert errors[True] < 0.5 * errors[False], errors


def test_gradient_input_round_trips_and_older_weights_still_load(tmp_path):
    config = MSODEConfig(kind="rigid", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8,
                         gradient_input=True, descent_rate=123.0)
    torch.save(MSODE(config).state_dict_with_config(), tmp_path / "gi.pt")
    loaded = MSODE.from_state_dict(torch.load(tmp_path / "gi.pt", weights_only=True))
    assert loaded.config.gradient_input and loaded.config.descent_rate == 123.0
    assert hasattr(loaded.fields[0], "gain_head")
    # weights written before the option existed have no such key in their stored configuration
    old = MSODE(MSODEConfig(kind="rigid", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8))
    state = old.state_dict_with_config()
    import json

    stored = json.loads(bytes(state[CONFIG_KEY].tolist()).decode())
    for key in ("gradient_input", "descent_rate", "descent_radius_mm"):
        stored.pop(key)
    state[CONFIG_KEY] = torch.tensor(list(json.dumps(stored).encode()), dtype=torch.uint8)
    assert not MSODE.from_state_dict(state).config.gradient_input


def test_gradient_input_settings_fail_early():
    with pytest.raises(InvalidParameterError, match="B-spline"):
        MSODEConfig(kind="dense", gradient_input=True)
    with pytest.raises(InvalidParameterError, match="positive"):
        MSODEConfig(kind="rigid", gradient_input=True, descent_rate=0.0)


def test_cli_flags_reach_the_gradient_input_recipe():
    from DeepMultimodalRegLib.cli.main import build_parser
    from DeepMultimodalRegLib.training.msode_cli import config_from_args

    args = build_parser().parse_args(["train", "msode", "-o", "x", "--gradient-input", "--descent-rate", "5e3",
                                      "--ode-solvers", "F(0.2)-F(0.2)-F(0.1)"])
    config = config_from_args(args)
    assert config.gradient_input and config.descent_rate == 5e3
    assert config.training_solvers == config.inference_solvers == "F(0.2)-F(0.2)-F(0.1)"
    model_config = config.model_config()
    assert model_config.gradient_input and model_config.descent_rate == 5e3
    assert np.isclose(float(model_config.descent_preconditioner()[0]), 5e3 / 60.0 ** 2)


def test_a_finer_level_keeps_the_learned_levels_and_adds_a_gradient_flow(tmp_path):
    from DeepMultimodalRegLib.msode.dynamics import segment_bounds
    from DeepMultimodalRegLib.training.msode_extend import add_finer_level, main

    config = MSODEConfig(kind="rigid", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8,
                         solvers="F(0.5)-F(0.25)", gradient_input=True, descent_rate=3e3)
    torch.manual_seed(1)
    model = MSODE(config)
    for field in model.fields:  # a "trained" head, so that copying is visible
        torch.nn.init.normal_(field.head[-1].weight, std=0.01)
    extended = add_finer_level(model, gain=0.5, solver="F(0.1)")
    c = extended.config
    assert (c.levels, c.size, c.spacing_mm, c.total_time) == (3, 32, 5.0, 4.5)  # segments of 1.5 each
    assert [str(s) for s in c.solver_specs()] == ["F(0.5)", "F(0.25)", "F(0.1)"]
    assert segment_bounds(3, c.total_time)[:2] == segment_bounds(2, config.total_time)  # same times for the old levels
    for old, new in zip(model.fields, extended.fields):
        for (k, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
            assert torch.equal(a, b), k
    assert model.config.levels == 2 and len(model.fields) == 2  # the input model is left as it was
    # the new level, untrained, is the gradient flow at half speed: field = 0.5 · descent
    batch = make_batch([phantom_anatomy(32, 5.0)], "rigid", 1, 3, MotionSettings(10.0, 5.0),
                       torch.Generator().manual_seed(2), real_t1_probability=0.0)
    finest = extended.level_fields(batch.pairs)[-1]
    theta = torch.tensor([[0.05, -0.03, 0.02, 2.0, -1.0, 1.0]])
    with torch.no_grad():
        torch.testing.assert_close(finest(torch.tensor(2.5), theta), 0.5 * finest.descent(theta), rtol=1e-5, atol=1e-9)
    # the command line writes a weights file that loads with weights_only
    torch.save(model.state_dict_with_config(), tmp_path / "in.pt")
    assert main([str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), "--gain", "0.5"]) == 0
    loaded = MSODE.from_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    assert loaded.config.levels == 3 and float(loaded.fields[-1].gain_head.bias[0].detach()) == pytest.approx(math.log(0.5))
    with pytest.raises(InvalidParameterError, match="gradient_input"):
        add_finer_level(MSODE(MSODEConfig(kind="rigid", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8)))


def test_shipped_rigid_model_loads_and_registers_real_t2_to_t1(kirby21_pair):
    """The shipped ``msode_rigid`` (checksum-verified, weights_only) with no --weights: a 20°/12 mm motion of
    Kirby21 T2 (never used in training) is recovered to < 2 mm mean error over the T1's brain voxels."""
    from DeepMultimodalRegLib.msode.runner import load_model

    model = load_model("rigid")
    assert model.config.gradient_input and model.config.levels == 4
    fixed, t2 = kirby21_pair
    centre = torch.tensor(fixed.geometry.center, dtype=torch.float64)
    truth = RigidTransform(torch.tensor([[math.radians(-20), math.radians(12), math.radians(8), -12.0, 6.0, 4.0]],
                                        dtype=torch.float64), centre)
    moving = misaligned_copy(t2, truth, margin_mm=40.0)
    points = foreground_points(fixed, 1000, seed=0)
    start = target_registration_error(RigidTransform.identity(1, center=centre), truth, points)["mean_mm"]
    result = get_method("msode-rigid").runner(fixed, moving, RegistrationOptions())
    error = target_registration_error(result.transform, truth, points)["mean_mm"]
    assert start > 15.0 and error < 2.0, (start, error)
    assert result.figures["nfe"] == 25  # F(0.2)-F(0.2)-F(0.1)-F(0.2) over four unit segments


def test_bspline_descent_is_the_scaled_negative_gradient_and_the_untrained_field_is_that_flow():
    """B-spline ``gradient_input``: d = −rate·∂L_sim/∂c over the control coefficients (central finite
    differences on a few coefficients, not autograd); zero body output and unit gain at the start."""
    config = MSODEConfig(kind="bspline", levels=2, size=16, spacing_mm=10.0, inputs="image", width=8, mesh=4,
                         gradient_input=True, descent_rate=2e6)
    batch = make_batch([phantom_anatomy()], "bspline", 1, 2, MotionSettings(0.0, 0.0, 8.0, 4),
                       torch.Generator().manual_seed(5), real_t1_probability=0.0)
    pairs = batch.pairs.to(torch.float64)
    model = MSODE(config).double()
    field = model.level_fields(pairs)[-1]
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(1, 3, *model.control_grid(pairs.fixed_geometries[-1]).shape, generator=generator,
                        dtype=torch.float64) * 2.0

    def loss(th):
        return float(mind_ssd(mind_ssc(field.warp(th), 1, 1), mind_ssc(pairs.fixed[-1], 1, 1)))

    descent = field.descent(theta)
    assert descent.shape == theta.shape and float(descent.abs().max()) > 0
    h = 1e-6
    flat = descent.flatten()
    for index in torch.topk(flat.abs(), 4).indices.tolist():  # the steepest coefficients
        step = torch.zeros_like(theta).flatten()
        step[index] = h
        step = step.reshape(theta.shape)
        numeric = (loss(theta + step) - loss(theta - step)) / (2 * h)
        assert float(flat[index]) == pytest.approx(-2e6 * numeric, rel=5e-3, abs=1e-3 * float(flat.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(field(torch.tensor(1.5, dtype=torch.float64), theta), descent)
    with pytest.raises(InvalidParameterError, match="descent"):
        model.fields[-1](torch.zeros(1, 2, 16, 16, 16, dtype=torch.float64), torch.tensor(0.0), (7, 7, 7))


def test_a_silent_bspline_body_is_skipped_with_the_same_result_and_a_trained_one_is_not(monkeypatch):
    """An untrained flow's body adds exactly 0, so registration skips its pass (and its input stack);
    the field's value must be what the full pass gives, bit for bit, and any non-zero output layer runs."""
    from DeepMultimodalRegLib.msode.networks import BSplineField

    config = MSODEConfig(kind="bspline", levels=2, size=16, spacing_mm=10.0, width=8, mesh=4,
                         gradient_input=True, descent_rate=2e6)
    batch = make_batch([phantom_anatomy()], "bspline", 1, 2, MotionSettings(0.0, 0.0, 8.0, 4),
                       torch.Generator().manual_seed(6), real_t1_probability=0.0)
    model = MSODE(config)
    field = model.level_fields(batch.pairs)[-1]
    theta = torch.randn(1, 3, *model.control_grid(batch.pairs.fixed_geometries[-1]).shape,
                        generator=torch.Generator().manual_seed(1)) * 2.0
    t = torch.tensor(1.2)
    assert model.fields[-1].body_is_silent
    with torch.no_grad():
        skipped = field(t, theta)
        monkeypatch.setattr(BSplineField, "body_is_silent", property(lambda self: False))
        full = field(t, theta)
    assert torch.equal(skipped, full)
    monkeypatch.undo()
    with torch.no_grad():
        model.fields[-1].body[-1].bias[0] = 1e-3
    assert not model.fields[-1].body_is_silent
    with torch.no_grad():
        assert not torch.equal(field(t, theta), skipped)


def test_the_shipped_rigid_models_gradient_flow_level_is_skipped_with_the_same_result(kirby21_pair, monkeypatch):
    """The shipped rigid model's finest level is an untrained gradient flow (silent), its learned levels are
    not; skipping the silent level's network gives the full pass's value bit for bit."""
    from DeepMultimodalRegLib.msode.networks import RigidField
    from DeepMultimodalRegLib.msode.runner import load_model, prepare_pair

    fixed, moving = kirby21_pair[:2]
    model = load_model("rigid")
    assert [f.body_is_silent for f in model.fields] == [False] * (model.config.levels - 1) + [True]
    pairs = prepare_pair(fixed, moving, model, "cpu")
    field = model.level_field(pairs, model.config.levels - 1)
    theta = torch.tensor([[0.05, -0.03, 0.02, 3.0, -2.0, 1.0]])
    t = torch.tensor(3.4)
    with torch.no_grad():
        skipped = field(t, theta)
        monkeypatch.setattr(RigidField, "body_is_silent", property(lambda self: False))
        full = field(t, theta)
    assert torch.equal(skipped, full) and float(skipped.abs().max()) > 0
