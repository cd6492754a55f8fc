"""The parasitic mode of the reversible schemes (ALGORITHMS.md §5–§7): the error term that keeps
adaptive McCallum–Foster steps inside their stability region, and the end-of-solve check that
raises InstabilityError when the mode has spoilt the solution (fixed steps, reversible Heun,
the leapfrog).

On y' = ay every reversible scheme maps its state by a 2×2 matrix M(ha) with a physical
eigenvalue ≈ e^{ha} and a parasitic one (λ/R(ha) for McCallum–Foster, about −e^{−ha} for
reversible Heun and the leapfrog), whose mode grows on dissipative problems unless h|a| is small
enough (h|a| ≲ −ln λ for McCallum–Foster).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InstabilityError
from .base import VectorField

# The forward pass's guard against the parasitic mode (ALGORITHMS.md §6, §7). Adaptive
# McCallum–Foster steps: y − z may grow by GROWTH_ALLOWANCE tolerances per unit of h|a|, the
# step's observed rate (so by about that many in all on a dissipative mode). After a solve
# (`check_stability`): InstabilityError when the parasitic mode holds more than
# INSTABILITY_TOLERANCES tolerances of y and was amplified more than INSTABILITY_GROWTH times.
GROWTH_ALLOWANCE = 4.0
INSTABILITY_TOLERANCES = 30.0
INSTABILITY_GROWTH = 10.0


class ParasiticModeCheck:
    """The parasitic-mode interface of a reversible solver (mixed into ReversibleSolver)."""

    # --- The parasitic mode -------------------------------------------------------------------
    # On y' = ay every scheme here maps the state by a 2×2 matrix M(ha) with two eigenvalues:
    # the physical one ≈ e^{ha} and a parasitic one (λ/R(ha) for McCallum–Foster, about
    # −e^{−ha} for reversible Heun and the leapfrog), whose mode grows on dissipative problems.
    # `check_stability` measures that mode at the end of a solve (`parasitic_part`, its growth
    # over the last step) and reads the rate, the amplification over the solve and the mode's
    # share of y off M (`test_matrix`, `parasitic_functional`).

    parasitic_name = "y − z"

    def parasitic_part(self, f: VectorField, t: Tensor, state: Tensor) -> Tensor:
        """The parasitic (antisymmetric) component of a state: y − z."""
        return state[0] - state[1]

    def test_matrix(self, z: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """The step map on y' = ay as (m11, m12, m21, m22), element-wise in z = ha, in the
        coordinates `parasitic_functional` reads; None when the scheme has no such check."""
        return None

    def parasitic_functional(self, z: np.ndarray) -> tuple[Any, Any]:
        """(c1, c2) with parasitic_part = c1 s1 + c2 s2 on the test matrix's coordinates."""
        return 1.0, -1.0

    def parasitic_units(self, h: float) -> float:
        """parasitic_part in the test matrix's units: parasitic_part = functional / units."""
        return 1.0

    def stability_limit(self) -> str:
        """The condition that keeps the parasitic mode from growing, in words."""
        return "small steps"

    def stability_remedy(self, x: float, h: float, span: float) -> str:
        """What to do instead, for a mode of rate a with h|a| = x at step h."""
        return "use gradient='discrete' with a plain method"

    def stability_hint(self, h: float) -> str:
        """A sentence for the max_steps error when the steps collapsed to about h."""
        return (
            f"method {self.name!r} is reversible: its steps may have collapsed to keep its "
            f"parasitic mode {self.parasitic_name} in check, which stays stable only with "
            f"{self.stability_limit()} (steps of {h:.3g} here); "
            f"{self.stability_remedy(0.0, h, 0.0)}"
        )

    def _stability_grid(self):
        """(x, growth per step, parasitic share of y per unit functional) on a grid of x = h|a|
        for a dissipative rate a < 0 (z = −x); computed once per solver from its coefficients."""
        grid = getattr(self, "_grid", None)
        if grid is None:
            x = np.logspace(-9, 4, 2601)
            z = -x
            m11, m12, m21, m22 = (np.broadcast_to(np.asarray(m, dtype=np.float64), x.shape)
                                  for m in self.test_matrix(z))
            mu, v1, v2 = _dominant_eigen(m11, m12, m21, m22)
            c1, c2 = self.parasitic_functional(z)
            share = np.abs(v1) / np.maximum(np.abs(c1 * v1 + c2 * v2), 1e-300)
            grid = self._grid = (x, np.abs(mu), share)
        return grid

    def check_stability(
        self, f: VectorField, t: Tensor, trajectory, previous: Tensor | None, state: Tensor, *,
        rtol: Tensor | float, atol: Tensor | float,
    ) -> None:
        """Raise InstabilityError when the parasitic mode has grown enough to spoil y.

        Called once after a solve with the last two states. The parasitic part d (y − z) is
        measured in tolerances (atol + rtol |y|) at both; its growth ρ over the last step gives
        the rate h|a| that explains it (through the test matrix; the growth N/(N − 1) that
        truncation errors alone would give after N steps is discounted), hence the amplification of
        the mode over all accepted steps and its share of y. It raises when that share exceeds
        INSTABILITY_TOLERANCES tolerances and the amplification exceeds INSTABILITY_GROWTH:
        the mode then holds an error many tolerances large and far beyond the truncation error
        it started from, and f dissipates along d at about that rate (a forward difference,
        two f-evaluations, only then). One host synchronisation; no f-evaluation before that
        for y − z (two for alf's v − f(t, z)).
        """
        steps = trajectory.steps
        if previous is None or len(steps) < 2 or self.test_matrix(np.zeros(1)) is None:
            return
        last = steps[-1]
        with torch.no_grad():
            t_last = trajectory.step_time(t.detach(), last)
            d0 = self.parasitic_part(f, t_last, previous)
            d1 = self.parasitic_part(f, t_last + last.h, state)
            y0, y1 = self.observe(previous), self.observe(state)
            size = torch.maximum(y0.abs(), y1.abs())
            scale = atol + rtol * size
            n0, n1, size = torch.stack([(v / scale).pow(2).mean().sqrt() for v in (d0, d1, size)]
                                       ).tolist()
        # Round-off alone (8 eps |y| a step, adding up like a random walk) is no instability.
        noise = 10 * math.sqrt(len(steps)) * 8 * torch.finfo(d1.dtype).eps * size
        if not (math.isfinite(n1) and 0.0 < n0 < n1 and n1 > noise):
            return
        # d_0 = 0, so truncation errors alone, one per step, would give n1/n0 ≈ N/(N − 1):
        # only the growth beyond that is the mode's.
        rho = n1 / n0 * (len(steps) - 1) / len(steps)
        if rho <= 1.0:
            return
        h = abs(last.h)
        x_grid, growth_grid, share_grid = self._stability_grid()
        x = _rate_from_growth(rho, x_grid, growth_grid)
        share = n1 * self.parasitic_units(h) * float(np.interp(math.log(x), np.log(x_grid),
                                                               share_grid))
        if share <= INSTABILITY_TOLERANCES:
            return
        xs = np.log(np.maximum(x / h * np.abs([s.h for s in steps]), x_grid[0]))
        log_amplification = float(np.sum(np.log(np.interp(xs, np.log(x_grid), growth_grid))))
        if log_amplification <= math.log(INSTABILITY_GROWTH):
            return
        # Confirm that f dissipates along d (a growth of d from truncation errors that merely
        # add up, as on a rotation, does not): Re⟨d, J d⟩/|d|² against the rate read off ρ.
        with torch.no_grad():
            dissipation = _rate_along(f, t_last + last.h, self.observe(state), d1)
        if not -dissipation * h >= 0.25 * x:
            return
        # The message reads the rate off the growth itself: the mode dominates d by now.
        x = _rate_from_growth(n1 / n0, x_grid, growth_grid)
        t_end = last.t + last.h
        span = abs(t_end - steps[0].t)
        raise InstabilityError(
            f"method {self.name!r} is unstable on this problem: its parasitic mode "
            f"{self.parasitic_name} grew "
            f"by a factor {_factor_text(n1 / n0)} in the last step (h={h:.3g}) and by about "
            f"{_exp_text(log_amplification)} over the {len(steps)} steps to t={t_end:.6g}, as a "
            f"dissipative mode of rate a ≈ {-x / h:.3g} does (h|a| ≈ {x:.3g}); it now holds "
            f"about {share:.3g} tolerances (atol + rtol|y|) of y, so the solution is wrong. "
            f"It stays stable only with {self.stability_limit()}; "
            f"{self.stability_remedy(x, h, span)}"
        )


def _rate_along(f: VectorField, t: Tensor, y: Tensor, d: Tensor) -> float:
    """Re⟨d, J d⟩ / ⟨d, d⟩ for J = ∂f/∂y at (t, y), by a forward difference (two f-evaluations)."""
    d_norm, y_norm = float(d.norm()), float(y.norm())
    if not (d_norm > 0.0 and math.isfinite(d_norm) and math.isfinite(y_norm)):
        return 0.0
    step = math.sqrt(torch.finfo(y.dtype).eps) * max(1.0, y_norm) / d_norm
    jd = (f(t, y + step * d) - f(t, y)) / step
    return float((d * jd).sum() / (d * d).sum())


def _dominant_eigen(m11, m12, m21, m22):
    """The eigenvalue of larger modulus of each 2×2 matrix and an eigenvector (v1, v2) of it."""
    tr, det = m11 + m22, m11 * m22 - m12 * m21
    root = np.sqrt((tr * tr - 4 * det).astype(complex))
    plus, minus = (tr + root) / 2, (tr - root) / 2
    mu = np.where(np.abs(plus) >= np.abs(minus), plus, minus)
    # (m11 − μ) v1 + m12 v2 = 0, or m21 v1 + (m22 − μ) v2 = 0 where the first row vanishes.
    a1, a2 = m12 + 0j, mu - m11
    b1, b2 = mu - m22, m21 + 0j
    first = np.abs(a1) + np.abs(a2) >= np.abs(b1) + np.abs(b2)
    return mu, np.where(first, a1, b1), np.where(first, a2, b2)


def _rate_from_growth(rho: float, x_grid: np.ndarray, growth_grid: np.ndarray) -> float:
    """The smallest x = h|a| past the first local minimum of the growth per step (where the
    parasitic mode takes over from the physical one) at which it reaches rho, log-linear
    between grid points; the grid's end if it never does."""
    start = int(np.argmax(np.diff(growth_grid) > 0.0))
    above = np.nonzero(growth_grid[start:] >= rho)[0]
    if above.size == 0:
        return float(x_grid[-1])
    i = start + int(above[0])
    if i == 0:
        return float(x_grid[0])
    g0, g1 = growth_grid[i - 1], growth_grid[i]
    w = 0.0 if g1 == g0 else (rho - g0) / (g1 - g0)
    return float(math.exp((1 - w) * math.log(x_grid[i - 1]) + w * math.log(x_grid[i])))


def _factor_text(value: float) -> str:
    """A growth factor with enough digits to tell it from 1."""
    return f"{value:.3g}" if value >= 1.01 else f"{value:.6f}".rstrip("0")


def _exp_text(log_value: float) -> str:
    """e^log_value as a short number, also past the float range."""
    if log_value < 700:
        return f"{math.exp(log_value):.3g}"
    exponent = log_value / math.log(10)
    return f"1e{exponent:.0f}"


def _parasitic_error(
    state: Tensor, y_next: Tensor, z_next: Tensor, rtol, atol, coupling: float,
    on_host: bool | None = None,
) -> Tensor:
    """The parasitic mode's share of a McCallum–Foster step's error estimate: a multiple of
    d_{n+1} = y_{n+1} − z_{n+1} whose scaled norm is the ratio `_parasitic_ratio` gives for the
    scaled norms of d_n and d_{n+1} (scaled like the loop's error: atol + rtol max|y|) and the
    round-off that computing d_{n+1} adds (8 eps max|y|, in the same scale).

    No f-evaluation; on CPU (`on_host` by default) the ratio is computed on the host, two
    floats with no device to wait for; on other devices in 0-dim tensor ops, so it never
    synchronises."""
    with torch.no_grad():
        d1 = y_next - z_next
        size = torch.maximum(state[0].abs(), y_next.abs())
        scaled = torch.stack([state[0] - state[1], d1, size]) / (atol + rtol * size)
        norms = torch.linalg.vector_norm(scaled, dim=tuple(range(1, scaled.dim())))
        rms = 1.0 / math.sqrt(max(d1.numel(), 1))
        if d1.device.type == "cpu" if on_host is None else on_host:
            n0, n1, size_norm = norms.tolist()
            n0, n1, noise = n0 * rms, n1 * rms, size_norm * rms * 8 * torch.finfo(d1.dtype).eps
            ratio = _parasitic_ratio(n0, n1, coupling, noise)
            return d1 * (ratio / n1 if ratio > 0.0 else 0.0)
        norms = norms * torch.tensor([rms, rms, rms * 8 * torch.finfo(d1.dtype).eps],
                                     dtype=norms.dtype, device=norms.device)
        n0, n1, noise = norms.unbind()
        ratio = _parasitic_ratio_tensor(n0, n1, coupling, noise)
        return d1 * ratio.div_(n1).nan_to_num_(0.0, 0.0, 0.0)


def _parasitic_ratio(n0: float, n1: float, coupling: float, noise: float = 0.0) -> float:
    """The error ratio of the parasitic mode over one step, from the scaled norms n0 = ‖d_n‖
    and n1 = ‖d_{n+1}‖ (in tolerances), less the round-off `noise` of the step, and the
    coupling λ.

    x = ln(n1 / (λ n0)) is the rate h|a| that the step's growth shows (λ e^x per step on a
    dissipative mode). A growing d counts (n1 − n0) / (GROWTH_ALLOWANCE x): d may grow freely
    while it is small, but past about GROWTH_ALLOWANCE tolerances only on steps near the
    stability limit x = −ln λ. A shrinking d that still decays more slowly than λ alone would
    make it (0 < x < −ln λ, a dissipative mode close to the limit) counts
    0.9 min(1, n0 x / (GROWTH_ALLOWANCE (−ln λ))): never a rejection on its own, but it keeps
    the controller from jumping far past the limit after each accepted step. Growth within
    the round-off is no growth (no step size could remove it)."""
    n1 = n1 - noise
    if not (n1 > 0.0 and n0 > 0.0 and math.isfinite(n1)):
        return 0.0
    margin = -math.log(coupling)
    rate = math.log(n1 / n0) + margin
    if n1 > n0:
        return (n1 - n0) / (GROWTH_ALLOWANCE * rate)
    if margin == 0.0:
        return 0.0
    return 0.9 * min(1.0, n0 * min(max(rate / margin, 0.0), 1.0) / GROWTH_ALLOWANCE)


def _parasitic_ratio_tensor(
    n0: Tensor, n1: Tensor, coupling: float, noise: Tensor | float = 0.0
) -> Tensor:
    """`_parasitic_ratio` in 0-dim tensor ops (nan where it returns 0 for a zero norm)."""
    margin = -math.log(coupling)
    n1 = n1 - noise
    rate = torch.log(n1 / n0).add_(margin)
    growth = (n1 - n0).div_(rate * GROWTH_ALLOWANCE)
    if margin == 0.0:
        return torch.where(n1 > n0, growth, torch.zeros_like(growth))
    near = (rate / margin).clamp_(0.0, 1.0).mul_(n0).mul_(0.9 / GROWTH_ALLOWANCE).clamp_max_(0.9)
    return torch.where(n1 > n0, growth, near)
