"""torchdiffeq's `odeint` and `odeint_adjoint`, served by odegrad.

`import odegrad.compat.torchdiffeq as torchdiffeq` replaces the library in existing code: same
signatures, method names and option names (step_size, first_step, max_num_steps, norm, ...).
"""

from __future__ import annotations

import torch

from ..api import odeint as _odeint
from ..errors import InvalidInputError
from ..gradients import available_gradients

__all__ = ["odeint", "odeint_adjoint"]

_OPTION_NAMES = {
    "step_size": "step_size",
    "first_step": "first_step",
    "max_num_steps": "max_steps",
    "norm": "norm",
}
_IGNORED_OPTIONS = ("dtype", "perturb", "interp", "safety", "ifactor", "dfactor",
                    "grid_constructor", "step_t", "jump_t")


def _translate(options: dict | None) -> dict:
    kwargs = {}
    for name, value in (options or {}).items():
        if name in _OPTION_NAMES:
            kwargs[_OPTION_NAMES[name]] = value
        elif name in _IGNORED_OPTIONS:
            continue
        else:
            raise InvalidInputError(
                f"torchdiffeq option {name!r} is not supported by odegrad; supported: "
                f"{', '.join(_OPTION_NAMES)}"
            )
    if kwargs.get("norm") == "seminorm":
        kwargs.pop("norm")
    return kwargs


def _times(t, y0):
    reference = y0[0] if isinstance(y0, (tuple, list)) else y0
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.to(dtype=reference.dtype, device=reference.device)


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq.odeint: backpropagation through the solver (gradient="direct")."""
    if event_fn is not None:
        raise InvalidInputError("event_fn is not supported by odegrad")
    kwargs = _translate(options)
    return _odeint(func, y0, _times(t, y0), method=method or "dopri5", rtol=rtol, atol=atol,
                   gradient="direct", **kwargs)


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None,
                   event_fn=None, adjoint_rtol=None, adjoint_atol=None, adjoint_method=None,
                   adjoint_options=None, adjoint_params=None):
    """torchdiffeq.odeint_adjoint: the continuous adjoint (gradient="backsolve", seminorm by
    default as adjoint_options=dict(norm="seminorm") asks) when it is available; otherwise the
    exact discrete adjoint (gradient="discrete") with its default checkpoints."""
    if event_fn is not None:
        raise InvalidInputError("event_fn is not supported by odegrad")
    kwargs = _translate(options)
    params = adjoint_params
    if params is None and isinstance(func, torch.nn.Module):
        params = tuple(func.parameters())
    gradients = available_gradients()
    if "backsolve" in gradients:
        norm = (adjoint_options or {}).get("norm", "seminorm")
        kwargs.update(
            adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
            adjoint_atol=atol if adjoint_atol is None else adjoint_atol,
            adjoint_norm="seminorm" if norm == "seminorm" else "full",
        )
        if adjoint_method is not None:
            kwargs["adjoint_method"] = adjoint_method
        gradient = "backsolve"
    elif "discrete" in gradients:
        gradient = "discrete"
    else:
        gradient = "direct"
    return _odeint(func, y0, _times(t, y0), method=method or "dopri5", rtol=rtol, atol=atol,
                   gradient=gradient, params=params, **kwargs)
