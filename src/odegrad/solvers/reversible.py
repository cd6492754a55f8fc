"""Algebraically reversible schemes: McCallum–Foster reversible Runge–Kutta (ALGORITHMS.md §6)
and reversible Heun (§7), and the interface that `gradient="reversible"` drives.

A reversible scheme advances an augmented state `torch.stack([y, w])` whose first row is the
solution (`observe`); its step can be undone exactly (`inverse_step`), so the backward pass needs
only the final state and the accepted step sizes. `reverse` fuses the reconstruction of one step
with the local vector-Jacobian product of that step: every f-evaluation the reconstruction makes
is taken with a graph and reused for the VJP, so the backward pass costs one F and one B per
f-evaluation of the forward step (the floor of §8).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..tableaus import TABLEAUS
from .base import Scalar, Solver, Step, VectorField, axpy_sum
from .explicit import ExplicitRungeKutta
from .parasitic import (
    ParasiticModeCheck,
    _parasitic_error,
)

__all__ = ["LocalAdjoint", "ReversibleSolver", "ReversibleRungeKutta", "ReversibleHeun"]


# (θ, ∂L/∂y(t_n + θh)) of every output read inside a step.
DenseCotangents = Sequence[tuple[Scalar, Tensor]]


class LocalAdjoint:
    """Pulls cotangents back through one step's graph and accumulates the gradients of `wrt`.

    `wrt` holds the parameters and, when times are differentiated, the leaf the step times are
    built from; their gradients are summed over every call into `grads`.
    """

    def __init__(self, wrt: Sequence[Tensor]):
        self.wrt = tuple(wrt)
        self.grads: list[Tensor | None] = [None] * len(self.wrt)

    def vjp(
        self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor],
        retain_graph: bool = False,
    ) -> list[Tensor]:
        """Σ_k (∂outputs_k/∂inputs)^T cotangents_k; the `wrt` part is accumulated."""
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        if not pairs:
            return [torch.zeros_like(x) for x in inputs]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], (*inputs, *self.wrt), [c for _, c in pairs],
            retain_graph=retain_graph, allow_unused=True,
        )
        n = len(inputs)
        for k, g in enumerate(grads[n:]):
            if g is not None:
                self.grads[k] = g if self.grads[k] is None else self.grads[k] + g
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads[:n])]


class ReversibleSolver(ParasiticModeCheck, Solver):
    """A scheme whose step is algebraically invertible, on the state `stack([y, w])`.

    Besides the `Solver` interface it offers `inverse_step` (the algebraic inverse, graph-free)
    and `reverse`/`finish`, the local adjoint that `gradient="reversible"` runs step by step.
    """

    def initial_state(self, y0: Tensor) -> Tensor:
        return torch.stack([y0, y0])

    def observe(self, state: Tensor) -> Tensor:
        return state[0]

    @abstractmethod
    def inverse_step(self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        """The state at t from the state at t + h (no graph)."""

    @abstractmethod
    def reverse(
        self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor, adjoint: Tensor,
        outputs: DenseCotangents, local: LocalAdjoint, back: Any,
    ) -> tuple[Tensor, Tensor, Any]:
        """Reconstruct the state at t and pull ∂L/∂state_next (and the outputs read inside the
        step) back to ∂L/∂state. `back` carries what the next (earlier) call needs; it starts
        as None. Returns (state, ∂L/∂state, back)."""

    def finish(
        self, f: VectorField, t0: Tensor, y0: Tensor, adjoint: Tensor, local: LocalAdjoint,
        back: Any,
    ) -> tuple[Tensor, Tensor]:
        """∂L/∂y0 from ∂L/∂state_0, and the true initial state (to measure the drift against)."""
        return adjoint[0] + adjoint[1], self.initial_state(y0)


class ReversibleRungeKutta(ReversibleSolver):
    """McCallum–Foster reversible scheme over an explicit Runge–Kutta base (ALGORITHMS.md §6).

        y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n)
        z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})

    with Ψ_h(t, x) = h Σ b_i K_i the base step's increment and y_0 = z_0 = x_0; the solution is
    y. The order is the base's; adaptive steps use the base's embedded estimate of Ψ_h(t_n, z_n).
    Dense output: y_n + θ(1 − λ)(z_n − y_n) + h Σ b_i(θ) K_i(z_n), exact at both ends.

    Stability: on y' = ay the parasitic eigenvalue is about λ/R(ha), so a dissipative mode
    needs h|Re a| ≲ 1 − λ in the forward pass (λ = 1 blows up on dissipative problems), while
    the reconstruction amplifies round-off like λ^{−N}: keep λ close to 1 and h small.
    Cost per step: s + s' f-evaluations forward (s' = s − 1 for FSAL bases, whose last stage
    only feeds the error estimate and the dense output); s' + s' F and as many B backward (one
    more of each when an output lies inside the step).
    """

    def __init__(self, base: ExplicitRungeKutta, coupling: float = 0.999):
        coupling = float(coupling)
        if not 0.0 < coupling <= 1.0:
            raise InvalidInputError(f"coupling must lie in (0, 1], got {coupling}")
        self.base = base
        self.coupling = coupling
        self.name = reversible_rk_name(base.name)
        self.order = base.order
        self.error_order = base.error_order
        tableau = base.tableau
        self.stages = tableau.stages
        self._c = [float(c) for c in tableau.c]
        self._a = [[float(v) for v in row[:i]] for i, row in enumerate(tableau.a)]
        self._b = [float(v) for v in tableau.b]
        self._e = None if tableau.error is None else [float(v) for v in tableau.error]
        # Stages the increment Ψ alone needs (an FSAL scheme's last stage has b_s = 0).
        self._n_psi = 1 + max(i for i, b in enumerate(self._b) if b != 0.0)
        self._rtol: Tensor | float = 1e-6
        self._atol: Tensor | float = 1e-8
        # R(z) = Σ_k r_k z^k, the base's stability function: r_0 = 1, r_k = bᵀ A^{k−1} 1.
        a, b, v = np.asarray(tableau.a, dtype=np.float64), np.asarray(tableau.b), None
        self._stability_coefficients = [1.0]
        for _ in range(self.stages):
            v = np.ones(self.stages) if v is None else a @ v
            self._stability_coefficients.append(float(b @ v))

    def configure(self, *, rtol: Tensor | float, atol: Tensor | float) -> None:
        """The tolerances scale the growth of y − z in the step's error estimate."""
        self._rtol, self._atol = rtol, atol

    def init(self, f: VectorField, t0: Tensor, state: Tensor) -> Tensor:
        return f(t0, state[1])

    def reuse_first_stage(self, carry: Tensor | None) -> Tensor | None:
        return carry

    def _increment(
        self, f: VectorField, t: Tensor, h: Scalar, x: Tensor, k1: Tensor | None, n: int
    ) -> tuple[Tensor, list[Tensor]]:
        """Ψ_h(t, x) = h Σ b_i K_i and the first n stages K_1..K_n."""
        ks = [f(t, x) if k1 is None else k1]
        for i in range(1, n):
            ks.append(f(t + self._c[i] * h, axpy_sum(x, h, self._a[i], ks)))
        return axpy_sum(None, h, self._b, ks), ks

    def step(self, f: VectorField, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        """carry: f(t_n, z_n), the first stage, when known (first step, or after a rejection)."""
        y, z = state[0], state[1]
        lam = self.coupling
        psi, ks = self._increment(f, t, h, z, carry, self.stages)
        y_next = psi.add_(torch.lerp(z, y, lam)) if isinstance(h, float) else (
            lam * y + (1 - lam) * z + psi
        )
        back, _ = self._increment(f, t + h, -h, y_next, None, self._n_psi)
        z_next = z - back
        error = None
        if self._e is not None:
            error = torch.hypot(
                axpy_sum(None, h, self._e, ks),
                _parasitic_error(state, y_next, z_next, self._rtol, self._atol, lam),
            )
        return Step(
            y=torch.stack([y_next, z_next]), error=error, dense=ks, carry=None, retry_carry=ks[0]
        )

    def test_matrix(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """y_{n+1} = λ y_n + (R − λ) z_n, z_{n+1} = (1 − R̃) y_{n+1} + z_n with R = R(ha) and
        R̃ = R(−ha): determinant λ, eigenvalues ≈ R(ha) and λ/R(ha)."""
        lam = self.coupling
        r = np.polynomial.polynomial.polyval(z, self._stability_coefficients)
        r_back = np.polynomial.polynomial.polyval(-z, self._stability_coefficients)
        return (np.full_like(z, lam), r - lam, (1 - r_back) * lam,
                1 + (1 - r_back) * (r - lam))

    def stability_limit(self) -> str:
        lam = self.coupling
        if lam == 1.0:
            return "no dissipative mode (coupling=1 leaves it no margin)"
        return (
            f"h|a| ≲ −ln(coupling) = {-math.log(lam):.3g} on every dissipative mode of rate a "
            f"(coupling={lam:g})"
        )

    def stability_remedy(self, x: float, h: float, span: float) -> str:
        lam = self.coupling
        remedies = []
        if x > 0.0 and lam < 1.0:
            h_stable = h * -math.log(lam) / x
            steps = f", about {math.ceil(span / h_stable)} steps" if span > 0 else ""
            remedies.append(f"take steps h ≲ {h_stable:.2g}{steps}")
        smaller = f" (about {math.exp(-x):.4g} for h|a| = {x:.3g})" if x > 0.0 else ""
        remedies.append(
            f"a smaller coupling={smaller}, though the backward reconstruction then amplifies "
            f"round-off like coupling^−N (see ReversibleDriftWarning)"
        )
        remedies.append(
            f"a non-reversible gradient: gradient='discrete' (or 'backsolve') with the plain "
            f"method {self.base.name!r}, or an implicit method such as 'kvaerno5' if the "
            f"problem is stiff"
        )
        return "remedies: " + "; or ".join(remedies)

    def interpolate(self, state: Tensor, h: Scalar, dense: list[Tensor], theta: Scalar) -> Tensor:
        y, z = state[0], state[1]
        start = y + (theta * (1 - self.coupling)) * (z - y)
        return axpy_sum(start, h, self.base.dense_weights(theta), dense)

    def inverse_step(self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        """z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}),
        y_n = (y_{n+1} − (1 − λ) z_n − Ψ_h(t_n, z_n)) / λ."""
        with torch.no_grad():
            y1, z1 = state_next[0], state_next[1]
            z = z1 + self._increment(f, t + h, -h, y1, None, self._n_psi)[0]
            psi = self._increment(f, t, h, z, None, self._n_psi)[0]
            y = (y1 - (1 - self.coupling) * z - psi) / self.coupling
            return torch.stack([y, z])

    def reverse(self, f, t, h, state_next, adjoint, outputs, local, back):
        """§6 backward: through the z-update, then the y-update and the dense outputs."""
        lam = self.coupling
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        # z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1}): reconstruct z_n and pull −z̄ into ȳ_{n+1}.
        y1_leaf = y1.detach().requires_grad_()
        back_increment, _ = self._increment(f, t + h, -h, y1_leaf, None, self._n_psi)
        z0 = (z1 + back_increment.detach()).requires_grad_()
        (dy1,) = local.vjp([back_increment], [y1_leaf], [-z1_bar])
        y1_bar = y1_bar + dy1
        # y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n): reconstruct y_n, pull ȳ_{n+1} back.
        n = self.stages if outputs else self._n_psi
        psi, ks = self._increment(f, t, h, z0, None, n)
        y0 = ((y1 - (1 - lam) * z0.detach() - psi.detach()) / lam).requires_grad_()
        replayed = [lam * y0 + (1 - lam) * z0 + psi]
        replayed += [self.interpolate(torch.stack([y0, z0]), h, ks, th) for th, _ in outputs]
        y0_bar, z0_bar = local.vjp(replayed, [y0, z0], [y1_bar, *(g for _, g in outputs)])
        state = torch.stack([y0.detach(), z0.detach()])
        return state, torch.stack([y0_bar, z0_bar + z1_bar]), None


class ReversibleHeun(ReversibleSolver):
    """Reversible Heun (Kidger et al. 2021; ALGORITHMS.md §7), state stack([y, z]):

        z_{n+1} = 2y_n − z_n + h f(t_n, z_n)
        y_{n+1} = y_n + (h/2)(f(t_n, z_n) + f(t_{n+1}, z_{n+1}))

    One f-evaluation per step (the carry is f(t_n, z_n)); second order. Adaptive steps use the
    first-order embedded estimate (h/2)(f(t_{n+1}, z_{n+1}) − f(t_n, z_n)) (Heun − Euler).
    Dense output: Heun's quadratic y_n + θh f_n + (θ²h/2)(f_{n+1} − f_n). Like the leapfrog
    (§5) the map is only marginally stable: z oscillates about y on dissipative problems.
    """

    name = "reversible_heun"
    order = 2
    error_order = 1

    def init(self, f: VectorField, t0: Tensor, state: Tensor) -> Tensor:
        return f(t0, state[1])

    def reuse_first_stage(self, carry: Tensor | None) -> Tensor | None:
        return carry

    def step(self, f: VectorField, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        """carry: f(t_n, z_n) (None: evaluated here)."""
        y, z = state[0], state[1]
        a0 = f(t, z) if carry is None else carry
        z1 = axpy_sum(2 * y - z, h, [1.0], [a0])
        a1 = f(t + h, z1)
        y1 = axpy_sum(y, h, [0.5, 0.5], [a0, a1])
        error = axpy_sum(None, h, [-0.5, 0.5], [a0, a1])
        return Step(y=torch.stack([y1, z1]), error=error, dense=(a0, a1), carry=a1, retry_carry=a0)

    def interpolate(self, state: Tensor, h: Scalar, dense, theta: Scalar) -> Tensor:
        return _heun_quadratic(state[0], h, dense[0], dense[1], theta)

    def test_matrix(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """On (y, z): determinant −1, parasitic eigenvalue ha − √(1 + (ha)²) ≈ −e^{−ha}."""
        return 1 + z, z * z / 2, np.full_like(z, 2.0), z - 1

    def stability_limit(self) -> str:
        return (
            "no dissipative mode: on one of rate a reversible Heun's parasitic mode grows like "
            "e^{|a|t} whatever the step, and smaller steps only shrink what it amplifies "
            "(like h²)"
        )

    def stability_remedy(self, x: float, h: float, span: float) -> str:
        return (
            "remedies: a non-reversible gradient, gradient='discrete' (or 'backsolve') with a "
            "plain method such as 'heun' or 'dopri5' (an implicit one such as 'kvaerno5' if "
            "the problem is stiff); or method='reversible_dopri5', whose coupling damps the "
            "mode when h|a| ≲ −ln(coupling)"
        )

    def inverse_step(self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        with torch.no_grad():
            y1, z1 = state_next[0], state_next[1]
            a1 = f(t + h, z1)
            z = axpy_sum(2 * y1 - z1, h, [-1.0], [a1])
            a0 = f(t, z)
            return torch.stack([axpy_sum(y1, h, [-0.5, -0.5], [a0, a1]), z])

    def reverse(self, f, t, h, state_next, adjoint, outputs, local, back):
        """`back` = (z_{n+1} leaf, f(t_{n+1}, z_{n+1}) with its graph, its pending cotangent):
        the evaluation at z_{n+1} serves steps n and n+1, so it gets one VJP, here."""
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        if back is None:
            z1_leaf = z1.detach().requires_grad_()
            back = (z1_leaf, f(t + h, z1_leaf), torch.zeros_like(z1))
        z1_leaf, a1, a1_bar = back
        # f_{n+1} enters y_{n+1} with weight h/2 and each dense output with θ²h/2.
        hv = _value(h)
        a1_bar = a1_bar + (hv / 2) * y1_bar
        for theta, g in outputs:
            a1_bar = a1_bar + (_value(theta) ** 2 * hv / 2) * g
        (dz1,) = local.vjp([a1], [z1_leaf], [a1_bar])
        z1_bar = z1_bar + dz1
        # Reconstruct (y_n, z_n), evaluating f(t_n, z_n) with a graph for the next call.
        a1 = a1.detach()
        z0 = axpy_sum(2 * y1 - z1, h, [-1.0], [a1]).detach().requires_grad_()
        a0 = f(t, z0)
        y0 = axpy_sum(y1, h, [-0.5, -0.5], [a0.detach(), a1]).detach().requires_grad_()
        a0_leaf = a0.detach().requires_grad_()
        replayed = [axpy_sum(2 * y0 - z0, h, [1.0], [a0_leaf]),
                    axpy_sum(y0, h, [0.5, 0.5], [a0_leaf, a1])]
        replayed += [_heun_quadratic(y0, h, a0_leaf, a1, th) for th, _ in outputs]
        y0_bar, z0_bar, a0_bar = local.vjp(
            replayed, [y0, z0, a0_leaf], [z1_bar, y1_bar, *(g for _, g in outputs)]
        )
        state = torch.stack([y0.detach(), z0.detach()])
        return state, torch.stack([y0_bar, z0_bar]), (z0, a0, a0_bar)

    def finish(self, f, t0, y0, adjoint, local, back):
        y0_bar = adjoint[0] + adjoint[1]
        if back is not None:
            z0_leaf, a0, a0_bar = back
            y0_bar = y0_bar + local.vjp([a0], [z0_leaf], [a0_bar])[0]
        return y0_bar, self.initial_state(y0)


def _value(x: Scalar) -> Scalar:
    """x without its graph (a float stays a float)."""
    return x.detach() if isinstance(x, Tensor) else x


def _heun_quadratic(y: Tensor, h: Scalar, a0: Tensor, a1: Tensor, theta: Scalar) -> Tensor:
    """y + θh a0 + (θ²h/2)(a1 − a0): Heun's dense output (b_1(θ) = θ − θ²/2, b_2(θ) = θ²/2)."""
    return axpy_sum(y, h, [theta - theta * theta / 2, theta * theta / 2], [a0, a1])


def reversible_rk_name(base: str) -> str:
    """The method name of McCallum–Foster over `base`: reversible_<base>, except over Heun,
    where reversible_heun is §7's scheme and the wrapper is reversible_rk_heun."""
    return "reversible_rk_heun" if base == "heun" else f"reversible_{base}"


def _reversible_rk_factory(tableau):
    def factory(coupling: float = 0.999) -> ReversibleRungeKutta:
        return ReversibleRungeKutta(ExplicitRungeKutta(tableau), coupling=coupling)

    return factory


def _reversible_heun_factory() -> ReversibleHeun:
    return ReversibleHeun()


def _register() -> None:
    from . import register_solver

    for name, tableau in TABLEAUS.items():
        register_solver(reversible_rk_name(name), _reversible_rk_factory(tableau))
    register_solver("reversible_heun", _reversible_heun_factory)


_register()
