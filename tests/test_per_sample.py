"""per_sample=True: each sample of the batch solved as if alone (issue 17, first slice).

Every check compares against odegrad.solve on each sample alone (float64, same method and
tolerances): the outputs to 1e-12 (absolute plus relative: the dense-output weights b_i(θ) are
summed by NumPy on the host in the lone solve and by torch here, which differ in the last bits,
~1e-13 relative for dopri8), the step counts exactly, and gradient="direct" to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import odegrad
from odegrad.errors import (
    InvalidInputError,
    MaxStepsExceededError,
    NonFiniteError,
    UnknownNameError,
    UnsupportedCombinationError,
)

F64 = torch.float64
BATCH = 4
K = torch.logspace(0, 2, BATCH, dtype=F64)  # stiffness spread 100x


def batch_field(k: torch.Tensor, w: float = 2.0):
    """y0' = −k y0 + w y1, y1' = −k y1 − w y0 + sin(t): elementwise, so row b of the batched
    f is bit for bit the lone f of sample b (no batched matmul)."""

    def f(t, y):
        a, b = y[..., 0], y[..., 1]  # k and t: (batch,) on the batch, 0-dim alone
        return torch.stack([-k * a + w * b, -k * b - w * a + torch.sin(t)], dim=-1)

    return f


class Field(torch.nn.Module):
    """y' = −k_b y + MLP(y, t): a shared MLP, a per-sample decay rate (the issue's example)."""

    def __init__(self, k: torch.Tensor, dim: int = 3, hidden: int = 8):
        super().__init__()
        self.k = torch.nn.Parameter(k.clone())
        self.l1 = torch.nn.Linear(dim + 1, hidden, dtype=F64)
        self.l2 = torch.nn.Linear(hidden, dim, dtype=F64)

    def forward(self, t, y):
        tt = t.reshape(-1, 1) if t.dim() else t.reshape(1)
        k = self.k.reshape(-1, 1) if t.dim() else self.k
        return -k * y + self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))


class Lone(torch.nn.Module):
    """Sample b of Field, on its own (sharing Field's parameters)."""

    def __init__(self, field: Field, b: int):
        super().__init__()
        self.field, self.b = field, b

    def forward(self, t, y):
        h = torch.tanh(self.field.l1(torch.cat([y, t.reshape(1)])))
        return -self.field.k[self.b] * y + self.field.l2(h)


def row_times(batch: int, n: int, descending: bool = False) -> torch.Tensor:
    """Per-sample output times: each row its own start, end and spacing."""
    start = torch.rand(batch, 1, dtype=F64)
    gaps = 0.05 + torch.rand(batch, n - 1, dtype=F64) * 0.4
    rows = torch.cat([start, start + gaps.cumsum(1)], dim=1)
    return rows.flip(1) if descending else rows


def lone(f, y0, t, **kwargs):
    return odegrad.solve(f, y0, t, **kwargs)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "fehlberg2", "dopri8"])
def test_outputs_and_steps_equal_lone_solves(method):
    y0 = torch.randn(BATCH, 2, dtype=F64)
    t = row_times(BATCH, 6)
    t[1] = t[1].flip(0)  # one sample integrates backwards in time
    rtol = 1e-5 if method in ("bosh3", "fehlberg2") else 1e-7
    options = dict(method=method, rtol=rtol, atol=1e-9)
    sol = odegrad.solve(batch_field(K), y0, t, per_sample=True, **options)
    assert sol.ys.shape == (6, BATCH, 2)
    for b in range(BATCH):
        alone = lone(batch_field(K[b]), y0[b], t[b], **options)
        torch.testing.assert_close(sol.ys[:, b], alone.ys, rtol=1e-12, atol=1e-12)
        assert int(sol.stats["sample_n_steps"][b]) == alone.stats["n_steps"]
        assert int(sol.stats["sample_n_rejected"][b]) == alone.stats["n_rejected"]
        assert int(sol.stats["sample_nfe"][b]) == alone.stats["nfe_forward"]
    assert sol.stats["n_steps"] == int(sol.stats["sample_n_steps"].max())


def test_mlp_field_shared_times_and_options():
    """A shared MLP (batched matmuls), a shared 1-D t, a given first step, step bounds and a
    per-sample rtol."""
    field = Field(K)
    y0 = torch.randn(BATCH, 3, dtype=F64)
    t = torch.linspace(0.0, 1.5, 5, dtype=F64)
    rtol = torch.tensor([1e-5, 1e-6, 1e-7, 1e-8], dtype=F64).reshape(BATCH, 1)
    options = dict(method="dopri5", atol=1e-9, max_step=0.2, min_step=1e-9, first_step=1e-3)
    with torch.no_grad():
        sol = odegrad.solve(field, y0, t, per_sample=True, rtol=rtol, **options)
        for b in range(BATCH):
            alone = lone(Lone(field, b), y0[b], t, rtol=float(rtol[b]), **options)
            torch.testing.assert_close(sol.ys[:, b], alone.ys, rtol=1e-12, atol=1e-12)
            assert int(sol.stats["sample_n_steps"][b]) == alone.stats["n_steps"]


def test_float32_follows_lone_solves():
    y0 = torch.randn(BATCH, 2)
    t = row_times(BATCH, 4).float()
    sol = odegrad.solve(batch_field(K.float()), y0, t, per_sample=True, rtol=1e-5, atol=1e-7)
    for b in range(BATCH):
        alone = lone(batch_field(K[b].float()), y0[b], t[b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sol.ys[:, b], alone.ys, rtol=1e-5, atol=1e-6)


def test_single_time_returns_y0():
    y0 = torch.randn(BATCH, 2, dtype=F64)
    sol = odegrad.solve(batch_field(K), y0, torch.zeros(BATCH, 1, dtype=F64), per_sample=True)
    assert sol.ys.shape == (1, BATCH, 2) and torch.equal(sol.ys[0], y0)


def test_direct_gradient_equals_lone_direct():
    """∂L/∂y0, ∂L/∂t (per-sample rows) and ∂L/∂θ (shared MLP and per-sample k) against direct
    of the lone solves, with L = Σ_b <w_b, y_b(t_b)>."""
    field = Field(K)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = row_times(BATCH, 4).requires_grad_()
    weights = torch.randn(4, BATCH, 3, dtype=F64)
    params = [y0, t, *field.parameters()]
    sol = odegrad.solve(field, y0, t, per_sample=True, rtol=1e-7, atol=1e-9)
    got = torch.autograd.grad((sol.ys * weights).sum(), params)

    expected = [torch.zeros_like(p) for p in params]
    for b in range(BATCH):
        y0_b = y0.detach()[b].clone().requires_grad_()
        t_b = t.detach()[b].clone().requires_grad_()
        ys = lone(Lone(field, b), y0_b, t_b, rtol=1e-7, atol=1e-9).ys
        grads = torch.autograd.grad((ys * weights[:, b]).sum(), [y0_b, t_b, *field.parameters()])
        expected[0][b], expected[1][b] = grads[0], grads[1]
        for e, g in zip(expected[2:], grads[2:]):
            e += g
    for name, g, e in zip(["y0", "t", "k", "l1.w", "l1.b", "l2.w", "l2.b"], got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=name)


def test_host_syncs_at_most_one_per_step(monkeypatch):
    """Count the tensor-to-host reads (item, tolist, bool, float, int) during a solve: one per
    masked step, plus a constant for the input checks."""
    y0 = torch.randn(BATCH, 2, dtype=F64)
    t = row_times(BATCH, 8)
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    overheads = []
    for rtol in (1e-4, 1e-8):
        calls["n"] = 0
        sol = odegrad.solve(batch_field(K), y0, t, per_sample=True, rtol=rtol, atol=1e-10)
        overheads.append(calls["n"] - sol.stats["n_steps"])
        assert sol.stats["n_steps"] > 10
    assert overheads[0] == overheads[1] and overheads[0] <= 6, overheads


def test_batchnorm_in_training_mode_is_refused():
    field = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).double()
    y0, t = torch.randn(BATCH, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InvalidInputError, match="BatchNorm"):
        odegrad.solve(_TimeFree(field), y0, t, per_sample=True)
    field.eval()
    sol = odegrad.solve(_TimeFree(field), y0, t, per_sample=True)
    assert torch.isfinite(sol.ys).all()


class _TimeFree(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gradient="discrete"), UnsupportedCombinationError, "gradient='direct'"),
    (dict(gradient="backsolve"), UnsupportedCombinationError, "gradient='direct'"),
    (dict(gradient="nonsense"), UnknownNameError, "unknown gradient"),
    (dict(method="rk4"), UnsupportedCombinationError, "dopri5"),
    (dict(method="implicit_euler"), UnsupportedCombinationError, "per_sample"),
    (dict(adaptive=False, step_size=0.1), UnsupportedCombinationError, "adaptive=False"),
    (dict(norm=lambda x: x.abs().max()), UnsupportedCombinationError, "norm="),
    (dict(step_t=[0.5]), UnsupportedCombinationError, "step_t="),
    (dict(on_accept=lambda t, y, h: None), UnsupportedCombinationError, "on_accept="),
    (dict(event_fn=lambda t, y: y[..., 0]), UnsupportedCombinationError, "event_fn="),
    (dict(checkpoints="all"), UnsupportedCombinationError, "checkpoints="),
    (dict(coupling=0.5), UnknownNameError, "coupling"),
    (dict(per_sample=1), InvalidInputError, "per_sample must be"),
])
def test_unsupported_options_raise(kwargs, error, match):
    y0, t = torch.randn(BATCH, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    kwargs = {"per_sample": True, **kwargs}
    with pytest.raises(error, match=match):
        odegrad.solve(batch_field(K), y0, t, **kwargs)


def test_bad_inputs_raise():
    f, y0 = batch_field(K), torch.randn(BATCH, 2, dtype=F64)
    with pytest.raises(InvalidInputError, match=r"\(batch, n_times\)"):
        odegrad.solve(f, y0, torch.zeros(BATCH + 1, 3, dtype=F64), per_sample=True)
    t = row_times(BATCH, 3)
    t[2, 1] = t[2, 0]
    with pytest.raises(InvalidInputError, match=r"t\[2\] must be strictly"):
        odegrad.solve(f, y0, t, per_sample=True)
    with pytest.raises(UnsupportedCombinationError, match="tuple"):
        odegrad.solve(f, (y0, y0), row_times(BATCH, 3), per_sample=True)
    with pytest.raises(InvalidInputError, match="shape"):
        odegrad.solve(lambda t, y: y[:1], y0, row_times(BATCH, 3), per_sample=True)


def test_failures_name_the_sample():
    y0, t = torch.randn(BATCH, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    needs = [lone(batch_field(K[b]), y0[b], t, rtol=1e-7).stats["n_steps"] for b in range(BATCH)]
    first = next(b for b in range(BATCH) if needs[b] > 40)  # every sample counts its own steps
    with pytest.raises(MaxStepsExceededError, match=f"sample {first} "):
        odegrad.solve(batch_field(K), y0, t, per_sample=True, rtol=1e-7, max_steps=40)

    def blows_up(t, y):
        bad = (torch.arange(BATCH) == 2).reshape(-1, 1) & (t > 0.5).reshape(-1, 1)
        return torch.where(bad, torch.nan, -y)

    with pytest.raises(NonFiniteError, match="sample 2"):
        odegrad.solve(blows_up, y0, t, per_sample=True)


def test_direct_gradient_after_overflowing_trial_steps():
    """A first step of 1000 on y' = −k y³ overflows (inf stages) and is rejected, several times:
    the gradient stays finite and equals direct of the lone solves (the overflowing attempts
    are redone with h = 0, so the graph holds no 0 · inf)."""
    k = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 500.0, 1000.0], dtype=F64)
    sol = odegrad.solve(lambda s, y: -k.reshape(-1, 1) * y**3, y0, t, per_sample=True,
                        first_step=1e4)
    got = torch.autograd.grad(sol.ys.sum(), [y0, k])
    for b in range(2):
        y0_b = y0.detach()[b].clone().requires_grad_()
        k_b = k.detach()[b].clone().requires_grad_()
        alone = odegrad.solve(lambda s, y, k_b=k_b: -k_b * y**3, y0_b, t, first_step=1e4)
        assert alone.stats["n_rejected"] > 0
        expected = torch.autograd.grad(alone.ys.sum(), [y0_b, k_b])
        torch.testing.assert_close(got[0][b], expected[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[1][b], expected[1], rtol=0, atol=1e-10)


def test_state_shapes_against_closed_form():
    """A scalar state per sample and a (2, 2) state per sample: y_b(t) = y0_b exp(−k_b t)."""
    k = torch.logspace(0, 1, 3, dtype=F64)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64)
    y0 = torch.randn(3, dtype=F64)
    sol = odegrad.solve(lambda s, y: -k * y, y0, t, per_sample=True, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys, y0 * torch.exp(-k * t[:, None]), rtol=1e-8, atol=1e-10)
    y0 = torch.randn(3, 2, 2, dtype=F64)
    rtol = torch.tensor([1e-9, 1e-10, 1e-11], dtype=F64).reshape(3, 1, 1)
    sol = odegrad.solve(lambda s, y: -k.reshape(3, 1, 1) * y, y0, t, per_sample=True,
                        rtol=rtol, atol=1e-12)
    exact = y0 * torch.exp(-k.reshape(1, 3, 1, 1) * t.reshape(4, 1, 1, 1))
    torch.testing.assert_close(sol.ys, exact, rtol=1e-7, atol=1e-10)
    with pytest.raises(InvalidInputError, match="enlarge"):
        odegrad.solve(lambda s, y: -k * y, y0[:, 0, 0], t, per_sample=True,
                      rtol=torch.full((3, 1), 1e-6, dtype=F64))
