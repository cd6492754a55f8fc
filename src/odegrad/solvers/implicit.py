"""Diagonally implicit Runge–Kutta steps for stiff problems, with their discrete adjoint.

Methods (tableaus in `tableaus.DIRK_TABLEAUS`, all ESDIRK, stiffly accurate, FSAL):
`implicit_euler` and `crank_nicolson` (the θ-method with θ = 1 and ½; fixed steps by default,
adaptive with `adaptive=True`), `kvaerno3` and `kvaerno5` (Kværnø's L-stable pairs, adaptive).

Forward step (ALGORITHMS.md §1). Each implicit stage solves, for D_i = h γ K_i,

    D_i − h γ f(t_n + c_i h, r_i + D_i) = 0,   r_i = y_n + h Σ_{j<i} a_ij K_j,   γ = a_ii,

by simplified Newton (`linalg.newton`) with the Newton matrix M = I − hγJ: a dense Jacobian
J = ∂f/∂y evaluated at the start of a step and reused across steps while Newton contracts fast
(its LU refactored when hγ changes by more than 20%), or matrix-free GMRES with the product
v ↦ J v linearised at the same point and reused the same way (`linalg.linearize`).
K_i = D_i/(hγ) (no extra f evaluation; the "z-formulation" of Hairer–Wanner IV.8, which also
keeps K accurate for tiny h). The next step's K_1 is this step's K_s. A stage whose
simplified Newton iteration fails is retried by full Newton (re-linearised at every iterate);
then a step with a stale Jacobian is retried with a fresh one; then `StepRejected` makes the
loop retry with a smaller step.
Fixed steps, or ten failures in a row, raise NewtonConvergenceError naming t and h. When
Newton meets inf or nan and f itself is non-finite at the stage time for the step's (finite)
start state, or at the start, NonFiniteError names that time at once (smaller steps cannot get
past it); an iterate that merely left f's domain is a Newton failure like any other. An empty
state is solved as it stands.

Gradients. With autograd recording (gradient="direct") the Newton iterations are not
differentiated: each stage is attached to the graph through the implicit-function theorem,
D₁ = D* − S(F(D*, r_i, θ)) with S's value 0 and its VJP (I − hγJ)^{-T} taken at the converged
stage point, so the direct gradient is the exact derivative of the discrete scheme at the
computed stages (one transposed solve per stage in the backward pass). Double backward
(create_graph=True, hessian, hvp): D₁ holds D* constant inside F, so differentiating its VJP
again misses ∂²F/∂θ∂D·dD/dθ (1–8 % off). The dense path therefore records one more Newton step
from D₁, D = D₁ − S(F(D₁, r_i, θ)), whose S rebuilds J at r_i + D₁ with a graph and solves with
torch.linalg.solve when the backward builds a graph: its error is quadratic in D₁'s, so first
and second derivatives are exact (third ones are not). Cost: two f evaluations with a graph
per stage in the forward pass; a plain backward drops the first level (its cotangent is 0 up to
round-off) and costs one transposed solve per stage as before. GMRES keeps one level and raises
UnsupportedCombinationError on double backward. `step_vjp` is the discrete adjoint of one step:
transposed stage solves, each parameter term taken at its own stage point.

Method options (keywords of `odegrad.solve`):
    linear_solver      "dense" (LU of M), "gmres" (matrix-free) or "auto" (dense up to 128
                       unknowns per LU block, else GMRES)
    batch_independent  f does not couple samples along y's leading dimension: dense J is then
                       block diagonal, one small LU per sample (GMRES ignores it)
    newton_kappa       Newton stops at κ · (atol + rtol |y_n|), κ = 1e-2 (rtol floored at
                       1e4 · machine epsilon); with fixed steps rtol/atol set only this
    newton_max_iters   iterations of simplified Newton per stage (10; full Newton gets 20)
    jacobian_refresh_rate  re-evaluate J at the next step when a contraction rate exceeds it
    gmres_restart, gmres_max_iters, gmres_rtol  the forward Krylov solves (30, 300, 1e-3)
    transposed_rtol    relative residual of the transposed GMRES solves in the backward pass
                       (gradient="direct" and "discrete"; default max(1e-11, 100 · machine
                       epsilon)). Not `adjoint_rtol`: that is the continuous adjoint's.
    preconditioner     for GMRES: a callable (t, y, shift) -> P with P(v) ≈ (I − shift·J)⁻¹ v,
                       J = ∂f/∂y at (t, y) (e.g. the inverse of I − shift·diag(J) when a known
                       stiff decay dominates J). Called per stage solve: forward at the stage
                       time and base point r_i, backward at the stage point; the transposed
                       solves use `P.transposed` if P has it, else P (exact for a diagonal or
                       symmetric P). Right preconditioning changes the iteration counts, never
                       the solution GMRES converges to.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import (
    InvalidInputError,
    NewtonConvergenceError,
    NonFiniteError,
    UnsupportedCombinationError,
)
from ..linalg import (
    ShiftedLU,
    gmres,
    jacobian,
    jacobian_with_graph,
    linearize,
    newton,
    shifted_solve,
)
from ..tableaus import DIRK_PREDICTORS, DIRK_TABLEAUS, ButcherTableau
from . import register_solver
from .base import Scalar, Solver, Step, StepRejected, VectorField, axpy_sum, dense_weights

__all__ = ["DiagonallyImplicitRungeKutta", "CrankNicolson", "ImplicitCarry"]

# (t, y, shift) -> P with P(v) ≈ (I − shift·∂f/∂y(t, y))⁻¹ v: a GMRES preconditioner.
Preconditioner = Callable[[Tensor, Tensor, float], Callable[[Tensor], Tensor]]

LINEAR_SOLVERS = ("auto", "dense", "gmres")
_DENSE_MAX = 128  # "auto": dense LU up to this many unknowns per block


@dataclass
class ImplicitCarry:
    """What the next step reuses: the FSAL stage and the Newton matrix."""

    k1: Tensor  # K_1 = f(t_n, y_n)
    jac: Tensor | Callable | None = None  # J reused across steps: a dense (d, d) or (B, n, n)
    # matrix, or v ↦ J v for GMRES
    lu: ShiftedLU | None = None  # factors of I − hγJ for the last hγ
    jac_current: bool = False  # jac was evaluated at this carry's (t_n, y_n)
    refresh: bool = False  # Newton contracted slowly: re-evaluate jac before the next solve
    eta: float = 1.0  # Newton's last η = θ/(1 − θ)
    previous: tuple[Tensor, float] | None = None  # (K_1, h) of the step before (CN's estimate)


class _ImplicitStage(torch.autograd.Function):
    """Value 0, VJP g ↦ (I − hγJ)^{-T} g: attaches a converged stage to the graph (IFT).

    Inputs: the recorded residual F (the only one differentiated at first order), and the
    stage point r + D, the stage time and hγ (tensors when they carry a graph), which a
    second-order pass differentiates J through. With a graph requested in the backward
    (create_graph=True) the solve is rebuilt differentiably: J = ∂f/∂y at that point with
    create_graph and torch.linalg.solve (dense only; `_StageSolve.with_graph` raises for GMRES).
    """

    @staticmethod
    def forward(ctx, residual: Tensor, point: Tensor, t_stage, shift, stage) -> Tensor:
        ctx.stage = stage
        ctx.time_and_shift = (t_stage, shift)
        ctx.save_for_backward(point)
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is coming
            (point,) = ctx.saved_tensors
            t_stage, shift = ctx.time_and_shift
            kappa = ctx.stage.with_graph(grad, point, t_stage, shift)
        else:
            kappa = ctx.stage(grad)
        return kappa, None, None, None, None


class _StageAnchor(torch.autograd.Function):
    """Value 0 with the first-order VJP of `_ImplicitStage`, evaluated at the stage point with D
    held constant: D₁ = D* − anchor(F(D*, r, θ)) has the stage's value and exact first
    derivative. The stage then takes one Newton step from D₁, D = D₁ − S(F(D₁, r, θ)), whose
    error is quadratic in D₁'s: second derivatives exact (ALGORITHMS.md §10).

    First order, the cotangent reaching D₁ is g − M^T M^{-T} g = 0 (round-off): dropped, so a
    plain backward costs what it did before. Once a graph-building pass (create_graph=True)
    has gone through, later passes (the second-order ones) need it and get the solve.
    """

    @staticmethod
    def forward(ctx, residual: Tensor, stage) -> Tensor:
        ctx.stage = stage
        ctx.graph_pass_seen = False
        ctx.set_materialize_grads(False)
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        if grad is None:
            return None, None
        if torch.is_grad_enabled():
            ctx.graph_pass_seen = True
        elif not ctx.graph_pass_seen:
            return None, None
        # Not itself differentiated: in the graph-building pass `grad` is 0 up to round-off
        # with a derivative that vanishes identically, and second-order passes need its value.
        with torch.no_grad():
            return ctx.stage(grad.detach()), None


class DiagonallyImplicitRungeKutta(Solver):
    """An ESDIRK step (explicit first stage, a_ii = γ after it) solved by Newton's method."""

    implicit = True
    # PI 0.7/0.4 (Gustafsson): on van der Pol (μ = 1000, kvaerno5, rtol 1e-6) Hairer's
    # 0.85/0.2 missed Radau's solution by 3.1e-4 at the outputs (572 steps), these by 7.9e-5
    # (690): benchmarks/bench_controller.py --stiff.
    controller_coefficients = (0.7, 0.4)

    def __init__(
        self,
        tableau: ButcherTableau,
        predictor: list[list[float]],
        *,
        linear_solver: str = "auto",
        batch_independent: bool = False,
        adaptive_by_default: bool = True,
        newton_kappa: float = 1e-2,
        newton_max_iters: int = 10,
        jacobian_refresh_rate: float = 0.2,
        gmres_restart: int = 30,
        gmres_max_iters: int = 300,
        gmres_rtol: float = 1e-3,
        transposed_rtol: float | None = None,
        preconditioner: Preconditioner | None = None,
    ):
        if linear_solver not in LINEAR_SOLVERS:
            raise InvalidInputError(
                f"linear_solver must be one of {', '.join(LINEAR_SOLVERS)}, got {linear_solver!r}"
            )
        if preconditioner is not None and not callable(preconditioner):
            raise InvalidInputError(
                f"preconditioner must be a callable (t, y, shift) -> P, got {preconditioner!r}"
            )
        if tableau.a[0, 0] != 0.0 or not tableau.fsal:
            raise ValueError(f"tableau {tableau.name!r} is not a stiffly accurate ESDIRK")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.linear_solver = linear_solver
        self.batch_independent = batch_independent
        self._adaptive_by_default = adaptive_by_default
        self.newton_kappa = newton_kappa
        self.newton_max_iters = newton_max_iters
        self.jacobian_refresh_rate = jacobian_refresh_rate
        self.gmres_restart = gmres_restart
        self.gmres_max_iters = gmres_max_iters
        self.gmres_rtol = gmres_rtol
        self.transposed_rtol = transposed_rtol
        self.preconditioner = preconditioner
        self._c = [float(v) for v in tableau.c]
        self._a = [[float(v) for v in row[: i + 1]] for i, row in enumerate(tableau.a)]
        self._b = [float(v) for v in tableau.b]
        self._e = None if tableau.error is None else [float(v) for v in tableau.error]
        self._predictor = [[float(v) for v in row] for row in predictor]
        self._rtol: Tensor | float = 1e-6
        self._atol: Tensor | float = 1e-8

    @property
    def stages(self) -> int:
        return self.tableau.stages

    @property
    def adaptive(self) -> bool:
        return self._adaptive_by_default and self.error_order is not None

    def configure(self, *, rtol: Tensor | float, atol: Tensor | float) -> None:
        """Newton stops at κ in the norm scaled by atol + rtol |y_n| (the loop's tolerances)."""
        self._rtol, self._atol = rtol, atol

    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> ImplicitCarry:
        return ImplicitCarry(k1=f(t0, y0))

    def reuse_first_stage(self, carry: ImplicitCarry) -> Tensor:
        return carry.k1

    def interpolate(self, y: Tensor, h: Scalar, dense: list[Tensor], theta: Scalar) -> Tensor:
        return axpy_sum(y, h, self.dense_weights(theta), dense)

    def dense_weights(self, theta: Scalar) -> list:
        """b_i(θ) of the cubic Hermite interpolant (floats, or 0-dim tensors for a tensor θ)."""
        return dense_weights(self.tableau.dense, theta)

    def uses_dense(self, y: Tensor) -> bool:
        """Whether stage equations are solved with dense LU (else GMRES)."""
        if self.linear_solver != "auto":
            return self.linear_solver == "dense"
        block = math.prod(y.shape[1:]) if self.batch_independent and y.dim() > 0 else y.numel()
        return block <= _DENSE_MAX

    # ----------------------------------------------------------------------------- forward
    def step(self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: ImplicitCarry) -> Step:
        dense = self.uses_dense(y)
        hf = _to_float(h)
        # The caller's carry stays untouched; a retry reuses this attempt's (its refreshed J
        # and LU, η reset). The loop hands the carry the accepted attempt started from to
        # on_step, so gradient="discrete" replays that attempt bit for bit.
        carry = replace(carry)
        if carry.jac is None or carry.refresh:
            self._evaluate_jacobian(f, t, y, carry, dense)
        outcome = self._stages(f, t, h, hf, y, carry, dense)
        if isinstance(outcome, NewtonConvergenceError) and not carry.jac_current:
            self._evaluate_jacobian(f, t, y, carry, dense)  # J was stale: retry once
            outcome = self._stages(f, t, h, hf, y, carry, dense)
        if isinstance(outcome, NonFiniteError):
            raise outcome
        if isinstance(outcome, NewtonConvergenceError):
            carry.eta = 1.0
            raise StepRejected(outcome, retry_carry=carry)
        ks, y_next, slowest = outcome
        with torch.no_grad():
            error = self.error_estimate(h, [k.detach() for k in ks], carry)
        next_carry = ImplicitCarry(
            k1=ks[-1], jac=carry.jac, lu=carry.lu, jac_current=False,
            refresh=slowest > self.jacobian_refresh_rate, eta=carry.eta,
            previous=(ks[0].detach(), hf),
        )
        return Step(y=y_next, error=error, dense=ks, carry=next_carry, retry_carry=carry)

    def error_estimate(self, h: Scalar, ks: list[Tensor], carry: ImplicitCarry) -> Tensor | None:
        """The embedded estimate h Σ e_i K_i (ALGORITHMS.md §1)."""
        return None if self._e is None else axpy_sum(None, _to_float(h), self._e, ks)

    def _evaluate_jacobian(self, f, t: Tensor, y: Tensor, carry: ImplicitCarry, dense: bool):
        t_d = t.detach()
        carry.jac = self._linearize(lambda v: f(t_d, v), y, dense)
        carry.lu, carry.jac_current, carry.refresh = None, True, False

    def _linearize(self, fun, y: Tensor, dense: bool) -> Tensor | Callable:
        """J at y: a dense matrix (blocks), or the matrix-free product v ↦ J v."""
        if dense:
            return jacobian(fun, y, self.batch_independent)
        return linearize(fun, y)

    def _newton_matrix(self, carry: ImplicitCarry, shift: float) -> ShiftedLU:
        lu = carry.lu
        if lu is None or abs(shift / lu.shift - 1.0) > 0.2:
            lu = carry.lu = ShiftedLU.factor(carry.jac, shift)
        return lu

    def _stages(self, f, t, h, hf, y, carry, dense):
        """All stages of one step; on failure a NewtonConvergenceError, or a NonFiniteError when
        f is non-finite at the stage time (returned, not raised)."""
        grad = torch.is_grad_enabled()
        t_d = t.detach()
        y_d = y.detach()
        # Newton's tolerance κ in this scale; rtol is floored so that κ stays above round-off.
        rtol = self._rtol
        floor = 1e4 * torch.finfo(y_d.dtype).eps
        rtol = rtol.clamp_min(floor) if isinstance(rtol, Tensor) else max(rtol, floor)
        scale = self._atol + rtol * y_d.abs()
        ks = [carry.k1]
        slowest = 0.0
        point = y
        for i in range(1, self.stages):
            a_i = self._a[i]
            gamma = a_i[i]
            shift = hf * gamma
            r = axpy_sum(y, h, a_i[:i], ks)
            r_d = r.detach()
            t_i = t_d + self._c[i] * hf

            def fun(v, t_i=t_i):
                return f(t_i, v)

            with torch.no_grad():
                d0 = axpy_sum(None, shift, self._predictor[i], [k.detach() for k in ks])
                if dense:
                    def solve(g, d, shift=shift):
                        return self._newton_matrix(carry, shift).solve(g)
                else:
                    inverse = self._preconditioner(t_i, r_d, shift)

                    def solve(g, d, shift=shift, inverse=inverse):
                        product = carry.jac
                        return gmres(
                            lambda v: v - shift * product(v), g, rtol=self.gmres_rtol,
                            restart=self.gmres_restart, max_iters=self.gmres_max_iters,
                            preconditioner=inverse,
                        )[0]

                def residual(d, r_d=r_d, fun=fun, shift=shift):
                    return d - shift * fun(r_d + d)

                result = newton(
                    residual, d0, solve, scale, kappa=self.newton_kappa,
                    max_iters=self.newton_max_iters, eta=carry.eta,
                )
                if not result.finite:
                    nonfinite = self._nonfinite_f(f, t_d, t_i, y_d, ks[0], hf, i)
                    if nonfinite is not None:
                        return nonfinite
                if not result.converged:
                    # Full Newton for this stage: re-linearise at every iterate.
                    def full_solve(g, d, r_d=r_d, fun=fun, solve=solve):
                        carry.jac = self._linearize(fun, r_d + d, dense)
                        carry.lu, carry.jac_current = None, False
                        return solve(g, d)

                    result = newton(
                        residual, d0, full_solve, scale, kappa=self.newton_kappa,
                        max_iters=2 * self.newton_max_iters, give_up_early=False,
                    )
            if not result.converged:
                how = (
                    "an iterate made f or the linear solve non-finite" if not result.finite
                    else f"contraction rate {result.rate:.3g}"
                )
                return NewtonConvergenceError(
                    f"Newton's method did not converge for stage {i + 1} of {self.name} at "
                    f"t={float(t_d):.10g} with step size h={hf:.3e} ({result.iterations} "
                    f"iterations, {how}); with fixed steps, reduce step_size"
                )
            slowest = max(slowest, result.rate)
            carry.eta = result.eta
            d = result.z
            if grad:
                d = self._attach(f, t, h, r, r_d, d, t_i, shift, gamma, i, dense)
            ks.append(d / (h * gamma))
            point = r + d
        return ks, point, slowest

    def _nonfinite_f(self, f, t_n, t_i, y_n, k1, hf, i) -> NonFiniteError | None:
        """After Newton met inf or nan: the error to raise when f itself is non-finite at the
        step's start (K_1) or at the stage time t_i for the step's (finite) start state y_n,
        where no smaller step or fresh Jacobian can help; None when it is the iteration's
        fault (an iterate out of f's domain: retried as a Newton failure)."""
        where = f"stage {i + 1} of {self.name} in the step from t={float(t_n):.10g}, h={hf:.3e}"
        with torch.no_grad():
            if not bool(torch.isfinite(k1).all()):
                return NonFiniteError(
                    f"f returned a non-finite value at t={float(t_n):.10g} (at the state "
                    f"there; {where})"
                )
            value = f(t_i, y_n)
            if not bool(torch.isfinite(value).all()):
                return NonFiniteError(
                    f"f returned a non-finite value at t={float(t_i):.10g} (at the state of "
                    f"t={float(t_n):.10g}; {where})"
                )
        return None

    def _attach(self, f, t, h, r, r_d, d, t_i, shift, gamma, i, dense):
        """The converged stage D* = d attached to the graph (the direct gradient).

        Implicit function theorem: D = D* − S(F(D*, r_i, θ)), F(D, r, θ) = D − hγ f(t_i, r + D),
        S of value 0 and VJP (I − hγJ)^{-T}. Dense: that first-order-exact D₁ is the start of
        one more (lazily differentiated) Newton step, so that double backward is exact too;
        GMRES: one level, and double backward raises.
        """
        shift_t = h * gamma  # a tensor when times are differentiated
        t_stage = t + self._c[i] * h
        recorded = d - shift_t * f(t_stage, r + d)  # F(D*, r_i, θ) ≈ 0
        if not recorded.requires_grad or d.numel() == 0:
            return d
        stage = _StageSolve(self, f, t_i, shift, dense, r_d + d)
        if not dense:
            return d - _ImplicitStage.apply(recorded, r_d + d, t_stage, shift_t, stage)
        d1 = d - _StageAnchor.apply(recorded, stage)
        point = r + d1
        recorded = d1 - shift_t * f(t_stage, point)  # F(D₁, r_i, θ), the same value
        return d1 - _ImplicitStage.apply(recorded, point, t_stage, shift_t, stage)

    # ------------------------------------------------------------------ discrete adjoint
    def _preconditioner(self, t: Tensor, y: Tensor, shift: float):
        """The user's approximate (I − shift·J(t, y))⁻¹, built without a graph; None if unset."""
        if self.preconditioner is None:
            return None
        with torch.no_grad():
            return self.preconditioner(t.detach(), y.detach(), shift)

    def solve_transposed(
        self, f: VectorField, t_i: Tensor, point: Tensor, shift: float, rhs: Tensor,
        vjp_fn=None,
    ) -> Tensor:
        """(I − shift·J^T)^{-1} rhs with J = ∂f/∂y at (t_i, point), ALGORITHMS.md §1.

        Dense: a fresh Jacobian at the stage point and a transposed LU solve. GMRES: the
        operator v ↦ v − shift·J^T v through VJPs (`vjp_fn`, or one built here).
        """
        if self.uses_dense(point):
            jac = jacobian(lambda v: f(t_i, v), point, self.batch_independent)
            return ShiftedLU.factor(jac, shift).solve(rhs, transpose=True)
        if vjp_fn is None:
            with torch.enable_grad():
                p = point.detach().requires_grad_(True)
                out = f(t_i, p)

            def vjp_fn(v, out=out, p=p):
                with torch.enable_grad():
                    return torch.autograd.grad(out, p, v, retain_graph=True)
        rtol = self.transposed_rtol
        if rtol is None:
            rtol = max(1e-11, 100 * torch.finfo(rhs.dtype).eps)
        inverse = self._preconditioner(t_i, point, shift)
        x, converged, residual = gmres(
            lambda v: v - shift * vjp_fn(v)[0], rhs, rtol=rtol, restart=self.gmres_restart,
            max_iters=self.gmres_max_iters,
            preconditioner=None if inverse is None else getattr(inverse, "transposed", inverse),
        )
        if not converged:
            warnings.warn(
                f"{self.name}: the transposed stage solve reached a relative residual of "
                f"{residual:.2e} (target {rtol:.1e}); the gradient is that inexact",
                RuntimeWarning, stacklevel=2,
            )
        return x

    def step_vjp(
        self,
        f: VectorField,
        t: Tensor,
        h: float,
        state: Tensor,
        step: Step,
        state_next_bar: Tensor,
        dense_bars: list[tuple[float, Tensor]],
        params: tuple[Tensor, ...],
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """Pull ∂L/∂y_{n+1} and the cotangents of outputs read inside the step back to y_n.

        With κ_i = ∂L/∂K_i (ALGORITHMS.md §1), for i = s, …, 1:
            (I − h a_ii J_i^T) κ_i = h b_i λ + h Σ_θ b_i(θ) ȳ_θ + h Σ_{j>i} a_ji J_j^T κ_j,
        then λ_n = λ + Σ_θ ȳ_θ + Σ_i J_i^T κ_i and μ = Σ_i P_i^T κ_i, where J_i^T κ_i and
        P_i^T κ_i come from one VJP of f at the stage's own point (t_n + c_i h, Y_i).
        Returns (λ_n, μ) with None for parameters f does not use; t and h are constants here
        (no time cotangents). Cost: one VJP per stage, plus per implicit stage a Jacobian and
        a transposed LU (dense) or one VJP per GMRES iteration.
        """
        ks = [k.detach() for k in step.dense]
        y = state.detach()
        t = t.detach()
        hf = float(h)
        lam = state_next_bar
        bars = [(self.dense_weights(float(theta)), bar) for theta, bar in dense_bars]
        lam_n = lam
        for _, bar in bars:
            lam_n = lam_n + bar
        pulled: list[Tensor | None] = [None] * self.stages  # J_j^T κ_j
        mu: list[Tensor | None] = [None] * len(params)
        for i in reversed(range(self.stages)):
            weights = [self._b[i]] + [w[i] for w, _ in bars]
            vectors = [lam] + [bar for _, bar in bars]
            for j in range(i + 1, self.stages):
                if pulled[j] is not None and self._a[j][i] != 0.0:
                    weights.append(self._a[j][i])
                    vectors.append(pulled[j])
            if all(w == 0.0 for w in weights):
                continue
            rhs = axpy_sum(None, hf, weights, vectors)
            point = axpy_sum(y, hf, self._a[i], ks[: i + 1])
            t_i = t + self._c[i] * hf
            with torch.enable_grad():
                p = point.clone().requires_grad_(True)
                out = f(t_i, p)
                gamma = self._a[i][i]
                if gamma != 0.0:
                    def vjp_fn(v, out=out, p=p):
                        return torch.autograd.grad(out, p, v, retain_graph=True)

                    kappa = self.solve_transposed(f, t_i, point, hf * gamma, rhs, vjp_fn)
                else:
                    kappa = rhs
                grads = torch.autograd.grad(out, (p, *params), kappa, allow_unused=True)
            pulled[i] = grads[0]
            lam_n = lam_n + grads[0]
            for k, g in enumerate(grads[1:]):
                if g is not None:
                    mu[k] = g if mu[k] is None else mu[k] + g
        return lam_n, tuple(mu)


def _to_float(h: Scalar) -> float:
    return float(h.detach()) if isinstance(h, Tensor) else float(h)


class _StageSolve:
    """The backward of one implicit stage: (I − hγJ^T)^{-1} g at the converged stage point.

    Called as `stage(g)`: without a graph, by the solver's `solve_transposed` (dense LU or
    GMRES) at `point`, the detached stage point r_i + D*. `with_graph`: the same solve with a
    graph through J(t_stage, point) and hγ as given, for double backward (dense only).
    """

    def __init__(self, solver, f, t_i: Tensor, shift: float, dense: bool, point: Tensor):
        self.solver, self.f, self.t_i, self.shift = solver, f, t_i, shift
        self.dense, self.point = dense, point

    def __call__(self, grad: Tensor) -> Tensor:
        with _backward_phase(self.f):
            return self.solver.solve_transposed(self.f, self.t_i, self.point, self.shift, grad)

    def with_graph(self, grad: Tensor, point: Tensor, t_stage, shift) -> Tensor:
        if not self.dense:
            raise UnsupportedCombinationError(
                f"{self.solver.name}: a second derivative (create_graph=True, hessian, hvp) "
                "through implicit stages solved by GMRES is not supported, as the matrix-free "
                'transposed solve cannot be differentiated exactly; use linear_solver="dense" '
                "(or a first-order gradient)"
            )
        with _backward_phase(self.f):
            jac = jacobian_with_graph(
                lambda v: self.f(t_stage, v), point, self.solver.batch_independent
            )
            return shifted_solve(jac, shift, grad, transpose=True)


@contextmanager
def _backward_phase(f):
    """Count f's evaluations as backward ones while inside."""
    stats = getattr(f, "stats", None)
    phase = None if stats is None else stats.get("_phase")
    if stats is not None:
        stats["_phase"] = "backward"
    try:
        yield
    finally:
        if stats is not None:
            if phase is None:
                stats.pop("_phase", None)
            else:
                stats["_phase"] = phase


class CrankNicolson(DiagonallyImplicitRungeKutta):
    """The trapezoidal rule; its error estimate uses the previous step (as circuit
    simulators do): LTE = −h³y'''/12 with y''' ≈ 2 f[t_{n−1}, t_n, t_{n+1}], the second divided
    difference of the stage derivatives K. The first step, with no history, falls back to the
    conservative h(K_2 − K_1)/2. The estimate steers the step size only; it is never
    differentiated."""

    def error_estimate(self, h: Scalar, ks: list[Tensor], carry: ImplicitCarry) -> Tensor:
        hf = _to_float(h)
        k1, k2 = ks
        if carry.previous is None:
            return 0.5 * hf * (k2 - k1)
        f_prev, h_prev = carry.previous
        divided = ((k2 - k1) / hf - (k1 - f_prev) / h_prev) / (hf + h_prev)
        return divided * (hf**3 / 6.0)


def _factory(name: str, cls: type, adaptive_by_default: bool):
    """`method=name`: the tableau and predictor of `name`, and the method options of `cls`
    (its keyword-only parameters, read by the option routing from this factory's signature)."""

    def factory(**options) -> DiagonallyImplicitRungeKutta:
        return cls(DIRK_TABLEAUS[name], DIRK_PREDICTORS[name],
                   adaptive_by_default=adaptive_by_default, **options)

    options = [
        p for p in inspect.signature(cls).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name != "adaptive_by_default"
    ]
    factory.__signature__ = inspect.Signature(options)
    factory.__name__ = name
    return factory


register_solver("implicit_euler", _factory("implicit_euler", DiagonallyImplicitRungeKutta, False))
register_solver("crank_nicolson", _factory("crank_nicolson", CrankNicolson, False))
register_solver("kvaerno3", _factory("kvaerno3", DiagonallyImplicitRungeKutta, True))
register_solver("kvaerno5", _factory("kvaerno5", DiagonallyImplicitRungeKutta, True))
