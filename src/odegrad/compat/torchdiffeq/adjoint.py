"""odeint_adjoint: torchdiffeq's continuous adjoint as odegrad's gradient="backsolve", and the
translation of its adjoint keywords and adjoint_options into backsolve's options."""

from __future__ import annotations

import torch

from ...errors import InvalidInputError
from . import scipy_solver
from .methods import adams_method, resolve
from .options import (
    _boundaries,
    _check_callbacks,
    _check_controller,
    _max_num_steps,
    _positive,
    _sort_options,
    _tolerance,
)
from .problem import _Problem
from .state import _mixed_norm, _unflatten


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
    adjoint_name = "dopri5" if adjoint_method is None else adjoint_method
    if problem.family == "scipy" or resolve(adjoint_name, "adjoint_method")[1] == "scipy":
        if event_fn is not None:
            raise InvalidInputError(
                "event_fn with adjoint_method 'scipy_solver': the shim's scipy adjoint solves "
                "interval by interval between given times, not to an event"
            )
        # scipy's solve_ivp forward or backward: torchdiffeq's adjoint, interval by interval
        return problem.unflatten(_scipy_adjoint(
            problem, params, rtol if adjoint_rtol is None else adjoint_rtol,
            atol if adjoint_atol is None else adjoint_atol, adjoint_name, dict(adjoint_options)))
    adjoint = adjoint_settings(
        problem,
        rtol if adjoint_rtol is None else adjoint_rtol,
        atol if adjoint_atol is None else adjoint_atol,
        adjoint_method, dict(adjoint_options),
    )
    raw = problem.solve("backsolve", dict(adjoint, params=params))
    if problem.adjoint_callbacks is not None:
        raw = problem.adjoint_callbacks.record(problem, raw)
    out = problem.finish(raw)
    if event_fn is None or len(problem.t) == 1:
        return out
    event_t, ys = out
    return _EventTimeWithoutGradient.apply(event_t, *(ys if problem.shapes else (ys,))), ys


class _EventTimeWithoutGradient(torch.autograd.Function):
    """torchdiffeq's odeint_adjoint returns the event time as an output of its autograd
    Function, part of the graph but never differentiated ("Does NOT backpropagate through the
    event time"): event_t.backward() runs and gives no gradient. The same here: the event time
    hangs on the solution with a zero cotangent."""

    @staticmethod
    def forward(ctx, event_t, *ys):
        ctx.shapes = [(y.shape, y.dtype, y.device) for y in ys]
        return event_t.detach().clone()

    @staticmethod
    def backward(ctx, grad_t):
        return (None, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.shapes))


def _scipy_adjoint(problem, params, rtol, atol, name, options):
    """odeint_adjoint where the forward or the backward solve is scipy_solver: torchdiffeq's
    OdeintAdjointMethod (scipy_solver.Adjoint), the other solve by the shim's own solver."""
    cls, family, _, _ = resolve(name, "adjoint_method")
    names = _check_callbacks(problem.user_func, name, family, "_adjoint")
    n_aug = 1 + 2 * problem.y0.numel() + sum(p.numel() for p in params)
    if family == "scipy":
        scipy_solver.check_options(options, "adjoint_options")
        kwargs = scipy_solver.settings(_sort_options(cls, family, options, "adjoint_options"),
                                       "adjoint_options")
        scipy_solver.tolerance(rtol, n_aug, "adjoint_rtol")
        scipy_solver.tolerance(atol, n_aug, "adjoint_atol")
        interval = scipy_solver.scipy_interval(rtol, atol, kwargs)
    else:
        interval = _shim_interval(problem, params, rtol, atol, name, options, names)
    if problem.family == "scipy":
        def forward():
            if len(problem.t) == 1:
                return problem.y0.detach().unsqueeze(0).clone()
            return scipy_solver.integrate(problem.func, problem.y0, problem.t, problem.rtol,
                                          problem.atol, problem.scipy)
    else:
        def forward():
            return problem.solve("direct", {})
    run = scipy_solver.Adjoint(problem.func, forward, interval)
    return run.apply(problem.t, problem.y0, params)


def _shim_interval(problem, params, rtol, atol, name, options, callbacks=()):
    """The augmented backward solve over one interval by the shim's odeint (adjoint_method
    not scipy_solver, the forward scipy_solver), with torchdiffeq's adjoint norm: the max of
    |time adjoint|, the state norm of y and of its adjoint, and (unless "seminorm") the RMS of
    each parameter's adjoint. `callbacks`: the names of func's callback_*_adjoint methods that
    the backward solve calls, with torchdiffeq's augmented state (the shim's forward step
    callbacks on the augmented field, as torchdiffeq's backward odeint calls them)."""
    norm = options.pop("norm", None)
    if callable(norm) or not (norm is None or norm == "seminorm"):
        raise InvalidInputError(
            f"adjoint_options['norm']={norm!r}: the shim's adjoint takes norm='seminorm' or no "
            "norm (torchdiffeq's default), not a function of the augmented state"
        )
    shapes = problem.shapes

    def state_norm(x):
        if shapes is None:
            return x.abs().pow(2).mean().sqrt()
        return _mixed_norm(_unflatten(x, shapes))

    def adjoint_norm(parts):
        values = [parts[0].abs(), state_norm(parts[1]), state_norm(parts[2])]
        if norm is None:
            values += [p.abs().pow(2).mean().sqrt() for p in parts[3:]]
        return max(values)

    options["norm"] = adjoint_norm
    aug0 = (problem.y0.new_zeros(()), problem.y0, problem.y0, *params)
    _Problem(lambda s, a: a, tuple(x.detach() for x in aug0), problem.t.detach()[:2], rtol, atol,
             name, options, None)  # the adjoint options checked now, not in backward

    def interval(g, parts, ts):
        if callbacks:
            g = _WithCallbacks(g, problem.user_func, callbacks)
        sub = _Problem(g, parts, ts, rtol, atol, name, options, None)
        return tuple(y[1] for y in sub.unflatten(sub.solve("direct", {})))

    return interval


def adjoint_settings(problem, rtol, atol, method, options) -> dict:
    """odegrad's backsolve options for torchdiffeq's adjoint keywords and options."""
    name = "dopri5" if method is None else method
    cls, family, og_method, fixed_mode = resolve(name, "adjoint_method")
    norm = options.pop("norm", None)
    options = _sort_options(cls, family, options, "adjoint_options")
    names = _check_callbacks(problem.user_func, name, family, "_adjoint")
    problem.adjoint_callbacks = AdjointCallbacks(problem, names) if names else None
    settings = {"adjoint_rtol": _tolerance(rtol, problem.shapes, "adjoint_rtol"),
                "adjoint_atol": _tolerance(atol, problem.shapes, "adjoint_atol")}
    if fixed_mode and (og_method != problem.og_method or not problem.fixed_mode):
        raise InvalidInputError(
            f"adjoint_method={name!r} with method={problem.name!r}: odegrad's backward solve "
            f"cannot run {og_method!r} with fixed steps unless the forward does"
        )
    if family == "adams":  # the backward solve runs the forward's solver (its max_order, ...)
        og_method, adams_options = adams_method(name, options, "adjoint_options")
        forward = {k: v for k, v in problem.method_options.items() if k != "perturb"}
        if (og_method, adams_options) != (problem.og_method, forward):
            raise InvalidInputError(
                f"adjoint_method={name!r} with adjoint_options {options}: odegrad's backward "
                f"solve runs an Adams method only as the forward's {problem.name!r} with the "
                "same max_order, max_iters and implicit"
            )
    if og_method != problem.og_method or fixed_mode != problem.fixed_mode:
        settings["adjoint_method"] = og_method
    if problem.adjoint_callbacks is not None:
        settings.update(problem.adjoint_callbacks.options())
    if family == "adaptive":
        settings.update(_adaptive_adjoint(problem, options, norm))
    else:
        settings.update(_fixed_adjoint(problem, options, name))
    return settings


def _adaptive_adjoint(problem, options, norm) -> dict:
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
    _check_controller(options, problem.y0, "adjoint_options", backward=True)
    first_step = options.get("first_step")
    if first_step is not None:
        settings["adjoint_step_size"] = _positive(first_step, "adjoint_options['first_step']")
    steps = _max_num_steps(options.get("max_num_steps"), "adjoint_options")
    if steps != problem.max_num_steps:
        raise InvalidInputError(
            f"adjoint_options['max_num_steps']={steps} differs from the forward solve's "
            f"{problem.max_num_steps}: odegrad's backward solve takes the forward's step limit"
        )
    boundaries = _boundaries(options, problem.t)
    extra = sorted(set(boundaries) - set(problem.boundaries))
    if extra or any(boundaries[v] != problem.boundaries[v] for v in boundaries):
        raise InvalidInputError(
            "adjoint_options step_t/jump_t other than options': odegrad's backward solve "
            "restarts where the forward solve does (at options' step_t and jump_t), so it "
            f"cannot also stop at {extra or sorted(boundaries)}"
        )
    return settings


def _fixed_adjoint(problem, options, name) -> dict:
    settings = {}
    interp = options.get("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"Unknown interpolation method {interp}")
    perturb = bool(options.get("perturb", False))
    if perturb != problem.perturb:
        raise InvalidInputError(
            f"adjoint_options['perturb']={perturb} with options' perturb={problem.perturb}: "
            "odegrad's backward solve perturbs f's time exactly where the forward solve does"
        )
    step_size = options.get("step_size")
    grid_constructor = options.get("grid_constructor")
    if step_size is not None and grid_constructor is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
    problem.adjoint_grid = grid_constructor  # checked against the forward grid in solve
    problem.adjoint_step = None
    if grid_constructor is not None and problem.adaptive:
        raise InvalidInputError(
            f"adjoint_options['grid_constructor'] with the adaptive method={problem.name!r}: "
            "odegrad's backward solve steps either by adjoint_options' step_size or on the "
            "forward solve's grid, not on a grid of its own"
        )
    if step_size is not None:
        problem.adjoint_step = _positive(step_size, "adjoint_options['step_size']")
        settings["adjoint_step_size"] = problem.adjoint_step
    # Without either: one backward step per interval between the forward solve's stops
    # (set per solve, where those are known).
    return settings


class _WithCallbacks:
    """The augmented field of a backward solve carrying func's callback_*_adjoint methods under
    the forward names, as torchdiffeq's augmented_dynamics does."""

    def __init__(self, g, func, names):
        self.g = g
        for callback in names:
            setattr(self, callback, getattr(func, callback + "_adjoint"))

    def __call__(self, t, y):
        return self.g(t, y)


class AdjointCallbacks:
    """func's callback_step_adjoint / callback_accept_step_adjoint /
    callback_reject_step_adjoint, called from odegrad's backward solve (backsolve's
    adjoint_on_attempt / adjoint_on_accept / adjoint_on_reject) with torchdiffeq's arguments:

    - t0: the step's start in the time of torchdiffeq's backward odeint: the user's time for
      increasing t, its negative for decreasing t (torchdiffeq integrates those in negated time
      and its backward odeint negates once more);
    - y0: torchdiffeq's augmented state (vjp_t, y, adj_y, *adj_params) at the step's start, y
      and adj_y flat as in torchdiffeq (adj_y = ∂L/∂y, adj_params the parameter gradients
      gathered so far); accept gets the start state of the accepted attempt, as torchdiffeq;
    - dt: the positive step size.

    torchdiffeq integrates the time adjoint vjp_t alongside; odegrad does not (its time
    gradient is a closed form), so vjp_t is its exact value along the solution: since
    d(a^T f)/dt = a^T ∂f/∂t on the adjoint's trajectory, vjp_t(t) = c − a(t)^T f(t, y(t)) in
    torchdiffeq's time, c = 0 when t requires grad and otherwise the sum of g_j^T f(t_j, y_j)
    over the output times t_j from t to the end (g_j the cotangent of y(t_j)). It agrees with
    torchdiffeq's integrated value to the solves' accuracy and costs one evaluation of f per
    callback (and one per output time when t does not require grad).
    """

    def __init__(self, problem, names):
        self.func, self.names, self.field = problem.user_func, names, problem.func
        self.sign = -1.0 if len(problem.t) > 1 and bool(problem.t[0] > problem.t[-1]) else 1.0
        self.t_grad = problem.t.requires_grad
        self.times, self.ys, self.grads, self.terms = None, None, None, None
        self.start = None

    def options(self) -> dict:
        hooks = {"adjoint_on_attempt": self._attempt}
        if "callback_accept_step" in self.names:
            hooks["adjoint_on_accept"] = lambda t, z, h: self.func.callback_accept_step_adjoint(
                *self.start)
        if "callback_reject_step" in self.names:
            hooks["adjoint_on_reject"] = lambda t, z, h: self.func.callback_reject_step_adjoint(
                *self._args(t, z, h))
        return hooks

    def _attempt(self, t, z, h):
        self.start = self._args(t, z, h)
        if "callback_step" in self.names:
            self.func.callback_step_adjoint(*self.start)

    def _args(self, t, z, h):
        y, a, *mu = z
        with torch.no_grad():
            vjp_t = -self.sign * (a * self.field(t, y)).sum()
            if not self.t_grad:
                vjp_t = vjp_t + self._after(float(t))
        return self.sign * t, (vjp_t.to(y.dtype), y, a, *mu), h.abs()

    def _after(self, value):
        """sign · Σ g_j^T f(t_j, y_j) over the output times t_j at or after `value`."""
        if self.grads is None:
            return 0.0
        if self.terms is None:
            self.terms = [float((g * self.field(s, y)).sum())
                          for s, y, g in zip(self.times, self.ys, self.grads)]
        tol = 8 * torch.finfo(self.ys.dtype).eps * max(abs(value), 1.0)
        direction = self.sign  # +1: t increases
        return self.sign * sum(term for s, term in zip(self.times.tolist(), self.terms)
                               if direction * (s - value) >= -tol)

    def record(self, problem, raw):
        """The forward result with the outputs' cotangents recorded (for vjp_t) when the
        backward pass reaches them, before odegrad's backward solve runs."""
        if isinstance(raw, tuple):  # (event_t, ys)
            event_t, ys = raw
            times = torch.stack([problem.t_y[0].detach(), event_t.detach().to(problem.t_y)])
            return event_t, _Record.apply(self, times, ys)
        return _Record.apply(self, problem.t_y.detach(), raw)


class _Record(torch.autograd.Function):
    @staticmethod
    def forward(ctx, callbacks, times, ys):
        ctx.callbacks = callbacks
        callbacks.times, callbacks.ys = times, ys.detach()
        return ys.clone()

    @staticmethod
    def backward(ctx, grad):
        callbacks = ctx.callbacks
        callbacks.grads, callbacks.terms = grad.detach(), None
        return None, None, grad
