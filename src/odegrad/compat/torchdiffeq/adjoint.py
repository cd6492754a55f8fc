"""odeint_adjoint: torchdiffeq's continuous adjoint as odegrad's gradient="backsolve", and the
translation of its adjoint keywords and adjoint_options into backsolve's options."""

from __future__ import annotations

import torch

from ...errors import InvalidInputError
from .methods import resolve
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
    adjoint = adjoint_settings(
        problem,
        rtol if adjoint_rtol is None else adjoint_rtol,
        atol if adjoint_atol is None else adjoint_atol,
        adjoint_method, dict(adjoint_options),
    )
    return problem.unflatten(problem.solve("backsolve", dict(adjoint, params=params)))


def adjoint_settings(problem, rtol, atol, method, options) -> dict:
    """odegrad's backsolve options for torchdiffeq's adjoint keywords and options."""
    name = "dopri5" if method is None else method
    cls, family, og_method, fixed_mode = resolve(name, "adjoint_method")
    norm = options.pop("norm", None)
    options = _sort_options(cls, family, options, "adjoint_options")
    _check_callbacks(problem.user_func, name, family, "_adjoint")
    settings = {"adjoint_rtol": _tolerance(rtol, problem.shapes, "adjoint_rtol"),
                "adjoint_atol": _tolerance(atol, problem.shapes, "adjoint_atol")}
    if fixed_mode and (og_method != problem.og_method or not problem.fixed_mode):
        raise InvalidInputError(
            f"adjoint_method={name!r} with method={problem.name!r}: odegrad's backward solve "
            f"cannot run {og_method!r} with fixed steps unless the forward does"
        )
    if og_method != problem.og_method or fixed_mode != problem.fixed_mode:
        settings["adjoint_method"] = og_method
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
    _check_controller(options, problem.y0, "adjoint_options")
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
