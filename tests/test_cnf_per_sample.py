"""CNF(per_sample=True) and `odegrad train cnf --per-sample`: each sample's log-density solved
with its own adaptive steps equals the lone solve of that sample (float64, same tolerances),
values to 1e-10 and parameter gradients (direct and discrete) to 1e-10; Hutchinson's ε is one
row per sample, fixed through the solve."""

from __future__ import annotations

import json
import math

import pytest
import torch

from odegrad.cli import main
from odegrad.models import CNF

F64 = torch.float64
TOL = dict(rtol=1e-7, atol=1e-8)


def _pair(trace: str, **solver) -> tuple[CNF, CNF]:
    """A per-sample CNF and a shared-step CNF with the same parameters."""
    torch.manual_seed(3)
    batched = CNF(2, hidden=(12, 12), trace=trace, per_sample=True, **solver).double()
    alone = CNF(2, hidden=(12, 12), trace=trace, **solver).double()
    alone.load_state_dict(batched.state_dict())
    return batched, alone


def _points() -> torch.Tensor:
    torch.manual_seed(4)  # spread over scales, so the samples take different steps
    return torch.randn(4, 2, dtype=F64) * torch.tensor([[0.1], [1.0], [3.0], [6.0]], dtype=F64)


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_per_sample_log_prob_and_gradients_equal_lone_solves(gradient):
    batched, alone = _pair("exact", gradient=gradient, **TOL)
    x = _points()
    log_p = batched.log_prob(x)
    steps = batched.block.stats["sample_n_steps"].tolist()
    assert len(set(steps)) > 1  # the samples do step differently
    got = torch.autograd.grad(log_p.sum(), list(batched.parameters()))
    expected = [torch.zeros_like(p) for p in alone.parameters()]
    for b in range(len(x)):
        lone = alone.log_prob(x[b:b + 1])
        assert alone.block.stats["n_steps"] == steps[b]
        torch.testing.assert_close(log_p[b], lone[0], rtol=0, atol=1e-10)
        for e, g in zip(expected, torch.autograd.grad(lone.sum(), list(alone.parameters()))):
            e += g
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_hutchinson_noise_is_one_row_per_sample_fixed_through_the_solve():
    batched, alone = _pair("hutchinson", **TOL)
    x = _points()
    torch.manual_seed(5)
    log_p = batched.log_prob(x)
    noise = batched.dynamics.noise
    assert noise.shape == x.shape and set(noise.unique().tolist()) <= {-1.0, 1.0}
    # The estimate is a deterministic function of (x, ε): the same ε gives the same value,
    # and sample b's value is its lone solve's with ε_b.
    torch.testing.assert_close(batched.log_prob(x, noise=noise), log_p, rtol=0, atol=0)
    for b in range(len(x)):
        lone = alone.log_prob(x[b:b + 1], noise=noise[b:b + 1])
        torch.testing.assert_close(log_p[b], lone[0], rtol=0, atol=1e-10)


def test_train_cnf_per_sample_runs(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "cnf", "--per-sample", "--n-train", "64", "--n-test", "32",
                 "--hidden", "8", "--batch-size", "32", "--grid", "8", "--rtol", "1e-3",
                 "--atol", "1e-3", "--epochs", "1", "--max-iters", "2", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and math.isfinite(summary["final"]["test_nll"])
