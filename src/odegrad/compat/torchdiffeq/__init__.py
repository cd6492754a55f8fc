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
    the tensors of their RMS norms), step_t and jump_t (the solve restarts there, so that a step
    ends on each; at a jump_t, f is evaluated one ulp inside the interval on either side, as
    torchdiffeq's Perturb does), and min_step=0, max_step=inf, safety=0.9, ifactor=10,
    dfactor=0.2, dtype=float64 (the defaults, which odegrad's controller also uses).
    Fixed-grid methods (euler, midpoint, heun2, heun3, and rk4, which is Kutta's 3/8 rule,
    odegrad's "rk4_38", not odegrad's classical "rk4"): step_size, grid_constructor, interp
    ("linear" between grid points as torchdiffeq does, or "cubic" Hermite), perturb.
    odeint_adjoint: odegrad's gradient="backsolve", with torchdiffeq's full adjoint norm by
    default and adjoint_options=dict(norm="seminorm") for the seminorm; adjoint_options step_size
    and first_step set the backward steps; adjoint_options default to options without "norm".
    An option torchdiffeq's chosen solver does not take (step_size for dopri5, first_step for
    euler, ...) is ignored with torchdiffeq's own "Unexpected arguments" warning, and a step
    callback the solver does not support with its "does not support callbacks" warning.

Raised (InvalidInputError or UnknownNameError, each naming the option):
    methods odegrad lacks: explicit_adams, implicit_adams, fixed_adams;
    event_fn (and odeint_event, odeint_dense); options min_step/max_step/safety/ifactor/dfactor
    other than the defaults; dtype asking for float32 time arithmetic; a callable
    adjoint_options["norm"] for an adaptive adjoint method; adjoint options the backward solve
    cannot take (a max_num_steps other than the forward's, step_t/jump_t absent from the
    forward, a grid_constructor other than the reversed forward grid, perturb other than the
    forward's); step callbacks on func (callback_step, callback_accept_step,
    callback_reject_step and their _adjoint forms) where the solver would call them; option
    names torchdiffeq does not know (torchdiffeq only warns about those).

Differences that remain (within the schemes' accuracy, not options): adaptive methods use
odegrad's PI controller, initial step and dense output, so results agree with torchdiffeq's to
the tolerance, not to the bit; steps are limited to the resolution of t in y0's dtype (torchdiffeq
keeps times in float64 for a float32 state); the adjoint's error norm has no block for the time
adjoint; where the shim restarts the solve (step_t, jump_t, perturb, max_num_steps with several
output times) odeint_adjoint's backward pass restarts from the stored forward state, and on a
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

from ...errors import InvalidInputError
from .adjoint import odeint_adjoint
from .options import ADJOINT_KEYWORDS, KEYWORDS, OPTION_NAMES
from .options import MAX_NUM_STEPS as MAX_NUM_STEPS  # torchdiffeq's default max_num_steps
from .problem import _EVENT_MESSAGE, MaxNumStepsExceededError, _Problem

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "OPTION_NAMES",
           "KEYWORDS", "ADJOINT_KEYWORDS", "MaxNumStepsExceededError"]

__version__ = "0.2.5"  # the torchdiffeq release whose behaviour this module reproduces


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq.odeint: y at every time in t; gradients by autograd through the solver
    (odegrad's gradient="direct")."""
    problem = _Problem(func, y0, t, rtol, atol, method, options, event_fn)
    return problem.unflatten(problem.solve("direct", {}))


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint,
                 **kwargs):
    """torchdiffeq.odeint_event: not served (odegrad's loop has no event detection)."""
    raise InvalidInputError(_EVENT_MESSAGE.format(name="odeint_event"))


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """torchdiffeq.odeint_dense: not served (odegrad's API returns no dense solution)."""
    raise InvalidInputError(
        "odeint_dense is not supported by odegrad: its API returns the solution at the times t, "
        "not a dense interpolant over [t0, t1]; pass the times you need in t"
    )
