"""The stochastic adjoint (gradient="backsolve" for SDEs, Li et al. 2020) converges to the
closed-form pathwise gradient of geometric Brownian motion (Stratonovich and Itô) as dt halves,
and to autograd through the same forward scheme; the SDE API's refusals name what to use
instead. Also: reversible Heun's solver state (stats["solver_state"], option solver_state=)."""

import pytest
import torch

import odegrad
from odegrad import BrownianInterval, sdeint
from odegrad.gradients.stochastic_adjoint import adjoint_schemes

DT = torch.float64
PATHS = 100
T = torch.tensor([0.0, 0.4, 1.0], dtype=DT)


def closed_form_and_solve():
    """Stratonovich GBM dy = μy dt + σy ∘ dW: y(t) = y0 exp(μt + σW_t), so the gradient of
    L = Σ y(1) + Σ y(0.4)² w.r.t. y0, μ and σ is known in closed form on each path."""
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=DT, requires_grad=True)
    y0 = torch.linspace(0.5, 1.5, PATHS, dtype=DT)[:, None].requires_grad_()
    bm = BrownianInterval(0.0, 1.0, (PATHS, 1), dtype=DT, seed=7)
    inputs = [y0, mu, sigma]
    y1 = y0 * torch.exp(mu + sigma * bm(0.0, 1.0))
    y04 = y0 * torch.exp(0.4 * mu + sigma * bm(0.0, 0.4))
    exact = torch.autograd.grad(y1.sum() + y04.pow(2).sum(), inputs)

    def gradient(method, dt, gradient):
        ys = sdeint(lambda t, y: mu * y, lambda t, y: sigma * y, y0, T, bm, method=method,
                    dt=dt, gradient=gradient, params=[mu, sigma])
        return torch.autograd.grad(ys[-1].sum() + ys[1].pow(2).sum(), inputs)

    return exact, gradient


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("method", ["midpoint", "reversible_heun"])
def test_backsolve_converges_as_dt_halves(method):
    exact, gradient = closed_form_and_solve()
    exact = flat(exact)
    errors = []
    for dt in (0.1, 0.05, 0.025):
        got = flat(gradient(method, dt, "backsolve"))
        errors.append(float((got - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 0.75 * errors[0] and errors[2] < 0.75 * errors[1], errors
    assert errors[-1] < 0.05, errors


def test_backsolve_and_direct_approach_each_other():
    """Both converge to the SDE's gradient, so their difference shrinks with dt."""
    _, gradient = closed_form_and_solve()
    gaps = []
    for dt in (0.1, 0.025):
        gaps.append(float((flat(gradient("heun", dt, "backsolve"))
                           - flat(gradient("heun", dt, "direct"))).abs().max()))
    assert gaps[1] < 0.5 * gaps[0], gaps


def test_backsolve_counts_and_memory():
    y0 = torch.ones(3, 2, dtype=DT, requires_grad=True)
    sol = odegrad.solve_sde(lambda t, y: -y, lambda t, y: 0.1 * y, y0, T, method="midpoint",
                            dt=0.1, gradient="backsolve", seed=0)
    sol.ys.sum().backward()
    assert sol.stats["checkpoint_bytes"] == sol.ys.numel() * 8
    assert sol.stats["nfe_backward"] > 0 and sol.stats["nge_backward"] > 0
    assert sol.stats["n_steps_backward"] >= sol.stats["n_steps"]


# ---- refusals -------------------------------------------------------------------------------


def solve(**kwargs):
    options = dict(method="midpoint", dt=0.1, seed=0) | kwargs
    y0 = options.pop("y0", torch.ones(2, 3, dtype=DT, requires_grad=True))
    t = options.pop("t", T)
    g = options.pop("g", lambda t, y: 0.1 * y)
    return odegrad.solve_sde(lambda t, y: -y, g, y0, t, **options)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"gradient": "backsolve", "adjoint_method": "euler"}, odegrad.UnsupportedCombinationError,
     "Stratonovich"),
    ({"gradient": "backsolve", "adjoint_method": "milstein"},
     odegrad.UnsupportedCombinationError, "reads ∂g/∂y"),
    ({"gradient": "backsolve", "adjoint_method": "nope"}, odegrad.UnknownNameError, "midpoint"),
    ({"gradient": "interpolated"}, odegrad.UnsupportedCombinationError, "backsolve"),
    ({"gradient": "reversible"}, odegrad.UnsupportedCombinationError, "reversible_heun"),
    ({"method": "milstein", "noise_type": "general", "brownian_size": 2},
     odegrad.UnsupportedCombinationError, "euler"),
    ({"method": "nope"}, odegrad.UnknownNameError, "reversible_heun"),
    ({"gradient": "nope"}, odegrad.UnknownNameError, "discrete"),
    ({"noise_type": "nope"}, odegrad.UnknownNameError, "diagonal"),
    ({"sde_type": "nope"}, odegrad.UnknownNameError, "stratonovich"),
    ({"no_such_option": 1}, odegrad.UnknownNameError, "valid options"),
    ({"rtol": 1e-3}, odegrad.UnsupportedCombinationError, "dt"),
    ({"adaptive": True}, odegrad.UnsupportedCombinationError, "fixed steps"),
    ({"dt": None}, odegrad.InvalidInputError, "dt"),
    ({"dt": -0.1}, odegrad.InvalidInputError, "dt"),
    ({"noise_type": "general"}, odegrad.InvalidInputError, "brownian_size"),
    ({"t": T.clone().requires_grad_()}, odegrad.UnsupportedCombinationError, "t.detach()"),
    ({"y0": (torch.ones(2), torch.ones(2))}, odegrad.InvalidInputError, "concatenate"),
    ({"checkpoints": 2}, odegrad.InvalidInputError, "discrete"),
    ({"g": lambda t, y: y[..., :2]}, odegrad.InvalidInputError, "shape"),
    ({"bm": BrownianInterval(0.0, 0.5, (2, 3), dtype=DT), "seed": None},
     odegrad.InvalidInputError, "does not contain"),
    ({"bm": BrownianInterval(0.0, 1.0, (2, 2), dtype=DT), "seed": None},
     odegrad.InvalidInputError, "needs"),
])
def test_refusals_name_what_to_use(kwargs, error, words):
    with pytest.raises(error, match=words):
        solve(**kwargs)


def test_a_tensor_missing_from_params_is_refused():
    scale = torch.tensor(0.1, dtype=DT, requires_grad=True)
    with pytest.raises(odegrad.InvalidInputError, match="g depends on"):
        solve(g=lambda t, y: scale * y, gradient="discrete", params=[])


# ---- the backward grid: float32 times, outputs off the step grid --------------------------


class GridBrownian:
    """One Brownian path known only on the grid k·dt (float64 increments cast to `dtype`): a
    query anywhere else raises, so a solve that reads it queries exactly the step grid."""

    def __init__(self, shape, dt, steps, dtype, seed=3):
        gen = torch.Generator().manual_seed(seed)
        increments = torch.randn(steps, *shape, generator=gen, dtype=DT) * dt ** 0.5
        self.w = torch.cat([torch.zeros(1, *shape, dtype=DT), increments.cumsum(0)])
        self.dt, self.t0, self.t1 = dt, 0.0, steps * dt
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cpu")
        self.queries = []

    def __call__(self, ta, tb):
        self.queries.append((ta, tb))
        return (self.w[self.index(tb)] - self.w[self.index(ta)]).to(self.dtype)

    def index(self, t):
        k = round(t / self.dt)
        if abs(t - k * self.dt) > 1e-12:
            raise AssertionError(f"Brownian query at t={t!r}, off the step grid")
        return k


def grid_gradient(method, dtype, dt=0.01, gradient="backsolve", t=None):
    t = torch.linspace(0, 1, 11, dtype=dtype) if t is None else t.to(dtype)
    steps = round(1 / dt)
    gen = torch.Generator().manual_seed(0)
    y0 = (1 + 0.3 * torch.randn(4, 2, generator=gen, dtype=DT)).to(dtype).requires_grad_()
    theta = torch.tensor([0.4, 0.8], dtype=dtype, requires_grad=True)
    bm = GridBrownian((4, 2), dt, steps, dtype)
    ys = sdeint(lambda s, y: -theta[0] * torch.sin(y), lambda s, y: theta[1] * torch.tanh(y),
                y0, t, bm, method=method, dt=dt, gradient=gradient, params=[theta])
    grads = torch.autograd.grad(ys.pow(2).sum(), [y0, theta])
    return flat(grads).double(), bm


@pytest.mark.parametrize("method", adjoint_schemes())
def test_backsolve_float32_times_off_binary_fractions(method):
    """Regression: float32 t = linspace(0, 1, 11) (0.1 is not a binary fraction) made the
    backward grid land one ulp below t0 ("outside the Brownian interval"). The forward and
    backward queries must be exactly the step grid k·dt; the float32 gradient then matches the
    float64 one on the same path to float32 round-off."""
    got, bm = grid_gradient(method, torch.float32)
    want, _ = grid_gradient(method, DT)
    assert rel_max(got, want) < 1e-4
    assert len(bm.queries) == 2 * 100  # 100 forward steps, 100 backward steps


def test_float32_forward_with_1000_steps_queries_the_grid():
    """Regression (sde_field.StepGrid): float32 step times t[0] + k·dt are rounded by more than
    1e-6·dt, so the snapping tolerance takes the dtype's resolution into account (before: 40 of
    100 steps at dt=0.01 queried W off the grid, and dt=0.001 failed at t=1)."""
    for dt in (0.01, 0.001):
        _, bm = grid_gradient("heun", torch.float32, dt=dt, gradient="direct")
        assert len(bm.queries) == round(1 / dt)


def test_backsolve_with_outputs_inside_steps():
    """Outputs strictly inside a forward step (0.23 with dt = 0.1 … 0.0125): the backward solve
    queries the forward's step grid plus the output times themselves (points of the same
    Brownian path), and backsolve still approaches direct as dt shrinks."""
    t = torch.tensor([0.0, 0.23, 1.0], dtype=DT)
    seen = []

    class Recording(BrownianInterval):
        def __call__(self, ta, tb=None):
            seen.append((ta, tb))
            return super().__call__(ta, tb)

    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=DT, requires_grad=True)
    y0 = torch.linspace(0.5, 1.5, PATHS, dtype=DT)[:, None].requires_grad_()

    def grads(dt, gradient):
        bm = Recording(0.0, 1.0, (PATHS, 1), dtype=DT, seed=7)
        ys = sdeint(lambda s, y: mu * y, lambda s, y: sigma * y, y0, t, bm, method="midpoint",
                    dt=dt, gradient=gradient, params=[mu, sigma])
        return flat(torch.autograd.grad(ys[-1].sum() + ys[1].pow(2).sum(), [y0, mu, sigma]))

    gaps = []
    for dt in (0.1, 0.025, 0.00625):
        seen.clear()
        backsolve = grads(dt, "backsolve")
        grid = {k * dt for k in range(round(1 / dt))} | {1.0}
        assert {x for q in seen for x in q} <= grid | {0.23}
        gaps.append(rel_max(backsolve, grads(dt, "direct")))
    assert gaps[1] < 0.5 * gaps[0] and gaps[2] < 0.5 * gaps[1], gaps


def rel_max(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- Itô problems: forward by an Itô scheme, backward on the Stratonovich form -------------


def ito_closed_form_and_solve():
    """Itô GBM dy = μy dt + σy dW: y(t) = y0 exp((μ − σ²/2)t + σW_t); the pathwise gradient of
    L = Σ y(1) + Σ y(0.4)² w.r.t. y0, μ and σ in closed form (σ enters the drift of the
    Stratonovich form, so a missing Itô correction would converge elsewhere)."""
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=DT, requires_grad=True)
    y0 = torch.linspace(0.5, 1.5, PATHS, dtype=DT)[:, None].requires_grad_()
    bm = BrownianInterval(0.0, 1.0, (PATHS, 1), dtype=DT, seed=7)
    inputs = [y0, mu, sigma]
    drift = mu - 0.5 * sigma**2
    y1 = y0 * torch.exp(drift + sigma * bm(0.0, 1.0))
    y04 = y0 * torch.exp(0.4 * drift + sigma * bm(0.0, 0.4))
    exact = flat(torch.autograd.grad(y1.sum() + y04.pow(2).sum(), inputs))

    def gradient(method, dt, gradient, **options):
        sol = odegrad.solve_sde(lambda t, y: mu * y, lambda t, y: sigma * y, y0, T, bm,
                                method=method, dt=dt, gradient=gradient, params=[mu, sigma],
                                sde_type="ito", **options)
        grads = flat(torch.autograd.grad(sol.ys[-1].sum() + sol.ys[1].pow(2).sum(), inputs))
        return grads, sol.stats

    return exact, gradient


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_backsolve_ito_converges_to_the_closed_form(method):
    exact, gradient = ito_closed_form_and_solve()
    errors, gaps = [], []
    for dt in (0.1, 0.05, 0.025, 0.0125):
        backsolve, stats = gradient(method, dt, "backsolve")
        direct, _ = gradient(method, dt, "direct")
        assert stats["adjoint_method"] == "midpoint" and stats["method"] == method
        errors.append(rel_l2(backsolve, exact))
        gaps.append(rel_l2(backsolve, direct))
    # Milstein: strong order 1 (error ÷ 8 over 8x dt), Euler–Maruyama ½ (÷ 2.8)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.3 * errors[0] and errors[-1] < 0.05, errors
    assert gaps[-1] < 0.3 * gaps[0] and gaps[-1] < 0.02, gaps


def test_backsolve_ito_with_a_stratonovich_adjoint_method():
    """adjoint_method= any Stratonovich scheme that uses g only through g·ΔW."""
    exact, gradient = ito_closed_form_and_solve()
    errors = [rel_l2(gradient("milstein", dt, "backsolve", adjoint_method="heun")[0], exact)
              for dt in (0.05, 0.0125)]
    assert errors[1] < 0.4 * errors[0] and errors[1] < 0.05, errors


class CrossDiffusion(torch.nn.Module):
    """g with g_i depending on every y_j (diagonal) or an (d, m) matrix (general): the Itô
    correction Σ_k (∂g_{·k}/∂y) g_{·k} with its cross terms, and its second derivatives in the
    adjoint."""

    def __init__(self, noise_type, d=2, m=3):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.noise_type, self.m = noise_type, m
        out = d if noise_type == "diagonal" else d * m
        self.w = torch.nn.Parameter(0.5 * torch.randn(out, d, generator=gen, dtype=DT))
        self.c = torch.nn.Parameter(0.3 + 0.1 * torch.rand(out, generator=gen, dtype=DT))

    def forward(self, t, y):
        out = self.c * torch.tanh(y @ self.w.T + 0.5)
        return out if self.noise_type == "diagonal" else out.reshape(*y.shape, self.m)


@pytest.mark.parametrize("noise_type", ["diagonal", "general"])
def test_backsolve_ito_approaches_direct_through_euler(noise_type):
    """A nonlinear Itô SDE: backsolve through an Euler–Maruyama forward approaches autograd
    through the same Euler–Maruyama forward (both tend to the SDE's gradient) as dt shrinks."""
    g = CrossDiffusion(noise_type)
    theta = torch.tensor([0.7, -0.4], dtype=DT, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    y0 = (0.5 * torch.randn(64, 2, generator=gen, dtype=DT)).requires_grad_()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    size = None if noise_type == "diagonal" else g.m
    bm = BrownianInterval(0.0, 1.0, (64, 2 if size is None else size), dtype=DT, seed=5)
    inputs = [y0, theta, *g.parameters()]

    def grads(dt, gradient):
        ys = sdeint(lambda s, y: theta * torch.sin(y) - y, g, y0, t, bm, method="euler",
                    dt=dt, sde_type="ito", noise_type=noise_type, gradient=gradient,
                    params=[theta, *g.parameters()])
        return flat(torch.autograd.grad(ys[1:].pow(2).sum() + ys[-1, :, 0].sum(), inputs))

    gaps = [rel_l2(grads(dt, "backsolve"), grads(dt, "direct")) for dt in (0.1, 0.025, 0.00625)]
    assert gaps[1] < 0.7 * gaps[0] and gaps[2] < 0.7 * gaps[1] and gaps[2] < 0.03, gaps


def test_backsolve_forward_milstein_on_a_stratonovich_sde():
    """The forward scheme is free (a solve without a graph): Stratonovich Milstein forward,
    midpoint backward (the default when the forward scheme reads ∂g/∂y)."""
    exact, gradient = closed_form_and_solve()
    exact = flat(exact)
    errors = [rel_l2(flat(gradient("milstein", dt, "backsolve")), exact)
              for dt in (0.1, 0.025, 0.00625)]
    assert errors[1] < 0.5 * errors[0] and errors[2] < 0.5 * errors[1], errors
    assert errors[-1] < 0.02, errors


# ---- reversible Heun's solver state: stats["solver_state"] and solver_state= ----------------


def test_reversible_heun_solver_state_continues_the_solve():
    """Solving [0, 0.5] and then [0.5, 1] from the first solve's final (f, g, z) is the solve
    over [0, 1], bit for bit, and its gradient (direct, through the solver state) too."""
    w = torch.tensor([0.8, -0.3], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[0.2, 0.5], [-0.4, 0.1]], dtype=DT, requires_grad=True)
    bm = BrownianInterval(0.0, 1.0, (2, 2), dtype=DT, seed=9)

    def f(t, y):
        return w * torch.sin(y) - 0.5 * y

    def g(t, y):
        return 0.3 * torch.cos(y + w)

    whole = odegrad.solve_sde(f, g, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT), bm,
                              method="reversible_heun", dt=0.0625, params=[w])
    first = odegrad.solve_sde(f, g, y0, torch.tensor([0.0, 0.5], dtype=DT), bm,
                              method="reversible_heun", dt=0.0625, params=[w])
    fs, gs, zs = first.stats["solver_state"]
    assert fs.shape == gs.shape == zs.shape == y0.shape and zs.requires_grad
    second = odegrad.solve_sde(f, g, first.ys[-1], torch.tensor([0.5, 1.0], dtype=DT), bm,
                               method="reversible_heun", dt=0.0625, params=[w],
                               solver_state=(fs, gs, zs))
    assert torch.equal(second.ys[-1], whole.ys[-1])
    for a, b in zip(second.stats["solver_state"], whole.stats["solver_state"]):
        assert torch.equal(a, b)
    want = torch.autograd.grad(whole.ys[-1].pow(2).sum(), [y0, w])
    got = torch.autograd.grad(second.ys[-1].pow(2).sum(), [y0, w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_solver_state_refusals_and_absence():
    y0 = torch.ones(2, 3, dtype=DT, requires_grad=True)
    start = (torch.zeros(2, 3, dtype=DT),) * 3
    with pytest.raises(odegrad.UnsupportedCombinationError, match="gradient='direct'"):
        solve(method="reversible_heun", gradient="reversible", solver_state=start)
    with pytest.raises(odegrad.InvalidInputError, match="must have shape"):
        solve(method="reversible_heun", solver_state=(start[0], start[1], torch.zeros(3)))
    with pytest.raises(odegrad.UnknownNameError, match="solver_state"):
        solve(method="heun", solver_state=start)
    # the adjoint gradients keep no graph of it: given only without grad mode
    assert "solver_state" not in solve(method="reversible_heun", gradient="reversible").stats
    with torch.no_grad():
        sol = solve(method="reversible_heun", gradient="reversible", y0=y0)
    assert len(sol.stats["solver_state"]) == 3
