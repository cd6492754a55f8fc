"""Explicit Runge–Kutta solvers: tableau consistency, convergence orders, scipy agreement."""

import math

import numpy as np
import pytest
import torch

import odegrad
from odegrad.tableaus import TABLEAUS

DT = torch.float64


def field(t, y):
    """y1' = y1 cos t; (y2, y3) rotate with angular speed 1 + sin(t)/2."""
    w = 1 + 0.5 * torch.sin(t)
    return torch.stack([y[0] * torch.cos(t), -y[2] * w, y[1] * w])


def exact(t: float) -> torch.Tensor:
    angle = t - 0.5 * math.cos(t) + 0.5
    return torch.tensor([math.exp(math.sin(t)), -math.sin(angle), math.cos(angle)], dtype=DT)


Y0 = torch.tensor([1.0, 0.0, 1.0], dtype=DT)


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_tableau_consistency(name):
    tableau = TABLEAUS[name]
    np.testing.assert_allclose(tableau.a.sum(axis=1), tableau.c, atol=1e-12)
    assert abs(tableau.b.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(tableau.dense_weights(1.0), tableau.b, atol=1e-10)
    np.testing.assert_allclose(tableau.dense_weights(0.0), 0.0, atol=0)
    if tableau.error is not None:
        assert abs(tableau.error.sum()) < 1e-12  # b and b_hat are both consistent


ORDER_STEPS = {
    "euler": [0.02, 0.01, 0.005],
    "midpoint": [0.04, 0.02, 0.01],
    "heun": [0.04, 0.02, 0.01],
    "rk4": [0.2, 0.1, 0.05],
    "bosh3": [0.1, 0.05, 0.025],
    "dopri5": [0.3, 0.15, 0.075],
    "tsit5": [0.05, 0.025, 0.0125],  # Tsitouras minimises the h^5 terms: go asymptotic
    "dopri8": [0.75, 0.5, 0.375, 0.3],
}


def fitted_order(errors, steps):
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("name", sorted(ORDER_STEPS))
def test_convergence_order(name):
    steps = ORDER_STEPS[name]
    t = torch.tensor([0.0, 3.0], dtype=DT)
    errors = []
    for h in steps:
        ys = odegrad.odeint(field, Y0, t, method=name, step_size=h, adaptive=False)
        errors.append(float((ys[-1] - exact(3.0)).abs().max()))
    order = fitted_order(errors, steps)
    assert abs(order - TABLEAUS[name].order) < 0.3, (errors, order)


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_dense_output_converges(name):
    """Outputs read between steps converge at least at the interpolant's order."""
    errors, steps = [], [0.2, 0.1]
    for h in steps:
        grid = torch.arange(0.0, 3.0 + 1e-9, h, dtype=DT)
        t = torch.cat([grid[:1], grid[:-1] + 0.37 * h])
        ys = odegrad.odeint(field, Y0, t, method=name, step_size=h, adaptive=False)
        reference = torch.stack([exact(float(x)) for x in t])
        errors.append(float((ys - reference).abs().max()))
    expected = min(TABLEAUS[name].order, 4)
    assert fitted_order(errors, steps) > expected - 0.3


def test_linear_system_matches_matrix_exponential():
    a = torch.randn(4, 4, dtype=DT)
    y0 = torch.randn(4, dtype=DT)
    t = torch.linspace(0, 1, 5, dtype=DT)
    ys = odegrad.odeint(lambda t, y: a @ y, y0, t, method="dopri5", rtol=1e-10, atol=1e-10)
    exact_ys = torch.stack([torch.linalg.matrix_exp(a * ti) @ y0 for ti in t])
    assert (ys - exact_ys).abs().max() < 1e-8


def lotka_volterra(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


@pytest.mark.parametrize("name", ["bosh3", "dopri5", "tsit5", "dopri8", "heun"])
def test_adaptive_agrees_with_scipy(name):
    scipy_integrate = pytest.importorskip("scipy.integrate")
    t_eval = np.linspace(0.0, 5.0, 11)
    reference = scipy_integrate.solve_ivp(
        lambda t, y: [1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]],
        (0.0, 5.0), [1.0, 1.0], method="DOP853", t_eval=t_eval, rtol=1e-12, atol=1e-12,
    ).y.T
    tol = 1e-6 if name == "heun" else 1e-9
    ys = odegrad.odeint(
        lotka_volterra, torch.tensor([1.0, 1.0], dtype=DT), torch.tensor(t_eval, dtype=DT),
        method=name, rtol=tol, atol=tol, max_steps=100_000,
    )
    error = np.abs(ys.numpy() - reference).max() / np.abs(reference).max()
    assert error < 1e3 * tol, error


def test_backward_in_time_inverts_forward():
    t = torch.linspace(0.0, 2.0, 6, dtype=DT)
    forward = odegrad.odeint(lotka_volterra, torch.tensor([1.0, 1.0], dtype=DT), t,
                             rtol=1e-11, atol=1e-11)
    backward = odegrad.odeint(lotka_volterra, forward[-1], t.flip(0), rtol=1e-11, atol=1e-11)
    assert (backward.flip(0) - forward).abs().max() < 1e-8


def test_fixed_step_methods_without_step_size_step_between_outputs():
    t = torch.linspace(0.0, 3.0, 301, dtype=DT)
    sol = odegrad.solve(field, Y0, t, method="rk4")
    assert sol.stats["n_accepted"] == 300
    assert sol.stats["nfe_forward"] == 4 * 300  # K_1 of the first step comes from init
    assert (sol.ys[-1] - exact(3.0)).abs().max() < 1e-8


def test_fsal_saves_evaluations():
    sol = odegrad.solve(field, Y0, torch.tensor([0.0, 3.0], dtype=DT), method="dopri5",
                        rtol=1e-8, atol=1e-8)
    stats = sol.stats
    # 2 for the initial step selection (f0 reused as K_1), 6 new stages per attempted step.
    assert stats["nfe_forward"] == 2 + 6 * stats["n_steps"]
    assert stats["n_steps"] == stats["n_accepted"] + stats["n_rejected"]


def test_float32_and_tensor_shapes():
    y0 = torch.randn(5, 2, 3)
    ys = odegrad.odeint(lambda t, y: -y, y0, torch.linspace(0, 1, 4), method="tsit5")
    assert ys.shape == (4, 5, 2, 3) and ys.dtype == torch.float32
    assert torch.allclose(ys[-1], y0 * math.exp(-1.0), rtol=1e-5, atol=1e-6)


def test_per_component_tolerances():
    y0 = torch.tensor([1.0, 1.0], dtype=DT)
    t = torch.tensor([0.0, 5.0], dtype=DT)
    loose = odegrad.solve(lotka_volterra, y0, t, rtol=torch.tensor([1e-3, 1e-3], dtype=DT),
                          atol=1e-3)
    tight = odegrad.solve(lotka_volterra, y0, t, rtol=torch.tensor([1e-3, 1e-9], dtype=DT),
                          atol=1e-9)
    assert tight.stats["n_accepted"] > loose.stats["n_accepted"]
