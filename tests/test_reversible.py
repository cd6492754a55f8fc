"""McCallum–Foster reversible Runge–Kutta (§6), reversible Heun (§7) and gradient="reversible"."""

import math
import warnings

import numpy as np
import pytest
import torch

import odegrad
from odegrad.errors import (
    InstabilityError,
    InvalidInputError,
    ReversibleDriftWarning,
    UnsupportedCombinationError,
)
from odegrad.solvers import SOLVERS, Solver, Step, make_solver, register_solver
from odegrad.tableaus import TABLEAUS

F64 = torch.float64


@pytest.mark.parametrize(
    "method, adaptive",
    [
        ("reversible_heun", False), ("reversible_heun", True), ("reversible_rk4", False),
        ("reversible_dopri5", False), ("reversible_dopri5", True), ("reversible_tsit5", False),
        ("reversible_tsit5", True),
    ],
)
def test_inverse_run_recovers_initial_state(mlp_field, run_keeping_final_state, method, adaptive):
    solver = make_solver(method)
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    rtol = 1e-5 if method == "reversible_heun" else 1e-9  # Heun's estimate is first order
    options = dict(rtol=rtol, atol=rtol / 100) if adaptive else dict(step_size=0.05)
    _, trajectory, state = run_keeping_final_state(
        mlp_field, y0, t, solver, adaptive=adaptive, **options
    )
    assert len(trajectory.steps) >= 10
    for record in reversed(trajectory.steps):
        state = solver.inverse_step(mlp_field, t[0] + record.t, record.h, state)
    true = torch.stack([y0, y0])
    assert float((state - true).abs().max() / true.abs().max()) < 1e-10


def _solve_and_grad(f, y0, t, method, gradient, **kwargs):
    y0 = y0.detach().requires_grad_()
    t = t.detach().requires_grad_()
    sol = odegrad.solve(f, y0, t, method=method, gradient=gradient, **kwargs)
    weights = torch.linspace(0.5, 1.5, sol.ys.numel(), dtype=F64).reshape(sol.ys.shape)
    loss = (weights * sol.ys).sum() + (sol.ys[-1] ** 2).sum()
    return [sol.ys.detach(), *torch.autograd.grad(loss, (y0, t, *f.parameters()))], sol.stats


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = [
    ("reversible_heun", dict(adaptive=False, step_size=0.07)),
    ("reversible_heun", dict(rtol=1e-5, atol=1e-7)),
    ("reversible_rk4", dict(step_size=0.1)),
    ("reversible_rk4", dict(step_size=0.1, coupling=0.7)),
    ("reversible_dopri5", dict(adaptive=False, step_size=0.1)),
    ("reversible_dopri5", dict(rtol=1e-7, atol=1e-9)),
    ("reversible_tsit5", dict(rtol=1e-7, atol=1e-9)),
]


@pytest.mark.parametrize("method, options", CASES)
def test_reversible_gradient_equals_direct(mlp_field, method, options):
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([0.0, 0.33, 0.5, 1.2], dtype=F64)  # outputs inside steps and at the end
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReversibleDriftWarning)
        reversible, stats = _solve_and_grad(mlp_field, y0, t, method, "reversible", **options)
    direct, _ = _solve_and_grad(mlp_field, y0, t, method, "direct", **options)
    for got, want in zip(reversible, direct):
        assert _relative(got, want) < 1e-9
    assert stats["drift"] < 1e-12
    assert stats["checkpoint_bytes"] == 2 * 3 * 8
    if method == "reversible_heun":  # one F per step, one for f(t_N, z_N)
        assert stats["nfe_backward"] == stats["n_accepted"] + 1
    if method == "reversible_rk4":  # 2s F per step (§8)
        assert stats["nfe_backward"] == 8 * stats["n_accepted"]


@pytest.mark.parametrize("base", sorted(set(TABLEAUS) - {"heun"}))
def test_every_explicit_base_is_registered_and_exact(base):
    assert f"reversible_{base}" in SOLVERS
    a = torch.randn(3, 3, dtype=F64, requires_grad=True)

    def field(t, y):
        return torch.tanh(a @ y) + torch.sin(t)

    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=F64, requires_grad=True)
    grads = {}
    for gradient in ("direct", "reversible"):
        ys = odegrad.odeint(field, y0, t, method=f"reversible_{base}", gradient=gradient,
                            adaptive=False, step_size=0.1, params=[a])
        grads[gradient] = torch.autograd.grad((ys ** 2).sum(), (y0, t, a))
    for got, want in zip(grads["reversible"], grads["direct"]):
        assert _relative(got, want) < 1e-9


def test_plain_method_is_wrapped_as_reversible(mlp_field):
    y0 = torch.randn(3, dtype=F64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    for coupling in (None, 0.9):
        extra = {} if coupling is None else {"coupling": coupling}
        wrapped, _ = _solve_and_grad(mlp_field, y0, t, "rk4", "reversible", step_size=0.1,
                                     **extra)
        native, _ = _solve_and_grad(mlp_field, y0, t, "reversible_rk4", "reversible",
                                    step_size=0.1, **extra)
        for got, want in zip(wrapped, native):
            assert torch.equal(got, want)
    plain = odegrad.odeint(mlp_field, y0, t, method="rk4", step_size=0.1)
    assert not torch.equal(plain, wrapped[0])  # the reversible scheme's outputs, not rk4's


def test_decreasing_times_and_tuple_state():
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)

    def field(t, y):
        return torch.tanh(a @ y[0]) * y[1], -y[1] * torch.cos(t)

    y0 = (torch.randn(2, dtype=F64, requires_grad=True), torch.ones(1, dtype=F64))
    t = torch.tensor([1.0, 0.3, -0.5], dtype=F64)
    grads = {}
    for gradient in ("direct", "reversible"):
        ys = odegrad.odeint(field, y0, t, method="reversible_dopri5", gradient=gradient,
                            rtol=1e-7, atol=1e-9, params=[a])
        grads[gradient] = torch.autograd.grad(ys[0].sum() + ys[1].sum(), (y0[0], a))
    for got, want in zip(grads["reversible"], grads["direct"]):
        assert _relative(got, want) < 1e-9


@pytest.mark.parametrize("method", ["reversible_heun", "reversible_rk4"])
def test_gradcheck(method):
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)

    def outputs(y0, t, a):
        return odegrad.odeint(lambda t, y: torch.tanh(a @ y) * torch.cos(t), y0, t,
                              method=method, gradient="reversible", adaptive=False,
                              step_size=0.3, params=[a])

    y0 = torch.randn(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(outputs, (y0, t, a))


@pytest.mark.parametrize(
    "method, order, hs",
    [
        ("reversible_heun", 2, [0.2, 0.1, 0.05, 0.025]),
        ("reversible_rk4", 4, [0.4, 0.2, 0.1, 0.05]),
        ("reversible_dopri5", 5, [0.1, 0.05, 0.025]),
    ],
)
def test_convergence_order(method, order, hs):
    # y' = (1 + cos t / 2) R y: a rotation by t + sin(t)/2.
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    exact = torch.linalg.matrix_exp(rot * (2.0 + 0.5 * math.sin(2.0))) @ y0
    t = torch.tensor([0.0, 2.0], dtype=F64)
    errors = []
    for h in hs:
        ys = odegrad.odeint(lambda t, y: (1 + 0.5 * torch.cos(t)) * (rot @ y), y0, t,
                            method=method, adaptive=False, step_size=h)
        errors.append(float((ys[-1] - exact).norm()))
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3


def test_checkpoint_bytes_do_not_grow_with_steps():
    a = torch.randn(4, 4, dtype=F64) / 2
    y0 = torch.randn(4, dtype=F64, requires_grad=True)
    sizes = []
    for n in (10, 100, 1000):
        sol = odegrad.solve(lambda t, y: torch.tanh(a @ y), y0, torch.tensor([0.0, 1.0], dtype=F64),
                            method="reversible_rk4", gradient="reversible", step_size=1 / n)
        sol.ys[-1].sum().backward()
        assert sol.stats["n_accepted"] == n
        assert sol.stats["nfe_backward"] == 8 * n
        sizes.append(sol.stats["checkpoint_bytes"])
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 4 * 8  # the final (y, z)


def test_dissipative_instability_and_drift_warning():
    """§6: on y' = −2y with h = 0.05 the parasitic eigenvalue λ/R(ha) exceeds 1 for λ = 1, so
    the forward pass blows up and says so (InstabilityError); λ = 0.5 is stable forward, but
    the reconstruction amplifies round-off like λ^{−N} = 2^200 and the drift warning fires."""
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    exact = math.exp(-20.0)

    def solve(coupling):
        return odegrad.solve(lambda t, y: -2.0 * y, y0, t, method="reversible_rk4",
                             coupling=coupling, gradient="reversible", step_size=0.05)

    with pytest.raises(InstabilityError, match=r"h=0\.05.*coupling=1"):
        solve(1.0)  # from 1 towards 2e-9, the parasitic mode would reach ~1e8
    coupled = solve(0.5)
    assert float((coupled.ys[-1].detach() - exact).abs().max()) < 1e-9
    with pytest.warns(ReversibleDriftWarning, match="coupling"):
        coupled.ys[-1].sum().backward()
    assert coupled.stats["drift"] > 1.0


class _FakeImplicit(Solver):
    name, order, implicit = "fake_implicit", 1, True

    def init(self, f, t0, y0):
        return None

    def step(self, f, t, h, y, carry):
        return Step(y=y + h * f(t + h, y), error=None, dense=None, carry=None)

    def interpolate(self, y, h, dense, theta):
        raise NotImplementedError


def test_implicit_method_is_rejected_with_the_valid_list():
    register_solver("fake_implicit", _FakeImplicit)
    try:
        with pytest.raises(UnsupportedCombinationError, match="alf.*reversible_heun.*rk4"):
            odegrad.odeint(lambda t, y: -y, torch.ones(2, dtype=F64),
                           torch.tensor([0.0, 1.0], dtype=F64), method="fake_implicit",
                           gradient="reversible", step_size=0.1)
    finally:
        del SOLVERS["fake_implicit"]


def test_invalid_coupling():
    with pytest.raises(InvalidInputError, match="coupling"):
        odegrad.odeint(lambda t, y: -y, torch.ones(2, dtype=F64),
                       torch.tensor([0.0, 1.0], dtype=F64), method="reversible_rk4",
                       coupling=1.5, step_size=0.1)


def test_single_output_time_is_the_identity():
    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    sol = odegrad.solve(lambda t, y: -y, y0, torch.tensor([0.5], dtype=F64), method="alf",
                        gradient="reversible")
    (grad,) = torch.autograd.grad((sol.ys * 2).sum(), y0)
    assert torch.equal(grad, torch.full_like(y0, 2.0))
    assert sol.stats["drift"] == 0.0


def test_dropout_is_refused_and_buffers_are_restored():
    class Field(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3).double()
            self.layer = layer

        def forward(self, t, y):
            return torch.tanh(self.layer(self.linear(y)))

    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(UnsupportedCombinationError, match="dropout"):
        odegrad.odeint(Field(torch.nn.Dropout(0.5)), y0, t, method="alf", gradient="reversible")
    field = Field(torch.nn.BatchNorm1d(3).double())
    ys = odegrad.odeint(field, y0, t, method="alf", gradient="reversible", adaptive=False,
                        step_size=0.25)
    after_forward = field.layer.running_mean.clone()
    ys.sum().backward()
    assert torch.equal(field.layer.running_mean, after_forward)
