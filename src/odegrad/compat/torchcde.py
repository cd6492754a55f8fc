"""torchcde 0.2.5's common path, served by odegrad: `import odegrad.compat.torchcde as torchcde`.

Served with torchcde's signatures, coefficient layouts and defaults:
    cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs): the solve through
        odegrad.compat.torchdiffeq (adjoint=True: its odeint_adjoint, odegrad's backsolve with
        torchdiffeq's adjoint defaults; adjoint=False: its odeint, odegrad's direct), with
        torchcde's defaults rtol=1e-4, atol=1e-6 (and the adjoint's equal to them); every other
        keyword (method, options, adjoint_*) is torchdiffeq's, honoured or refused by name. The
        output is (..., len(t), hidden), as torchcde's. func may define `prod(t, z, dXdt)`; z0
        may be a tuple (X.derivative and func then return tuples).
    linear_interpolation_coeffs (with rectilinear=), LinearInterpolation,
    hermite_cubic_coefficients_with_backward_differences, natural_cubic_coeffs,
    natural_cubic_spline_coeffs (the deprecated end imputation), CubicSpline: coefficients and
        evaluations equal torchcde's (tests/test_compat_torchcde.py), computed batched by
        odegrad.paths.
Refused: backend="torchsde" (an SDE solver for an ODE), the log-ODE method and TupleControl
(AttributeError naming them), and, with adjoint=True, a control path whose tensors require grad
while adjoint_params is not given (torchcde warns and gives them no gradient; here that is an
error: pass them in adjoint_params, or use odegrad.cdeint, which differentiates them).
A difference: odegrad's cdeint steps onto the knots; this one, like torchcde, solves where the
solver chooses (give options=dict(jump_t=...) or step_t as you would to torchcde).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..paths import CubicPath, LinearPath
from ..paths import rectilinear as _rectilinear
from ..paths.cubic import hermite_coefficients, natural_spline_coefficients
from ..paths.filling import interpolated_fill, validate_observations
from . import torchdiffeq as _torchdiffeq

__all__ = ["cdeint", "linear_interpolation_coeffs", "LinearInterpolation",
           "hermite_cubic_coefficients_with_backward_differences", "natural_cubic_coeffs",
           "natural_cubic_spline_coeffs", "CubicSpline"]

__version__ = "0.2.5"  # the torchcde release whose behaviour this module reproduces

_MISSING = {
    "logsignature_windows": "the log-ODE method is not served; interpolate the data with "
                            "hermite_cubic_coefficients_with_backward_differences instead",
    "logsig_windows": "the log-ODE method is not served; interpolate the data with "
                      "hermite_cubic_coefficients_with_backward_differences instead",
    "TupleControl": "batch the channels of several controls into one path instead",
    "NaturalCubicSpline": "use CubicSpline (torchcde's replacement for it)",
    "InterpolationBase": "subclass torch.nn.Module with evaluate/derivative methods",
}


def __getattr__(name: str):
    if name in _MISSING:
        raise AttributeError(
            f"odegrad.compat.torchcde does not provide torchcde.{name}: {_MISSING[name]}")
    raise AttributeError(
        f"odegrad.compat.torchcde has no attribute {name!r}; it serves {', '.join(__all__)}")


def _default_grid(length: int, like: Tensor) -> Tensor:
    return torch.linspace(0, length - 1, length, dtype=like.dtype, device=like.device)


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None,
                                rectilinear: int | None = None) -> Tensor:
    """torchcde.linear_interpolation_coeffs: the filled values (..., length, channels); with
    rectilinear=<time channel>, the (..., 2·length − 1, channels) lagged values."""
    if rectilinear is not None:
        if bool(torch.isnan(x[..., 0, :]).any()):
            warnings.warn("The data `x` begins with missing values in some channels: the "
                          "rectilinear path backward-fills the first observation there, which "
                          "is not causal (as torchcde does).", stacklevel=2)
        x = _rectilinear(None, x, time_channel=rectilinear).values
    t, x = validate_observations(t, x)
    return interpolated_fill(t, x)


def hermite_cubic_coefficients_with_backward_differences(x: Tensor,
                                                         t: Tensor | None = None) -> Tensor:
    """torchcde's Hermite cubic coefficients: cat([a, b, 2c, 3d], -1), (..., length−1, 4C)."""
    t, x = validate_observations(t, x)
    return torch.cat(hermite_coefficients(t, interpolated_fill(t, x)), dim=-1)


def natural_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """torchcde.natural_cubic_coeffs (missing ends filled with the first/last observation)."""
    t, x = validate_observations(t, x)
    return torch.cat(natural_spline_coefficients(t, x, fill_ends=True), dim=-1)


def natural_cubic_spline_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """torchcde.natural_cubic_spline_coeffs (deprecated there: only the end values imputed)."""
    t, x = validate_observations(t, x)
    return torch.cat(natural_spline_coefficients(t, x, fill_ends=False), dim=-1)


class _Interpolation(torch.nn.Module):
    """A torchcde interpolation module around an odegrad path."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.register_buffer("_t", path.knots)

    @property
    def grid_points(self) -> Tensor:
        return self.path.knots

    @property
    def interval(self) -> Tensor:
        return torch.stack(list(self.path.interval))

    def evaluate(self, t) -> Tensor:
        return self.path.evaluate(t)

    def derivative(self, t) -> Tensor:
        return self.path.derivative(t)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.path = self.path.to(device=self._t.device, dtype=self._t.dtype)  # follow moves
        return module


class LinearInterpolation(_Interpolation):
    """torchcde.LinearInterpolation(coeffs, t=None)."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs):
        if t is None:
            t = _default_grid(coeffs.size(-2), coeffs)
        super().__init__(LinearPath(t, coeffs), **kwargs)
        self.register_buffer("_coeffs", coeffs)


class CubicSpline(_Interpolation):
    """torchcde.CubicSpline(coeffs, t=None), coeffs = cat([a, b, 2c, 3d], -1)."""

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs):
        if t is None:
            t = _default_grid(coeffs.size(-2) + 1, coeffs)
        channels = coeffs.size(-1) // 4
        if channels * 4 != coeffs.size(-1):
            raise ValueError("Passed invalid coeffs.")
        super().__init__(CubicPath(t, *coeffs.split(channels, dim=-1)), **kwargs)
        self.register_buffer("_coeffs", coeffs)


class _ControlledField(torch.nn.Module):
    """f(t, z) · dX/dt(t) (or func.prod(t, z, dX/dt)), for tensors or tuples of them."""

    def __init__(self, X, func):
        super().__init__()
        self.X, self.func = X, func

    def forward(self, t, z):
        control = self.X.derivative(t)
        if hasattr(self.func, "prod"):
            return self.func.prod(t, z, control)
        matrix = self.func(t, z)
        if isinstance(z, Tensor):
            return (matrix @ control.unsqueeze(-1)).squeeze(-1)
        return tuple((m @ c.unsqueeze(-1)).squeeze(-1) for m, c in zip(matrix, control))


def _check(X, func, z0, t) -> None:
    if not hasattr(X, "derivative"):
        raise ValueError("X must have a 'derivative' method.")
    control = X.derivative(t[0].detach())
    parts = [z0] if isinstance(z0, Tensor) else list(z0)
    controls = [control] if isinstance(z0, Tensor) else list(control)
    if len(parts) != len(controls):
        raise ValueError("z0 and X.derivative(t) must be tuples of the same length.")
    if hasattr(func, "prod"):
        return
    out = func(t[0], z0)
    outs = [out] if isinstance(z0, Tensor) else list(out)
    for z, c, m in zip(parts, controls, outs):
        if not isinstance(m, Tensor) or m.dim() < 2 or m.shape[-2:] != (z.shape[-1], c.shape[-1]):
            raise ValueError(
                f"func returned shape {tuple(getattr(m, 'shape', ()))}; it must return (..., "
                f"hidden_channels={z.shape[-1]}, input_channels={c.shape[-1]})")


def cdeint(X, func, z0, t, adjoint: bool = True, backend: str = "torchdiffeq", **kwargs):
    """torchcde.cdeint: z at every time in t, shape (..., len(t), hidden) (module docstring)."""
    if backend == "torchsde":
        raise InvalidInputError(
            "backend='torchsde' is not served by odegrad.compat.torchcde (it solves the CDE "
            "with an SDE solver and no noise); use backend='torchdiffeq'")
    if backend != "torchdiffeq":
        raise ValueError(f"Unrecognised backend={backend}")
    kwargs.setdefault("atol", 1e-6)
    kwargs.setdefault("rtol", 1e-4)
    if adjoint:
        kwargs.setdefault("adjoint_atol", kwargs["atol"])
        kwargs.setdefault("adjoint_rtol", kwargs["rtol"])
    _check(X, func, z0, t)
    if adjoint and "adjoint_params" not in kwargs and isinstance(X, torch.nn.Module):
        if any(b.requires_grad for b in X.buffers()) or any(
                p.requires_grad for p in X.parameters()):
            raise InvalidInputError(
                "a tensor of the control path X requires grad but adjoint_params is not given: "
                "torchcde would warn and give it no gradient. Pass adjoint_params="
                "tuple(func.parameters()) + (coeffs,), or use adjoint=False")
    field = _ControlledField(X, func)
    solve = _torchdiffeq.odeint_adjoint if adjoint else _torchdiffeq.odeint
    out = solve(field, z0, t, **kwargs)
    if isinstance(z0, Tensor):
        return out.permute(*range(1, out.dim() - 1), 0, -1)
    return tuple(o.permute(*range(1, o.dim() - 1), 0, -1) for o in out)
