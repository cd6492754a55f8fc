"""gradient="backsolve" (ALGORITHMS.md §3): convergence to exact gradients as the tolerances
shrink (a linear field against its closed form, an MLP field against a float64 reference),
options, stats, errors, and the torchdiffeq drop-in.

The helpers here also serve tests/test_interpolated.py.
"""

import pytest
import torch

import odegrad
from conftest import MLPField
from odegrad.errors import InvalidInputError, MaxStepsExceededError, UnknownNameError

DT = torch.float64
TOLERANCES = [1e-6, 1e-7, 1e-8, 1e-9, 1e-10]


class LinearField(torch.nn.Module):
    """y' = A y."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, t, y):
        return self.a @ y


def linear_case():
    a = 0.5 * torch.randn(4, 4, dtype=DT)
    y0 = torch.randn(4, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.2, 2.0], dtype=DT)
    cotangent = torch.randn(len(t), 4, dtype=DT)
    return a, y0, t, cotangent


def van_loan_gradient(a, y0, t, cotangent):
    """For L = Σ_i c_i^T y(t_i), y' = Ay: dL/dA = Σ_i ∫_0^{t_i} exp(A^T(t_i − s)) c_i y(s)^T ds,
    the upper-right block of exp([[A^T, c_i y0^T], [0, A^T]] t_i) (Van Loan 1978), and
    dL/dy0 = Σ_i exp(A^T t_i) c_i."""
    d = len(y0)
    grad_a = torch.zeros(d, d, dtype=DT)
    grad_y0 = cotangent[0].clone()
    for ti, c in zip(t[1:], cotangent[1:]):
        block = torch.zeros(2 * d, 2 * d, dtype=DT)
        block[:d, :d] = a.T
        block[:d, d:] = torch.outer(c, y0)
        block[d:, d:] = a.T
        e = torch.linalg.matrix_exp(block * (ti - t[0]))
        grad_a += e[:d, d:]
        grad_y0 += e[:d, :d] @ c
    return grad_a, grad_y0


def linear_errors(gradient: str, **options) -> list[float]:
    """Relative errors of dL/dA and dL/dy0 (together) at each tolerance of TOLERANCES."""
    a, y0, t, cotangent = linear_case()
    exact_a, exact_y0 = van_loan_gradient(a, y0, t, cotangent)
    exact = torch.cat([exact_a.reshape(-1), exact_y0])
    errors = []
    for tol in TOLERANCES:
        field = LinearField(a)
        y = y0.clone().requires_grad_()
        ys = odegrad.odeint(field, y, t, rtol=tol, atol=tol, gradient=gradient, **options)
        (ys * cotangent).sum().backward()
        got = torch.cat([field.a.grad.reshape(-1), y.grad])
        errors.append(float((got - exact).norm() / exact.norm()))
    return errors


def mlp_case():
    field = MLPField()
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(2.0)  # livelier dynamics than the default initialisation
    y0 = torch.randn(4, 3, dtype=DT)
    t = torch.tensor([0.0, 0.4, 1.0, 2.0], dtype=DT)
    cotangent = torch.randn(len(t), 4, 3, dtype=DT)
    return field, y0, t, cotangent


def flat_gradients(field, y0, t, cotangent, **options):
    """d(Σ_i c_i · y(t_i)) w.r.t. y0, t and the parameters, flattened; and the stats."""
    y = y0.clone().requires_grad_()
    times = t.clone().requires_grad_()
    sol = odegrad.solve(field, y, times, **options)
    grads = torch.autograd.grad((sol.ys * cotangent).sum(), [y, times, *field.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]), sol.stats


def separate_solves_reference(field, y0, t, cotangent):
    """The same gradient through one direct dopri8 solve per output time at rtol = atol =
    1e-14: every output is a step end, so no dense output limits the accuracy (~1e-15)."""
    y = y0.clone().requires_grad_()
    times = t.clone().requires_grad_()
    loss = (y * cotangent[0]).sum()
    for i in range(1, len(t)):
        ys = odegrad.odeint(field, y, torch.stack([times[0], times[i]]), method="dopri8",
                            rtol=1e-14, atol=1e-14)
        loss = loss + (ys[-1] * cotangent[i]).sum()
    grads = torch.autograd.grad(loss, [y, times, *field.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


def mlp_errors(gradient: str, **options) -> list[float]:
    field, y0, t, cotangent = mlp_case()
    exact = separate_solves_reference(field, y0, t, cotangent)
    errors = []
    for tol in TOLERANCES:
        got, _ = flat_gradients(field, y0, t, cotangent, rtol=tol, atol=tol, gradient=gradient,
                                **options)
        errors.append(float((got - exact).norm() / exact.norm()))
    return errors


def assert_converges(errors: list[float]) -> None:
    """Below 1e-7 at 1e-10, decreasing at every tenfold tightening, by over three decades in
    all across the four decades of tolerance; and within twice the tolerance throughout (the
    error control of the backward solve is not looser than asked)."""
    assert errors[-1] < 1e-7, errors
    assert all(error < 2 * tol for error, tol in zip(errors, TOLERANCES)), errors
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e3 * errors[-1], errors


CONTINUOUS = ["backsolve", "interpolated"]


@pytest.mark.parametrize("gradient", CONTINUOUS)
def test_linear_gradient_converges_to_closed_form(gradient):
    assert_converges(linear_errors(gradient))


@pytest.mark.parametrize("gradient", CONTINUOUS)
def test_mlp_gradient_converges_including_time(gradient):
    assert_converges(mlp_errors(gradient))


@pytest.mark.parametrize("gradient", CONTINUOUS)
def test_decreasing_times_over_several_intervals(gradient):
    field, y0, t, cotangent = mlp_case()
    t = t.flip(0)
    exact = separate_solves_reference(field, y0, t, cotangent)
    got, _ = flat_gradients(field, y0, t, cotangent, rtol=1e-10, atol=1e-10,
                            gradient=gradient)
    assert float((got - exact).norm() / exact.norm()) < 1e-8


def test_seminorm_needs_fewer_evaluations_than_full_norm():
    field, y0, t, cotangent = mlp_case()
    exact = separate_solves_reference(field, y0, t, cotangent)
    results = {}
    for norm in ("seminorm", "full"):
        got, stats = flat_gradients(field, y0, t, cotangent, rtol=1e-8, atol=1e-8,
                                    gradient="backsolve", adjoint_norm=norm)
        results[norm] = (float((got - exact).norm() / exact.norm()), stats["nfe_backward"])
    assert results["seminorm"][1] < 0.85 * results["full"][1], results
    assert results["seminorm"][0] < 1e-7 and results["full"][0] < 1e-7, results


@pytest.mark.parametrize(
    "options, bound",
    [
        (dict(method="rk4", step_size=0.01), 1e-8),  # backward: rk4 with the same step
        (dict(adjoint_method="rk4", adjoint_step_size=0.01), 1e-8),
        (dict(adjoint_method="tsit5", adjoint_rtol=1e-10, adjoint_atol=1e-10), 1e-8),
        (dict(adjoint_method="bosh3", adjoint_rtol=1e-8, adjoint_atol=1e-8), 1e-6),
        (dict(norm=lambda x: x.abs().max()), 1e-8),  # the forward's norm serves y and a
    ],
)
def test_adjoint_method_and_tolerances(options, bound):
    field, y0, t, cotangent = mlp_case()
    exact = separate_solves_reference(field, y0, t, cotangent)
    got, stats = flat_gradients(field, y0, t, cotangent, gradient="backsolve",
                                **{"rtol": 1e-9, "atol": 1e-9, **options})
    assert float((got - exact).norm() / exact.norm()) < bound
    assert stats["n_steps_backward"] > 0


def test_adjoint_tolerance_controls_the_backward_solve():
    field, y0, t, cotangent = mlp_case()
    exact = separate_solves_reference(field, y0, t, cotangent)
    loose, loose_stats = flat_gradients(field, y0, t, cotangent, rtol=1e-10, atol=1e-10,
                                        gradient="backsolve", adjoint_rtol=1e-5,
                                        adjoint_atol=1e-5)
    tight, tight_stats = flat_gradients(field, y0, t, cotangent, rtol=1e-10, atol=1e-10,
                                        gradient="backsolve")
    assert loose_stats["nfe_forward"] == tight_stats["nfe_forward"]
    assert loose_stats["nfe_backward"] < tight_stats["nfe_backward"]
    assert float((tight - exact).norm()) < 1e-2 * float((loose - exact).norm())


def test_plain_function_gives_gradients_for_y0_and_t():
    # y' = −(1 + t) y: y(t1) = y0 exp(−(t1 − t0) − (t1² − t0²)/2)
    y0 = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.2, 1.1], dtype=DT, requires_grad=True)
    ys = odegrad.odeint(lambda s, y: -(1 + s) * y, y0, t, rtol=1e-11, atol=1e-11,
                        gradient="backsolve")
    ys[-1].sum().backward()
    t0, t1 = 0.2, 1.1
    decay = torch.exp(torch.tensor(-(t1 - t0) - (t1**2 - t0**2) / 2, dtype=DT))
    assert torch.allclose(y0.grad, decay.expand(2), rtol=1e-9)
    y_end_sum = float(decay * y0.detach().sum())
    expected_t = torch.tensor([y_end_sum * (1 + t0), -y_end_sum * (1 + t1)], dtype=DT)
    assert torch.allclose(t.grad, expected_t, rtol=1e-9)


def test_tuple_state_and_explicit_params():
    a = (0.5 * torch.randn(2, 2, dtype=DT)).requires_grad_()
    y0 = (torch.randn(2, dtype=DT, requires_grad=True), torch.randn(3, dtype=DT,
                                                                     requires_grad=True))
    t = torch.tensor([0.0, 0.7, 1.5], dtype=DT)

    def field(s, state):
        u, v = state
        return torch.tanh(a @ u) + v[:2], -v * u.sum()

    def gradients(gradient, **options):
        ys = odegrad.odeint(field, y0, t, params=[a], gradient=gradient, **options)
        loss = ys[0].pow(2).sum() + ys[1][1:].sum()
        return torch.autograd.grad(loss, [*y0, a])

    ours = gradients("backsolve", rtol=1e-11, atol=1e-11)
    # direct through rk4 with a fine step that lands on every output: O(h^4) ≈ 1e-10
    reference = gradients("direct", method="rk4", step_size=5e-3)
    for got, exact in zip(ours, reference):
        assert torch.allclose(got, exact, rtol=1e-8, atol=1e-10)


def test_stats_and_checkpoint_bytes():
    field, y0, t, cotangent = mlp_case()
    y = y0.clone().requires_grad_()
    sol = odegrad.solve(field, y, t, rtol=1e-8, atol=1e-8, gradient="backsolve")
    direct = odegrad.solve(field, y0, t, rtol=1e-8, atol=1e-8)
    assert sol.stats["nfe_forward"] == direct.stats["nfe_forward"]
    assert sol.stats["nfe_backward"] == 0 and sol.stats["n_steps_backward"] == 0
    assert sol.stats["checkpoint_bytes"] == len(t) * y0.numel() * 8
    (sol.ys * cotangent).sum().backward()
    stats = sol.stats
    assert stats["n_steps_backward"] == stats["n_accepted_backward"] + stats["n_rejected_backward"]
    # an augmented evaluation is one f evaluation; dopri5 makes 6 per attempted step (FSAL)
    assert 6 * stats["n_steps_backward"] <= stats["nfe_backward"]
    assert stats["nfe_backward"] <= 6 * stats["n_steps_backward"] + 2 * (len(t) - 1)
    assert "_phase" not in stats


def test_bad_options():
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    field = lambda s, y: -y  # noqa: E731
    with pytest.raises(InvalidInputError, match="adjoint_norm"):
        odegrad.odeint(field, y0, t, gradient="backsolve", adjoint_norm="l2")
    with pytest.raises(UnknownNameError, match="unknown method 'nope'"):
        odegrad.odeint(field, y0, t, gradient="backsolve", adjoint_method="nope")
    with pytest.raises(InvalidInputError, match="adjoint_step_size"):
        odegrad.odeint(field, y0, t, gradient="backsolve", adjoint_step_size=0.0)
    with pytest.raises(InvalidInputError, match="adjoint_rtol"):
        odegrad.odeint(field, y0, t, gradient="backsolve", adjoint_rtol=-1.0)
    with pytest.raises(UnknownNameError, match="n_nodes"):
        odegrad.odeint(field, y0, t, gradient="backsolve", n_nodes=8)


def test_backward_errors_name_the_backward_solve():
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ys = odegrad.odeint(lambda s, y: torch.sin(3 * s) * y, y0, t, rtol=1e-4, atol=1e-4,
                        max_steps=20, gradient="backsolve", adjoint_rtol=1e-13,
                        adjoint_atol=1e-13)
    with pytest.raises(MaxStepsExceededError, match=r"backward \(adjoint\) solve from t=1"):
        ys.sum().backward()


def test_compat_odeint_adjoint_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    from odegrad.compat import torchdiffeq as compat

    field, y0, t, cotangent = mlp_case()
    results = []
    for library in (compat, torchdiffeq):
        y = y0.clone().requires_grad_()
        ys = library.odeint_adjoint(field, y, t, rtol=1e-9, atol=1e-9,
                                    adjoint_options=dict(norm="seminorm"))
        if library is compat:
            assert "Backsolve" in type(ys.grad_fn).__name__
        grads = torch.autograd.grad((ys * cotangent).sum(), [y, *field.parameters()])
        results.append(torch.cat([g.reshape(-1) for g in grads]))
    ours, theirs = results
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-6


@pytest.mark.parametrize("interpolated", [False, True])
def test_augmented_field_is_differentiable(interpolated):
    # Implicit adjoint methods linearise the augmented field by autograd.
    from odegrad.gradients.continuous import AugmentedField, Layout
    from odegrad.problem import Problem
    from odegrad.solvers import make_solver

    a = torch.randn(3, 3, dtype=DT, requires_grad=True)
    y0 = torch.randn(2, 3, dtype=DT)
    problem = Problem(f=lambda s, y: torch.tanh(y @ a.T) * torch.cos(s), y0=y0,
                      t=torch.tensor([0.0, 1.0], dtype=DT), solver=make_solver("dopri5"),
                      params=(a,))
    layout = Layout(y0.shape, 1 if interpolated else 2, problem.params)
    field = AugmentedField(problem, layout, (lambda s: y0 * s) if interpolated else None)
    z = torch.randn(sum(layout.sizes), dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: field(torch.tensor(0.3, dtype=DT), z), (z,))


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_single_output_time(gradient):
    field, y0, _, _ = mlp_case()
    y = y0.clone().requires_grad_()
    t = torch.tensor([0.3], dtype=DT, requires_grad=True)
    ys = odegrad.odeint(field, y, t, gradient=gradient)
    (3 * ys).sum().backward()
    assert torch.equal(y.grad, torch.full_like(y0, 3.0))
    assert float(t.grad) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in field.parameters())


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_backward_pass_leaves_buffers_alone(gradient):
    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3, dtype=DT)
            self.norm = torch.nn.BatchNorm1d(3, dtype=DT)

        def forward(self, t, y):
            return torch.tanh(self.norm(self.linear(y)))

    field = Normalised()
    y0 = torch.randn(8, 3, dtype=DT, requires_grad=True)
    ys = odegrad.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient=gradient)
    after_forward = [b.clone() for b in field.buffers()]
    ys.sum().backward()
    assert all(torch.equal(b, saved) for b, saved in zip(field.buffers(), after_forward))
    assert field.linear.weight.grad is not None
