"""per_sample=True with gradient="reversible", "backsolve" and "interpolated" (issue #17).

Each per-sample result is checked against the same samples solved alone (float64, the same
tolerances, each sample with its own output times): reversible against direct of the lone solve
(exact, 1e-10); backsolve / interpolated against the lone solve's backsolve / interpolated (the
same backward steps per sample) and, as the tolerances shrink, against the exact gradient.
"""

from __future__ import annotations

import pytest
import torch

import odegrad
from odegrad.errors import InvalidInputError, UnsupportedCombinationError

F64 = torch.float64
RATES = torch.tensor([0.3, 1.0, 3.0], dtype=F64)
# Reversible schemes: mildly dissipative rates (the leapfrog and reversible Heun are only
# marginally stable, and McCallum–Foster's coupling limits h|a| on dissipative modes).
GENTLE = torch.tensor([0.1, 0.3, 0.6], dtype=F64)


class Field:
    """y' = −k_b y + tanh(y W) cos(t): sample b has its own rate k_b (f sees which samples it
    gets through `rows`)."""

    def __init__(self, seed: int = 0, d: int = 3, rates=RATES):
        self.rates = rates
        generator = torch.Generator().manual_seed(seed)
        self.W = (0.5 * torch.randn(d, d, generator=generator, dtype=F64)).requires_grad_()
        self.rows = slice(None)

    def __call__(self, t, y):
        t = t.reshape(-1, 1) if t.dim() else t
        return -self.rates[self.rows, None] * y + torch.tanh(y @ self.W) * torch.cos(t)


def _problem(seed: int = 0, rates=RATES):
    generator = torch.Generator().manual_seed(seed + 1)
    y0 = torch.randn(3, 3, generator=generator, dtype=F64).requires_grad_()
    times = torch.tensor([[0.0, 0.3, 0.9, 1.5], [0.1, 0.5, 1.2, 2.0], [0.0, -0.2, -0.4, -0.6]],
                         dtype=F64)
    weights = torch.randn(4, 3, 3, generator=generator, dtype=F64)  # other weights per sample
    return Field(seed, rates=rates), y0, times.requires_grad_(), weights


def _loss(ys, weights):
    return (weights * ys + 0.5 * ys**2).sum()


def _lone(field, y0, times, weights, b, **kwargs):
    """Sample b solved alone: its outputs and the gradient of its part of the loss w.r.t.
    (y0, t, W), shaped as the batch's (zero in the other samples' rows)."""
    field.rows = slice(b, b + 1)
    try:
        sol = odegrad.solve(field, y0[b:b + 1], times[b], params=[field.W], **kwargs)
        loss = _loss(sol.ys[:, 0], weights[:, b])
        grads = torch.autograd.grad(loss, [y0, times, field.W], allow_unused=True)
    finally:
        field.rows = slice(None)
    _lone.stats = sol.stats
    return sol.ys[:, 0].detach(), [torch.zeros_like(x) if g is None else g
                                   for g, x in zip(grads, [y0, times, field.W])]


def _per_sample(field, y0, times, weights, **kwargs):
    sol = odegrad.solve(field, y0, times, params=[field.W], per_sample=True, **kwargs)
    grads = torch.autograd.grad(_loss(sol.ys, weights), [y0, times, field.W])
    return sol, list(grads)


def _lone_sum(field, y0, times, weights, **kwargs):
    """Every sample alone: outputs (n_times, batch, ...) and the summed gradients (and each
    lone solve's stats in `_lone_sum.stats`)."""
    outs, total = [], None
    _lone_sum.stats = []
    for b in range(y0.shape[0]):
        ys, grads = _lone(field, y0, times, weights, b, **kwargs)
        _lone_sum.stats.append(_lone.stats)
        outs.append(ys)
        total = grads if total is None else [a + g for a, g in zip(total, grads)]
    return torch.stack(outs, dim=1), total


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# (method, rtol): the second-order leapfrog and Heun at a looser tolerance (their first-order
# error estimates take many steps); step_size=0.5 forces rejected first attempts.
REVERSIBLE_CASES = [("alf", 1e-3), ("reversible_heun", 1e-3), ("reversible_bosh3", 1e-5),
                    ("dopri5", 1e-5)]


@pytest.mark.parametrize("method, rtol", REVERSIBLE_CASES)
def test_reversible_equals_lone_direct(method, rtol):
    field, y0, times, weights = _problem(rates=GENTLE)
    tolerances = dict(rtol=rtol, atol=rtol * 1e-2, step_size=0.5)
    sol, grads = _per_sample(field, y0, times, weights, method=method, gradient="reversible",
                             **tolerances)
    lone_method = "reversible_dopri5" if method == "dopri5" else method  # dopri5 is wrapped
    ys, lone = _lone_sum(field, y0, times, weights, method=lone_method, gradient="direct",
                         **tolerances)
    assert float((sol.ys.detach() - ys).abs().max()) < 1e-12
    for name, g, ref in zip(("y0", "t", "W"), grads, lone):
        assert _relative(g, ref) < 1e-10, name
    assert sol.stats["drift"] < 1e-8
    assert int(sol.stats["sample_n_rejected"].sum()) > 0
    # memory: the final augmented state and the per-step scalar records only
    state_bytes = 2 * y0.numel() * 8
    steps = int(sol.stats["n_steps"])
    assert state_bytes < sol.stats["checkpoint_bytes"] <= state_bytes + steps * 3 * (8 * 3 + 3 * 9)


def test_reversible_steps_are_each_samples_own():
    field, y0, times, weights = _problem(rates=GENTLE)
    kwargs = dict(method="reversible_bosh3", rtol=1e-5, atol=1e-7, step_size=0.5)
    sol = odegrad.solve(field, y0.detach(), times.detach(), gradient="reversible",
                        per_sample=True, params=[field.W], **kwargs)
    for b in range(3):
        field.rows = slice(b, b + 1)
        lone = odegrad.solve(field, y0[b:b + 1].detach(), times[b].detach(), **kwargs)
        assert int(sol.stats["sample_n_accepted"][b]) == lone.stats["n_accepted"]
        assert int(sol.stats["sample_n_rejected"][b]) == lone.stats["n_rejected"]


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_continuous_adjoint_equals_lone(gradient):
    field, y0, times, weights = _problem()
    kwargs = dict(method="dopri5", gradient=gradient, rtol=1e-6, atol=1e-8)
    sol, grads = _per_sample(field, y0, times, weights, **kwargs)
    ys, lone = _lone_sum(field, y0, times, weights, **kwargs)
    assert float((sol.ys.detach() - ys).abs().max()) < 1e-12
    # the same backward steps per sample: equal up to round-off
    for name, g, ref in zip(("y0", "t", "W"), grads, lone):
        assert _relative(g, ref) < 1e-10, name
    stats = sol.stats
    for key in ("n_accepted", "n_rejected"):  # each sample's own backward steps
        lone_counts = [lone_stats[f"{key}_backward"] for lone_stats in _lone_sum.stats]
        assert stats[f"sample_{key}_backward"].tolist() == lone_counts
    assert stats["sample_n_accepted_backward"].tolist() != [stats["n_steps_backward"]] * 3
    # memory: the outputs (and the interpolated adjoint's interior nodes), as the lone solves
    n_nodes = 16 - 2 if gradient == "interpolated" else 0
    intervals = times.shape[1] - 1
    assert stats["checkpoint_bytes"] == 8 * (sol.ys.numel() + intervals * n_nodes * y0.numel())


@pytest.mark.slow  # ~2 s each; test_guard's per-sample dopri5 combinations check it fast
@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_continuous_adjoint_converges_to_exact(gradient):
    field, y0, times, weights = _problem()
    _, exact = _lone_sum(field, y0, times, weights, method="dopri5", gradient="direct",
                         rtol=1e-11, atol=1e-13)
    errors = []
    for tol in (1e-4, 1e-8):
        _, grads = _per_sample(field, y0, times, weights, method="dopri5", gradient=gradient,
                               rtol=tol, atol=tol * 1e-2)
        errors.append(max(_relative(g, ref) for g, ref in zip(grads, exact)))
    assert errors[1] < 1e-6
    assert errors[1] < errors[0] / 100


def test_adjoint_options_are_honoured():
    field, y0, times, weights = _problem()
    base = dict(method="dopri5", gradient="backsolve", rtol=1e-6, atol=1e-8)
    options = dict(adjoint_method="bosh3", adjoint_rtol=1e-5, adjoint_atol=1e-7,
                   adjoint_step_size=0.05)
    sol, grads = _per_sample(field, y0, times, weights, **base, **options)
    _, lone = _lone_sum(field, y0, times, weights, **base, **options)
    for g, ref in zip(grads, lone):
        assert _relative(g, ref) < 1e-10
    plain, _ = _per_sample(field, y0, times, weights, **base)
    assert sol.stats["nfe_backward"] != plain.stats["nfe_backward"]


@pytest.mark.parametrize("gradient, options, error, match", [
    ("backsolve", dict(adjoint_norm="full"), UnsupportedCombinationError, "adjoint_norm"),
    ("backsolve", dict(adjoint_norm="max"), InvalidInputError, "adjoint_norm"),
    ("interpolated", dict(adjoint_on_accept=print), UnsupportedCombinationError,
     "adjoint_on_accept"),
    ("backsolve", dict(adjoint_method="kvaerno3"), UnsupportedCombinationError,
     "adjoint_method"),
    ("backsolve", dict(adjoint_method="rk4"), UnsupportedCombinationError, "adjoint_method"),
    ("interpolated", dict(n_nodes=1), InvalidInputError, "n_nodes"),
    ("backsolve", dict(adjoint_step_size=-1.0), InvalidInputError, "adjoint_step_size"),
    ("backsolve", dict(checkpoints=4), UnsupportedCombinationError, "checkpoints"),
    ("reversible", dict(method="rk4"), UnsupportedCombinationError, "rk4"),
    ("reversible", dict(method="kvaerno3"), UnsupportedCombinationError, "kvaerno3"),
    ("reversible", dict(method="dopri5", eta=0.9), InvalidInputError, "eta"),
    ("reversible", dict(method="alf", coupling=0.9), InvalidInputError, "coupling"),
])
def test_unsupported_options_raise_by_name(gradient, options, error, match):
    field, y0, times, _ = _problem()
    options = {"method": "dopri5", **options}
    with pytest.raises(error, match=match):
        odegrad.solve(field, y0, times, gradient=gradient, params=[field.W], per_sample=True,
                      **options)


def test_reversible_options_reach_the_scheme():
    field, y0, times, weights = _problem(rates=GENTLE)
    for method, options in (("alf", dict(eta=0.99, rtol=1e-3, atol=1e-5)),
                            ("dopri5", dict(coupling=0.99, rtol=1e-5, atol=1e-7))):
        _, grads = _per_sample(field, y0, times, weights, method=method, gradient="reversible",
                               **options)
        lone_method = "reversible_dopri5" if method == "dopri5" else method
        _, lone = _lone_sum(field, y0, times, weights, method=lone_method, gradient="direct",
                            **options)
        for g, ref in zip(grads, lone):
            assert _relative(g, ref) < 1e-9


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated", "reversible"])
def test_random_f_is_refused(gradient):
    """The backward pass evaluates f again: a dropout in training mode would draw new masks."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).to(F64)
    _, y0, times, _ = _problem()

    def f(t, y):
        return net(y)

    with pytest.raises(UnsupportedCombinationError, match="random"):
        odegrad.solve(f, y0, times, method="dopri5", gradient=gradient,
                      params=list(net.parameters()), per_sample=True)
