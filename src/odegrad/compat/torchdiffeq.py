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
    Fixed-grid methods (euler, midpoint, heun2): step_size, grid_constructor, interp
    ("linear" between grid points as torchdiffeq does, or "cubic" Hermite), perturb.
    odeint_adjoint: odegrad's gradient="backsolve", with torchdiffeq's full adjoint norm by
    default and adjoint_options=dict(norm="seminorm") for the seminorm; adjoint_options step_size
    and first_step set the backward steps; adjoint_options default to options without "norm".
    An option torchdiffeq's chosen solver does not take (step_size for dopri5, first_step for
    euler, ...) is ignored with torchdiffeq's own "Unexpected arguments" warning, and a step
    callback the solver does not support with its "does not support callbacks" warning.

Raised (InvalidInputError or UnknownNameError, each naming the option):
    methods odegrad lacks: rk4 (torchdiffeq's is Kutta's 3/8 rule, odegrad's the classical
    scheme), heun3, fehlberg2, explicit_adams, implicit_adams, fixed_adams, scipy_solver;
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
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from ..api import odeint as _odeint
from ..errors import InvalidInputError, MaxStepsExceededError, UnknownNameError
from ..loop import fixed_step_count
from ..solvers import SOLVERS

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "OPTION_NAMES",
           "KEYWORDS", "ADJOINT_KEYWORDS", "MaxNumStepsExceededError"]

__version__ = "0.2.5"  # the torchdiffeq release whose behaviour this module reproduces

MAX_NUM_STEPS = 2**31 - 1  # torchdiffeq's default max_num_steps

# The keywords of torchdiffeq 0.2.5's odeint and odeint_adjoint (torchdiffeq/_impl/odeint.py,
# adjoint.py), and every options= key one of its solvers takes (solvers.py, rk_common.py,
# fixed_adams.py, scipy_wrapper.py; norm is added by misc._check_inputs).
KEYWORDS = ("rtol", "atol", "method", "options", "event_fn")
ADJOINT_KEYWORDS = KEYWORDS + ("adjoint_rtol", "adjoint_atol", "adjoint_method",
                               "adjoint_options", "adjoint_params")
_FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")
_ADAMS_OPTIONS = _FIXED_OPTIONS + ("implicit", "max_iters", "max_order")
_ADAPTIVE_OPTIONS = ("min_step", "max_step", "first_step", "step_t", "jump_t", "safety",
                     "ifactor", "dfactor", "max_num_steps", "dtype", "norm")
_SCIPY_OPTIONS = ("min_step", "max_step", "solver")
_TAKEN = {"fixed": _FIXED_OPTIONS, "adams": _ADAMS_OPTIONS, "adaptive": _ADAPTIVE_OPTIONS,
          "scipy": _SCIPY_OPTIONS}
# What torchdiffeq's solvers pop from their keywords without a warning.
_DROPPED = {"fixed": ("norm",), "adams": ("norm",), "adaptive": (), "scipy": ("norm",
            "grid_points", "eps")}
OPTION_NAMES = tuple(sorted(set(_ADAMS_OPTIONS + _ADAPTIVE_OPTIONS + _SCIPY_OPTIONS
                                + ("grid_points", "eps"))))

# The defaults of torchdiffeq's step-size controller, which odegrad's controller shares.
_CONTROLLER_DEFAULTS = {"min_step": 0.0, "max_step": math.inf, "safety": 0.9, "ifactor": 10.0,
                        "dfactor": 0.2}

# torchdiffeq 0.2.5's methods: (its solver class, family, odegrad's method for the same scheme).
_METHODS = {
    "dopri8": ("Dopri8Solver", "adaptive", "dopri8"),
    "dopri5": ("Dopri5Solver", "adaptive", "dopri5"),
    "bosh3": ("Bosh3Solver", "adaptive", "bosh3"),
    "fehlberg2": ("Fehlberg2", "adaptive", None),
    "adaptive_heun": ("AdaptiveHeunSolver", "adaptive", "heun"),
    "euler": ("Euler", "fixed", "euler"),
    "midpoint": ("Midpoint", "fixed", "midpoint"),
    "heun2": ("Heun2", "fixed", "heun"),  # Heun's method; odegrad's "heun" with fixed steps
    "heun3": ("Heun3", "fixed", None),
    "rk4": ("RK4", "fixed", None),
    "explicit_adams": ("AdamsBashforth", "adams", None),
    "implicit_adams": ("AdamsBashforthMoulton", "adams", None),
    "fixed_adams": ("AdamsBashforthMoulton", "adams", None),
    "scipy_solver": ("ScipyWrapperODESolver", "scipy", None),
}
# The Butcher tableaus (c, a, b, |b - b_hat|) of torchdiffeq's Runge-Kutta schemes that odegrad
# lacks today: should odegrad gain one of them under any name, the shim serves it.
_TORCHDIFFEQ_TABLEAUS = {
    "rk4": ([0, 1 / 3, 2 / 3, 1], [[1 / 3], [-1 / 3, 1], [1, -1, 1]],
            [1 / 8, 3 / 8, 3 / 8, 1 / 8], None),
    "heun3": ([0, 1 / 3, 2 / 3], [[1 / 3], [0, 2 / 3]], [1 / 4, 0, 3 / 4], None),
    "fehlberg2": ([0, 1 / 2, 1], [[1 / 2], [1 / 256, 255 / 256]], [1 / 512, 255 / 256, 1 / 512],
                  [1 / 512, 0, 1 / 512]),
}
_MISSING = {
    "rk4": "torchdiffeq's 'rk4' is Kutta's 3/8 rule (rk4_alt_step_func: c = 0, 1/3, 2/3, 1; "
           "b = 1/8, 3/8, 3/8, 1/8) and odegrad has only the classical RK4 (c = 0, 1/2, 1/2, 1; "
           "b = 1/6, 1/3, 1/3, 1/6): the two differ at O(h^5) per step, so the shim does not "
           "substitute one for the other; for the classical scheme call "
           "odegrad.odeint(func, y0, t, method='rk4', step_size=...)",
    "heun3": "odegrad has no Heun third-order scheme",
    "fehlberg2": "odegrad has no Fehlberg RK2(1) pair",
    "explicit_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
    "implicit_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
    "fixed_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
    "scipy_solver": "odegrad does not wrap scipy.integrate.solve_ivp",
}
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_VALID_CALLBACKS = {"fixed": {"callback_step"}, "adams": {"callback_step"},
                    "adaptive": set(_CALLBACKS), "scipy": set()}


class MaxNumStepsExceededError(MaxStepsExceededError, AssertionError):
    """torchdiffeq's max_num_steps was exceeded (torchdiffeq raises an AssertionError)."""


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq.odeint: y at every time in t; gradients by autograd through the solver
    (odegrad's gradient="direct")."""
    problem = _Problem(func, y0, t, rtol, atol, method, options, event_fn)
    return problem.unflatten(problem.solve("direct", {}))


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None,
                   event_fn=None, adjoint_rtol=None, adjoint_atol=None, adjoint_method=None,
                   adjoint_options=None, adjoint_params=None):
    """torchdiffeq.odeint_adjoint: the continuous adjoint, served by odegrad's
    gradient="backsolve" with torchdiffeq's defaults (full adjoint norm unless
    adjoint_options=dict(norm="seminorm"); adjoint tolerances, method and options default to
    the forward's, options without "norm")."""
    if adjoint_params is None and not isinstance(func, torch.nn.Module):
        raise ValueError(
            "func must be an instance of nn.Module to specify the adjoint parameters; "
            "alternatively they can be specified explicitly via the `adjoint_params` argument. "
            "If there are no parameters then it is allowable to set `adjoint_params=()`."
        )
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "If `adjoint_method != method` then we cannot infer `adjoint_options` from "
            "`options`. So as `options` has been passed then `adjoint_options` must be passed "
            "as well."
        )
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    elif not isinstance(adjoint_options, dict):
        raise InvalidInputError(
            f"adjoint_options must be a dict, got {type(adjoint_options).__name__}"
        )
    problem = _Problem(func, y0, t, rtol, atol, method, options, event_fn)
    params = tuple(func.parameters()) if adjoint_params is None else tuple(adjoint_params)
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise InvalidInputError(
                f"adjoint_params[{k}] is a {type(p).__name__}, not a tensor"
            )
    params = tuple(p for p in params if p.requires_grad)
    if isinstance(func, torch.nn.Module):
        # torchdiffeq differentiates adjoint_params only: the module's other parameters are
        # held constant while odegrad evaluates f (its backsolve would refuse them otherwise).
        chosen = {id(p) for p in params}
        problem.func.frozen = tuple(p for p in func.parameters()
                                    if p.requires_grad and id(p) not in chosen)
    adjoint = problem.adjoint_settings(
        rtol if adjoint_rtol is None else adjoint_rtol,
        atol if adjoint_atol is None else adjoint_atol,
        adjoint_method, dict(adjoint_options),
    )
    return problem.unflatten(problem.solve("backsolve", dict(adjoint, params=params)))


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


_EVENT_MESSAGE = (
    "{name} is not supported by odegrad: its solver loop has no event detection (a root of "
    "event_fn(t, y) found on the dense output, stopping the solve)"
)


# ---- the problem as torchdiffeq states it -----------------------------------------------------


class _Problem:
    """Validated inputs of one call, in the form odegrad's API takes, and the solve."""

    def __init__(self, func, y0, t, rtol, atol, method, options, event_fn):
        if event_fn is not None:
            raise InvalidInputError(_EVENT_MESSAGE.format(name="event_fn"))
        if options is not None and not isinstance(options, dict):
            raise InvalidInputError(f"options must be a dict, got {type(options).__name__}")
        self.user_func = func
        self.y0, self.shapes = _flatten_state(y0)
        self.func = _Flat(func, self.shapes)
        self.t = _check_t(t, self.y0)
        self.t_y = self.t if self.t.dtype == self.y0.dtype else self.t.to(self.y0.dtype)
        self.name = "dopri5" if method is None else method
        self.cls, self.family, self.og_method, self.fixed_mode = _resolve(self.name, "method")
        self.options_norm = (options or {}).get("norm")
        self.options = _sort_options(self.cls, self.family, dict(options or {}), "options")
        self.rtol = _tolerance(rtol, self.shapes, "rtol")
        self.atol = _tolerance(atol, self.shapes, "atol")
        _check_callbacks(func, self.name, self.family, "")
        self.adaptive = self.family == "adaptive"
        self.adjoint_step, self.adjoint_grid = None, None
        self.boundaries, self.perturb = {}, False
        if self.adaptive:
            self._read_adaptive_options()
        else:
            self._read_fixed_options()

    # -- options ---------------------------------------------------------------------------

    def _read_adaptive_options(self):
        options = self.options
        _check_controller(options, self.y0, "options")
        norm = options.get("norm")
        if norm is not None and not callable(norm):
            raise InvalidInputError(
                f"options['norm'] must be a callable (torchdiffeq calls it on the scaled error), "
                f"got {norm!r}; a 'seminorm' belongs in odeint_adjoint's adjoint_options"
            )
        if self.shapes is not None:
            norm = _TupleNorm(norm or _mixed_norm, self.shapes)
        self.norm = norm
        self.first_step = options.get("first_step")
        if self.first_step is not None:
            self.first_step = _positive(self.first_step, "options['first_step']")
        self.max_num_steps = _max_num_steps(options.get("max_num_steps"), "options")
        self.boundaries = _boundaries(options, self.t)

    def _read_fixed_options(self):
        options = self.options
        # torchdiffeq's fixed-grid solvers have no error control and drop the norm; its
        # adjoint still measures y and the adjoint with it (an adaptive adjoint method).
        norm = self.options_norm if callable(self.options_norm) else None
        self.norm = _TupleNorm(norm or _mixed_norm, self.shapes) if self.shapes else norm
        self.max_num_steps = MAX_NUM_STEPS  # and have no step limit
        self.step_size = options.get("step_size")
        self.grid_constructor = options.get("grid_constructor")
        if self.step_size is not None and self.grid_constructor is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        if self.step_size is not None:
            self.step_size = _positive(self.step_size, "options['step_size']")
        if self.grid_constructor is not None and not callable(self.grid_constructor):
            raise InvalidInputError("options['grid_constructor'] must be a callable")
        self.interp = options.get("interp", "linear")
        if self.interp not in ("linear", "cubic") and len(self.t) > 1:
            raise ValueError(f"Unknown interpolation method {self.interp}")
        self.perturb = bool(options.get("perturb", False))

    def adjoint_settings(self, rtol, atol, method, options) -> dict:
        """odegrad's backsolve options for torchdiffeq's adjoint keywords and options."""
        name = "dopri5" if method is None else method
        cls, family, og_method, fixed_mode = _resolve(name, "adjoint_method")
        norm = options.pop("norm", None)
        options = _sort_options(cls, family, options, "adjoint_options")
        _check_callbacks(self.user_func, name, family, "_adjoint")
        settings = {"adjoint_rtol": _tolerance(rtol, self.shapes, "adjoint_rtol"),
                    "adjoint_atol": _tolerance(atol, self.shapes, "adjoint_atol")}
        if fixed_mode and (og_method != self.og_method or not self.fixed_mode):
            raise InvalidInputError(
                f"adjoint_method={name!r} with method={self.name!r}: odegrad's backward solve "
                f"cannot run {og_method!r} with fixed steps unless the forward does"
            )
        if og_method != self.og_method or fixed_mode != self.fixed_mode:
            settings["adjoint_method"] = og_method
        if family == "adaptive":
            settings.update(self._adaptive_adjoint(options, norm))
        else:
            settings.update(self._fixed_adjoint(options, name))
        return settings

    def _adaptive_adjoint(self, options, norm) -> dict:
        if norm is None:
            settings = {"adjoint_norm": "full"}  # torchdiffeq's default adjoint norm
        elif isinstance(norm, str) and norm == "seminorm":
            settings = {"adjoint_norm": "seminorm"}
        elif callable(norm):
            raise InvalidInputError(
                "adjoint_options['norm'] is a callable: odegrad's backward solve takes "
                "adjoint_options=dict(norm='seminorm') or no norm (torchdiffeq's default, the "
                "max over y, the adjoint and each parameter's adjoint of their norms), not a "
                "function of the augmented state"
            )
        else:
            raise InvalidInputError(
                f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}"
            )
        _check_controller(options, self.y0, "adjoint_options")
        first_step = options.get("first_step")
        if first_step is not None:
            settings["adjoint_step_size"] = _positive(first_step, "adjoint_options['first_step']")
        steps = _max_num_steps(options.get("max_num_steps"), "adjoint_options")
        if steps != self.max_num_steps:
            raise InvalidInputError(
                f"adjoint_options['max_num_steps']={steps} differs from the forward solve's "
                f"{self.max_num_steps}: odegrad's backward solve takes the forward's step limit"
            )
        boundaries = _boundaries(options, self.t)
        extra = sorted(set(boundaries) - set(self.boundaries))
        if extra or any(boundaries[v] != self.boundaries[v] for v in boundaries):
            raise InvalidInputError(
                "adjoint_options step_t/jump_t other than options': odegrad's backward solve "
                "restarts where the forward solve does (at options' step_t and jump_t), so it "
                f"cannot also stop at {extra or sorted(boundaries)}"
            )
        return settings

    def _fixed_adjoint(self, options, name) -> dict:
        settings = {}
        interp = options.get("interp", "linear")
        if interp not in ("linear", "cubic"):
            raise ValueError(f"Unknown interpolation method {interp}")
        perturb = bool(options.get("perturb", False))
        if perturb != self.perturb:
            raise InvalidInputError(
                f"adjoint_options['perturb']={perturb} with options' perturb={self.perturb}: "
                "odegrad's backward solve perturbs f's time exactly where the forward solve does"
            )
        step_size = options.get("step_size")
        grid_constructor = options.get("grid_constructor")
        if step_size is not None and grid_constructor is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        self.adjoint_grid = grid_constructor  # checked against the forward grid in solve
        self.adjoint_step = None
        if grid_constructor is not None and self.adaptive:
            raise InvalidInputError(
                f"adjoint_options['grid_constructor'] with the adaptive method={self.name!r}: "
                "odegrad's backward solve steps either by adjoint_options' step_size or on the "
                "forward solve's grid, not on a grid of its own"
            )
        if step_size is not None:
            self.adjoint_step = _positive(step_size, "adjoint_options['step_size']")
            settings["adjoint_step_size"] = self.adjoint_step
        # Without either: one backward step per interval between the forward solve's stops
        # (set per solve, where those are known).
        return settings

    # -- the solve -------------------------------------------------------------------------

    def solve(self, gradient: str, extra: dict):
        self.gradient, self.extra = gradient, extra
        if len(self.t) == 1:
            return self.y0.unsqueeze(0)
        if self.adaptive:
            return self._solve_adaptive()
        return self._solve_fixed()

    def _call(self, f, y, ts, first=True, one_backward_step=False, **kwargs):
        """One odegrad solve over the times ts (a 1-D tensor), from y. A fixed-step backward
        solve takes adjoint_options' step_size, else one step between consecutive times."""
        options = dict(self.extra)
        if self.gradient == "backsolve" and not self.adaptive_adjoint() and (
                one_backward_step or "adjoint_step_size" not in options):
            options["adjoint_step_size"] = _longest(ts)
        if self.norm is not None:
            options["norm"] = self.norm
        if self.adaptive and first and self.first_step is not None:
            options["first_step"] = self.first_step
        options.update(kwargs)
        try:
            return _odeint(f, y, ts, method=self.og_method, rtol=self.rtol, atol=self.atol,
                           gradient=self.gradient, max_steps=self.max_num_steps, **options)
        except InvalidInputError as error:
            if self.gradient == "backsolve" and "not in params=" in str(error):
                raise InvalidInputError(
                    f"{error}. (odeint_adjoint: torchdiffeq would give tensors outside "
                    "adjoint_params no gradient; odegrad's backsolve refuses them unless they "
                    "are parameters of func, an nn.Module: list them in adjoint_params or "
                    "detach them)"
                ) from error
            raise
        except MaxStepsExceededError as error:
            if self.max_num_steps == MAX_NUM_STEPS:
                raise
            raise MaxNumStepsExceededError(
                f"torchdiffeq's max_num_steps={self.max_num_steps} exceeded within one output "
                f"interval: {error}"
            ) from error

    def adaptive_adjoint(self) -> bool:
        method = self.extra.get("adjoint_method")
        if method is None:
            return self.adaptive
        return SOLVERS[method]().adaptive

    def _solve_adaptive(self):
        cuts = dict(self.boundaries)  # time -> is a jump (f perturbed on either side)
        if self.max_num_steps != MAX_NUM_STEPS:
            # torchdiffeq counts max_num_steps per output interval: solve interval by interval.
            for value in self.t.detach().cpu().tolist()[1:-1]:
                cuts.setdefault(value, False)
        if not cuts:
            return self._call(self.func, self.y0, self.t_y)
        times, outputs = _merge(self.t, self.t_y, cuts)
        values = self._chain(times, [i for i, (v, _) in enumerate(times) if v in cuts],
                             {i for i, (v, _) in enumerate(times) if cuts.get(v)})
        return torch.stack([values[i] for i in outputs])

    def _chain(self, times, cut_indices, perturbed, **kwargs):
        """Solve from one cut to the next; f's time is nudged one ulp into the interval at a
        perturbed end. Returns y at every time."""
        stops = [0] + [i for i in cut_indices if 0 < i < len(times) - 1] + [len(times) - 1]
        values, y = [self.y0], self.y0
        for k, (a, b) in enumerate(zip(stops[:-1], stops[1:])):
            ts = torch.stack([tensor for _, tensor in times[a:b + 1]])
            f = self.func
            if a in perturbed or b in perturbed:
                f = _Nudged(self.func, ts[0], ts[-1], a in perturbed, b in perturbed)
            ys = self._call(f, y, ts, first=k == 0, **kwargs)
            values.extend(ys[1:].unbind(0))
            y = values[-1]
        return values

    def _solve_fixed(self):
        grid = self._grid()
        times = grid.detach().cpu().tolist()
        t_values = self.t.detach().cpu().tolist()
        on_grid = set(t_values) <= set(times)
        steps_on_grid = self.adjoint_grid_matches(grid, times)
        native = (self.grid_constructor is None and not self.perturb and on_grid
                  and not steps_on_grid)
        fixed_kwargs = {"adaptive": False} if self.fixed_mode else {}
        if native and self.step_size is None and not self.fixed_mode:
            return self._call(self.func, self.y0, self.t_y)
        if native and self.step_size is not None and (
                fixed_step_count(self.t_y, self.step_size) == len(times) - 1):
            return self._call(self.func, self.y0, self.t_y, step_size=self.step_size,
                              **fixed_kwargs)
        # Through the grid itself: one step per grid interval, outputs interpolated.
        grid_y = grid.to(self.y0.dtype)
        keep = _strict(grid_y.detach().cpu().tolist())
        grid, grid_y, times = grid[keep], grid_y[keep], [times[i] for i in keep]
        # With the forward's step size (or none), the backward solve steps on the forward grid
        # reversed: one step per grid interval.
        kwargs = {"one_backward_step": self.adjoint_step in (None, self.step_size)}
        if not self.perturb and not self.fixed_mode:
            values = list(self._call(self.func, self.y0, grid_y, **kwargs).unbind(0))
        else:
            points = list(zip(times, grid_y.unbind(0)))
            index = list(range(len(points)))
            if self.fixed_mode:
                kwargs.update(adaptive=False, step_size=_longest(grid_y))
            values = self._chain(points, index, set(index) if self.perturb else set(),
                                 **kwargs)
        return self._interpolate(grid, times, values, t_values)

    def _grid(self) -> torch.Tensor:
        """The time grid of torchdiffeq's FixedGridODESolver, in t's dtype (differentiable)."""
        t = self.t
        if self.grid_constructor is not None:
            grid = self.grid_constructor(self.func, self.y0, t)
            if not isinstance(grid, torch.Tensor) or grid.dim() != 1:
                raise InvalidInputError("options['grid_constructor'] must return a 1-D tensor")
            grid = grid.to(device=t.device)
            if not (bool(grid[0] == t[0]) and bool(grid[-1] == t[-1])):
                raise InvalidInputError(
                    "options['grid_constructor'] returned a grid from "
                    f"{float(grid[0].detach())} to {float(grid[-1].detach())}; it must start at "
                    f"t[0]={float(t[0].detach())} "
                    f"and end at t[-1]={float(t[-1].detach())}"
                )
            return grid
        if self.step_size is None:
            return t
        sign = -1.0 if len(t) > 1 and bool(t[0] > t[1]) else 1.0
        ascending = t * sign if sign < 0 else t
        start, end = ascending[0], ascending[-1]
        count = int(torch.ceil((end - start) / self.step_size + 1).item())
        grid = torch.arange(0, count, dtype=t.dtype, device=t.device) * self.step_size + start
        grid = torch.cat([grid[:-1], ascending[-1:]])
        return grid * sign if sign < 0 else grid

    def adjoint_grid_matches(self, grid, times) -> bool:
        """Whether an adjoint grid_constructor asks the backward solve to step on the forward
        grid reversed (then it must run on that grid); raise if it asks for another grid."""
        constructor = self.adjoint_grid
        if self.gradient != "backsolve" or constructor is None:
            return False
        t = self.t.detach()
        for i in range(len(t) - 1, 0, -1):
            backward = constructor(self.func, self.y0, t[i - 1:i + 1].flip(0))
            lo, hi = sorted((float(t[i - 1]), float(t[i])))
            forward = [v for v in times if lo <= v <= hi][::-1 if t[i] > t[i - 1] else 1]
            scale = 16 * torch.finfo(t.dtype).eps * max(abs(lo), abs(hi), 1e-30)
            if not (isinstance(backward, torch.Tensor) and len(backward) == len(forward)
                    and all(abs(a - b) <= scale
                            for a, b in zip(backward.detach().cpu().tolist(), forward))):
                raise InvalidInputError(
                    "adjoint_options['grid_constructor'] gives the backward solve another grid "
                    f"than the forward grid reversed on [{lo}, {hi}]: odegrad's backward solve "
                    "steps on the forward grid"
                )
        return True

    def _interpolate(self, grid, times, values, t_values):
        """torchdiffeq's outputs between grid points: linear, or cubic Hermite."""
        direction = 1.0 if times[-1] > times[0] else -1.0
        outputs, k = [self.y0], 0
        for j in range(1, len(t_values)):
            while k < len(times) - 2 and direction * (times[k + 1] - t_values[j]) < 0:
                k += 1
            t0, t1, y0, y1 = grid[k], grid[k + 1], values[k], values[k + 1]
            if self.interp == "linear":
                if t_values[j] == times[k]:
                    outputs.append(y0)
                elif t_values[j] == times[k + 1]:
                    outputs.append(y1)
                else:
                    outputs.append(y0 + (self.t[j] - t0) / (t1 - t0) * (y1 - y0))
            else:
                start = t0.to(self.y0.dtype)
                if self.perturb:  # f0 of the step, taken one ulp inside it
                    nudged = torch.nextafter(start.detach(), t1.to(start.dtype).detach())
                    start = start + (nudged - start).detach()
                f0 = self.func(start, y0)
                f1 = self.func(t1.to(self.y0.dtype), y1)
                s = (self.t[j] - t0) / (t1 - t0)
                h = t1 - t0
                outputs.append((1 + 2 * s) * (1 - s) * (1 - s) * y0 + s * (1 - s) * (1 - s) * h * f0
                               + s * s * (3 - 2 * s) * y1 + s * s * (s - 1) * h * f1)
        return torch.stack(outputs)

    def unflatten(self, ys):
        if self.shapes is None:
            return ys
        return _unflatten(ys, self.shapes, (ys.shape[0],))


# ---- helpers -----------------------------------------------------------------------------------


def _resolve(name, keyword):
    """(torchdiffeq solver class, family, odegrad method, run with fixed steps) of a method."""
    if not isinstance(name, str) or name not in _METHODS:
        raise UnknownNameError(
            f"{keyword}={name!r}: invalid method for torchdiffeq 0.2.5; must be one of "
            f"{', '.join(_METHODS)} (odegrad's other schemes: odegrad.odeint)"
        )
    cls, family, og_method = _METHODS[name]
    if og_method is None:
        og_method = _added_scheme(name)
    if og_method is None or og_method not in SOLVERS:
        raise UnknownNameError(
            f"{keyword}={name!r} (torchdiffeq) is not available in odegrad: {_MISSING[name]}"
        )
    fixed_mode = family == "fixed" and SOLVERS[og_method]().adaptive
    return cls, family, og_method, fixed_mode


def _added_scheme(name):
    """odegrad's method for the same Runge-Kutta scheme as torchdiffeq's `name` (found by its
    coefficients), if odegrad has gained one. The Adams and scipy families would also need
    their options (implicit, max_iters, max_order, solver) served here, so are not looked up."""
    if name not in _TORCHDIFFEQ_TABLEAUS:
        return None
    from .. import tableaus

    c, a_rows, b, error = _TORCHDIFFEQ_TABLEAUS[name]
    a = np.zeros((len(c), len(c)))
    for i, row in enumerate(a_rows, start=1):
        a[i, :len(row)] = row
    for candidate, tableau in tableaus.TABLEAUS.items():
        if (tableau.stages == len(c) and np.allclose(tableau.c, c) and np.allclose(tableau.a, a)
                and np.allclose(tableau.b, b)
                and (error is None or (tableau.error is not None
                                       and np.allclose(np.abs(tableau.error), error)))):
            return candidate
    return None


def _sort_options(cls, family, options, where):
    """The options torchdiffeq's solver takes; the others warn as torchdiffeq does, or raise."""
    taken, unexpected = {}, {}
    for key, value in options.items():
        if key in ("rtol", "atol", "func", "y0"):
            raise InvalidInputError(
                f"{where}[{key!r}]: torchdiffeq passes {key} to the solver itself; give it as "
                "odeint's keyword, not as an option"
            )
        if key in _TAKEN[family]:
            taken[key] = value
        elif key in _DROPPED[family]:
            continue  # torchdiffeq's solver drops it too: it has no use for it
        elif key in OPTION_NAMES:
            unexpected[key] = value
        else:
            raise InvalidInputError(
                f"{where}[{key!r}] is not a torchdiffeq 0.2.5 option (torchdiffeq would ignore "
                f"it with a warning); its options: {', '.join(OPTION_NAMES)}"
            )
    if unexpected:
        warnings.warn(f"{cls}: Unexpected arguments {unexpected}", stacklevel=4)
    return taken


def _check_controller(options, y0, where):
    for key, default in _CONTROLLER_DEFAULTS.items():
        if key in options and _number(options[key]) != default:
            raise InvalidInputError(
                f"{where}[{key!r}]={options[key]!r} is not supported: odegrad's step-size "
                f"controller has no {key} setting; only torchdiffeq's default {key}={default} "
                "(which odegrad's controller also uses) is accepted"
            )
    if "dtype" in options:
        dtype = options["dtype"]
        real = y0.abs().dtype if y0.is_complex() else y0.dtype
        if not isinstance(dtype, torch.dtype) or torch.promote_types(dtype, real) != torch.float64:
            raise InvalidInputError(
                f"{where}['dtype']={dtype!r} asks for time arithmetic in "
                f"{torch.promote_types(dtype, real) if isinstance(dtype, torch.dtype) else dtype}:"
                " odegrad keeps step times in float64 (torchdiffeq's default dtype)"
            )


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _max_num_steps(value, where) -> int:
    if value is None:
        return MAX_NUM_STEPS
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}['max_num_steps'] must be an int, got {value!r}") from None
    if steps < 1:
        raise InvalidInputError(f"{where}['max_num_steps'] must be at least 1, got {value!r}")
    return min(steps, MAX_NUM_STEPS)


def _boundaries(options, t) -> dict:
    """{time: is a jump} of step_t and jump_t strictly inside the integration interval, as
    values of t's dtype."""
    found, kept = {}, []
    lo, hi = float(t[0].detach()), float(t[-1].detach())
    direction = 1.0 if hi >= lo else -1.0
    for key, jump in (("step_t", False), ("jump_t", True)):
        values = options.get(key)
        if values is None:
            continue
        values = torch.as_tensor(values).detach().reshape(-1).to("cpu", t.dtype).tolist()
        # torchdiffeq keeps the values at or after t[0] in the direction of integration.
        values = [v for v in values if direction * (v - lo) >= 0]
        kept.extend(values)
        for v in values:
            if direction * (v - lo) > 0 and direction * (hi - v) > 0:
                found[v] = jump
    if len(set(kept)) != len(kept):
        raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")
    return found


def _merge(t, t_y, cuts):
    """The output times and the cut times in order, as (value, tensor) pairs, and where each
    output time lies among them."""
    values = t.detach().cpu().tolist()
    direction = 1.0 if values[-1] > values[0] else -1.0
    merged = {v: t_y[i] for i, v in enumerate(values)}
    for v in cuts:
        merged.setdefault(v, torch.tensor(v, dtype=t_y.dtype, device=t_y.device))
    order = sorted(merged, key=lambda v: direction * v)
    position = {v: i for i, v in enumerate(order)}
    return [(v, merged[v]) for v in order], [position[v] for v in values]


def _strict(values) -> list[int]:
    """Indices of grid points that move on from the one before (zero-length steps removed)."""
    if len(values) < 2:
        return list(range(len(values)))
    direction = 1.0 if values[-1] > values[0] else -1.0
    keep = [0]
    for i in range(1, len(values)):
        if i == len(values) - 1:
            while len(keep) > 1 and direction * (values[i] - values[keep[-1]]) <= 0:
                keep.pop()
            keep.append(i)
        elif direction * (values[i] - values[keep[-1]]) > 0:
            keep.append(i)
    return keep


def _longest(ts) -> float:
    """The longest interval between consecutive times: a step size that takes one step each."""
    ts = ts.detach()
    return float((ts[1:] - ts[:-1]).abs().max()) if len(ts) > 1 else 1.0


def _positive(value, name) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}") from None
    if not number > 0:
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}")
    return number


def _check_t(t, y0):
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(
            f"t must be a torch.Tensor (torchdiffeq asserts it), got {type(t).__name__}"
        )
    if not torch.is_floating_point(t):
        raise TypeError(f"`t` must be a floating point Tensor but is a {t.type()}")
    if t.dim() != 1:
        raise InvalidInputError(f"t must be one dimensional, got shape {tuple(t.shape)}")
    if t.device != y0.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.", stacklevel=4)
        t = t.to(y0.device)
    return t


def _flatten_state(y0):
    if isinstance(y0, torch.Tensor):
        return y0, None
    if not isinstance(y0, tuple):
        raise InvalidInputError(
            f"y0 must be either a torch.Tensor or a tuple (as in torchdiffeq), got "
            f"{type(y0).__name__}"
        )
    if not y0:
        raise InvalidInputError("y0 is an empty tuple")
    for k, part in enumerate(y0):
        if not isinstance(part, torch.Tensor):
            raise InvalidInputError(f"y0[{k}] must be a torch.Tensor, got {type(part).__name__}")
    shapes = [part.shape for part in y0]
    return torch.cat([part.reshape(-1) for part in y0]), shapes


def _unflatten(x, shapes, lead=()):
    parts, start = [], 0
    for shape in shapes:
        size = shape.numel()
        parts.append(x[..., start:start + size].view((*lead, *shape)))
        start += size
    return tuple(parts)


def _tolerance(value, shapes, name):
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise InvalidInputError(f"{name} cannot require gradient")
    if shapes is None or isinstance(value, (numbers.Number, str)) or (
            isinstance(value, torch.Tensor) and value.dim() == 0):
        return value
    try:
        parts = tuple(value)
    except TypeError:
        return value
    if len(parts) != len(shapes):
        raise InvalidInputError(
            f"If using tupled {name} it must have the same length as the tuple y0 "
            f"({len(parts)} for {len(shapes)})"
        )
    return torch.cat([torch.as_tensor(v, dtype=torch.float64).expand(shape.numel())
                      for v, shape in zip(parts, shapes)])


def _check_callbacks(func, method, family, suffix):
    """Step callbacks: those torchdiffeq's solver would call raise (odegrad's loop has no
    hooks); the others are ignored with torchdiffeq's warning."""
    present = {name for name in _CALLBACKS if hasattr(func, name + suffix)}
    callable_here = present & _VALID_CALLBACKS[family]
    if callable_here:
        names = ", ".join(sorted(f"func.{name}{suffix}" for name in callable_here))
        raise InvalidInputError(
            f"{names}: step callbacks are not supported by odegrad (its solver loop has no "
            f"per-step hooks); torchdiffeq's {method!r} would call them"
        )
    invalid = present - _VALID_CALLBACKS[family]
    if invalid:
        warnings.warn(f"Solver '{method}' does not support callbacks {invalid}", stacklevel=4)


def _mixed_norm(parts):
    """torchdiffeq's default norm on a tuple state: the max over the tensors of their RMS."""
    return max(part.abs().pow(2).mean().sqrt() for part in parts)


class _TupleNorm:
    """A norm of the tuple state, applied to odegrad's flat state."""

    def __init__(self, norm, shapes):
        self.norm, self.shapes = norm, shapes

    def __call__(self, x):
        value = self.norm(_unflatten(x, self.shapes))
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class _Flat:
    """func on odegrad's flat state (a tuple state is unflattened for it). A plain callable,
    not an nn.Module, so that odegrad leaves f's buffers alone as torchdiffeq does. `frozen`:
    parameters that do not require grad while func runs (those not in adjoint_params)."""

    def __init__(self, func, shapes):
        self.func, self.shapes, self.frozen = func, shapes, ()

    def __call__(self, t, y):
        if not self.frozen:
            return self._call(t, y)
        for p in self.frozen:
            p.requires_grad_(False)
        try:
            return self._call(t, y)
        finally:
            for p in self.frozen:
                p.requires_grad_(True)

    def _call(self, t, y):
        if self.shapes is None:
            return self.func(t, y)
        out = self.func(t, _unflatten(y, self.shapes))
        return torch.cat([part.reshape(-1) for part in out])


class _Nudged:
    """f with its time moved one ulp into the interval [start, end] at the ends named (what
    torchdiffeq's Perturb.NEXT does after a grid point or a jump, Perturb.PREV before one)."""

    def __init__(self, f, start, end, at_start, at_end):
        self.f = f
        self.points = []
        for point, other, wanted in ((start, end, at_start), (end, start, at_end)):
            if wanted:
                point, other = point.detach(), other.detach()
                tol = 8 * torch.finfo(point.dtype).eps * max(abs(float(point)), 1e-30)
                self.points.append((float(point), tol, torch.nextafter(point, other)))

    def __call__(self, t, y):
        value = float(t.detach())
        for point, tol, nudged in self.points:
            if abs(value - point) <= tol:
                t = t + (nudged - t).detach()
                break
        return self.f(t, y)
