"""Cubic interpolants' coefficients (a, b, 2c, 3d) per piece, each (..., L−1, C).

- Hermite cubic with backward differences (Morrill et al. 2021): on [t_k, t_{k+1}] the cubic
  with values x_k, x_{k+1}, slope m_{k−1} at t_k and m_k at t_{k+1}, m_k = Δx_k/Δt_k (m_{−1} =
  m_0). C1, and causal up to one observation.
- Natural cubic spline: C2 through every knot, second derivative 0 at both ends; the knot
  slopes solve a tridiagonal system (the Thomas algorithm, batched over series and channels).
With missing values the natural spline runs through each channel's observations only and is
written out on every piece (the torchcde convention; `fill_ends` as its natural_cubic_coeffs,
or only the two end values imputed as its deprecated natural_cubic_spline_coeffs).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hermite_coefficients", "natural_spline_coefficients"]

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


def hermite_coefficients(t: Tensor, x: Tensor) -> Coefficients:
    """Hermite cubic with backward differences through x (..., L, C) (no NaN) at times t."""
    dt = (t[1:] - t[:-1]).unsqueeze(-1)
    slopes = (x[..., 1:, :] - x[..., :-1, :]) / dt
    slopes_before = torch.cat([slopes[..., :1, :], slopes[..., :-1, :]], dim=-2)
    b = slopes_before
    two_c = 2 * (3 * (slopes - b) - slopes + slopes_before) / dt
    three_d = (1 / dt ** 2) * (slopes - b) - two_c / dt
    return x[..., :-1, :], b, two_c, three_d


def _tridiagonal_solve(rhs: Tensor, upper: Tensor, diagonal: Tensor, lower: Tensor) -> Tensor:
    """Solve A x = rhs along the last dim, A with the given diagonals (Thomas algorithm)."""
    n = rhs.shape[-1]
    upper = upper.expand(rhs.shape[:-1] + upper.shape[-1:])
    lower = lower.expand(rhs.shape[:-1] + lower.shape[-1:])
    diagonal = diagonal.expand(rhs.shape)
    new_diagonal, new_rhs = [diagonal[..., 0]], [rhs[..., 0]]
    for i in range(1, n):
        w = lower[..., i - 1] / new_diagonal[i - 1]
        new_diagonal.append(diagonal[..., i] - w * upper[..., i - 1])
        new_rhs.append(rhs[..., i] - w * new_rhs[i - 1])
    out = [None] * n
    out[n - 1] = new_rhs[n - 1] / new_diagonal[n - 1]
    for i in range(n - 2, -1, -1):
        out[i] = (new_rhs[i] - upper[..., i] * out[i + 1]) / new_diagonal[i]
    return torch.stack(out, dim=-1)


def _spline_rows(t: Tensor, x: Tensor) -> Coefficients:
    """Natural spline coefficients of rows x (..., L) (no NaN) at times t (L,): each (..., L−1)."""
    length = x.shape[-1]
    if length == 2:
        slope = (x[..., 1:] - x[..., :1]) / (t[1:] - t[:1])
        zero = torch.zeros_like(slope)
        return x[..., :1], slope, zero, zero
    dt_inv = (t[1:] - t[:-1]).reciprocal()
    dt_inv2 = dt_inv ** 2
    three_diffs = 3 * (x[..., 1:] - x[..., :-1])
    scaled = three_diffs * dt_inv2
    diagonal = torch.zeros(length, dtype=x.dtype, device=x.device)
    diagonal = 2 * (torch.cat([dt_inv, diagonal[:1]]) + torch.cat([diagonal[:1], dt_inv]))
    zero = torch.zeros_like(x[..., :1])
    rhs = torch.cat([scaled, zero], dim=-1) + torch.cat([zero, scaled], dim=-1)
    knot_slopes = _tridiagonal_solve(rhs, dt_inv, diagonal, dt_inv)
    left, right = knot_slopes[..., :-1], knot_slopes[..., 1:]
    two_c = (2 * three_diffs * dt_inv - 4 * left - 2 * right) * dt_inv
    three_d = (-2 * three_diffs * dt_inv + 3 * (left + right)) * dt_inv2
    return x[..., :-1], left, two_c, three_d


def _spline_row_with_missing(t: Tensor, x: Tensor, fill_ends: bool) -> Coefficients:
    """One channel of one series (L,) with NaNs: the spline through its observations, written
    out on every piece [t_j, t_{j+1}] by re-expanding the observed piece that contains it."""
    observed = ~torch.isnan(x)
    if not bool(observed.any()):
        zero = torch.zeros(len(t) - 1, dtype=x.dtype, device=x.device)
        return zero, zero, zero, zero
    indices = observed.nonzero().squeeze(-1)
    first, last = int(indices[0]), int(indices[-1])
    clean = torch.where(observed, x, torch.zeros((), dtype=x.dtype, device=x.device))
    position = torch.arange(len(t), device=x.device)
    if fill_ends:  # every leading/trailing entry takes the first/last observation
        ends = (position < first) | (position > last)
        clean = torch.where(position < first, clean[first], clean)
        clean = torch.where(position > last, clean[last], clean)
    else:  # only the two end values are imputed
        ends = ((position == 0) & ~observed[0]) | ((position == len(t) - 1) & ~observed[-1])
        clean = torch.where((position == 0) & ~observed[0], clean[first], clean)
        clean = torch.where((position == len(t) - 1) & ~observed[-1], clean[last], clean)
    keep = observed | ends
    times, values = t[keep], clean[keep]
    a, b, two_c, three_d = _spline_rows(times, values)
    piece = (torch.searchsorted(times.detach(), t[:-1].detach(), right=True) - 1).clamp(
        0, len(times) - 2)
    a, b, two_c, three_d = a[piece], b[piece], two_c[piece], three_d[piece]
    offset = times[piece] - t[:-1]  # ≤ 0: the piece's start lies at or before t_j
    a_inner = (0.5 * two_c - three_d * offset / 3) * offset
    return (a + (a_inner - b) * offset, b + (three_d * offset - two_c) * offset,
            two_c - 2 * three_d * offset, three_d)


def natural_spline_coefficients(t: Tensor, x: Tensor, fill_ends: bool = True) -> Coefficients:
    """Natural cubic spline through x (..., L, C) at times t, NaNs handled per channel."""
    rows = x.transpose(-1, -2)  # (..., C, L): each channel of each series is one spline
    missing = torch.isnan(rows).any(dim=-1)
    if not bool(missing.any()):
        coefficients = _spline_rows(t, rows)
    else:
        clean = torch.where(missing.unsqueeze(-1), torch.zeros_like(rows), rows)
        batched = _spline_rows(t, clean)
        flat = rows.reshape(-1, rows.shape[-1])
        where = missing.reshape(-1).nonzero().squeeze(-1)
        patched = [_spline_row_with_missing(t, flat[int(i)], fill_ends) for i in where]
        coefficients = []
        for k, full in enumerate(batched):
            full = full.reshape(-1, full.shape[-1]).clone()
            full[where] = torch.stack([row[k] for row in patched])
            coefficients.append(full.reshape(batched[k].shape))
    return tuple(c.transpose(-1, -2) for c in coefficients)
