"""Step-size control: the error norm, the PI controller, its settings and the initial step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Norm = Callable[[Tensor], Tensor]


def rms_norm(x: Tensor) -> Tensor:
    """Root mean square over every component (Hairer–Nørsett–Wanner II (4.11))."""
    return x.pow(2).mean().sqrt()


def scaled_error(
    error: Tensor, y0: Tensor, y1: Tensor, rtol: Tensor | float, atol: Tensor | float,
    norm: Norm = rms_norm,
) -> Tensor:
    """‖err / (atol + rtol · max(|y0|, |y1|))‖; a step is accepted when this is ≤ 1."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return norm(error / scale)


# The names of StepControl's settings: solve's options of these names (api.LOOP_OPTIONS).
CONTROL_OPTIONS = ("min_step", "max_step", "safety", "ifactor", "dfactor")


@dataclass(frozen=True)
class StepControl:
    """The user's settings of adaptive step-size control (torchdiffeq's names and defaults).

    `min_step` ≤ |h| ≤ `max_step` for every proposed step; a step with |h| ≤ min_step is
    accepted whatever its error (torchdiffeq's rule, rk_common.py), so min_step > 0 trades
    accuracy for a bounded step count. The PI factor is safety · ε^(…) clipped to
    [dfactor, ifactor] (PIController).
    """

    min_step: float = 0.0
    max_step: float = math.inf
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2

    def __post_init__(self) -> None:
        from .errors import InvalidInputError

        values = {}
        for name in CONTROL_OPTIONS:
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise InvalidInputError(f"{name} must be a number, got {value!r}") from None
            if isinstance(value, bool) or math.isnan(number):
                raise InvalidInputError(f"{name} must be a number, got {value!r}")
            values[name] = number
            object.__setattr__(self, name, number)
        checks = (
            ("min_step", values["min_step"] >= 0 and math.isfinite(values["min_step"]),
             "a finite number >= 0"),
            ("max_step", values["max_step"] > 0, "> 0 (inf for no bound)"),
            ("safety", 0 < values["safety"] <= 1, "in (0, 1]"),
            ("ifactor", 1 < values["ifactor"] < math.inf, "a finite number > 1"),
            ("dfactor", 0 < values["dfactor"] < 1, "in (0, 1)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise InvalidInputError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if values["min_step"] > values["max_step"]:
            raise InvalidInputError(
                f"min_step={values['min_step']!r} exceeds max_step={values['max_step']!r}"
            )

    @property
    def is_default(self) -> bool:
        return self == StepControl()

    def clamp(self, h: float) -> float:
        """h with |h| clipped to [min_step, max_step], its sign kept."""
        size = min(self.max_step, max(self.min_step, abs(h)))
        return math.copysign(size, h)

    def forces_acceptance(self, h: float) -> bool:
        """A step this short is accepted whatever its error (|h| ≤ min_step, min_step > 0)."""
        return self.min_step > 0 and abs(h) <= self.min_step


@dataclass
class PIController:
    """Proportional–integral step-size control (Gustafsson; Hairer–Wanner IV.2 (2.43c)).

    h_new = h · safety · ε_n^(−β₁/k) · ε_{n−1}^(β₂/k), with k = 1 + the embedded order, clipped
    to [min_factor, max_factor]; after a rejection the step is never increased.

    β₁ = 0.85, β₂ = 0.2 are Hairer's DOPRI5 values (exponents 0.17 and 0.04 for k = 5, HNW I
    II.4). Against the former 0.7/0.4 on MLP, damped-MLP, Lotka–Volterra, van der Pol and
    Arenstorf problems (dopri5, tol 1e-4 and 1e-7): 0–19% fewer f evaluations; from 30% fewer
    to 31% more than torchdiffeq's I-controller (benchmarks/bench_controller.py, RESULTS §1).
    Each solver names its pair (Solver.controller_coefficients; implicit ones keep 0.7/0.4).
    """

    error_order: int
    safety: float = 0.9
    beta1: float = 0.85
    beta2: float = 0.2
    min_factor: float = 0.2
    max_factor: float = 10.0
    previous_error: float = 1.0

    def propose(self, h: float, error_ratio: float, accepted: bool) -> float:
        k = self.error_order + 1
        if error_ratio == 0.0:
            factor = self.max_factor
        else:
            factor = self.safety * error_ratio ** (-self.beta1 / k)
            if accepted:
                factor *= self.previous_error ** (self.beta2 / k)
        factor = min(self.max_factor, max(self.min_factor, factor))
        if accepted:
            self.previous_error = max(error_ratio, 1e-4)
        else:
            factor = min(factor, 1.0)
        return h * factor


def initial_step_size(
    f: Callable[[Tensor, Tensor], Tensor], t0: Tensor, y0: Tensor, f0: Tensor, direction: float,
    order: int, rtol: Tensor | float, atol: Tensor | float, norm: Norm = rms_norm,
) -> float:
    """Hairer–Nørsett–Wanner I, II.4: h from ‖y0‖, ‖f0‖ and a difference estimate of ‖y''‖."""
    scale = atol + rtol * y0.abs()
    d0 = float(norm(y0 / scale))
    d1 = float(norm(f0 / scale))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + direction * h0 * f0
    f1 = f(t0 + direction * h0, y1)
    d2 = float(norm((f1 - f0) / scale)) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    h = min(100 * h0, h1)
    if not math.isfinite(h):
        h = 1e-6
    return direction * h
