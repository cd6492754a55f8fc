"""cdeint: closed-form solves, the knots, and the gradient through every gradient method."""

import pytest
import torch

import odegrad
from odegrad import InvalidInputError, UnsupportedCombinationError, paths

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:gradient='interpolated'")


def observations(batch=4, length=6, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.2 + 0.4 * torch.rand(length, generator=g, dtype=DT), 0) - 0.2
    return t, torch.randn(batch, length, channels, generator=g, dtype=DT)


class Field(torch.nn.Module):
    """f(t, z) = tanh(W z + b) reshaped to (hidden, channels)."""

    def __init__(self, hidden=3, channels=2, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.channels = hidden, channels
        self.linear = torch.nn.Linear(hidden, hidden * channels).double()

    def forward(self, t, z):
        return torch.tanh(self.linear(z)).view(*z.shape[:-1], self.hidden, self.channels)


@pytest.mark.parametrize("kind", list(paths.KINDS))
def test_linear_cde_closed_form(kind):
    """dz = a z dX^(c) in one channel c: z(t) = z0 exp(a (X^(c)(t) − X^(c)(t0)))."""
    t, x = observations(batch=2)
    X = paths.KINDS[kind](t, x)
    a, c = 0.6, X.channels - 1
    mask = torch.zeros(X.channels, dtype=DT)
    mask[c] = a

    def f(s, z):
        return z.unsqueeze(-1) * mask

    z0 = torch.tensor([[1.0], [0.5]], dtype=DT)
    ts = torch.linspace(float(t[0]), float(t[-1]), 7, dtype=DT)
    zs = odegrad.cdeint(f, X, z0, ts, method="dopri5", rtol=1e-10, atol=1e-12)
    expected = z0 * torch.exp(a * (X.evaluate(ts)[..., c] - X.evaluate(ts[0])[..., c:]))
    assert zs.shape == (7, 2, 1)
    assert (zs - expected.transpose(0, 1).unsqueeze(-1)).abs().max() < 1e-7


@pytest.mark.parametrize("kind", ["linear", "rectilinear", "hermite_cubic", "natural_cubic"])
def test_fixed_steps_land_on_the_knots(kind):
    """A constant field: z(t) = z0 + M (X(t) − X(t0)). rk4 is exact on each piece (Simpson's
    rule on a derivative of degree ≤ 2) only when no step crosses a knot and each step reads its
    own piece's derivative."""
    t, x = observations(batch=3)
    X = paths.KINDS[kind](t, x)
    M = torch.randn(3, 2, X.channels, generator=torch.Generator().manual_seed(5), dtype=DT)
    z0 = torch.randn(3, 2, dtype=DT)
    ts = torch.stack([t[0], 0.3 * t[1] + 0.7 * t[2], t[-1]])  # not a knot of any kind
    sol = odegrad.solve_cde(lambda s, z: M, X, z0, ts, method="rk4")
    expected = z0 + (M @ (X.evaluate(ts) - X.evaluate(ts[0]).unsqueeze(-2)).transpose(-1, -2)
                     ).permute(2, 0, 1)
    assert (sol.ys - expected).abs().max() < 1e-12
    assert sol.stats["n_steps"] == len(X.knots)  # one step per knot interval, + 1 for ts[1]


def make_problem(kind, seed=0):
    t, x = observations(seed=seed)
    data = x.clone().requires_grad_()
    z0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    return t, data, z0.requires_grad_(), paths.KINDS[kind](t, data)


def gradient(kind, method, gradient_, func, **options):
    t, data, z0, X = make_problem(kind)
    ts = torch.stack([t[0], 0.4 * t[2] + 0.6 * t[3], t[-1]])  # an output inside a piece
    sol = odegrad.solve_cde(func, X, z0, ts, method=method, gradient=gradient_, **options)
    loss = sol.ys[-1].pow(2).sum() + sol.ys[1].sum()
    grads = torch.autograd.grad(loss, [z0, data, *func.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]), sol.stats


EXACT = [("discrete", {"checkpoints": "all"}), ("discrete", {"checkpoints": "solution"}),
         ("discrete", {"checkpoints": 2}), ("reversible", {})]
SETTINGS = {"rk4": {"step_size": 0.15}, "dopri5": {"rtol": 1e-7, "atol": 1e-9}}


@pytest.mark.parametrize("kind", ["linear", "hermite_cubic", "natural_cubic"])
@pytest.mark.parametrize("method, gradient_, options",
                         [("rk4", g, o) for g, o in EXACT] + [("dopri5", g, o) for g, o in
                                                              (EXACT[0], EXACT[3])])
def test_exact_gradients_equal_direct(kind, method, gradient_, options):
    func = Field()
    got, stats = gradient(kind, method, gradient_, func, **SETTINGS[method], **options)
    reference, _ = gradient(kind, stats["method"], "direct", func, **SETTINGS[method])
    assert (got - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize("kind, gradient_", [("linear", "backsolve"),
                                             ("hermite_cubic", "interpolated")])
def test_continuous_adjoints_converge(kind, gradient_):
    func = Field()
    reference, _ = gradient(kind, "dopri5", "direct", func, rtol=1e-10, atol=1e-12)
    errors = []
    for tol in (1e-3, 1e-7):
        got, _ = gradient(kind, "dopri5", gradient_, func, rtol=tol, atol=tol * 1e-2)
        errors.append(float((got - reference).abs().max() / reference.abs().max()))
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 10


def test_direct_gradient_matches_finite_differences():
    func = Field()
    t, x = observations(batch=1, length=4)
    ts = torch.stack([t[0], t[-1]])
    z0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(4), dtype=DT)

    def final(data, z):
        X = paths.hermite_cubic(t, data)
        return odegrad.cdeint(func, X, z, ts, method="rk4", step_size=0.1)[-1].sum()

    assert torch.autograd.gradcheck(final, (x.clone().requires_grad_(),
                                            z0.clone().requires_grad_()))


def test_missing_data_gets_no_nan_gradient():
    func = Field()
    t, x = observations()
    x[1, 2, 0] = x[2, -2:, 1] = float("nan")
    data = x.clone().requires_grad_()
    for kind in ("linear", "natural_cubic"):
        X = paths.KINDS[kind](t, data)
        z = odegrad.cdeint(func, X, torch.zeros(4, 3, dtype=DT), t[[0, -1]], method="rk4",
                           gradient="discrete")
        (grad,) = torch.autograd.grad(z[-1].sum(), data)
        assert torch.isfinite(grad).all() and grad[torch.isnan(x)].abs().max() == 0


def test_series_padded_with_nan_stop_evolving():
    t, x = observations(batch=2)
    x[1, -2:] = float("nan")
    X = paths.linear(t, x)
    zs = odegrad.cdeint(Field(), X, torch.zeros(2, 3, dtype=DT), t, method="rk4")
    assert torch.equal(zs[-3, 1], zs[-1, 1]) and not torch.equal(zs[-3, 0], zs[-1, 0])


def test_linear_path_segments_report_their_statistics():
    t, data, z0, X = make_problem("linear")
    sol = odegrad.solve_cde(Field(), X, z0, t[[0, -1]], method="rk4", gradient="discrete")
    assert sol.stats["segments"] == len(t) - 1 and sol.stats["n_steps"] == len(t) - 1
    sol.ys[-1].sum().backward()
    assert sol.stats["nfe_backward"] > 0 and sol.stats["method"] == "rk4"


def test_bad_inputs_raise():
    t, data, z0, X = make_problem("hermite_cubic")
    with pytest.raises(InvalidInputError, match="odegrad.paths"):
        odegrad.cdeint(Field(), data, z0, t)
    with pytest.raises(InvalidInputError, match="hidden=3, channels=2"):
        odegrad.cdeint(lambda s, z: torch.zeros(4, 3, 5, dtype=DT), X, z0, t)
    with pytest.raises(UnsupportedCombinationError, match="event_fn"):
        odegrad.cdeint(Field(), X, z0, t, event_fn=lambda s, z: z.sum())
    with pytest.raises(InvalidInputError, match="strictly"):
        odegrad.cdeint(Field(), X, z0, t[[0, 0, 1]])
    with pytest.raises(InvalidInputError, match="dtype"):
        odegrad.cdeint(Field(), X, z0.float(), t)


def test_float32_evenly_spaced_knots_take_one_solve_of_the_gap():
    """A float32 linspace's gaps differ by ulps; it still counts as evenly spaced, so a cubic
    path is one solve with fixed steps of the gap that keeps only the requested outputs (the
    model passes step_size=None explicitly), equal to the solve with outputs at every knot."""
    from odegrad.cde import _uniform_spacing

    length = 128
    grid = torch.linspace(0, 1, length)
    assert _uniform_spacing(grid) == pytest.approx(1 / (length - 1), rel=1e-6)
    assert _uniform_spacing(torch.cat([grid[:5], grid[5:] + 1e-4])) is None
    g = torch.Generator().manual_seed(3)
    X = paths.hermite_cubic(grid, torch.randn(2, length, 2, generator=g).cumsum(1) / 10)
    func = Field().float()
    z0 = torch.randn(2, 3, generator=g)
    sol = odegrad.solve_cde(func, X, z0, grid[[0, -1]], method="rk4", step_size=None)
    every = odegrad.cdeint(func, X, z0, grid, method="rk4")
    assert sol.stats["n_steps"] == length - 1 and sol.ys.shape == (2, 2, 3)
    assert (sol.ys[-1] - every[-1]).abs().max() <= 1e-5 * every[-1].abs().max()


@pytest.mark.parametrize("kind", ["linear", "rectilinear"])
@pytest.mark.parametrize("options", [{}, {"step_size": 0.15}])
def test_direct_through_jump_t_equals_the_per_piece_solve(kind, options):
    """gradient="direct" with fixed steps solves a path with derivative jumps in one call of
    solve (the knots and outputs as jump_t); count_graph_bytes keeps the per-piece solve. The
    two take the same steps: equal values and gradients up to round-off."""
    results = []
    for count in (False, True):
        t, data, z0, X = make_problem(kind)
        func = Field(channels=X.channels)
        ts = torch.stack([t[0], 0.4 * t[2] + 0.6 * t[3], t[-1]])
        sol = odegrad.solve_cde(func, X, z0, ts, method="rk4", count_graph_bytes=count,
                                **options)
        assert ("segments" in sol.stats) == count
        grads = torch.autograd.grad(sol.ys.pow(2).sum(), [z0, data, *func.parameters()])
        results.append(torch.cat([sol.ys.reshape(-1), *(g.reshape(-1) for g in grads)]))
    assert (results[0] - results[1]).abs().max() <= 1e-13 * results[1].abs().max()
