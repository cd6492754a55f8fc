"""Control paths: piecewise polynomials on knots, evaluated and differentiated analytically.

A path X: [t_0, t_{L-1}] → R^C is stored per piece [t_k, t_{k+1}] (Kidger et al. 2020, §3;
ALGORITHMS.md §12). Every tensor is batched as (..., pieces or knots, channels). A time exactly
on an interior knot t_k reads the piece on its left, [t_{k-1}, t_k] (torchcde's convention;
only the derivative of a linear path depends on it, and `odegrad.cdeint` never evaluates there
on the wrong side); times outside the knots read the first or last piece, extended.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["Path", "LinearPath", "CubicPath"]


class Path:
    """A control path built from observations; see `odegrad.paths` for the constructors."""

    _tensor_names: tuple[str, ...] = ("_knots",)
    #: whether dX/dt jumps at the knots (linear, rectilinear): a solver must not step across
    has_derivative_jumps: bool = False

    def __init__(self, knots: Tensor):
        self._knots = knots

    @property
    def knots(self) -> Tensor:
        """The knot times t_0 < ... < t_{L-1}, a 1-D tensor."""
        return self._knots

    @property
    def interval(self) -> tuple[Tensor, Tensor]:
        """(t_0, t_{L-1}), 0-dim tensors."""
        return self._knots[0], self._knots[-1]

    @property
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        raise NotImplementedError

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors `evaluate` and `derivative` read (knots first): the gradient w.r.t. the
        data flows through them, so solvers with custom gradients take them as parameters."""
        raise NotImplementedError

    def with_tensors(self, tensors: Sequence[Tensor]) -> Path:
        """The same path reading `tensors` (in the order of `tensors()`) instead of its own."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        for name, value in zip(self._tensor_names, tensors, strict=True):
            setattr(copy, name, value)
        return copy

    def evaluate(self, t: Tensor | float) -> Tensor:
        """X(t): (..., channels) for a scalar t, (..., n, channels) for a 1-D t of n times."""
        raise NotImplementedError

    def derivative(self, t: Tensor | float) -> Tensor:
        """dX/dt(t), analytic; shaped as `evaluate`."""
        raise NotImplementedError

    def derivative_on_piece(self, t: Tensor | float, piece: int) -> Tensor:
        """dX/dt(t) from the polynomial of piece `piece` ([t_piece, t_piece+1]), whatever
        piece t lies in: the one-sided derivative at a knot."""
        raise NotImplementedError

    def piece_of(self, t: Tensor) -> Tensor:
        """The piece index of each time: k with t_k < t ≤ t_{k+1}, clamped to [0, L-2]."""
        index = torch.bucketize(t.detach(), self._knots.detach()) - 1
        return index.clamp(0, len(self._knots) - 2)

    def _locate(self, t: Tensor | float, piece: int | None = None) -> tuple[Tensor, Tensor]:
        t = self._as_time(t)
        index = self.piece_of(t) if piece is None else torch.full_like(
            t, piece, dtype=torch.long)
        return index, t - self._knots[index]

    def _as_time(self, t: Tensor | float) -> Tensor:
        knots = self._knots
        t = torch.as_tensor(t, dtype=knots.dtype, device=knots.device)
        if t.dim() > 1:
            raise InvalidInputError(
                f"a path is evaluated at a scalar time or a 1-D tensor of times, got shape "
                f"{tuple(t.shape)}")
        return t

    def to(self, *args, **kwargs) -> Path:
        """The same path with every tensor moved/cast by `Tensor.to(*args, **kwargs)`."""
        moved = object.__new__(type(self))
        moved.__dict__.update({
            name: value.to(*args, **kwargs) if isinstance(value, Tensor) else value
            for name, value in self.__dict__.items()
        })
        return moved

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, "
                f"knots={len(self._knots)}, channels={self.channels}, "
                f"interval=({float(self._knots[0]):g}, {float(self._knots[-1]):g}))")


class LinearPath(Path):
    """Piecewise linear: X(t) = x_k + (t − t_k) m_k on [t_k, t_{k+1}], m_k = Δx_k / Δt_k."""

    has_derivative_jumps = True
    _tensor_names = ("_knots", "values", "slopes")

    def __init__(self, knots: Tensor, values: Tensor):
        super().__init__(knots)
        self.values = values  # (..., L, C)
        self.slopes = (values[..., 1:, :] - values[..., :-1, :]) / (
            knots[1:] - knots[:-1]).unsqueeze(-1)  # (..., L-1, C)

    @property
    def channels(self) -> int:
        return self.values.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.values.shape[:-2]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self._tensor_names)

    def evaluate(self, t: Tensor | float) -> Tensor:
        index, offset = self._locate(t)
        return self.values[..., index, :] + offset.unsqueeze(-1) * self.slopes[..., index, :]

    def derivative(self, t: Tensor | float) -> Tensor:
        index, _ = self._locate(t)
        return self.slopes[..., index, :]

    def derivative_on_piece(self, t: Tensor | float, piece: int) -> Tensor:
        index, _ = self._locate(t, piece)
        return self.slopes[..., index, :]


class CubicPath(Path):
    """Piecewise cubic: on [t_k, t_{k+1}] with s = t − t_k,
    X(t) = a_k + b_k s + (2c_k/2) s² + (3d_k/3) s³ and dX/dt = b_k + 2c_k s + 3d_k s².

    The coefficients are stored as torchcde stores them (a, b, 2c, 3d), each (..., L-1, C).
    """

    _tensor_names = ("_knots", "a", "b", "two_c", "three_d")

    def __init__(self, knots: Tensor, a: Tensor, b: Tensor, two_c: Tensor, three_d: Tensor):
        super().__init__(knots)
        self.a, self.b, self.two_c, self.three_d = a, b, two_c, three_d

    @property
    def channels(self) -> int:
        return self.a.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.a.shape[:-2]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self._tensor_names)

    def coefficients(self) -> Tensor:
        """torchcde's layout: cat([a, b, 2c, 3d], dim=-1), (..., L-1, 4C)."""
        return torch.cat([self.a, self.b, self.two_c, self.three_d], dim=-1)

    def evaluate(self, t: Tensor | float) -> Tensor:
        index, s = self._locate(t)
        s = s.unsqueeze(-1)
        inner = 0.5 * self.two_c[..., index, :] + self.three_d[..., index, :] * s / 3
        inner = self.b[..., index, :] + inner * s
        return self.a[..., index, :] + inner * s

    def derivative(self, t: Tensor | float) -> Tensor:
        index, s = self._locate(t)
        return self._derivative(index, s)

    def derivative_on_piece(self, t: Tensor | float, piece: int) -> Tensor:
        index, s = self._locate(t, piece)
        return self._derivative(index, s)

    def _derivative(self, index: Tensor, s: Tensor) -> Tensor:
        s = s.unsqueeze(-1)
        inner = self.two_c[..., index, :] + self.three_d[..., index, :] * s
        return self.b[..., index, :] + inner * s
