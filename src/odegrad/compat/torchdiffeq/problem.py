"""One call's validated inputs and its solve: adaptive (restarting at step_t, jump_t and, with
max_num_steps, at every output time) or on torchdiffeq's fixed grid with its interpolation."""

from __future__ import annotations

import torch

from ...api import odeint as _odeint
from ...errors import InvalidInputError, MaxStepsExceededError
from ...loop import fixed_step_count
from ...solvers import SOLVERS
from . import scipy_solver
from .methods import resolve
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


_EVENT_MESSAGE = (
    "{name} is not supported by odegrad: its solver loop has no event detection (a root of "
    "event_fn(t, y) found on the dense output, stopping the solve)"
)


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
        self.cls, self.family, self.og_method, self.fixed_mode = resolve(self.name, "method")
        self.options_norm = (options or {}).get("norm")
        if self.family == "scipy":
            scipy_solver.check_options(options, "options")
        self.options = _sort_options(self.cls, self.family, dict(options or {}), "options")
        self.rtol = _tolerance(rtol, self.shapes, "rtol")
        self.atol = _tolerance(atol, self.shapes, "atol")
        _check_callbacks(func, self.name, self.family, "")
        self.adaptive = self.family == "adaptive"
        self.adjoint_step, self.adjoint_grid = None, None
        self.boundaries, self.perturb = {}, False
        if self.family == "scipy":  # solve_ivp's keywords (scipy_solver.py)
            self.scipy, self.norm = scipy_solver.settings(self.options, "options"), None
            self.max_num_steps = MAX_NUM_STEPS
        elif self.adaptive:
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

    # -- the solve -------------------------------------------------------------------------

    def solve(self, gradient: str, extra: dict):
        self.gradient, self.extra = gradient, extra
        if len(self.t) == 1:
            return self.y0.unsqueeze(0)
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
