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
    additive noise, ½ in general.
    """

    name = "reversible_heun"
    order = 1

    def init(self, field, t0: Tensor, state: Tensor) -> Any:
        z = state[1]
        return field(t0, z), field.diffusion(t0, z)

    def step(self, field, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        y, z = state[0], state[1]
        f0, g0 = carry if carry is not None else self.init(field, t, state)
        dw = field.noise(t, h)
        noise0 = field.apply(g0, dw)
        z1 = 2 * y - z + f0 * h + noise0
        f1, g1 = field(t + h, z1), field.diffusion(t + h, z1)
        y1 = y + 0.5 * ((f0 + f1) * h + noise0 + field.apply(g1, dw))
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
        """`back` = (z_{n+1} leaf, f and g there with their graphs, their pending cotangents
        from step n + 1): the evaluation at z_{n+1} serves steps n and n + 1, so it gets one
        VJP, here."""
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        at_end, at_start = _split_outputs(outputs, y1)
        y1_bar = y1_bar + at_end
        dw = field.noise(t, h)
        if back is None:
            z1_leaf = z1.detach().requires_grad_()
            back = (z1_leaf, field(t + h, z1_leaf), field.diffusion(t + h, z1_leaf), None, None)
        z1_leaf, f1, g1, f1_bar, g1_bar = back
        # f_{n+1}, g_{n+1} enter y_{n+1} with weight ½ and step n + 1 through its carry.
        outs, cots = [0.5 * (f1 * h + field.apply(g1, dw))], [y1_bar]
        if f1_bar is not None:
            outs += [f1, g1]
            cots += [f1_bar, g1_bar]
        (dz1,) = local.vjp(outs, [z1_leaf], cots)
        z1_bar = z1_bar + dz1
        # Reconstruct (y_n, z_n), evaluating f, g at (t_n, z_n) with a graph for the next call.
        f1, g1 = f1.detach(), g1.detach()
        noise1 = field.apply(g1, dw)
        z0 = (2 * y1 - z1 - f1 * h - noise1).detach().requires_grad_()
        f0, g0 = field(t, z0), field.diffusion(t, z0)
        y0 = y1 - 0.5 * ((f0.detach() + f1) * h + field.apply(g0.detach(), dw) + noise1)
        y0 = y0.detach().requires_grad_()
        f0_leaf, g0_leaf = f0.detach().requires_grad_(), g0.detach().requires_grad_()
        noise0 = field.apply(g0_leaf, dw)
        replayed = [2 * y0 - z0 + f0_leaf * h + noise0,
                    y0 + 0.5 * ((f0_leaf + f1) * h + noise0 + noise1)]
        y0_bar, z0_bar, f0_bar, g0_bar = local.vjp(
            replayed, [y0, z0, f0_leaf, g0_leaf], [z1_bar, y1_bar]
        )
        state = torch.stack([y0.detach(), z0.detach()])
        return state, torch.stack([y0_bar + at_start, z0_bar]), (z0, f0, g0, f0_bar, g0_bar)

    def finish(self, field, t0, y0, adjoint, local, back):
        y0_bar = adjoint[0] + adjoint[1]
        if back is not None:
            z0_leaf, f0, g0, f0_bar, g0_bar = back
            y0_bar = y0_bar + local.vjp([f0, g0], [z0_leaf], [f0_bar, g0_bar])[0]
        return y0_bar, self.initial_state(y0)


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
        θḡ to ∂L/∂y_{n+1} and (1 − θ)ḡ to ∂L/∂y_n."""
        lam = self.coupling
        y1, z1 = state_next[0], state_next[1]
        y1_bar, z1_bar = adjoint[0], adjoint[1]
        at_end, at_start = _split_outputs(outputs, y1)
        dw = field.noise(t, h)
        y1_leaf = y1.detach().requires_grad_()
        back_increment = self.base.increment(field, t + h, -h, y1_leaf, -dw)
        z0 = (z1 + back_increment.detach()).requires_grad_()
        (dy1,) = local.vjp([back_increment], [y1_leaf], [-z1_bar])
        y1_bar = y1_bar + at_end + dy1
        psi = self.base.increment(field, t, h, z0, dw)
        y0 = ((y1 - (1 - lam) * z0.detach() - psi.detach()) / lam).requires_grad_()
        y0_bar, z0_bar = local.vjp([lam * y0 + (1 - lam) * z0 + psi], [y0, z0], [y1_bar])
        state = torch.stack([y0.detach(), z0.detach()])
        return state, torch.stack([y0_bar + at_start, z0_bar + z1_bar]), None


def _reversible_heun() -> ReversibleHeunSDE:
    return ReversibleHeunSDE()


def _wrapper(base_class):
    def factory(coupling: float = 0.999) -> ReversibleSDE:
        return ReversibleSDE(base_class(), coupling=coupling)

    return factory


register_sde_solver("reversible_heun", _reversible_heun)
for _base in (StratonovichHeun, StratonovichMidpoint, EulerHeun):
    register_sde_solver(reversible_rk_name(_base.name), _wrapper(_base))
