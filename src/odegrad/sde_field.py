"""The terms of an SDE as the solvers see them (ALGORITHMS.md §11).

dY = f(t, Y) dt + g(t, Y) ∘ dW (Stratonovich) or dY = f dt + g dW (Itô). An SDE step is a
deterministic function of (t, h, y) once the Brownian increment ΔW = W(t + h) − W(t) can be
queried again, so the SDE schemes are `Solver`s and the "f" the core loop hands them is an
`SDEField`: calling it gives the drift (so generic code, probing included, works unchanged),
and the schemes ask it for the diffusion, the increment and their product.

Noise types and the shape of g(t, y) for a state y of shape (*batch, d), W of shape (*batch, m):
  diagonal: g (*batch, d), m = d, g ΔW element-wise;
  scalar:   g (*batch, d, 1), m = 1, g[..., 0] ΔW;
  additive, general: g (*batch, d, m), Σ_j g_ij ΔW_j ("additive": g does not depend on y).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import InvalidInputError

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("ito", "stratonovich")
Scalar = float | Tensor


class StepGrid:
    """The step boundaries of a fixed-step solve, as host floats: a Brownian query at a time
    within round-off of a boundary is read at the boundary itself, so the end of step n and the
    start of step n + 1 (computed by different float operations) query W at the same point and
    the increments of consecutive steps add up exactly.

    `resolution`: the round-off of the step times in the solve's dtype (`for_dtype`); the
    tolerance is max(1e-6 × the largest span, resolution), at most a quarter of the smallest
    span above 2 × resolution (spans below it are not resolved by the times anyway)."""

    def __init__(self, points: Sequence[float], resolution: float = 0.0):
        self.points = sorted(set(float(p) for p in points))
        self.resolution = float(resolution)
        spans = [b - a for a, b in zip(self.points, self.points[1:])]
        resolved = [s for s in spans if s > 2 * self.resolution] or spans
        self.tolerance = (min(max(1e-6 * max(spans), self.resolution), 0.25 * min(resolved))
                          if spans else self.resolution)

    def for_dtype(self, dtype: torch.dtype) -> StepGrid:
        """This grid with the resolution of times in `dtype`: t_n = t[a] + offset rounds twice
        in the dtype (the offset, then the sum), so |error| ≤ 4 eps max|t|."""
        if not self.points:
            return self
        scale = max(abs(self.points[0]), abs(self.points[-1]))
        resolution = 4 * torch.finfo(dtype).eps * scale
        return StepGrid(self.points, max(self.resolution, resolution))

    def snap(self, time: float) -> float:
        """The nearest boundary if it lies within the tolerance, else `time` itself."""
        points = self.points
        i = bisect.bisect_left(points, time)
        best, distance = time, self.tolerance
        for j in (i - 1, i):
            if 0 <= j < len(points) and abs(points[j] - time) <= distance:
                best, distance = points[j], abs(points[j] - time)
        return best


def fixed_grid(times: Sequence[float], dt: float) -> list[float]:
    """The boundaries of the loop's fixed-step plan over `times` (loop._fixed_plan): steps of
    dt from times[0], the last one clipped to land on times[-1]."""
    from .loop import _fixed_step_total

    n = _fixed_step_total(list(times), dt)
    direction = 1.0 if times[-1] > times[0] else -1.0
    return [times[0] + direction * dt * k for k in range(n)] + [times[-1]]


class SDEField:
    """Drift, diffusion, noise type and Brownian motion of one SDE, counted into `stats`.

    `field(t, y)` is the drift (converted between Itô and Stratonovich when `drift_correction`
    is ±½: f + c·Σ_k (∂g_{·k}/∂y) g_{·k}); `diffusion(t, y)` is g; `noise(t, h)` is
    W(t + h) − W(t) (negative h: the exact negative of the forward increment);
    `apply(g, dW)` is the diffusion times the increment for the noise type, and
    `diffusion_times(t, y, dW)` = apply(diffusion(t, y), dW), the only form of g that the
    Stratonovich schemes use (the stochastic adjoint's augmented field overrides it).

    Counts: nfe_forward / nfe_backward for the drift (as CountedField), nge_forward /
    nge_backward for the diffusion, by the `_phase` of `stats`.
    """

    def __init__(
        self,
        drift: Callable,
        diffusion: Callable,
        noise_type: str,
        bm: Callable,
        y0: Tensor,
        stats: dict,
        grid: StepGrid | None = None,
        drift_correction: float = 0.0,
    ):
        self.drift = drift
        self.diffusion_fn = diffusion
        self.noise_type = noise_type
        self.bm = bm
        self.stats = stats
        self.grid = None if grid is None else grid.for_dtype(y0.dtype)
        self.drift_correction = drift_correction
        self._y_shape, self._dtype, self._device = y0.shape, y0.dtype, y0.device
        self._checked_f = self._checked_g = False

    # ---- the terms ------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        phase = "backward" if self.stats.get("_phase") == "backward" else "forward"
        key = f"{name}_{phase}"
        self.stats[key] = self.stats.get(key, 0) + 1

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        """The drift, in the scheme's calculus (Itô or Stratonovich)."""
        self._count("nfe")
        out = self.drift(t, y)
        if not self._checked_f:
            self._check(out, t, "f", self._y_shape)
            self._checked_f = True
        if self.drift_correction:
            out = out + self.drift_correction * self.correction(t, y)
        return out

    def diffusion(self, t: Tensor, y: Tensor) -> Tensor:
        """g(t, y), of the shape the noise type prescribes."""
        self._count("nge")
        out = self.diffusion_fn(t, y)
        if not self._checked_g:
            self._check(out, t, "g", diffusion_shape(self.noise_type, y.shape, None))
            self._checked_g = True
        return out

    def noise(self, t: Tensor, h: Scalar) -> Tensor:
        """ΔW = W(t + h) − W(t), the step's endpoints snapped to the step grid."""
        ta = float(t)
        tb = ta + float(h)
        if self.grid is not None:
            ta, tb = self.grid.snap(ta), self.grid.snap(tb)
        return self.bm(ta, tb)

    def apply(self, g: Tensor, dw: Tensor) -> Tensor:
        """g·ΔW for the noise type (diagonal: g ΔW; scalar: g[..., 0] ΔW; else Σ_j g_ij ΔW_j)."""
        return apply_noise(self.noise_type, g, dw)

    def diffusion_times(self, t: Tensor, y: Tensor, dw: Tensor) -> Tensor:
        """g(t, y)·ΔW."""
        return self.apply(self.diffusion(t, y), dw)

    def correction(self, t: Tensor, y: Tensor, g: Tensor | None = None) -> Tensor:
        """c = Σ_k (∂g_{·k}/∂y) g_{·k}: Itô drift = Stratonovich drift + ½ c (§11).

        diagonal: c_i = (∂g_i/∂y_i) g_i, exact (one JVP per component, so g_i may depend on
        every y_j); scalar: one JVP; general: one JVP per noise channel; additive: zero.
        `g`: g(t, y) when already evaluated.
        """
        if self.noise_type == "additive":
            return torch.zeros_like(y)
        g = self.diffusion(t, y) if g is None else g

        def fn(x: Tensor) -> Tensor:
            self._count("nge")
            return self.diffusion_fn(t, x)

        if self.noise_type == "scalar":
            return jvp(lambda x: fn(x)[..., 0], y, g[..., 0])
        if self.noise_type == "general":
            return sum(jvp(lambda x, k=k: fn(x)[..., k], y, g[..., k])
                       for k in range(g.shape[-1]))
        d = y.shape[-1]
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        return sum(jvp(fn, y, g * eye[j]) * eye[j] for j in range(d))

    # ---- checks ---------------------------------------------------------------------------

    def _check(self, out, t: Tensor, name: str, shape) -> None:
        where = f"at t={float(t.detach()):.6g}"
        if not isinstance(out, Tensor):
            raise InvalidInputError(f"{name} returned {type(out).__name__} {where}, not a tensor")
        if shape is not None and out.shape != shape:
            want = diffusion_shape_text(self.noise_type, self._y_shape) if name == "g" else (
                f"y's shape {tuple(self._y_shape)}")
            raise InvalidInputError(
                f"{name} returned shape {tuple(out.shape)} {where}; with noise_type="
                f"{self.noise_type!r} and y of shape {tuple(self._y_shape)} it must return {want}"
            )
        if name == "g" and self.noise_type in ("general", "additive"):
            m = self.bm_size
            if out.dim() != len(self._y_shape) + 1 or out.shape[:-1] != self._y_shape or (
                m is not None and out.shape[-1] != m
            ):
                raise InvalidInputError(
                    f"g returned shape {tuple(out.shape)} {where}; with noise_type="
                    f"{self.noise_type!r} it must return (*y.shape, m) = "
                    f"{(*self._y_shape, m)} for a Brownian motion of size m = {m}"
                )
        if out.dtype != self._dtype or out.device != self._device:
            raise InvalidInputError(
                f"{name} returned {out.dtype} on {out.device} {where}, but y is {self._dtype} "
                f"on {self._device}"
            )

    @property
    def bm_size(self) -> int | None:
        shape = getattr(self.bm, "shape", None)
        return None if shape is None else int(tuple(shape)[-1])


def apply_noise(noise_type: str, g: Tensor, dw: Tensor) -> Tensor:
    """The diffusion times the increment for `noise_type`."""
    if noise_type == "diagonal":
        return g * dw
    if noise_type == "scalar":
        return g[..., 0] * dw
    return torch.einsum("...ij,...j->...i", g, dw)


def diffusion_shape(noise_type: str, y_shape, m: int | None):
    """The shape g must return (None: checked separately, general/additive)."""
    if noise_type == "diagonal":
        return y_shape
    if noise_type == "scalar":
        return torch.Size((*y_shape, 1))
    return None


def diffusion_shape_text(noise_type: str, y_shape) -> str:
    if noise_type == "diagonal":
        return f"y's shape {tuple(y_shape)}"
    if noise_type == "scalar":
        return f"{(*y_shape, 1)}"
    return "(*y.shape, m)"


def brownian_shape(noise_type: str, y_shape, brownian_size: int | None) -> tuple[int, ...]:
    """The shape of W: (*batch, m), m the state size (diagonal), 1 (scalar) or given."""
    batch, d = tuple(y_shape[:-1]), int(y_shape[-1])
    if noise_type == "diagonal":
        if brownian_size not in (None, d):
            raise InvalidInputError(
                f"noise_type='diagonal' needs brownian_size equal to the state size {d}, got "
                f"{brownian_size}; use noise_type='general' for another size"
            )
        return (*batch, d)
    if noise_type == "scalar":
        if brownian_size not in (None, 1):
            raise InvalidInputError(
                f"noise_type='scalar' has brownian_size 1, got {brownian_size}; use "
                "noise_type='general' for several channels"
            )
        return (*batch, 1)
    if brownian_size is None:
        raise InvalidInputError(
            f"noise_type={noise_type!r} needs brownian_size= (the number m of Brownian "
            "channels; g returns (*y.shape, m)) when no bm is given"
        )
    if isinstance(brownian_size, bool) or not isinstance(brownian_size, int) or brownian_size < 1:
        raise InvalidInputError(f"brownian_size must be a positive int, got {brownian_size!r}")
    return (*batch, brownian_size)


def jvp(fn: Callable[[Tensor], Tensor], y: Tensor, v: Tensor) -> Tensor:
    """(∂fn/∂y) v by two reverse passes (the VJP's VJP), differentiable w.r.t. y, v and what
    fn captures when grad mode is on (the direct and discrete gradients differentiate it)."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        y_in = y if (outer and y.requires_grad) else y.detach().requires_grad_()
        out = fn(y_in)
        if not out.requires_grad:
            return torch.zeros_like(y)
        u = torch.zeros_like(out).requires_grad_()
        (w,) = torch.autograd.grad(out, y_in, u, create_graph=True, allow_unused=True,
                                   materialize_grads=True)
        if not w.requires_grad:
            return torch.zeros_like(y)
        (jv,) = torch.autograd.grad(w, u, v, create_graph=outer, allow_unused=True,
                                    materialize_grads=True)
    return jv if outer else jv.detach()
