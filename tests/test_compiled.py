"""compile=True (odegrad.compiled): the compiled step equals the eager one, compiles once per
(f, scheme, shapes, dtype, grad mode) whatever t's values or the step count, counts f's
evaluations as the eager loop does, and refuses what it does not serve.

The default suite traces with a counting backend (torch._dynamo.testing.CompileCounter: the
captured graph runs eagerly), which checks the wiring and the recompilation guards in seconds;
the inductor runs, which take tens of seconds to compile on a small machine, are marked slow."""

import pytest
import torch
from torch import nn

import odegrad
from odegrad import compiled
from odegrad.errors import InvalidInputError, UnsupportedCombinationError

DT = torch.float64


class Field(nn.Module):
    """A small MLP with t as an input (issue 16's P1 shape, smaller)."""

    def __init__(self, dim: int = 2, hidden: int = 8):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(*y.shape[:-1], 1)], -1))))


@pytest.fixture
def counter(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    backend = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    torch._dynamo.reset()
    return backend


def gradients(field, y0, t, **kwargs):
    y0 = y0.detach().clone().requires_grad_()
    sol = odegrad.solve(field, y0, t, **kwargs)
    weights = torch.linspace(-1.0, 1.0, sol.ys.numel(), dtype=DT).reshape(sol.ys.shape)
    loss = (sol.ys * weights).sum() + (sol.ys[-1] ** 2).sum()
    inputs = [y0, *field.parameters()] + ([t] if t.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return sol.ys.detach(), torch.cat([g.reshape(-1) for g in grads]), sol.stats


def assert_same(field, y0, t, tol=1e-12, dropped_evaluations=0, **kwargs):
    """Compiled and eager: same outputs and gradients, and the same count of f evaluations in
    the forward pass and, with checkpoints "all", in the backward pass (with fewer kept, the
    eager stage recurrence recomputes a step's stages before its VJPs, the compiled replay
    does both in one pass: fewer evaluations)."""
    ys_c, g_c, stats_c = gradients(field, y0, t, compile=True, **kwargs)
    ys_e, g_e, stats_e = gradients(field, y0, t, **kwargs)
    assert float((ys_c - ys_e).norm() / ys_e.norm()) < tol
    assert float((g_c - g_e).norm() / g_e.norm()) < tol
    # a block the loop drops was still evaluated, and is counted
    assert stats_c["nfe_forward"] == stats_e["nfe_forward"] + dropped_evaluations
    if kwargs.get("checkpoints", "all") == "all":
        # + 1 for an FSAL scheme: the replay of the last step evaluates its last stage, whose
        # cotangent is zero and which the eager recurrence skips
        assert stats_c["nfe_backward"] - stats_e["nfe_backward"] in (0, 1)
    else:
        assert 0 < stats_c["nfe_backward"] <= stats_e["nfe_backward"]
    return stats_c


CASES = [
    ("rk4", "direct", {}),
    ("rk4", "discrete", {}),
    ("rk4", "discrete", {"checkpoints": 3}),
    ("midpoint", "discrete", {"checkpoints": "solution"}),
    ("bosh3", "direct", {"adaptive": False}),  # FSAL: K_1 is the carry
    ("bosh3", "discrete", {"adaptive": False}),
]


@pytest.mark.parametrize("method, gradient, extra", CASES,
                         ids=[f"{m}-{g}-{e}" for m, g, e in CASES])
def test_traced_step_matches_eager(counter, method, gradient, extra):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.8], dtype=DT, requires_grad=True)  # interior outputs, dL/dt
    assert_same(field, y0, t, method=method, gradient=gradient, step_size=0.1, **extra)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_no_recompilation_for_new_times_or_step_counts(counter, gradient):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)

    def run(t, step_size):
        y = y0.clone().requires_grad_()
        ys = odegrad.odeint(field, y, torch.tensor(t, dtype=DT), method="rk4",
                            step_size=step_size, gradient=gradient, compile=True)
        (ys[-1] ** 2).sum().backward()

    run([0.0, 1.0], 0.1)
    first = counter.frame_count
    # direct: the block and the single step; discrete: both without grad (the forward) and
    # both with grad (the replay: blocks of steps, the last step and the remainder singly)
    assert first == (2 if gradient == "direct" else 4)
    run([0.0, 1.0], 0.1)  # the same call again
    run([0.2, 0.9], 0.1)  # other times, a clipped last step
    run([0.0, 2.0], 0.05)  # another step count (40) and step size
    run([0.0, 0.1], 0.05)  # two steps: no stage-time table in the loop
    run([0.0, 0.37], 0.01)  # 37 steps, not a multiple of the block
    assert counter.frame_count == first


def calls(monkeypatch):
    """Counts of the compiled functions' calls: {"block": n, "step": m}."""
    seen = {"block": 0, "step": 0}
    call = compiled.CompiledRungeKutta._call

    def counting(self, fn, *args):
        seen["block" if fn is self.compiled_block else "step"] += 1
        return call(self, fn, *args)

    monkeypatch.setattr(compiled.CompiledRungeKutta, "_call", counting)
    return seen


BLOCK_CASES = [
    ("rk4", "direct", 3), ("rk4", "direct", 8), ("rk4", "discrete", 3),
    ("bosh3", "direct", 3), ("bosh3", "discrete", 3), ("midpoint", "direct", 5),
]


@pytest.mark.parametrize("method, gradient, block", BLOCK_CASES,
                         ids=[f"{m}-{g}-{b}" for m, g, b in BLOCK_CASES])
def test_blocks_match_eager(counter, monkeypatch, method, gradient, block):
    """Fixed steps with constant times run in blocks of BLOCK steps (the remainder and the
    last step singly): equal to eager, outputs inside blocks (between grid points and on one)
    included, and N not a multiple of the block."""
    monkeypatch.setattr(compiled, "BLOCK", block)
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.4, 0.75, 0.8], dtype=DT)  # 40 steps of 0.02
    extra = {"adaptive": False} if method == "bosh3" else {}
    assert_same(field, y0, t, method=method, gradient=gradient, step_size=0.02, **extra)
    n_blocks = (40 - 1) // block  # a block never covers the last step
    if gradient == "direct":
        assert seen["block"] == n_blocks
        assert seen["step"] == 40 - block * n_blocks
    else:
        # the replay pulls back whole blocks between the outputs, the other steps singly:
        # every step exactly once
        replayed_blocks = seen["block"] - n_blocks
        assert replayed_blocks >= 1
        assert seen["step"] == 40 - block * n_blocks + 40 - block * replayed_blocks


@pytest.mark.parametrize("checkpoints", [3, "solution"])
def test_block_replay_with_fewer_checkpoints(counter, monkeypatch, checkpoints):
    """The replay runs a block only from a kept first state; with fewer kept it replays the
    rest step by step, exactly."""
    monkeypatch.setattr(compiled, "BLOCK", 3)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.4, 0.8], dtype=DT)
    assert_same(field, y0, t, method="rk4", gradient="discrete", step_size=0.02,
                checkpoints=checkpoints)


def test_block_miss_steps_singly(counter, monkeypatch):
    """Steps of different sizes (one per output interval): the block taken with the first
    step's size is dropped at the second step, and the solve goes on singly, exactly."""
    monkeypatch.setattr(compiled, "BLOCK", 3)
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0], dtype=DT)
    # the block of 3 steps ran; its last 2 (4 stages each) were dropped and are counted
    assert_same(field, y0, t, method="rk4", gradient="direct", dropped_evaluations=2 * 4)
    assert seen["block"] == 1 and seen["step"] == 7


def test_cache_is_keyed_on_f_not_on_the_call(counter):
    torch.manual_seed(0)
    a, b = Field().to(DT), Field().to(DT)
    y0, t = torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    with torch.no_grad():
        for field in (a, b, a, b):
            odegrad.odeint(field, y0, t, method="rk4", step_size=0.25, compile=True)
    assert counter.frame_count == 2  # one graph per field, each reused (4 steps: no block)


def test_tuple_state(counter):
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=DT, requires_grad=True)

    def f(t, state):
        x, v = state
        return v, torch.tanh(x @ w) - 0.1 * v

    x0, v0 = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)

    def run(compile_):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        xs, vs = odegrad.odeint(f, (x, v), torch.tensor([0.0, 1.0], dtype=DT), method="rk4",
                                step_size=0.1, gradient="discrete", params=[w],
                                compile=compile_)
        return torch.autograd.grad((xs[-1] ** 2).sum() + vs[-1].sum(), [x, v, w])

    got, want = run(True), run(False)
    run(True)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    # the no-grad forward's block and single step, and the replay's, each compiled once
    assert counter.frame_count == 4


@pytest.mark.parametrize("kwargs, names", [
    ({"gradient": "backsolve"}, "gradient='backsolve'"),
    ({"method": "dopri5"}, "adaptive steps"),
    ({"method": "implicit_euler"}, "not an explicit"),
    ({"event_fn": lambda t, y: y[0, 0] - 10.0}, "event_fn"),
    ({"step_t": [0.5]}, "step_t/jump_t"),
    ({"per_sample": True}, "per_sample"),
])
def test_unsupported_combinations_raise(kwargs, names):
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT, requires_grad=True)
    kwargs = {"method": "rk4", "step_size": 0.1, **kwargs}
    with pytest.raises(UnsupportedCombinationError, match="compile=True supports") as info:
        odegrad.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=DT), compile=True, **kwargs)
    assert names in str(info.value)


def test_dropout_with_discrete_raises():
    field = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 2)).to(DT)
    with pytest.raises(UnsupportedCombinationError, match="dropout"):
        odegrad.odeint(lambda t, y: field(y), torch.randn(4, 2, dtype=DT, requires_grad=True),
                       torch.tensor([0.0, 1.0], dtype=DT), method="rk4", step_size=0.1,
                       gradient="discrete", params=list(field.parameters()), compile=True)


def test_compile_must_be_a_bool():
    with pytest.raises(InvalidInputError, match="compile must be True or False"):
        odegrad.odeint(Field().to(DT), torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0],
                       dtype=DT), method="rk4", compile="yes")


def test_compilation_failure_is_named(counter):
    def f(t, y):
        if float(y.sum()) > 1e9:  # data-dependent Python control flow: a graph break
            return y
        return -y

    with pytest.raises(compiled.CompilationError, match="compile=False"):
        odegrad.odeint(f, torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       method="rk4", step_size=0.1, compile=True)


def test_wrong_output_shape_is_named(counter):
    with pytest.raises(InvalidInputError, match="returned shape"):
        odegrad.odeint(lambda t, y: y[:, :1], torch.randn(4, 2, dtype=DT),
                       torch.tensor([0.0, 1.0], dtype=DT), method="rk4", step_size=0.1,
                       compile=True)


# ---- inductor (slow: tens of seconds of compilation each on two cores) ----------------------


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_inductor_matches_eager_and_does_not_recompile(gradient):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    field = Field(hidden=16).to(DT)
    y0 = torch.randn(8, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    assert_same(field, y0, t, method="rk4", gradient=gradient, step_size=0.05)
    graphs = counters["stats"]["unique_graphs"]
    assert_same(field, y0, torch.tensor([0.1, 0.4, 0.9], dtype=DT), method="rk4",
                gradient=gradient, step_size=0.02)
    assert counters["stats"]["unique_graphs"] == graphs


def test_cache_is_bounded(counter, monkeypatch):
    monkeypatch.setattr(compiled, "MAX_FIELDS", 2)
    y0, t = torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    for scale in (1.0, 2.0, 3.0):  # a new lambda each call: a new f each time
        odegrad.odeint(lambda t, y, s=scale: -s * y, y0, t, method="rk4", step_size=0.5,
                       compile=True)
    assert len(compiled._CACHE) <= 2
    assert counter.frame_count == 3
