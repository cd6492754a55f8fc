"""gradient="backsolve": the continuous adjoint with y re-solved backwards (ALGORITHMS.md §3).

Chen et al. 2018: the forward solve keeps no graph, only the outputs; the backward pass solves
the augmented system (y, a, μ) from t[-1] back to t[0] with the core loop, resetting y to the
stored output and adding ∂L/∂y(t_i) to a at every output time. The error control of the
backward solve ignores μ by default (`adjoint_norm="seminorm"`, Kidger et al. 2021).

Memory: the outputs, O(len(t)·d). Backward cost per evaluation of the augmented field: one f
evaluation and one VJP. The gradient is approximate, its error following the tolerances; the
backward re-solve of y can be unstable for dissipative dynamics (then use "interpolated").
f should be deterministic: active dropout would draw new masks at every backward evaluation.

Options: adjoint_method (any method name; default the forward's), adjoint_rtol, adjoint_atol
(default the forward's), adjoint_step_size (the step of a fixed-step backward solve, default
the forward's step_size; the first step of an adaptive one, default the forward's last accepted
step), adjoint_norm ("seminorm", the default, or "full": the max over blocks of the RMS norm,
y and a with the forward's norm), and the backward solve's step hooks adjoint_on_attempt,
adjoint_on_accept, adjoint_on_reject, each called (t, (y, a, *μ), h) per backward step attempt,
accepted step, rejected attempt (continuous.BackwardHooks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem
from .continuous import (
    OPTIONS,
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

__all__ = ["solve", "check", "OPTIONS"]


def solve(problem: Problem, **options) -> Tensor:
    """The outputs y(t_i), stacked; differentiable w.r.t. y0, t and problem.params."""
    settings = adjoint_settings(problem, **options)
    from ..compiled import CompiledRungeKutta

    if isinstance(problem.solver, CompiledRungeKutta):  # compile=True
        from ..compiled_adjoint import compiled_settings

        settings = compiled_settings(problem, settings)
    for key in ("n_steps_backward", "n_accepted_backward", "n_rejected_backward"):
        problem.stats.setdefault(key, 0)
    return _Backsolve.apply(problem, settings, problem.y0, problem.t, *problem.params)


class _Backsolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, settings: AdjointSettings, y0: Tensor, t: Tensor,
                *params: Tensor) -> Tensor:
        with torch.no_grad():
            outputs, trajectory = problem.integrate()
            ys = torch.stack(outputs)
        problem.stats["checkpoint_bytes"] = state_bytes(ys)
        ctx.first_step = last_step(trajectory.steps)
        ctx.problem, ctx.settings = problem, settings
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        problem: Problem = ctx.problem
        if graph_requested():  # double backward: gradients/second_order.py
            needs = ctx.needs_input_grad[2:]
            return (None, None, *backward_with_graph(problem, grad_ys, needs))
        (ys,) = ctx.saved_tensors
        with torch.no_grad(), backward_phase(problem):
            a0, mu = sweep(problem, ys, grad_ys, ctx.settings, None, ctx.first_step)
            grad_t = time_gradient(problem, ys, grad_ys, a0) if ctx.needs_input_grad[3] else None
        return (None, None, a0 + grad_ys[0], grad_t, *mu)
