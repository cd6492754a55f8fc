"""gradient="interpolated" (IRDM, ALGORITHMS.md §4): convergence to exact gradients, the nodes
read from dense output without extra evaluations, memory, the interpolation-error warning, and
a dissipative field whose backward re-solve of y is costly for backsolve."""

import warnings

import pytest
import torch

import odegrad
from odegrad.errors import InvalidInputError
from odegrad.gradients.interpolated import NodeRecorder
from odegrad.interpolation import lobatto_nodes
from odegrad.problem import Problem
from odegrad.solvers import make_solver
from test_backsolve import (
    flat_gradients,
    linear_case,
    mlp_case,
    separate_solves_reference,
)

DT = torch.float64


# Convergence to the closed-form and MLP gradients and decreasing times: tests/test_backsolve.py,
# parametrised over both continuous adjoints.


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_nodes_come_from_dense_output(direction):
    a, y0, t, _ = linear_case()
    t = direction * torch.tensor([0.0, 0.05, 1.2, 2.0], dtype=DT)  # intervals of 1 and ~20 steps
    stats: dict = {}
    problem = Problem(f=lambda s, y: a @ y, y0=y0, t=t, solver=make_solver("dopri5"),
                      rtol=1e-10, atol=1e-10, stats=stats)
    recorder = NodeRecorder(problem, 9)
    with torch.no_grad():
        problem.integrate(on_step=recorder)
    assert recorder.next == len(recorder.queue) == 3 * 7  # every interior node was filled
    for i in range(3):
        nodes = lobatto_nodes(9, float(t[i]), float(t[i + 1]))[1:-1]
        for row, x in enumerate(nodes):
            exact = torch.linalg.matrix_exp(a * x) @ y0
            assert torch.allclose(recorder.interior[i, row], exact, rtol=1e-8, atol=1e-9)


def test_no_extra_evaluations_and_checkpoint_bytes():
    field, y0, t, cotangent = mlp_case()
    y = y0.clone().requires_grad_()
    sol = odegrad.solve(field, y, t, rtol=1e-8, atol=1e-8, gradient="interpolated", n_nodes=12)
    direct = odegrad.solve(field, y0, t, rtol=1e-8, atol=1e-8)
    assert sol.stats["nfe_forward"] == direct.stats["nfe_forward"]
    assert sol.stats["n_accepted"] == direct.stats["n_accepted"]
    assert torch.allclose(sol.ys, direct.ys, rtol=0, atol=1e-14)
    nodes_kept = len(t) + (len(t) - 1) * (12 - 2)
    assert sol.stats["checkpoint_bytes"] == nodes_kept * y0.numel() * 8
    assert 0 <= sol.stats["interpolation_error"] < 1
    (sol.ys * cotangent).sum().backward()
    assert sol.stats["nfe_backward"] > 0 and sol.stats["n_steps_backward"] > 0


def test_seminorm_needs_fewer_evaluations_than_full_norm():
    field, y0, t, cotangent = mlp_case()
    counts = {}
    for norm in ("seminorm", "full"):
        _, stats = flat_gradients(field, y0, t, cotangent, rtol=1e-8, atol=1e-8,
                                  gradient="interpolated", adjoint_norm=norm)
        counts[norm] = stats["nfe_backward"]
    assert counts["seminorm"] < 0.85 * counts["full"], counts


def test_too_few_nodes_warn_and_lose_accuracy():
    field, y0, t, cotangent = mlp_case()
    t = torch.tensor([0.0, 3.0], dtype=DT)
    cotangent = cotangent[:2]
    exact = separate_solves_reference(field, y0, t, cotangent)
    with pytest.warns(RuntimeWarning, match="raise n_nodes"):
        few, stats = flat_gradients(field, y0, t, cotangent, rtol=1e-8, atol=1e-8,
                                    gradient="interpolated", n_nodes=5)
    assert stats["interpolation_error"] > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough, stats = flat_gradients(field, y0, t, cotangent, rtol=1e-8, atol=1e-8,
                                       gradient="interpolated", n_nodes=32)
    assert stats["interpolation_error"] < 1
    few_error = float((few - exact).norm() / exact.norm())
    assert 1e3 * float((enough - exact).norm() / exact.norm()) < few_error


class Dissipative(torch.nn.Module):
    """y' = −k y + θ ⊙ sin(y + t): the backward re-solve of y amplifies errors like e^{kT}."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k
        self.theta = torch.nn.Parameter(torch.tensor([0.5, -0.3], dtype=DT))

    def forward(self, t, y):
        return -self.k * y + self.theta * torch.sin(y + t)


def test_dissipative_field_fewer_backward_evaluations_than_backsolve():
    field = Dissipative(30.0)
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    cotangent = torch.ones(2, 2, dtype=DT)
    exact = separate_solves_reference(field, y0, t, cotangent)
    results = {}
    for gradient, options in (("interpolated", dict(n_nodes=32)), ("backsolve", {})):
        got, stats = flat_gradients(field, y0, t, cotangent, rtol=1e-8, atol=1e-8,
                                    gradient=gradient, **options)
        results[gradient] = (float((got - exact).norm() / exact.norm()), stats["nfe_backward"])
    # tolerance-sized (global error ~10x the local tolerance 1e-8), with 6x fewer evaluations
    assert results["interpolated"][0] < 3e-7, results
    assert results["interpolated"][1] < 0.25 * results["backsolve"][1], results


def test_fixed_step_forward():
    field, y0, t, cotangent = mlp_case()
    exact = separate_solves_reference(field, y0, t, cotangent)
    got, stats = flat_gradients(field, y0, t, cotangent, method="rk4", step_size=0.01,
                                gradient="interpolated")
    assert float((got - exact).norm() / exact.norm()) < 1e-7
    assert stats["nfe_forward"] == 4 * 200


def test_bad_n_nodes():
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    for bad in (1, 2.5, True):
        with pytest.raises(InvalidInputError, match="n_nodes"):
            odegrad.odeint(lambda s, y: -y, y0, t, gradient="interpolated", n_nodes=bad)
