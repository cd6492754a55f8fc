"""Algebraically reversible SDE schemes (ALGORITHMS.md §6, §7, §11): reversible Heun (Kidger et
al. 2021) and McCallum–Foster over a Stratonovich base, on the augmented state stack([y, z]).

Both implement the `ReversibleSolver` interface (`inverse_step`, `reverse`, `finish`) that
`gradient="reversible"` drives, with the step's Brownian increment queried again from the
field in the backward pass. Dense output inside a step: linear between y_n and y_{n+1}.
Both converge to the Stratonovich solution; strong order 1 on additive noise, ½ in general.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import Scalar, Step
from .reversible import DenseCotangents, LocalAdjoint, ReversibleSolver, reversible_rk_name
from .sde import (
    EulerHeun,
    SDESolver,
    StratonovichHeun,
    StratonovichMidpoint,
    register_sde_solver,
)

__all__ = ["ReversibleHeunSDE", "ReversibleSDE"]


def _value(x: Scalar) -> Scalar:
    return x.detach() if isinstance(x, Tensor) else x


def _split_outputs(outputs: DenseCotangents, like: Tensor) -> tuple[Tensor, Tensor]:
    """Σ θ ḡ and Σ (1 − θ) ḡ of the outputs read inside a step (linear interpolation)."""
    at_end, at_start = torch.zeros_like(like), torch.zeros_like(like)
    for theta, g in outputs:
        theta = _value(theta)
        at_end = at_end + theta * g
        at_start = at_start + (1 - theta) * g
    return at_end, at_start


class _ReversibleSDESolver(ReversibleSolver, SDESolver):
    """What the reversible SDE schemes share: Stratonovich, linear dense output."""

    sde_type = "stratonovich"

    def interpolate(self, state: Tensor, h: Scalar, dense: Tensor, theta: Scalar) -> Tensor:
        return torch.lerp(state[0], dense[0], theta)


class ReversibleHeunSDE(_ReversibleSDESolver):
    """Reversible Heun (Kidger et al. 2021; §11), state stack([y, z]):

        z_{n+1} = 2y_n − z_n + f(z_n) h + g(z_n) ΔW
        y_{n+1} = y_n + ½(f(z_n) + f(z_{n+1})) h + ½(g(z_n) + g(z_{n+1})) ΔW

    One f and one g evaluation per step (the carry is (f, g) at (t_n, z_n)); its inverse
    (`inverse_step`) evaluates them at z_{n+1} and z_n. Stratonovich; strong order 1 on
    additive noise, ½ in general. Backward (`reverse`): one VJP through f and g per step.

    Option `solver_state=(f, g, z)`: start from this state (z_0 = z, the carry (f, g)) instead
    of z_0 = y_0 (torchsde's extra_solver_state); `sde.solve_sde` returns the final one in
    `stats["solver_state"]`.
    """

    name = "reversible_heun"
    order = 1

    def __init__(self, solver_state: tuple[Tensor, Tensor, Tensor] | None = None):
        # The scheme's state at t[0], (f, g, z) (`solver_state` below): None starts from z = y0
        # with f, g evaluated there.
        self.start = None if solver_state is None else tuple(solver_state)

    def initial_state(self, y0: Tensor) -> Tensor:
        return torch.stack([y0, y0 if self.start is None else self.start[2]])

    def init(self, field, t0: Tensor, state: Tensor) -> Any:
        if self.start is not None:
            return self.start[0], self.start[1]
        z = state[1]
        return field(t0, z), field.diffusion(t0, z)

    def solver_state(self, state: Tensor, carry: Any) -> tuple[Tensor, Tensor, Tensor]:
        """The scheme's state after a step, in torchsde's order (f, g, z): z the auxiliary
        point, f and g the drift and diffusion at (t, z), so that a solve started from it
        (option solver_state=) continues as this one would."""
        f, g = carry
        return f, g, state[1]

    def step(self, field, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        y, z = state[0], state[1]
        f0, g0 = carry if carry is not None else self.init(field, t, state)
        dw = field.noise(t, h)
        noise0 = field.apply(g0, dw)
        z1 = _combine(noise0, h, f0, (2.0, y), (-1.0, z))
        f1, g1 = field(t + h, z1), field.diffusion(t + h, z1)
        y1 = _combine(y, 0.5 * h, f0, (0.5, noise0), (0.5, field.apply(g1, dw)), extra=f1)
        state_next = torch.stack([y1, z1])
        return Step(y=state_next, error=None, dense=state_next, carry=(f1, g1),
                    retry_carry=(f0, g0))

    def inverse_step(self, field, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        """z_n = 2y_{n+1} − z_{n+1} − f(z_{n+1}) h − g(z_{n+1}) ΔW, then y_n from the y line."""
        with torch.no_grad():
            y1, z1 = state_next[0], state_next[1]
            dw = field.noise(t, h)
            f1 = field(t + h, z1)
            noise1 = field.apply(field.diffusion(t + h, z1), dw)
            z = 2 * y1 - z1 - f1 * h - noise1
            f0 = field(t, z)
            noise0 = field.apply(field.diffusion(t, z), dw)
            return torch.stack([y1 - 0.5 * ((f0 + f1) * h + noise0 + noise1), z])

    def reverse(self, field, t, h, state_next, adjoint, outputs, local: LocalAdjoint, back):
        """One VJP per step, through f and g at z_{n+1} (evaluated, with a graph, when step
        n + 1 was reconstructed: `back` = (z_{n+1} leaf, f, g there, c_{n+1}, ΔW_{n+1},
        h_{n+1})). The update is linear in (y_n, z_n, f_n, g_n ΔW), so its VJP is closed form:
        with c = z̄_{n+1} + ½ȳ_{n+1}, ȳ_n = ȳ_{n+1} + 2z̄_{n+1}, z̄_n = −z̄_{n+1} (+ the VJP at z_n,
        next call), f̄_n = h c and c on g_n ΔW_n. (h is a float: SDE times are not
        differentiated.)"""
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        if outputs:
            at_end, at_start = _split_outputs(outputs, y1)
            y1_bar = y1_bar + at_end
        hv = float(_value(h))
        dw = field.noise(t, h)
        if back is None:
            z1_leaf = z1.detach().requires_grad_()
            f1, g1 = field(t + h, z1_leaf), field.diffusion(t + h, z1_leaf)
            outs, cots = [f1, field.apply(g1, dw)], [y1_bar * (0.5 * hv), 0.5 * y1_bar]
        else:
            # f_{n+1}, g_{n+1}: weight ½ in y_{n+1}, and what step n + 1 left pending (c).
            z1_leaf, f1, g1, c1, dw1, h1 = back
            outs = [f1, field.apply(g1, dw), field.apply(g1, dw1)]
            cots = [torch.add(c1 * h1, y1_bar, alpha=0.5 * hv), 0.5 * y1_bar, c1]
        (dz1,) = local.vjp(outs, [z1_leaf], cots)
        z1_bar = z1_bar + dz1
        # Reconstruct (y_n, z_n), evaluating f, g at (t_n, z_n) with a graph for the next call.
        f1, g1 = f1.detach(), g1.detach()
        noise1 = field.apply(g1, dw)
        z0 = _combine(noise1, hv, f1, (-2.0, y1), (1.0, z1)).neg_().requires_grad_()
        f0, g0 = field(t, z0), field.diffusion(t, z0)
        with torch.no_grad():
            y0 = _combine(y1, -0.5 * hv, f0, (-0.5, field.apply(g0, dw)), (-0.5, noise1),
                          extra=f1)
            c0 = torch.add(z1_bar, y1_bar, alpha=0.5)
            y0_bar = torch.add(y1_bar, z1_bar, alpha=2.0)
            if outputs:
                y0_bar = y0_bar + at_start
            state = torch.stack([y0, z0.detach()])
            adjoint = torch.stack([y0_bar, z1_bar.neg()])
        return state, adjoint, (z0, f0, g0, c0, dw, hv)

    def finish(self, field, t0, y0, adjoint, local, back):
        y0_bar = adjoint[0] + adjoint[1]
        if back is not None:
            z0_leaf, f0, g0, c0, dw0, h0 = back
            outs = [f0, field.apply(g0, dw0)]
            y0_bar = y0_bar + local.vjp(outs, [z0_leaf], [c0 * h0, c0])[0]
        return y0_bar, self.initial_state(y0)


def _combine(base: Tensor, h: Scalar, f: Tensor, *terms: tuple[float, Tensor],
             extra: Tensor | None = None) -> Tensor:
    """base + h f (+ h extra) + Σ w x over `terms` (w floats), as one fused add per term
    when h is a float (a new tensor; differentiable)."""
    if isinstance(h, Tensor):
        out = base + h * f if extra is None else base + h * (f + extra)
        for w, x in terms:
            out = out + w * x
        return out
    out = torch.add(base, f, alpha=h)
    if extra is not None:
        out.add_(extra, alpha=h)
    for w, x in terms:
        out.add_(x, alpha=w)
    return out


class ReversibleSDE(_ReversibleSDESolver):
    """McCallum–Foster over a Stratonovich base scheme (§6 with §11's increments):

        y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n; ΔW_n)
        z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1}; −ΔW_n)

    Ψ the base's increment (over [t_n, t_{n+1}] with ΔW_n, and back over it with −ΔW_n).
    The bases here (Heun, midpoint, Euler–Heun) converge to the Stratonovich solution, so
    does the wrapper; an Itô base (Euler–Maruyama) would not and is not offered.
    """

    order = 1

    def __init__(self, base: SDESolver, coupling: float = 0.999):
        coupling = float(coupling)
        if not 0.0 < coupling <= 1.0:
            raise InvalidInputError(f"coupling must lie in (0, 1], got {coupling}")
        if base.sde_type != "stratonovich":
            raise InvalidInputError(
                f"the reversible wrapper needs a Stratonovich base, not {base.name!r}"
            )
        self.base = base
        self.coupling = coupling
        self.name = reversible_rk_name(base.name)
        self.noise_types = base.noise_types

    def step(self, field, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        y, z = state[0], state[1]
        lam = self.coupling
        dw = field.noise(t, h)
        y1 = lam * y + (1 - lam) * z + self.base.increment(field, t, h, z, dw)
        z1 = z - self.base.increment(field, t + h, -h, y1, -dw)
        state_next = torch.stack([y1, z1])
        return Step(y=state_next, error=None, dense=state_next, carry=None)

    def inverse_step(self, field, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        """z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1});
        y_n = (y_{n+1} − (1 − λ) z_n − Ψ_h(t_n, z_n)) / λ."""
        with torch.no_grad():
            y1, z1 = state_next[0], state_next[1]
            dw = field.noise(t, h)
            z = z1 + self.base.increment(field, t + h, -h, y1, -dw)
            psi = self.base.increment(field, t, h, z, dw)
            return torch.stack([(y1 - (1 - self.coupling) * z - psi) / self.coupling, z])

    def reverse(self, field, t, h, state_next, adjoint, outputs, local: LocalAdjoint, back):
        """§6 backward: through the z-update, then the y-update; outputs inside the step add
        θḡ to ∂L/∂y_{n+1} and (1 − θ)ḡ to ∂L/∂y_n. One VJP per increment Ψ (at y_{n+1}, then
        at z_n); the coupling's part is closed form: ȳ_n = λȳ_{n+1}, z̄_n = z̄_{n+1} +
        (1 − λ)ȳ_{n+1} + (∂Ψ_h/∂z_n)^T ȳ_{n+1}."""
        lam = self.coupling
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        dw = field.noise(t, h)
        y1_leaf = y1.detach().requires_grad_()
        back_increment = self.base.increment(field, t + h, -h, y1_leaf, -dw)
        z0 = (z1 + back_increment.detach()).requires_grad_()
        (dy1,) = local.vjp([back_increment], [y1_leaf], [-z1_bar])
        y1_bar = y1_bar + dy1
        if outputs:
            at_end, at_start = _split_outputs(outputs, y1)
            y1_bar = y1_bar + at_end
        psi = self.base.increment(field, t, h, z0, dw)
        (dz0,) = local.vjp([psi], [z0], [y1_bar])
        with torch.no_grad():
            y0 = torch.add(y1 - psi, z0, alpha=-(1 - lam)).div_(lam)
            y0_bar = y1_bar * lam
            if outputs:
                y0_bar = y0_bar + at_start
            z0_bar = torch.add(z1_bar, y1_bar, alpha=1 - lam).add_(dz0)
            return torch.stack([y0, z0.detach()]), torch.stack([y0_bar, z0_bar]), None


def _reversible_heun(solver_state: tuple[Tensor, Tensor, Tensor] | None = None
                     ) -> ReversibleHeunSDE:
    return ReversibleHeunSDE(solver_state)


def _wrapper(base_class):
    def factory(coupling: float = 0.999) -> ReversibleSDE:
        return ReversibleSDE(base_class(), coupling=coupling)

    return factory


register_sde_solver("reversible_heun", _reversible_heun)
for _base in (StratonovichHeun, StratonovichMidpoint, EulerHeun):
    register_sde_solver(reversible_rk_name(_base.name), _wrapper(_base))
