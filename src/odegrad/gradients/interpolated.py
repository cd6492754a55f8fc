"""gradient="interpolated": the interpolated reverse dynamic method, IRDM (ALGORITHMS.md §4).

Daulbaev et al. 2020: the forward solve stores y at `n_nodes` Chebyshev–Lobatto nodes of every
output interval, read from the solver's dense output inside whichever accepted step holds them
(the nodes never constrain the steps and cost no f evaluation; the interval ends are the
outputs themselves). The backward pass solves only the adjoint (a, μ) of §3, with y(t) from the
barycentric interpolant through the nodes: one f evaluation and one VJP per evaluation, plus
O(n·d) for the interpolant; the state is d + p instead of 2d + p, and there is no unstable
backward re-solve of y.

Default n_nodes = 16 per output interval, chosen from the accuracy-vs-cost measurement in
benchmarks/RESULTS.md §3 (MLP field, float64: 16 nodes kept the gradient error within 1.5x of
the solver's floor for horizons 1, 3 and 10 at rtol = atol = 1e-5 and 1e-8; 8 sufficed only for
the shortest; the backward time hardly depends on n there). stats["interpolation_error"] estimates
the interpolant's error from its Chebyshev tail, in units of the tolerance; above 100 a
RuntimeWarning suggests more nodes (or more output times).
Memory: (n_nodes − 2)·d per interval besides the outputs. Options: n_nodes, and those of
"backsolve" (adjoint_method, adjoint_rtol, adjoint_atol, adjoint_step_size, adjoint_norm;
the seminorm leaves μ out of the error norm; the step hooks adjoint_on_attempt,
adjoint_on_accept, adjoint_on_reject, whose y is the interpolant's value).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import Tensor

from ..control import scaled_error
from ..errors import InvalidInputError
from ..interpolation import BarycentricInterpolant, chebyshev_tail, lobatto_nodes
from ..problem import Problem
from .continuous import OPTIONS as _ADJOINT_OPTIONS
from .continuous import (
    AdjointSettings,
    adjoint_settings,
    backward_phase,
    backward_with_graph,
    check,
    last_step,
    state_bytes,
    sweep,
    time_gradient,
)
from .second_order import graph_requested

__all__ = ["solve", "check", "OPTIONS", "DEFAULT_N_NODES"]

OPTIONS = ("n_nodes", *_ADJOINT_OPTIONS)
DEFAULT_N_NODES = 16
# stats["interpolation_error"] above this warns. Measured (benchmarks/RESULTS.md §3.3, and on the
# test MLP over longer horizons): estimates above ~150 mostly came with gradient errors 6-20x
# the solver's floor, estimates below ~50 mostly with errors at the floor (one exception: 27).
WARN_INTERPOLATION_ERROR = 100.0


def solve(problem: Problem, n_nodes: int = DEFAULT_N_NODES, **options) -> Tensor:
    """The outputs y(t_i), stacked; differentiable w.r.t. y0, t and problem.params."""
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 2:
        raise InvalidInputError(f"n_nodes must be an int >= 2, got {n_nodes!r}")
    settings = adjoint_settings(problem, **options, interpolant=True)
    for key in ("n_steps_backward", "n_accepted_backward", "n_rejected_backward"):
        problem.stats.setdefault(key, 0)
    ys = _Interpolated.apply(problem, settings, n_nodes, problem.y0, problem.t, *problem.params)
    estimate = problem.stats["interpolation_error"]
    if estimate > WARN_INTERPOLATION_ERROR:
        warnings.warn(
            f"gradient='interpolated': the interpolant of y through n_nodes={n_nodes} "
            f"Chebyshev-Lobatto nodes per output interval has an estimated error of "
            f"{estimate:.3g} times the tolerance; the gradient may be inaccurate: raise n_nodes "
            f"or add output times", RuntimeWarning, stacklevel=_user_stacklevel(),
        )
    return ys


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside the odegrad package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class NodeRecorder:
    """An on_step hook filling the interior Lobatto nodes of every output interval from the
    dense output of the accepted step that holds them."""

    def __init__(self, problem: Problem, n_nodes: int):
        times = [float(v) for v in problem.t.detach().cpu().tolist()]
        self.times = times
        self.n_nodes = n_nodes
        self.direction = 1.0 if times[-1] > times[0] else -1.0
        n_intervals = len(times) - 1
        y0 = problem.y0
        self.interior = y0.new_empty((n_intervals, max(n_nodes - 2, 0), *y0.shape))
        # (interval, row in `interior`, time), in the direction of integration
        self.queue = [
            (i, j - 1, x)
            for i in range(n_intervals)
            for j, x in reversed(list(enumerate(lobatto_nodes(n_nodes, times[i], times[i + 1]))))
            if 0 < j < n_nodes - 1
        ]
        self.next = 0
        self.solver = problem.solver

    def __call__(self, record, y_n: Tensor, step) -> None:
        end = self.times[-1] if record.end_anchor == len(self.times) - 1 else record.t + record.h
        tol = 1e-12 * max(abs(end), abs(record.h))
        queue = self.queue
        while self.next < len(queue) and self.direction * (queue[self.next][2] - end) <= tol:
            i, row, x = queue[self.next]
            theta = (x - record.t) / record.h
            self.interior[i, row] = self.solver.interpolate(y_n, record.h, step.dense, theta)
            self.next += 1


def interval_values(ys: Tensor, interior: Tensor, i: int) -> Tensor:
    """y at the Lobatto nodes of [t_i, t_{i+1}], x_0 = t_{i+1} first."""
    return torch.cat([ys[i + 1].unsqueeze(0), interior[i], ys[i].unsqueeze(0)])


def interpolation_error(problem: Problem, ys: Tensor, interior: Tensor) -> float:
    """The largest estimated error of the interpolants, in units of the forward tolerance:
    the Chebyshev tail |c_{n−2}| + |c_{n−1}| in the forward's error norm (≤ 1: within it)."""
    if len(ys) < 2:
        return 0.0
    estimates = [
        scaled_error(chebyshev_tail(interval_values(ys, interior, i)), ys[i], ys[i + 1],
                     problem.rtol, problem.atol, problem.norm)
        for i in range(len(ys) - 1)
    ]
    return float(torch.stack(estimates).max())


class _Interpolated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, settings: AdjointSettings, n_nodes: int, y0: Tensor,
                t: Tensor, *params: Tensor) -> Tensor:
        recorder = NodeRecorder(problem, n_nodes)
        with torch.no_grad():
            outputs, trajectory = problem.integrate(on_step=recorder)
            ys = torch.stack(outputs)
        problem.stats["checkpoint_bytes"] = state_bytes(ys, recorder.interior)
        problem.stats["interpolation_error"] = interpolation_error(
            problem, ys, recorder.interior
        )
        ctx.first_step = last_step(trajectory.steps)
        ctx.problem, ctx.settings, ctx.times = problem, settings, recorder.times
        ctx.save_for_backward(ys, recorder.interior)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        problem: Problem = ctx.problem
        if graph_requested():  # double backward: gradients/second_order.py
            needs = ctx.needs_input_grad[3:]
            return (None, None, None, *backward_with_graph(problem, grad_ys, needs))
        ys, interior = ctx.saved_tensors
        times = ctx.times

        def interpolant(i: int) -> BarycentricInterpolant:
            return BarycentricInterpolant(times[i], times[i + 1], interval_values(ys, interior, i))

        with torch.no_grad(), backward_phase(problem):
            a0, mu = sweep(problem, ys, grad_ys, ctx.settings, interpolant, ctx.first_step)
            grad_t = time_gradient(problem, ys, grad_ys, a0) if ctx.needs_input_grad[4] else None
        return (None, None, None, a0 + grad_ys[0], grad_t, *mu)
