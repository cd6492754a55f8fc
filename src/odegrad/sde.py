"""sdeint / solve_sde: neural SDEs through the ODE machinery (ALGORITHMS.md §11; DESIGN.md
"Beyond ODEs").

An SDE step is a deterministic function of (t, h, y) once its Brownian increment can be queried
again (a `BrownianInterval` answers the same ΔW on every query), so an SDE solve is the core
loop with an SDE scheme (solvers/sde.py) over an `SDEField` (sde_field.py), and the gradient
methods are the ODE ones: `direct` (autograd through the loop), `discrete` (the generic replay
of each step, every checkpoint policy), `reversible` (reversible Heun and McCallum–Foster over
a Stratonovich base, memory constant in the number of steps), and `backsolve`, which for SDEs
is the stochastic adjoint of Li et al. 2020 (gradients/stochastic_adjoint.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

import torch
from torch import Tensor

from .api import Solution, _unique_params, _validate_t, probe_field
from .brownian import BrownianInterval
from .errors import (
    InvalidInputError,
    NonFiniteError,
    UnknownNameError,
    UnsupportedCombinationError,
)
from .problem import Problem
from .sde_field import (
    NOISE_TYPES,
    SDE_TYPES,
    SDEField,
    StepGrid,
    brownian_shape,
    fixed_grid,
    jvp,
)
from .solvers.reversible import ReversibleSolver
from .solvers.sde import SDE_SOLVERS, SDESolver, make_sde_solver, sde_method_options

__all__ = ["sdeint", "solve_sde", "SDE_GRADIENTS", "SDE_METHODS"]

# gradient name -> (module, the option names it takes for SDEs)
SDE_GRADIENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "direct": ("odegrad.gradients.direct", ("count_graph_bytes",)),
    "discrete": ("odegrad.gradients.discrete", ("memory_budget",)),
    "reversible": ("odegrad.gradients.reversible", ("drift_tol",)),
    "backsolve": ("odegrad.gradients.stochastic_adjoint", ("adjoint_method",)),
}
SDE_METHODS = tuple(sorted(SDE_SOLVERS))
_ADAPTIVE_OPTIONS = ("adaptive", "rtol", "atol", "step_size", "first_step")


def sdeint(
    f: Callable, g: Callable, y0: Tensor, t: Tensor, bm: Callable | None = None, **kwargs
) -> Tensor:
    """Solve the SDE and return y at every time in t, shape (len(t), *y0.shape).

    Same arguments as `solve_sde`."""
    return solve_sde(f, g, y0, t, bm, **kwargs).ys


def solve_sde(
    f: Callable,
    g: Callable,
    y0: Tensor,
    t: Tensor,
    bm: Callable | None = None,
    *,
    method: str = "reversible_heun",
    dt: float,
    sde_type: str = "stratonovich",
    noise_type: str = "diagonal",
    gradient: str = "direct",
    checkpoints: str | int | None = None,
    params: Sequence[Tensor] | None = None,
    brownian_size: int | None = None,
    seed: int | None = None,
    max_steps: int | None = None,
    **options,
) -> Solution:
    """Solve dY = f(t, Y) dt + g(t, Y) ∘ dW (Stratonovich) or + g dW (Itô) with fixed steps dt.

    Args:
        f, g: drift f(t, y) -> shape of y; diffusion g(t, y) -> y's shape (diagonal noise),
            (*y.shape, 1) (scalar) or (*y.shape, m) (additive, general). Modules or closures.
        y0: the initial state, a floating tensor (*batch, d) (d the state size).
        t: 1-D output times, strictly monotonic; t[0] is the initial time. Not differentiable
            (a Brownian path has no time derivative): t requiring grad is refused.
        bm: the Brownian motion W(ta, tb) of shape (*batch, m) covering [min t, max t]
            (an `odegrad.BrownianInterval`); None: one is made, seeded by `seed`.
        method: the scheme, see `odegrad.SDE_METHODS` (solvers/sde.py, sde_reversible.py).
        dt: the step; steps of dt from t[0], the last clipped to land on t[-1]; outputs
            inside a step are read by linear interpolation.
        sde_type: the calculus of (f, g): "stratonovich" or "ito". A scheme of the other kind
            gets the converted drift f ± ½ Σ_k (∂g_{·k}/∂y) g_{·k} (JVPs of g).
        noise_type: "diagonal", "scalar", "additive" or "general".
        gradient: "direct", "discrete" (checkpoints=, memory_budget=), "reversible" (the
            reversible schemes; drift_tol=) or "backsolve" (the stochastic adjoint: any forward
            scheme, the backward pass on the SDE's Stratonovich form with adjoint_method=, a
            Stratonovich scheme using g only through g·ΔW; default the forward scheme when it
            is one, else midpoint).
        params: the tensors to differentiate besides y0 (default: the parameters of f and g
            that are modules); every grad-requiring tensor f or g uses must be among them.
        brownian_size: m for general/additive noise when bm is None.
        seed: the seed of the Brownian motion made when bm is None.
        max_steps: a bound on the number of steps (default: none).
        options: the method's options (milstein: derivative_free; reversible_<base>: coupling;
            reversible_heun: solver_state=(f, g, z), the scheme's state at t[0], e.g. the
            stats["solver_state"] of an earlier solve; gradient="direct" only) and the
            gradient's; any other name raises UnknownNameError.

    Returns a Solution; for a scheme with a state besides y (reversible_heun: (f, g, z), see
    `ReversibleHeunSDE.solver_state`), stats["solver_state"] holds its state at t[-1]:
    differentiable with gradient="direct"; with the other gradients (whose forward pass keeps no
    graph) it is given only when the solve runs without grad mode, so that no gradient through
    it can be silently missing.
    """
    stats: dict = {"nfe_forward": 0, "nfe_backward": 0, "nge_forward": 0, "nge_backward": 0}
    y0 = _validate_y0(y0)
    t = _validate_t(t, y0)
    if t.requires_grad:
        raise UnsupportedCombinationError(
            "t requires grad, but an SDE solve is not differentiable in its times (the Brownian "
            "increments have no time derivative); pass t.detach()"
        )
    if len(t) < 2:
        raise InvalidInputError("t needs at least two times (the initial and a final one)")
    dt = _validate_dt(dt, t)
    if sde_type not in SDE_TYPES:
        raise UnknownNameError(f"unknown sde_type {sde_type!r}; valid: {', '.join(SDE_TYPES)}")
    if noise_type not in NOISE_TYPES:
        raise UnknownNameError(
            f"unknown noise_type {noise_type!r}; valid: {', '.join(NOISE_TYPES)}"
        )
    if gradient == "interpolated":
        raise UnsupportedCombinationError(
            "gradient='interpolated' is not defined for SDEs (its adjoint reads y(t) off an "
            "interpolant, but y is not smooth between steps); use gradient='backsolve' (the "
            "stochastic adjoint), 'reversible', 'discrete' or 'direct'"
        )
    if gradient not in SDE_GRADIENTS:
        raise UnknownNameError(
            f"unknown gradient {gradient!r} for SDEs; valid: {', '.join(SDE_GRADIENTS)}"
        )
    module_path, gradient_names = SDE_GRADIENTS[gradient]
    solver = _make_solver(method, options, gradient, gradient_names)
    gradient_options = {k: options.pop(k) for k in list(options) if k in gradient_names}
    if checkpoints is not None:
        if gradient != "discrete":
            raise InvalidInputError(
                f"checkpoints= applies to gradient='discrete', not gradient={gradient!r}"
            )
        gradient_options["checkpoints"] = checkpoints
    solver.check_noise(noise_type)
    if sde_type in getattr(solver, "sde_types", (solver.sde_type,)):
        solver.sde_type = sde_type
    # Itô drift = Stratonovich drift + ½ c: the drift the scheme's calculus needs.
    correction = 0.0 if sde_type == solver.sde_type else (0.5 if sde_type == "stratonovich"
                                                           else -0.5)

    bm = _brownian(bm, y0, t, noise_type, brownian_size, seed,
                   getattr(solver, "levy_area", "none"))
    times = [float(v) for v in t.detach().cpu().tolist()]
    grid = StepGrid(fixed_grid(times, dt))
    field = SDEField(f, g, noise_type, bm, y0, stats, grid=grid, drift_correction=correction)
    modules = [m for m in (f, g) if isinstance(m, torch.nn.Module)]
    module = torch.nn.ModuleList(modules) if modules else None
    if params is None:
        params = [p for m in modules for p in m.parameters()]
    params = _unique_params(params)
    n_steps = len(grid.points) - 1
    if max_steps is not None and n_steps > max_steps:
        raise InvalidInputError(
            f"dt={dt} needs {n_steps} steps from {times[0]} to {times[-1]}, more than "
            f"max_steps={max_steps}; take a larger dt or raise max_steps"
        )
    keep_state = hasattr(solver, "solver_state") and (
        gradient == "direct" or not torch.is_grad_enabled())
    problem = _SDEProblem(
        f=field, y0=y0, t=t, solver=solver, params=params, step_size=dt, adaptive=False,
        max_steps=n_steps + 1, stats=stats, module=module, final=[] if keep_state else None,
    )
    if gradient != "direct" and torch.is_grad_enabled():
        draws = probe_field(f, y0, t, params, gradient, module, name="f")
        draws |= probe_field(lambda s, y: g(s, y), y0, t, params, gradient, module, name="g")
        problem.draws_random = draws
    if getattr(solver, "derivative_free", False) and noise_type == "diagonal":
        _check_diagonal_dependence(g, t[0], y0)
    _check_gradient(gradient, solver, sde_type, problem)
    _check_start_state(solver, gradient, y0, noise_type, bm)
    gradient_module = import_module(module_path)
    check = getattr(gradient_module, "check", None)
    if check is not None:
        check(problem)
    stats["method"] = solver.name
    ys = gradient_module.solve(problem, **gradient_options)
    stats.setdefault("checkpoint_bytes", 0)
    if problem.final:
        stats["solver_state"] = solver.solver_state(*problem.final)
    return Solution(ts=t, ys=ys, stats=stats)


@dataclass
class _SDEProblem(Problem):
    """A Problem whose forward runs keep the last step's (state, carry) in `final` (when it is
    a list): the scheme's state at t[-1] (re-runs in a backward pass are not recorded)."""

    final: list | None = None

    def integrate(self, y0: Tensor | None = None, on_step=None):
        sink = self.final
        if sink is None or self.stats.get("_phase") == "backward":
            return super().integrate(y0, on_step)

        def keep(record, state, step) -> None:
            sink[:] = [step.y, step.carry]
            if on_step is not None:
                on_step(record, state, step)

        return super().integrate(y0, keep)


def _validate_y0(y0) -> Tensor:
    if isinstance(y0, (tuple, list)):
        raise InvalidInputError(
            "sdeint takes y0 as one tensor (*batch, d); for a tuple state concatenate its "
            "parts along the last dimension (and split them inside f and g)"
        )
    if not isinstance(y0, Tensor):
        raise InvalidInputError(f"y0 must be a torch.Tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise InvalidInputError(f"y0 must be floating point, got dtype {y0.dtype}")
    if y0.dim() < 1 or y0.numel() == 0:
        raise InvalidInputError(
            f"y0 must have shape (*batch, d) with d >= 1, got {tuple(y0.shape)}"
        )
    if not bool(torch.isfinite(y0).all()):
        raise NonFiniteError("y0 holds non-finite values (inf or nan)")
    return y0


def _validate_dt(dt, t: Tensor) -> float:
    if dt is None or isinstance(dt, bool):
        raise InvalidInputError("dt= is required: SDE solves take fixed steps")
    try:
        value = float(dt)
    except (TypeError, ValueError):
        raise InvalidInputError(f"dt must be a positive number, got {dt!r}") from None
    if not (value > 0.0 and value < float("inf")):
        raise InvalidInputError(f"dt must be a positive finite number, got {dt!r}")
    return value


def _make_solver(method: str, options: dict, gradient: str, gradient_names) -> SDESolver:
    """The scheme with its options; a name that neither the method nor the gradient takes,
    and the adaptive-step options, raise."""
    if not isinstance(method, str) or method not in SDE_SOLVERS:
        raise UnknownNameError(
            f"unknown SDE method {method!r}; valid SDE methods: {', '.join(SDE_METHODS)}"
        )
    solver_names = sde_method_options(method)
    for name in options:
        if name in _ADAPTIVE_OPTIONS:
            raise UnsupportedCombinationError(
                f"{name}= belongs to adaptive steps, but SDE solves take fixed steps dt=; drop "
                f"{name}= and choose dt"
            )
        if name not in solver_names and name not in gradient_names:
            valid = sorted(solver_names | set(gradient_names) | {"checkpoints"})
            raise UnknownNameError(
                f"unknown option {name!r} for SDE method={method!r} and gradient={gradient!r}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
    solver_options = {k: options.pop(k) for k in list(options) if k in solver_names}
    return make_sde_solver(method, **solver_options)


def _brownian(bm, y0: Tensor, t: Tensor, noise_type: str, brownian_size: int | None,
              seed: int | None, levy_area: str = "none"):
    """The given Brownian motion, checked, or a BrownianInterval over [min t, max t];
    `levy_area`: the Lévy area the method reads ("space-time" for srk, else "none")."""
    lo, hi = float(t.detach().min()), float(t.detach().max())
    if bm is None:
        shape = brownian_shape(noise_type, y0.shape, brownian_size)
        return BrownianInterval(lo, hi, shape, dtype=y0.dtype, device=y0.device, seed=seed,
                                levy_area=levy_area)
    if seed is not None:
        raise InvalidInputError("seed= seeds the Brownian motion sdeint makes, but bm= was given")
    missing = [a for a in ("t0", "t1", "shape") if not hasattr(bm, a)]
    if missing or not callable(bm):
        raise InvalidInputError(
            "bm must be an odegrad.BrownianInterval (or a callable bm(ta, tb) with attributes "
            f"t0, t1, shape); it lacks {', '.join(missing) or '__call__'}"
        )
    if float(bm.t0) > lo or float(bm.t1) < hi:
        raise InvalidInputError(
            f"bm covers [{float(bm.t0)}, {float(bm.t1)}], which does not contain the solve's "
            f"times [{lo}, {hi}]"
        )
    size = brownian_size if brownian_size is not None else int(tuple(bm.shape)[-1])
    want = brownian_shape(noise_type, y0.shape, size)
    if tuple(bm.shape) != tuple(want):
        raise InvalidInputError(
            f"bm has shape {tuple(bm.shape)}, but noise_type={noise_type!r} with y0 of shape "
            f"{tuple(y0.shape)} needs {tuple(want)}"
        )
    dtype, device = getattr(bm, "dtype", y0.dtype), getattr(bm, "device", y0.device)
    if dtype != y0.dtype or torch.device(device) != y0.device:
        raise InvalidInputError(
            f"bm is {dtype} on {device}, but y0 is {y0.dtype} on {y0.device}"
        )
    if levy_area != "none" and getattr(bm, "levy_area", "none") in (None, "none"):
        raise InvalidInputError(
            f"this method reads the {levy_area} Lévy area, but bm has none: make bm with "
            f"levy_area={levy_area!r} (BrownianInterval(..., levy_area={levy_area!r}); davie "
            "and foster carry it too), or omit bm= and solve_sde makes one")
    return bm


def _check_gradient(gradient: str, solver: SDESolver, sde_type: str, problem: Problem) -> None:
    if gradient == "reversible" and not isinstance(solver, ReversibleSolver):
        valid = sorted(n for n, fac in SDE_SOLVERS.items() if isinstance(fac(), ReversibleSolver))
        raise UnsupportedCombinationError(
            f"gradient='reversible' cannot serve SDE method {solver.name!r}: it needs an "
            f"algebraically reversible scheme; valid methods: {', '.join(valid)} (or use "
            "gradient='discrete' with this method)"
        )


def _check_start_state(solver: SDESolver, gradient: str, y0: Tensor, noise_type: str,
                       bm) -> None:
    """reversible_heun's solver_state=(f, g, z): shapes as the scheme's own state, and only
    with gradient="direct" (the other gradients differentiate y0 alone, through z_0 = y0)."""
    start = getattr(solver, "start", None)
    if start is None:
        return
    if gradient != "direct":
        raise UnsupportedCombinationError(
            f"solver_state= (a starting state of {solver.name!r}) is served with "
            f"gradient='direct' only: gradient={gradient!r} differentiates y0 through the "
            "scheme's own start z_0 = y0; use gradient='direct' or drop solver_state="
        )
    if len(start) != 3 or not all(isinstance(x, Tensor) for x in start):
        raise InvalidInputError(
            "solver_state must be a tuple (f, g, z) of tensors: the drift and diffusion at "
            "(t[0], z) and the auxiliary point z (stats['solver_state'] of a solve)"
        )
    m = int(tuple(bm.shape)[-1])
    g_shape = (tuple(y0.shape) if noise_type == "diagonal" else (*y0.shape, m))
    for name, x, shape in zip("fgz", start, (tuple(y0.shape), g_shape, tuple(y0.shape))):
        if tuple(x.shape) != shape or x.dtype != y0.dtype or x.device != y0.device:
            raise InvalidInputError(
                f"solver_state: {name} is {x.dtype} of shape {tuple(x.shape)} on {x.device}, "
                f"but with y0 {y0.dtype} of shape {tuple(y0.shape)} on {y0.device} and "
                f"noise_type={noise_type!r} it must have shape {shape}, same dtype and device"
            )


def _check_diagonal_dependence(g: Callable, t0: Tensor, y0: Tensor) -> None:
    """derivative_free Milstein on diagonal noise reads Σ_j (∂g_i/∂y_j) g_j as (∂g_i/∂y_i) g_i:
    refuse a g whose component i depends on y_j, j ≠ i (checked at (t0, y0), one JVP per
    component)."""
    d = y0.shape[-1]
    eye = torch.eye(d, dtype=y0.dtype, device=y0.device)
    with torch.no_grad():
        for j in range(d):
            column = jvp(lambda x: g(t0.detach(), x), y0.detach(), eye[j].expand_as(y0))
            off = column * (1 - eye[j])
            if bool((off.abs() > 1e-12 * (1 + column.abs().max())).any()):
                raise UnsupportedCombinationError(
                    "method='milstein' with derivative_free=True on diagonal noise needs g_i to "
                    f"depend on y_i alone, but g depends on y_{j} in another component; use "
                    "derivative_free=False (exact, by JVPs of g)"
                )
