"""Adams multistep schemes: Adams–Bashforth and the Adams–Bashforth–Moulton predictor-corrector.

With the past values f_{n-j} = f(t_{n-j}, y_{n-j}) at the nodes s_j = (t_{n-j} − t_n)/h, a step

    y_{n+1} = y_n + h Σ_j β_j f_{n-j},   β_j = ∫_0^1 ℓ_j(s) ds,

integrates the polynomial through them (ℓ_j the Lagrange basis on the nodes; Hairer–Nørsett–
Wanner I, §III.1). Adams–Bashforth (AB) of order k uses the k latest values; the
predictor-corrector takes AB of order k as the predictor and Adams–Moulton of order k + 1, whose
nodes add s = 1 (f at t_{n+1}), as the corrector, iterated by functional iteration up to
`max_iters` times until two iterates agree to rtol/atol (P(EC)^m E).

Start-up and order ramp as torchdiffeq 0.2.5 (_impl/fixed_adams.py): while fewer than three
values are known the step is Kutta's 3/8-rule RK4 (`rk4_38`); then the order is the number of
values known, up to `max_order`; that ramp bounds the global order (`order`) at 4 for AB and 5
with the corrector, whatever max_order. On equal steps β_j are the classical constants (exact
rationals), also when the steps differ by less than the resolution of t in its dtype (one
host read of t per step); on unequal steps (a clipped last step, uneven output times) they
follow from the actual nodes, so the order holds on any grid (torchdiffeq keeps the equal-step
constants there: docs/torchdiffeq_suite.md). The history (f values, their times and the
spans t_{n+1} − t_{n-j}) lives in the carry, so the discrete adjoint replays a step with it.
A step whose corrector does not converge warns and, as in torchdiffeq, drops its oldest value.

`perturb=True` (torchdiffeq's option of that name): f is evaluated one ulp inside each step at
its ends, at t_n moved towards t_{n+1} (the history's value f_n, and the start-up step's first
stage) and at t_{n+1} moved towards t_n (the corrector, the start-up step's last stage), so
an f that jumps at the step ends sees, in each step, only its values inside; the history is
kept across the steps (as torchdiffeq's fixed_adams), so the polynomial through it still
spans the jumps of earlier steps.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from functools import cache

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..tableaus import RK4_38
from . import register_solver
from .base import Scalar, Solver, Step, VectorField, axpy_sum
from .explicit import ExplicitRungeKutta

MAX_ORDER = 12  # torchdiffeq's bound on max_order; the corrector's order is at most this
_START_VALUES = 3  # fewer known f values than this: a start-up RK4 step
_UNIFORM_TOL = 1e-12  # least deviation of a node from −j (in steps) counted as equal steps

# carry: (f values, their times, spans t_{n+1} − t_{n−j} as floats), most recent first
Carry = tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[float, ...]]


@cache
def uniform_coefficients(order: int, corrector: bool) -> tuple[float, ...]:
    """β_j of Adams–Bashforth (nodes 0, −1, …, −(k−1)) or Adams–Moulton (nodes 1, 0, …,
    −(k−2)) of order k on equal steps, from exact rational integrals of the Lagrange basis."""
    nodes = [Fraction(1 - j if corrector else -j) for j in range(order)]
    betas = []
    for j, s_j in enumerate(nodes):
        poly, denominator = [Fraction(1)], Fraction(1)  # coefficients in s, ascending
        for i, s_i in enumerate(nodes):
            if i != j:
                poly = [a - s_i * b for a, b in zip([Fraction(0)] + poly, poly + [Fraction(0)])]
                denominator *= s_j - s_i
        betas.append(sum(c / (p + 1) for p, c in enumerate(poly)) / denominator)
    return tuple(float(b) for b in betas)


@cache
def _gauss(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(count)
    return (x + 1) / 2, w / 2


def lagrange_integrals(nodes, upper: Scalar):
    """∫_0^upper ℓ_j(s) ds for the Lagrange basis on `nodes` (exact: Gauss–Legendre with
    ⌈k/2⌉ + 1 points). NumPy floats for float input; a tensor (differentiable w.r.t. the
    nodes and `upper`) when either is a tensor."""
    k = len(nodes)
    x, w = _gauss(k // 2 + 1)
    if not isinstance(nodes, Tensor) and not isinstance(upper, Tensor):
        s = np.asarray(nodes, dtype=np.float64)
        gaps = s[:, None] - s[None, :]
        np.fill_diagonal(gaps, 1.0)
        points = (x * upper)[:, None, None] - s[None, None, :]  # (Q, 1, k)
        points = np.broadcast_to(points, (len(x), k, k)).copy()
        points[:, np.arange(k), np.arange(k)] = 1.0
        return (w * upper) @ points.prod(axis=2) / gaps.prod(axis=1)
    like = nodes if isinstance(nodes, Tensor) else upper
    s = nodes if isinstance(nodes, Tensor) else torch.tensor(nodes, dtype=like.dtype)
    eye = torch.eye(k, dtype=torch.bool, device=like.device)
    gaps = torch.where(eye, torch.ones_like(s)[:, None], s[:, None] - s[None, :])
    xs = torch.as_tensor(x, dtype=like.dtype, device=like.device) * upper
    ws = torch.as_tensor(w, dtype=like.dtype, device=like.device) * upper
    points = xs[:, None, None] - s[None, None, :]
    points = torch.where(eye[None], torch.ones_like(points), points.expand(len(x), k, k))
    return ws @ points.prod(dim=2) / gaps.prod(dim=1)


class AdamsMultistep(Solver):
    """Fixed-step Adams–Bashforth (`corrector=False`) or Adams–Bashforth–Moulton (True).

    `max_order` is the highest order of the formula that gives y_{n+1}: AB's order, or the
    corrector's (its predictor is then AB of one order less), as torchdiffeq's max_order is for
    its implicit Adams (its explicit_adams reaches max_order − 1).
    """

    takes_stage_times = False

    def __init__(self, name: str, max_order: int, corrector: bool, max_iters: int = 4,
                 perturb: bool = False):
        lowest = _START_VALUES + (1 if corrector else 0)
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not (
                lowest <= max_order <= MAX_ORDER):
            raise InvalidInputError(
                f"method {name!r}: max_order must be an int from {lowest} to {MAX_ORDER}, got "
                f"{max_order!r} (below {lowest} the start-up RK4 never hands over: use "
                "method='rk4_38')"
            )
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise InvalidInputError(
                f"method {name!r}: max_iters must be a positive int, got {max_iters!r}")
        if not isinstance(perturb, bool):
            raise InvalidInputError(f"method {name!r}: perturb must be True or False, got "
                                    f"{perturb!r}")
        self.name, self.max_order, self.corrector = name, max_order, corrector
        self.perturb = perturb
        self.max_iters = max_iters
        # The ramp's first Adams step has order 3 (AB3, or AB3 + AM4: local errors O(h^4),
        # O(h^5)), which bounds the global order at 4 (AB) and 5 (with the corrector).
        self.order = min(max_order, 5 if corrector else 4)
        self.history = max_order - 1 if corrector else max_order  # f values kept
        self._uniform_tol = _UNIFORM_TOL
        self.rtol: Tensor | float = 1e-6
        self.atol: Tensor | float = 1e-8
        self._start = ExplicitRungeKutta(RK4_38)

    def configure(self, *, rtol: Tensor | float, atol: Tensor | float) -> None:
        """The corrector's convergence tolerances (torchdiffeq's: odeint's rtol and atol)."""
        self.rtol, self.atol = rtol, atol

    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> Carry:
        return (), (), ()

    def step(self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: Carry) -> Step:
        past_f, past_t, spans = carry
        h_value = float(h.detach()) if isinstance(h, Tensor) else float(h)
        f_end = f
        if self.perturb:
            f_end = _NudgedEnd(f, t, h)
            f0 = f(_inside(t, t + h), y)
        else:
            f0 = f(t, y)
        fs = ((f0,) + past_f)[:self.history]
        ts = ((t,) + past_t)[:self.history]
        spans = ((0.0,) + spans)[:self.history]
        if len(fs) < _START_VALUES:
            start = self._start.step(f_end, t, h, y, f0)
            y_next, dense = start.y, ("rk", start.dense)
        else:
            y_next, dense, converged = self._adams(f_end, t, h, h_value, y, fs, ts, spans)
            if not converged:
                fs, ts, spans = fs[:-1], ts[:-1], spans[:-1]
        carry_next = (fs, ts, tuple(h_value + s for s in spans))
        return Step(y=y_next, error=None, dense=dense, carry=carry_next)

    def _adams(self, f, t, h, h_value, y, fs, ts, spans):
        k = min(len(fs), self.max_order - 1 if self.corrector else self.max_order)
        graph = torch.is_grad_enabled() and (
            t.requires_grad or (isinstance(h, Tensor) and h.requires_grad))
        if graph:  # nodes as tensors of the times, so the time gradient sees the coefficients
            nodes = torch.stack([(t_j - t) / h for t_j in ts[:k]])
        else:
            nodes = tuple(-s / h_value for s in spans[:k])
        # nodes within the resolution of t (in t's dtype) of the equal-step ones count as equal
        self._uniform_tol = max(_UNIFORM_TOL, 16 * torch.finfo(t.dtype).eps * (
            1.0 + abs(float(t.detach())) / abs(h_value)))
        dy = axpy_sum(None, h, self._coefficients(nodes, False), fs[:k])
        if not self.corrector:
            return y + dy, ("adams", nodes, fs[:k]), True
        c_nodes = (torch.cat([nodes.new_ones(1), nodes]) if graph else (1.0,) + nodes)
        betas = self._coefficients(c_nodes, True)
        delta = axpy_sum(None, h, betas[1:], fs[:k])
        t_next = t + h
        converged = False
        for _ in range(self.max_iters):
            dy_old = dy
            f_next = f(t_next, y + dy)
            dy = axpy_sum(delta, h, betas[:1], [f_next])
            converged = self._converged(dy_old, dy)
            if converged:
                break
        if not converged:
            warnings.warn(
                f"{self.name}: the corrector's functional iteration did not converge in "
                f"max_iters={self.max_iters} iterations at t={float(t):.10g} (h={h_value:.3e}); "
                "the solution may be inaccurate: take a smaller step_size or raise max_iters",
                RuntimeWarning, stacklevel=2,
            )
        return y + dy, ("adams", c_nodes, (f_next,) + fs[:k]), converged

    def _coefficients(self, nodes, corrector: bool) -> list:
        """β_j for the nodes: the exact constants when the steps are equal."""
        if isinstance(nodes, Tensor):
            return list(lagrange_integrals(nodes, 1.0).unbind())
        offset = 1 if corrector else 0
        if all(abs(s - (offset - j)) <= self._uniform_tol * max(1, j)
               for j, s in enumerate(nodes)):
            return list(uniform_coefficients(len(nodes), corrector))
        return [float(b) for b in lagrange_integrals(nodes, 1.0)]

    def _converged(self, dy_old: Tensor, dy: Tensor) -> bool:
        """torchdiffeq's test: max |Δ| / (atol + rtol max(|dy_old|, |dy|)) < 1."""
        scale = self.atol + self.rtol * torch.maximum(dy_old.abs(), dy.abs())
        return bool(((dy_old - dy).abs() / scale).max() < 1)

    def interpolate(self, y: Tensor, h: Scalar, dense, theta: Scalar) -> Tensor:
        """y_n + h Σ_j ∫_0^θ ℓ_j(s) ds f_j over the step's own nodes (order of the scheme);
        the start-up steps use rk4_38's dense output."""
        if dense[0] == "rk":
            return self._start.interpolate(y, h, dense[1], theta)
        _, nodes, values = dense
        weights = lagrange_integrals(nodes, theta)
        weights = list(weights.unbind()) if isinstance(weights, Tensor) else [
            float(v) for v in weights]
        return axpy_sum(y, h, weights, list(values))


def _inside(point: Tensor, towards) -> Tensor:
    """`point` moved one ulp towards `towards` (its gradient w.r.t. point kept)."""
    towards = towards.detach() if isinstance(towards, Tensor) else torch.as_tensor(
        towards, dtype=point.dtype, device=point.device)
    return point + (torch.nextafter(point.detach(), towards.to(point.dtype)) - point).detach()


class _NudgedEnd:
    """f with an evaluation at the step's end t + h moved one ulp back into the step."""

    def __init__(self, f: VectorField, t: Tensor, h: Scalar):
        self.f, self.t = f, t
        self.end = t + h
        end = float(self.end.detach())
        self.value, self.tol = end, 8 * torch.finfo(t.dtype).eps * max(abs(end), 1e-30)

    def __call__(self, s: Tensor, y: Tensor) -> Tensor:
        if abs(float(s.detach()) - self.value) <= self.tol:
            s = _inside(s, self.t)
        return self.f(s, y)


def _adams_bashforth(max_order: int = 4, perturb: bool = False) -> AdamsMultistep:
    return AdamsMultistep("adams_bashforth", max_order, corrector=False, perturb=perturb)


def _adams_bashforth_moulton(max_order: int = 4, max_iters: int = 4,
                             perturb: bool = False) -> AdamsMultistep:
    return AdamsMultistep("adams_bashforth_moulton", max_order, corrector=True,
                          max_iters=max_iters, perturb=perturb)


register_solver("adams_bashforth", _adams_bashforth)
register_solver("adams_bashforth_moulton", _adams_bashforth_moulton)
