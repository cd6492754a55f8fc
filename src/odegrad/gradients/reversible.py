"""gradient="reversible": exact gradients in constant memory through an algebraically reversible
solver (MALI for `alf`, ALGORITHMS.md §5; McCallum–Foster, §6; reversible Heun, §7).

The forward pass runs without a graph and keeps only the final augmented state (2d numbers)
and the accepted steps (t_n, h_n) as host floats. The backward pass walks the steps in reverse:
each step is undone algebraically and its local VJP is taken from the f-evaluations of that
reconstruction (`ReversibleSolver.reverse`), so the cost is one F and one B per forward
f-evaluation and the memory one f-graph. The gradient is that of the discrete scheme with the
recorded steps, exact up to the round-off of the reconstruction.

Outputs at any times: an output inside a step is the scheme's dense output there, and its
cotangent is pulled back through that interpolant together with the step (the steps do not
have to land on output times, so the steps are those of `gradient="direct"`).

Methods: `alf`, `reversible_heun` and `reversible_<base>` use their own inverse; a plain
explicit Runge–Kutta method (e.g. "rk4") is wrapped as reversible_<method> with `coupling=`
(default 0.999), so its outputs are those of the reversible scheme, not of the plain one.

f must be deterministic (no active dropout: `check` refuses it); buffers that the backward
pass's f-evaluations write (BatchNorm running statistics) are restored afterwards.

Drift: after the backward pass the reconstructed initial state is compared with the true one;
`stats["drift"]` is max|Δ| / max|state_0|, and above `drift_tol` (default max(rtol, 1000 eps))
a ReversibleDriftWarning suggests a smaller step, a coupling or η closer to 1, or float64.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import replace

import torch
from torch import Tensor

from ..errors import InvalidInputError, ReversibleDriftWarning, UnsupportedCombinationError
from ..problem import Problem, backward_phase
from ..solvers import SOLVERS
from ..solvers.explicit import ExplicitRungeKutta
from ..solvers.reversible import LocalAdjoint, ReversibleRungeKutta, ReversibleSolver
from ..tableaus import TABLEAUS
from .second_order import differentiable_backward, graph_requested

OPTIONS = ("coupling", "drift_tol")


def options_for(method_options: set[str]) -> tuple[str, ...]:
    """The options this gradient takes next to a method taking `method_options`: `coupling=`
    belongs to a reversible_<base> method itself, so it is the gradient's only when it wraps a
    plain explicit method (one consumer per option name for every (method, gradient) pair)."""
    return tuple(name for name in OPTIONS if name not in method_options)


def check(problem: Problem) -> None:
    """Only reversible schemes and explicit Runge–Kutta bases (wrapped) can be served."""
    solver = problem.solver
    if problem.stochastic():
        raise UnsupportedCombinationError(
            "gradient='reversible' needs a deterministic f, but f draws random numbers (active "
            "dropout or noise): the backward pass could not reconstruct the states; call "
            "f.eval() or use gradient='discrete'"
        )
    if isinstance(solver, (ReversibleSolver, ExplicitRungeKutta)):
        return
    valid = sorted(
        name for name in SOLVERS
        if name == "alf" or name.startswith("reversible_") or name in TABLEAUS
    )
    raise UnsupportedCombinationError(
        f"gradient='reversible' cannot serve method {solver.name!r}: it needs an algebraically "
        f"reversible scheme or an explicit Runge–Kutta base to wrap; valid methods: "
        f"{', '.join(valid)}"
    )


def solve(
    problem: Problem, coupling: float | None = None, drift_tol: float | None = None
) -> Tensor:
    """The outputs at problem.t, differentiable w.r.t. y0, t and problem.params."""
    solver = solver_for(problem, coupling)
    problem = replace(problem, solver=solver)
    problem.stats["method"] = solver.name
    return _ReversibleSolve.apply(problem, drift_tol, problem.t, problem.y0, *problem.params)


def solver_for(problem: Problem, coupling: float | None = None, **_) -> ReversibleSolver:
    """The scheme this gradient solves: the problem's reversible solver, or McCallum–Foster
    over its plain explicit method with `coupling` (default 0.999). The API locates events
    with it too, so the event is that of the scheme differentiated."""
    solver = problem.solver
    if isinstance(solver, ExplicitRungeKutta):
        return ReversibleRungeKutta(solver, coupling=0.999 if coupling is None else coupling)
    if coupling is not None:
        raise InvalidInputError(
            f"coupling= wraps a plain explicit Runge–Kutta method; method {solver.name!r} is "
            f"reversible already (give its own options, e.g. eta= for alf)"
        )
    return solver


class _ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, drift_tol, t: Tensor, y0: Tensor, *params: Tensor):
        final: list[Tensor] = []

        def keep_last(record, state, step) -> None:
            final[:] = [step.y]

        with torch.no_grad():
            outputs, trajectory = problem.integrate(on_step=keep_last)
        state = final[0] if final else problem.solver.initial_state(y0)
        ctx.problem, ctx.trajectory, ctx.drift_tol, ctx.final = (
            problem, trajectory, drift_tol, state
        )
        ctx.save_for_backward(t, y0, *params)
        problem.stats["checkpoint_bytes"] = state.numel() * state.element_size()
        return torch.stack(outputs)

    @staticmethod
    def backward(ctx, grad_outputs: Tensor):
        problem = ctx.problem
        if graph_requested():  # double backward: §10 (a), see gradients/second_order.py
            inputs = [problem.t, problem.y0, *problem.params]
            with backward_phase(problem):
                grads = differentiable_backward(
                    problem, grad_outputs, inputs, ctx.needs_input_grad[2:]
                )
            return None, None, *grads
        t, y0, *params = ctx.saved_tensors
        with backward_phase(problem), torch.enable_grad():
            y0_bar, t_bar, param_bars = _backward(ctx, t, y0, params, grad_outputs)
        return None, None, t_bar, y0_bar, *param_bars


def _backward(ctx, t: Tensor, y0: Tensor, params, grad_outputs: Tensor):
    problem, trajectory = ctx.problem, ctx.trajectory
    solver: ReversibleSolver = problem.solver
    time_grad = ctx.needs_input_grad[2]
    t_leaf = t.detach().requires_grad_(time_grad)
    local = LocalAdjoint((*params, t_leaf) if time_grad else params)

    y0_bar = torch.zeros_like(y0)
    at_end: dict[int, list[int]] = defaultdict(list)
    inside = defaultdict(list)
    for out in trajectory.outputs:
        if out.step < 0:
            y0_bar += grad_outputs[out.index]
        elif out.index == trajectory.steps[out.step].end_anchor:
            at_end[out.step].append(out.index)
        else:
            inside[out.step].append(out)

    state, back = ctx.final, None
    adjoint = torch.zeros_like(state)
    for record in reversed(trajectory.steps):
        for i in at_end.get(record.index, ()):
            adjoint[0] += grad_outputs[i]
        t_n = trajectory.step_time(t_leaf, record)
        h = trajectory.step_size(t_leaf, record, t_n)
        outputs = [
            (trajectory.theta(t_leaf, out, t_n, h), grad_outputs[out.index])
            for out in inside.get(record.index, ())
        ]
        state, adjoint, back = solver.reverse(
            problem.f, t_n, h, state, adjoint, outputs, local, back
        )
    dy0, true_state = solver.finish(problem.f, t_leaf[0], y0, adjoint, local, back)
    y0_bar += dy0
    if trajectory.steps:
        _check_drift(problem, state, true_state, ctx.drift_tol)
    else:
        problem.stats["drift"] = 0.0

    param_bars = [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, local.grads)
    ]
    t_bar = None
    if time_grad:
        t_bar = local.grads[-1] if local.grads[-1] is not None else torch.zeros_like(t)
    return y0_bar, t_bar, param_bars


def _check_drift(problem: Problem, state: Tensor, true_state: Tensor, drift_tol) -> None:
    """stats["drift"] = max|reconstructed − true| / max|true|; warn above the tolerance."""
    with torch.no_grad():
        scale = true_state.abs().max().clamp_min(torch.finfo(state.dtype).tiny)
        drift = float((state - true_state).abs().max() / scale)
    problem.stats["drift"] = drift
    if drift_tol is None:
        rtol = problem.rtol
        rtol = float(rtol.max()) if isinstance(rtol, Tensor) else float(rtol)
        drift_tol = max(rtol, 1000 * torch.finfo(state.dtype).eps)
    if not drift <= drift_tol:
        warnings.warn(
            f"gradient='reversible' with method {problem.solver.name!r}: the reconstructed "
            f"initial state drifted from the true one by {drift:.3e} (relative), above "
            f"{drift_tol:.1e}, so the gradient is inaccurate; use a smaller step size, a "
            f"coupling= (reversible Runge–Kutta) or eta= (alf) closer to 1, or float64",
            ReversibleDriftWarning, stacklevel=2,
        )


