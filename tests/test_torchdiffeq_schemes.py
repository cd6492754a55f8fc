"""torchdiffeq's rk4 (Kutta's 3/8 rule), heun3 and fehlberg2 as odegrad's rk4_38, heun3 and
fehlberg2: their measured orders, and the same numbers as torchdiffeq 0.2.5 where installed.

Problem: y' = −2t y², y(0) = 1, whose solution is 1 / (1 + t²) (nonlinear, non-autonomous).
"""

import numpy as np
import pytest
import torch

import odegrad
from odegrad import tableaus
from odegrad.solvers.explicit import ExplicitRungeKutta

DT = torch.float64
T_END = 2.0
SCHEMES = {"rk4_38": 4, "heun3": 3, "fehlberg2": 2}  # odegrad's name: order
TORCHDIFFEQ_NAME = {"rk4_38": "rk4", "heun3": "heun3", "fehlberg2": "fehlberg2"}


def field(t, y):
    return -2.0 * t * y**2


def exact(t):
    return 1.0 / (1.0 + t**2)


def grid(h):
    return torch.linspace(0.0, T_END, round(T_END / h) + 1, dtype=DT)


TABLEAU = {"rk4_38": tableaus.RK4_38, "heun3": tableaus.HEUN3, "fehlberg2": tableaus.FEHLBERG2}


def solve_fixed(method, h):
    y0, t = torch.tensor([1.0], dtype=DT), grid(h)
    if method in odegrad.METHODS:
        return odegrad.odeint(field, y0, t, method=method, step_size=h, adaptive=False)
    solver, ys = ExplicitRungeKutta(TABLEAU[method]), [y0]
    carry = solver.init(field, t[0], y0)
    for k in range(len(t) - 1):
        step = solver.step(field, t[k], h, ys[-1], carry)
        ys.append(step.y)
        carry = step.carry
    return torch.stack(ys)


@pytest.mark.parametrize("method", sorted(SCHEMES))
def test_measured_order(method):
    steps = [0.1, 0.05, 0.025, 0.0125]
    errors = [float((solve_fixed(method, h)[:, 0] - exact(grid(h))).abs().max()) for h in steps]
    slope = float(np.polyfit(np.log(steps), np.log(errors), 1)[0])
    assert abs(slope - SCHEMES[method]) < 0.15, (slope, errors)


@pytest.mark.parametrize("method", sorted(SCHEMES))
def test_the_registry_has_the_schemes(method):
    tableau = TABLEAU[method]
    assert tableau.order == SCHEMES[method]
    assert method == "fehlberg2" or tableaus.TABLEAUS[method] is tableau
    assert tableau.adaptive == (method == "fehlberg2")
    np.testing.assert_allclose(tableau.a.sum(axis=1), tableau.c, atol=1e-15)
    np.testing.assert_allclose(tableau.dense_weights(1.0), tableau.b, atol=1e-15)


def test_fehlberg2_has_a_first_order_estimate():
    tableau = tableaus.FEHLBERG2
    assert tableau.error_order == 1 and not tableau.fsal
    np.testing.assert_allclose(tableau.b - tableau.error, [1 / 256, 255 / 256, 0.0])


def test_fehlberg2_is_adaptive():
    sol = odegrad.solve(field, torch.tensor([1.0], dtype=DT), torch.tensor([0.0, T_END], dtype=DT),
                        method="fehlberg2", rtol=1e-6, atol=1e-8)
    assert abs(float(sol.ys[-1, 0]) - exact(T_END)) < 1e-4


@pytest.mark.parametrize("method", ["rk4_38", "heun3"])
def test_fixed_steps_are_torchdiffeqs(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    h = 0.05
    ours = solve_fixed(method, h)
    theirs = torchdiffeq.odeint(field, torch.tensor([1.0], dtype=DT), grid(h),
                                method=TORCHDIFFEQ_NAME[method], options=dict(step_size=h))
    assert float((ours - theirs).abs().max()) < 1e-13


def _torchdiffeq_fehlberg2_fixed(torchdiffeq, h):
    """torchdiffeq's adaptive fehlberg2 held to steps of h: every step accepted (huge
    tolerances), the first of size h, none longer (max_step), each ending on a grid point."""
    t = grid(h)
    return torchdiffeq.odeint(field, torch.tensor([1.0], dtype=DT), t, method="fehlberg2",
                              rtol=1e10, atol=1e10,
                              options=dict(first_step=h, max_step=h, step_t=t[1:-1]))


def test_fehlberg2_steps_as_torchdiffeqs():
    """The first step is torchdiffeq's to round-off. After it torchdiffeq reuses
    f(t_{n+1}, ŷ_{n+1}) (the first-order point) as the next first stage where odegrad evaluates
    f(t_{n+1}, y_{n+1}): the solutions then differ by far less than their errors, and the
    difference shrinks at least like h² (measured here: like h³, 6e-7 at h = 0.1)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    differences = []
    for h in (0.1, 0.05):
        ours, theirs = solve_fixed("fehlberg2", h), _torchdiffeq_fehlberg2_fixed(torchdiffeq, h)
        assert float((ours[1] - theirs[1]).abs().max()) < 1e-14
        differences.append(float((ours - theirs).abs().max()))
        error = float((ours[:, 0] - exact(grid(h))).abs().max())
        assert differences[-1] < 0.01 * error
    assert differences[1] < differences[0] / 4


def test_fehlberg2_adaptive_agrees_with_torchdiffeq_to_the_tolerance():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = torch.linspace(0.0, T_END, 9, dtype=DT)
    y0 = torch.tensor([1.0], dtype=DT)
    ours = odegrad.odeint(field, y0, t, method="fehlberg2", rtol=1e-7, atol=1e-9)
    theirs = torchdiffeq.odeint(field, y0, t, method="fehlberg2", rtol=1e-7, atol=1e-9)
    assert float((ours[:, 0] - exact(t)).abs().max()) < 1e-5
    assert float((ours - theirs).abs().max()) < 1e-5
