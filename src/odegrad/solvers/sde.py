"""Fixed-step SDE schemes (ALGORITHMS.md §11) and their registry `SDE_SOLVERS`.

Each scheme is a `Solver` whose "f" is an `SDEField` (sde_field.py): the drift f(t, y) by
calling it, the diffusion by `field.diffusion(t, y)`, the step's Brownian increment
ΔW = W(t + h) − W(t) by `field.noise(t, h)` (queried again, never stored, so a replay of the
step is exact) and g·ΔW by `field.apply` / `field.diffusion_times`. Dense output inside a step
is linear between y_n and y_{n+1} (Step.dense holds y_{n+1}).

Orders (strong): Itô Euler–Maruyama ½ (weak 1); Milstein 1 (diagonal, scalar noise);
Stratonovich Euler–Heun, Heun and midpoint 1 on commutative noise (diagonal, scalar,
additive), ½ in general. The reversible schemes are in solvers/sde_reversible.py, Rößler's
stochastic Runge–Kutta "srk" (Itô, strong order 1.5, reads the space-time Lévy area) in
solvers/sde_srk.py.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from .base import Scalar, Solver, Step

__all__ = ["SDESolver", "EulerMaruyama", "Milstein", "EulerHeun", "StratonovichHeun",
           "StratonovichMidpoint", "SDE_SOLVERS", "make_sde_solver", "register_sde_solver"]

ALL_NOISE = ("diagonal", "scalar", "additive", "general")


class SDESolver(Solver):
    """One fixed step y_{n+1} = y_n + increment(field, t_n, h, y_n, ΔW_n).

    `sde_type`: the calculus the scheme converges in; `noise_types`: those it accepts.
    """

    sde_type: str = "stratonovich"
    noise_types: tuple[str, ...] = ALL_NOISE
    error_order = None
    # Whether the step reads ∂g/∂y (Milstein): the stochastic adjoint's augmented field offers
    # g only as products g·ΔW, so such schemes cannot integrate it.
    reads_diffusion_derivative: bool = False

    def init(self, field, t0: Tensor, y0: Tensor) -> Any:
        return None

    def step(self, field, t: Tensor, h: Scalar, y: Tensor, carry: Any) -> Step:
        dw = field.noise(t, h)
        y_next = y + self.increment(field, t, h, y, dw)
        return Step(y=y_next, error=None, dense=y_next, carry=None)

    def increment(self, field, t: Tensor, h: Scalar, y: Tensor, dw: Tensor) -> Tensor:
        """y_{n+1} − y_n for the increment dw over [t, t + h]."""
        raise NotImplementedError

    def interpolate(self, y: Tensor, h: Scalar, dense: Tensor, theta: Scalar) -> Tensor:
        """y_n + θ (y_{n+1} − y_n)."""
        return torch.lerp(y, dense, theta)

    def check_noise(self, noise_type: str) -> None:
        if noise_type not in self.noise_types:
            valid = sorted(n for n, fac in SDE_SOLVERS.items() if noise_type in fac().noise_types)
            raise UnsupportedCombinationError(
                f"method {self.name!r} takes noise_type in {self.noise_types}, not "
                f"{noise_type!r}; methods for {noise_type!r} noise: {', '.join(valid)}"
            )


class EulerMaruyama(SDESolver):
    """Itô: y_{n+1} = y_n + f h + g ΔW (strong order ½, weak 1)."""

    name = "euler"
    order = 1
    sde_type = "ito"

    def increment(self, field, t, h, y, dw):
        return field(t, y) * h + field.diffusion_times(t, y, dw)


class Milstein(SDESolver):
    """Milstein on diagonal or scalar noise (additive: Euler's step), strong order 1:

        y_{n+1} = y_n + f h + g ΔW + ½ c (ΔW² − h)   (Itô),   + ½ c ΔW²   (Stratonovich),

    c = Σ_k (∂g_{·k}/∂y) g_{·k} (diagonal: (∂g_i/∂y_i) g_i, exact, `SDEField.correction`).
    `derivative_free=True`: c ≈ (g(t, ỹ) − g(t, y)) / √h with ỹ = y + f h + g √h (Platen),
    one more g evaluation and no JVP; on diagonal noise that is Σ_j (∂g_i/∂y_j) g_j, which is
    c only when g_i depends on y_i alone (sdeint checks it at y0).
    """

    name = "milstein"
    order = 1
    noise_types = ("diagonal", "scalar", "additive")
    sde_types = ("ito", "stratonovich")  # either calculus natively (the API sets sde_type)
    reads_diffusion_derivative = True

    def __init__(self, sde_type: str = "ito", derivative_free: bool = False):
        if sde_type not in ("ito", "stratonovich"):
            raise UnknownNameError(f"sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        if not isinstance(derivative_free, bool):
            raise InvalidInputError(f"derivative_free must be a bool, got {derivative_free!r}")
        self.sde_type = sde_type
        self.derivative_free = derivative_free

    def increment(self, field, t, h, y, dw):
        f = field(t, y)
        g = field.diffusion(t, y)
        out = f * h + field.apply(g, dw)
        if field.noise_type == "additive":
            return out
        if self.derivative_free:
            root = math.sqrt(abs(float(h)))
            g_column = g if field.noise_type == "diagonal" else g[..., 0]
            shifted = field.diffusion(t, y + f * h + g_column * root)
            if field.noise_type == "scalar":
                shifted = shifted[..., 0]
            c = (shifted - g_column) / root
        else:
            c = field.correction(t, y, g)
        square = dw * dw if self.sde_type == "stratonovich" else dw * dw - h
        return out + 0.5 * c * square


class EulerHeun(SDESolver):
    """Stratonovich Euler–Heun: y' = y + g ΔW; y_{n+1} = y + f h + ½(g(t, y) + g(t + h, y'))ΔW."""

    name = "euler_heun"
    order = 1

    def increment(self, field, t, h, y, dw):
        noise = field.diffusion_times(t, y, dw)
        return field(t, y) * h + 0.5 * (noise + field.diffusion_times(t + h, y + noise, dw))


class StratonovichHeun(SDESolver):
    """Stratonovich Heun: ỹ = y + f h + g ΔW; y_{n+1} = y + ½(f + f̃) h + ½(g + g̃) ΔW."""

    name = "heun"
    order = 1

    def increment(self, field, t, h, y, dw):
        f0 = field(t, y)
        noise0 = field.diffusion_times(t, y, dw)
        y_tilde = y + f0 * h + noise0
        f1 = field(t + h, y_tilde)
        noise1 = field.diffusion_times(t + h, y_tilde, dw)
        return 0.5 * ((f0 + f1) * h + noise0 + noise1)


class StratonovichMidpoint(SDESolver):
    """Stratonovich midpoint: y_m = y + ½(f h + g ΔW); y_{n+1} = y + f(y_m) h + g(y_m) ΔW,
    f and g at t + h/2."""

    name = "midpoint"
    order = 1

    def increment(self, field, t, h, y, dw):
        y_mid = y + 0.5 * (field(t, y) * h + field.diffusion_times(t, y, dw))
        t_mid = t + 0.5 * h
        return field(t_mid, y_mid) * h + field.diffusion_times(t_mid, y_mid, dw)


# name -> factory(**options) -> SDESolver; a factory's keyword arguments are its options.
SDE_SOLVERS: dict = {}


def register_sde_solver(name: str, factory) -> None:
    """Make the SDE `method=name` build `factory(**options)`."""
    SDE_SOLVERS[name] = factory


def make_sde_solver(name: str, **options) -> SDESolver:
    """Build the SDE scheme registered as `name` with its options."""
    if not isinstance(name, str) or name not in SDE_SOLVERS:
        raise UnknownNameError(
            f"unknown SDE method {name!r}; valid SDE methods: {', '.join(sorted(SDE_SOLVERS))}"
        )
    return SDE_SOLVERS[name](**options)


def sde_method_options(name: str) -> set[str]:
    """The option names the factory of SDE method `name` takes."""
    signature = inspect.signature(SDE_SOLVERS[name])
    return {n for n, p in signature.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _euler() -> EulerMaruyama:
    return EulerMaruyama()


def _milstein(derivative_free: bool = False) -> Milstein:
    """Milstein in the problem's calculus (the API passes sde_type)."""
    return Milstein("ito", derivative_free)


def _euler_heun() -> EulerHeun:
    return EulerHeun()


def _heun() -> StratonovichHeun:
    return StratonovichHeun()


def _midpoint() -> StratonovichMidpoint:
    return StratonovichMidpoint()


register_sde_solver("euler", _euler)
register_sde_solver("milstein", _milstein)
register_sde_solver("euler_heun", _euler_heun)
register_sde_solver("heun", _heun)
register_sde_solver("midpoint", _midpoint)

# registers the reversible schemes and srk (Rößler's stochastic Runge–Kutta)
from . import sde_reversible, sde_srk  # noqa: E402,F401
