"""compile=True on the CPU: fixed steps as runs, one compiled scan of the step over the steps
(odegrad.compiled: `_run`, RunRows, `run_vjp`), equal to eager whatever the step sizes, the
outputs and the checkpoints; broken at outputs inside steps; replayed by the discrete sweep;
falling back to blocks, with a warning, for an f whose run does not compile.

The counting backend (conftest `counter`) runs the captured graphs eagerly; the inductor
checks are marked slow."""

import warnings

import pytest
import torch
from torch import nn

from compiled_cases import DT, Field, tuple_state_problem
from odegrad import compiled
from test_compiled import assert_same, calls

CASES = [
    ("rk4", "direct", {}),
    ("rk4", "discrete", {}),
    ("rk4", "discrete", {"checkpoints": 3}),
    ("rk4", "discrete", {"checkpoints": "solution"}),
    ("midpoint", "direct", {}),
    ("bosh3", "direct", {"adaptive": False}),  # FSAL: the run carries K_1
    ("bosh3", "discrete", {"adaptive": False}),
]


@pytest.mark.parametrize("method, gradient, extra", CASES,
                         ids=[f"{m}-{g}-{e}" for m, g, e in CASES])
def test_runs_match_eager(counter, monkeypatch, method, gradient, extra):
    """40 steps of 0.02, outputs inside steps (0.33, 0.75) and on step ends read from the
    interpolant (0.4): the steps with an output inside are single steps, the stretches between
    them runs; outputs, gradients and f's evaluations as eager."""
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.4, 0.75, 0.8], dtype=DT)
    assert_same(field, y0, t, method=method, gradient=gradient, step_size=0.02, **extra)
    assert seen["block"] == 0
    if gradient == "direct":
        # steps 16, 19 and 37 have an output inside (0.4, on the end of step 19, is read from
        # the interpolant too), single steps as the stretches shorter than RUN_MIN (17-18,
        # 38-39) and step 0, which checks f's outputs (an FSAL scheme checks K_1 before it);
        # runs 1-15 (0-15) and 20-36
        fsal = method == "bosh3"
        assert (seen["run"], seen["step"]) == (2, 7 if fsal else 8)
    else:  # the replay's runs too
        assert seen["run"] >= 3


def test_uneven_steps_are_one_run(counter, monkeypatch):
    """One step per output interval of uneven lengths (blocks need one step size; a run
    reads each step's own): after the first step, the whole solve is one run."""
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0], dtype=DT)
    assert_same(field, y0, t, method="rk4", gradient="direct")
    assert seen == {"block": 0, "run": 1, "step": 1}
    seen.update(block=0, run=0, step=0)
    assert_same(field, y0, t, method="rk4", gradient="direct")  # f's outputs known: no step
    assert seen == {"block": 0, "run": 1, "step": 0}


class Transposed(nn.Module):
    """An f reading `self.w.T`: dynamo lifts each read as its own input of the scan, and they
    alias, which torch's scan refuses."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2, dtype=DT) / 2)

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) * (1 + t)


def test_run_that_does_not_compile_falls_back_to_blocks(counter, monkeypatch):
    """The run fails to trace: one RuntimeWarning naming the cause, then blocks; the result is
    eager's; a later solve with the same f warns no more."""
    seen = calls(monkeypatch)
    field = Transposed()
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.warns(RuntimeWarning, match="compiled blocks of 8"):
        assert_same(field, y0, t, method="rk4", gradient="direct", step_size=0.05)
    assert seen["block"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_same(field, y0, t, method="rk4", gradient="discrete", step_size=0.05)


def test_discrete_replays_runs_within_the_byte_bound(counter, monkeypatch):
    """The sweep measures what one step's replay saves for its backward (the first step it
    replays, singly), then replays runs from kept states that save at most
    RUN_REPLAY_MAX_BYTES, and none when fewer than RUN_MIN steps fit: exactly, each time."""
    lengths = []
    original = compiled.CompiledRungeKutta.run_vjp

    def spy(self, rows, *args, **kwargs):
        lengths.append(rows.length)
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(compiled.CompiledRungeKutta, "run_vjp", spy)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.8], dtype=DT)
    options = dict(method="rk4", gradient="discrete", step_size=0.02)  # 40 steps
    assert_same(field, y0, t, **options)
    assert lengths == [39]  # the last step replayed singly, measured
    per_step = [v for k, v in compiled._CACHE[id(field)][1].items()
                if isinstance(k, tuple) and k[0] == "replay bytes"]
    assert len(per_step) == 1 and per_step[0] > y0.numel() * y0.element_size()
    lengths.clear()
    monkeypatch.setattr(compiled, "RUN_REPLAY_MAX_BYTES", 6 * per_step[0])
    assert_same(field, y0, t, **options)
    assert lengths == [6] * 6 + [4]  # from the end back: six runs of 6, then steps 0-3
    lengths.clear()
    monkeypatch.setattr(compiled, "RUN_REPLAY_MAX_BYTES", 2 * per_step[0])
    assert_same(field, y0, t, **options)
    assert lengths == []


def test_stages_on_demand_equal_the_single_step(counter):
    """A step handed out from a run computes its stages (the dense output) only when they are
    read, from the step's own row, state and carry: the single step's stages."""
    from odegrad.loop import integrate
    from odegrad.problem import CountedField
    from odegrad.solvers import make_solver

    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5], dtype=DT)
    stats: dict = {}
    counted = CountedField(field, y0, stats)
    solver = compiled.compiled_solver(make_solver("bosh3"), field, field, counted, None)
    kept = []
    integrate(counted, y0, t, solver, step_size=0.05, adaptive=False,
              on_step=lambda record, y, step: kept.append((record, y, step)))
    assert any(isinstance(step.dense, compiled._StagesOnDemand) for *_, step in kept)
    before = stats["nfe_forward"]
    eager = make_solver("bosh3")
    for record, y, step in kept[1:]:
        t_n = torch.tensor(record.t, dtype=DT)
        want = eager.stages_from(field, t_n, record.h, y, field(t_n, y))[0]
        for a, b in zip(step.dense, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert stats["nfe_forward"] > before  # counted when computed


# ---- inductor (slow) -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("rk4", {}), ("bosh3", {"adaptive": False})])
def test_inductor_runs_match_eager_whatever_n(method, extra):
    """Inductor's scan: equal to eager (float64, 1e-12) for a plain and an FSAL scheme, with
    gradient direct and discrete, and no new graph for 5x the steps."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    field = Field(hidden=16).to(DT)
    y0 = torch.randn(8, 2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    for gradient in ("direct", "discrete"):
        assert_same(field, y0, t, method=method, gradient=gradient, step_size=0.05, **extra)
    graphs = counters["stats"]["unique_graphs"]
    for gradient in ("direct", "discrete"):
        assert_same(field, y0, t, method=method, gradient=gradient, step_size=0.01, **extra)
    assert counters["stats"]["unique_graphs"] == graphs


def test_tuple_state_runs(counter, monkeypatch):
    """A tuple state (its flat view inside the scan) runs, equal to eager, direct and
    discrete, with no fallback warning."""
    seen = calls(monkeypatch)
    solve = tuple_state_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for gradient in ("direct", "discrete"):
            options = dict(method="rk4", step_size=0.1, gradient=gradient)
            for a, b in zip(solve(True, [0.0, 1.0], **options),
                            solve(False, [0.0, 1.0], **options), strict=True):
                assert torch.allclose(a, b, rtol=1e-12, atol=0)
    assert seen["run"] >= 2 and seen["block"] == 0


GRIDS = [
    ("backward in time", [1.0, 0.3, 0.0], {"step_size": 0.05}),
    ("an output every step", [i / 20 for i in range(21)], {}),
    ("exactly RUN_MIN steps", [0.0, 0.3], {"step_size": 0.1}),
    ("grid_constructor", [0.0, 0.5, 1.0],
     {"grid_constructor": lambda f, y0, t: torch.linspace(0, 1, 17, dtype=DT)}),
]


@pytest.mark.parametrize("name, times, extra", GRIDS, ids=[g[0] for g in GRIDS])
@pytest.mark.parametrize("gradient", ["direct", "discrete"])
def test_runs_on_other_grids_match_eager(counter, monkeypatch, name, times, extra, gradient):
    """Negative steps, an output at every step end, the shortest run and a user grid: runs,
    equal to eager with the same evaluations, no fallback."""
    seen = calls(monkeypatch)
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):  # (the first solve takes its first step singly: f's outputs checked)
            assert_same(field, y0, torch.tensor(times, dtype=DT), method="rk4",
                        gradient=gradient, **extra)
    assert seen["run"] >= 1 and seen["block"] == 0
