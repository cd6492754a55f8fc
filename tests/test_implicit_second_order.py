"""Implicit solvers: second derivatives through the stage solves (gradient="direct"), one
consumer per option name, and the errors of degenerate inputs (an empty state, f turning
non-finite in time).

Second derivatives are checked against closed forms (a linear f, where an implicit Euler or
Crank–Nicolson step is a matrix inverse written with torch.linalg.solve under plain autograd)
and against central differences of first-order gradients (float64, fixed steps, Newton solved
to round-off so that the discrete map is smooth).
"""

import importlib
import inspect
import math
import pkgutil
import time

import pytest
import torch

import odegrad
import odegrad.gradients
from odegrad.errors import NonFiniteError, UnsupportedCombinationError
from odegrad.loop import integrate
from odegrad.solvers import SOLVERS, make_solver

DT = torch.float64
METHODS = ["implicit_euler", "crank_nicolson", "kvaerno3", "kvaerno5"]
TIGHT = dict(rtol=1e-13, atol=1e-13)  # Newton to round-off: the discrete map is smooth


# ---------------------------------------------------------------------- closed forms
def _linear_problem():
    generator = torch.Generator().manual_seed(3)
    a = -torch.eye(3, dtype=DT) * 2.0 + 0.4 * torch.randn(3, 3, dtype=DT, generator=generator)
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    weights = torch.randn(4, 3, dtype=DT, generator=generator)
    return torch.cat([a.reshape(-1), y0]), weights


def _unpack(theta):
    return theta[:9].reshape(3, 3), theta[9:]


@pytest.mark.parametrize("name, theta_weight", [("implicit_euler", 1.0), ("crank_nicolson", 0.5)])
def test_theta_method_hessian_matches_the_closed_form(name, theta_weight):
    """y' = A y: one θ-method step is y ↦ (I − θhA)^{-1}(I + (1−θ)hA) y. The Hessian of a loss
    of the outputs in (A, y0) through odegrad's stages equals the one of that formula."""
    theta0, weights = _linear_problem()
    t = torch.tensor([0.0, 0.2, 0.4, 0.6], dtype=DT)
    h = 0.1
    eye = torch.eye(3, dtype=DT)

    def loss(theta):
        a, y0 = _unpack(theta)
        ys = odegrad.odeint(lambda t, y: a @ y, y0, t, method=name, step_size=h,
                            linear_solver="dense", **TIGHT)
        return (weights * ys).sum() + (ys**3).sum()

    def reference(theta):
        a, y = _unpack(theta)
        ys = [y]
        for _ in range(3):
            for _ in range(2):
                y = torch.linalg.solve(eye - theta_weight * h * a,
                                       (eye + (1 - theta_weight) * h * a) @ y)
            ys.append(y)
        ys = torch.stack(ys)
        return (weights * ys).sum() + (ys**3).sum()

    ours = torch.autograd.functional.hessian(loss, theta0)
    expected = torch.autograd.functional.hessian(reference, theta0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours, ours.T, rtol=1e-9, atol=1e-10)  # a Hessian is symmetric


# ------------------------------------------------------- against differences of gradients
def _mlp_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    w1 = 0.5 * torch.randn(8, 3, dtype=DT, generator=generator)
    w2 = 0.5 * torch.randn(3, 8, dtype=DT, generator=generator)
    log_k = torch.tensor([0.5, 1.5, 2.5], dtype=DT)  # a stiff linear decay under the MLP
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    weights = torch.randn(3, 3, dtype=DT, generator=generator)
    direction = torch.randn(54, dtype=DT, generator=generator)
    return torch.cat([w1.reshape(-1), w2.reshape(-1), log_k, y0]), weights, direction


def _mlp_field(theta):
    w1, w2, log_k = theta[:24].reshape(8, 3), theta[24:48].reshape(3, 8), theta[48:51]

    def f(t, y):
        return -torch.exp(log_k) * y + torch.tanh(y @ w1.T + t) @ w2.T

    return f


def _mlp_loss(name, weights, t=None, **options):
    t = torch.tensor([0.0, 0.35, 1.0], dtype=DT) if t is None else t

    def loss(theta):
        ys = odegrad.odeint(_mlp_field(theta), theta[51:], t, method=name, step_size=0.1,
                            adaptive=False, **TIGHT, **options)
        return (weights * ys).sum() + (ys**2).sum()

    return loss


def _gradient(loss, theta):
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(loss(theta), theta)[0]


def _hvp_error(loss, theta0, direction, create_graph=False, eps=1e-5):
    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    (hvp,) = torch.autograd.grad(grad @ direction, theta, create_graph=create_graph)
    fd = (_gradient(loss, theta0 + eps * direction)
          - _gradient(loss, theta0 - eps * direction)) / (2 * eps)
    return float((hvp.detach() - fd).norm() / fd.norm())


@pytest.mark.parametrize("name", METHODS)
def test_hessian_vector_product_matches_differences_of_gradients(name):
    """Before the second Newton level these were 1.7 % (kvaerno5) to 7.8 % (implicit_euler)
    off; the differences of gradients themselves are good to ~1e-10."""
    theta0, weights, direction = _mlp_problem()
    loss = _mlp_loss(name, weights, linear_solver="dense")
    assert _hvp_error(loss, theta0, direction) < 1e-7


def test_second_derivatives_in_a_graph_building_pass_and_with_blocks():
    """The second pass may itself build a graph (hvp with create_graph=True: the anchor's
    solve is then called with grad enabled); per-sample LU blocks give the same numbers."""
    theta0, weights, direction = _mlp_problem(seed=1)
    loss = _mlp_loss("kvaerno3", weights, linear_solver="dense")
    assert _hvp_error(loss, theta0, direction, create_graph=True) < 1e-7

    batched_weights = weights.unsqueeze(1).expand(3, 2, 3)

    def batched_loss(theta):
        y0 = torch.stack([theta[51:], 0.5 * theta[51:]])
        ys = odegrad.odeint(_mlp_field(theta), y0, torch.tensor([0.0, 0.35, 1.0], dtype=DT),
                            method="crank_nicolson", step_size=0.1, adaptive=False,
                            linear_solver="dense", batch_independent=True, **TIGHT)
        return (batched_weights * ys).sum() + (ys**2).sum()

    assert _hvp_error(batched_loss, theta0, direction) < 1e-7


def test_second_derivative_with_respect_to_times():
    """Stage times and hγ carry a graph when t is differentiated: d²L/dt_j² and the mixed
    terms against differences of the first-order time gradient."""
    theta0, weights, _ = _mlp_problem()
    f = _mlp_field(theta0)

    def loss(t):
        ys = odegrad.odeint(f, theta0[51:], t, method="kvaerno5", step_size=0.15,
                            adaptive=False, linear_solver="dense", **TIGHT)
        return (weights * ys).sum() + (ys**2).sum()

    t0 = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    ours = torch.autograd.functional.hessian(loss, t0)
    eps = 1e-5
    for j in range(3):
        shift = torch.zeros(3, dtype=DT)
        shift[j] = eps
        fd = (_gradient(loss, t0 + shift) - _gradient(loss, t0 - shift)) / (2 * eps)
        torch.testing.assert_close(ours[j], fd, rtol=1e-6, atol=1e-7)


def test_gmres_refuses_double_backward_and_names_the_dense_solver():
    theta0, weights, _ = _mlp_problem()
    loss = _mlp_loss("kvaerno5", weights, linear_solver="gmres")
    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(theta), theta)  # first order: still served
    assert torch.isfinite(grad).all()
    with pytest.raises(UnsupportedCombinationError, match='linear_solver="dense"'):
        torch.autograd.grad(loss(theta), theta, create_graph=True)


def test_auto_solver_switches_to_gmres_above_the_dense_limit_and_refuses_too():
    y0 = torch.linspace(0.5, 1.5, 130, dtype=DT)
    rate = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def loss():
        ys = odegrad.odeint(lambda t, y: -rate * y, y0, torch.tensor([0.0, 0.2], dtype=DT),
                            method="implicit_euler", step_size=0.1)
        return ys.pow(2).sum()

    with pytest.raises(UnsupportedCombinationError, match="GMRES"):
        torch.autograd.grad(loss(), rate, create_graph=True)


# ------------------------------------------------------------------ one consumer per option
def _gradient_options() -> dict[str, set[str]]:
    options = {}
    for info in pkgutil.iter_modules(odegrad.gradients.__path__):
        module = importlib.import_module(f"odegrad.gradients.{info.name}")
        if hasattr(module, "OPTIONS"):
            options[info.name] = set(module.OPTIONS)
    return options


def _solver_options() -> dict[str, set[str]]:
    options = {}
    for name, factory in SOLVERS.items():
        options[name] = {
            p.name for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "tableau"
        }
    return options


# `coupling` is the one name both sides declare, on purpose: it is the same λ of
# McCallum–Foster reversible Runge–Kutta, read by `method="reversible_<base>"` (the solver) or
# by gradient="reversible" when it wraps a plain explicit method, and that gradient steps aside
# (`options_for`) next to a method that takes it: one consumer per (method, gradient) pair.
SHARED_ON_PURPOSE = {"coupling"}


def test_every_option_name_has_exactly_one_consumer():
    """Solver factories' keywords against every gradient module's declared OPTIONS (not only
    the per-pair view, which a module's `options_for` could narrow): an option both took went
    to the solver silently (implicit methods took `adjoint_rtol`, which with
    gradient="backsolve" then never reached the adjoint solve)."""
    declared = _gradient_options()
    gradient = set().union(*declared.values())
    loop = {"first_step", "adaptive", "norm"}
    assert {"adjoint_rtol", "checkpoints", "count_graph_bytes"} <= gradient  # found them
    for method, names in _solver_options().items():
        assert not names & loop, (method, names & loop)
        clash = names & gradient - SHARED_ON_PURPOSE
        assert not clash, f"method {method!r} and a gradient method both take {sorted(clash)}"
        for module_name, options in declared.items():
            module = importlib.import_module(f"odegrad.gradients.{module_name}")
            shared = names & options
            assert not shared & set(odegrad.gradients.gradient_options(module, names)), (
                method, module_name, shared)
    assert not gradient & loop


def test_adjoint_rtol_reaches_the_continuous_adjoint_with_an_implicit_method():
    layer = torch.nn.Linear(2, 2, dtype=DT)

    def f(t, y):
        return layer(y)

    y0 = torch.tensor([1.0, -1.0], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    params = tuple(layer.parameters())
    assert "adjoint_rtol" not in _solver_options()["kvaerno5"]
    assert "transposed_rtol" in _solver_options()["kvaerno5"]
    # The adjoint's validator sees it (before, the solver took it and nothing complained).
    with pytest.raises(odegrad.errors.InvalidInputError, match="adjoint_rtol"):
        odegrad.odeint(f, y0, t, method="kvaerno5", gradient="backsolve", params=params,
                       adjoint_rtol=-1.0)
    with pytest.raises(odegrad.errors.UnknownNameError, match="transposed_rtol"):
        odegrad.odeint(f, y0, t, method="kvaerno5", gradient="direct", adjoint_rtol=1e-8)
    solver = make_solver("kvaerno5", transposed_rtol=1e-9)
    assert solver.transposed_rtol == 1e-9


# ----------------------------------------------------------------------- degenerate inputs
@pytest.mark.parametrize("options", [dict(), dict(linear_solver="gmres"),
                                     dict(batch_independent=True)])
@pytest.mark.parametrize("name", ["implicit_euler", "kvaerno5"])
def test_an_empty_state_is_solved_as_it_stands(name, options):
    """The solver on an empty state (the API refuses one before): empty outputs, no Newton
    failure, and empty gradients."""
    y0 = torch.zeros(0, 3, dtype=DT, requires_grad=True)
    rate = torch.tensor(2.0, dtype=DT, requires_grad=True)
    outputs, _ = integrate(lambda t, y: -rate * y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT),
                           make_solver(name, **options), step_size=0.1, adaptive=False)
    ys = torch.stack(outputs)
    assert ys.shape == (3, 0, 3)
    grad_y0, grad_rate = torch.autograd.grad(ys.sum(), (y0, rate), allow_unused=True)
    assert grad_y0.shape == (0, 3)
    assert grad_rate is None or float(grad_rate) == 0.0


def _nan_after_half(t, y):
    bad = torch.tensor(float("nan"), dtype=y.dtype)
    return -y * torch.where(t > 0.5, bad, torch.ones((), dtype=y.dtype))


@pytest.mark.parametrize("options", [
    dict(method="kvaerno5"),
    dict(method="kvaerno5", linear_solver="gmres"),
    dict(method="kvaerno3"),
    dict(method="kvaerno5", step_size=0.1, adaptive=False),
    dict(method="implicit_euler", step_size=0.1),
    dict(method="crank_nicolson", adaptive=True),
])
def test_f_turning_non_finite_in_time_raises_non_finite_error_fast(options):
    """Before: an adaptive kvaerno5 shrank its steps towards t = 0.5 for seconds and reported
    a step-size underflow ("stiff or singular"); fixed steps a Newton failure."""
    y0 = torch.ones(3, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    odegrad.odeint(lambda t, y: -y, y0, t, **options)  # warm up (vmap, first calls)
    start = time.perf_counter()
    with pytest.raises(NonFiniteError, match=r"f returned a non-finite value at t=0\.[5-9]"):
        odegrad.odeint(_nan_after_half, y0, t, **options)
    assert time.perf_counter() - start < 1.0


def test_f_non_finite_at_the_start_names_the_start():
    def f(t, y):
        return y / torch.zeros_like(y) * 0.0

    with pytest.raises(NonFiniteError, match="f returned a non-finite value at t=0 "):
        odegrad.odeint(f, torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       method="kvaerno5")


def test_an_iterate_outside_f_s_domain_is_still_retried_with_a_smaller_step():
    """f is nan for y < 0 only: large steps overshoot there in Newton, smaller ones do not.
    That is the iteration's fault, not f's at the step's start: the step is rejected, the
    solve goes on."""

    def f(t, y):
        return -50.0 * torch.sqrt(y) ** 2

    sol = odegrad.solve(f, torch.ones(2, dtype=DT), torch.tensor([0.0, 0.2], dtype=DT),
                        method="kvaerno5", rtol=1e-6, atol=1e-12)
    assert sol.stats["n_rejected"] > 0
    torch.testing.assert_close(sol.ys[-1], torch.full((2,), math.exp(-10.0), dtype=DT),
                               rtol=1e-4, atol=0.0)
