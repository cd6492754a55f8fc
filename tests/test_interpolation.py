"""Chebyshev–Lobatto nodes and barycentric interpolation (ALGORITHMS.md §4), against numpy's
Chebyshev polynomials."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev

from odegrad.interpolation import (
    BarycentricInterpolant,
    barycentric,
    chebyshev_tail,
    lobatto_nodes,
    lobatto_weights,
)

DT = torch.float64


def smooth(t):
    return torch.exp(torch.sin(3 * t))


def max_error(n: int, start: float, end: float, weights=None) -> float:
    nodes = torch.tensor(lobatto_nodes(n, start, end), dtype=DT)
    values = smooth(nodes)
    grid = torch.linspace(start, end, 4001, dtype=DT)
    if weights is None:
        approx = BarycentricInterpolant(start, end, values)(grid)
    else:
        approx = barycentric(grid, nodes, weights, values)
    return float((approx - smooth(grid)).abs().max())


def first_kind_weights(n: int) -> torch.Tensor:
    """Barycentric weights of first-kind Chebyshev points, (−1)^j sin((2j+1)π/(2n)): the
    original IRDM code used these on Lobatto nodes."""
    return torch.tensor([(-1) ** j * math.sin((2 * j + 1) * math.pi / (2 * n)) for j in range(n)],
                        dtype=DT)


def test_nodes_are_chebyshev_lobatto_points():
    n, start, end = 9, 0.5, 2.5
    nodes = lobatto_nodes(n, start, end)
    expected = [1.5 + math.cos(j * math.pi / (n - 1)) for j in range(n)]
    assert nodes[0] == end and nodes[-1] == start
    assert np.allclose(nodes, expected, atol=1e-15, rtol=0)
    assert all(a + b == 2 * 1.5 for a, b in zip(nodes, reversed(nodes)))  # exactly symmetric
    assert lobatto_weights(5).tolist() == [0.5, -1.0, 1.0, -1.0, 0.5]


def test_same_polynomial_as_numpy_chebyshev_interpolation():
    n = 20
    nodes = lobatto_nodes(n, 0.0, 2.0)
    values = smooth(torch.tensor(nodes, dtype=DT))
    coefficients = chebyshev.chebfit(np.array(nodes) - 1.0, values.numpy(), n - 1)
    grid = np.linspace(0.0, 2.0, 1001)
    ours = BarycentricInterpolant(0.0, 2.0, values)(torch.tensor(grid, dtype=DT)).numpy()
    assert np.abs(ours - chebyshev.chebval(grid - 1.0, coefficients)).max() < 1e-13


def test_reproduces_polynomials_and_node_values():
    n = 12
    coefficients = np.random.default_rng(0).standard_normal(n)
    nodes = lobatto_nodes(n, -3.0, 1.0)
    values = torch.tensor(np.polyval(coefficients, nodes), dtype=DT)
    interpolant = BarycentricInterpolant(-3.0, 1.0, values)
    grid = np.linspace(-3.0, 1.0, 501)
    exact = np.polyval(coefficients, grid)
    error = np.abs(interpolant(torch.tensor(grid, dtype=DT)).numpy() - exact).max()
    assert error < 1e-13 * np.abs(exact).max()
    # at a node the value itself, exactly
    assert torch.equal(interpolant(torch.tensor(nodes, dtype=DT)), values)


def test_spectral_accuracy_on_exp_sin():
    # Degree 31 on [0, 2] cannot do better than ~3e-10 here: numpy's Chebyshev interpolant
    # of the same degree has that error too. Halving the interval or adding nodes reaches
    # round-off.
    numpy_error = np.abs(
        chebyshev.chebval(np.linspace(-1, 1, 4001),
                          chebyshev.chebinterpolate(lambda s: np.exp(np.sin(3 * (s + 1))), 31))
        - np.exp(np.sin(3 * (np.linspace(-1, 1, 4001) + 1)))
    ).max()
    assert max_error(32, 0.0, 2.0) < 2 * numpy_error < 1e-9
    assert max_error(32, 0.0, 1.0) < 1e-13
    assert max_error(48, 0.0, 2.0) < 1e-13


@pytest.mark.parametrize("n, end", [(24, 2.0), (32, 2.0), (48, 2.0), (32, 1.0)])
def test_first_kind_weights_on_lobatto_nodes_lose_spectral_accuracy(n, end):
    # ALGORITHMS.md §4: 7e-7 instead of ~1e-15 at n = 32 (on an interval of length 1)
    lobatto, first_kind = max_error(n, 0.0, end), max_error(n, 0.0, end, first_kind_weights(n))
    assert first_kind > 1e-7
    assert first_kind > 40 * lobatto


def test_decreasing_interval_and_batched_values():
    values = torch.randn(7, 2, 3, dtype=DT)
    forward = BarycentricInterpolant(0.0, 1.0, values)
    # the same points listed from the other end
    backward = BarycentricInterpolant(1.0, 0.0, values.flip(0))
    t = torch.tensor([0.1, 0.5, 0.77], dtype=DT)
    assert forward(t).shape == (3, 2, 3)
    assert torch.allclose(forward(t), backward(t), rtol=1e-13, atol=1e-13)
    assert forward(torch.tensor(0.3, dtype=DT)).shape == (2, 3)


def test_float32_at_and_near_nodes():
    values = torch.randn(9, 4)
    interpolant = BarycentricInterpolant(0.0, 1.0, values)
    nodes = interpolant.nodes
    assert torch.equal(interpolant(nodes), values)
    near = interpolant(nodes[3] + 1e-7)
    assert torch.isfinite(near).all() and torch.allclose(near, values[3], atol=1e-4)


def test_chebyshev_tail_is_the_last_two_coefficients():
    n = 14
    nodes = lobatto_nodes(n, 0.0, 2.0)
    values = smooth(torch.tensor(nodes, dtype=DT))
    coefficients = chebyshev.chebfit(np.array(nodes) - 1.0, values.numpy(), n - 1)
    expected = abs(coefficients[-1]) + abs(coefficients[-2])
    assert float(chebyshev_tail(values)) == pytest.approx(expected, rel=1e-10)
