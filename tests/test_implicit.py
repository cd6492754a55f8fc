"""Implicit ESDIRK solvers: tableaus, orders, stiff problems against scipy's Radau, Newton
failures, and the discrete adjoint `step_vjp` against the direct gradient and finite differences.
"""

import math

import numpy as np
import pytest
import torch

import odegrad
from odegrad.errors import InvalidInputError, MaxStepsExceededError, NewtonConvergenceError
from odegrad.problem import Problem
from odegrad.solvers import make_solver
from odegrad.tableaus import DIRK_PREDICTORS, DIRK_TABLEAUS

DT = torch.float64
METHODS = ["implicit_euler", "crank_nicolson", "kvaerno3", "kvaerno5"]


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack(
        [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1
    )


def robertson_np(t, y):
    return [
        -0.04 * y[0] + 1e4 * y[1] * y[2],
        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
        3e7 * y[1] ** 2,
    ]


# --------------------------------------------------------------------------------- tableaus
def _order_conditions(a: np.ndarray, b: np.ndarray) -> dict[int, list[float]]:
    """Residuals of the 17 order conditions up to order 5 (Butcher's rooted trees)."""
    c = a.sum(1)
    ac = a @ c
    return {
        1: [b.sum() - 1],
        2: [b @ c - 1 / 2],
        3: [b @ c**2 - 1 / 3, b @ ac - 1 / 6],
        4: [b @ c**3 - 1 / 4, b @ (c * ac) - 1 / 8, b @ a @ c**2 - 1 / 12, b @ a @ ac - 1 / 24],
        5: [
            b @ c**4 - 1 / 5, b @ (c**2 * ac) - 1 / 10, b @ ac**2 - 1 / 20,
            b @ (c * (a @ c**2)) - 1 / 15, b @ (c * (a @ ac)) - 1 / 30, b @ a @ c**3 - 1 / 20,
            b @ a @ (c * ac) - 1 / 40, b @ a @ a @ c**2 - 1 / 60, b @ a @ a @ ac - 1 / 120,
        ],
    }


@pytest.mark.parametrize("name", METHODS)
def test_dirk_tableau_structure_and_order_conditions(name):
    tab = DIRK_TABLEAUS[name]
    np.testing.assert_allclose(tab.a.sum(1), tab.c, atol=1e-14)
    assert tab.a[0, 0] == 0.0 and np.all(np.triu(tab.a, 1) == 0.0)  # ESDIRK
    diagonal = np.diag(tab.a)[1:]
    assert np.all(diagonal == diagonal[0]) and diagonal[0] > 0  # singly diagonal
    np.testing.assert_array_equal(tab.b, tab.a[-1])  # stiffly accurate
    np.testing.assert_allclose(tab.dense_weights(1.0), tab.b, atol=1e-14)
    for row in DIRK_PREDICTORS[name][1:]:
        assert abs(sum(row) - 1.0) < 1e-12
    conditions = _order_conditions(tab.a, tab.b)
    for order in range(1, tab.order + 1):
        np.testing.assert_allclose(conditions[order], 0.0, atol=1e-14)
    if tab.order < 5:
        assert np.max(np.abs(conditions[tab.order + 1])) > 1e-3
    if tab.error is not None and name.startswith("kvaerno"):
        embedded = _order_conditions(tab.a, tab.b - tab.error)
        for order in range(1, tab.error_order + 1):
            np.testing.assert_allclose(embedded[order], 0.0, atol=1e-14)
        assert np.max(np.abs(embedded[tab.error_order + 1])) > 1e-4


def test_kvaerno_stability_is_l_stable():
    """R(z) = 1 + z bᵀ(I − zA)⁻¹1 → 0 as z → −∞ and |R| ≤ 1 on the imaginary axis."""
    for name in ["implicit_euler", "kvaerno3", "kvaerno5"]:
        tab = DIRK_TABLEAUS[name]
        one = np.ones(tab.stages)

        def r(z, tab=tab, one=one):
            return 1 + z * tab.b @ np.linalg.solve(np.eye(tab.stages) - z * tab.a, one)

        assert abs(r(-1e8)) < 1e-6
        assert max(abs(r(1j * w)) for w in np.logspace(-2, 4, 50)) <= 1 + 1e-12


# ----------------------------------------------------------------------------- convergence
def smooth_field(t, y):
    a, b = y.unbind(-1)
    return torch.stack([a * (1 - a), -2 * t * b**2], -1)


def smooth_exact(t: float) -> torch.Tensor:
    return torch.tensor([1 / (1 + math.exp(-t)), 1 / (1 + t**2)], dtype=DT)


ORDER_STEPS = {
    "implicit_euler": [0.02, 0.01, 0.005],
    "crank_nicolson": [0.1, 0.05, 0.025],
    "kvaerno3": [0.1, 0.05, 0.025],
    "kvaerno5": [0.2, 0.1, 0.05],
}


@pytest.mark.parametrize("name", METHODS)
def test_convergence_order(name):
    t = torch.tensor([0.0, 2.0], dtype=DT)
    errors = []
    for h in ORDER_STEPS[name]:
        with torch.no_grad():
            ys = odegrad.odeint(
                smooth_field, smooth_exact(0.0), t, method=name, step_size=h, adaptive=False,
                rtol=1e-13, atol=1e-13,
            )
        errors.append(float((ys[-1] - smooth_exact(2.0)).abs().max()))
    order = float(np.polyfit(np.log(ORDER_STEPS[name]), np.log(errors), 1)[0])
    assert abs(order - DIRK_TABLEAUS[name].order) < 0.3, (errors, order)


def test_theta_methods_take_fixed_steps_by_default_and_adapt_on_request():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y0 = smooth_exact(0.0)
    fixed = odegrad.solve(smooth_field, y0, t, method="crank_nicolson", step_size=0.1)
    assert fixed.stats["n_steps"] == 10
    # The propagated solution is the one whose local error is estimated (no local
    # extrapolation), so the global error is a multiple of rtol that shrinks with it.
    for name in ["crank_nicolson", "implicit_euler"]:
        errors = []
        for rtol in [1e-4, 1e-6]:
            with torch.no_grad():
                sol = odegrad.solve(
                    smooth_field, y0, t, method=name, adaptive=True, rtol=rtol, atol=rtol
                )
            errors.append(float((sol.ys[-1] - smooth_exact(1.0)).abs().max()))
            assert errors[-1] < 100 * rtol and sol.stats["n_accepted"] < 1000, (name, sol.stats)
        assert errors[1] < errors[0] / 5, errors


def test_dense_outputs_do_not_force_steps():
    y0 = smooth_exact(0.0)
    with torch.no_grad():
        coarse = odegrad.solve(smooth_field, y0, torch.tensor([0.0, 3.0], dtype=DT),
                               method="kvaerno5", rtol=1e-8, atol=1e-8)
        fine = odegrad.solve(smooth_field, y0, torch.linspace(0, 3, 31, dtype=DT),
                             method="kvaerno5", rtol=1e-8, atol=1e-8)
    assert fine.stats["n_accepted"] == coarse.stats["n_accepted"]
    torch.testing.assert_close(fine.ys[-1], coarse.ys[-1], rtol=1e-13, atol=1e-13)
    exact = torch.stack([smooth_exact(float(s)) for s in torch.linspace(0, 3, 31)])
    assert float((fine.ys - exact).abs().max()) < 1e-5  # the cubic Hermite interpolant


# ------------------------------------------------------------------------------ stiff problems
def test_robertson_kvaerno5_matches_radau():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    times = np.array([0.0, 1e-3, 1e-1, 10.0, 1e3, 1e5])
    reference = scipy_integrate.solve_ivp(
        robertson_np, (0.0, 1e5), [1.0, 0.0, 0.0], method="Radau", rtol=1e-10, atol=1e-14,
        t_eval=times,
    ).y.T
    with torch.no_grad():
        sol = odegrad.solve(
            robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT), torch.tensor(times, dtype=DT),
            method="kvaerno5", rtol=1e-6, atol=1e-10,
        )
    relative = np.abs(sol.ys.numpy()[1:] - reference[1:]) / np.abs(reference[1:])
    assert relative.max() < 1e-4, relative
    # dopri5 needs ~3e8 steps here (stability limits h to ~3e-4 once y3 ~ 1; see
    # benchmarks/RESULTS.md §5); kvaerno5 needs ~100.
    assert sol.stats["n_accepted"] < 300, sol.stats


def test_dopri5_on_robertson_says_stiff():
    with pytest.raises(MaxStepsExceededError, match="stiff") as info:
        odegrad.odeint(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT),
                       torch.tensor([0.0, 1e5], dtype=DT), method="dopri5", max_steps=300)
    assert "kvaerno5" in str(info.value)


def van_der_pol(t, y, mu=1000.0):
    x, v = y.unbind(-1)
    return torch.stack([v, mu * (1 - x**2) * v - x], -1)


@pytest.mark.slow
def test_van_der_pol_kvaerno5_matches_radau():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    times = np.linspace(0.0, 3000.0, 7)
    reference = scipy_integrate.solve_ivp(
        lambda t, y: [y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 3000.0), [2.0, 0.0],
        method="Radau", rtol=1e-10, atol=1e-12, t_eval=times,
    ).y.T
    with torch.no_grad():
        sol = odegrad.solve(van_der_pol, torch.tensor([2.0, 0.0], dtype=DT),
                            torch.tensor(times, dtype=DT), method="kvaerno5", rtol=1e-6,
                            atol=1e-10)
    relative = np.abs(sol.ys.numpy()[1:] - reference[1:]) / np.abs(reference[1:])
    assert relative.max() < 1e-4, relative
    assert sol.stats["n_accepted"] < 1500, sol.stats


@pytest.mark.slow
def test_kvaerno5_takes_far_fewer_steps_than_dopri5_on_robertson():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    t = torch.tensor([0.0, 40.0], dtype=DT)
    with torch.no_grad():
        implicit = odegrad.solve(robertson, y0, t, method="kvaerno5", rtol=1e-6, atol=1e-10)
        explicit = odegrad.solve(robertson, y0, t, method="dopri5", rtol=1e-6, atol=1e-10,
                                 max_steps=200_000)
    torch.testing.assert_close(implicit.ys[-1], explicit.ys[-1], rtol=1e-4, atol=1e-10)
    assert 100 * implicit.stats["n_accepted"] < explicit.stats["n_accepted"]


def test_gmres_forward_matches_dense_on_robertson():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    t = torch.tensor([0.0, 1.0, 100.0], dtype=DT)
    with torch.no_grad():
        dense = odegrad.odeint(robertson, y0, t, method="kvaerno3", rtol=1e-6, atol=1e-10,
                               linear_solver="dense")
        krylov = odegrad.odeint(robertson, y0, t, method="kvaerno3", rtol=1e-6, atol=1e-10,
                                linear_solver="gmres")
    torch.testing.assert_close(krylov, dense, rtol=1e-5, atol=1e-10)


def test_unknown_linear_solver():
    with pytest.raises(InvalidInputError, match="linear_solver"):
        odegrad.odeint(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT),
                       torch.tensor([0.0, 1.0], dtype=DT), method="kvaerno5",
                       linear_solver="cholesky")


# ----------------------------------------------------------------------------- Newton failure
def square(t, y):
    return y**2


def test_newton_failure_on_a_fixed_step_names_t_and_h():
    # Implicit Euler on y' = y², y(0) = 1, h = 0.4: Y − 0.4 Y² = 1 has no real root.
    with pytest.raises(NewtonConvergenceError, match=r"t=0 .*h=4\.000e-01"):
        odegrad.odeint(square, torch.tensor([1.0], dtype=DT), torch.tensor([0.0, 0.4], dtype=DT),
                       method="implicit_euler")


def test_newton_failure_shrinks_an_adaptive_step():
    sol = odegrad.solve(square, torch.tensor([1.0], dtype=DT),
                        torch.tensor([0.0, 0.5], dtype=DT), method="implicit_euler",
                        adaptive=True, step_size=0.4, rtol=1e-4, atol=1e-4)
    assert sol.stats["n_rejected"] >= 1
    assert abs(float(sol.ys[-1, 0]) - 2.0) < 0.05  # y = 1/(1 − t); first order, no extrapolation


class _WrongJacobian(torch.autograd.Function):
    """y ↦ −1e8 y with a backward of the wrong sign: Newton's matrix becomes I − hγ·1e8
    instead of I + hγ·1e8, and the iteration diverges unless hγ·1e8 ≲ 1."""

    @staticmethod
    def forward(ctx, y):
        return -1e8 * y

    @staticmethod
    def backward(ctx, grad):
        return 1e8 * grad


def test_repeated_newton_failure_raises():
    # Ten shrinkings by 4 from h = 1 leave h ≈ 1e-6, still far from convergent.
    with pytest.raises(NewtonConvergenceError, match=r"t=0 with step size h=9\.5"):
        odegrad.odeint(lambda t, y: _WrongJacobian.apply(y), torch.tensor([1.0], dtype=DT),
                       torch.tensor([0.0, 1.0], dtype=DT), method="kvaerno3", step_size=1.0)


# --------------------------------------------------------------------- gradients: step_vjp
class StiffField(torch.nn.Module):
    """−exp(log_k) ⊙ y plus a small tanh MLP in (t, y): stiffness ratio e^5 ≈ 150."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, 8, dtype=DT)
        self.l2 = torch.nn.Linear(8, dim, dtype=DT)
        self.log_k = torch.nn.Parameter(torch.linspace(1.0, 5.0, dim, dtype=DT))

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1)
        return -torch.exp(self.log_k) * y + self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


def make_problem(method, adaptive, rtol=1e-8, y0=None, **options):
    f = StiffField()
    if y0 is None:
        y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    y0 = y0.clone().requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 0.75, 1.0], dtype=DT)
    return Problem(
        f=f, y0=y0, t=t, solver=make_solver(method, **options), params=tuple(f.parameters()),
        rtol=rtol, atol=rtol * 1e-2, step_size=None if adaptive else 0.1, adaptive=adaptive,
    )


def loss_weights(problem):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(len(problem.t), *problem.y0.shape, dtype=DT, generator=generator)


def step_vjp_gradient(problem, weights):
    """Chain solver.step_vjp backwards over a recorded trajectory, L = Σ_i <w_i, y(t_i)>."""
    records = []
    with torch.no_grad():
        _, trajectory = problem.integrate(on_step=lambda r, y, s: records.append((r, y, s)))
    end_bars = [None] * len(records)
    dense_bars = [[] for _ in records]
    lam = torch.zeros_like(problem.y0)
    initial_bar = torch.zeros_like(problem.y0)
    for out in trajectory.outputs:
        w = weights[out.index]
        if out.step < 0:
            initial_bar = initial_bar + w
        elif out.at_step_end:
            end_bars[out.step] = w if end_bars[out.step] is None else end_bars[out.step] + w
        else:
            dense_bars[out.step].append((out.theta, w))
    mu = [torch.zeros_like(p) for p in problem.params]
    for n in reversed(range(len(records))):
        record, y, step = records[n]
        if end_bars[n] is not None:
            lam = lam + end_bars[n]
        t_n = torch.tensor(record.t, dtype=DT)
        lam, parts = problem.solver.step_vjp(
            problem.f, t_n, record.h, y, step, lam, dense_bars[n], problem.params
        )
        mu = [m if p is None else m + p for m, p in zip(mu, parts)]
    return [lam + initial_bar] + mu, len(records)


def direct_gradient(problem, weights):
    ys = torch.stack(problem.integrate()[0])
    return list(torch.autograd.grad((ys * weights).sum(), (problem.y0, *problem.params)))


def relative_error(ours, reference):
    return max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(ours, reference))


ADAPTIVE_RTOL = {"implicit_euler": 1e-3, "crank_nicolson": 1e-5, "kvaerno3": 1e-5,
                 "kvaerno5": 1e-7}


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("name", METHODS)
def test_step_vjp_equals_direct_gradient(name, adaptive, linear_solver):
    rtol = ADAPTIVE_RTOL[name] if adaptive else 1e-8
    problem = make_problem(name, adaptive, rtol=rtol, linear_solver=linear_solver)
    weights = loss_weights(problem)
    ours, n_steps = step_vjp_gradient(problem, weights)
    reference = direct_gradient(problem, weights)
    assert n_steps == problem.stats["n_accepted"]
    assert relative_error(ours, reference) < 1e-8


def finite_difference(problem, weights, which, eps=1e-6):
    """Central differences of L w.r.t. y0 (which = -1) or the log_k parameter."""
    f = problem.f
    target = problem.y0.detach().clone() if which < 0 else f.log_k
    grads = torch.zeros_like(target)
    for j in range(target.numel()):
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                if which < 0:
                    y0 = target.clone()
                    y0[j] += sign * eps
                    ys = torch.stack(problem.integrate(y0=y0)[0])
                else:
                    target[j] += sign * eps
                    ys = torch.stack(problem.integrate()[0])
                    target[j] -= sign * eps
            values.append(float((ys * weights).sum()))
        grads[j] = (values[0] - values[1]) / (2 * eps)
    return grads


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
@pytest.mark.parametrize("name", ["crank_nicolson", "kvaerno5"])
def test_step_vjp_agrees_with_finite_differences(name, linear_solver):
    # Fixed steps and a tight Newton tolerance, so that L is smooth in y0 and log_k.
    problem = make_problem(name, adaptive=False, rtol=1e-13, linear_solver=linear_solver)
    weights = loss_weights(problem)
    ours, _ = step_vjp_gradient(problem, weights)
    k_index = [i for i, p in enumerate(problem.params) if p is problem.f.log_k][0]
    tolerance = 1e-7 if linear_solver == "dense" else 1e-5  # GMRES: inexact Newton steps
    for which, grad in [(-1, ours[0]), (k_index, ours[1 + k_index])]:
        fd = finite_difference(problem, weights, which)
        assert float((grad - fd).norm() / fd.norm()) < tolerance, (which, grad, fd)


@pytest.mark.parametrize("name", ["crank_nicolson", "kvaerno5"])
def test_batch_independent_blocks(name):
    y0 = torch.randn(4, 3, dtype=DT)
    full = make_problem(name, adaptive=False, y0=y0, linear_solver="dense")
    blocks = make_problem(name, adaptive=False, y0=y0, linear_solver="dense",
                          batch_independent=True)
    blocks.f.load_state_dict(full.f.state_dict())
    with torch.no_grad():
        ys_full = torch.stack(full.integrate()[0])
        ys_blocks = torch.stack(blocks.integrate()[0])
    torch.testing.assert_close(ys_blocks, ys_full, rtol=1e-10, atol=1e-12)
    weights = loss_weights(blocks)
    ours, _ = step_vjp_gradient(blocks, weights)
    assert relative_error(ours, direct_gradient(blocks, weights)) < 1e-8


def test_direct_gradient_through_the_api_matches_gradcheck():
    f = StiffField()

    def run(y0, log_k):
        def field(t, y):
            return -torch.exp(log_k) * y + f.l2(torch.tanh(f.l1(torch.cat([y, t.expand(1)]))))

        return odegrad.odeint(field, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT),
                              method="kvaerno3", step_size=0.125, adaptive=False,
                              rtol=1e-13, atol=1e-13)

    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT, requires_grad=True)
    log_k = torch.tensor([0.5, 1.5, 2.5], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, log_k), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_direct_gradient_with_respect_to_times():
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    f = StiffField()
    weights = torch.randn(3, 3, dtype=DT)

    def loss(t):
        ys = odegrad.odeint(f, y0, t, method="kvaerno5", step_size=0.15, adaptive=False,
                            rtol=1e-13, atol=1e-13)
        return (ys * weights).sum()

    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(t), t)
    eps = 1e-6
    for j in range(3):
        shift = torch.zeros(3, dtype=DT)
        shift[j] = eps
        with torch.no_grad():
            fd = (loss(t + shift) - loss(t - shift)) / (2 * eps)
        assert abs(float(grad[j]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), (j, grad, fd)


@pytest.mark.parametrize(
    "name, linear_solver, adaptive, checkpoints",
    [
        ("implicit_euler", "dense", False, "solution"),
        ("crank_nicolson", "dense", True, 3),
        ("crank_nicolson", "gmres", False, "all"),
        ("kvaerno3", "gmres", True, "solution"),
        ("kvaerno5", "dense", True, "all"),
        ("kvaerno5", "dense", True, 2),
    ],
)
def test_discrete_gradient_through_the_api(name, linear_solver, adaptive, checkpoints):
    """gradient="discrete" (which calls step_vjp, replaying steps from checkpoints) equals the
    direct gradient: a replay reproduces each accepted step exactly."""
    if "discrete" not in odegrad.GRADIENTS:
        pytest.skip("gradient='discrete' is not installed")
    f = StiffField()
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.75, 1.0], dtype=DT)
    weights = torch.randn(4, 3, dtype=DT)
    options = dict(adaptive=True, rtol=1e-5, atol=1e-7) if adaptive else dict(step_size=0.1)
    grads = []
    for gradient in ["direct", "discrete"]:
        extra = {"checkpoints": checkpoints} if gradient == "discrete" else {}
        sol = odegrad.solve(f, y0, t, method=name, gradient=gradient,
                            linear_solver=linear_solver, **options, **extra)
        grads.append(torch.autograd.grad((sol.ys * weights).sum(), (y0, *f.parameters())))
    assert relative_error(grads[1], grads[0]) < 1e-10
    assert sol.stats["nfe_backward"] > 0


class VanDerPol(torch.nn.Module):
    """y'' = μ((1 − y²) y' − y) as a first-order system, μ a parameter."""

    def __init__(self, mu: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=DT))

    def forward(self, t, y):
        return torch.stack([y[1], self.mu * ((1 - y[0] ** 2) * y[1] - y[0])])


@pytest.mark.parametrize("checkpoints", [2, "solution"])
def test_discrete_gradient_replays_rejected_attempts(checkpoints):
    """Rejected steps (Newton failures and error-test failures) hand their refreshed Jacobian
    to the retry; the discrete adjoint recomputes a step by replaying the rejected attempts
    recorded on it (StepRecord.rejected), so its gradient still equals the direct one."""
    f = VanDerPol(50.0)
    y0 = torch.tensor([2.0, 0.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    weights = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    options = dict(method="kvaerno5", rtol=1e-6, atol=1e-8, step_size=0.2, newton_max_iters=2)
    grads, stats = [], []
    for gradient in ["direct", "discrete"]:
        extra = {"checkpoints": checkpoints} if gradient == "discrete" else {}
        sol = odegrad.solve(f, y0, t, gradient=gradient, **options, **extra)
        grads.append(torch.autograd.grad((sol.ys * weights).sum(), (y0, *f.parameters())))
        stats.append(sol.stats)
    assert stats[0]["n_rejected"] >= 5 and stats[0]["n_accepted"] == stats[1]["n_accepted"]
    assert relative_error(grads[1], grads[0]) < 1e-12


def test_step_records_list_the_rejected_step_sizes():
    problem = Problem(
        f=VanDerPol(50.0), y0=torch.tensor([2.0, 0.0], dtype=DT),
        t=torch.tensor([0.0, 1.0], dtype=DT), solver=make_solver("kvaerno5"), rtol=1e-6,
        atol=1e-8, step_size=0.2, adaptive=True,
    )
    with torch.no_grad():
        _, trajectory = problem.integrate()
    rejected = [h for record in trajectory.steps for h in record.rejected]
    assert len(rejected) == problem.stats["n_rejected"] > 0
    assert trajectory.steps[0].rejected[0] == 0.2  # the first try, at the requested size
    for record in trajectory.steps:  # every retry from t_n is smaller than the last try
        sizes = [*record.rejected, record.h]
        assert all(abs(b) < abs(a) for a, b in zip(sizes, sizes[1:]))


class CountingPreconditioner:
    """P(v) = v / (1 + shift·k) with `diagonal=True`: the exact inverse of I − shift·J for
    J = −diag(k), the stiff part of StiffField; else P = I (plain GMRES). Counts its
    applications in the forward solves and, through P.transposed, in the transposed ones."""

    def __init__(self, field: StiffField, diagonal: bool):
        self.field, self.diagonal = field, diagonal
        self.calls = {"forward": 0, "transposed": 0}

    def __call__(self, t, y, shift):
        scale = 1.0 + shift * torch.exp(self.field.log_k.detach()) if self.diagonal else 1.0

        def inverse(v):
            self.calls["forward"] += 1
            return v / scale

        def transposed(v):
            self.calls["transposed"] += 1
            return v / scale

        inverse.transposed = transposed
        return inverse


def test_gmres_preconditioner_same_solution_fewer_iterations_and_exact_gradient():
    """A user preconditioner for the matrix-free Newton–Krylov path changes GMRES's work, not
    the solution (to Newton's tolerance) nor the discrete gradient (= direct, to 1e-8); the
    transposed stage solves use P.transposed. An identity P counts plain GMRES's iterations."""
    f = StiffField(dim=6)
    with torch.no_grad():
        f.log_k.copy_(torch.linspace(1.0, 8.0, 6, dtype=DT))  # stiffness ratio e^7 ≈ 1100
    y0 = torch.linspace(-1.0, 1.0, 6, dtype=DT).repeat(4, 1).requires_grad_(True)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    weights = torch.randn(3, 4, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    plain, diagonal = CountingPreconditioner(f, False), CountingPreconditioner(f, True)
    options = dict(method="kvaerno5", rtol=1e-7, atol=1e-9, linear_solver="gmres")
    results = {}
    for name, preconditioner in (("identity", plain), ("diagonal", diagonal)):
        for gradient in ("direct", "discrete"):
            sol = odegrad.solve(f, y0, t, gradient=gradient, preconditioner=preconditioner,
                                **options)
            grads = torch.autograd.grad((sol.ys * weights).sum(), (y0, *f.parameters()))
            results[name, gradient] = (sol.ys.detach(), grads)
    ys_plain, _ = results["identity", "direct"]
    ys_pre, grads_direct = results["diagonal", "direct"]
    assert float((ys_pre - ys_plain).norm() / ys_plain.norm()) < 1e-6
    assert relative_error(results["diagonal", "discrete"][1], grads_direct) < 1e-8
    assert relative_error(grads_direct, results["identity", "direct"][1]) < 1e-5
    # GMRES iterations (+1 per solve) over both gradients' solves, forward and transposed:
    # measured 12492 vs 19982 and 11152 vs 15180 (2026-11-22).
    for kind in ("forward", "transposed"):
        assert 0 < diagonal.calls[kind] < 0.8 * plain.calls[kind], (diagonal.calls, plain.calls)


def test_preconditioner_must_be_callable():
    with pytest.raises(InvalidInputError, match="preconditioner must be a callable"):
        odegrad.solve(StiffField(), torch.zeros(3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                      method="kvaerno5", linear_solver="gmres", preconditioner="jacobi")
