"""Dense output: the order of every method's interpolant, dopri8's at its tolerance, and the
interpolant's values at the ends of a step.

Orders, measured on outputs strictly inside steps (θ = 0.3 and 0.7). A dense output of order
p* (error O(h^(p*+1)) in one step from exact data, Hairer–Nørsett–Wanner I §II.6) on a method
of order p gives:

    one step from the exact y_n:   error O(h^(min(p, p*) + 1))
    many steps (global):           error O(h^min(p, p* + 1))

The one-step test uses a nonlinear, non-autonomous problem (a linear one only checks the
order conditions of the tall trees); the global test uses the harmonic oscillator.
"""

import math

import numpy as np
import pytest
import torch

import odegrad
from odegrad.solvers import make_solver
from odegrad.solvers.explicit import ExplicitRungeKutta
from odegrad.tableaus import (
    DOPRI8,
    TABLEAUS,
    ButcherTableau,
    _dense_order_defect,
    _dopri8_extended,
)

DT = torch.float64

# p*: the order each scheme's dense output promises.
DENSE_ORDER = {
    "euler": 1,  # y_n + θh K_1
    "midpoint": 2,
    "heun": 2,
    "rk4": 3,  # Hairer–Nørsett–Wanner II.6
    "bosh3": 3,  # cubic Hermite
    "dopri5": 4,  # Shampine's quartic
    "tsit5": 4,  # Tsitouras' own
    "dopri8": 7,  # tableaus._dopri8_extended
    "rk4_38": 3,  # the unique cubic continuous extension
    "heun3": 2,  # no order-3 extension on its three stages
    "fehlberg2": 2,  # a quadratic on its three stages
    "implicit_euler": 3,  # cubic Hermite through (y_n, K_1), (y_{n+1}, K_s)
    "crank_nicolson": 3,
    "kvaerno3": 3,
    "kvaerno5": 3,
    "alf": 2,  # the leapfrog's quadratic
    "reversible_heun": 2,  # Heun's quadratic
    # ∫ of the Lagrange polynomial through the stored f values; the start-up steps use rk4_38's
    "adams_bashforth": 3,
    "adams_bashforth_moulton": 3,
}
for _name in odegrad.METHODS:  # reversible Runge–Kutta: the base's b_i(θ) on z_n
    if _name.startswith("reversible_") and _name not in DENSE_ORDER:
        DENSE_ORDER[_name] = DENSE_ORDER[_name.removeprefix("reversible_").replace("rk_", "")]

THETAS = (0.3, 0.7)


def steps_for(method: str) -> list[float]:
    """Step sizes in the asymptotic range and well above round-off."""
    return [0.8, 0.6, 0.45] if method.endswith("dopri8") else [0.2, 0.1, 0.05]


def fitted_order(errors, steps) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


# A manufactured solution: y' = u'(t) + g(y) − g(u(t)) has y = u for y(0) = u(0).
def exact_u(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(t) + 1.0, torch.cos(0.5 * t)], -1)


def nonlinear(t, y):
    def g(v):
        return torch.stack([v[0] * v[1], torch.sin(v[0]) + v[1] ** 2])

    du = torch.stack([torch.cos(t), -0.5 * torch.sin(0.5 * t)])
    return du + g(y) - g(exact_u(t))


def oscillator(t, y):
    return torch.stack([y[1], -y[0]])


def exact_oscillator(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(t), -torch.sin(t)], -1)


def interior_error(method, f, exact, h, n_steps) -> float:
    """Max error over outputs at θ = 0.3, 0.7 of each of n_steps fixed steps of size h."""
    inside = [(k + theta) * h for k in range(n_steps) for theta in THETAS]
    t = torch.tensor([0.0, *inside, n_steps * h], dtype=DT)
    ys = odegrad.odeint(f, exact(t[0]), t, method=method, step_size=h, adaptive=False,
                        rtol=1e-12, atol=1e-12)  # (tolerances: implicit schemes' Newton)
    return float((ys[1:-1] - exact(t[1:-1])).abs().max())


@pytest.mark.parametrize("method", sorted(DENSE_ORDER))
def test_dense_output_order_in_one_step(method):
    order, dense = make_solver(method).order, DENSE_ORDER[method]
    steps = steps_for(method)
    errors = [interior_error(method, nonlinear, exact_u, h, 1) for h in steps]
    assert fitted_order(errors, steps) > min(order, dense) + 1 - 0.3, errors


@pytest.mark.parametrize("method", sorted(DENSE_ORDER))
def test_dense_output_order_over_many_steps(method):
    order, dense = make_solver(method).order, DENSE_ORDER[method]
    steps = steps_for(method)
    errors = [interior_error(method, oscillator, exact_oscillator, h, round(2.4 / h))
              for h in steps]
    assert fitted_order(errors, steps) > min(order, dense + 1) - 0.3, errors


def test_every_method_has_a_promised_dense_order():
    assert set(DENSE_ORDER) == set(odegrad.METHODS)


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_dense_order_conditions(name):
    """The algebraic order of each explicit tableau's dense output (the order conditions of
    every rooted tree, at θ in [0, 1]) is the promised one, and not more."""
    tableau, order = TABLEAUS[name], DENSE_ORDER[name]
    assert _dense_order_defect(tableau.a, tableau.dense, order) < 1e-12
    assert _dense_order_defect(tableau.a, tableau.dense, order + 1) > 1e-6


def test_dopri8_interior_outputs_meet_the_tolerance():
    """Harmonic oscillator at rtol = atol = 1e-10, 401 outputs (mostly inside steps): the
    quartic Hermite interpolant it had before missed by 4e-7."""
    t = torch.linspace(0.0, 10.0, 401, dtype=DT)
    sol = odegrad.solve(oscillator, torch.tensor([1.0, 0.0], dtype=DT), t, method="dopri8",
                        rtol=1e-10, atol=1e-10)
    assert sol.stats["n_accepted"] < 100  # so nearly all outputs lie inside steps
    error = float((sol.ys - exact_oscillator(t)).abs().max())
    assert error < 1e-9, error


def test_dopri8_steps_are_rk87_13m_bit_for_bit():
    """The dense-output stages change neither the solution, nor the error estimate, nor the
    stage times of RK8(7)13M: its 13 stages and the FSAL stage, alone, step the same."""
    base = list(range(13)) + [DOPRI8.stages - 1]
    tableau = ButcherTableau(
        name="rk87_13m", c=DOPRI8.c[base], a=DOPRI8.a[np.ix_(base, base)], b=DOPRI8.b[base],
        order=8, error=DOPRI8.error[base], error_order=7, fsal=True,
        dense=np.zeros((len(base), 1)),
    )
    assert not DOPRI8.b[13:].any() and not DOPRI8.error[13:].any()
    extended, plain = make_solver("dopri8"), ExplicitRungeKutta(tableau)
    t, y = torch.tensor(0.0, dtype=DT), exact_u(torch.tensor(0.0, dtype=DT))
    carry = extended.init(nonlinear, t, y)
    for h in (0.3, 0.2, 0.25):
        ours = extended.step(nonlinear, t, h, y, carry)
        theirs = plain.step(nonlinear, t, h, y, carry)
        assert torch.equal(ours.y, theirs.y) and torch.equal(ours.error, theirs.error)
        assert torch.equal(ours.carry, theirs.carry)
        t, y, carry = t + h, ours.y, ours.carry


def test_dopri8_construction_is_checked():
    c, a, b, dense = _dopri8_extended()
    assert dense.shape == (19, 7) and a.shape == (19, 19)
    np.testing.assert_allclose(a.sum(axis=1), c, atol=1e-14)
    np.testing.assert_array_equal(a[-1, :-1], b[:-1])  # the FSAL stage stays last
    assert np.abs(dense).max() < 1e3  # no wild cancellation in the weights


@pytest.mark.parametrize("method", sorted(DENSE_ORDER))
def test_dense_output_matches_the_step_ends(method):
    """At θ = 0 and 1 the interpolant is y_n and y_{n+1} to round-off (second step: the
    reversible schemes' z_n then differs from y_n)."""
    solver = make_solver(method)
    t = torch.tensor(0.0, dtype=DT)
    state = solver.initial_state(exact_u(t))
    carry = solver.init(nonlinear, t, state)
    h = 0.4
    for _ in range(2):
        step = solver.step(nonlinear, t, h, state, carry)
        y_n, y_next = solver.observe(state), solver.observe(step.y)
        start = solver.interpolate(state, h, step.dense, 0.0)
        end = solver.interpolate(state, h, step.dense, 1.0)
        scale = 1e-13 * (1.0 + float(y_next.abs().max()))
        assert float((start - y_n).abs().max()) <= scale
        assert float((end - y_next).abs().max()) <= scale, float((end - y_next).abs().max())
        t, state, carry = t + h, step.y, step.carry
        assert math.isfinite(float(y_next.abs().max()))
