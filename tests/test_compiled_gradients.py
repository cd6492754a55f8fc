"""compile=True with gradient="reversible" (compiled_reversible.py) and "backsolve"
(compiled_adjoint.py): outputs, gradients and f-evaluation counts equal to the eager path's
(float64, 1e-12 relative), one compilation per (f, scheme, shapes, grad mode) whatever t's
values or the step count, and the combinations not served refused by name.

Most tests trace with a counting backend (torch._dynamo.testing.CompileCounter: the captured
graph, VJPs included, runs eagerly), which still takes dynamo seconds per graph here (it traces
f's backward into each backward step): the default suite keeps one leapfrog and one backsolve
case, the other schemes, adaptive steps, blocks and the inductor runs are marked slow."""

import pytest
import torch

import odegrad
from compiled_cases import DT, Field, gradients, tuple_state_problem
from odegrad import compiled
from odegrad.errors import UnsupportedCombinationError


def assert_same(field, y0, t, tol=1e-12, **kwargs):
    ys_c, g_c, stats_c = gradients(field, y0, t, compile=True, **kwargs)
    ys_e, g_e, stats_e = gradients(field, y0, t, **kwargs)
    assert float((ys_c - ys_e).norm() / ys_e.norm()) < tol
    assert float((g_c - g_e).norm() / g_e.norm()) < tol
    for key in ("nfe_forward", "nfe_backward", "n_accepted"):
        assert stats_c[key] == stats_e[key], key
    return stats_c


def test_leapfrog_matches_eager_and_compiles_once(counter):
    """Fixed steps, outputs inside steps, ∂L/∂t; a second solve with other times and another
    step count compiles nothing."""
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.8], dtype=DT, requires_grad=True)
    options = {"method": "alf", "adaptive": False, "gradient": "reversible"}
    assert_same(field, y0, t, step_size=0.1, **options)
    graphs = counter.frame_count
    assert graphs == 4  # the step with v_0 carried, the step, backward with 0 and 1 outputs
    assert_same(field, y0, torch.tensor([0.1, 0.5, 0.75], dtype=DT, requires_grad=True),
                step_size=0.09, **options)
    assert counter.frame_count == graphs


def test_backsolve_matches_eager_and_compiles_once(counter):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.8], dtype=DT, requires_grad=True)
    options = {"method": "midpoint", "gradient": "backsolve"}
    assert_same(field, y0, t, step_size=0.1, **options)
    graphs = counter.frame_count
    # the forward's step and its run of steps (the CPU), the augmented step (fewer than 9
    # steps: no blocks)
    assert graphs == (3 if compiled.RUNS else 2)
    assert_same(field, y0, torch.tensor([0.1, 0.5, 0.75], dtype=DT, requires_grad=True),
                step_size=0.09, **options)
    assert counter.frame_count == graphs


# (method, options): fixed and adaptive steps; outputs inside steps; ∂L/∂t
CASES = [
    ("alf", {"rtol": 1e-5, "atol": 1e-7}),
    ("reversible_rk4", {"step_size": 0.1}),
    ("rk4", {"step_size": 0.1, "coupling": 0.99}),  # a plain method wrapped
    ("reversible_bosh3", {"rtol": 1e-5, "atol": 1e-7}),  # adaptive: the parasitic error term
]


@pytest.mark.slow
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_reversible_matches_eager(counter, method, options):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.8], dtype=DT, requires_grad=True)
    stats = assert_same(field, y0, t, method=method, gradient="reversible", **options)
    assert stats["drift"] < 1e-10
    assert counter.frame_count >= 2  # the step and the backward step


BACKSOLVE_CASES = [
    ("rk4", {"step_size": 0.02}),  # 40 steps: blocks of steps in both solves
    ("bosh3", {"adaptive": False, "step_size": 0.1}),  # FSAL
    ("dopri5", {"rtol": 1e-6, "atol": 1e-8}),  # adaptive forward and backward solves
    ("rk4", {"step_size": 0.1, "adjoint_method": "midpoint", "adjoint_step_size": 0.05}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, options", BACKSOLVE_CASES,
                         ids=[f"{m}-{o}" for m, o in BACKSOLVE_CASES])
def test_backsolve_matches_eager(counter, method, options):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.33, 0.8], dtype=DT, requires_grad=True)
    assert_same(field, y0, t, method=method, gradient="backsolve", **options)
    assert counter.frame_count >= 2  # the forward step and the augmented step


RECOMPILE_CASES = [
    ("alf", "reversible", {"adaptive": False}, 3),  # step with v_0 carried, step, backward
    ("reversible_rk4", "reversible", {}, 3),  # the same
    ("rk4", "backsolve", {}, 4),  # forward block and step, adjoint block and step
]


@pytest.mark.slow
@pytest.mark.parametrize("method, gradient, options, graphs", RECOMPILE_CASES,
                         ids=[f"{m}-{g}" for m, g, _, _ in RECOMPILE_CASES])
def test_no_recompilation_for_new_times_or_step_counts(counter, method, gradient, options,
                                                       graphs):
    torch.manual_seed(0)
    field = Field().to(DT)
    y0 = torch.randn(4, 2, dtype=DT)

    def run(t, step_size):
        y = y0.clone().requires_grad_()
        ys = odegrad.odeint(field, y, torch.tensor(t, dtype=DT), method=method,
                            step_size=step_size, gradient=gradient, compile=True, **options)
        (ys[-1] ** 2).sum().backward()

    run([0.0, 1.0], 0.1)
    assert counter.frame_count == graphs
    run([0.0, 1.0], 0.1)  # the same call again
    run([0.2, 0.9], 0.1)  # other times, a clipped last step
    run([0.0, 2.0], 0.05)  # another step count and step size
    run([0.0, 0.37], 0.01)  # 37 steps
    assert counter.frame_count == graphs


@pytest.mark.slow
def test_reversible_tuple_state(counter):
    solve = tuple_state_problem()
    options = dict(method="alf", adaptive=False, step_size=0.1, gradient="reversible")
    t = [0.0, 0.45, 1.0]
    for got, want in zip(solve(True, t, **options),
                         solve(False, t, **options), strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-12


@pytest.mark.parametrize("kwargs, names", [
    ({"method": "reversible_heun", "gradient": "reversible"}, "reversible_heun"),
    ({"method": "implicit_euler", "gradient": "reversible"}, "implicit_euler"),
    ({"gradient": "interpolated"}, "gradient='interpolated'"),
    ({"method": "implicit_euler", "gradient": "backsolve"}, "not an explicit"),
])
def test_unsupported_combinations_raise(kwargs, names):
    y0 = torch.randn(4, 2, dtype=DT, requires_grad=True)
    kwargs = {"method": "rk4", "step_size": 0.1, **kwargs}
    with pytest.raises(UnsupportedCombinationError, match="compile=True supports") as info:
        odegrad.odeint(Field().to(DT), y0, torch.tensor([0.0, 1.0], dtype=DT), compile=True,
                       **kwargs)
    assert names in str(info.value)


def test_backsolve_implicit_adjoint_method_raises():
    y0 = torch.randn(4, 2, dtype=DT, requires_grad=True)
    with pytest.raises(UnsupportedCombinationError, match="adjoint_method='implicit_euler'"):
        odegrad.odeint(Field().to(DT), y0, torch.tensor([0.0, 1.0], dtype=DT), method="rk4",
                       step_size=0.1, gradient="backsolve", adjoint_method="implicit_euler",
                       compile=True)


def test_compilation_failure_is_named(counter):
    def f(t, y):
        if float(y.sum()) > 1e9:  # data-dependent Python control flow: a graph break
            return y
        return -y

    with pytest.raises(compiled.CompilationError, match="method 'alf'.*compile=False"):
        odegrad.odeint(f, torch.randn(4, 2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       method="alf", adaptive=False, step_size=0.1, gradient="reversible",
                       compile=True)


# ---- inductor (slow: tens of seconds of compilation each on two cores) ----------------------


@pytest.mark.slow
@pytest.mark.parametrize("method, gradient, options", [
    ("alf", "reversible", {"adaptive": False}),
    ("reversible_rk4", "reversible", {}),
    ("rk4", "backsolve", {}),
])
def test_inductor_matches_eager_and_does_not_recompile(method, gradient, options):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    field = Field(hidden=16).to(DT)
    y0 = torch.randn(8, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    kwargs = {"method": method, "gradient": gradient, **options}
    assert_same(field, y0, t, step_size=0.05, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    assert_same(field, y0, torch.tensor([0.1, 0.4, 0.9], dtype=DT), step_size=0.02, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs
