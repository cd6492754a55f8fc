"""Linear algebra of implicit steps: dense Jacobians, shifted LU solves, GMRES, simplified Newton.

An implicit stage solves D − c f(t, r + D) = 0 (c = h a_ii, ALGORITHMS.md §1). Its Newton matrix
is M = I − c J with J = ∂f/∂y; the discrete adjoint solves with M^T. Both are served here:
dense LU of M for small states (one small LU per sample when f treats the leading batch
dimension independently) and matrix-free GMRES for large ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "jacobian", "jacobian_with_graph", "linearize", "ShiftedLU", "shifted_solve", "gmres",
    "newton", "NewtonResult",
]


def jacobian(fun: Callable[[Tensor], Tensor], y: Tensor, batch_independent: bool = False) -> Tensor:
    """∂fun/∂y as a detached matrix: (d, d) with d = y.numel(), or (B, n, n) per sample.

    With `batch_independent`, fun must not couple samples along y's leading dimension; then
    one VJP per component of one sample (with the same cotangent for every sample) gives all
    B diagonal blocks at once. The VJPs are vectorised with torch.func.vmap, falling back to a
    loop for functions vmap cannot trace.
    """
    y = y.detach()
    batch = y.shape[0] if batch_independent else 1
    n, basis = _unit_basis(y, batch_independent)
    with torch.enable_grad():
        try:
            _, vjp_fn = torch.func.vjp(fun, y)
            rows = torch.func.vmap(vjp_fn)(basis)[0]
        except (RuntimeError, NotImplementedError):
            rows = _jacobian_rows_loop(fun, y, basis)
    rows = rows.detach()
    if batch_independent:
        return rows.reshape(n, batch, n).transpose(0, 1)  # J_b[k, :] = ∂fun_b[k]/∂y_b
    return rows.reshape(n, n)


def _unit_basis(y: Tensor, batch_independent: bool) -> tuple[int, Tensor]:
    """(n, the n unit cotangents shaped like y): over all of y, or, with `batch_independent`,
    over one sample's components, repeated across the batch."""
    if batch_independent:
        n = math.prod(y.shape[1:])
        basis = torch.eye(n, dtype=y.dtype, device=y.device).reshape(n, 1, *y.shape[1:])
        return n, basis.expand(n, *y.shape)
    n = y.numel()
    return n, torch.eye(n, dtype=y.dtype, device=y.device).reshape(n, *y.shape)


def jacobian_with_graph(
    fun: Callable[[Tensor], Tensor], y: Tensor, batch_independent: bool = False
) -> Tensor:
    """∂fun/∂y as `jacobian` lays it out, but differentiable (built with create_graph=True).

    For second derivatives: the matrix depends, through autograd, on y (which may carry a
    graph: it is not detached) and on whatever fun closes over (parameters, t). One
    graph-building VJP per component (of one sample with `batch_independent`), batched with
    `is_grads_batched` when autograd can, else in a loop.
    """
    n, basis = _unit_basis(y, batch_independent)
    with torch.enable_grad():
        if not y.requires_grad:
            y = y.detach().requires_grad_(True)
        out = fun(y)
        rows = None
        if out.requires_grad and n > 0:  # else nothing to differentiate
            try:
                (rows,) = torch.autograd.grad(
                    out, y, basis, create_graph=True, is_grads_batched=True, allow_unused=True
                )
            except (RuntimeError, NotImplementedError):
                loop = [
                    torch.autograd.grad(out, y, v, create_graph=True, retain_graph=True,
                                        allow_unused=True)[0]
                    for v in basis
                ]
                rows = torch.stack([torch.zeros_like(y) if r is None else r for r in loop])
        if rows is None:
            rows = torch.zeros_like(basis)
    if batch_independent:
        return rows.reshape(n, y.shape[0], n).transpose(0, 1)
    return rows.reshape(n, n)


def shifted_solve(
    jac: Tensor, shift: Tensor | float, rhs: Tensor, transpose: bool = False
) -> Tensor:
    """(I − shift·J)^{-1} rhs, or (I − shift·J)^{-T} rhs, differentiable in J, shift and rhs.

    J is dense, (d, d) or per-sample blocks (B, n, n) as `jacobian` returns it; rhs has the
    state's shape. torch.linalg.solve, so that second derivatives can pass through the solve
    (ShiftedLU is the fast path when no graph is needed).
    """
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    matrix = eye - shift * jac
    if transpose:
        matrix = matrix.transpose(-1, -2)
    b = rhs.reshape(*jac.shape[:-1], 1) if jac.dim() == 3 else rhs.reshape(-1, 1)
    return torch.linalg.solve(matrix, b).reshape(rhs.shape)


def linearize(fun: Callable[[Tensor], Tensor], y: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ (∂fun/∂y) v at y, matrix-free, by differentiating a VJP (reverse over reverse).

    One forward and one graph-building backward here; each product is then one backward
    pass of the VJP's graph, which is linear in the dummy cotangent u: ∂(J^T u)/∂u applied
    to v is J v. Needs fun to be twice differentiable by autograd.
    """
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        out = fun(y)
        u = torch.zeros_like(out, requires_grad=True)
        (pulled,) = torch.autograd.grad(out, y, u, create_graph=True, allow_unused=True)
    if pulled is None:  # fun does not depend on y
        return torch.zeros_like

    def product(v: Tensor) -> Tensor:
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(pulled, u, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if jv is None else jv

    return product


def _jacobian_rows_loop(fun: Callable[[Tensor], Tensor], y: Tensor, basis: Tensor) -> Tensor:
    y = y.clone().requires_grad_(True)
    out = fun(y)
    rows = [
        torch.autograd.grad(out, y, v, retain_graph=True, allow_unused=True)[0]
        for v in basis
    ]
    return torch.stack([torch.zeros_like(y) if r is None else r for r in rows])


@dataclass
class ShiftedLU:
    """LU factors of M = I − c·J for a dense J of shape (d, d) or (B, n, n)."""

    lu: Tensor
    pivots: Tensor
    shift: float  # c

    @classmethod
    def factor(cls, jac: Tensor, shift: float) -> ShiftedLU:
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        # lu_factor_ex: no error check (a host sync, and slow for small batches); a singular
        # M shows up as non-finite solves, which Newton reports as a failure.
        lu, pivots, _ = torch.linalg.lu_factor_ex(eye - shift * jac)
        return cls(lu, pivots, shift)

    def solve(self, rhs: Tensor, transpose: bool = False) -> Tensor:
        """M^{-1} rhs, or M^{-T} rhs; rhs has the state's shape."""
        if self.lu.dim() == 3:
            b = rhs.reshape(*self.lu.shape[:-1], 1)
        else:
            b = rhs.reshape(-1, 1)
        x = torch.linalg.lu_solve(self.lu, self.pivots, b, adjoint=transpose)
        return x.reshape(rhs.shape)


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    restart: int = 20,
    max_iters: int = 200,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, bool, float]:
    """Restarted GMRES(m) for A x = b, x0 = 0 (Saad & Schultz 1986).

    Arnoldi with classical Gram–Schmidt applied twice (CGS2: two matrix products per
    iteration), Givens rotations on the host for the small least-squares problem. Stops when
    ‖b − A x‖ ≤ max(rtol ‖b‖, atol). Returns (x, converged, relative residual); a non-finite
    b returns at once (x nan, not converged).
    `preconditioner` P ≈ A⁻¹ (linear) preconditions on the right (Saad, Iterative Methods
    §9.3.2): GMRES solves A P u = b and returns x = P u, whose residual is the same, so P
    changes how fast it converges, not what to.
    """
    if preconditioner is not None:
        u, converged, relative = gmres(
            lambda v: matvec(preconditioner(v)), b, rtol=rtol, atol=atol, restart=restart,
            max_iters=max_iters,
        )
        return preconditioner(u), converged, relative
    shape = b.shape
    b = b.reshape(-1)
    b_norm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return x.reshape(shape), True, 0.0
    if not math.isfinite(b_norm):  # no Krylov space to build: report it at once
        return torch.full_like(b, math.nan).reshape(shape), False, math.nan
    target = max(rtol * b_norm, atol)
    residual = b
    beta = b_norm
    total = 0
    while total < max_iters:
        m = min(restart, max_iters - total)
        basis = torch.empty(m + 1, b.numel(), dtype=b.dtype, device=b.device)
        basis[0] = residual / beta
        hessenberg = [[0.0] * m for _ in range(m + 1)]
        cs, sn = [0.0] * m, [0.0] * m
        g = [beta] + [0.0] * m
        k = 0
        for k in range(m):
            w = matvec(basis[k].reshape(shape)).reshape(-1)
            coefficients = basis[: k + 1] @ w
            w = w - coefficients @ basis[: k + 1]
            correction = basis[: k + 1] @ w
            w = w - correction @ basis[: k + 1]
            column = (coefficients + correction).tolist()
            w_norm = float(torch.linalg.vector_norm(w))
            column.append(w_norm)
            for j in range(k):  # apply the previous rotations to the new column
                column[j], column[j + 1] = (
                    cs[j] * column[j] + sn[j] * column[j + 1],
                    -sn[j] * column[j] + cs[j] * column[j + 1],
                )
            radius = math.hypot(column[k], column[k + 1])
            cs[k], sn[k] = (1.0, 0.0) if radius == 0.0 else (
                column[k] / radius, column[k + 1] / radius
            )
            column[k], column[k + 1] = radius, 0.0
            g[k], g[k + 1] = cs[k] * g[k], -sn[k] * g[k]
            for i in range(k + 2):
                hessenberg[i][k] = column[i]
            total += 1
            breakdown = w_norm <= 1e-14 * max(abs(c) for c in column[: k + 1] + [1e-300])
            if abs(g[k + 1]) <= target or breakdown:
                break
            basis[k + 1] = w / w_norm
        k_used = k + 1
        # Back substitution for the upper triangular system R y = g.
        y = [0.0] * k_used
        for i in reversed(range(k_used)):
            s = g[i] - sum(hessenberg[i][j] * y[j] for j in range(i + 1, k_used))
            y[i] = s / hessenberg[i][i] if hessenberg[i][i] != 0.0 else 0.0
        coefficients = torch.tensor(y, dtype=b.dtype, device=b.device)
        x = x + coefficients @ basis[:k_used]
        residual = b - matvec(x.reshape(shape)).reshape(-1)
        beta = float(torch.linalg.vector_norm(residual))
        if beta <= target or not math.isfinite(beta):
            break
    return x.reshape(shape), beta <= target, beta / b_norm


@dataclass
class NewtonResult:
    """The outcome of one Newton solve."""

    z: Tensor
    converged: bool
    iterations: int
    rate: float  # the last observed contraction ‖Δz_k‖ / ‖Δz_{k−1}‖ (0 if unknown)
    eta: float  # η = θ/(1 − θ) to start the next solve with
    finite: bool = True  # False: it stopped on a non-finite residual or update (inf or nan)


def newton(
    residual: Callable[[Tensor], Tensor],
    z0: Tensor,
    solve: Callable[[Tensor, Tensor], Tensor],
    scale: Tensor,
    *,
    kappa: float = 1e-2,
    max_iters: int = 10,
    eta: float = 1.0,
    give_up_early: bool = True,
) -> NewtonResult:
    """Simplified Newton z_{k+1} = z_k − M̃^{-1} G(z_k), stopped as in Hairer–Wanner IV.8.

    `solve(G, z)` applies M̃^{-1} (a frozen factorisation, or a Krylov solve linearised at z).
    With rate θ_k = ‖Δz_k‖/‖Δz_{k−1}‖ in the norm ‖·/scale‖_rms, the iteration has converged
    when η_k ‖Δz_k‖ ≤ κ, η_k = θ_k/(1 − θ_k) (η_0 = max(`eta`, 1e-16)^0.8 from the previous
    solve); it fails on θ_k ≥ 1, on a non-finite value, or (`give_up_early`, meant for a
    frozen Jacobian, whose rate is roughly constant) when a slow iteration (θ_k > ½) cannot
    reach κ in the remaining iterations. `scale` must stay above round-off of z.
    An empty z is solved as it stands (no residual is evaluated).
    """
    z = z0
    previous = 0.0
    rate = 0.0
    eta = max(eta, 1e-16) ** 0.8
    if z.numel() == 0:
        return NewtonResult(z, True, 0, rate, eta)
    for k in range(max_iters):
        dz = solve(residual(z), z)
        z = z - dz
        size = float((dz / scale).pow(2).mean().sqrt())
        if not math.isfinite(size):
            return NewtonResult(z, False, k + 1, rate, 1.0, finite=False)
        if size == 0.0:
            return NewtonResult(z, True, k + 1, rate, eta)
        if k > 0:
            rate = size / previous
            if rate >= 1.0:
                return NewtonResult(z, False, k + 1, rate, 1.0)
            eta = rate / (1.0 - rate)
            remaining = max_iters - 1 - k
            if give_up_early and rate > 0.5 and rate**remaining / (1.0 - rate) * size > kappa:
                return NewtonResult(z, False, k + 1, rate, 1.0)
        if eta * size <= kappa:
            return NewtonResult(z, True, k + 1, rate, eta)
        previous = size
    return NewtonResult(z, False, max_iters, rate, 1.0)
