"""torchdiffeq 0.2.5's `odeint` and `odeint_adjoint`, served by odegrad.

`import odegrad.compat.torchdiffeq as torchdiffeq` replaces the library in existing code: the
same signatures, method names, option names and defaults. Every keyword and every `options=` /
`adjoint_options=` key torchdiffeq 0.2.5 accepts is either honoured with torchdiffeq's meaning or
raises an error that names it; none is dropped without a word (docs/torchdiffeq_suite.md).

Honoured:
    rtol, atol (scalars, tensors, or one per tensor of a tuple state), method, options,
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params; tuple states
    (also of 0-dim tensors); t of another floating dtype than y0 (kept for the outputs'
    interpolation, cast to y0's dtype for the solve) or on another device (moved, with
    torchdiffeq's warning); decreasing t.
    Adaptive methods (dopri5, dopri8, bosh3, adaptive_heun): first_step, max_num_steps
    (default 2**31 - 1, counted per output interval as torchdiffeq does), norm (a callable; on a
    tuple state it receives the tuple; the default on a tuple state is torchdiffeq's max over
    the tensors of their RMS norms), step_t and jump_t (odegrad's options of those names: steps
    land on each; at a jump_t, f is evaluated one ulp inside the interval on either side, as
    torchdiffeq's Perturb does; with a max_num_steps the solve restarts there instead),
    min_step, max_step, safety, ifactor, dfactor (odegrad's options of those names, with
    torchdiffeq's meaning: |h| clamped to [min_step, max_step], a step with |h| <= min_step
    accepted whatever its error), dtype=float64 (the default).
    Fixed-grid methods (euler, midpoint, heun2, heun3, and rk4, which is Kutta's 3/8 rule,
    odegrad's "rk4_38", not odegrad's classical "rk4"): step_size, grid_constructor, interp
    ("linear" between grid points as torchdiffeq does, or "cubic" Hermite), perturb.
    odeint_adjoint: odegrad's gradient="backsolve", with torchdiffeq's full adjoint norm by
    default and adjoint_options=dict(norm="seminorm") for the seminorm; adjoint_options step_size
    and first_step set the backward steps; adjoint_options default to options without "norm".
    An option torchdiffeq's chosen solver does not take (step_size for dopri5, first_step for
    euler, ...) is ignored with torchdiffeq's own "Unexpected arguments" warning, and a step
    callback the solver does not support with its "does not support callbacks" warning.
    Events: event_fn in odeint / odeint_adjoint, and odeint_event (reverse_time,
    odeint_interface), with torchdiffeq's semantics (problem.py _solve_event). Step callbacks:
    func.callback_step / callback_accept_step / callback_reject_step, served by odegrad's
    on_attempt / on_accept / on_reject hooks (problem.py _hooks).

Raised (InvalidInputError or UnknownNameError, each naming the option):
    odeint_dense's options (rtol and atol are served); event_fn with scipy_solver or step_t/jump_t;
    out-of-range controller values (min_step > max_step, dfactor >= 1, ...); adjoint_options
    min_step/max_step/safety/ifactor/dfactor other than the defaults (odegrad's backward solve
    runs its own controller; they default to options', so odeint_adjoint with a controller
    option needs adjoint_options without it); dtype asking for float32 time arithmetic; a callable
    adjoint_options["norm"] for an adaptive adjoint method; adjoint options the backward solve
    cannot take (a max_num_steps other than the forward's, step_t/jump_t absent from the
    forward, a grid_constructor other than the reversed forward grid, perturb other than the
    forward's); the step callbacks' _adjoint forms (callback_step_adjoint, ...: they run in
    torchdiffeq's backward solve, odegrad's step hooks in forward solves only); option
    names torchdiffeq does not know (torchdiffeq only warns about those).

Differences that remain (within the schemes' accuracy, not options): adaptive methods use
odegrad's PI controller, initial step and dense output, so results agree with torchdiffeq's to
the tolerance, not to the bit; steps are limited to the resolution of t in y0's dtype (torchdiffeq
keeps times in float64 for a float32 state); the adjoint's error norm has no block for the time
adjoint; where the shim restarts the solve (jump_t, perturb, max_num_steps with several output
times) odeint_adjoint's backward pass restarts from the stored forward state, and on a
fixed grid that misses some output times it steps back over the forward grid through the
interpolation (torchdiffeq re-solves through both), so gradients agree to the order of the
scheme; odeint_adjoint lets the backward evaluations update f's buffers, as torchdiffeq does.

The package, one concept per module, each importing only those above it:
    options   torchdiffeq's keywords and options (names, defaults, validation)
    methods   its method names and the odegrad schemes serving them
    state     tuple states, time dtypes, and the wrappers of f
    problem   one call's inputs and its solve (adaptive restarts, fixed grids, interpolation)
    adjoint   odeint_adjoint and its adjoint options
"""

from __future__ import annotations

import bisect

import torch

from ...errors import InvalidInputError
from .adjoint import odeint_adjoint
from .options import ADJOINT_KEYWORDS, KEYWORDS, OPTION_NAMES
from .options import MAX_NUM_STEPS as MAX_NUM_STEPS  # torchdiffeq's default max_num_steps
from .problem import MaxNumStepsExceededError, _Problem
from .state import _Flat, _flatten_state, _unflatten

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "OPTION_NAMES",
           "KEYWORDS", "ADJOINT_KEYWORDS", "MaxNumStepsExceededError"]

__version__ = "0.2.5"  # the torchdiffeq release whose behaviour this module reproduces


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq.odeint: y at every time in t; gradients by autograd through the solver
    (odegrad's gradient="direct")."""
    problem = _Problem(func, y0, t, rtol, atol, method, options, event_fn)
    return problem.finish(problem.solve("direct", {}))


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint,
                 **kwargs):
    """torchdiffeq.odeint_event: integrate from t0 (forwards, or backwards with reverse_time)
    until event_fn changes sign; returns (event_t, solution at [t0, event_t]) with the gradient
    of the event time linked up by the implicit function theorem, as torchdiffeq does (its
    odeint_interface returns the event time detached and the state at that fixed time)."""
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    flat_y0, shapes = _flatten_state(y0)
    flat_func = _Flat(func, shapes)
    with torch.no_grad():
        signs = torch.sign(event_fn(t[0], y0))

    def combined(t, y):
        return torch.min(event_fn(t, y if shapes is None else _unflatten(y, shapes)) * signs)

    if shapes is not None:
        state_t = torch.cat([s[-1].reshape(-1) for s in solution])
    else:
        state_t = solution[-1]
    event_t, state_t = _ImplicitFnGradientRerouting.apply(flat_func, combined, event_t, state_t)
    if shapes is not None:
        state_t = _unflatten(state_t, shapes)
        solution = tuple(torch.cat([s[:-1], s_t[None]], dim=0)
                         for s, s_t in zip(solution, state_t))
    else:
        solution = torch.cat([solution[:-1], state_t[None]], dim=0)
    return event_t, solution


class _ImplicitFnGradientRerouting(torch.autograd.Function):
    """torchdiffeq's: the cotangent of the event time, moved onto the state at that time
    (t* solves c(t*, y(t*)) = 0). Worked in real time: the same as torchdiffeq's negated time
    under reverse_time."""

    @staticmethod
    def forward(ctx, func, event_fn, event_t, state_t):
        ctx.func, ctx.event_fn = func, event_fn
        ctx.save_for_backward(event_t, state_t)
        return event_t.detach(), state_t.detach()

    @staticmethod
    def backward(ctx, grad_t, grad_state):
        event_t, state_t = ctx.saved_tensors
        event_t = event_t.detach().clone().requires_grad_(True)
        state_t = state_t.detach().clone().requires_grad_(True)
        f_val = ctx.func(event_t, state_t)
        with torch.enable_grad():
            c, (par_dt, dstate) = torch.autograd.functional.vjp(ctx.event_fn,
                                                                (event_t, state_t))
        dcdt = par_dt + torch.sum(dstate * f_val)
        grad_t = grad_t + torch.sum(grad_state * f_val)
        dstate = dstate * (-grad_t / (dcdt + 1e-12)).reshape_as(c)
        return None, None, None, grad_state + dstate


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """torchdiffeq.odeint_dense: solve from t0 to t1 (t0 < t1) with dopri5 and return
    `dense_output_fn(t)`, y at any scalar time t in [t0, t1] from the accepted step holding it
    (odegrad's dopri5 dense output, differentiable by autograd like the solve itself: the
    steps are recorded with their graph, as torchdiffeq keeps its interpolation coefficients).

    As torchdiffeq: y0 a tensor, method None or "dopri5"; options are refused here (torchdiffeq
    hands them to its Dopri5Solver) rather than ignored.
    """
    from ...loop import integrate
    from ...solvers import make_solver
    from .options import MAX_NUM_STEPS

    if not torch.is_tensor(y0):
        raise InvalidInputError("odeint_dense takes a tensor y0 (as torchdiffeq: no tuples)")
    if method not in (None, "dopri5"):
        raise InvalidInputError(f"odeint_dense supports method='dopri5' only (as torchdiffeq), "
                                f"got method={method!r}")
    if options:
        raise InvalidInputError(
            f"odeint_dense options {sorted(options)} are not served: odegrad's odeint_dense "
            "takes rtol and atol only; use odeint with the output times you need")
    t = torch.stack([torch.as_tensor(t0), torch.as_tensor(t1)]).to(y0)
    if not float(t[1]) > float(t[0]):
        raise InvalidInputError(f"odeint_dense needs t0 < t1 (as torchdiffeq), got "
                                f"t0={float(t[0])}, t1={float(t[1])}")
    solver = make_solver("dopri5")
    steps: list = []  # (t_n, h_n, y_n, stages) of every accepted step

    def keep(record, y, step) -> None:
        steps.append((record.t, record.h, y, step.dense))

    integrate(func, y0, t, solver, rtol=rtol, atol=atol, max_steps=MAX_NUM_STEPS,
              on_step=keep)
    starts = [start for start, *_ in steps]
    end = float(t[1])

    def dense_output_fn(t_eval):
        """y(t_eval) for a scalar time in [t0, t1]."""
        t_eval = torch.as_tensor(t_eval, dtype=y0.dtype, device=y0.device)
        if t_eval.numel() != 1:
            raise InvalidInputError("dense_output_fn takes one time (a scalar), as torchdiffeq's")
        value = float(t_eval)
        if not starts[0] <= value <= end:
            raise InvalidInputError(f"t={value} lies outside the solved interval "
                                    f"[{starts[0]}, {end}]")
        n = max(0, bisect.bisect_right(starts, value) - 1)
        start, h, y, dense = steps[n]
        return solver.interpolate(y, h, dense, (t_eval.reshape(()) - start) / h)

    return dense_output_fn
