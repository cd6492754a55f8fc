"""per_sample=True, gradient="discrete", checkpoints=c: at most c states per sample, the rest
recomputed by revolve in the backward pass (per_sample_checkpoints.py).

Checked against direct of each lone solve (float64, same method and tolerances) to 1e-10, and
the recomputation count against revolve's schedule over the kept positions (checkpointing.py).
"""

from __future__ import annotations

import pytest
import torch

import odegrad
from odegrad.checkpointing import OnlineCheckpoints, reverse_segments
from test_per_sample import BATCH, F64, Field, K, lone_direct_gradients, row_times


def _recomputed_forward_steps(n_steps: int, slots: int) -> int:
    """The Forward steps of revolve over the online positions that K masked steps leave."""
    online = OnlineCheckpoints(slots)
    for k in range(1, n_steps):
        online.add(k)
    schedule = reverse_segments(online.positions, n_steps, slots)
    return schedule.recomputed_steps - n_steps  # every Reverse replays its step once


@pytest.mark.parametrize("method, slots, descending", [
    ("dopri5", 3, False), ("bosh3", 2, True),
    pytest.param("tsit5", 1, False, marks=pytest.mark.slow),  # one slot: K²/2 recomputed steps
])
def test_budget_gradient_equals_lone_direct(method, slots, descending):
    field = Field(K / 50 if descending else K)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = row_times(BATCH, 4, descending).requires_grad_()
    weights = torch.randn(4, BATCH, 3, dtype=F64)
    params = [y0, t, *field.parameters()]
    options = dict(method=method, rtol=1e-5, atol=1e-8)
    sol = odegrad.solve(field, y0, t, per_sample=True, gradient="discrete", checkpoints=slots,
                        **options)
    got = torch.autograd.grad((sol.ys * weights).sum(), params)
    expected, steps = lone_direct_gradients(field, y0, t, weights, **options)
    assert sol.stats["sample_n_steps"].tolist() == steps
    for name, g, e in zip(["y0", "t", "k", "l1.w", "l1.b", "l2.w", "l2.b"], got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=name)
    n_iterations = sol.stats["n_steps"]
    assert n_iterations > slots  # the budget binds: states were recomputed
    assert sol.stats["checkpoints"] == slots
    assert sol.stats["n_recomputed_steps"] == _recomputed_forward_steps(n_iterations, slots)
    assert sol.stats["n_recomputed_steps"] > 0


def test_budget_bytes_and_recomputation_against_solution():
    """c states per sample: sample_checkpoint_bytes is c rows (below "solution"'s 1 + accepted
    steps), and the backward pass evaluates f more than "solution" does by exactly the
    recomputed masked steps (s evaluations each; dopri5 s = 7)."""
    field = Field(K)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64)
    row, slots = 3 * 8, 4
    by = {}
    for checkpoints in ("solution", slots):
        sol = odegrad.solve(field, y0, t, per_sample=True, gradient="discrete",
                            checkpoints=checkpoints)
        grads = torch.autograd.grad(sol.ys.sum(), [y0, *field.parameters()])
        by[checkpoints] = sol.stats, grads
    budget, solution = by[slots][0], by["solution"][0]
    assert budget["sample_checkpoint_bytes"].tolist() == [slots * row] * BATCH
    assert bool((solution["sample_checkpoint_bytes"] > slots * row).all())
    assert budget["checkpoint_bytes"] < solution["checkpoint_bytes"]
    assert budget["nfe_backward"] - solution["nfe_backward"] == 7 * budget["n_recomputed_steps"]
    for g, e in zip(by[slots][1], by["solution"][1]):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_budget_larger_than_the_steps_recomputes_nothing():
    field = Field(K)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 0.5, 3, dtype=F64)
    sol = odegrad.solve(field, y0, t, per_sample=True, gradient="discrete", checkpoints=10_000)
    (g,) = torch.autograd.grad(sol.ys.sum(), [y0], retain_graph=True)
    (again,) = torch.autograd.grad(sol.ys.sum(), [y0])  # the kept states survive a backward
    assert sol.stats["n_recomputed_steps"] == 0
    torch.testing.assert_close(g, again, rtol=0, atol=0)
    expected, _ = lone_direct_gradients(field, y0, t, torch.ones(3, BATCH, 3, dtype=F64))
    torch.testing.assert_close(g, expected[0], rtol=0, atol=1e-10)


def test_budget_forward_adds_no_host_sync(host_reads):
    """The online schedule's decisions depend on the step index alone: the forward pass reads
    the host once per masked step, as with "all" (test_per_sample: the same count)."""
    y0 = torch.randn(BATCH, 2, dtype=F64)
    t = row_times(BATCH, 8)
    k = K.clone()

    def f(s, y):
        return -k[:, None] * y + torch.sin(s)[:, None]

    calls = host_reads
    overheads = {}
    for checkpoints in ("all", 3):
        calls["n"] = 0
        sol = odegrad.solve(f, y0, t, per_sample=True, rtol=1e-6, atol=1e-10,
                            gradient="discrete", checkpoints=checkpoints)
        overheads[checkpoints] = calls["n"] - sol.stats["n_steps"]
        assert sol.stats["n_steps"] > 10
    assert overheads[3] == overheads["all"] <= 6, overheads


def test_budget_with_a_single_output_time():
    y0 = torch.randn(BATCH, 2, dtype=F64, requires_grad=True)
    sol = odegrad.solve(lambda s, y: -y, y0, torch.zeros(BATCH, 1, dtype=F64), per_sample=True,
                        gradient="discrete", checkpoints=2)
    (g,) = torch.autograd.grad(sol.ys.sum(), [y0])
    torch.testing.assert_close(g, torch.ones_like(y0), rtol=0, atol=0)
    assert sol.stats["checkpoint_bytes"] == 0
