"""Terminal events: integrate until g(t, y) crosses zero, locate the crossing on the dense output,
and make the event time and state differentiable (ALGORITHMS.md §13).

Locating (`locate_event`): the forward loop runs without a graph; after every accepted step g is
evaluated at the step's end, and a component whose sign changed (in the requested direction)
brackets a root inside the step. The root of θ ↦ g_k(t_n + θh, y(t_n + θh)) on the scheme's
dense output is found by the Illinois variant of regula falsi to the resolution of t; the
earliest root over the components that changed is the event. A component that is exactly zero
at t0 is armed once it leaves zero, so an event state can start the next solve.

Differentiating (`EventTime`): the caller solves again from t0 to the located t* with the chosen
gradient method, which makes y* = y(t*) differentiable at fixed t*. The event time t*(θ) solves
g(t*, y(t*; θ)) = 0, so with ġ = ∂_t g + ∂_y g · f(t*, y*) (implicit function theorem),

    dt*/dθ = −∂_y g · (∂y/∂θ) / ġ,     d(event state)/dθ = ∂y/∂θ + f(t*, y*) dt*/dθ,

which in reverse mode turns the cotangents (t̄, ȳ) of (t*, event state) into the cotangent
ȳ − ((t̄ + ȳ · f*) / ġ) ∂_y g on y* at fixed t*. Gradients w.r.t. y0, t0 and f's parameters then
come from the solve's own gradient method (every method differentiates its end state and t0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from .errors import InvalidInputError, OdegradError, UnsupportedCombinationError
from .problem import Problem, probe_graph

DIRECTIONS = (-1, 0, 1)
_MAX_ROOT_ITERATIONS = 200


class _EventFound(Exception):
    """Raised from the loop's on_step hook to stop the forward loop at the event."""

    def __init__(self, t_star: float, component: int):
        super().__init__(t_star)
        self.t_star = t_star
        self.component = component


def validate_event(event_fn, direction, t: Tensor, y0: Tensor, g: Callable) -> None:
    """Check the event arguments and that g depends on nothing that requires grad besides
    (t, y): its own parameters would receive no gradient."""
    if not callable(event_fn):
        raise InvalidInputError(f"event_fn must be a callable g(t, y), got {event_fn!r}")
    if direction not in DIRECTIONS or isinstance(direction, bool):
        raise InvalidInputError(
            f"event_direction must be -1 (g falls through 0), 1 (rises) or 0 (either), got "
            f"{direction!r}"
        )
    if len(t) != 2:
        raise InvalidInputError(
            f"with event_fn, t must be [t0, t_end] (the search horizon), got {len(t)} times"
        )
    leaves, _ = probe_graph(g, y0, t, ())
    if leaves:
        raise UnsupportedCombinationError(
            f"event_fn depends on {len(leaves)} tensor(s) that require grad besides (t, y): the "
            "event time is differentiated through y and t only; detach them"
        )


def event_values(g: Callable, t: Tensor, y: Tensor) -> Tensor:
    """g(t, y) as a flat float64 tensor on the host."""
    value = g(t, y)
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"event_fn must return a tensor, got {type(value).__name__}")
    return value.detach().reshape(-1).double().cpu()


def locate_event(problem: Problem, g: Callable, direction: int) -> tuple[float, int] | None:
    """(t*, the component of g that crossed) of the first event in (t0, t_end], or None."""
    solver = problem.solver
    t0 = problem.t[0].detach()
    with torch.no_grad():
        reference = event_values(g, t0, problem.y0.detach()).sign()

    def on_step(record, state, step) -> None:
        nonlocal reference
        t_next = record.t + record.h
        end = event_values(g, torch.tensor(t_next, dtype=t0.dtype, device=t0.device),
                           solver.observe(step.y)).sign()
        crossed = (reference != 0) & (end != reference)
        if direction:
            crossed &= (end - reference) * direction > 0
        if bool(crossed.any()):
            roots = [(_root(g, solver, record, state, step, int(k), float(reference[k])), int(k))
                     for k in crossed.nonzero().reshape(-1)]
            raise _EventFound(*min(roots, key=lambda r: (r[0] - record.t) / record.h))
        reference = torch.where(reference == 0, end, reference)  # arm components leaving 0
        reference = torch.where(end == 0, reference, end)

    search = replace(problem, on_attempt=None, on_accept=None, on_reject=None)
    try:  # the user's step callbacks see the solve to the event, not this search
        with torch.no_grad():
            search.integrate(on_step=on_step)
    except _EventFound as found:
        return found.t_star, found.component
    return None


def _root(g, solver, record, state, step, k: int, sign0: float) -> float:
    """t in (t_n, t_n + h] where g_k crosses zero on the dense output: Illinois regula falsi in
    θ, to the resolution of t."""
    t_n, h = record.t, record.h

    def phi(theta: float) -> float:
        y = solver.interpolate(state, h, step.dense, theta)
        t = torch.tensor(t_n + theta * h, dtype=state.dtype, device=state.device)
        return float(event_values(g, t, y)[k])

    a, b = 0.0, 1.0
    fa, fb = phi(0.0), phi(1.0)
    if fb == 0.0:
        return t_n + h
    if fa == 0.0 or math.copysign(1.0, fa) == math.copysign(1.0, fb):
        fa = sign0 * max(abs(fa), 1e-300)  # the bracket's start keeps the reference sign
    resolution = 4 * torch.finfo(state.dtype).eps * max(abs(t_n), abs(t_n + h)) / abs(h)
    side = 0
    for _ in range(_MAX_ROOT_ITERATIONS):
        if b - a <= max(resolution, 1e-15):
            break
        c = (a * fb - b * fa) / (fb - fa) if fb != fa else 0.5 * (a + b)
        if not a < c < b:
            c = 0.5 * (a + b)
        fc = phi(c)
        if fc == 0.0:
            return t_n + c * h
        if math.copysign(1.0, fc) == math.copysign(1.0, fb):
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
        else:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
    return t_n + b * h


class EventTime(torch.autograd.Function):
    """(t*, y*) → (t*, event state) with the implicit-function gradient of the crossing."""

    @staticmethod
    def forward(ctx, f: Callable, g: Callable, component: int, t_star: Tensor, y_star: Tensor):
        ctx.f, ctx.g, ctx.component = f, g, component
        ctx.save_for_backward(t_star, y_star)
        return t_star.detach().clone(), y_star.detach().clone()

    @staticmethod
    def backward(ctx, t_bar: Tensor | None, y_bar: Tensor | None):
        if torch.is_grad_enabled():
            raise UnsupportedCombinationError(
                "second-order gradients through an event time are not implemented; take "
                "create_graph=False, or differentiate a solve without event_fn"
            )
        t_star, y_star = ctx.saved_tensors
        with torch.enable_grad():
            t_in = t_star.detach().requires_grad_()
            y_in = y_star.detach().requires_grad_()
            g_k = ctx.g(t_in, y_in).reshape(-1)[ctx.component]
            dg_dt, dg_dy = torch.autograd.grad(g_k, (t_in, y_in), allow_unused=True,
                                               materialize_grads=True)
        f_star = ctx.f(t_star.detach(), y_star.detach()).detach()
        g_dot = dg_dt + (dg_dy * f_star).sum()
        if not float(g_dot.abs()) > 0.0:
            raise OdegradError(
                f"the event at t={float(t_star):.10g} is tangential (dg/dt = 0 along the "
                "solution), so its time is not differentiable"
            )
        total = (t_bar if t_bar is not None else torch.zeros_like(t_star))
        y_bar = torch.zeros_like(y_star) if y_bar is None else y_bar
        total = total + (y_bar * f_star).sum()
        return None, None, None, None, y_bar - (total / g_dot) * dg_dy
