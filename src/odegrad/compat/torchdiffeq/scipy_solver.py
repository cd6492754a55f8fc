"""torchdiffeq 0.2.5's method="scipy_solver": scipy.integrate.solve_ivp behind odeint and
odeint_adjoint, with torchdiffeq's semantics (torchdiffeq/_impl/scipy_wrapper.py).

Forward: solve_ivp(method=options["solver"] (default "LSODA"), rtol, atol, max_step, and min_step
for LSODA) on y flattened, with t_eval at the output times; f is called per evaluation on torch
tensors of y0's dtype and device, without grad, and its value converted to numpy. Decreasing t is
solved in negated time with f negated, as torchdiffeq does.

Gradients: scipy runs in numpy, so the forward solve is not differentiable. Where torchdiffeq
returns outputs without grad (a later backward through them either fails or silently leaves
y0, t and f's parameters out), odeint here returns outputs whose backward raises
UnsupportedCombinationError naming scipy_solver. odeint_adjoint differentiates by torchdiffeq's
continuous adjoint: from the last output time back to the first, interval by interval, the
augmented system (the time adjoint, y, the adjoint of y, the parameters' adjoints) is solved
backwards (by solve_ivp for adjoint_method="scipy_solver", else by the shim's solver for the
adjoint method), restarting y from the forward outputs.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np
import torch

from ...errors import InvalidInputError, OdegradError, UnknownNameError, UnsupportedCombinationError
from .state import _unflatten

SOLVER_NAMES = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
DEFAULT_SOLVER = "LSODA"  # torchdiffeq's default
# The options of other torchdiffeq solvers that solve_ivp also has, which torchdiffeq's
# scipy_solver does not pass to it (it warns "Unexpected arguments" and drops them).
_NOT_PASSED = ("first_step", "norm")


class ScipySolverError(OdegradError, RuntimeError):
    """scipy.integrate.solve_ivp stopped before the last output time."""


def check_options(options, where):
    """Refuse what torchdiffeq's scipy_solver would drop but the user may expect to act."""
    for key in _NOT_PASSED:
        if key in (options or {}):
            raise InvalidInputError(
                f"{where}[{key!r}] with method 'scipy_solver': torchdiffeq does not pass {key} "
                "to scipy.integrate.solve_ivp (its solvers use their own step control and error "
                "norm), so it would have no effect; scipy_solver takes solver, min_step (LSODA "
                "only) and max_step"
            )


def settings(options, where) -> dict:
    """solve_ivp's keywords for scipy_solver's options (solver, min_step, max_step)."""
    from scipy.integrate import LSODA, OdeSolver

    solver = options.get("solver", DEFAULT_SOLVER)
    if isinstance(solver, str):
        if solver not in SOLVER_NAMES:
            raise UnknownNameError(
                f"{where}['solver']={solver!r} is not a scipy.integrate.solve_ivp method; "
                f"must be one of {', '.join(SOLVER_NAMES)} or an OdeSolver subclass"
            )
        name, lsoda = solver, solver == "LSODA"
    elif inspect.isclass(solver) and issubclass(solver, OdeSolver):
        name, lsoda = solver.__name__, issubclass(solver, LSODA)
    else:
        raise UnknownNameError(
            f"{where}['solver']={solver!r} is not a scipy.integrate.solve_ivp method; must be "
            f"one of {', '.join(SOLVER_NAMES)} or an OdeSolver subclass"
        )
    max_step = _float(options.get("max_step", math.inf), f"{where}['max_step']")
    if not max_step > 0:
        raise InvalidInputError(f"{where}['max_step'] must be positive, got {max_step!r}")
    min_step = _float(options.get("min_step", 0.0), f"{where}['min_step']")
    if min_step < 0:
        raise InvalidInputError(f"{where}['min_step'] must be non-negative, got {min_step!r}")
    kwargs = {"method": solver, "max_step": max_step}
    if lsoda:
        kwargs["min_step"] = min_step
    elif min_step != 0:
        raise InvalidInputError(
            f"{where}['min_step']={min_step!r} with solver {name!r}: only scipy's LSODA has a "
            "minimum step (solve_ivp would ignore it with a warning)"
        )
    return kwargs


def _float(value, name) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number, got {value!r}") from None


def tolerance(value, n, name):
    """A tolerance as solve_ivp takes it: a float, or one per element of the flat state."""
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().to(torch.float64).reshape(-1).numpy()
    else:
        try:
            array = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{name} must be a number or a tensor, got {value!r}") from None
    if array.size == 1:
        return float(array[0])
    if array.size != n:
        raise InvalidInputError(
            f"{name} has {array.size} elements: scipy_solver takes one tolerance or one per "
            f"element of the state ({n})"
        )
    return array


def integrate(f, y0, t, rtol, atol, kwargs, probe=None):
    """y at the times t (len(t) >= 2, monotonic) by solve_ivp, as torchdiffeq's
    ScipyWrapperODESolver: a tensor (len(t), *y0.shape) of y0's dtype, without grad. With
    `probe` a list, f's first evaluation runs with grad enabled and its value is appended."""
    from scipy.integrate import solve_ivp

    shape, dtype, device = y0.shape, y0.dtype, y0.device
    real = y0.abs().dtype if y0.is_complex() else dtype
    times = t.detach().cpu()
    if times.dtype not in (torch.float32, torch.float64):
        times = times.to(torch.float64)
    sign = -1.0 if bool(times[0] > times[1]) else 1.0
    # Increasing, in t's dtype (solve_ivp interpolates at float32 t_eval in float32, as for
    # torchdiffeq): torchdiffeq negates decreasing times.
    s = (times * sign).numpy()
    n = y0.numel()
    calls = [0]

    def fun(s_, y):
        time = torch.tensor(sign * float(s_), dtype=torch.float64).to(device, real)
        state = torch.tensor(y).to(device, dtype).reshape(shape)
        if probe is not None and calls[0] == 0:
            with torch.enable_grad():
                out = f(time, state)
            probe.append(out)
        else:
            with torch.no_grad():
                out = f(time, state)
        calls[0] += 1
        if not isinstance(out, torch.Tensor) or out.numel() != n:
            raise InvalidInputError(
                f"func returned {tuple(out.shape) if isinstance(out, torch.Tensor) else out!r} "
                f"for a state of {n} elements (shape {tuple(shape)})"
            )
        out = out.detach()
        if sign < 0:
            out = -out
        return out.cpu().numpy().reshape(-1)

    sol = solve_ivp(fun, t_span=[s.min(), s.max()], y0=y0.detach().cpu().reshape(-1).numpy(),
                    t_eval=s, rtol=tolerance(rtol, n, "rtol"), atol=tolerance(atol, n, "atol"),
                    **kwargs)
    if not sol.success or sol.y.shape[1] != len(s):
        reached = sign * float(sol.t[-1]) if len(sol.t) else float(times[0])
        name = kwargs["method"] if isinstance(kwargs["method"], str) else kwargs["method"].__name__
        raise ScipySolverError(
            f"scipy.integrate.solve_ivp(method={name!r}) stopped at t={reached} before "
            f"t={float(times[-1])}: {sol.message}"
        )
    return torch.tensor(sol.y).T.to(device, dtype).reshape(len(s), *shape)


class _NotDifferentiable(torch.autograd.Function):
    """Outputs of a solve no gradient can go through: their backward raises."""

    @staticmethod
    def forward(ctx, ys, *anchors):
        return ys.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise UnsupportedCombinationError(
            "odeint(method='scipy_solver') is not differentiable: scipy.integrate.solve_ivp "
            "runs in numpy, so no gradient reaches y0, t or func's parameters (torchdiffeq "
            "returns these outputs without grad); use odeint_adjoint(..., method='scipy_solver') "
            "for gradients by the continuous adjoint, or detach the inputs"
        )


def odeint(problem):
    """odeint's scipy_solver solve of a _Problem (len(t) >= 2); outputs that need no gradient
    are plain tensors, the others raise on backward."""
    probe = [] if torch.is_grad_enabled() else None
    ys = integrate(problem.func, problem.y0, problem.t, problem.rtol, problem.atol,
                   problem.scipy, probe)
    if probe is None:
        return ys
    anchors = [x for x in (problem.y0, problem.t) if x.requires_grad]
    anchors += [x for x in probe if isinstance(x, torch.Tensor) and x.requires_grad]
    return _NotDifferentiable.apply(ys, *anchors) if anchors else ys


# -- odeint_adjoint ---------------------------------------------------------------------------


class Adjoint:
    """torchdiffeq's OdeintAdjointMethod for a forward and an augmented backward solve, either
    of which may be scipy's. `forward()` gives y at the output times; `interval(g, state, ts)`
    solves the augmented system g on its flat state from ts[0] to ts[1]."""

    def __init__(self, func, forward, interval):
        self.func, self.forward, self.interval = func, forward, interval

    def apply(self, t, y0, params):
        return _AdjointFunction.apply(self, t, y0, *params)

    def backward(self, t, ys, grad_ys, params, t_grad):
        n_t = len(t)
        sign = -1.0 if n_t > 1 and bool(t[0] > t[1]) else 1.0
        tt = (t * sign).detach() if sign < 0 else t.detach()
        real = ys.abs().dtype if ys.is_complex() else ys.dtype

        def field(s, y):  # f in torchdiffeq's increasing time (negated for decreasing t)
            s = s.to(real)
            return self.func(s, y) if sign > 0 else -self.func(-s, y)

        def augmented(s, parts):
            adj_y = parts[2]
            with torch.enable_grad():
                s = s.detach().requires_grad_(True)  # torchdiffeq always asks for d/dt
                y = parts[1].detach().requires_grad_(True)
                value = field(s, y)
                vjps = torch.autograd.grad(value, (s, y) + params, -adj_y, allow_unused=True)
            inputs = (s, y) + params
            vjps = [torch.zeros_like(x) if v is None else v for x, v in zip(inputs, vjps)]
            return (vjps[0], value.detach(), vjps[1], *vjps[2:])

        ys = ys.detach()
        aug = [torch.zeros((), dtype=ys.dtype, device=ys.device), ys[-1], grad_ys[-1]]
        aug += [torch.zeros_like(p) for p in params]
        time_vjps = torch.empty(n_t, dtype=t.dtype, device=t.device) if t_grad else None
        for i in range(n_t - 1, 0, -1):
            if t_grad:
                with torch.no_grad():
                    dldt = field(tt[i], ys[i]).reshape(-1).dot(grad_ys[i].reshape(-1))
                aug[0] = aug[0] - dldt
                time_vjps[i] = dldt
            aug = list(self.interval(augmented, tuple(aug), torch.stack([tt[i], tt[i - 1]])))
            aug[1] = ys[i - 1]
            aug[2] = aug[2] + grad_ys[i - 1]
        if t_grad:
            time_vjps[0] = aug[0]
            if sign < 0:
                time_vjps = -time_vjps
        return aug[2], time_vjps, aug[3:]


class _AdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, run, t, y0, *params):
        ctx.run = run
        ys = run.forward()
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        t, ys, *params = ctx.saved_tensors
        with torch.no_grad():
            adj_y, adj_t, adj_params = ctx.run.backward(t, ys, grad_ys, tuple(params),
                                                        ctx.needs_input_grad[1])
        adj_params = [a.to(p.dtype) for a, p in zip(adj_params, params)]
        return (None, adj_t, adj_y.to(ys.dtype), *adj_params)


def scipy_interval(rtol, atol, kwargs):
    """The augmented backward solve over one interval by solve_ivp, as torchdiffeq does it:
    the tuple state flattened (torch.cat), solved from ts[0] to ts[1] (decreasing: in negated
    time), its value at ts[1] returned as the tuple."""

    def interval(g, parts, ts):
        shapes = [p.shape for p in parts]
        flat = torch.cat([p.reshape(-1) for p in parts])

        def flat_g(s, y):
            return torch.cat([v.reshape(-1) for v in g(s, _unflatten(y, shapes))])

        ys = integrate(flat_g, flat, ts, rtol, atol, kwargs)
        return tuple(x.to(p.dtype) for x, p in zip(_unflatten(ys[1], shapes), parts))

    return interval
