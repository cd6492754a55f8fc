"""Explicit Runge–Kutta steps driven by a Butcher tableau (ALGORITHMS.md §1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..tableaus import ButcherTableau
from .base import Scalar, Solver, Step, VectorField, axpy_sum, dense_weights

Terms = list[tuple[int, float]]


def _nonzero(row) -> Terms:
    """The (index, coefficient) pairs of a tableau row that are not zero."""
    return [(j, float(v)) for j, v in enumerate(row) if v != 0.0]


def combine(y: Tensor | None, h: Scalar, terms: Terms, ks: list[Tensor]) -> Tensor:
    """y + h Σ_j a_j K_j over the precomputed nonzero terms (one fused add per term)."""
    if isinstance(h, Tensor) or not terms or y is None:
        return axpy_sum(y, h, [a for _, a in terms], [ks[j] for j, _ in terms])
    (j, a), rest = terms[0], terms[1:]
    out = torch.add(y, ks[j], alpha=h * a)
    for j, a in rest:
        out.add_(ks[j], alpha=h * a)
    return out


class ExplicitRungeKutta(Solver):
    """K_i = f(t + c_i h, y + h Σ_{j<i} a_ij K_j), y_next = y + h Σ b_i K_i.

    The carry is f(t_n, y_n): the last stage of an FSAL scheme, or the first stage of the
    previous attempt from the same point, so a rejected step never re-evaluates it.
    `stage_times`, when given, holds t + c_i h for every stage (stage_times[0] is t), computed
    by the loop with the same roundings (loop.stage_time_table); else each is computed here.
    """

    takes_stage_times = True

    def __init__(self, tableau: ButcherTableau):
        if not tableau.explicit:
            raise ValueError(f"tableau {tableau.name!r} is not explicit")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self._c = [float(c) for c in tableau.c]
        self.stage_nodes = tuple(self._c)
        self._a = [_nonzero(row[:i]) for i, row in enumerate(tableau.a)]
        self._b = _nonzero(tableau.b)
        self._e = None if tableau.error is None else _nonzero(tableau.error)

    @property
    def stages(self) -> int:
        return self.tableau.stages

    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> Tensor:
        return f(t0, y0)

    def reuse_first_stage(self, carry: Tensor) -> Tensor:
        return carry

    def stages_from(
        self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, k1: Tensor,
        stage_times: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """All stages K_1..K_s of the step given K_1 = f(t, y), and the last stage point Y_s;
        stage i at stage_times[i] when given, else at t + c_i h."""
        ks = [k1]
        y_stage = y
        for i in range(1, self.stages):
            y_stage = combine(y, h, self._a[i], ks)
            t_i = t + self._c[i] * h if stage_times is None else stage_times[i]
            ks.append(f(t_i, y_stage))
        return ks, y_stage

    def step(
        self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: Tensor | None,
        stage_times: Sequence[Tensor] | None = None,
    ) -> Step:
        k1 = f(t, y) if carry is None else carry
        ks, last_point = self.stages_from(f, t, h, y, k1, stage_times)
        if self.tableau.fsal:
            # The last stage point is y_next itself (a_s = b), and K_s = f(t + h, y_next).
            y_next, next_carry = last_point, ks[-1]
        else:
            y_next, next_carry = combine(y, h, self._b, ks), None
        error = None if self._e is None else combine(None, h, self._e, ks)
        return Step(y=y_next, error=error, dense=ks, carry=next_carry, retry_carry=k1)

    def interpolate(self, y: Tensor, h: Scalar, dense: list[Tensor], theta: Scalar) -> Tensor:
        return axpy_sum(y, h, self.dense_weights(theta), dense)

    def dense_weights(self, theta: Scalar) -> list:
        """b_i(θ) = Σ_k P[i, k] θ^(k+1); floats, or 0-dim tensors when θ is a tensor."""
        return dense_weights(self.tableau.dense, theta)
