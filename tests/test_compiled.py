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
from compiled_cases import DT, Field, gradients, tuple_state_problem
from odegrad import compiled
from odegrad.errors import InvalidInputError, UnsupportedCombinationError


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


def rk4_solves(gradient):
    """run(t, step_size): an rk4 solve with compile=True and its backward, for one field."""
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)

    def run(t, step_size):
        y = y0.clone().requires_grad_()
        ys = odegrad.odeint(field, y, torch.tensor(t, dtype=DT), method="rk4",
                            step_size=step_size, gradient=gradient, compile=True)
        (ys[-1] ** 2).sum().backward()
    return run


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_no_recompilation_for_new_times_or_step_counts(counter, gradient):
    run = rk4_solves(gradient)

    run([0.0, 1.0], 0.1)
    run([0.0, 0.1], 0.05)  # two steps: no stage-time table in the loop, single steps
    first = counter.frame_count
    # direct: the single step (the first step of the first solve, which checks f's outputs)
    # and the run of steps; discrete: both without grad (the forward), the replay's run and
    # single step with grad
    assert first == (2 if gradient == "direct" else 4)
    run([0.0, 1.0], 0.1)  # the same call again
    run([0.2, 0.9], 0.1)  # other times, a clipped last step
    run([0.0, 2.0], 0.05)  # another step count (40) and step size
    run([0.0, 0.37], 0.01)  # 37 steps
    assert counter.frame_count == first


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_blocks_do_not_recompile(counter, monkeypatch, gradient):
    """Without runs (CUDA, or an f whose run does not compile): blocks, compiled once."""
    monkeypatch.setattr(compiled, "RUNS", False)
    run = rk4_solves(gradient)

    run([0.0, 1.0], 0.1)
    first = counter.frame_count
    # direct: the block and the single step; discrete: both without grad (the forward) and
    # both with grad (the replay: blocks of steps, the last step and the remainder singly)
    assert first == (2 if gradient == "direct" else 4)
    run([0.2, 0.9], 0.1)
    run([0.0, 2.0], 0.05)
    run([0.0, 0.1], 0.05)
    run([0.0, 0.37], 0.01)
    assert counter.frame_count == first


def calls(monkeypatch):
    """Counts of the compiled functions' calls: {"block": n, "run": r, "step": m}."""
    seen = {"block": 0, "run": 0, "step": 0}
    call = compiled.CompiledRungeKutta._call

    def counting(self, fn, *args):
        kind = ("block" if fn is self.compiled_block else
                "run" if fn is self.compiled_run and fn is not None else "step")
        seen[kind] += 1
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
    monkeypatch.setattr(compiled, "RUNS", False)  # blocks: CUDA, or no run
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
    monkeypatch.setattr(compiled, "RUNS", False)  # blocks: CUDA, or no run
    monkeypatch.setattr(compiled, "BLOCK", 3)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.4, 0.8], dtype=DT)
    assert_same(field, y0, t, method="rk4", gradient="discrete", step_size=0.02,
                checkpoints=checkpoints)


def test_large_state_replays_step_by_step(counter, monkeypatch):
    """Above BLOCK_REPLAY_MAX_BYTES the discrete sweep does not replay blocks (a block's replay
    holds BLOCK steps' activations at once): every block_vjp declines, and the gradient is
    still the eager one; below it, blocks are replayed."""
    monkeypatch.setattr(compiled, "RUNS", False)  # blocks: CUDA, or no run
    monkeypatch.setattr(compiled, "BLOCK", 3)
    replays = []
    original = compiled.CompiledRungeKutta.block_vjp

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        replays.append(out is not None)
        return out

    monkeypatch.setattr(compiled.CompiledRungeKutta, "block_vjp", spy)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.4, 0.8], dtype=DT)
    options = dict(method="rk4", gradient="discrete", step_size=0.02)
    assert_same(field, y0, t, **options)
    assert replays and all(replays)
    replays.clear()
    monkeypatch.setattr(compiled, "BLOCK_REPLAY_MAX_BYTES", y0.numel() * y0.element_size() - 1)
    assert_same(field, y0, t, **options)
    assert replays and not any(replays)


def test_block_miss_steps_singly(counter, monkeypatch):
    """Steps of different sizes (one per output interval): the block taken with the first
    step's size is dropped at the second step, and the solve goes on singly, exactly."""
    monkeypatch.setattr(compiled, "RUNS", False)  # blocks: CUDA, or no run
    monkeypatch.setattr(compiled, "BLOCK", 3)
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0], dtype=DT)
    # the block of 3 steps ran; its last 2 (4 stages each) were dropped and are counted
    assert_same(field, y0, t, method="rk4", gradient="direct", dropped_evaluations=2 * 4)
    assert seen["block"] == 1 and seen["step"] == 7


def test_cache_is_keyed_on_f_not_on_the_call(counter, monkeypatch):
    monkeypatch.setattr(compiled, "RUNS", False)
    torch.manual_seed(0)
    a, b = Field().to(DT), Field().to(DT)
    y0, t = torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    with torch.no_grad():
        for field in (a, b, a, b):
            odegrad.odeint(field, y0, t, method="rk4", step_size=0.25, compile=True)
    assert counter.frame_count == 2  # one graph per field, each reused (4 steps: no block)


def test_tuple_state(counter, monkeypatch):
    monkeypatch.setattr(compiled, "RUNS", False)  # (runs of tuple states: test_runs_*)
    solve = tuple_state_problem()
    options = dict(method="rk4", step_size=0.1, gradient="discrete")
    got = solve(True, [0.0, 1.0], **options)
    want = solve(False, [0.0, 1.0], **options)
    solve(True, [0.0, 1.0], **options)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    # the no-grad forward's block and single step, and the replay's, each compiled once
    assert counter.frame_count == 4


@pytest.mark.parametrize("kwargs, names", [
    ({"gradient": "interpolated"}, "gradient='interpolated'"),
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


# ---- adaptive steps: the step returns its error ratio, one host read per step -----------------


@pytest.fixture(scope="module")
def shared():
    """One counting backend, field and cache for the adaptive tests, so they share the traced
    graphs (the rated step with grad, with h requiring grad, and without grad)."""
    from torch._dynamo.testing import CompileCounter

    patch = pytest.MonkeyPatch()
    backend = CompileCounter()
    patch.setattr(compiled, "BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield backend, Field().to(DT), torch.randn(4, 2, dtype=DT)
    patch.undo()


ADAPTIVE_CASES = [("direct", {}), ("discrete", {}), ("discrete", {"checkpoints": "solution"}),
                  ("discrete", {"checkpoints": 3})]


@pytest.mark.parametrize("gradient, extra", ADAPTIVE_CASES,
                         ids=[f"{g}-{e}" for g, e in ADAPTIVE_CASES])
def test_adaptive_matches_eager(shared, gradient, extra):
    """dopri5 with rejections (a first step too large), outputs inside steps and dL/dt: the
    same accepted steps, outputs and gradients as eager. The error ratio is computed in the
    compiled graph with other roundings than eager's; this problem's error estimates are far
    above round-off, so the step sizes agree to rounding (see the module docstring)."""
    _, field, y0 = shared
    t = torch.tensor([0.0, 0.33, 0.8, 2.0], dtype=DT, requires_grad=True)
    stats = assert_same_adaptive(field, y0, t, method="dopri5", gradient=gradient, rtol=1e-6,
                                 atol=1e-6, first_step=1.5, **extra)
    assert stats["n_rejected"] >= 1 and stats["n_accepted"] >= 3


def assert_same_adaptive(field, y0, t, **options):
    """Compiled and eager adaptive solves: the same accepted and rejected steps, the step sizes
    to rounding, outputs and gradients to 1e-12, the same forward evaluations."""
    sizes = {True: [], False: []}
    results = {}
    for compile_ in (True, False):
        def record(t, y, h, seen=sizes[compile_]):
            seen.append(float(h))

        results[compile_] = gradients(field, y0, t, compile=compile_, on_accept=record,
                                      **options)
    (ys_c, g_c, stats), (ys_e, g_e, stats_e) = results[True], results[False]
    assert (stats["n_accepted"], stats["n_rejected"]) == (stats_e["n_accepted"],
                                                         stats_e["n_rejected"])
    # the error estimate h Σ e_i K_i cancels: a rounding difference in it is ~1e-11 of the
    # ratio here, ~1e-12 of the next h (ratio^(-0.85/k))
    assert sizes[True] == pytest.approx(sizes[False], rel=1e-9, abs=0)
    assert float((ys_c - ys_e).norm() / ys_e.norm()) < 1e-12
    assert float((g_c - g_e).norm() / g_e.norm()) < 1e-12
    assert stats["nfe_forward"] == stats_e["nfe_forward"]
    if options["gradient"] == "discrete" and options.get("checkpoints", "all") == "all":
        # + 1: the replay of the last step evaluates its FSAL stage (zero cotangent)
        assert stats["nfe_backward"] - stats_e["nfe_backward"] in (0, 1)
    return stats


# The methods of a tensor that read its value on the host: on a device, each is a
# synchronisation. Calls made by dynamo's guards are left out: it reads 0-dim float64 CPU
# tensors (h, the times) to guard them against NaN (fake_tensor.py: CPU tensors only).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero",
              "numpy", "__complex__")


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of host reads of tensor values (HOST_READS), outside dynamo's guards."""
    import sys

    seen = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if not (caller.co_filename == "<string>" and caller.co_name == "guard"):
                seen["n"] += 1
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return seen


def reads(counts, field, y0, t, gradient, **options):
    """(host reads of the forward solve, of the backward pass, steps attempted)."""
    odegrad.solve(field, y0.clone().requires_grad_(), t, gradient=gradient, compile=True,
                  **options).ys.sum().backward()  # traced first
    before = counts["n"]
    sol = odegrad.solve(field, y0.clone().requires_grad_(), t, gradient=gradient, compile=True,
                        **options)
    forward = counts["n"] - before
    sol.ys.sum().backward()
    return forward, counts["n"] - before - forward, sol.stats["n_steps"]


@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_adaptive_one_host_read_a_step(shared, host_reads, gradient):
    """Adaptive steps: exactly one host read more per step attempt (the accept decision), the
    rest once a solve (t's values, the initial step's norms); none per step backward. New
    times and tolerances reuse the compiled step (h, t, rtol, atol are 0-dim tensors)."""
    backend, field, y0 = shared
    t = torch.tensor([0.0, 0.33, 0.8, 2.0], dtype=DT)
    # (traced first: the discrete sweep replays runs of accepted steps, whose graph a
    # loose solve's few steps between outputs may not need)
    reads(host_reads, field, y0, t * 1.2, gradient, method="dopri5", rtol=1e-8, atol=1e-8)
    loose = reads(host_reads, field, y0, t, gradient, method="dopri5", rtol=1e-4, atol=1e-4)
    graphs = backend.frame_count
    tight = reads(host_reads, field, y0, t * 1.5, gradient, method="dopri5", rtol=1e-9,
                  atol=1e-9)
    assert tight[2] > loose[2] + 5
    assert tight[0] - tight[2] == loose[0] - loose[2]
    assert tight[1] == loose[1]
    assert backend.frame_count == graphs  # no recompilation


def test_fixed_steps_no_host_read_a_step(counter, host_reads):
    """Fixed steps (blocks and single steps, direct): the same count of host reads for 10 and
    40 steps, forward and backward: none per step (t's values and the final finiteness check
    once a solve). (The discrete sweep's are in the adaptive test above: none per step.)"""
    torch.manual_seed(0)
    field, y0 = Field().to(DT), torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.4, 0.8], dtype=DT)
    few = reads(host_reads, field, y0, t, "direct", method="rk4", step_size=0.08)
    many = reads(host_reads, field, y0, t, "direct", method="rk4", step_size=0.02)
    assert (few[2], many[2]) == (10, 40)
    assert few[:2] == many[:2]


@pytest.mark.slow
@pytest.mark.parametrize("method, gradient", [("dopri5", "direct"), ("dopri5", "discrete"),
                                              ("tsit5", "discrete"), ("bosh3", "direct")])
def test_inductor_adaptive_matches_eager(method, gradient):
    """The inductor-compiled rated step (its own roundings of the error ratio): the same steps
    as eager, outputs and gradients to 1e-12 (float64)."""
    torch.manual_seed(0)
    field = Field(hidden=16).to(DT)
    y0 = torch.randn(8, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=DT, requires_grad=True)
    stats = assert_same_adaptive(field, y0, t, method=method, gradient=gradient, rtol=1e-7,
                                 atol=1e-7, first_step=1.0)
    assert stats["n_rejected"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_synchronisations(counter):
    """On CUDA, torch's own detector (set_sync_debug_mode("warn")): fixed steps make as many
    synchronisations for 10 as for 40 steps (none per step); adaptive steps one more per step
    attempt (the accept decision)."""
    import warnings

    torch.manual_seed(0)
    device = torch.device("cuda")
    field = Field().to(device, DT)
    y0 = torch.randn(4, 2, dtype=DT, device=device)
    t = torch.tensor([0.0, 0.4, 0.8, 2.0], dtype=DT, device=device)

    def syncs(gradient, **options):
        def solve():
            sol = odegrad.solve(field, y0.clone().requires_grad_(), t, gradient=gradient,
                                compile=True, **options)
            sol.ys.sum().backward()
            return sol

        solve()  # traced first
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sol = solve()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(caught), sol.stats["n_steps"]

    for gradient in ("direct", "discrete"):
        few, many = (syncs(gradient, method="rk4", step_size=h) for h in (0.2, 0.05))
        assert (few[1], many[1]) == (10, 40)
        assert few[0] == many[0]
        loose, tight = (syncs(gradient, method="dopri5", rtol=tol, atol=tol)
                        for tol in (1e-4, 1e-9))
        assert tight[1] > loose[1] + 5
        assert tight[0] - tight[1] == loose[0] - loose[1]
