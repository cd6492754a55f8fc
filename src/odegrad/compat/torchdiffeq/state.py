"""The state and times as torchdiffeq takes them (tuples, other dtypes), flattened for odegrad,
and the wrappers of f the solves use."""

from __future__ import annotations

import warnings

import torch

from ...errors import InvalidInputError


def _check_t(t, y0):
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(
            f"t must be a torch.Tensor (torchdiffeq asserts it), got {type(t).__name__}"
        )
    if not torch.is_floating_point(t):
        raise TypeError(f"`t` must be a floating point Tensor but is a {t.type()}")
    if t.dim() != 1:
        raise InvalidInputError(f"t must be one dimensional, got shape {tuple(t.shape)}")
    if t.device != y0.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.", stacklevel=4)
        t = t.to(y0.device)
    return t


def _flatten_state(y0):
    if isinstance(y0, torch.Tensor):
        return y0, None
    if not isinstance(y0, tuple):
        raise InvalidInputError(
            f"y0 must be either a torch.Tensor or a tuple (as in torchdiffeq), got "
            f"{type(y0).__name__}"
        )
    if not y0:
        raise InvalidInputError("y0 is an empty tuple")
    for k, part in enumerate(y0):
        if not isinstance(part, torch.Tensor):
            raise InvalidInputError(f"y0[{k}] must be a torch.Tensor, got {type(part).__name__}")
    shapes = [part.shape for part in y0]
    return torch.cat([part.reshape(-1) for part in y0]), shapes


def _unflatten(x, shapes, lead=()):
    parts, start = [], 0
    for shape in shapes:
        size = shape.numel()
        parts.append(x[..., start:start + size].view((*lead, *shape)))
        start += size
    return tuple(parts)


def _merge(t, t_y, cuts):
    """The output times and the cut times in order, as (value, tensor) pairs, and where each
    output time lies among them."""
    values = t.detach().cpu().tolist()
    direction = 1.0 if values[-1] > values[0] else -1.0
    merged = {v: t_y[i] for i, v in enumerate(values)}
    for v in cuts:
        merged.setdefault(v, torch.tensor(v, dtype=t_y.dtype, device=t_y.device))
    order = sorted(merged, key=lambda v: direction * v)
    position = {v: i for i, v in enumerate(order)}
    return [(v, merged[v]) for v in order], [position[v] for v in values]


def _strict(values) -> list[int]:
    """Indices of grid points that move on from the one before (zero-length steps removed)."""
    if len(values) < 2:
        return list(range(len(values)))
    direction = 1.0 if values[-1] > values[0] else -1.0
    keep = [0]
    for i in range(1, len(values)):
        if i == len(values) - 1:
            while len(keep) > 1 and direction * (values[i] - values[keep[-1]]) <= 0:
                keep.pop()
            keep.append(i)
        elif direction * (values[i] - values[keep[-1]]) > 0:
            keep.append(i)
    return keep


def _longest(ts) -> float:
    """The longest interval between consecutive times: a step size that takes one step each."""
    ts = ts.detach()
    return float((ts[1:] - ts[:-1]).abs().max()) if len(ts) > 1 else 1.0


def _mixed_norm(parts):
    """torchdiffeq's default norm on a tuple state: the max over the tensors of their RMS."""
    return max(part.abs().pow(2).mean().sqrt() for part in parts)


class _TupleNorm:
    """A norm of the tuple state, applied to odegrad's flat state."""

    def __init__(self, norm, shapes):
        self.norm, self.shapes = norm, shapes

    def __call__(self, x):
        value = self.norm(_unflatten(x, self.shapes))
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class _Flat:
    """func on odegrad's flat state (a tuple state is unflattened for it). A plain callable,
    not an nn.Module, so that odegrad leaves f's buffers alone as torchdiffeq does. `frozen`:
    parameters that do not require grad while func runs (those not in adjoint_params)."""

    def __init__(self, func, shapes):
        self.func, self.shapes, self.frozen = func, shapes, ()

    def __call__(self, t, y):
        if not self.frozen:
            return self._call(t, y)
        for p in self.frozen:
            p.requires_grad_(False)
        try:
            return self._call(t, y)
        finally:
            for p in self.frozen:
                p.requires_grad_(True)

    def _call(self, t, y):
        if self.shapes is None:
            return self.func(t, y)
        out = self.func(t, _unflatten(y, self.shapes))
        return torch.cat([part.reshape(-1) for part in out])


class _Nudged:
    """f with its time moved one ulp into the interval [start, end] at the ends named (what
    torchdiffeq's Perturb.NEXT does after a grid point or a jump, Perturb.PREV before one)."""

    def __init__(self, f, start, end, at_start, at_end):
        self.f = f
        self.points = []
        for point, other, wanted in ((start, end, at_start), (end, start, at_end)):
            if wanted:
                point, other = point.detach(), other.detach()
                tol = 8 * torch.finfo(point.dtype).eps * max(abs(float(point)), 1e-30)
                self.points.append((float(point), tol, torch.nextafter(point, other)))

    def __call__(self, t, y):
        value = float(t.detach())
        for point, tol, nudged in self.points:
            if abs(value - point) <= tol:
                t = t + (nudged - t).detach()
                break
        return self.f(t, y)
