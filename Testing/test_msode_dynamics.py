"""MS-ODE dynamics: torchdiffeq integration against closed-form solutions, and the multi-scale handover."""

import math

import pytest
import torch

from DeepMultimodalRegLib.errors import CancelledError, InvalidParameterError
from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.msode.dynamics import integrate_multiscale, segment_bounds
from DeepMultimodalRegLib.msode.solvers import PAPER_SOLVERS, SolverSpec, parse_solvers
from DeepMultimodalRegLib.msode.warp import upsample_field
from DeepMultimodalRegLib.progress import CancelToken
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform


def quadratic_field(a: torch.Tensor, target: torch.Tensor):
    """f(t, θ) = −∇ ½ (θ − θ*)ᵀ A (θ − θ*) = −A (θ − θ*)."""
    return lambda t, theta: -(theta - target) @ a.T


def analytic(a, target, theta0, t):
    """θ(t) = θ* + expm(−A t)(θ0 − θ*)."""
    return target + (theta0 - target) @ torch.linalg.matrix_exp(-a * t).T


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + 0.3 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("solver, tol", [("A(1e-5)", 1e-3), ("F(0.001)", 2e-3), ("heun2:0.01", 1e-4), ("rk4:0.1", 1e-5)])
def test_single_level_matches_closed_form(solver, tol):
    a, target = spd(6, 0), torch.linspace(-1, 1, 6, dtype=torch.float64)
    theta0 = torch.zeros(1, 6, dtype=torch.float64)
    theta, info = integrate_multiscale([quadratic_field(a, target)], theta0, 2.0, parse_solvers(solver))
    expected = analytic(a, target, theta0, 2.0)
    assert torch.allclose(theta, expected, atol=tol), (theta - expected).abs().max()
    assert info.total_nfe > 0


def test_multiscale_levels_chain_their_segments():
    """Three levels, each with its own quadratic: θ(T) is the chained closed form, and θ leaves
    each segment exactly where the next one starts."""
    mats = [spd(6, s) for s in range(3)]
    targets = [torch.full((6,), float(v), dtype=torch.float64) for v in (2.0, -1.0, 0.5)]
    theta0 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logs = [[], [], []]
    fields = []
    for a, tgt, log in zip(mats, targets, logs):
        f = quadratic_field(a, tgt)

        def recording(t, theta, f=f, log=log):
            log.append((float(t), theta.detach().clone()))
            return f(t, theta)
        fields.append(recording)
    solvers = parse_solvers("A(1e-5)-rk4:0.01-A(1e-5)")
    theta, info = integrate_multiscale(fields, theta0, 3.0, solvers)
    expected = theta0
    for a, tgt in zip(mats, targets):
        expected = analytic(a, tgt, expected, 1.0)
    assert torch.allclose(theta, expected, atol=2e-3)
    assert info.boundaries == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    # the first evaluation of segment l + 1 sees the end state of segment l
    for level in range(2):
        t_first, theta_first = logs[level + 1][0]
        assert t_first == float(level + 1)
        assert torch.equal(theta_first, info.segment_end_states[level])
    assert len(info.nfe) == 3 and all(n > 0 for n in info.nfe)


def test_fixed_step_nfe_and_paper_defaults():
    a, target = spd(6, 1), torch.ones(6, dtype=torch.float64)
    theta0 = torch.zeros(1, 6, dtype=torch.float64)
    _, info = integrate_multiscale([quadratic_field(a, target)] * 3, theta0, 3.0, PAPER_SOLVERS["bspline"])
    assert info.nfe == [5, 5, 4]  # Euler: 1 / 0.2, 1 / 0.2, 1 / 0.25 steps of length-1 segments
    assert [str(s) for s in PAPER_SOLVERS["rigid"]] == ["A(0.001)", "A(0.001)", "F(0.1)"]


def test_gradients_through_solver_modes_agree():
    a = spd(6, 2)
    results = {}
    for mode in ("direct", "checkpoint", "adjoint"):
        target = torch.linspace(0, 1, 6, dtype=torch.float64, requires_grad=True)
        module = torch.nn.Linear(6, 6, bias=False).double()
        with torch.no_grad():
            module.weight.copy_(-a)
        module.target = target

        class F(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = module

            def forward(self, t, theta):
                return self.lin(theta - target)
        theta, _ = integrate_multiscale([F()], torch.zeros(1, 6, dtype=torch.float64), 1.0,
                                        [SolverSpec("rk4", 0.05)], backprop=mode)
        theta.sum().backward()
        results[mode] = module.weight.grad.clone()
    assert torch.allclose(results["direct"], results["checkpoint"], atol=1e-10)
    assert torch.allclose(results["direct"], results["adjoint"], atol=1e-5)


def test_dense_handover_is_the_same_displacement_on_the_finer_grid():
    coarse = ImageGeometry(shape=(8, 8, 8), spacing=(8.0,) * 3, origin=(-28.0,) * 3)
    fine = coarse.resampled(4.0)
    field = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upsample_field(field)
    expected = DisplacementFieldTransform(coarse, field).displacement(fine.physical_grid())[0].permute(3, 0, 1, 2)
    assert up.shape[2:] == fine.shape
    assert torch.allclose(up[0], expected, atol=1e-5)


def test_bad_settings_fail_early_and_cancel_stops():
    with pytest.raises(InvalidParameterError):
        parse_solvers("B(3)")
    with pytest.raises(InvalidParameterError):
        SolverSpec("euler", -0.1)
    with pytest.raises(InvalidParameterError):
        segment_bounds(0, 3.0)
    with pytest.raises(InvalidParameterError):
        integrate_multiscale([lambda t, th: th], torch.zeros(1, 6), 3.0, parse_solvers("F(0.1)-F(0.1)"))
    token = CancelToken()
    calls = []

    def field(t, theta):
        calls.append(1)
        if len(calls) == 3:
            token.cancel()
        return -theta
    with pytest.raises(CancelledError):
        integrate_multiscale([field], torch.ones(1, 6), 1.0, [SolverSpec("euler", 0.01)], cancel=token)
    assert len(calls) == 3
    # an adaptive solver that cannot meet its tolerance within its budget says so
    stiff = SolverSpec("adaptive_heun", None, 1e-12, max_steps=5)
    with pytest.raises(InvalidParameterError, match="more than 5 steps"):
        integrate_multiscale([lambda t, th: -50 * th * math.e], torch.ones(1, 6), 1.0, [stiff])
