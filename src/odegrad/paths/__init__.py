"""Control paths for neural CDEs, built from (irregular, partially observed) observations.

    X = odegrad.paths.hermite_cubic(t, data)   # data (..., length, channels), t (length,) or None
    X.evaluate(t), X.derivative(t), X.knots, X.interval, X.tensors()

| constructor | smoothness | causal | knots |
|---|---|---|---|
| `linear` | C0 (dX/dt jumps at knots) | up to one observation | t |
| `rectilinear` | C0 | yes (time moves, then values) | t and the midpoints |
| `hermite_cubic` | C1 (torchcde's recommended one) | up to one observation | t |
| `natural_cubic` | C2 | no | t |

Missing values are NaN (filling.py: interpolated fill for linear and Hermite, forward fill for
rectilinear, the spline through each channel's observations for natural cubic); series of
different lengths are padded with NaN at the end. Coefficients are computed once, batched, in
data's dtype and on its device, and are differentiable w.r.t. the data (ALGORITHMS.md §12).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import CubicPath, LinearPath, Path
from .cubic import hermite_coefficients, natural_spline_coefficients
from .filling import forward_fill, interpolated_fill, validate_observations

__all__ = ["Path", "LinearPath", "CubicPath", "linear", "rectilinear", "hermite_cubic",
           "natural_cubic", "KINDS"]


def linear(t: Tensor | None, data: Tensor) -> LinearPath:
    """Linear interpolation of the observations (NaNs: on the line between neighbours)."""
    t, data = validate_observations(t, data)
    return LinearPath(t, interpolated_fill(t, data))


def rectilinear(t: Tensor | None, data: Tensor, time_channel: int | None = None) -> LinearPath:
    """Rectilinear interpolation (causal, for online use): from observation k to k+1 the time
    channel moves first, from t_k to t_{k+1} with the values held at x_k, then the values move
    to x_{k+1} with time held (Morrill et al. 2021). NaNs are forward filled.

    The path's parameter is real time: the time moves on [t_k, (t_k + t_{k+1})/2], the values on
    [(t_k + t_{k+1})/2, t_{k+1}], so X(t_k) = (t_k, x_k) and a CDE's state at t_k depends on the
    observations up to k only (the solution is invariant under this reparametrisation, so it
    equals torchcde's at its knot 2k). `time_channel=None` prepends t as channel 0 (the path
    has channels + 1 channels); an int names the channel of data that holds the time (no NaN).
    """
    t, data = validate_observations(t, data)
    if time_channel is None:
        data = torch.cat([t.view(-1, 1).expand(*data.shape[:-1], 1), data], dim=-1)
        time_channel = 0
    if isinstance(time_channel, bool) or not isinstance(time_channel, int) or not (
            -data.shape[-1] <= time_channel < data.shape[-1]):
        raise InvalidInputError(
            f"time_channel must be None or a channel index of data (channels: "
            f"{data.shape[-1]}), got {time_channel!r}")
    time_channel %= data.shape[-1]
    if bool(torch.isnan(data[..., time_channel]).any()):
        raise InvalidInputError(
            f"data's time channel {time_channel} holds NaN: times must be observed (pad the end "
            "of a shorter series with its final time)")
    filled = forward_fill(data)
    doubled = filled.repeat_interleave(2, dim=-2)
    time = doubled[..., time_channel]
    lagged = torch.cat([time[..., 1:], time[..., -1:]], dim=-1)  # (t_{k+1}, x_k) at row 2k+1
    doubled = torch.cat([doubled[..., :time_channel], lagged.unsqueeze(-1),
                         doubled[..., time_channel:][..., 1:]], dim=-1)
    midpoints = (t[:-1] + t[1:]) / 2
    knots = torch.stack([t[:-1], midpoints], dim=-1).reshape(-1)
    return LinearPath(torch.cat([knots, t[-1:]]), doubled[..., :-1, :])


def hermite_cubic(t: Tensor | None, data: Tensor) -> CubicPath:
    """Hermite cubic with backward differences (C1; cubic.py); NaNs filled as for `linear`."""
    t, data = validate_observations(t, data)
    return CubicPath(t, *hermite_coefficients(t, interpolated_fill(t, data)))


def natural_cubic(t: Tensor | None, data: Tensor) -> CubicPath:
    """Natural cubic spline (C2, not causal; cubic.py): through each channel's observations,
    constant at the first/last observation before/after them."""
    t, data = validate_observations(t, data)
    return CubicPath(t, *natural_spline_coefficients(t, data, fill_ends=True))


KINDS = {"linear": linear, "rectilinear": rectilinear, "hermite_cubic": hermite_cubic,
         "natural_cubic": natural_cubic}
