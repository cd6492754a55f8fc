"""Chebyshev–Lobatto nodes and barycentric interpolation through them (ALGORITHMS.md §4).

On the n Lobatto points x_j = (a + b)/2 + (b − a)/2 · cos(jπ/(n−1)) of [a, b] the polynomial
through values y_j is, in the second (true) barycentric form,

    p(t) = Σ_j [w_j/(t − x_j)] y_j / Σ_j [w_j/(t − x_j)],   w_j = (−1)^j δ_j,

with δ_0 = δ_{n−1} = ½ and δ_j = 1 otherwise (Berrut & Trefethen 2004, (5.4)); p(x_j) = y_j.
These weights are what makes the interpolant converge spectrally for smooth data: weights of
first-kind Chebyshev points used on Lobatto nodes still interpolate, but only to ~1e-6.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "lobatto_nodes", "lobatto_weights", "barycentric", "BarycentricInterpolant", "chebyshev_tail",
]


def lobatto_nodes(n: int, start: float, end: float) -> list[float]:
    """x_j = (start + end)/2 + (end − start)/2 · cos(jπ/(n−1)), j = 0…n−1: x_0 = end,
    x_{n−1} = start (exactly), symmetric about the midpoint to the last bit."""
    if n < 2:
        raise ValueError(f"Chebyshev–Lobatto interpolation needs n >= 2 nodes, got {n}")
    mid, half = 0.5 * (start + end), 0.5 * (end - start)
    # cos(jπ/(n−1)) written as sin(π(n−1−2j)/(2(n−1))): exactly antisymmetric in j.
    nodes = [mid + half * math.sin(math.pi * (n - 1 - 2 * j) / (2 * (n - 1))) for j in range(n)]
    nodes[0], nodes[-1] = end, start
    return nodes


def lobatto_weights(n: int, dtype=torch.float64, device=None) -> Tensor:
    """w_j = (−1)^j δ_j, δ_0 = δ_{n−1} = ½, else 1 (the barycentric weights of Lobatto points)."""
    w = torch.ones(n, dtype=dtype, device=device)
    w[1::2] = -1.0
    w[0] *= 0.5
    w[-1] *= 0.5
    return w


def barycentric(t: Tensor, nodes: Tensor, weights: Tensor, values: Tensor) -> Tensor:
    """p(t) through (nodes[j], values[j]) with barycentric weights `weights`.

    t: any shape (...); nodes, weights: (n,); values: (n, *shape). Returns (..., *shape).
    At a node, w_j/(t − x_j) is infinite: the normalised coefficients are then NaN there and
    0 elsewhere, and NaN → 1 returns values[j] itself. Six kernels, no host synchronisation.
    """
    c = weights / (t.unsqueeze(-1) - nodes)
    c = torch.nan_to_num(c / c.sum(dim=-1, keepdim=True), nan=1.0)
    flat = values.reshape(values.shape[0], -1)
    return (c @ flat).reshape(t.shape + values.shape[1:])


class BarycentricInterpolant:
    """The polynomial through `values` at the n Lobatto nodes of [start, end] (§4).

    values[j] is y(x_j) with x_j from `lobatto_nodes(n, start, end)` (values[0] at `end`).
    """

    def __init__(self, start: float, end: float, values: Tensor):
        n = values.shape[0]
        self.nodes = torch.tensor(
            lobatto_nodes(n, start, end), dtype=values.dtype, device=values.device
        )
        self.weights = lobatto_weights(n, dtype=values.dtype, device=values.device)
        self.values = values

    def __call__(self, t: Tensor) -> Tensor:
        return barycentric(t, self.nodes, self.weights, self.values)


def chebyshev_tail(values: Tensor) -> Tensor:
    """|c_{n−2}| + |c_{n−1}|: the last two Chebyshev coefficients of the interpolant through
    values at the n Lobatto nodes, an estimate of its error (Trefethen, ATAP ch. 4).

    With N = n − 1 and s_j = cos(jπ/N): c_N = (1/N) Σ_j w_j y_j and
    c_{N−1} = (2/N) Σ_j w_j s_j y_j, w the Lobatto barycentric weights.
    """
    n = values.shape[0]
    if n < 3:
        return torch.zeros_like(values[0])
    w = lobatto_weights(n, dtype=values.dtype, device=values.device)
    s = torch.tensor(lobatto_nodes(n, -1.0, 1.0), dtype=values.dtype, device=values.device)
    flat = values.reshape(n, -1)
    last = (w @ flat) / (n - 1)
    before = (2.0 * (w * s) @ flat) / (n - 1)
    return (last.abs() + before.abs()).reshape(values.shape[1:])
