"""The interface every one-step scheme implements, and the stage arithmetic they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

VectorField = Callable[[Tensor, Tensor], Tensor]
Scalar = float | Tensor  # a step size: a Python float, or a 0-dim tensor when t is differentiated


@dataclass
class Step:
    """The result of one attempted step from (t, y) to (t + h, y_next)."""

    y: Tensor
    error: Tensor | None  # embedded error estimate, None for fixed-step schemes
    dense: Any  # what `interpolate` needs (the stages, for Runge–Kutta)
    carry: Any  # what the next step reuses if this one is accepted (an FSAL stage)
    retry_carry: Any = None  # what a retry from the same point reuses if this one is rejected


class StepRejected(Exception):
    """Raised by `Solver.step` when the step cannot be completed at this size (an implicit
    stage's Newton iteration failed): adaptive loops retry from the same point with the step
    times `factor`; fixed-step loops, or too many failures in a row, raise `error`."""

    def __init__(self, error: Exception, retry_carry: Any = None, factor: float = 0.25):
        super().__init__(str(error))
        self.error = error
        self.retry_carry = retry_carry
        self.factor = factor


class Solver(ABC):
    """One step of one scheme. Solvers hold coefficients, never trajectory state."""

    name: str
    order: int
    error_order: int | None = None  # None: no embedded estimate, fixed steps only
    implicit: bool = False
    # (β₁, β₂) of the PI step-size controller (control.PIController): Hairer's DOPRI5 values
    # by default; implicit solvers use the smoother 0.7/0.4 that stiff problems need.
    controller_coefficients: tuple[float, float] = (0.85, 0.2)
    # Set by solvers whose `step` also takes `stage_times=`: the times t + c_i h of its stages
    # for c_i in `stage_nodes`, which a fixed-step loop computes for all steps at once
    # (loop.stage_time_table) instead of in scalar tensor ops per stage.
    takes_stage_times: bool = False
    stage_nodes: tuple[float, ...] = ()

    @property
    def adaptive(self) -> bool:
        """Whether the loop adapts the step by default (it can whenever error_order is set)."""
        return self.error_order is not None

    def configure(self, *, rtol: Tensor | float, atol: Tensor | float) -> None:
        """Receive the solve's tolerances before the first step (implicit schemes set their
        Newton tolerance from them); nothing by default."""
        return None

    @abstractmethod
    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> Any:
        """Work done once before the first step; returns the first `carry`."""

    @abstractmethod
    def step(self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: Any) -> Step:
        """Attempt one step of size h from (t, y)."""

    @abstractmethod
    def interpolate(self, y: Tensor, h: Scalar, dense: Any, theta: Scalar) -> Tensor:
        """Dense output y(t + θh) inside an accepted step, 0 ≤ θ ≤ 1."""

    def initial_state(self, y0: Tensor) -> Tensor:
        """The state the loop advances (an augmented state for reversible schemes)."""
        return y0

    def observe(self, state: Tensor) -> Tensor:
        """The solution y read off a state."""
        return state

    def reuse_first_stage(self, carry: Any) -> Tensor | None:
        """f(t_n, y_n) if the carry holds it (used for the automatic initial step)."""
        return None


def axpy_sum(
    y: Tensor | None, h: Scalar, weights: Sequence[Scalar], ks: Sequence[Tensor]
) -> Tensor:
    """y + h Σ_j w_j k_j, skipping zero weights (ALGORITHMS.md §1, the stage combination).

    With y None it returns h Σ_j w_j k_j. Weights and h may be floats (one fused add per
    term) or 0-dim tensors (when times are differentiated).
    """
    terms = [(w, k) for w, k in zip(weights, ks) if not (isinstance(w, float) and w == 0.0)]
    if not terms:
        return torch.zeros_like(ks[0]) if y is None else y
    if isinstance(h, Tensor) or any(isinstance(w, Tensor) for w, _ in terms):
        total = terms[0][1] * terms[0][0]
        for w, k in terms[1:]:
            total = total + k * w
        return h * total if y is None else y + h * total
    if y is None:
        out = terms[0][1] * (h * terms[0][0])
    else:
        out = torch.add(y, terms[0][1], alpha=h * terms[0][0])
    for w, k in terms[1:]:
        out.add_(k, alpha=h * w)
    return out


def dense_weights(dense, theta: Scalar) -> list:
    """b_i(θ) = Σ_k P[i, k] θ^(k+1) for the dense-output matrix P of a tableau.

    Floats for a float θ; 0-dim tensors for a tensor θ (when output times are differentiated).
    """
    if isinstance(theta, Tensor):
        powers = [theta ** (k + 1) for k in range(dense.shape[1])]
        return [sum(float(p) * q for p, q in zip(row, powers)) for row in dense]
    return [float(v) for v in dense @ (theta ** np.arange(1, dense.shape[1] + 1))]
