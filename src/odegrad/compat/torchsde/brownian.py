"""torchsde's Brownian motions, served by odegrad's `BrownianInterval` (odegrad/brownian.py).

`BrownianInterval(t0, t1, size, dtype, device, entropy, dt, tol, pool_size, cache_size,
halfway_tree, levy_area_approximation, W, H)` in torchsde 0.2.6's signature and call protocol
(`bm(ta, tb, return_U=, return_A=)`, point queries `bm(t)` = W(t) − W(t0) with torchsde's
warning, times outside [t0, t1] clamped with its warning, ta > tb a RuntimeError). The path is
odegrad's: seeded by `entropy`, the same values on every query, exact space-time Lévy area;
the same entropy gives another path than torchsde's (another generator), with the same law.

Honoured: levy_area_approximation "none", "space-time" (return_U: U = h (W/2 + H)), "davie"
and "foster" (return_A: odegrad's Davie / Foster approximation of the full Lévy area, shape
(*size, size[-1]), or zeros of `size` for a size of 0 or 1 dimensions, as in torchsde; its
noise term has the variances of the literature, half of torchsde's for Davie, see
odegrad/brownian.py);
`W=` (the increment over [t0, t1]: the path is conditioned on it exactly, by adding the drift
(t − t0)/(t1 − t0) · (W − B(t0, t1)) to a free path B, which leaves H unchanged);
`cache_size`; `dt` (torchsde's hint for laying out its tree: odegrad's tree needs none, so it
changes nothing, by design). `BrownianPath(t0, w0)` (an interval over [t0, t0 + 1] with an
unbounded cache, point queries offset by w0) and `ReverseBrownian(bm)` (W at −t).

Refused (UnsupportedCombinationError, a ValueError): `halfway_tree=True` and a
non-zero `tol` (a path determined by the entropy alone, whatever the query order, and query
times rounded to tol: odegrad's interval has neither), `pool_size` other than 8 (the size of
torchsde's numpy entropy pool; odegrad derives seeds by SplitMix64), `H=`, and `BrownianTree`
(built on halfway_tree).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ...brownian import BrownianInterval as OdegradBrownianInterval
from ...errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from .settings import LEVY_AREA_APPROXIMATIONS

__all__ = ["BaseBrownian", "BrownianInterval", "BrownianPath", "BrownianTree", "ReverseBrownian",
           "brownian_interval_like", "odegrad_view"]

_DEFAULT_POOL_SIZE = 8


class BaseBrownian:
    """What torchsde's Brownian motions share: `bm(ta, tb, return_U=, return_A=)` and the
    properties shape, dtype, device, levy_area_approximation."""

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _scalar(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise InvalidInputError(f"{name} should be a float or 0-d torch.Tensor.")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name} should be a float or 0-d torch.Tensor, got {value!r}")
    return float(value)


class _Conditioned:
    """A free path B conditioned on its increment over [t0, t1] being `w`: increments
    B(a, b) + (b − a)/(t1 − t0) · (w − B(t0, t1)); space-time Lévy area H that of B; full
    Lévy area A + h (H⊗c − c⊗H), c = (w − B(t0, t1))/(t1 − t0) the added drift (Chen's
    relation with a linear path), which is again H⊗W − W⊗H + λ of the conditioned W."""

    def __init__(self, free: OdegradBrownianInterval, w: Tensor):
        self.free = free
        self.t0, self.t1 = free.t0, free.t1
        self.shape, self.dtype, self.device = free.shape, free.dtype, free.device
        self._gap = w - free(free.t0, free.t1)

    def __call__(self, ta: float, tb: float, return_levy: bool = False,
                 return_area: bool = False):
        scale = (float(tb) - float(ta)) / (self.t1 - self.t0)
        if return_area:
            w, h, a = self.free(ta, tb, return_levy=True, return_area=True)
            if len(self.shape) >= 2:
                drift = h.unsqueeze(-1) * (scale * self._gap).unsqueeze(-2)
                a = a + drift - drift.transpose(-1, -2)
            w = w + scale * self._gap
            return (w, h, a) if return_levy else (w, a)
        if return_levy:
            w, h = self.free(ta, tb, return_levy=True)
            return w + scale * self._gap, h
        return self.free(ta, tb) + scale * self._gap


class BrownianInterval(BaseBrownian):
    """torchsde.BrownianInterval on odegrad's Brownian Interval (module docstring)."""

    def __init__(self, t0=0.0, t1=1.0, size=None, dtype=None, device=None, entropy=None,
                 dt=None, tol=0.0, pool_size=_DEFAULT_POOL_SIZE, cache_size=45,
                 halfway_tree=False, levy_area_approximation=LEVY_AREA_APPROXIMATIONS.none,
                 W=None, H=None):  # noqa: N803 (torchsde's names)
        t0, t1 = _scalar(t0, "Initial time t0"), _scalar(t1, "Terminal time t1")
        if dt is not None:
            _scalar(dt, "Expected average time step dt")
        if t0 > t1:
            raise InvalidInputError(f"Initial time {t0} should be less than terminal time {t1}.")
        if levy_area_approximation not in LEVY_AREA_APPROXIMATIONS:
            raise UnknownNameError(
                f"`levy_area_approximation` must be one of {LEVY_AREA_APPROXIMATIONS}, but got "
                f"{levy_area_approximation!r}.")
        if halfway_tree:
            raise UnsupportedCombinationError(
                "halfway_tree=True (a path that depends on the entropy alone, whatever the query "
                "order) is not supported by odegrad's Brownian Interval, whose path depends on "
                "the seed and the order of first queries; use halfway_tree=False")
        if float(tol) < 0:
            raise InvalidInputError("`tol` should be non-negative.")
        if float(tol) != 0.0:
            raise UnsupportedCombinationError(
                f"tol={tol} (query times rounded to tol) is not supported by odegrad's Brownian "
                "Interval, which resolves the path to floating-point resolution; use tol=0")
        if pool_size != _DEFAULT_POOL_SIZE:
            raise UnsupportedCombinationError(
                f"pool_size={pool_size} sizes torchsde's numpy entropy pool; odegrad derives "
                f"its seeds by SplitMix64 and has none; leave pool_size={_DEFAULT_POOL_SIZE}")
        if H is not None:
            raise UnsupportedCombinationError(
                "H= (the space-time Lévy area over [t0, t1]) is not supported; give W= alone or "
                "neither")
        if W is not None:
            if not isinstance(W, Tensor) or not W.is_floating_point():
                raise InvalidInputError("W must be a floating-point torch.Tensor")
            size = W.shape if size is None else size
            dtype = W.dtype if dtype is None else dtype
            device = W.device if device is None else device
            if tuple(size) != tuple(W.shape) or dtype != W.dtype or \
                    torch.device(device) != W.device:
                raise InvalidInputError(
                    f"W has shape {tuple(W.shape)}, {W.dtype} on {W.device}, but size={size}, "
                    f"dtype={dtype}, device={device} were given")
        if size is None:
            raise InvalidInputError("BrownianInterval needs size= (or W=)")
        if entropy is not None and (isinstance(entropy, bool) or not isinstance(entropy, int)):
            raise InvalidInputError(f"entropy must be an int or None, got {entropy!r}")
        self._levy_area_approximation = levy_area_approximation
        self._free = OdegradBrownianInterval(
            t0, t1, tuple(size), dtype=dtype, device=device, seed=entropy,
            levy_area=str(levy_area_approximation),
            cache_size=cache_size)
        self._view = self._free if W is None else _Conditioned(self._free, W)
        self._entropy, self._dt, self._cache_size = self._free.seed, dt, cache_size

    # -- torchsde's read-only description --------------------------------------------------

    shape = property(lambda self: self._free.shape)
    dtype = property(lambda self: self._free.dtype)
    device = property(lambda self: self._free.device)
    levy_area_approximation = property(lambda self: self._levy_area_approximation)
    entropy = property(lambda self: self._entropy)
    start = property(lambda self: self._free.t0)
    end = property(lambda self: self._free.t1)
    dt = property(lambda self: self._dt)
    tol = property(lambda self: 0.0)
    pool_size = property(lambda self: _DEFAULT_POOL_SIZE)
    cache_size = property(lambda self: self._cache_size)
    halfway_tree = property(lambda self: False)

    def __repr__(self) -> str:
        return (f"BrownianInterval(t0={self.start}, t1={self.end}, size={tuple(self.shape)}, "
                f"dtype={self.dtype}, device={self.device}, entropy={self.entropy}, "
                f"levy_area_approximation={self.levy_area_approximation!r}) [odegrad]")

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803
        """W(tb) − W(ta) (and U = ∫_ta^tb (W_r − W_ta) dr with return_U, the Lévy area
        approximation A with return_A: (W, U, A), (W, U) or (W, A)), torchsde's rules."""
        if return_A and self._levy_area_approximation not in (LEVY_AREA_APPROXIMATIONS.davie,
                                                              LEVY_AREA_APPROXIMATIONS.foster):
            raise InvalidInputError(
                "return_A=True needs levy_area_approximation='davie' or 'foster'")
        if return_U and self._levy_area_approximation == LEVY_AREA_APPROXIMATIONS.none:
            raise InvalidInputError(
                "return_U=True needs levy_area_approximation='space-time'")
        name_b = "tb"
        if tb is None:
            warnings.warn("BrownianInterval is optimised for interval-based queries, not point "
                          "evaluation.", stacklevel=2)
            ta, tb, name_b = self.start, ta, "ta"
        ta, tb = self._clamp(float(ta), "ta"), self._clamp(float(tb), name_b)
        if ta > tb:
            raise RuntimeError(f"Query times ta={ta:.3f} and tb={tb:.3f} must respect ta <= tb.")
        if return_A:
            w, h, a = self._view(ta, tb, return_levy=True, return_area=True)
            return (w, (tb - ta) * (0.5 * w + h), a) if return_U else (w, a)
        if not return_U:
            return self._view(ta, tb)
        w, h = self._view(ta, tb, return_levy=True)
        return w, (tb - ta) * (0.5 * w + h)

    def _clamp(self, t: float, name: str) -> float:
        if t < self.start:
            warnings.warn(f"Should have {name}>=t0 but got {name}={t} and t0={self.start}.",
                          stacklevel=3)
            return self.start
        if t > self.end:
            warnings.warn(f"Should have {name}<=t1 but got {name}={t} and t1={self.end}.",
                          stacklevel=3)
            return self.end
        return t


class BrownianPath(BaseBrownian):
    """torchsde.BrownianPath(t0, w0): W on [t0, t0 + 1] with W(t0) = w0, every value kept."""

    def __init__(self, t0, w0: Tensor, window_size: int = 8):
        t0 = _scalar(t0, "t0")
        self._w0 = w0
        self._interval = BrownianInterval(t0=t0, t1=t0 + 1, size=w0.shape, dtype=w0.dtype,
                                          device=w0.device, cache_size=None)

    shape = property(lambda self: self._interval.shape)
    dtype = property(lambda self: self._interval.dtype)
    device = property(lambda self: self._interval.device)
    levy_area_approximation = property(lambda self: self._interval.levy_area_approximation)

    def __repr__(self) -> str:
        return f"BrownianPath(interval={self._interval})"

    def __call__(self, t, tb=None, return_U=False, return_A=False):  # noqa: N803
        """W(t) when tb is None (with w0 added), else the increment W(tb) − W(t)."""
        if tb is None and not return_U and not return_A:
            return self._interval(self._interval.start, t) + self._w0
        return self._interval(t, tb, return_U=return_U, return_A=return_A)


class BrownianTree(BaseBrownian):
    """torchsde.BrownianTree: refused (it is torchsde's interval with halfway_tree=True)."""

    def __init__(self, t0, w0: Tensor, t1=None, w1=None, entropy=None, tol=1e-6, pool_size=24,
                 cache_depth=9, safety=None):
        raise UnsupportedCombinationError(
            "BrownianTree is not supported by odegrad: it is torchsde's BrownianInterval with "
            "halfway_tree=True (a path fixed by the entropy whatever the query order), which "
            "odegrad's Brownian Interval does not offer; use BrownianInterval(t0, t1, size, "
            "entropy=..., W=w1 - w0), deterministic for a given entropy and query order")


class ReverseBrownian(BaseBrownian):
    """torchsde.ReverseBrownian(bm): the increments of bm over [−tb, −ta], not negated (the
    negation lives in the reversed SDE's drift and diffusion, as in torchsde)."""

    def __init__(self, base_brownian):
        self.base_brownian = base_brownian

    shape = property(lambda self: self.base_brownian.shape)
    dtype = property(lambda self: self.base_brownian.dtype)
    device = property(lambda self: self.base_brownian.device)
    levy_area_approximation = property(lambda self: self.base_brownian.levy_area_approximation)

    def __repr__(self) -> str:
        return f"ReverseBrownian(base_brownian={self.base_brownian})"

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803
        if tb is None:
            raise InvalidInputError("ReverseBrownian answers interval queries bm(ta, tb) only")
        return self.base_brownian(-tb, -ta, return_U=return_U, return_A=return_A)


def brownian_interval_like(y: Tensor, t0=0.0, t1=1.0, size=None, dtype=None, device=None,
                           **kwargs) -> BrownianInterval:
    """A BrownianInterval with y's shape, dtype and device unless given."""
    return BrownianInterval(t0=t0, t1=t1, size=y.shape if size is None else size,
                            dtype=y.dtype if dtype is None else dtype,
                            device=y.device if device is None else device, **kwargs)


# -- what odegrad's solve_sde queries -------------------------------------------------------


class _Reversed:
    """ReverseBrownian as odegrad queries it: W'(ta, tb) = W(−tb, −ta)."""

    def __init__(self, base):
        self.base = base
        self.t0, self.t1 = -base.t1, -base.t0
        self.shape = base.shape
        self.dtype, self.device = base.dtype, base.device

    def __call__(self, ta: float, tb: float) -> Tensor:
        return self.base(-float(tb), -float(ta))


class _Foreign:
    """Any other torchsde-style Brownian motion (e.g. torchsde's own BrownianInterval): queried
    with ta <= tb as torchsde requires, a reversed query negated. It covers [t0, t1] of the
    solve (it clamps or refuses queries outside its own interval itself)."""

    def __init__(self, bm, t0: float, t1: float):
        self.bm, self.t0, self.t1 = bm, t0, t1
        self.shape = tuple(bm.shape)
        self.dtype, self.device = bm.dtype, bm.device
        approximation = getattr(bm, "levy_area_approximation", "none")
        self.levy_area = "none" if approximation in (None, "none") else "space-time"

    def __call__(self, ta: float, tb: float, return_levy: bool = False):
        """W(tb) − W(ta); with `return_levy`, also H = U / h − W/2 (torchsde's return_U)."""
        ta, tb = float(ta), float(tb)
        if not return_levy:
            return self.bm(ta, tb) if ta <= tb else -self.bm(tb, ta)
        if ta > tb:  # the reversed curve: −W, and H is even under reversal (−U + h W over h)
            w, h = self(tb, ta, return_levy=True)
            return -w, h
        w, u = self.bm(ta, tb, return_U=True)
        return w, u / (tb - ta) - 0.5 * w


def odegrad_view(bm, t0: float, t1: float):
    """What odegrad's solve_sde takes as bm=: a callable (ta, tb) with t0, t1, shape, dtype,
    device, that answers reversed queries (the backward passes make them) with the negated
    increment. `t0`, `t1`: the solve's interval, used for motions that do not report theirs."""
    if isinstance(bm, BrownianInterval):
        return bm._view
    if isinstance(bm, BrownianPath):
        return bm._interval._view
    if isinstance(bm, ReverseBrownian):
        return _Reversed(odegrad_view(bm.base_brownian, -t1, -t0))
    return _Foreign(bm, t0, t1)
