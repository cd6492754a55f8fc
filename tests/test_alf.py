"""The asynchronous leapfrog (ALGORITHMS.md §5) and MALI (gradient="reversible" with alf)."""

import math
import warnings

import numpy as np
import pytest
import torch

import odegrad
from odegrad.errors import InstabilityError, InvalidInputError, ReversibleDriftWarning
from odegrad.solvers.alf import AsynchronousLeapfrog

F64 = torch.float64


@pytest.mark.parametrize("adaptive", [False, True])
def test_inverse_run_recovers_initial_state(mlp_field, run_keeping_final_state, adaptive):
    solver = AsynchronousLeapfrog()
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    options = dict(rtol=1e-7, atol=1e-9) if adaptive else dict(step_size=0.05)
    _, trajectory, state = run_keeping_final_state(
        mlp_field, y0, t, solver, adaptive=adaptive, **options
    )
    assert len(trajectory.steps) >= 20
    for record in reversed(trajectory.steps):
        state = solver.inverse_step(mlp_field, t[0] + record.t, record.h, state)
    with torch.no_grad():
        true = torch.stack([y0, mlp_field(t[0], y0)])
    assert float((state - true).abs().max() / true.abs().max()) < 1e-10


def _gradients(f, y0, t, gradient, **kwargs):
    y0 = y0.detach().requires_grad_()
    t = t.detach().requires_grad_()
    sol = odegrad.solve(f, y0, t, method="alf", gradient=gradient, **kwargs)
    weights = torch.linspace(0.5, 1.5, sol.ys.numel(), dtype=F64).reshape(sol.ys.shape)
    loss = (weights * sol.ys).sum() + (sol.ys[-1] ** 2).sum()
    return [sol.ys.detach(), *torch.autograd.grad(loss, (y0, t, *f.parameters()))], sol.stats


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize(
    "options",
    [
        dict(adaptive=False, step_size=0.07),
        dict(rtol=1e-5, atol=1e-7),
        dict(adaptive=False, step_size=0.1, eta=0.8),
    ],
    ids=["fixed", "adaptive", "eta0.8"],
)
def test_mali_gradient_equals_direct(mlp_field, options):
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([0.0, 0.33, 0.5, 1.2], dtype=F64)  # outputs inside steps and at the end
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReversibleDriftWarning)
        reversible, stats = _gradients(mlp_field, y0, t, "reversible", **options)
    direct, _ = _gradients(mlp_field, y0, t, "direct", **options)
    for got, want in zip(reversible, direct):
        assert _relative(got, want) < 1e-9
    assert stats["nfe_backward"] == stats["n_accepted"] + 1  # one F per step, one for v0
    assert stats["drift"] < 1e-12


def test_decreasing_times(mlp_field):
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([1.0, 0.6, -0.2], dtype=F64)
    reversible, _ = _gradients(mlp_field, y0, t, "reversible", adaptive=False, step_size=0.15)
    direct, _ = _gradients(mlp_field, y0, t, "direct", adaptive=False, step_size=0.15)
    for got, want in zip(reversible, direct):
        assert _relative(got, want) < 1e-9


def test_gradcheck():
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)

    def loss(y0, t, a):
        return odegrad.odeint(
            lambda t, y: torch.tanh(a @ y) * torch.cos(t), y0, t, method="alf",
            gradient="reversible", adaptive=False, step_size=0.3, params=[a],
        )

    y0 = torch.randn(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (y0, t, a))


def test_second_order_at_eta_one():
    # y' = (1 + cos t / 2) R y: a rotation by t + sin(t)/2.
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    exact = torch.linalg.matrix_exp(rot * (2.0 + 0.5 * math.sin(2.0))) @ y0
    t = torch.tensor([0.0, 2.0], dtype=F64)
    hs = [0.1, 0.05, 0.025, 0.0125]
    errors = []
    for h in hs:
        ys = odegrad.odeint(lambda t, y: (1 + 0.5 * torch.cos(t)) * (rot @ y), y0, t,
                            method="alf", adaptive=False, step_size=h)
        errors.append(float((ys[-1] - exact).norm()))
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.3


def test_checkpoint_bytes_do_not_grow_with_steps():
    a = torch.randn(4, 4, dtype=F64) / 2
    y0 = torch.randn(4, dtype=F64, requires_grad=True)
    sizes = []
    for n in (10, 100, 1000):
        sol = odegrad.solve(lambda t, y: torch.tanh(a @ y), y0, torch.tensor([0.0, 1.0], dtype=F64),
                            method="alf", gradient="reversible", adaptive=False, step_size=1 / n)
        sol.ys[-1].sum().backward()
        assert sol.stats["n_accepted"] == n
        sizes.append(sol.stats["checkpoint_bytes"])
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 4 * 8  # the final (z, v)


def test_dissipative_instability_and_drift_warning():
    """§5: at η = 1 the map has determinant −1, so on y' = −2y a parasitic mode grows in the
    forward pass and the solve says so (InstabilityError); damping (η = 0.75) fixes the
    forward pass, but the reconstruction then amplifies round-off by 2 per step and the drift
    warning fires."""
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    exact = math.exp(-20.0)

    def solve(eta):
        return odegrad.solve(lambda t, y: -2.0 * y, y0, t, method="alf", eta=eta,
                             gradient="reversible", adaptive=False, step_size=0.05)

    with pytest.raises(InstabilityError, match=r"h=0\.05.*eta"):
        solve(1.0)  # the parasitic mode would blow up from 1 towards 2e-9
    damped = solve(0.75)
    assert float((damped.ys[-1].detach() - exact).abs().max()) < 1e-9
    with pytest.warns(ReversibleDriftWarning, match="drifted"):
        damped.ys[-1].sum().backward()
    assert damped.stats["drift"] > 1.0


def test_invalid_options():
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InvalidInputError, match="eta"):
        odegrad.odeint(lambda t, y: -y, y0, t, method="alf", eta=0.5)
    with pytest.raises(InvalidInputError, match="coupling"):
        odegrad.odeint(lambda t, y: -y, y0, t, method="alf", gradient="reversible", coupling=0.9)
