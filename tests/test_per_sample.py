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


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_host_syncs_at_most_one_per_step(host_reads, gradient):
    """Count the tensor-to-host reads (item, tolist, bool, float, int) during a solve: one per
    masked step, plus a constant for the input checks (the discrete adjoint's forward pass
    records its steps without reading anything more)."""
    y0 = torch.randn(BATCH, 2, dtype=F64)
    t = row_times(BATCH, 8)
    calls = host_reads
    overheads = []
    for rtol in (1e-4, 1e-8):
        calls["n"] = 0
        sol = odegrad.solve(batch_field(K), y0, t, per_sample=True, rtol=rtol, atol=1e-10,
                            gradient=gradient)
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
    (dict(gradient="backsolve", adjoint_norm="full"), UnsupportedCombinationError,
     "adjoint_norm"),
    (dict(gradient="interpolated", adjoint_on_accept=print), UnsupportedCombinationError,
     "adjoint_on_accept"),
    (dict(gradient="reversible", method="rk4"), UnsupportedCombinationError, "rk4"),
    (dict(gradient="discrete", checkpoints=0), InvalidInputError, "positive int"),
    (dict(gradient="discrete", checkpoints="some"), InvalidInputError, "'all', 'solution'"),
    (dict(gradient="discrete", memory_budget=1e6), UnsupportedCombinationError, "memory_budget"),
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


def lone_direct_gradients(field: Field, y0: torch.Tensor, t: torch.Tensor, weights, **options):
    """∂L/∂y0 (per row), ∂L/∂t (per row, or summed for a shared 1-D t) and ∂L/∂θ summed over
    the lone direct solves, L = Σ_b <w_b, y_b(t_b)>, and each lone solve's n_steps."""
    params = list(field.parameters())
    expected = [torch.zeros_like(y0), torch.zeros_like(t), *map(torch.zeros_like, params)]
    steps = []
    for b in range(y0.shape[0]):
        y0_b = y0.detach()[b].clone().requires_grad_()
        t_b = (t.detach()[b] if t.dim() == 2 else t.detach()).clone().requires_grad_()
        alone = lone(Lone(field, b), y0_b, t_b, **options)
        steps.append(alone.stats["n_steps"])
        grads = torch.autograd.grad((alone.ys * weights[:, b]).sum(), [y0_b, t_b, *params])
        expected[0][b] = grads[0]
        if t.dim() == 2:
            expected[1][b] = grads[1]
        else:
            expected[1] += grads[1]
        for e, g in zip(expected[2:], grads[2:]):
            e += g
    return expected, steps


@pytest.mark.parametrize("method, checkpoints, descending", [
    ("dopri5", "all", False), ("dopri5", "solution", True), ("bosh3", "all", True),
    ("fehlberg2", "all", True), ("tsit5", "solution", False),
])
def test_discrete_gradient_equals_lone_direct(method, checkpoints, descending):
    """gradient="discrete" (FSAL and non-FSAL tableaus, both policies, forward and backward
    rows) against direct of each lone solve and against the per-sample direct, w.r.t. y0, the
    per-sample t and the parameters (shared MLP and per-sample k)."""
    field = Field(K / 50 if descending else K)  # backwards, −k y grows as exp(k |t|)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = row_times(BATCH, 4, descending).requires_grad_()
    weights = torch.randn(4, BATCH, 3, dtype=F64)
    params = [y0, t, *field.parameters()]
    options = dict(method=method, rtol=1e-5, atol=1e-8)
    sol = odegrad.solve(field, y0, t, per_sample=True, gradient="discrete",
                        checkpoints=checkpoints, **options)
    got = torch.autograd.grad((sol.ys * weights).sum(), params)
    direct = odegrad.solve(field, y0, t, per_sample=True, **options)
    torch.testing.assert_close(sol.ys, direct.ys, rtol=1e-12, atol=1e-12)
    by_direct = torch.autograd.grad((direct.ys * weights).sum(), params)
    expected, steps = lone_direct_gradients(field, y0, t, weights, **options)
    # The same step sequences (the MLP's batched and lone matmuls round differently, which
    # could flip a borderline accept/reject: the tolerances below keep clear of that).
    assert sol.stats["sample_n_steps"].tolist() == steps
    for name, g, e, d in zip(["y0", "t", "k", "l1.w", "l1.b", "l2.w", "l2.b"], got, expected,
                             by_direct):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(g, d, rtol=0, atol=1e-10, msg=name)
    assert sol.stats["checkpoints"] == checkpoints and sol.stats["nfe_backward"] > 0


def test_discrete_checkpoint_bytes_per_sample():
    """Each sample keeps its rows only when they change: 1 + its accepted steps, times y_n and,
    for an FSAL scheme under "all", its first stage; "solution" keeps y_n alone."""
    field = Field(K)
    y0 = torch.randn(BATCH, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64, requires_grad=True)  # a shared 1-D t
    row = 3 * 8
    sizes = {}
    expected, _ = lone_direct_gradients(field, y0, t, torch.ones(4, BATCH, 3, dtype=F64))
    for checkpoints, factor in (("all", 2), ("solution", 1)):
        sol = odegrad.solve(field, y0, t, per_sample=True, gradient="discrete",
                            checkpoints=checkpoints)
        per_sample = sol.stats["sample_checkpoint_bytes"]
        torch.testing.assert_close(per_sample, (1 + sol.stats["sample_n_accepted"]) * row * factor)
        assert sol.stats["checkpoint_bytes"] > int(per_sample.sum())  # plus the step records
        sizes[checkpoints] = sol.stats["checkpoint_bytes"]
        got = torch.autograd.grad(sol.ys.sum(), [y0, t, *field.parameters()])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    assert sizes["solution"] < sizes["all"]


def test_discrete_gradient_after_overflowing_trial_steps():
    """Overflowing first attempts (rejected) are replayed with h = 0, as direct redoes them."""
    k = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 500.0, 1000.0], dtype=F64)
    sol = odegrad.solve(lambda s, y: -k.reshape(-1, 1) * y**3, y0, t, per_sample=True,
                        first_step=1e4, gradient="discrete", params=[k])
    assert int(sol.stats["sample_n_rejected"].min()) > 0
    got = torch.autograd.grad(sol.ys.sum(), [y0, k])
    for b in range(2):
        y0_b = y0.detach()[b].clone().requires_grad_()
        k_b = k.detach()[b].clone().requires_grad_()
        alone = odegrad.solve(lambda s, y, k_b=k_b: -k_b * y**3, y0_b, t, first_step=1e4)
        expected = torch.autograd.grad(alone.ys.sum(), [y0_b, k_b])
        torch.testing.assert_close(got[0][b], expected[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[1][b], expected[1], rtol=0, atol=1e-10)


def test_discrete_refuses_what_it_cannot_replay():
    y0, t = torch.randn(BATCH, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    k = K.clone().requires_grad_()
    with pytest.raises(InvalidInputError, match="params="):  # a captured tensor, not in params
        odegrad.solve(batch_field(k), y0, t, per_sample=True, gradient="discrete")
    dropout = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).double()
    with pytest.raises(UnsupportedCombinationError, match="random"):
        odegrad.solve(_TimeFree(dropout), y0, t, per_sample=True, gradient="discrete")
    sol = odegrad.solve(batch_field(k), y0.requires_grad_(), t, per_sample=True,
                        gradient="discrete", params=[k])
    (g,) = torch.autograd.grad(sol.ys.sum(), [y0], create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), [k])


def test_latent_ode_per_sample_decoder_matches_the_grid_decoder():
    """LatentODE(per_sample=True) decodes each series at its own observed times (index 0
    first, filled with unobserved points): its negative ELBO equals the grid decoder's, whose
    likelihood counts the same observed points, to the solver's tolerance (float64)."""
    from odegrad.models import LatentODE
    from odegrad.models.latent import own_times

    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 0]])
    index = own_times(mask.float())
    # rows: observed {0, 2, 3} + earliest unobserved {1, 4}; {0, 1, 5} + {2, 3}; {0, ..., 4}
    assert index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 5], [0, 1, 2, 3, 4]]
    model = LatentODE(2, latent_dim=3, hidden=8, encoder_hidden=8, rtol=1e-10, atol=1e-12).double()
    n, length = 3, 10
    t = torch.linspace(0.0, 2.0, length, dtype=F64)
    values = torch.randn(n, length, 2, dtype=F64)
    mask = (torch.rand(n, length) < 0.4).to(F64)
    mask[:, 0] = 1.0
    encoder_mask = mask.clone()
    encoder_mask[:, 7:] = 0.0
    losses = []
    for per_sample in (False, True):
        torch.manual_seed(1)  # the same reparameterised z_0
        losses.append(model(t, values, mask, encoder_mask, per_sample=per_sample))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-8, atol=0)
    grads = [torch.autograd.grad(loss, list(model.block.parameters())) for loss in losses]
    scale = max(float(g.abs().max()) for g in grads[0])  # two discretisations' gradients
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * scale)
