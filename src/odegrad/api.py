"""odeint / solve: validate the inputs, pick the solver and the gradient, return the solution."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .control import CONTROL_OPTIONS, StepControl
from .errors import (
    InvalidInputError,
    NonFiniteError,
    UnknownNameError,
    UnsupportedCombinationError,
)
from .events import EventTime, locate_event, validate_event
from .gradients import gradient_options as gradient_option_names
from .gradients import load_gradient
from .loop import DEFAULT_MAX_STEPS, FixedGrid
from .problem import CountedField, Problem, TupleField, probe_graph, validate_tolerance
from .solvers import SOLVERS, make_solver
from .step_times import STEP_TIME_OPTIONS, read_times, solve_through

__all__ = ["odeint", "solve", "Solution", "METHOD_ALIASES"]

# torchdiffeq's names for schemes that exist here (with odegrad's option defaults: the Adams
# methods up to order 4 here, torchdiffeq's max_order=12 through odegrad.compat.torchdiffeq).
METHOD_ALIASES = {"explicit_adams": "adams_bashforth", "adaptive_heun": "heun",
                  "implicit_adams": "adams_bashforth_moulton",
                  "fixed_adams": "adams_bashforth_moulton", "scipy_solver": None}

LOOP_OPTIONS = ("first_step", "adaptive", "norm", "on_attempt", "on_accept", "on_reject",
                "grid_constructor", *CONTROL_OPTIONS, *STEP_TIME_OPTIONS)


@dataclass
class Solution:
    """The outputs at `ts` and the statistics of the solve.

    `stats` is filled by the forward pass and completed by the backward pass (nfe_backward,
    recomputed steps, ...): read it after `loss.backward()` for the whole picture.
    """

    ts: Tensor
    ys: Tensor | tuple[Tensor, ...]
    stats: dict = field(default_factory=dict)
    # With event_fn: the event time t* and state y(t*) (also ts[-1], ys[-1]), differentiable;
    # None when no event occurred before t[-1].
    event_t: Tensor | None = None
    event_y: Tensor | tuple[Tensor, ...] | None = None


def odeint(
    f: Callable, y0: Tensor | Sequence[Tensor], t: Tensor, **kwargs
) -> Tensor | tuple[Tensor, ...]:
    """Solve y' = f(t, y) and return y at every time in t, shape (len(t), *y0.shape).

    Same keywords as `solve`; y0 may be a tuple of tensors, giving a tuple of outputs. With
    `event_fn=`, returns (event time or None, outputs at [t0, event time]) as torchdiffeq does.
    """
    solution = solve(f, y0, t, **kwargs)
    if kwargs.get("event_fn") is not None:
        return solution.event_t, solution.ys
    return solution.ys


def solve(
    f: Callable,
    y0: Tensor | Sequence[Tensor],
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Tensor | Sequence = 1e-6,
    atol: float | Tensor | Sequence = 1e-8,
    step_size: float | None = None,
    gradient: str = "direct",
    checkpoints: str | int | None = None,
    params: Sequence[Tensor] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    event_fn: Callable | None = None,
    event_direction: int = 0,
    per_sample: bool = False,
    compile: bool = False,
    **options,
) -> Solution:
    """Solve y' = f(t, y), y(t[0]) = y0, and return a `Solution` at the times t.

    Args:
        f: the vector field f(t, y) -> dy/dt, the shape of y (a tuple for a tuple state).
        y0: the initial state: a floating-point tensor of any shape, or a tuple of them.
        t: 1-D tensor of output times, strictly increasing or strictly decreasing.
        method: the scheme; see `odegrad.METHODS`.
        rtol, atol: tolerances of adaptive schemes (scalars or per-component tensors).
        step_size: the step of fixed-step schemes (None: one step per output interval); the
            first step of adaptive ones (None: chosen automatically). `adaptive=False` makes an
            adaptive scheme take fixed steps of `step_size`.
        gradient: how outputs are differentiated: direct | discrete | backsolve |
            interpolated | reversible (those implemented: `odegrad.GRADIENTS`).
        checkpoints: what `gradient="discrete"` keeps: "all", "solution" or an int budget.
        params: tensors to differentiate besides y0 and t; default: f.parameters() when f is
            an nn.Module.
        max_steps: the most steps attempted before MaxStepsExceededError.
        event_fn: g(t, y) -> tensor: stop at the first time in (t[0], t[1]] where a component
            of g crosses zero (t must be [t0, t_end]); the Solution then holds ts = [t0, t*],
            ys = [y0, y(t*)] and event_t, event_y, differentiable w.r.t. y0, t0 and the
            parameters of f through any gradient method (events.py). g's own tensors must not
            require grad.
        event_direction: -1 counts only crossings where g falls through zero, 1 only rising
            ones, 0 (default) both. A component exactly zero at t0 is armed once it leaves 0.
        per_sample: True: y0's leading dimension indexes independent problems, each with
            its own adaptive steps, controller state and (t of shape (batch, n_times)) output
            times; ys is (n_times, batch, ...). f then gets t of shape (batch,) and must treat
            the samples independently. Explicit Runge–Kutta methods, gradient="direct"
            (odegrad.per_sample).
        compile: True: blocks of steps (the scheme's stages with f inlined) and single steps
            with their backward run as torch.compile'd functions, compiled once per (f, scheme,
            shapes, dtype, device) and reused for every step and call (odegrad.compiled).
            Explicit Runge–Kutta with gradient="direct", "discrete" or "backsolve" (its
            backward solve's step with f's VJP inlined: compiled_adjoint), alf and
            reversible_<tableau> with gradient="reversible" (the step and the backward step:
            compiled_reversible); anything else raises UnsupportedCombinationError, a
            torch.compile failure CompilationError.
        **options: method options (coupling=, eta=, ...) and gradient options (n_nodes=,
            adjoint_rtol=, ...); an option nobody takes raises UnknownNameError. Step
            callbacks, each a callable (t, y, h) whose return value is ignored:
            `on_attempt=` before each step attempt (t_n, y_n, h), `on_accept=` after each
            accepted step (t_n, y_{n+1}, h_n), `on_reject=` after each rejected attempt
            (t_n, y_n, the rejected h); t and h are 0-dim tensors (h signed, negative for
            decreasing t), y a detached copy of the solution (a tuple for a tuple state).
            They run during the forward solve only, once per step (stats n_steps,
            n_accepted, n_rejected) for every gradient method, never in a backward pass.
            Adaptive step control (torchdiffeq's names and defaults; they set the forward
            solve, which every gradient method replays; a continuous adjoint's backward solve
            keeps its own controller): `min_step=0` and `max_step=inf` bound |h| of every
            step attempt, and a step with |h| <= min_step is accepted whatever its error;
            `safety=0.9` (in (0, 1]) scales the PI controller's factor, clipped to
            [`dfactor=0.2`, `ifactor=10`] (0 < dfactor < 1 < ifactor). Fixed steps refuse
            them. `step_t=`, `jump_t=`: times (a 1-D tensor or a sequence; constants, those
            outside the interval ignored) where a step must end: a step that would cross one
            is clipped to land on it. At a jump_t, f is evaluated one ulp inside the interval
            on either side (f may be discontinuous in t there): the solve restarts at each
            jump (step_times.py). Fixed steps of step_size restart from each of them. Not
            with event_fn.
            `grid_constructor=` (torchdiffeq's option): a callable (f, y0, t) -> 1-D tensor of
            times, strictly monotonic, from t[0] to t[-1] (equal in t's dtype), of t's dtype
            and device; a fixed-step solve then takes one step per grid interval, and outputs
            inside an interval come from the scheme's dense output. The grid is a constant
            (detached; its points at output times follow t). Fixed steps only (not with an
            adaptive method unless adaptive=False), not with step_size, step_t, jump_t or
            event_fn. Every gradient method replays these steps; a continuous adjoint's
            fixed-step backward solve takes steps of the grid's longest interval unless
            adjoint_step_size= is given. torchdiffeq's `perturb` is the option of the Adams
            methods here; one-step methods refuse it (for a discontinuity in t at a known time,
            give it as jump_t: steps land there and f is read one ulp inside each side).
    """
    if not isinstance(compile, bool):
        raise InvalidInputError(f"compile must be True or False, got {compile!r}")
    if per_sample is not False:
        if compile:
            from .compiled import check as check_compile

            check_compile(gradient=gradient, solver=None, adaptive=False, extra=["per_sample"])
        if per_sample is not True:
            raise InvalidInputError(f"per_sample must be True or False, got {per_sample!r}")
        from .per_sample import solve_per_sample

        return solve_per_sample(
            f, y0, t, method=method, rtol=rtol, atol=atol, step_size=step_size,
            gradient=gradient, checkpoints=checkpoints, params=params, max_steps=max_steps,
            event_fn=event_fn, event_direction=event_direction, **options,
        )
    stats: dict = {"nfe_forward": 0, "nfe_backward": 0}
    method = _resolve_method(method)
    y0_flat, shapes, is_tuple = _validate_y0(y0)
    t = _validate_t(t, y0_flat)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InvalidInputError(f"max_steps must be a positive int, got {max_steps!r}")
    gradient_module = load_gradient(gradient)
    _check_function_transforms(gradient)

    solver_options, gradient_options, loop_options = _split_options(
        method, gradient_module, options
    )
    if checkpoints is not None:
        if "checkpoints" not in getattr(gradient_module, "OPTIONS", ()):
            raise InvalidInputError(
                f"checkpoints= applies to gradient='discrete', not gradient={gradient!r}"
            )
        gradient_options["checkpoints"] = checkpoints
    solver = make_solver(method, **solver_options)

    field_ = TupleField(f, shapes) if is_tuple else f
    counted = CountedField(field_, y0_flat, stats)
    module = f if isinstance(f, torch.nn.Module) else None
    if params is None:
        params = list(module.parameters()) if module is not None else []
    params = _unique_params(params)

    adaptive = loop_options.get("adaptive")
    if adaptive and solver.error_order is None:
        raise InvalidInputError(
            f"method {method!r} has no error estimate, so it cannot take adaptive steps"
        )
    first_step = loop_options.get("first_step")
    if first_step is not None and step_size is None:
        step_size = first_step
    grid_constructor = loop_options.get("grid_constructor")
    if adaptive is False and step_size is None and grid_constructor is None:
        raise InvalidInputError("adaptive=False needs step_size= (or grid_constructor=)")
    if step_size is not None and (not _is_positive_number(step_size)):
        raise InvalidInputError(
            f"step_size must be a positive finite number, got {step_size!r}"
        )

    control = StepControl(**{k: loop_options[k] for k in CONTROL_OPTIONS if k in loop_options})
    is_adaptive = solver.adaptive if adaptive is None else adaptive
    if not is_adaptive and not control.is_default:
        names = ", ".join(k for k in CONTROL_OPTIONS if k in loop_options)
        raise UnsupportedCombinationError(
            f"{names} control adaptive steps, but method={method!r} takes fixed steps here"
            f"{' (adaptive=False)' if adaptive is False else ''}; use an adaptive method (dopri5, "
            "tsit5, bosh3, ...) or drop them"
        )
    step_times = {k: read_times(loop_options[k], k, t) for k in STEP_TIME_OPTIONS
                  if loop_options.get(k) is not None}
    if step_times and event_fn is not None:
        raise UnsupportedCombinationError(
            f"{' and '.join(step_times)} with event_fn: the event search does not stop at them; "
            "solve up to the event first, or drop them"
        )
    grid = None
    if grid_constructor is not None:
        grid = _grid(grid_constructor, f, y0, t, is_adaptive=is_adaptive, method=method,
                     step_size=step_size, step_times=step_times, event_fn=event_fn)
    problem = Problem(
        f=counted, y0=y0_flat, t=t, solver=solver, params=params,
        rtol=_tolerance(rtol, y0_flat, shapes, is_tuple, "rtol"),
        atol=_tolerance(atol, y0_flat, shapes, is_tuple, "atol"),
        step_size=None if step_size is None else float(step_size),
        adaptive=solver.adaptive if adaptive is None else adaptive,
        max_steps=max_steps, stats=stats, module=module,
        **({"norm": loop_options["norm"]} if "norm" in loop_options else {}),
        **{k: v for k, v in loop_options.items() if k.startswith("on_")},
        state_view=TupleField(f, shapes).unflatten if is_tuple else None,
        control=control,
    )
    if grid is not None:
        problem.step_size = grid  # the loop's fixed-step plan reads the grid from it
    if problem.adaptive:
        _check_tolerances_positive(problem.rtol, problem.atol)
    if gradient != "direct" and torch.is_grad_enabled():
        problem.draws_random = probe_field(field_, y0_flat, t, params, gradient, module)
    if compile:
        from . import compiled

        compiled.check(gradient=gradient, solver=solver, adaptive=problem.adaptive,
                       event_fn=event_fn, step_times=bool(step_times),
                       stochastic=problem.stochastic())
        if gradient == "reversible":  # the reversible scheme itself (coupling= wraps here)
            from .compiled_reversible import compiled_reversible

            scheme = gradient_module.solver_for(problem, gradient_options.pop("coupling", None))
            problem.solver = compiled_reversible(scheme, f, field_, counted,
                                                 shapes if is_tuple else None, problem.adaptive)
        else:
            problem.solver = compiled.compiled_solver(solver, f, field_, counted,
                                                      shapes if is_tuple else None)
    check = getattr(gradient_module, "check", None)
    if check is not None:
        check(problem)
    stats["method"] = solver.name
    event_t = event_y = None
    if step_times:
        ys = solve_through(
            problem, lambda piece: gradient_module.solve(piece, **gradient_options),
            step_times.get("step_t", []), step_times.get("jump_t", []),
        )
    elif event_fn is None:
        ys = gradient_module.solve(problem, **gradient_options)
    else:
        t, ys, event_t, event_y = _solve_until_event(
            problem, gradient_module, gradient_options, field_, event_fn, event_direction,
            TupleField(f, shapes).unflatten if is_tuple else None,
        )
    if is_tuple:
        ys = TupleField(f, shapes).unflatten(ys)
        event_y = None if event_y is None else TupleField(f, shapes).unflatten(event_y)
    stats.setdefault("checkpoint_bytes", 0)
    stats.setdefault("nfe_backward", 0)
    return Solution(ts=t, ys=ys, stats=stats, event_t=event_t, event_y=event_y)


def _solve_until_event(problem: Problem, gradient_module, gradient_options: dict, field_,
                       event_fn: Callable, direction: int, unflatten):
    """Locate the first event without a graph, then solve to it with the gradient method and
    attach the implicit-function gradient of the crossing (events.py)."""
    g = event_fn if unflatten is None else (lambda t, y: event_fn(t, unflatten(y)))
    validate_event(event_fn, direction, problem.t, problem.y0, g)
    before = problem.stats["nfe_forward"]
    scheme = getattr(gradient_module, "solver_for", None)  # a gradient that changes the scheme
    search = problem if scheme is None else replace(
        problem, solver=scheme(problem, **gradient_options))
    found = locate_event(search, g, direction)
    problem.stats["nfe_event_search"] = problem.stats["nfe_forward"] - before
    if found is None:
        return problem.t, gradient_module.solve(problem, **gradient_options), None, None
    t_star, component = found
    t = problem.t
    times = torch.stack([t[0], torch.tensor(t_star, dtype=t.dtype, device=t.device)])
    if bool(times[1] == times[0]):  # the event rounds to t0 in t's dtype: y* = y0
        ys = torch.stack([problem.y0, problem.y0])
    else:
        ys = gradient_module.solve(replace(problem, t=times), **gradient_options)
    event_t, event_y = EventTime.apply(field_, g, component, times[1], ys[-1])
    return torch.stack([t[0], event_t]), torch.stack([ys[0], event_y]), event_t, event_y


def _grid(grid_constructor, f, y0, t: Tensor, *, is_adaptive: bool, method: str, step_size,
          step_times: dict, event_fn) -> FixedGrid | None:
    """The grid of `grid_constructor(f, y0, t)`, checked (see solve's docstring)."""
    if not callable(grid_constructor):
        raise InvalidInputError(
            f"grid_constructor must be a callable (f, y0, t) -> 1-D tensor of times, got "
            f"{type(grid_constructor).__name__}"
        )
    if is_adaptive:
        raise UnsupportedCombinationError(
            f"grid_constructor sets fixed steps, but method={method!r} takes adaptive steps; use "
            "a fixed-step method (euler, midpoint, rk4, ...) or adaptive=False"
        )
    if step_size is not None:
        raise InvalidInputError(
            "grid_constructor and step_size (or first_step) are mutually exclusive: the grid "
            "sets every step"
        )
    others = [name for name in step_times] + (["event_fn"] if event_fn is not None else [])
    if others:
        raise UnsupportedCombinationError(
            f"grid_constructor with {' and '.join(others)}: the grid sets every step; put "
            "those times in the grid instead"
        )
    if len(t) < 2:
        return None  # nothing to step
    grid = grid_constructor(f, y0, t)
    if not isinstance(grid, Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise InvalidInputError(
            "grid_constructor must return a 1-D tensor of at least two times, got "
            f"{type(grid).__name__}{tuple(grid.shape) if isinstance(grid, Tensor) else ''}"
        )
    if grid.dtype != t.dtype or grid.device != t.device:
        raise InvalidInputError(
            f"grid_constructor returned a grid of dtype {grid.dtype} on {grid.device}; it must "
            f"have t's dtype {t.dtype} and device {t.device}"
        )
    values = grid.detach().cpu().tolist()
    if not all(math.isfinite(v) for v in values):
        raise InvalidInputError("grid_constructor returned non-finite times")
    t0, t_end = float(t[0].detach()), float(t[-1].detach())
    if values[0] != t0 or values[-1] != t_end:
        raise InvalidInputError(
            f"grid_constructor returned a grid from {values[0]!r} to {values[-1]!r}; it must "
            f"start at t[0]={t0!r} and end at t[-1]={t_end!r}"
        )
    direction = 1.0 if t_end > t0 else -1.0
    for k, (a, b) in enumerate(zip(values[:-1], values[1:])):
        if direction * (b - a) <= 0:
            raise InvalidInputError(
                f"grid_constructor returned a grid that is not strictly "
                f"{'increasing' if direction > 0 else 'decreasing'} like t: grid[{k}]={a!r}, "
                f"grid[{k + 1}]={b!r}"
            )
    return FixedGrid(values)  # the loop checks its step count against max_steps


def _is_positive_number(x) -> bool:
    if isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x)) and float(x) > 0.0
    except (TypeError, ValueError):
        return False


def _unique_params(params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The tensors of `params` that require grad, each once (a tensor given twice would
    otherwise receive its gradient twice from the custom gradient methods)."""
    seen: set[int] = set()
    unique = []
    for p in params:
        if isinstance(p, Tensor) and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


def _check_independent(params: Sequence[Tensor], gradient: str) -> None:
    """Raise if a tensor of `params` is computed from another: a custom gradient method returns
    ∂L/∂p for each p by differentiating f's graph, which then reaches the leaf p through the
    derived one as well, and autograd adds the derived one's gradient back on top: the shared
    path would be counted twice. One walk of each non-leaf param's graph (small: the graph of
    the parameters, not of f)."""
    leaves = {id(p): k for k, p in enumerate(params) if p.grad_fn is None}
    nodes = {p.grad_fn: k for k, p in enumerate(params) if p.grad_fn is not None}
    for k, p in enumerate(params):
        if p.grad_fn is None:
            continue
        stack, seen = [p.grad_fn], set()
        while stack:
            node = stack.pop()
            for child, _ in node.next_functions:
                if child is None or child in seen:
                    continue
                seen.add(child)
                j = nodes.get(child)
                variable = getattr(child, "variable", None)
                if j is None and variable is not None:
                    j = leaves.get(id(variable))
                if j is not None and j != k:
                    raise InvalidInputError(
                        f"params[{k}] is computed from params[{j}]: gradient={gradient!r} "
                        "would count their shared path twice. Pass only independent tensors "
                        "in params= (usually the leaves, e.g. the nn.Parameters)"
                    )
                stack.append(child)


def _check_function_transforms(gradient: str) -> None:
    """torch.func transforms: `grad`/`vjp`/`jacrev`/`jvp` run through gradient="direct" (plain
    autograd); the custom gradient methods are autograd.Functions that do not support them, and
    no method supports `vmap` (the loop's step decisions are data-dependent)."""
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return
    kinds = {str(level.key()).rsplit(".", 1)[-1] for level in stack}
    if "Vmap" in kinds:
        raise UnsupportedCombinationError(
            "odegrad.solve does not run under torch.vmap: its step-size and stopping decisions "
            "depend on the data. Batch the problems along y0's leading dimensions instead (f "
            "must treat the samples independently), or loop over them"
        )
    if gradient != "direct":
        raise UnsupportedCombinationError(
            f"gradient={gradient!r} does not run under torch.func transforms "
            f"({', '.join(sorted(kinds))}); use gradient='direct' there, or "
            "torch.autograd.grad / .backward() with this gradient"
        )


def _check_tolerances_positive(rtol: Tensor | float, atol: Tensor | float) -> None:
    """An adaptive error norm divides by atol + rtol·|y|: both zero anywhere is an error."""
    both_zero = torch.as_tensor(rtol).eq(0) & torch.as_tensor(atol).eq(0)
    if bool(both_zero.any()):
        raise InvalidInputError(
            "rtol and atol are both zero (for some component): an adaptive method needs a "
            "positive tolerance; give atol > 0 or rtol > 0"
        )


def probe_field(f, y0: Tensor, t: Tensor, params: Sequence[Tensor], gradient: str,
                module: torch.nn.Module | None = None, name: str = "f") -> bool:
    """Check f once for what the custom gradient methods cannot see; returns whether f draws
    random numbers (dropout, noise), which those methods must replay or refuse.

    Raises if f depends on a tensor that requires grad and is not reached through `params`:
    the custom gradient methods return gradients for y0, t and `params` only, so such a tensor
    would silently get no gradient (direct differentiates it). One evaluation of f under
    autograd at (t0, y0) is walked back to its leaves; the walk stops at the params (and at the
    graph nodes of non-leaf params). A leaf that f creates itself (e.g. a detached copy of y
    with requires_grad) is told apart by a second evaluation, made only when the first finds
    candidates: f's own leaves are new objects there, a captured tensor is the same one. The
    evaluations draw from forked random streams and leave f's buffers as they were. Every solve
    probes (one f evaluation with a graph, about 1-2 % of a typical solve): a cache keyed on f
    would go stale when f's module switches between train() and eval(). `name` names f in the
    message (the SDE API probes its drift "f" and diffusion "g").
    """
    _check_independent(params, gradient)
    missing, draws_random = probe_graph(f, y0, t, params, module)
    if missing:
        again = {id(v) for v in probe_graph(f, y0, t, params, module)[0]}
        missing = [v for v in missing if id(v) in again]
    if missing:
        shapes = ", ".join(str(tuple(v.shape)) for v in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInputError(
            f"{name} depends on {len(missing)} tensor(s) that require grad but are not in "
            f"params= (shapes {shapes}{more}): gradient={gradient!r} would give them no "
            f"gradient. Pass them in params= (for an nn.Module {name}, params defaults to its "
            "parameters), or detach them / call requires_grad_(False) if they are constants"
        )
    return draws_random


def _resolve_method(method: str) -> str:
    if not isinstance(method, str):
        raise UnknownNameError(f"method must be a string, got {type(method).__name__}")
    if method in METHOD_ALIASES:
        target = METHOD_ALIASES[method]
        if target is None:
            raise UnknownNameError(
                f"method {method!r} (torchdiffeq) is not implemented in odegrad; valid methods: "
                f"{', '.join(sorted(SOLVERS))}"
            )
        return target
    if method not in SOLVERS:
        raise UnknownNameError(
            f"unknown method {method!r}; valid methods: {', '.join(sorted(SOLVERS))}"
        )
    return method


def _validate_y0(y0) -> tuple[Tensor, list[torch.Size], bool]:
    is_tuple = isinstance(y0, (tuple, list))
    parts = list(y0) if is_tuple else [y0]
    if is_tuple and not parts:
        raise InvalidInputError("y0 is an empty tuple")
    for k, part in enumerate(parts):
        name = f"y0[{k}]" if is_tuple else "y0"
        if not isinstance(part, Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(part).__name__}")
        if not part.is_floating_point():
            raise InvalidInputError(f"{name} must be floating point, got dtype {part.dtype}")
        if part.dtype != parts[0].dtype or part.device != parts[0].device:
            raise InvalidInputError(
                f"{name} has dtype {part.dtype} on {part.device}, but y0[0] has dtype "
                f"{parts[0].dtype} on {parts[0].device}: tuple states need one dtype and device"
            )
        if part.numel() == 0:
            raise InvalidInputError(f"{name} is empty (shape {tuple(part.shape)}): there is "
                                    "nothing to integrate")
        if not bool(torch.isfinite(part).all()):
            raise NonFiniteError(f"{name} holds non-finite values (inf or nan)")
    if not is_tuple:
        return y0, [y0.shape], False
    return torch.cat([p.reshape(-1) for p in parts]), [p.shape for p in parts], True


def _validate_t(t, y0: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise InvalidInputError(
            f"t must be a 1-D torch.Tensor, got {type(t).__name__}; use "
            f"torch.tensor(t, dtype={y0.dtype})"
        )
    if t.dim() != 1:
        raise InvalidInputError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InvalidInputError("t is empty: give at least the initial time")
    if t.device != y0.device:
        raise InvalidInputError(f"t is on {t.device} but y0 is on {y0.device}")
    if t.dtype != y0.dtype:
        raise InvalidInputError(
            f"t has dtype {t.dtype} but y0 has dtype {y0.dtype}; pass t.to(y0.dtype)"
        )
    values = t.detach().cpu().double()
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError("t holds non-finite values")
    if len(values) > 1:
        steps = values[1:] - values[:-1]
        direction = 1.0 if float(values[-1] - values[0]) > 0 else -1.0
        bad = (steps * direction <= 0).nonzero()
        if len(bad) > 0:
            i = int(bad[0])
            kind = "duplicate" if float(steps[i]) == 0.0 else "non-monotonic"
            raise InvalidInputError(
                f"t must be strictly increasing or strictly decreasing: {kind} values "
                f"t[{i}]={float(values[i]):.10g}, t[{i + 1}]={float(values[i + 1]):.10g}"
            )
    return t


def _tolerance(value, y0: Tensor, shapes, is_tuple: bool, name: str):
    """A tolerance as the loop takes it; a tuple state may give one value per tensor."""
    if isinstance(value, (tuple, list)) and is_tuple:
        if len(value) != len(shapes):
            raise InvalidInputError(f"{name} has {len(value)} entries for {len(shapes)} states")
        parts = [
            torch.as_tensor(v, dtype=y0.dtype, device=y0.device).expand(s).reshape(-1)
            for v, s in zip(value, shapes)
        ]
        value = torch.cat(parts)
    return validate_tolerance(value, name, y0)


def method_options(method: str) -> set[str]:
    """The option names the solver factory of `method` takes."""
    signature = inspect.signature(SOLVERS[method])
    return {
        name for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "tableau"
    }


def _split_options(method: str, gradient_module, options: dict) -> tuple[dict, dict, dict]:
    """Route each option to the solver factory, the gradient method or the loop: each name
    has one consumer for a given (method, gradient) pair (tests/test_guard.py checks it)."""
    solver_names = method_options(method)
    gradient_names = set(gradient_option_names(gradient_module, solver_names))
    solver_options, gradient_options, loop_options = {}, {}, {}
    for name, value in options.items():
        if name in LOOP_OPTIONS:
            loop_options[name] = value
        elif name in solver_names:
            solver_options[name] = value
        elif name in gradient_names:
            gradient_options[name] = value
        elif name == "perturb":
            raise UnsupportedCombinationError(
                f"perturb= (torchdiffeq's option) is taken by the Adams methods "
                f"(adams_bashforth, adams_bashforth_moulton) only, not by method={method!r}: "
                "for f discontinuous in t at known times, give them as jump_t= (steps land "
                "there and f is read one ulp inside each side)"
            )
        else:
            valid = sorted(solver_names | gradient_names | set(LOOP_OPTIONS))
            raise UnknownNameError(
                f"unknown option {name!r} for method={method!r} and gradient="
                f"{gradient_module.__name__.rsplit('.', 1)[-1]!r}; valid options: "
                f"{', '.join(valid) or 'none'}"
            )
    return solver_options, gradient_options, loop_options
