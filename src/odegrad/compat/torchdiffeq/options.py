"""torchdiffeq 0.2.5's keywords and options: their names, defaults and validation."""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from ...errors import InvalidInputError

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

# The defaults of torchdiffeq's step-size controller, which odegrad's solve shares (its options
# of the same names).
_CONTROLLER_DEFAULTS = {"min_step": 0.0, "max_step": math.inf, "safety": 0.9, "ifactor": 10.0,
                        "dfactor": 0.2}
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_VALID_CALLBACKS = {"fixed": {"callback_step"}, "adams": {"callback_step"},
                    "adaptive": set(_CALLBACKS), "scipy": set()}


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


def _check_controller(options, y0, where, backward=False) -> dict:
    """The step-size controller settings among `options`, as odegrad's solve takes them (its
    options of the same names and meaning: min_step, max_step, safety, ifactor, dfactor; their
    values are checked there). For the backward solve (`backward`), only torchdiffeq's defaults
    are accepted: odegrad's continuous adjoint runs its own controller with those."""
    control = {key: options[key] for key in _CONTROLLER_DEFAULTS if key in options}
    if backward:
        for key, value in control.items():
            if _number(value) != _CONTROLLER_DEFAULTS[key]:
                raise InvalidInputError(
                    f"{where}[{key!r}]={value!r} is not supported: odegrad's backward "
                    f"(adjoint) solve has no {key} setting and uses torchdiffeq's default "
                    f"{key}={_CONTROLLER_DEFAULTS[key]}; adjoint_options default to options, "
                    f"so pass adjoint_options without {key} (the forward solve honours it)"
                )
        control = {}
    if "dtype" in options:
        dtype = options["dtype"]
        real = y0.abs().dtype if y0.is_complex() else y0.dtype
        if not isinstance(dtype, torch.dtype) or torch.promote_types(dtype, real) != torch.float64:
            raise InvalidInputError(
                f"{where}['dtype']={dtype!r} asks for time arithmetic in "
                f"{torch.promote_types(dtype, real) if isinstance(dtype, torch.dtype) else dtype}:"
                " odegrad keeps step times in float64 (torchdiffeq's default dtype)"
            )
    return control


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


def _positive(value, name) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}") from None
    if not number > 0:
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}")
    return number


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
    """Step callbacks: returns the names (without suffix) of those torchdiffeq's solver would
    call; the others are ignored with torchdiffeq's warning. The adjoint variants (suffix
    "_adjoint") are those the backward solve of odeint_adjoint calls (adjoint.AdjointCallbacks);
    torchdiffeq warns about them when the backward pass runs, the shim when it is set up."""
    present = {name for name in _CALLBACKS if hasattr(func, name + suffix)}
    callable_here = present & _VALID_CALLBACKS[family]
    invalid = present - _VALID_CALLBACKS[family]
    if invalid:
        warnings.warn(f"Solver '{method}' does not support callbacks {invalid}", stacklevel=4)
    return callable_here
