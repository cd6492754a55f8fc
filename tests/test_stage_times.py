"""The stage-time table of fixed-step solves (loop.stage_time_table): bit for bit the times the
per-step scalar ops give, so solutions and every gradient are unchanged by it."""

import pytest
import torch

from conftest import MLPField
from odegrad.gradients import direct, discrete
from odegrad.loop import _MIN_TABLE_STEPS, _fixed_plan, stage_time_table
from odegrad.problem import CountedField, Problem
from odegrad.solvers import make_solver
from odegrad.solvers.explicit import ExplicitRungeKutta

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
# (output times, step size): steps that divide the interval up to round-off, steps that do
# not, one step per non-uniform output interval, decreasing times, and a large t0 (where a
# float32 time is coarse, so the order of the roundings shows).
PLANS = [
    ([0.0, 1.0], 0.1),
    ([0.0, 1.0], 0.07),
    ([0.3, 0.35, 1.1, 2.7], None),
    ([0.3, 0.35, 1.1, 2.7], 0.13),
    ([2.0, 0.7, -0.4], 0.3),
    ([1000.3, 1000.9], 0.0037),
]


class ScalarTimes(ExplicitRungeKutta):
    """The same scheme on the per-stage scalar time ops (the loop's path before the table)."""

    takes_stage_times = False


def scalar_times(t: torch.Tensor, plan: list, nodes) -> torch.Tensor:
    """What the per-step path computes: t_n = t[a] + offset, then t_n + c_i h, one op each."""
    rows = []
    for h, _, anchor, offset in plan:
        t_n = t[anchor].detach() + offset
        rows.append(torch.stack([t_n] + [t_n + c * h for c in nodes[1:]]))
    return torch.stack(rows)


def plan_of(t_out: list[float], step_size: float | None) -> list:
    return _fixed_plan(t_out, step_size, 1.0 if t_out[-1] > t_out[0] else -1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["rk4", "dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("t_out, step_size", PLANS)
def test_table_is_bitwise_the_scalar_ops(device, dtype, method, t_out, step_size):
    t = torch.tensor(t_out, dtype=dtype, device=device)
    times = [float(v) for v in t.cpu().tolist()]
    plan = plan_of(times, step_size)
    nodes = make_solver(method).stage_nodes
    table = stage_time_table(times, plan, nodes, t)
    want = scalar_times(t, plan, nodes)
    assert table.dtype == dtype and table.device == t.device
    assert table.shape == (len(plan), len(nodes))
    assert torch.equal(table.view(BITS[dtype]), want.view(BITS[dtype]))


def test_table_keeps_the_roundings_of_the_scalar_ops():
    """The float32 table is not t_n + c_i h rounded once: the test above can tell them apart."""
    t_out, step_size = PLANS[-1]
    t = torch.tensor(t_out, dtype=torch.float32)
    times = [float(v) for v in t.tolist()]
    plan = plan_of(times, step_size)
    nodes = make_solver("rk4").stage_nodes
    table = stage_time_table(times, plan, nodes, t)
    once = torch.tensor([[times[a] + off + c * h for c in nodes] for h, _, a, off in plan],
                        dtype=torch.float64).to(torch.float32)
    assert not torch.equal(table, once)


class Recorder(torch.nn.Module):
    """f that records the time of every call and whether it was a view (of the table)."""

    def __init__(self, field: torch.nn.Module):
        super().__init__()
        self.field = field
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def forward(self, t, y):
        self.calls.append((t.detach().clone(), t._is_view()))
        return self.field(t, y)


def setup(solver_cls, method, dtype, t_out, step_size, time_grad=False):
    torch.manual_seed(0)
    field = Recorder(MLPField(dtype=dtype))
    y0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    t = torch.tensor(t_out, dtype=dtype, requires_grad=time_grad)
    solver = solver_cls(make_solver(method).tableau)
    stats: dict = {}
    problem = Problem(f=CountedField(field, y0, stats), y0=y0, t=t, solver=solver,
                      params=tuple(field.parameters()), step_size=step_size, adaptive=False,
                      stats=stats, module=field)
    return field, problem


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).view(BITS[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.parametrize("t_out, step_size", [PLANS[1], PLANS[3], PLANS[4], PLANS[5],
                                               ([0.0, 1.0], 0.5)])
def test_forward_is_bitwise_unchanged(dtype, method, t_out, step_size):
    runs = []
    for cls in (ExplicitRungeKutta, ScalarTimes):
        field, problem = setup(cls, method, dtype, t_out, step_size)
        with torch.no_grad():
            ys = direct.solve(problem)
        runs.append((ys, field.calls))
    (ys, calls), (ys_scalar, calls_scalar) = runs
    assert torch.equal(bits(ys), bits(ys_scalar))
    assert len(calls) == len(calls_scalar)
    for (time, _), (time_scalar, _) in zip(calls, calls_scalar):
        assert torch.equal(bits(time), bits(time_scalar))
    # The table's views reach f at every stage; the scalar path passes fresh tensors (only the
    # first call, init's f(t[0], y0), gets the view t[0] on both). Below _MIN_TABLE_STEPS steps
    # the loop keeps the scalar ops (building the table would cost more).
    table = len(plan_of(t_out, step_size)) >= _MIN_TABLE_STEPS
    assert [view for _, view in calls].count(True) == (len(calls) if table else 1)
    assert [view for _, view in calls_scalar].count(True) == 1


def loss_and_grads(problem, module, **options):
    ys = module.solve(problem, **options)
    weights = torch.linspace(-1.0, 1.0, ys.numel(), dtype=ys.dtype).reshape(ys.shape)
    loss = (ys * weights).sum() + (ys[-1] ** 2).sum()
    inputs = [problem.y0, *problem.params] + ([problem.t] if problem.t.requires_grad else [])
    return ys, torch.autograd.grad(loss, inputs)


GRADIENTS = {  # name: (gradient module, its options, whether t is differentiated)
    "direct": (direct, {}, False),
    "direct, dt": (direct, {}, True),
    "discrete all": (discrete, {"checkpoints": "all"}, False),
    "discrete solution": (discrete, {"checkpoints": "solution"}, False),
    "discrete 2": (discrete, {"checkpoints": 2}, False),
    "discrete all, dt": (discrete, {"checkpoints": "all"}, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gradient", list(GRADIENTS))
@pytest.mark.parametrize("t_out, step_size", [PLANS[1], PLANS[3]])
def test_rk4_gradients_are_bitwise_unchanged(dtype, gradient, t_out, step_size):
    """direct, and discrete with every checkpoint policy (its backward recomputes the stage
    times by the scalar ops: a table that differed would show here); with t differentiated,
    discrete's forward still reads the table (it runs without a graph), direct's does not."""
    module, options, time_grad = GRADIENTS[gradient]
    runs = []
    for cls in (ExplicitRungeKutta, ScalarTimes):
        field, problem = setup(cls, "rk4", dtype, t_out, step_size, time_grad)
        runs.append((*loss_and_grads(problem, module, **options), field.calls))
    (ys, grads, calls), (ys_scalar, grads_scalar, _) = runs
    assert calls[1][1] == (module is discrete or not time_grad)  # the first run's table
    assert torch.equal(bits(ys), bits(ys_scalar))
    assert len(grads) == len(grads_scalar)
    for g, g_scalar in zip(grads, grads_scalar):
        assert torch.equal(bits(g), bits(g_scalar))
