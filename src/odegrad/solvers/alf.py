"""The asynchronous leapfrog (ALF) of MALI (Zhuang et al. 2021; ALGORITHMS.md §5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import Scalar, Step, VectorField, axpy_sum
from .reversible import ReversibleSolver

__all__ = ["AsynchronousLeapfrog"]


class AsynchronousLeapfrog(ReversibleSolver):
    """ALF with damping η on the state stack([z, v]), v ≈ f(t, z) (ALGORITHMS.md §5):

        s = z_n + (h/2) v_n;  u = f(t_n + h/2, s);  v_{n+1} = v_n + 2η(u − v_n);
        z_{n+1} = s + (h/2) v_{n+1}

    and its inverse s = z_{n+1} − (h/2) v_{n+1}, u = f(t_n + h/2, s),
    v_n = (2η u − v_{n+1})/(2η − 1), z_n = s − (h/2) v_n. One f-evaluation per step.

    v_0 = f(t_0, z_0): `initial_state` cannot evaluate f, so the state's v row starts as a zero
    placeholder and the carry holds v_0 for the first step (from `init`); afterwards the carry
    is None and v is read from the state. Order 2 at η = 1, 1 otherwise. Adaptive steps use the
    estimate h(u − v_n), of first order. Dense output: the quadratic through z_n and z_{n+1}
    with slope v_n at the start, z_n + θh v_n + θ²(z_{n+1} − z_n − h v_n).

    Stability: the linear map has determinant 1 − 2η. At η = 1 it is only marginally stable,
    so dissipative problems (Re ∂f/∂z < 0) grow a parasitic mode and blow up; η < 1 damps the
    forward pass but the reconstruction then amplifies round-off by |1 − 2η|^{−1} per step.
    η = 1/2 is not invertible.
    """

    def __init__(self, eta: float = 1.0):
        eta = float(eta)
        if not 0.0 < eta <= 1.0 or eta == 0.5:
            raise InvalidInputError(f"eta must lie in (0, 1] and differ from 0.5, got {eta}")
        self.eta = eta
        self.name = "alf"
        self.order = 2 if eta == 1.0 else 1
        self.error_order = 1

    def initial_state(self, y0: Tensor) -> Tensor:
        return torch.stack([y0, torch.zeros_like(y0)])

    def init(self, f: VectorField, t0: Tensor, state: Tensor) -> Tensor:
        return f(t0, state[0])

    def reuse_first_stage(self, carry: Tensor | None) -> Tensor | None:
        return carry

    def step(self, f: VectorField, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        """carry: v_0 = f(t_0, z_0) on the first step, else None (v is the state's row)."""
        z = state[0]
        v = state[1] if carry is None else carry
        s = axpy_sum(z, h, [0.5], [v])
        u = f(t + 0.5 * h, s)
        v_next = torch.lerp(v, u, 2 * self.eta)
        z_next = axpy_sum(s, h, [0.5], [v_next])
        error = axpy_sum(None, h, [1.0], [u - v])
        return Step(
            y=torch.stack([z_next, v_next]), error=error, dense=(v, z_next), carry=None,
            retry_carry=carry,
        )

    def interpolate(self, state: Tensor, h: Scalar, dense, theta: Scalar) -> Tensor:
        v, z_next = dense
        return _leapfrog_quadratic(state[0], v, z_next, h, theta)

    parasitic_name = "v − f(t, z)"

    def parasitic_part(self, f: VectorField, t: Tensor, state: Tensor) -> Tensor:
        """v − f(t, z): the velocity's departure from the field, where the parasitic mode
        lives (one f-evaluation)."""
        return state[1] - f(t, state[0])

    def test_matrix(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """On (z, hv): determinant 1 − 2η; at η = 1 parasitic eigenvalue ≈ −e^{−ha}."""
        eta = self.eta
        return (1 + eta * z, (2 - 2 * eta + eta * z) / 2, 2 * eta * z, 1 - 2 * eta + eta * z)

    def parasitic_functional(self, z: np.ndarray) -> tuple[np.ndarray, float]:
        return -z, 1.0  # h (v − a z)

    def parasitic_units(self, h: float) -> float:
        return h

    def stability_limit(self) -> str:
        if self.eta == 1.0:
            return (
                "no dissipative mode: on one of rate a the leapfrog's parasitic mode grows like "
                "e^{|a|t} at eta=1 whatever the step, and smaller steps only shrink what it "
                "amplifies"
            )
        return f"h|a| small against the damping |1 − 2η| per step (eta={self.eta:g})"

    def stability_remedy(self, x: float, h: float, span: float) -> str:
        return (
            "remedies: a non-reversible gradient, gradient='discrete' (or 'backsolve') with a "
            "plain method such as 'midpoint' or 'dopri5' (an implicit one such as 'kvaerno5' "
            "if the problem is stiff); or eta < 1, which damps the mode by |1 − 2η| per step "
            "while the reconstruction amplifies round-off by as much; or "
            "method='reversible_dopri5', whose coupling damps it when h|a| ≲ −ln(coupling)"
        )

    def inverse_step(self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        with torch.no_grad():
            z1, v1 = state_next[0], state_next[1]
            s = axpy_sum(z1, h, [-0.5], [v1])
            u = f(t + 0.5 * h, s)
            v = (2 * self.eta * u - v1) / (2 * self.eta - 1)
            return torch.stack([axpy_sum(s, h, [-0.5], [v]), v])

    def reverse(self, f, t, h, state_next, adjoint, outputs, local, back):
        """MALI's backward step: the one f-evaluation of the inverse, at the step's midpoint s,
        is taken with a graph and serves the local VJP as well (1 F + 1 B per step)."""
        eta = self.eta
        z1, v1 = state_next[0], state_next[1]
        s = axpy_sum(z1, h, [-0.5], [v1]).detach().requires_grad_()
        u = f(t + 0.5 * h, s)
        v0 = ((2 * eta * u.detach() - v1) / (2 * eta - 1)).requires_grad_()
        z0 = axpy_sum(s.detach(), h, [-0.5], [v0.detach()]).detach().requires_grad_()
        # The step as a function of (z_n, v_n, u), then u = f(t_n + h/2, s) with s = z_n + h v_n/2.
        u_leaf = u.detach().requires_grad_()
        s_replayed = axpy_sum(z0, h, [0.5], [v0])
        v1_replayed = torch.lerp(v0, u_leaf, 2 * eta)
        z1_replayed = axpy_sum(s_replayed, h, [0.5], [v1_replayed])
        replayed = [z1_replayed, v1_replayed]
        replayed += [_leapfrog_quadratic(z0, v0, z1_replayed, h, th) for th, _ in outputs]
        z0_bar, v0_bar, u_bar = local.vjp(
            replayed, [z0, v0, u_leaf], [adjoint[0], adjoint[1], *(g for _, g in outputs)],
            retain_graph=True,
        )
        (s_bar,) = local.vjp([u], [s], [u_bar])
        dz0, dv0 = local.vjp([s_replayed], [z0, v0], [s_bar])
        state = torch.stack([z0.detach(), v0.detach()])
        return state, torch.stack([z0_bar + dz0, v0_bar + dv0]), None

    def finish(self, f, t0, y0, adjoint, local, back):
        """v_0 = f(t_0, z_0): its cotangent reaches z_0, the parameters and t_0 (1 F + 1 B)."""
        z0 = y0.detach().requires_grad_()
        v0 = f(t0, z0)
        (dz0,) = local.vjp([v0], [z0], [adjoint[1]])
        return adjoint[0] + dz0, torch.stack([y0.detach(), v0.detach()])


def _leapfrog_quadratic(
    z: Tensor, v: Tensor, z_next: Tensor, h: Scalar, theta: Scalar
) -> Tensor:
    """z + θh v + θ²(z_next − z − h v)."""
    return axpy_sum((1 - theta * theta) * z + (theta * theta) * z_next, h,
                    [theta - theta * theta], [v])


def _alf_factory(eta: float = 1.0) -> AsynchronousLeapfrog:
    return AsynchronousLeapfrog(eta=eta)


def _register() -> None:
    from . import register_solver

    register_solver("alf", _alf_factory)


_register()
