"""Regression tests for the silent wrong results an adversarial pass found (each failed on the
main branch before the fix): wrong first- and second-order gradients, options routed to the wrong
consumer or dropped, and errors that named the wrong cause."""

import math
import time

import pytest
import torch

import odegrad
from odegrad.errors import (
    InvalidInputError,
    MaxStepsExceededError,
    NonFiniteError,
    UnsupportedCombinationError,
)

DT = torch.float64


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---- 1. discrete through reversible_<adaptive base> with rejected steps ---------------------


@pytest.mark.parametrize("method, rtol", [("reversible_bosh3", 1e-6), ("reversible_dopri5", 1e-10),
                                          ("reversible_tsit5", 1e-10)])
def test_discrete_through_reversible_with_rejections_equals_direct(method, rtol):
    torch.manual_seed(5)
    A = (0.5 * torch.randn(3, 3, dtype=DT) - 0.3 * torch.eye(3, dtype=DT)).requires_grad_()
    y0 = torch.randn(3, 3, dtype=DT)
    t = torch.tensor([0, 0.4, 0.9, 1.3], dtype=DT)
    grads, rejected = [], []
    for gradient in ("direct", "discrete"):
        # the field stiffens at t = 0.7, so steps after the first are rejected too (a rejection
        # of the first step alone kept the graph, through the init carry, before the fix)
        sol = odegrad.solve(lambda t, y: (y @ A.T) * (1 + 3 * torch.sigmoid(40 * (t - 0.7))),
                            y0, t, method=method, rtol=rtol, gradient=gradient, params=[A],
                            step_size=0.5)
        grads.append(torch.autograd.grad(sol.ys.sin().sum(), A)[0])
        rejected.append(sol.stats["n_rejected"])
    assert rejected[0] == rejected[1] > 0  # the case needs rejected steps
    assert rel(grads[1], grads[0]) < 1e-10


# ---- 2. double backward ---------------------------------------------------------------------


def _penalty_problem():
    torch.manual_seed(0)
    W = (0.5 * torch.randn(3, 3, dtype=DT)).requires_grad_()
    b = torch.randn(3, dtype=DT, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=DT)

    def f(t, y):
        return torch.tanh(y @ W.T + b) * (1 + t)

    return f, W, b, y0, t


def gradient_penalty(gradient, method="dopri5", tol=1e-8, **options):
    """grad(L + |dL/dy0|², (W, b)): needs the second-order terms of the solve."""
    f, W, b, y0, t = _penalty_problem()
    ys = odegrad.odeint(f, y0, t, method=method, gradient=gradient, params=[W, b], rtol=tol,
                        atol=tol, **options)
    loss = ys[-1].pow(2).sum() + ys[1].sin().sum()
    (g_y0,) = torch.autograd.grad(loss, y0, create_graph=True)
    return torch.autograd.grad(loss + g_y0.pow(2).sum(), [W, b])


@pytest.mark.parametrize("method, gradient, options", [
    ("dopri5", "discrete", {"checkpoints": "all"}),
    ("dopri5", "discrete", {"checkpoints": "solution"}),
    ("dopri5", "discrete", {"checkpoints": 2}),
    ("reversible_dopri5", "discrete", {}),
    ("reversible_dopri5", "reversible", {}),
    ("alf", "reversible", {"tol": 1e-5}),
    ("reversible_heun", "reversible", {"tol": 1e-5}),
])
def test_gradient_penalty_equals_direct(method, gradient, options):
    tol = options.pop("tol", 1e-8)
    want = gradient_penalty("direct", method, tol=tol)
    got = gradient_penalty(gradient, method, tol=tol, **options)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-9


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_gradient_penalty_of_continuous_adjoints_converges(gradient):
    errors = []
    for tol in (1e-4, 1e-8):
        want = gradient_penalty("direct", tol=1e-12)
        got = gradient_penalty(gradient, tol=tol)
        errors.append(max(rel(g, w) for g, w in zip(got, want)))
    assert errors[1] < 1e-6 and errors[1] < errors[0] / 10


def _six_parameter_loss(gradient, method="rk4", step=0.1):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)

    def loss(p):
        A, c = p[:4].reshape(2, 2), p[4:]
        ys = odegrad.odeint(lambda t, y: torch.tanh(y @ A.T) + c * t, torch.ones(2, dtype=DT),
                            t, method=method, step_size=step, adaptive=False, gradient=gradient,
                            params=[A, c])
        return ys[1:].pow(2).sum()

    return loss


@pytest.mark.parametrize("gradient, method", [
    ("discrete", "rk4"), ("discrete", "reversible_rk4"), ("reversible", "reversible_rk4"),
    ("reversible", "alf"),
])
def test_hessian_and_hvp_equal_direct(gradient, method):
    p = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], dtype=DT)
    want = torch.autograd.functional.hessian(_six_parameter_loss("direct", method), p)
    got = torch.autograd.functional.hessian(_six_parameter_loss(gradient, method), p)
    assert want.abs().max() > 1e-3  # the second derivative is not trivially zero
    assert rel(got, want) < 1e-9
    v = torch.linspace(-1, 1, 6, dtype=DT)
    _, hvp = torch.autograd.functional.hvp(_six_parameter_loss(gradient, method), p, v)
    assert rel(hvp, want @ v) < 1e-9


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_hessian_of_continuous_adjoints_converges_to_directs(gradient):
    # The graph of the gradient is direct's through the forward scheme; the Hessian's other
    # factor, dy/dp, comes from the method's own (continuous) first-order backward, so the
    # Hessian converges to direct's as the steps shrink (rk4: 16x per halving).
    p = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], dtype=DT)
    errors = []
    for step in (0.1, 0.05):
        want = torch.autograd.functional.hessian(_six_parameter_loss("direct", step=step), p)
        got = torch.autograd.functional.hessian(_six_parameter_loss(gradient, step=step), p)
        errors.append(rel(got, want))
    assert errors[1] < 1e-7 and errors[1] < errors[0] / 8


def test_grad_with_inputs_and_create_graph_through_discrete():
    # autograd.grad(..., inputs=) used to return a graph-free gradient silently.
    f, W, b, y0, t = _penalty_problem()
    results = []
    for gradient in ("direct", "discrete"):
        ys = odegrad.odeint(f, y0, t, method="rk4", step_size=0.1, gradient=gradient,
                            params=[W, b])
        (g_w,) = torch.autograd.grad(ys[-1].pow(2).sum(), inputs=[W], create_graph=True)
        (gg,) = torch.autograd.grad(g_w.pow(2).sum(), inputs=[b])
        results.append(gg)
    assert rel(results[1], results[0]) < 1e-10


def test_double_backward_replays_dropout_masks():
    torch.manual_seed(1)
    field = torch.nn.Sequential(torch.nn.Linear(3, 16, dtype=DT), torch.nn.Tanh(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 3, dtype=DT))
    y0 = torch.randn(5, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ys = odegrad.odeint(lambda t, y: field(y), y0, t, method="rk4", step_size=0.25,
                        gradient="discrete", params=list(field.parameters()))
    loss = ys[-1].pow(2).sum()
    (g1,) = torch.autograd.grad(loss, y0, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, y0, create_graph=True)
    assert rel(g2, g1) < 1e-12  # the re-run saw the forward pass's masks


# ---- torch.func ----------------------------------------------------------------------------


def _func_loss(W, gradient="direct"):
    y0 = torch.tensor([1.0, -0.5], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ys = odegrad.odeint(lambda t, y: torch.tanh(y @ W.T), y0, t, gradient=gradient, params=[W])
    return ys[-1].sum()


def test_torch_func_grad_runs_through_direct():
    W = torch.tensor([[0.2, -0.3], [0.5, 0.1]], dtype=DT)
    got = torch.func.grad(_func_loss)(W)
    W_leaf = W.clone().requires_grad_()
    (want,) = torch.autograd.grad(_func_loss(W_leaf), W_leaf)
    assert rel(got, want) < 1e-12


@pytest.mark.parametrize("gradient", ["discrete", "backsolve", "interpolated", "reversible"])
def test_torch_func_grad_through_custom_gradients_names_the_alternative(gradient):
    W = torch.tensor([[0.2, -0.3], [0.5, 0.1]], dtype=DT)
    with pytest.raises(UnsupportedCombinationError, match="gradient='direct'"):
        torch.func.grad(lambda W: _func_loss(W, gradient))(W)


def test_vmap_raises_a_clear_error():
    with pytest.raises(UnsupportedCombinationError, match="vmap"):
        torch.vmap(_func_loss)(torch.randn(3, 2, 2, dtype=DT))


# ---- 4. interpolated with a kvaerno5 adjoint --------------------------------------------------


def test_interpolated_after_kvaerno5_stays_inside_its_interval():
    a = torch.tensor(0.9, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ys = odegrad.odeint(lambda t, y: a * y, torch.ones(1, dtype=DT), t, method="kvaerno5",
                        gradient="interpolated", params=[a], n_nodes=127, rtol=1e-8, atol=1e-10)
    ys[-1].sum().backward()
    assert abs(float(a.grad) - math.exp(0.9)) < 1e-6  # was 7.54 against 2.4596


def test_interpolated_refuses_an_adjoint_method_with_stages_outside_the_step():
    a = torch.tensor(0.9, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(UnsupportedCombinationError, match="outside its step"):
        odegrad.odeint(lambda t, y: a * y, torch.ones(1, dtype=DT), t, gradient="interpolated",
                       params=[a], adjoint_method="kvaerno5")


# ---- 7. a fixed-step adjoint method after an adaptive forward -------------------------------


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_fixed_step_adjoint_after_adaptive_forward_needs_a_step(gradient):
    k = torch.tensor(2.0, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 3.0], dtype=DT)
    y0 = torch.ones(1, dtype=DT)
    with pytest.raises(InvalidInputError, match="adjoint_step_size"):
        odegrad.odeint(lambda t, y: -k * y, y0, t, gradient=gradient, params=[k],
                       adjoint_method="rk4")
    ys = odegrad.odeint(lambda t, y: -k * y, y0, t, gradient=gradient, params=[k],
                        adjoint_method="rk4", adjoint_step_size=0.01, rtol=1e-10, atol=1e-12)
    ys[-1].sum().backward()
    assert abs(float(k.grad) - (-3.0 * math.exp(-6.0))) < 1e-7  # was −4.77 against −0.0074


# ---- 8. a tensor repeated in params= ---------------------------------------------------------


@pytest.mark.parametrize("gradient, method", [
    ("discrete", "dopri5"), ("backsolve", "dopri5"), ("interpolated", "dopri5"),
    ("reversible", "reversible_dopri5"),
])
def test_repeated_params_do_not_double_the_gradient(gradient, method):
    w = torch.tensor(0.5, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    odegrad.odeint(lambda t, y: w * y, torch.ones(1, dtype=DT), t, gradient=gradient,
                   params=[w, w, w], method=method, rtol=1e-9, atol=1e-9)[-1].sum().backward()
    assert abs(float(w.grad) - math.exp(0.5)) < 1e-6


# ---- 10. footguns: parameters missing from params=, dropout ----------------------------------


@pytest.mark.parametrize("gradient", ["discrete", "backsolve", "interpolated", "reversible"])
def test_a_closure_tensor_missing_from_params_raises(gradient):
    a = torch.tensor(-0.5, dtype=DT, requires_grad=True)
    b = torch.tensor(0.3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    method = "reversible_rk4" if gradient == "reversible" else "rk4"
    with pytest.raises(InvalidInputError, match="not in params"):
        odegrad.odeint(lambda t, y: a * y + b, torch.ones(2, dtype=DT), t, method=method,
                       step_size=0.1, gradient=gradient, params=[a])
    # a non-leaf parameter and tensors f makes itself are fine
    raw = torch.tensor(0.2, dtype=DT, requires_grad=True)
    c = torch.nn.functional.softplus(raw)

    def f(t, y):
        y = y.detach().requires_grad_()  # a leaf f creates itself
        return -c * y + b

    ys = odegrad.odeint(f, torch.ones(2, dtype=DT), t, method=method, step_size=0.1,
                        gradient=gradient, params=[c, b])
    ys[-1].sum().backward()
    assert raw.grad is not None and b.grad is not None


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated", "reversible"])
def test_active_dropout_is_refused_where_masks_cannot_be_replayed(gradient):
    field = torch.nn.Sequential(torch.nn.Linear(2, 8, dtype=DT), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 2, dtype=DT))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = field

        def forward(self, t, y):
            return self.net(y)

    method = "reversible_rk4" if gradient == "reversible" else "rk4"
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(UnsupportedCombinationError, match="dropout"):
        odegrad.odeint(Field(), torch.ones(3, 2, dtype=DT), t, method=method, step_size=0.1,
                       gradient=gradient)
    odegrad.odeint(Field().eval(), torch.ones(3, 2, dtype=DT), t, method=method, step_size=0.1,
                   gradient=gradient)


# ---- errors that named the wrong cause --------------------------------------------------------

T = torch.tensor([0.0, 1.0], dtype=DT)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(y0=torch.zeros(0, dtype=DT)), InvalidInputError, "y0 is empty"),
    (dict(method="kvaerno5", y0=torch.zeros(0, dtype=DT)), InvalidInputError, "y0 is empty"),
    (dict(rtol=0, atol=0), InvalidInputError, "both zero"),
    (dict(rtol=torch.tensor([1e-6, math.nan], dtype=DT)), InvalidInputError, "non-finite"),
    (dict(atol=math.inf), InvalidInputError, "finite"),
    (dict(method="rk4", step_size=math.inf), InvalidInputError, "positive finite"),
    (dict(method="rk4", step_size=True), InvalidInputError, "step_size"),
    (dict(max_steps=True), InvalidInputError, "max_steps"),
])
def test_bad_inputs_get_their_own_message(kwargs, error, match):
    y0 = kwargs.pop("y0", torch.ones(2, dtype=DT))
    with pytest.raises(error, match=match):
        odegrad.odeint(lambda t, y: -y, y0, T, **kwargs)


def test_max_steps_is_checked_before_a_fixed_plan_is_built():
    start = time.perf_counter()
    with pytest.raises(MaxStepsExceededError, match="needs 10000000 steps"):
        odegrad.odeint(lambda t, y: -y, torch.ones(2, dtype=DT), T, method="rk4", step_size=1e-7)
    with pytest.raises(MaxStepsExceededError):
        odegrad.odeint(lambda t, y: -y, torch.ones(2, dtype=DT), T, method="rk4",
                       step_size=1e-300)
    assert time.perf_counter() - start < 1.0  # was 9.6 s and 2.6 GB


def test_zero_dimensional_state_through_the_interpolated_adjoint():
    a = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ys = odegrad.odeint(lambda t, y: a * y, torch.tensor(1.0, dtype=DT), T,
                        gradient="interpolated", params=[a], rtol=1e-9, atol=1e-9)
    ys[-1].backward()
    assert abs(float(a.grad) - math.exp(0.7)) < 1e-6


def test_a_non_finite_vjp_is_not_reported_as_f():
    # f = sqrt(y) is finite along the solve; its derivative is infinite at y = 0.
    c = torch.tensor(1.0, dtype=DT, requires_grad=True)
    ys = odegrad.odeint(lambda t, y: c * torch.sqrt(y.clamp_min(0)) - c * torch.sqrt(y),
                        torch.zeros(1, dtype=DT), T, gradient="backsolve", params=[c],
                        method="rk4", step_size=0.5)
    with pytest.raises(NonFiniteError, match="adjoint dynamics"):
        ys[-1].sum().backward()


@pytest.mark.parametrize("gradient", ["discrete", "backsolve", "interpolated", "reversible"])
def test_params_computed_from_other_params_are_refused(gradient):
    """params=[w, 2w]: a custom gradient would differentiate f's graph through both and count the
    shared path twice (found with neural CDE coefficients, 2026-11-30); it must raise, while
    direct (plain autograd) is right and the leaf alone gives the same gradient."""
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    v = 2 * w

    def f(t, y):
        return -(w + v) * y

    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    method = "reversible_heun" if gradient == "reversible" else "rk4"
    options = dict(method=method, step_size=0.01, adaptive=False) if gradient == "reversible" \
        else dict(method=method, step_size=0.1)
    with pytest.raises(odegrad.InvalidInputError, match=r"params\[1\] is computed from params\["):
        odegrad.odeint(f, y0, t, gradient=gradient, params=[w, v], **options)
    (direct,) = torch.autograd.grad(
        odegrad.odeint(f, y0, t, params=[w, v], **options)[-1].sum(), w)
    exact = -3 * math.exp(-3 * 0.7)
    assert abs(float(direct) - exact) < 1e-4
