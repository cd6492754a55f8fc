"""Observations to knot values: input validation and the filling of missing values (NaN).

Rules (those of torchcde, so that coefficients agree with it):
- interpolated fill (linear, Hermite cubic): a missing value lies on the straight line between
  the channel's neighbouring observations; before the first observation the channel holds the
  first observed value, after the last one the last observed value;
- forward fill (rectilinear): a missing value repeats the last observation (before the first
  one, the first observation);
- a channel with no observation at all is the constant 0.
Per-series lengths: pad the shorter series with NaN at the end; the path then holds each
channel's last observation after the series ends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["validate_observations", "interpolated_fill", "forward_fill"]


def validate_observations(t: Tensor | None, data: Tensor) -> tuple[Tensor, Tensor]:
    """Check data (..., length, channels) and times t (length,) (None: 0, 1, ..., length−1)."""
    if not isinstance(data, Tensor):
        raise InvalidInputError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if not data.is_floating_point():
        raise InvalidInputError(f"data must be floating point, got dtype {data.dtype}")
    if data.dim() < 2:
        raise InvalidInputError(
            f"data must be (..., length, channels), got shape {tuple(data.shape)}")
    length = data.shape[-2]
    if length < 2:
        raise InvalidInputError(f"a path needs at least 2 observation times, got {length}")
    if data.shape[-1] == 0:
        raise InvalidInputError("data has 0 channels")
    if t is None:
        t = torch.arange(length, dtype=data.dtype, device=data.device)
    elif not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=data.dtype, device=data.device)
    if t.dim() != 1 or len(t) != length:
        raise InvalidInputError(
            f"t must be 1-D with one time per observation ({length}, data's dim −2), got shape "
            f"{tuple(t.shape)}")
    if t.dtype != data.dtype or t.device != data.device:
        raise InvalidInputError(
            f"t has dtype {t.dtype} on {t.device} but data has dtype {data.dtype} on "
            f"{data.device}; pass t.to(data)")
    values = t.detach()
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError("t holds non-finite values; times must be observed (NaN is for "
                                "missing data values only)")
    if not bool((values[1:] > values[:-1]).all()):
        i = int((values[1:] <= values[:-1]).nonzero()[0])
        raise InvalidInputError(
            f"t must be strictly increasing: t[{i}]={float(values[i]):.10g}, "
            f"t[{i + 1}]={float(values[i + 1]):.10g}")
    if bool(torch.isinf(data).any()):
        raise InvalidInputError("data holds inf; missing values are NaN")
    return t, data


def _neighbour_indices(observed: Tensor) -> tuple[Tensor, Tensor]:
    """For each position along dim −2, the index of the last observation at or before it (−1 if
    none) and of the first at or after it (length if none)."""
    length = observed.shape[-2]
    index = torch.arange(length, device=observed.device).view(length, 1).expand_as(observed)
    previous = torch.where(observed, index, -1).cummax(dim=-2).values
    following = torch.where(observed, index, length).flip(-2).cummin(dim=-2).values.flip(-2)
    return previous, following


def interpolated_fill(t: Tensor, data: Tensor) -> Tensor:
    """Fill NaNs on the line between neighbouring observations, constant before the first and
    after the last (module docstring); differentiable w.r.t. the observed values."""
    observed = ~torch.isnan(data)
    if bool(observed.all()):
        return data
    length = data.shape[-2]
    clean = torch.where(observed, data, torch.zeros((), dtype=data.dtype, device=data.device))
    previous, following = _neighbour_indices(observed)
    none = previous.eq(-1) & following.eq(length)  # a channel without observations
    lo = torch.where(previous.eq(-1), following, previous).clamp(0, length - 1)
    hi = torch.where(following.eq(length), previous, following).clamp(0, length - 1)
    x_lo, x_hi = clean.gather(-2, lo), clean.gather(-2, hi)
    t_lo, t_hi = t[lo], t[hi]
    between = lo.ne(hi)
    ratio = torch.where(between, t.view(length, 1) - t_lo, torch.zeros_like(t_lo)) / torch.where(
        between, t_hi - t_lo, torch.ones_like(t_lo))
    filled = x_lo + ratio * (x_hi - x_lo)
    filled = torch.where(none, torch.zeros_like(filled), filled)
    return torch.where(observed, data, filled)


def forward_fill(data: Tensor) -> Tensor:
    """Fill NaNs with the last observation (the first one before it; 0 for a channel never
    observed)."""
    observed = ~torch.isnan(data)
    if bool(observed.all()):
        return data
    length = data.shape[-2]
    clean = torch.where(observed, data, torch.zeros((), dtype=data.dtype, device=data.device))
    previous, following = _neighbour_indices(observed)
    source = torch.where(previous.eq(-1), following, previous).clamp(0, length - 1)
    filled = clean.gather(-2, source)
    none = previous.eq(-1) & following.eq(length)
    return torch.where(none, torch.zeros_like(filled), filled)
