"""torchsde 0.2.6's `sdeint` and `sdeint_adjoint` on odegrad's `solve_sde`.

sdeint: gradient="direct" (autograd through the steps, as torchsde). sdeint_adjoint: the
stochastic adjoint of Li et al. 2020 (odegrad's gradient="backsolve": the forward with any
served method, the adjoint SDE of the SDE's Stratonovich form integrated backwards with
`adjoint_method` and the forward's dt; for an Itô SDE odegrad converts the drift, where torchsde
keeps an Itô adjoint, so the default adjoint_method there is midpoint, not torchsde's milstein
or euler, which are refused by name), or, for method="reversible_heun" with
adjoint_method="adjoint_reversible_heun" (torchsde's default there), odegrad's
gradient="reversible": the exact gradient of the reversible Heun scheme by reconstructing each
step backwards, memory constant in the number of steps.

extra=True / extra_solver_state: reversible_heun's state (f, g, z) at ts[-1] / ts[0] (odegrad's
solve_sde stats["solver_state"] and option solver_state=), with sdeint; the other served methods
keep none (()).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ...brownian import BrownianInterval as OdegradBrownianInterval
from ...errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from ...sde import solve_sde
from .brownian import odegrad_view
from .methods import SERVED, default_adjoint_method, default_method, select_method
from .settings import METHODS, NOISE_TYPES, SDE_TYPES
from .terms import Terms, resolve_terms

__all__ = ["sdeint", "sdeint_adjoint"]


def sdeint(sde, y0: Tensor, ts, bm=None, method: str | None = None, dt=1e-3,
           adaptive: bool = False, rtol=1e-5, atol=1e-4, dt_min=1e-5, options: dict | None = None,
           names: dict | None = None, logqp: bool = False, extra: bool = False,
           extra_solver_state=None, **unused_kwargs):
    """torchsde.sdeint: ys of shape (T, batch, d), gradients by autograd through the steps.

    With logqp, (ys, log_ratio) where log_ratio (T − 1, batch) holds the KL path term over each
    output interval; with extra, also the solver's extra state at ts[-1] (reversible_heun:
    (f, g, z), differentiable; () for the other served methods); extra_solver_state: the state
    to start from (reversible_heun: (f, g, z) at ts[0])."""
    _no_unknown(unused_kwargs, "sdeint")
    _check_steps(dt, ts, rtol=rtol, atol=atol, dt_min=dt_min)
    terms, ts, bm = _contract(sde, y0, ts, bm, names, logqp)
    name, method_options = _select(method, terms, options, adaptive)
    method_options |= _start_state(name, extra_solver_state)
    solution = solve_sde(terms.f, terms.g, terms.y0, ts, bm, method=name, dt=float(dt),
                         sde_type=terms.sde_type, noise_type=terms.noise_type,
                         gradient="direct", params=(), **method_options)
    return _parse_return(solution.ys, logqp, extra, solution.stats.get("solver_state", ()))


def sdeint_adjoint(sde, y0: Tensor, ts, bm=None, method: str | None = None,
                   adjoint_method: str | None = None, dt=1e-3, adaptive: bool = False,
                   adjoint_adaptive: bool = False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4,
                   adjoint_atol=1e-4, dt_min=1e-5, options: dict | None = None,
                   adjoint_options: dict | None = None, adjoint_params=None,
                   names: dict | None = None, logqp: bool = False, extra: bool = False,
                   extra_solver_state=None, **unused_kwargs):
    """torchsde.sdeint_adjoint: the same outputs as sdeint, gradients w.r.t. y0 and
    adjoint_params (default: sde.parameters()) by the stochastic adjoint or, for
    reversible_heun with adjoint_reversible_heun, by odegrad's exact reversible gradient."""
    _no_unknown(unused_kwargs, "sdeint_adjoint")
    if adjoint_params is None and not isinstance(sde, nn.Module):
        raise InvalidInputError(
            "`sde` must be an instance of nn.Module to specify the adjoint parameters; "
            "alternatively they can be specified explicitly via the `adjoint_params` argument. "
            "If there are no parameters then it is allowable to set `adjoint_params=()`.")
    _check_steps(dt, ts, rtol=rtol, atol=atol, dt_min=dt_min,
                 adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol)
    if adjoint_adaptive:
        raise UnsupportedCombinationError(
            "adjoint_adaptive=True: odegrad's SDE solvers take fixed steps (the backward solve "
            "steps with the forward's dt); use adjoint_adaptive=False")
    terms, ts, bm = _contract(sde, y0, ts, bm, names, logqp)
    name, method_options = _select(method, terms, options, adaptive)
    chosen = method if method is not None else next(k for k, v in SERVED.items()
                                                    if v[0] == name)
    gradient, gradient_options = _adjoint_gradient(chosen, adjoint_method, adjoint_options,
                                                   terms)
    _check_adjoint_extra(name, gradient, extra, extra_solver_state)
    params = list(sde.parameters()) if adjoint_params is None else list(adjoint_params)
    params = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
    solution = solve_sde(terms.f, terms.g, terms.y0, ts, bm, method=name, dt=float(dt),
                         sde_type=terms.sde_type, noise_type=terms.noise_type,
                         gradient=gradient, params=params, **method_options,
                         **gradient_options)
    return _parse_return(solution.ys, logqp, extra, solution.stats.get("solver_state", ()))


# -- the pieces --------------------------------------------------------------------------------


def _no_unknown(unused: dict, where: str) -> None:
    if unused:
        raise UnknownNameError(
            f"`{where}`: unexpected arguments {sorted(unused)} (torchsde would only warn and "
            "ignore them)")


def _check_steps(dt, ts, **tolerances) -> None:
    """torchsde's checks of the step arguments: none may require grad, dt > 0."""
    for name, value in (("ts", ts), ("dt", dt), *tolerances.items()):
        if isinstance(value, Tensor) and value.requires_grad:
            raise InvalidInputError(f"Argument {name} must not require gradient.")
    value = float(dt)
    if not value > 0.0:
        raise InvalidInputError(f"dt must be positive, got {value}")


def _contract(sde, y0: Tensor, ts, bm, names: dict | None, logqp: bool):
    """(Terms, ts as a tensor of y0's dtype, the Brownian motion odegrad queries)."""
    if not isinstance(y0, Tensor):
        raise InvalidInputError("`y0` must be a torch.Tensor.")
    if not isinstance(ts, Tensor):
        if not isinstance(ts, (tuple, list)) or not all(
                isinstance(t, (float, int)) and not isinstance(t, bool) for t in ts):
            raise InvalidInputError(
                "Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
        ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or len(ts) < 2:
        raise InvalidInputError("Evaluation times `ts` must be 1-D with at least two times.")
    ts = ts.to(dtype=y0.dtype, device=y0.device)
    if not bool((ts[1:] > ts[:-1]).all()):
        raise InvalidInputError("Evaluation times `ts` must be strictly increasing.")
    bm_shape = None
    if bm is not None:
        if not hasattr(bm, "shape") or not callable(bm):
            raise InvalidInputError("bm must be a Brownian motion: bm(ta, tb) with .shape")
        bm_shape = tuple(bm.shape)
    terms: Terms = resolve_terms(sde, y0, ts[0], bm_shape, names, logqp)
    t0, t1 = float(ts[0]), float(ts[-1])
    if bm is None:
        # srk (Itô, not general noise; torchsde's default there) reads the space-time Lévy area
        srk = terms.sde_type == SDE_TYPES.ito and terms.noise_type != NOISE_TYPES.general
        view = OdegradBrownianInterval(t0, t1, (y0.shape[0], terms.brownian_size),
                                       dtype=y0.dtype, device=y0.device,
                                       levy_area="space-time" if srk else "none")
    else:
        view = odegrad_view(bm, t0, t1)
    return terms, ts, view


def _select(method: str | None, terms: Terms, options: dict | None,
            adaptive: bool) -> tuple[str, dict]:
    """select_method, with torchsde's warning about adaptive Euler–Maruyama first (torchsde
    emits it before it checks the method against the SDE), then adaptive refused."""
    requested = default_method(terms.sde_type, terms.noise_type) if method is None else method
    if adaptive and requested == METHODS.euler and terms.noise_type != NOISE_TYPES.additive:
        warnings.warn("Numerical solution is not guaranteed to converge to the correct solution "
                      "when using adaptive time-stepping with the Euler--Maruyama method with "
                      "non-additive noise.", stacklevel=3)
    selected = select_method(method, terms.sde_type, terms.noise_type, options)
    _refuse_adaptive(adaptive)
    return selected


def _refuse_adaptive(adaptive: bool) -> None:
    """Fixed steps only (rtol, atol, dt_min and the adjoint ones are read by adaptive stepping
    alone in torchsde, so with adaptive=False they have no effect there either)."""
    if adaptive:
        raise UnsupportedCombinationError(
            "adaptive=True: odegrad's SDE solvers take fixed steps dt (no adaptive stepping); "
            "use adaptive=False and choose dt")


def _start_state(name: str, extra_solver_state) -> dict:
    """reversible_heun's starting state (f, g, z) as odegrad's option solver_state=; the other
    methods keep none, so theirs must be empty."""
    if extra_solver_state is None:
        return {}
    state = tuple(extra_solver_state)
    if name == "reversible_heun":
        return {"solver_state": state}
    if len(state) != 0:
        raise InvalidInputError(
            f"extra_solver_state: method {name!r} keeps no extra state; pass () or None")
    return {}


def _check_adjoint_extra(name: str, gradient: str, extra: bool, extra_solver_state) -> None:
    """Under sdeint_adjoint, reversible_heun's (f, g, z) neither starts a solve (odegrad's
    adjoint gradients differentiate y0 through z_0 = y0) nor comes back with a gradient (their
    forward keeps no graph): refused, except extra=True under torch.no_grad()."""
    if name == "reversible_heun" and extra_solver_state is not None:
        raise UnsupportedCombinationError(
            "extra_solver_state= with method='reversible_heun' under sdeint_adjoint: odegrad's "
            f"adjoint gradient (gradient={gradient!r}) starts from z_0 = y0; use sdeint (autograd "
            "through the steps, which serves it) or drop extra_solver_state")
    if name == "reversible_heun" and extra and torch.is_grad_enabled():
        raise UnsupportedCombinationError(
            "extra=True with method='reversible_heun' under sdeint_adjoint: odegrad's adjoint "
            f"gradient (gradient={gradient!r}) keeps no graph for the final (f, g, z), so a "
            "gradient through them would be missing; use sdeint, or call under torch.no_grad()")
    _start_state(name, extra_solver_state)


def _adjoint_gradient(method: str, adjoint_method: str | None, adjoint_options: dict | None,
                      terms: Terms) -> tuple[str, dict]:
    """odegrad's gradient and its options for torchsde's method and adjoint_method (None:
    torchsde's default, except for Itô SDEs, below)."""
    if adjoint_method is None:
        adjoint_method = default_adjoint_method(method, terms.sde_type, terms.noise_type)
        if terms.sde_type == SDE_TYPES.ito and adjoint_method != METHODS.adjoint_reversible_heun:
            # odegrad integrates the Stratonovich form of the adjoint, torchsde the Itô one
            # (default milstein or euler): the Stratonovich default instead.
            adjoint_method = METHODS.midpoint
    if adjoint_method not in METHODS:
        raise UnknownNameError(f"Expected adjoint_method in {METHODS}, but found "
                               f"{adjoint_method}.")
    if adjoint_options:
        raise UnknownNameError(
            f"adjoint_options {sorted(adjoint_options)}: odegrad's adjoint schemes take no "
            f"options (only milstein's grad_free exists in torchsde, and odegrad's stochastic "
            f"adjoint does not integrate with milstein)")
    if adjoint_method == METHODS.adjoint_reversible_heun:
        if method != METHODS.reversible_heun:
            raise UnsupportedCombinationError(
                f"adjoint_method='adjoint_reversible_heun' reverses the reversible Heun scheme: "
                f"it needs method='reversible_heun', not {method!r}")
        return "reversible", {}
    if method == METHODS.reversible_heun:
        warnings.warn(f"method={method!r}, but adjoint_method!="
                      f"{METHODS.adjoint_reversible_heun!r}.", stacklevel=3)
    served = {k: v for k, v in SERVED.items() if v[1] == SDE_TYPES.stratonovich}
    if adjoint_method not in served:
        which = ("an Itô SDE is converted to Stratonovich form for the backward pass, so "
                 if terms.sde_type == SDE_TYPES.ito else "")
        raise UnsupportedCombinationError(
            f"adjoint_method={adjoint_method!r} cannot integrate odegrad's stochastic adjoint "
            f"SDE ({which}it needs a Stratonovich scheme that uses g only through g·ΔW); use "
            f"one of {sorted(served)}, or omit adjoint_method (midpoint)")
    return "backsolve", {"adjoint_method": served[adjoint_method][0]}


def _parse_return(ys: Tensor, logqp: bool, extra: bool, extra_state):
    """torchsde's return value: ys, (ys, log_ratio), with the extra state appended if asked."""
    out: tuple = (ys,)
    if logqp:
        path_term = ys[..., -1]
        out = (ys[..., :-1], path_term[1:] - path_term[:-1])
    if extra:
        out = (*out, extra_state)
    return out[0] if len(out) == 1 else out

