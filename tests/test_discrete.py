"""gradient="discrete": exact against "direct" through the same scheme, for every explicit
method and checkpoint policy; costs, memory, module state, the generic-solver paths."""

import dataclasses
import functools

import pytest
import torch

import odegrad
from conftest import MLPField
from odegrad.checkpointing import optimal_recomputations
from odegrad.gradients import direct, discrete
from odegrad.problem import CountedField, Problem
from odegrad.solvers import make_solver
from odegrad.solvers.base import Solver
from odegrad.tableaus import TABLEAUS

DT = torch.float64
POLICIES = ["all", "solution", 2, 3, 8]
FIXED = ["euler", "midpoint", "heun", "rk4", "bosh3", "dopri5", "tsit5", "dopri8"]
ADAPTIVE = {"heun": 1e-3, "bosh3": 1e-4, "dopri5": 1e-6, "tsit5": 1e-6, "dopri8": 1e-10}
T_OUT = [0.0, 0.23, 0.6, 0.95, 1.3]




def gradients(field, y0, t, **kwargs):
    """Outputs, stats and dL/d(y0, t, params) for a fixed weighting of every output."""
    sol = odegrad.solve(field, y0, t, **kwargs)
    weights = torch.linspace(-1.0, 1.0, sol.ys.numel(), dtype=DT).reshape(sol.ys.shape)
    loss = (sol.ys * weights).sum() + (sol.ys[-1] ** 2).sum()
    grads = torch.autograd.grad(loss, [y0, t, *field.parameters()])
    params = torch.cat([g.reshape(-1) for g in grads[2:]])
    return sol.ys.detach(), sol.stats, (grads[0], grads[1], params)


def assert_close(got, want, tol=1e-10):
    """Relative error below tol, for each of (y0, t, params) when given such triples."""
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, tol)
        return
    assert float((got - want).norm() / want.norm()) < tol


def inputs():
    y0 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    t = torch.tensor(T_OUT, dtype=DT, requires_grad=True)
    return y0, t


@pytest.mark.parametrize(
    "method, options",
    [(m, {"step_size": 0.1, "adaptive": False}) for m in FIXED]
    + [(m, {"rtol": tol, "atol": tol}) for m, tol in ADAPTIVE.items()],
    ids=[f"{m}-fixed" for m in FIXED] + [f"{m}-adaptive" for m in ADAPTIVE],
)
def test_matches_direct_for_every_policy(method, options):
    field = MLPField()
    y0, t = inputs()
    ys, stats, want = gradients(field, y0, t, method=method, **options)
    assert stats["n_accepted"] >= 4 and stats["n_accepted"] <= 40
    for policy in POLICIES:
        got_ys, got_stats, got = gradients(
            field, y0, t, method=method, gradient="discrete", checkpoints=policy, **options
        )
        assert got_stats["n_accepted"] == stats["n_accepted"]
        assert torch.allclose(got_ys, ys, rtol=1e-13, atol=1e-13)
        assert_close(got, want)
        if isinstance(policy, int):
            assert got_stats["checkpoint_bytes"] <= policy * y0.numel() * 8
        if isinstance(policy, int) and options.get("adaptive") is False:
            n = got_stats["n_accepted"]
            assert got_stats["n_recomputed_steps"] == optimal_recomputations(n, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_at_step_ends_and_backwards_in_time(policy):
    # One step per output interval: every output is an anchored step end (h depends on t).
    field = MLPField()
    y0, t = inputs()
    for times in (t, t.detach().flip(0).requires_grad_()):
        _, _, want = gradients(field, y0, times, method="rk4")
        _, _, got = gradients(field, y0, times, method="rk4", gradient="discrete",
                              checkpoints=policy)
        assert_close(got, want)


def test_default_policy_is_all_and_tuple_states():
    field = MLPField()
    a0 = torch.randn(2, 2, dtype=DT, requires_grad=True)
    b0 = torch.randn(2, 1, dtype=DT, requires_grad=True)
    t = torch.tensor(T_OUT, dtype=DT)

    def tuple_field(t, state):
        out = field(t, torch.cat(state, dim=-1))
        return out[:, :2], out[:, 2:]

    results = []
    for gradient in ("direct", "discrete"):
        sol = odegrad.solve(tuple_field, (a0, b0), t, method="dopri5", gradient=gradient,
                            params=list(field.parameters()))
        loss = sum((y * y).sum() for y in sol.ys)
        results.append(torch.autograd.grad(loss, [a0, b0, *field.parameters()]))
    assert sol.stats["checkpoints"] == "all"
    for got, want in zip(results[1], results[0]):
        assert_close(got, want)


def test_gradcheck():
    a = (0.5 * torch.randn(2, 2, dtype=DT)).requires_grad_()
    y0 = torch.randn(2, 2, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.55], dtype=DT, requires_grad=True)

    def run(y0, t, a, method, checkpoints):
        return odegrad.odeint(
            lambda t, y: torch.tanh(y @ a.T) * (1 + 0.3 * torch.sin(2 * t)), y0, t,
            method=method, step_size=0.07, adaptive=False, gradient="discrete",
            checkpoints=checkpoints, params=[a],
        )

    for method, checkpoints in (("rk4", 2), ("dopri5", "all")):
        assert torch.autograd.gradcheck(
            functools.partial(run, method=method, checkpoints=checkpoints), (y0, t, a)
        )


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_backward_cost_in_f_evaluations(method):
    field = MLPField()
    y0 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    n, tableau = 10, TABLEAUS[method]
    s = tableau.stages
    # Distinct stage evaluations of the forward pass: the FSAL stage is shared by two steps.
    forward = n * (s - 1) + 1 if tableau.fsal else n * s
    # "all": one VJP (F + B) per distinct stage; the last FSAL stage of the solve feeds nothing.
    vjps = forward - 1 if tableau.fsal else forward
    expected = {"all": (vjps, 0), "solution": (vjps + n * s, n)}
    for policy, (nfe, recomputed) in expected.items():
        sol = odegrad.solve(field, y0, t, method=method, step_size=1 / n, adaptive=False,
                            gradient="discrete", checkpoints=policy)
        sol.ys[-1].sum().backward()
        assert sol.stats["nfe_forward"] == forward
        assert sol.stats["nfe_backward"] == nfe
        assert sol.stats["n_recomputed_steps"] == recomputed


@pytest.mark.parametrize("n_steps", [10, 100, 1000])
def test_checkpoint_bytes(n_steps):
    a = torch.tensor(-0.7, dtype=DT)
    y0 = torch.randn(5, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    state = 5 * 8
    sizes = {}
    for policy in POLICIES:
        sol = odegrad.solve(lambda t, y: a * y, y0, t, method="euler", step_size=1 / n_steps,
                            adaptive=False, gradient="discrete", checkpoints=policy)
        forward_bytes = sol.stats["checkpoint_bytes"]
        sol.ys[-1].sum().backward()
        sizes[policy] = sol.stats["checkpoint_bytes"]
        assert sizes[policy] == forward_bytes  # the backward pass never holds more
        if isinstance(policy, int):
            assert sizes[policy] == min(policy, n_steps) * state
            assert sol.stats["n_recomputed_steps"] == optimal_recomputations(n_steps, policy)
    assert sizes["all"] == sizes["solution"] == n_steps * state  # Euler's stage point is y_n
    # the gradient is exact: d y(1)/d y0 = (1 + a/N)^N for Euler
    exact = (1 + (-0.7) / n_steps) ** n_steps
    assert torch.allclose(y0.grad, torch.full_like(y0, exact * len(POLICIES)))


@pytest.mark.parametrize("method, kept", [("rk4", 4), ("midpoint", 2), ("dopri5", 7)])
def test_all_keeps_the_stages_the_backward_pass_reads(method, kept):
    # y_n and the stages some stage point uses (plus the FSAL stage): rk4 drops K_4.
    field = MLPField()
    y0 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    for n_steps in (10, 100):
        t = torch.tensor([0.0, 1.0], dtype=DT)
        sol = odegrad.solve(field, y0, t, method=method, step_size=1 / n_steps, adaptive=False,
                            gradient="discrete")
        first = 1 if method == "dopri5" else 0  # K_1 of the first FSAL step
        assert sol.stats["checkpoint_bytes"] == (n_steps * kept + first) * y0.numel() * 8
        # with t differentiated, every stage is kept (∂/∂h reads them all)
        sol = odegrad.solve(field, y0, t.requires_grad_(), method=method,
                            step_size=1 / n_steps, adaptive=False, gradient="discrete")
        stages = TABLEAUS[method].stages
        full = n_steps * stages + 1 if method == "dopri5" else n_steps * (stages + 1)
        assert sol.stats["checkpoint_bytes"] == full * y0.numel() * 8


def test_adaptive_binomial_keeps_at_most_c_states():
    field = MLPField()
    y0, t = inputs()
    _, _, want = gradients(field, y0, t, method="heun", rtol=1e-5, atol=1e-5)
    _, stats, got = gradients(field, y0, t, method="heun", rtol=1e-5, atol=1e-5,
                              gradient="discrete", checkpoints=4)
    assert stats["n_accepted"] > 50
    assert stats["checkpoint_bytes"] <= 4 * y0.numel() * 8
    optimum = optimal_recomputations(stats["n_accepted"], 4)
    assert optimum <= stats["n_recomputed_steps"] <= 1.3 * optimum
    assert_close(got, want)


def test_memory_budget_picks_the_policy():
    field = MLPField()
    y0, t = inputs()
    state = y0.numel() * 8
    options = dict(method="rk4", step_size=0.1, adaptive=False, gradient="discrete")
    for budget, policy in ((1e9, "all"), (13 * state, "solution"), (5 * state, 5)):
        _, stats, _ = gradients(field, y0, t, memory_budget=budget, **options)
        assert stats["checkpoints"] == policy
        assert stats["checkpoint_bytes"] <= budget
    # adaptive: N unknown; "all" while it fits, then states thinned online
    _, _, want = gradients(field, y0, t, method="dopri5", rtol=1e-9, atol=1e-9)
    for budget, policy in ((1e9, "all"), (30 * state, 30), (3 * state, 3)):
        _, stats, got = gradients(field, y0, t, method="dopri5", rtol=1e-9, atol=1e-9,
                                  gradient="discrete", memory_budget=budget)
        assert stats["n_accepted"] >= 7
        assert stats["checkpoints"] == policy and stats["checkpoint_bytes"] <= budget
        assert_close(got, want)
    with pytest.raises(odegrad.InvalidInputError, match="holds no state"):
        odegrad.solve(field, y0, t, gradient="discrete", memory_budget=10)
    with pytest.raises(odegrad.InvalidInputError, match="not both"):
        odegrad.solve(field, y0, t, gradient="discrete", memory_budget=1e6, checkpoints=2)


@pytest.mark.parametrize("bad", ["some", 0, -2, 2.5, True])
def test_bad_checkpoints(bad):
    y0, t = inputs()
    with pytest.raises(odegrad.UnknownNameError, match="checkpoints"):
        odegrad.solve(MLPField(), y0, t, gradient="discrete", checkpoints=bad)


def test_without_grad_no_checkpoints_and_same_values():
    field = MLPField()
    y0, t = inputs()
    with torch.no_grad():
        sol = odegrad.solve(field, y0, t, gradient="discrete")
        want = odegrad.odeint(field, y0, t)
    assert torch.equal(sol.ys, want) and sol.stats["checkpoint_bytes"] == 0


def test_second_backward_needs_retain_graph():
    field = MLPField()
    y0, t = inputs()
    ys = odegrad.odeint(field, y0, t, gradient="discrete", checkpoints=2)
    (first,) = torch.autograd.grad(ys.sum(), y0, retain_graph=True)
    (second,) = torch.autograd.grad(ys.sum(), y0)
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="second time"):
        ys.sum().backward()


class BatchNormField(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 16, dtype=DT)
        self.norm = torch.nn.BatchNorm1d(16, dtype=DT)
        self.drop = torch.nn.Dropout(dropout)
        self.l2 = torch.nn.Linear(16, 3, dtype=DT)

    def forward(self, t, y):
        z = torch.cat([y, t.expand(y.shape[0], 1)], dim=-1)
        return self.l2(self.drop(torch.tanh(self.norm(self.l1(z)))))


@pytest.mark.parametrize("policy", ["all", "solution", 2])
def test_batchnorm_statistics_updated_once_and_gradients_exact(policy):
    reference = BatchNormField()
    y0 = torch.randn(6, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT, requires_grad=True)
    options = dict(method="rk4", step_size=0.1, adaptive=False)
    results = []
    for gradient, extra in (("direct", {}), ("discrete", {"checkpoints": policy})):
        field = BatchNormField()
        field.load_state_dict(reference.state_dict())
        results.append((field, gradients(field, y0, t, gradient=gradient, **options, **extra)))
    (f_direct, (_, _, want)), (f_discrete, (_, stats, got)) = results
    assert stats["nfe_backward"] > 0
    assert_close(got, want)
    assert int(f_discrete.norm.num_batches_tracked) == stats["nfe_forward"]
    for name, buffer in f_direct.named_buffers():
        assert torch.equal(buffer, dict(f_discrete.named_buffers())[name]), name


@pytest.mark.parametrize("policy", ["all", 2])
def test_dropout_masks_are_replayed(policy):
    field = BatchNormField(dropout=0.3)
    y0 = torch.randn(6, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    options = dict(method="dopri5", step_size=0.1, adaptive=False, gradient="discrete",
                   checkpoints=policy)
    direction = torch.randn_like(y0)

    def loss(y0, seed, **extra):
        torch.manual_seed(seed)
        return (odegrad.odeint(field, y0, t, **options, **extra) ** 2).sum()

    eps = 1e-6
    with torch.no_grad():
        fd = (loss(y0 + eps * direction, 7) - loss(y0 - eps * direction, 7)) / (2 * eps)
        assert abs(float(loss(y0, 7) - loss(y0, 8))) > 1e-3  # the masks matter
    (g,) = torch.autograd.grad(loss(y0, 7), y0)
    assert abs(float((g * direction).sum() - fd)) < 1e-7 * abs(float(fd))
    (g_fresh_masks,) = torch.autograd.grad(loss(y0, 7, reproduce_rng=False), y0)
    assert abs(float((g_fresh_masks * direction).sum() - fd)) > 1e-3 * abs(float(fd))


class Wrapped(Solver):
    """An explicit Runge–Kutta scheme behind the bare Solver interface (the generic path)."""

    def __init__(self, method):
        self.inner = make_solver(method)
        self.name, self.order = f"wrapped_{method}", self.inner.order
        self.error_order = self.inner.error_order

    def init(self, f, t0, y0):
        return self.inner.init(f, t0, y0)

    def step(self, f, t, h, y, carry):
        return self.inner.step(f, t, h, y, carry)

    def interpolate(self, y, h, dense, theta):
        return self.inner.interpolate(y, h, dense, theta)


class WrappedWithVJP(Wrapped):
    """The same with its own adjoint step (the protocol the implicit solvers implement)."""

    def step_vjp(self, f, t, h, state, step, state_next_bar, dense_bars, params):
        with torch.enable_grad():
            y = state.detach().requires_grad_()
            replay = self.inner.step(f, t, h, y, None)
            outs = [replay.y] + [self.inner.interpolate(y, h, replay.dense, th)
                                 for th, _ in dense_bars]
            cots = [state_next_bar] + [g for _, g in dense_bars]
            grads = torch.autograd.grad(outs, [y, *params], cots, allow_unused=True)
        return grads[0], tuple(grads[1:])


def make_problem(solver, field, y0, t, **options):
    stats = {}
    params = tuple(field.parameters())
    return Problem(f=CountedField(field, y0, stats), y0=y0, t=t, solver=solver, params=params,
                   stats=stats, module=field, **options)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.parametrize("policy", ["all", "solution", 2])
@pytest.mark.parametrize("wrapper", [Wrapped, WrappedWithVJP])
def test_generic_solver_paths(method, policy, wrapper):
    field = MLPField()
    y0, t = inputs()
    time = wrapper is Wrapped
    t = t if time else t.detach()
    adaptive = method == "dopri5"
    options = dict(rtol=1e-6, atol=1e-6, adaptive=True) if adaptive else \
        dict(step_size=0.1, adaptive=False)
    results = []
    for module, kwargs in ((direct, {}), (discrete, {"checkpoints": policy})):
        problem = make_problem(wrapper(method), field, y0, t, **options)
        ys = module.solve(problem, **kwargs)
        loss = (ys**2).sum() + ys[1].sum()
        inputs_ = [y0, *field.parameters()] + ([t] if time else [])
        results.append((torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs_)]),
                        problem.stats))
    (want, _), (got, stats) = results
    assert_close(got, want)
    n = stats["n_accepted"]
    replays = {"all": 0, "solution": 0}  # the replay is the VJP; only graph-free re-runs count
    own_vjp = {"all": 0, "solution": n}  # without stored Steps each step is recomputed once
    expected = (replays if wrapper is Wrapped else own_vjp).get(policy)
    if expected is None:
        optimum = optimal_recomputations(n, policy) - (n if wrapper is Wrapped else 0)
        assert stats["n_recomputed_steps"] >= optimum
        expected = optimum if not adaptive else stats["n_recomputed_steps"]
    assert stats["n_recomputed_steps"] == expected


@pytest.mark.parametrize(
    "method, options",
    [
        ("alf", {"step_size": 0.1, "adaptive": False}),
        ("reversible_heun", {"rtol": 1e-4, "atol": 1e-4}),
        ("reversible_dopri5", {"rtol": 1e-6, "atol": 1e-6}),
        ("reversible_rk4", {"step_size": 0.1}),
    ],
)
def test_other_solvers_through_the_replay(method, options):
    # Augmented states (observe / initial_state), carries and inits of the peers' solvers.
    if method not in odegrad.METHODS:
        pytest.skip(f"{method} is not implemented in this tree")
    field = MLPField()
    y0, t = inputs()
    _, _, want = gradients(field, y0, t, method=method, **options)
    for policy in ("all", 2):
        _, _, got = gradients(field, y0, t, method=method, gradient="discrete",
                              checkpoints=policy, **options)
        assert_close(got, want)


def test_step_vjp_solvers_refuse_time_gradients():
    field = MLPField()
    y0, t = inputs()
    problem = make_problem(WrappedWithVJP("rk4"), field, y0, t, step_size=0.1, adaptive=False)
    with pytest.raises(odegrad.UnsupportedCombinationError, match="step_vjp"):
        discrete.check(problem)


def test_generic_path_with_dropout_replays_masks():
    field = BatchNormField(dropout=0.3)
    y0 = torch.randn(6, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    direction = torch.randn_like(y0)

    def loss(y0):
        torch.manual_seed(3)
        problem = make_problem(Wrapped("rk4"), field, y0, t, step_size=0.1, adaptive=False)
        return (discrete.solve(problem, checkpoints=2) ** 2).sum()

    eps = 1e-6
    with torch.no_grad():
        fd = (loss(y0 + eps * direction) - loss(y0 - eps * direction)) / (2 * eps)
    (g,) = torch.autograd.grad(loss(y0), y0)
    assert abs(float((g * direction).sum() - fd)) < 1e-7 * abs(float(fd))


def test_problem_is_not_mutated_by_the_rng_wrapping():
    field = BatchNormField(dropout=0.3)
    y0 = torch.randn(6, 3, dtype=DT, requires_grad=True)
    problem = make_problem(make_solver("rk4"), field, y0, torch.tensor([0.0, 1.0], dtype=DT),
                           step_size=0.25, adaptive=False)
    names = [f.name for f in dataclasses.fields(problem)]
    before = [getattr(problem, name) for name in names]
    discrete.solve(problem).sum().backward()
    assert all(getattr(problem, name) is value for name, value in zip(names, before))
