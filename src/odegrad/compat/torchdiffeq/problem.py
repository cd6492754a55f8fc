"""One call's validated inputs and its solve: adaptive (restarting at step_t, jump_t and, with
max_num_steps, at every output time) or on torchdiffeq's fixed grid with its interpolation."""

from __future__ import annotations

import math

import torch

from ...api import odeint as _odeint
from ...errors import InvalidInputError, MaxStepsExceededError
from ...loop import fixed_step_count
from ...solvers import SOLVERS
from . import scipy_solver
from .methods import adams_method, resolve
from .options import (
    MAX_NUM_STEPS,
    _boundaries,
    _check_callbacks,
    _check_controller,
    _max_num_steps,
    _positive,
    _sort_options,
    _tolerance,
)
from .state import (
    _check_t,
    _Flat,
    _flatten_state,
    _longest,
    _merge,
    _mixed_norm,
    _Nudged,
    _strict,
    _TupleNorm,
    _unflatten,
)


class MaxNumStepsExceededError(MaxStepsExceededError, AssertionError):
    """torchdiffeq's max_num_steps was exceeded (torchdiffeq raises an AssertionError)."""


# With event_fn, an adaptive solve searches odegrad's event solve over chunks of this length
# (torchdiffeq's search has no end time), and gives up after this many chunks.
EVENT_CHUNK = 1000.0
EVENT_MAX_CHUNKS = 100
# A fixed-grid search solves this many grid steps at a time; torchdiffeq stops after 20000.
EVENT_FIXED_CHUNK = 1000
EVENT_FIXED_MAX_STEPS = 20000


class _Problem:
    """Validated inputs of one call, in the form odegrad's API takes, and the solve."""

    def __init__(self, func, y0, t, rtol, atol, method, options, event_fn):
        if options is not None and not isinstance(options, dict):
            raise InvalidInputError(f"options must be a dict, got {type(options).__name__}")
        self.user_func = func
        self.y0, self.shapes = _flatten_state(y0)
        self.func = _Flat(func, self.shapes)
        self.t = _check_t(t, self.y0)
        self.t_y = self.t if self.t.dtype == self.y0.dtype else self.t.to(self.y0.dtype)
        self.name = "dopri5" if method is None else method
        self.cls, self.family, self.og_method, self.fixed_mode = resolve(self.name, "method")
        self.options_norm = (options or {}).get("norm")
        if self.family == "scipy":
            scipy_solver.check_options(options, "options")
        self.options = _sort_options(self.cls, self.family, dict(options or {}), "options")
        self.rtol = _tolerance(rtol, self.shapes, "rtol")
        self.atol = _tolerance(atol, self.shapes, "atol")
        self.callbacks = _check_callbacks(func, self.name, self.family, "")
        self.event_fn = event_fn
        if event_fn is not None:
            if len(self.t) != 2:
                raise ValueError("We require len(t) == 2 when in event handling mode, but got "
                                 f"len(t)={len(self.t)}.")
            if self.family == "scipy":
                raise InvalidInputError(
                    "event_fn with method 'scipy_solver': torchdiffeq's scipy wrapper has no "
                    "event handling (integrate_until_event)"
                )
        self.adaptive = self.family == "adaptive"
        self.adjoint_step, self.adjoint_grid, self.adjoint_callbacks = None, None, None
        self.boundaries, self.perturb, self.control = {}, False, {}
        if self.family == "scipy":  # solve_ivp's keywords (scipy_solver.py)
            self.scipy, self.norm = scipy_solver.settings(self.options, "options"), None
            self.max_num_steps = MAX_NUM_STEPS
        elif self.adaptive:
            self._read_adaptive_options()
        else:
            self._read_fixed_options()
        self.method_options = {}
        # Adams with perturb: one solve through the grid, the Adams solver evaluating f one
        # ulp inside each step at its ends (its option perturb), so the history is kept.
        self.multistep = False
        if self.family == "adams":
            self.og_method, self.method_options = adams_method(self.name, self.options)
            self.multistep = self.og_method != "rk4_38"  # max_order < 4: torchdiffeq's RK4
            if self.perturb and self.multistep:
                self.method_options["perturb"] = True

    # -- options ---------------------------------------------------------------------------

    def _read_adaptive_options(self):
        options = self.options
        self.control = _check_controller(options, self.y0, "options")
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

    # -- the solve -------------------------------------------------------------------------

    def solve(self, gradient: str, extra: dict):
        self.gradient, self.extra = gradient, extra
        if len(self.t) == 1:
            return self.y0.unsqueeze(0)
        if self.event_fn is not None:
            return self._solve_event()
        if self.family == "scipy":
            if gradient != "direct":
                raise InvalidInputError(
                    f"method 'scipy_solver' with gradient={gradient!r}: its gradients come "
                    "from odeint_adjoint's own adjoint solve (scipy_solver.Adjoint)"
                )
            return scipy_solver.odeint(self)
        if self.adaptive:
            return self._solve_adaptive()
        return self._solve_fixed()

    def _call(self, f, y, ts, first=True, one_backward_step=False, hooks=True, **kwargs):
        """One odegrad solve over the times ts (a 1-D tensor), from y. A fixed-step backward
        solve takes adjoint_options' step_size, else one step between consecutive times."""
        options = dict(self.extra, **self.method_options)
        if self.gradient == "backsolve" and not self.adaptive_adjoint() and (
                one_backward_step or "adjoint_step_size" not in options):
            options["adjoint_step_size"] = _longest(ts)
        if self.norm is not None:
            options["norm"] = self.norm
        if self.adaptive and first and self.first_step is not None:
            options["first_step"] = self.first_step
        if self.adaptive:
            options.update(self.control)
        if hooks and self.callbacks:
            options.update(self._hooks(ts))
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
        if self.max_num_steps == MAX_NUM_STEPS and self.boundaries:
            # odegrad's own step_t / jump_t: steps land on them (f one ulp inside at a jump)
            kinds = {"step_t": [v for v, jump in self.boundaries.items() if not jump],
                     "jump_t": [v for v, jump in self.boundaries.items() if jump]}
            return self._call(self.func, self.y0, self.t_y,
                              **{k: v for k, v in kinds.items() if v})
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

    def _chain(self, times, cut_indices, perturbed, y0=None, **kwargs):
        """Solve from one cut to the next; f's time is nudged one ulp into the interval at a
        perturbed end. Returns y at every time."""
        stops = [0] + [i for i in cut_indices if 0 < i < len(times) - 1] + [len(times) - 1]
        y0 = self.y0 if y0 is None else y0
        values, y = [y0], y0
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
        # An Adams solver perturbs f's time itself (its option perturb): no restarts needed.
        own_perturb = not self.perturb or self.multistep
        native = self.grid_constructor is None and own_perturb and on_grid and not steps_on_grid
        fixed_kwargs = {"adaptive": False} if self.fixed_mode else {}
        func = self._func_inside()
        if native and self.step_size is None and not self.fixed_mode:
            return self._call(func, self.y0, self.t_y)
        if native and self.step_size is not None and (
                fixed_step_count(self.t_y, self.step_size) == len(times) - 1):
            return self._call(func, self.y0, self.t_y, step_size=self.step_size,
                              **fixed_kwargs)
        # Through the grid itself: one step per grid interval, outputs interpolated.
        grid_y = grid.to(self.y0.dtype)
        keep = _strict(grid_y.detach().cpu().tolist())
        grid, grid_y, times = grid[keep], grid_y[keep], [times[i] for i in keep]
        # With the forward's step size (or none), the backward solve steps on the forward grid
        # reversed: one step per grid interval.
        kwargs = {"one_backward_step": self.adjoint_step in (None, self.step_size)}
        if own_perturb and not self.fixed_mode:
            values = list(self._call(func, self.y0, grid_y, **kwargs).unbind(0))
        else:
            points = list(zip(times, grid_y.unbind(0)))
            index = list(range(len(points)))
            if self.fixed_mode:
                kwargs.update(adaptive=False, step_size=_longest(grid_y))
            values = self._chain(points, index, set(index) if self.perturb else set(),
                                 **kwargs)
        return self._interpolate(grid, times, values, t_values)

    def _func_inside(self, ts=None):
        """f for a solve from ts[0] to ts[-1] (default: t) by an Adams solver with perturb:
        f's time moved one ulp inside at both ends, so that no evaluation outside the solver
        (odegrad's probe of f at t0 for the gradient methods) reads f at the ends, as in
        torchdiffeq; the solver's own evaluations there are inside already. Else f itself."""
        if not (self.perturb and self.multistep):
            return self.func
        ts = self.t_y if ts is None else ts
        return _Nudged(self.func, ts[0], ts[-1], True, True)

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

    # -- step callbacks ----------------------------------------------------------------------

    def _hooks(self, ts) -> dict:
        """odegrad's step hooks calling func's torchdiffeq callbacks: callback_step(t0, y0, dt)
        before each attempt, callback_accept_step / callback_reject_step(t0, y0, dt) with the
        step's start state after it. torchdiffeq integrates decreasing t in negated time: its
        dt is then -h (positive), its t the user's time."""
        func, names, shapes = self.user_func, self.callbacks, self.shapes
        sign = -1.0 if bool(ts[-1] < ts[0]) else 1.0
        last = []

        def args(t, y, h):
            y = y if shapes is None else _unflatten(y, shapes)
            return t, y, torch.as_tensor(sign * h, dtype=t.dtype, device=t.device)

        def on_attempt(t, y, h):
            last[:] = args(t, y, h)
            if "callback_step" in names:
                func.callback_step(*last)

        hooks = {"on_attempt": on_attempt}
        if "callback_accept_step" in names:
            hooks["on_accept"] = lambda t, y, h: func.callback_accept_step(*last)
        if "callback_reject_step" in names:
            hooks["on_reject"] = lambda t, y, h: func.callback_reject_step(*args(t, y, h))
        return hooks

    # -- events ------------------------------------------------------------------------------

    def finish(self, out):
        """The caller's result: ys (a tuple for a tuple state), or (event_t, ys) with event_fn."""
        if self.event_fn is None or len(self.t) == 1:
            return self.unflatten(out)
        event_t, ys = out
        return event_t.to(self.t), self.unflatten(ys)

    def _combined_event(self):
        """torchdiffeq's combine_event_functions on the flat state: min over the components of
        event_fn times their signs at t0 (positive until any component changes sign)."""
        event_fn, shapes = self.event_fn, self.shapes

        def user(t, y):
            return event_fn(t, y if shapes is None else _unflatten(y, shapes))

        with torch.no_grad():
            signs = torch.sign(user(self.t[0], self.y0)).detach()

        def combined(t, y):
            return torch.min(user(t, y) * signs).reshape(1)

        return combined

    def _solve_event(self):
        g = self._combined_event()
        direction = -1.0 if bool(self.t[0] > self.t[1]) else 1.0
        with torch.no_grad():
            at_start = g(self.t_y[0], self.y0)
        if self.adaptive and bool(at_start == 0):  # torchdiffeq stops at once
            return self.t[0].detach(), torch.stack([self.y0, self.y0])
        if self.adaptive:
            return self._event_adaptive(g, direction)
        return self._event_fixed(g, direction, torch.sign(at_start))

    def _event_adaptive(self, g, direction):
        """Locate the event with odegrad's event solve, without a graph, over chunks of
        EVENT_CHUNK from t0 (each chunk from the last one's end state); then solve from t0 to
        the located time with the gradient method: torchdiffeq's odeint returns the event time
        detached and y at that fixed time (and g may hold tensors that require grad)."""
        if self.boundaries:
            raise InvalidInputError(
                "options step_t/jump_t with event_fn: odegrad's event solve does not restart "
                "at them"
            )
        y, start = self.y0.detach(), self.t_y[0].detach()
        for chunk in range(EVENT_MAX_CHUNKS):
            end = start + direction * EVENT_CHUNK
            with torch.no_grad():
                event_t, ys = self._call(self.func, y, torch.stack([start, end]),
                                         first=chunk == 0, hooks=False,
                                         event_fn=lambda t, y: g(t, y).detach(),
                                         event_direction=0)
            if event_t is not None:
                break
            y, start = ys[-1], end
        else:
            raise RuntimeError(
                f"no event within {EVENT_MAX_CHUNKS * EVENT_CHUNK:g} time units of t0: "
                "event_fn never changed sign"
            )
        event_t = event_t.detach()
        if bool(event_t == self.t_y[0].detach()):
            return event_t, torch.stack([self.y0, self.y0])
        ys = self._call(self.func, self.y0, torch.stack([self.t_y[0], event_t]))
        return event_t, ys

    def _grid_values(self, y, grid_y, **hooks):
        """y at every point of a fixed grid (one step per interval), from y at grid_y[0]."""
        kwargs = {"one_backward_step": self.adjoint_step in (None, self.step_size),
                  "hooks": False, **hooks}
        if (not self.perturb or self.multistep) and not self.fixed_mode:
            return list(self._call(self._func_inside(grid_y), y, grid_y, **kwargs).unbind(0))
        points = list(zip(grid_y.detach().cpu().tolist(), grid_y.unbind(0)))
        index = list(range(len(points)))
        if self.fixed_mode:
            kwargs.update(adaptive=False, step_size=_longest(grid_y))
        return self._chain(points, index, set(index) if self.perturb else set(), y0=y,
                           **kwargs)

    def _event_fixed(self, g, direction, sign0):
        """torchdiffeq's FixedGridODESolver.integrate_until_event: steps of step_size from t0
        (solved EVENT_FIXED_CHUNK at a time, each chunk from the last one's end state) until
        the sign of the combined event function differs from its sign at t0, then bisection
        to atol on the step's interpolant (linear or cubic)."""
        if self.grid_constructor is not None or self.step_size is None:
            raise AssertionError("Event handling for fixed step solvers currently requires "
                                 "`step_size` to be provided in options.")
        y, start, done = self.y0, self.t_y[0], 0
        while done < EVENT_FIXED_MAX_STEPS:
            n = min(EVENT_FIXED_CHUNK, EVENT_FIXED_MAX_STEPS - done)
            offsets = torch.arange(0, n + 1, dtype=start.dtype, device=start.device)
            grid = start + direction * self.step_size * offsets
            crossed = self._first_crossing(g, sign0, y, grid)
            if crossed is not None:  # solved again with a graph, up to the crossing only
                values = self._grid_values(y, grid[:crossed + 1])
                return self._fixed_event_in(g, sign0, grid[crossed - 1], grid[crossed],
                                            values[-2], values[-1])
            values = self._grid_values(y, grid)
            y, start, done = values[-1], grid[-1], done + n
        raise RuntimeError(f"Reached maximum number of iterations {EVENT_FIXED_MAX_STEPS}.")

    def _first_crossing(self, g, sign0, y, grid):
        """The index of the first grid point where the sign of g differs from sign0, or None:
        a solve without a graph that stops there (torchdiffeq never steps past the event, and
        f may not be finite beyond it)."""
        count = [0]

        class _Crossed(Exception):
            pass

        def on_accept(t, y_end, h):
            count[0] += 1
            if bool(torch.sign(g(grid[count[0]], y_end)) != sign0):
                raise _Crossed

        with torch.no_grad():
            try:
                self._grid_values(y.detach(), grid.detach(), on_accept=on_accept)
            except _Crossed:
                return count[0]
        return None

    def _fixed_event_in(self, g, sign0, t0, t1, y0, y1):
        if self.interp == "linear":
            def interp(t):
                if bool(t == t0):
                    return y0
                if bool(t == t1):
                    return y1
                return y0 + (t - t0) / (t1 - t0) * (y1 - y0)
        else:
            with torch.enable_grad():
                start = t0
                if self.perturb:  # f0 of the step, taken one ulp inside it
                    nudged = torch.nextafter(start.detach(), t1.detach())
                    start = start + (nudged - start).detach()
                f0 = self.func(start, y0)
                f1 = self.func(t1, y1)

            def interp(t):
                s = (t - t0) / (t1 - t0)
                h = t1 - t0
                return ((1 + 2 * s) * (1 - s) * (1 - s) * y0 + s * (1 - s) * (1 - s) * h * f0
                        + s * s * (3 - 2 * s) * y1 + s * s * (s - 1) * h * f1)

        atol = float(self.atol.max()) if isinstance(self.atol, torch.Tensor) else float(self.atol)
        with torch.no_grad():  # torchdiffeq's find_event (in real time: the same midpoints)
            lo, hi = t0.detach().reshape(()), t1.detach().reshape(())
            iterations = int(math.ceil(math.log(abs(float(hi - lo)) / atol) / math.log(2.0)))
            for _ in range(max(iterations, 0)):
                mid = (lo + hi) / 2.0
                same = (torch.sign(g(mid, interp(mid))) == sign0).reshape(())
                lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
            event_t = ((lo + hi) / 2.0).reshape(())
        return event_t, torch.stack([self.y0, interp(event_t)])
