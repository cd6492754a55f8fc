"""Rößler's stochastic Runge–Kutta schemes, torchsde's method "srk" (Itô, strong order 1.5).

Rößler, "Runge–Kutta methods for the strong approximation of solutions of stochastic
differential equations", SIAM J. Numer. Anal. 48(3), 2010: SRI2 (torchsde's tableau "srid2")
on diagonal and scalar noise, SRA1 on additive noise, with torchsde 0.2.6's coefficients.

Both read, over a step [t, t + h], the increment ΔW and the space-time Lévy area H
(brownian.py): torchsde's I_k0 / h = U / h = ΔW/2 + H. So the Brownian motion must carry the
space-time Lévy area (solve_sde makes it so when it makes the motion; a given `bm` without it is
refused). With J = ΔW/2 + H, I_kk = (ΔW² − h)/2, I_kkk = (ΔW³ − 3hΔW)/6 and g the diffusion
column (diagonal: g; scalar: g[..., 0]), SRI2's stages s = 0..3 are

    H⁰_s = y + Σ_{j<s} (A0_sj f_j h + B0_sj g_j J),   f_s = f(t + C0_s h, H⁰_s),
    H¹_s = y + Σ_{j<s} (A1_sj f_j h + B1_sj g_j √h),  g_s = g(t + C1_s h, H¹_s),
    y_{n+1} = y + Σ_s α_s f_s h + g_s (β1_s ΔW + β2_s I_kk/√h + β3_s J + β4_s I_kkk/h);

SRA1 (g independent of y): H⁰_1 = y + ¾ f_0 h + (3/2) g(t + h) J,
y_{n+1} = y + (f_0/3 + 2 f_1/3) h + g(t + h)(ΔW − J) + g(t) J.

Each stage's f and g is evaluated once (torchsde evaluates them again in later stages; the
values are the same). The step queries (ΔW, H) again on a replay, never stores them, so the
discrete gradient replays it exactly. Strong order 1.5 holds for diagonal noise whose g_i
depends on y_i alone (and scalar, additive noise).
"""

from __future__ import annotations

import math

from ..errors import InvalidInputError
from .base import Step
from .sde import SDESolver, register_sde_solver

__all__ = ["StochasticRungeKutta", "levy_noise"]

# SRI2 (torchsde tableaus/srid2.py)
_C0 = (0.0, 1.0, 0.5, 0.0)
_C1 = (0.0, 0.25, 1.0, 0.25)
_A0 = ((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0))
_A1 = ((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25))
_B0 = ((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0))
_B1 = ((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5))
_ALPHA = (1 / 6, 1 / 6, 2 / 3, 0.0)
_BETA1 = (-1.0, 4 / 3, 2 / 3, 0.0)
_BETA2 = (1.0, -4 / 3, 1 / 3, 0.0)
_BETA3 = (2.0, -4 / 3, -2 / 3, 0.0)
_BETA4 = (-2.0, 5 / 3, -2 / 3, 1.0)


def levy_noise(field, t, h):
    """(ΔW, H) over [t, t + h], the endpoints snapped to the step grid as `SDEField.noise`."""
    ta = float(t)
    tb = ta + float(h)
    if field.grid is not None:
        ta, tb = field.grid.snap(ta), field.grid.snap(tb)
    if getattr(field.bm, "levy_area", "none") in (None, "none"):
        raise InvalidInputError(
            "method='srk' reads the space-time Lévy area: pass a bm made with "
            "levy_area='space-time' (or 'davie' / 'foster'), or omit bm=")
    return field.bm(ta, tb, return_levy=True)


class StochasticRungeKutta(SDESolver):
    """Rößler's SRI2 (diagonal, scalar noise) and SRA1 (additive noise), Itô, strong order 1.5;
    needs a Brownian motion with the space-time Lévy area (`levy_area`)."""

    name = "srk"
    order = 1
    sde_type = "ito"
    noise_types = ("diagonal", "scalar", "additive")
    levy_area = "space-time"  # what the Brownian motion must provide (solve_sde reads it)
    # g enters off the products g·ΔW (g J, g √h): the adjoint's augmented field cannot serve it.
    reads_diffusion_derivative = True

    def step(self, field, t, h, y, carry):
        dw, levy = levy_noise(field, t, h)
        j = 0.5 * dw + levy
        if field.noise_type == "additive":
            y_next = y + self._additive(field, t, h, y, dw, j)
        else:
            y_next = y + self._diagonal(field, t, h, y, dw, j)
        return Step(y=y_next, error=None, dense=y_next, carry=None)

    def increment(self, field, t, h, y, dw):
        raise NotImplementedError("srk steps read the Lévy area too: see step()")

    @staticmethod
    def _diagonal(field, t, h, y, dw, j):
        root = math.sqrt(abs(float(h)))
        i_kk = 0.5 * (dw * dw - h)
        i_kkk = (dw * dw * dw - 3 * h * dw) / 6
        scalar = field.noise_type == "scalar"
        fs, gs = [], []
        out = 0.0
        for s in range(4):
            h0, h1 = y, y
            for k in range(s):
                if _A0[s][k]:
                    h0 = h0 + _A0[s][k] * fs[k] * h
                if _B0[s][k]:
                    h0 = h0 + _B0[s][k] * gs[k] * j
                if _A1[s][k]:
                    h1 = h1 + _A1[s][k] * fs[k] * h
                if _B1[s][k]:
                    h1 = h1 + _B1[s][k] * gs[k] * root
            f = field(t + _C0[s] * h, h0) if (_ALPHA[s] or s < 3) else None
            g = field.diffusion(t + _C1[s] * h, h1)
            g = g[..., 0] if scalar else g
            fs.append(f)
            gs.append(g)
            weight = (_BETA1[s] * dw + _BETA2[s] * i_kk / root + _BETA3[s] * j
                      + _BETA4[s] * i_kkk / h)
            out = out + g * weight
            if _ALPHA[s]:
                out = out + _ALPHA[s] * f * h
        return out

    @staticmethod
    def _additive(field, t, h, y, dw, j):
        g_end = field.diffusion(t + h, y)
        g_start = field.diffusion(t, y)
        f0 = field(t, y)
        f1 = field(t + 0.75 * h, y + 0.75 * f0 * h + field.apply(g_end, 1.5 * j))
        return ((f0 / 3 + 2 * f1 / 3) * h + field.apply(g_end, dw - j)
                + field.apply(g_start, j))


def _srk() -> StochasticRungeKutta:
    return StochasticRungeKutta()


register_sde_solver("srk", _srk)
