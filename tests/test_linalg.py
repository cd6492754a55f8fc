"""linalg: dense Jacobians, shifted LU solves, GMRES and simplified Newton against torch.linalg."""

import math

import pytest
import torch

from odegrad.linalg import (
    ShiftedLU,
    gmres,
    jacobian,
    jacobian_with_graph,
    newton,
    shifted_solve,
)

DT = torch.float64


def field(y):
    """A nonlinear map that couples every component of y (any shape)."""
    flat = y.reshape(-1)
    mix = torch.linspace(-1.0, 1.0, flat.numel(), dtype=y.dtype)
    return (torch.tanh(flat) * flat.sum() + mix * flat**2).reshape(y.shape)


def test_jacobian_full_matches_autograd():
    y = torch.randn(2, 3, dtype=DT)
    expected = torch.autograd.functional.jacobian(field, y).reshape(6, 6)
    torch.testing.assert_close(jacobian(field, y), expected, rtol=1e-12, atol=1e-12)


def test_jacobian_batch_independent_gives_per_sample_blocks():
    weight = torch.randn(3, 3, dtype=DT)

    def per_sample(y):  # rows of y do not interact
        return torch.sin(y @ weight) * y

    y = torch.randn(5, 3, dtype=DT)
    blocks = jacobian(per_sample, y, batch_independent=True)
    assert blocks.shape == (5, 3, 3)
    for b in range(5):
        expected = torch.autograd.functional.jacobian(per_sample, y[b : b + 1]).reshape(3, 3)
        torch.testing.assert_close(blocks[b], expected, rtol=1e-12, atol=1e-12)


class _NoVmap(torch.autograd.Function):
    """y ↦ y³ with a backward that torch.func.vmap cannot batch (no vmap rule)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return y**3

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return 3 * y**2 * grad


def test_jacobian_falls_back_when_vmap_fails():
    y = torch.randn(4, dtype=DT)
    jac = jacobian(lambda v: _NoVmap.apply(v) + v.sum(), y)
    expected = torch.diag(3 * y**2) + torch.ones(4, 4, dtype=DT)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-12)
    x = y.clone().requires_grad_(True)
    jac = jacobian_with_graph(lambda v: _NoVmap.apply(v) + v.sum(), x * 1.0)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(jac.trace(), x)  # d/dx Σ 3x² = 6x
    torch.testing.assert_close(grad, 6 * y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_shifted_lu_solves_and_transposed_solves(batched):
    shape = (4, 6, 6) if batched else (6, 6)
    jac = torch.randn(*shape, dtype=DT)
    shift = 0.37
    factors = ShiftedLU.factor(jac, shift)
    matrix = torch.eye(6, dtype=DT) - shift * jac
    rhs = torch.randn(*shape[:-1], dtype=DT)
    x = factors.solve(rhs)
    torch.testing.assert_close((matrix @ x.unsqueeze(-1)).squeeze(-1), rhs)
    xt = factors.solve(rhs, transpose=True)
    torch.testing.assert_close((matrix.transpose(-1, -2) @ xt.unsqueeze(-1)).squeeze(-1), rhs)


def test_gmres_matches_direct_solve_with_restarts():
    n = 60
    a = torch.eye(n, dtype=DT) + 0.4 * torch.randn(n, n, dtype=DT) / n**0.5
    b = torch.randn(3, 20, dtype=DT)  # any shape: the operator acts on the flattened vector
    x, converged, residual = gmres(
        lambda v: (a @ v.reshape(-1)).reshape(v.shape), b, rtol=1e-12, restart=7, max_iters=400
    )
    assert converged and residual <= 1e-12
    torch.testing.assert_close(x.reshape(-1), torch.linalg.solve(a, b.reshape(-1)))


def test_gmres_right_preconditioner_same_solution_fewer_iterations():
    """A Jacobi preconditioner on a badly scaled, diagonally dominant system: the same x (to
    the tolerance) in far fewer products with A."""
    n = 80
    generator = torch.Generator().manual_seed(4)
    diagonal = torch.logspace(0, 6, n, dtype=DT)
    a = torch.diag(diagonal) + 0.3 * torch.randn(n, n, dtype=DT, generator=generator)
    b = torch.randn(n, dtype=DT, generator=generator)
    products = {"plain": 0, "jacobi": 0}

    def product(name):
        def matvec(v):
            products[name] += 1
            return a @ v
        return matvec

    x, converged, _ = gmres(product("plain"), b, rtol=1e-11, restart=80, max_iters=400)
    assert converged
    x_pre, converged, residual = gmres(product("jacobi"), b, rtol=1e-11, restart=80,
                                       max_iters=400, preconditioner=lambda v: v / diagonal)
    assert converged and residual <= 1e-11
    exact = torch.linalg.solve(a, b)
    for got in (x, x_pre):
        assert float((got - exact).norm() / exact.norm()) < 1e-8
    assert 3 * products["jacobi"] < products["plain"], products


def test_gmres_reports_failure_and_zero_rhs():
    n = 40
    a = torch.diag(torch.logspace(0, 8, n, dtype=DT))  # ill-conditioned: 5 iterations are too few
    b = torch.ones(n, dtype=DT)
    _, converged, residual = gmres(lambda v: a @ v, b, rtol=1e-10, restart=5, max_iters=5)
    assert not converged and residual > 1e-10
    x, converged, _ = gmres(lambda v: a @ v, torch.zeros(n, dtype=DT))
    assert converged and bool((x == 0).all())


def test_newton_converges_with_exact_and_frozen_jacobians():
    b = torch.tensor([0.5, 2.0, -3.0], dtype=DT)

    def residual(z):
        return z**3 + z - b

    scale = torch.full_like(b, 1e-10)
    z0 = torch.tensor([0.4, 1.0, -1.2], dtype=DT)
    exact = newton(residual, z0, lambda g, z: g / (3 * z**2 + 1), scale)
    assert exact.converged
    torch.testing.assert_close(residual(exact.z), torch.zeros_like(b), rtol=0, atol=1e-9)
    # A frozen Jacobian: linear convergence, more iterations.
    frozen = 3 * z0**2 + 1
    simplified = newton(residual, z0, lambda g, z: g / frozen, scale, max_iters=60)
    assert simplified.converged and simplified.iterations > exact.iterations
    assert 0.0 < simplified.rate < 1.0
    torch.testing.assert_close(simplified.z, exact.z, rtol=1e-9, atol=0)


def test_newton_reports_divergence():
    b = torch.tensor([1.0], dtype=DT)
    scale = torch.ones_like(b) * 1e-8
    # A Jacobian with the wrong sign pushes the iterate away from the root.
    result = newton(lambda z: z + 0.1 * z**3 - b, torch.zeros_like(b), lambda g, z: -g, scale)
    assert not result.converged


def test_newton_on_an_empty_state_and_on_a_non_finite_residual():
    empty = torch.zeros(0, dtype=DT)
    result = newton(lambda z: z / 0.0, empty, lambda g, z: g, empty)  # never evaluated
    assert result.converged and result.iterations == 0 and result.z.numel() == 0
    one = torch.ones(2, dtype=DT)
    result = newton(lambda z: z * math.nan, one, lambda g, z: g, one)
    assert not result.converged and not result.finite and result.iterations == 1
    assert newton(lambda z: z - 1.0, one, lambda g, z: g, one).finite


def test_gmres_returns_at_once_on_a_non_finite_rhs():
    calls = []

    def matvec(v):
        calls.append(1)
        return v

    b = torch.tensor([1.0, math.nan], dtype=DT)
    x, converged, residual = gmres(matvec, b)
    assert not converged and math.isnan(residual) and bool(torch.isnan(x).all())
    assert not calls


@pytest.mark.parametrize("batch_independent", [False, True])
def test_jacobian_with_graph_matches_and_differentiates(batch_independent):
    """The same matrix as `jacobian`, and differentiable in y (through a graph, not detached)
    and in what the function closes over: against autograd's create_graph Jacobian."""
    weight = torch.randn(3, 3, dtype=DT, requires_grad=True)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)

    def fun(y):
        return torch.tanh(y @ weight) * y

    y = 2.0 * x  # a non-leaf carrying a graph
    jac = jacobian_with_graph(fun, y, batch_independent)
    torch.testing.assert_close(jac, jacobian(fun, y, batch_independent), rtol=1e-12, atol=1e-12)
    probe = torch.randn(jac.shape, dtype=DT)
    ours = torch.autograd.grad((jac * probe).sum(), (x, weight))

    def reference(x, weight):
        def g(y):
            return torch.tanh(y @ weight) * y

        full = torch.autograd.functional.jacobian(g, 2.0 * x, create_graph=True)
        full = full.reshape(12, 12)
        if batch_independent:
            full = torch.stack([full[3 * b: 3 * b + 3, 3 * b: 3 * b + 3] for b in range(4)])
        return (full * probe).sum()

    expected = torch.autograd.grad(reference(x, weight), (x, weight))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_shifted_solve_matches_lu_and_differentiates(batched):
    jac = torch.randn(*((3,) if batched else ()), 4, 4, dtype=DT, requires_grad=True)
    shift = torch.tensor(0.3, dtype=DT, requires_grad=True)
    rhs = torch.randn(3, 4, dtype=DT) if batched else torch.randn(4, dtype=DT)
    rhs.requires_grad_(True)
    for transpose in (False, True):
        x = shifted_solve(jac, shift, rhs, transpose=transpose)
        lu = ShiftedLU.factor(jac.detach(), float(shift.detach()))
        torch.testing.assert_close(x, lu.solve(rhs, transpose=transpose), rtol=1e-10,
                                   atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda j, s, r: shifted_solve(j, s, r, transpose=True), (jac, shift, rhs)
    )
