"""Adaptive step control options (min_step, max_step, safety, ifactor, dfactor) and the times
where steps must end (step_t, jump_t): each changes the step sequence as documented, bad values
raise, and every gradient method replays the steps (exact ones equal direct to 1e-10)."""

import math

import pytest
import torch

import odegrad
from odegrad.errors import InvalidInputError, UnsupportedCombinationError

DT = torch.float64
T = torch.tensor([0.0, 0.7, 1.9, 3.0], dtype=DT)


class Field(torch.nn.Module):
    """f(t, y) = W2 tanh(W1 y + b sin 3t) − 0.4 y: smooth, t-dependent."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w1 = torch.nn.Parameter(0.8 * torch.randn(4, 2, generator=g, dtype=DT))
        self.b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=DT))
        self.w2 = torch.nn.Parameter(0.8 * torch.randn(2, 4, generator=g, dtype=DT))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T + torch.sin(3 * t) * self.b) @ self.w2.T - 0.4 * y


Y0 = torch.tensor([[0.5, -0.4], [0.1, 0.8]], dtype=DT)


def steps_of(**options):
    """(accepted (t_n, h_n), attempted h, rejected h, stats) of a dopri5 solve of Field."""
    accepted, attempted, rejected = [], [], []
    sol = odegrad.solve(
        Field(), Y0, T, rtol=1e-7, atol=1e-7,
        on_accept=lambda t, y, h: accepted.append((float(t), float(h))),
        on_attempt=lambda t, y, h: attempted.append(float(h)),
        on_reject=lambda t, y, h: rejected.append(float(h)),
        **options,
    )
    return accepted, attempted, rejected, sol


def test_max_step_bounds_every_attempt():
    free, _, _, sol_free = steps_of()
    bounded, attempted, _, sol = steps_of(max_step=0.05)
    assert max(abs(h) for _, h in free) > 0.05  # the bound binds
    assert max(abs(h) for h in attempted) <= 0.05
    assert sol.stats["n_accepted"] >= math.ceil(3.0 / 0.05)
    assert sol.stats["n_accepted"] > sol_free.stats["n_accepted"]
    assert torch.allclose(sol.ys, sol_free.ys, atol=1e-5)


def test_min_step_forces_acceptance():
    # A first step far too large, then min_step: it is accepted whatever its error.
    _, _, rejected, _ = steps_of(step_size=1.0)
    assert rejected  # without min_step the large step is rejected
    accepted, attempted, rejected, sol = steps_of(step_size=1.0, min_step=1.0)
    assert not rejected and sol.stats["n_rejected"] == 0
    assert accepted[0][1] == 1.0
    # a step longer than min_step is still rejected, and retried at min_step
    _, attempted, rejected, _ = steps_of(step_size=2.0, min_step=1.0)
    assert rejected == [2.0] and attempted[:2] == [2.0, 1.0]
    accepted, attempted, rejected, sol = steps_of(step_size=1.0, min_step=1.0)
    # every attempt is at least min_step long, but for the ones clipped to land on t[-1]
    assert all(abs(h) >= 1.0 for _, h in accepted[:-1])
    assert sol.stats["n_accepted"] <= 3
    exact = odegrad.solve(Field(), Y0, T, rtol=1e-10, atol=1e-10).ys
    assert (sol.ys - exact).abs().max() > 1e-5  # accepted steps with an error above tolerance
    # the last step, clipped to land on t[-1], rounds to just above min_step: still accepted
    sol = odegrad.solve(Field(), Y0, T, rtol=1e-10, atol=1e-10, step_size=1e-3, min_step=0.3,
                        max_steps=20)
    assert sol.stats["n_rejected"] == 0 and sol.stats["n_accepted"] == 10


def test_safety_ifactor_dfactor_change_the_steps_as_documented():
    _, _, _, base = steps_of()
    _, _, _, careful = steps_of(safety=0.5)
    assert careful.stats["n_accepted"] > base.stats["n_accepted"]

    # ifactor: each accepted step at most ifactor times the one before (from a tiny first step)
    slow, _, _, slow_sol = steps_of(step_size=1e-6, ifactor=1.5)
    _, _, _, fast_sol = steps_of(step_size=1e-6)
    hs = [abs(h) for _, h in slow]
    assert all(b <= 1.5 * a * (1 + 1e-12) for a, b in zip(hs[:-2], hs[1:-1]))
    assert slow_sol.stats["n_accepted"] > fast_sol.stats["n_accepted"]

    # dfactor: a rejected step shrinks by at most dfactor, so from a huge first step a larger
    # dfactor needs more rejections
    _, attempted, rejected, gentle = steps_of(step_size=50.0, dfactor=0.7)
    _, _, _, steep = steps_of(step_size=50.0)
    for h_rejected in rejected:
        retry = attempted[attempted.index(h_rejected) + 1]
        assert abs(retry) >= 0.7 * abs(h_rejected) * (1 - 1e-12)
    assert gentle.stats["n_rejected"] > steep.stats["n_rejected"]


@pytest.mark.parametrize("options, message", [
    ({"min_step": -1.0}, "min_step"),
    ({"max_step": 0.0}, "max_step"),
    ({"min_step": 2.0, "max_step": 1.0}, "exceeds max_step"),
    ({"safety": 0.0}, "safety"),
    ({"safety": 1.5}, "safety"),
    ({"ifactor": 1.0}, "ifactor"),
    ({"dfactor": 1.0}, "dfactor"),
    ({"dfactor": "x"}, "dfactor"),
    ({"step_t": torch.tensor([0.5], dtype=DT, requires_grad=True)}, "step_t"),
    ({"jump_t": [0.5, 0.5]}, "jump_t"),
    ({"step_t": [0.5], "jump_t": [0.5]}, "share values"),
    ({"step_t": [float("nan")]}, "step_t"),
])
def test_bad_values_raise(options, message):
    with pytest.raises(InvalidInputError, match=message):
        odegrad.solve(Field(), Y0, T, **options)


def test_controller_options_refused_for_fixed_steps():
    with pytest.raises(UnsupportedCombinationError, match="max_step"):
        odegrad.solve(Field(), Y0, T, method="rk4", step_size=0.1, max_step=0.05)
    with pytest.raises(UnsupportedCombinationError, match="adaptive=False"):
        odegrad.solve(Field(), Y0, T, step_size=0.1, adaptive=False, safety=0.5)
    odegrad.solve(Field(), Y0, T, method="rk4", step_size=0.1, max_step=math.inf)  # default
    with pytest.raises(UnsupportedCombinationError, match="event_fn"):
        odegrad.solve(Field(), Y0, T[[0, -1]], step_t=[0.5], event_fn=lambda t, y: y[0, 0])


def test_step_t_steps_land_on_each_time():
    marks = [0.33, 1.234, 2.5]
    accepted, _, _, sol = steps_of(step_t=torch.tensor(marks + [7.0], dtype=DT))  # 7: outside
    free, _, _, sol_free = steps_of()
    ends = [t + h for t, h in accepted]
    for mark in marks:
        assert min(abs(e - mark) for e in ends) < 1e-14
        assert not any(t < mark - 1e-14 and t + h > mark + 1e-14 for t, h in accepted)
    assert any(t < mark < t + h for t, h in free for mark in marks)  # they do change the steps
    assert sol.ys.shape == sol_free.ys.shape
    assert torch.allclose(sol.ys, sol_free.ys, atol=1e-5)


def test_step_t_with_fixed_steps_restarts_the_grid():
    """rk4 with step 0.3 and step_t at 1.0: the same as two solves [0, 1] and [1, 3]."""
    f = Field()
    sol = odegrad.solve(f, Y0, T, method="rk4", step_size=0.3, step_t=[1.0])
    with torch.no_grad():
        first = odegrad.solve(f, Y0, torch.tensor([0.0, 0.7, 1.0], dtype=DT), method="rk4",
                              step_size=0.3).ys
        second = odegrad.solve(f, first[-1], torch.tensor([1.0, 1.9, 3.0], dtype=DT),
                               method="rk4", step_size=0.3).ys
    assert torch.allclose(sol.ys, torch.cat([first[:2], second[1:]]), atol=1e-14, rtol=0)
    assert sol.stats["n_accepted"] == 4 + 7


class Switched(torch.nn.Module):
    """y' = −k(t) y, k = k1 before TAU and k2 after: y(t) = y0 exp(−k1 TAU − k2 (t − TAU))."""

    TAU = 1.3

    def __init__(self):
        super().__init__()
        self.k1 = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))
        self.k2 = torch.nn.Parameter(torch.tensor(2.0, dtype=DT))
        self.times: list[float] = []

    def forward(self, t, y):
        self.times.append(float(t))
        return -torch.where(t < self.TAU, self.k1, self.k2) * y


def test_jump_t_keeps_the_discontinuity_out_of_every_step():
    f = Switched()
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    accepted, rejected = [], []
    sol = odegrad.solve(f, y0, t, rtol=1e-9, atol=1e-12, jump_t=[f.TAU],
                        on_accept=lambda t, y, h: accepted.append((float(t), float(h))),
                        on_reject=lambda t, y, h: rejected.append(float(h)))
    exact = y0 * math.exp(-0.7 * f.TAU - 2.0 * (2.0 - f.TAU))
    assert (sol.ys[-1] - exact).abs().max() < 1e-8
    assert f.TAU not in f.times  # evaluated one ulp inside, on either side
    assert math.nextafter(f.TAU, 0) in f.times and math.nextafter(f.TAU, 2) in f.times
    assert not any(t < f.TAU < t + h for t, h in accepted)
    with_jump = sol.stats["n_steps"]
    without = odegrad.solve(Switched(), y0, t, rtol=1e-9, atol=1e-12).stats
    assert without["n_rejected"] > len(rejected)  # the jump inside steps costs rejections
    assert without["n_steps"] > with_jump


# Every gradient method through the options: exact ones replay the recorded steps.
METHOD_FOR = {"reversible": "reversible_dopri5"}
OPTIONS = {
    "controller": {"max_step": 0.4, "safety": 0.8, "ifactor": 3.0, "dfactor": 0.3},
    "min_step": {"min_step": 0.2},
    "step_t": {"step_t": [0.5, 1.9, 2.2]},
    "jump_t": {"jump_t": [1.1, 2.6], "step_t": [0.5]},
}


def gradient_of(gradient, options, time=False, checkpoints=None, method=None):
    f = Field()
    y0 = Y0.clone().requires_grad_()
    t = T.clone().requires_grad_(time)
    extra = {} if checkpoints is None else {"checkpoints": checkpoints}
    method = method or METHOD_FOR.get(gradient, "dopri5")
    sol = odegrad.solve(f, y0, t, method=method, rtol=1e-6,
                        atol=1e-6, step_size=0.9, gradient=gradient, **extra, **options)
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    inputs = [y0, *f.parameters()] + ([t] if time else [])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs)]), sol


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("gradient, checkpoints", [
    ("discrete", "all"), ("discrete", 2), ("reversible", None)])
def test_exact_gradients_equal_direct(name, gradient, checkpoints):
    time = gradient == "discrete"  # and the gradient w.r.t. the output times
    got, sol = gradient_of(gradient, OPTIONS[name], time=time, checkpoints=checkpoints)
    want, _ = gradient_of("direct", OPTIONS[name], time=time, method=sol.stats["method"])
    assert rel(got, want) < 1e-10


@pytest.mark.parametrize("name", ["controller", "jump_t"])
@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_continuous_adjoints_agree_to_tolerance(name, gradient):
    got, _ = gradient_of(gradient, OPTIONS[name])
    want, _ = gradient_of("direct", OPTIONS[name])
    assert rel(got, want) < 1e-3


def test_jump_t_gradient_against_the_closed_form():
    f = Switched()
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    for gradient in ("direct", "discrete", "backsolve"):
        sol = odegrad.solve(f, y0, t, rtol=1e-10, atol=1e-12, jump_t=[f.TAU], gradient=gradient)
        g = torch.autograd.grad(sol.ys[-1].sum(), [y0, f.k1, f.k2])
        decay = math.exp(-0.7 * f.TAU - 2.0 * 0.7)
        assert abs(float(g[0][0]) - decay) < 1e-8
        assert abs(float(g[1]) - (-f.TAU * 3 * decay)) < 1e-7
        assert abs(float(g[2]) - (-0.7 * 3 * decay)) < 1e-7


# grid_constructor: one fixed step per grid interval, outputs inside read by dense output.
def uneven_grid(f, y0, t):
    """[0, 0.2, 0.5, 1] scaled onto [t[0], t[-1]]: uneven, and 0.35 (an output) is not on it."""
    return t[0] + (t[-1] - t[0]) * torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=t.dtype)


def test_grid_constructor_steps_on_the_grid():
    # The issue's case: euler on y' = y over [0, 1], ten steps of the grid: 1.1**10 = 2.594
    # (the grid ignored, one step: 2.000).
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ten = odegrad.odeint(lambda t, y: y, torch.ones(1, dtype=DT), t, method="euler",
                         grid_constructor=lambda f, y0, t: torch.linspace(0, 1, 11, dtype=DT))
    assert abs(float(ten[-1]) - 1.1**10) < 1e-12
    # An uneven grid with an output inside an interval: the scheme's closed form on the grid,
    # the output at 0.35 read by euler's (linear) dense output, not a step end.
    t = torch.tensor([0.0, 0.35, 1.0], dtype=DT)
    seen = []
    ys = odegrad.odeint(lambda t, y: y, torch.ones(1, dtype=DT), t, method="euler",
                        grid_constructor=uneven_grid,
                        on_accept=lambda t, y, h: seen.append((float(t), float(h))))
    assert [round(a, 12) for a, _ in seen] == [0.0, 0.2, 0.5]
    assert abs(float(ys[1]) - 1.2 * 1.15) < 1e-12
    assert abs(float(ys[2]) - 1.2 * 1.3 * 1.5) < 1e-12
    # rk4 on y' = y: the product of the scheme's growth factors on the grid intervals
    ys = odegrad.odeint(lambda t, y: y, torch.ones(1, dtype=DT), t, method="rk4",
                        grid_constructor=uneven_grid)
    growth = [1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24 for h in (0.2, 0.3, 0.5)]
    assert abs(float(ys[2]) - math.prod(growth)) < 1e-12
    # decreasing t: the grid runs from t[0] down to t[-1]
    back = odegrad.odeint(lambda t, y: y, torch.ones(1, dtype=DT), t.flip(0), method="euler",
                          grid_constructor=uneven_grid)
    assert abs(float(back[-1]) - 0.8 * 0.7 * 0.5) < 1e-12


COARSE = torch.tensor([0.0, 0.3, 0.7, 1.2, 1.9, 2.05, 2.6, 3.0], dtype=DT)
_S = torch.linspace(0, 1, 61, dtype=DT)
FINE = 3.0 * (_S + 0.05 * torch.sin(math.pi * _S))  # uneven; 0.7 and 1.9 inside intervals


def grid_gradient(gradient, time=False, checkpoints=None, points=COARSE, method=None):
    f = Field()
    y0 = Y0.clone().requires_grad_()
    t = T.clone().requires_grad_(time)
    method = method or ("reversible_heun" if gradient == "reversible" else "rk4")
    extra = {} if checkpoints is None else {"checkpoints": checkpoints}
    sol = odegrad.solve(f, y0, t, method=method, gradient=gradient, adaptive=False,
                        grid_constructor=lambda f, y0, t: points, **extra)
    assert sol.stats["n_accepted"] == len(points) - 1
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    inputs = [y0, *f.parameters()] + ([t] if time else [])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs)]), sol


@pytest.mark.parametrize("gradient, checkpoints", [
    ("discrete", "all"), ("discrete", 2), ("reversible", None)])
def test_grid_constructor_exact_gradients_equal_direct(gradient, checkpoints):
    time = gradient == "discrete"  # and the gradient w.r.t. the output times
    got, sol = grid_gradient(gradient, time=time, checkpoints=checkpoints)
    want, direct = grid_gradient("direct", time=time, method=sol.stats["method"])
    assert rel(sol.ys.detach(), direct.ys.detach()) < 1e-13  # the same steps
    assert rel(got, want) < 1e-10


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_grid_constructor_continuous_adjoints_agree_to_tolerance(gradient):
    # on a fine grid (the backward solve steps by its longest interval): the discrete
    # gradient and the continuous adjoint's agree to the discretisation error
    got, _ = grid_gradient(gradient, points=FINE)
    want, _ = grid_gradient("direct", points=FINE)
    assert rel(got, want) < 1e-4


def test_grid_constructor_bad_grids_raise():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y0 = torch.ones(1, dtype=DT)

    def run(grid, **options):
        options.setdefault("method", "euler")
        return odegrad.odeint(lambda t, y: y, y0, t, grid_constructor=grid, **options)

    cases = [
        (lambda f, y0, t: torch.tensor([0.0, 0.6, 0.4, 1.0], dtype=DT), "strictly increasing"),
        (lambda f, y0, t: torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=DT), "strictly increasing"),
        (lambda f, y0, t: torch.tensor([0.1, 0.5, 1.0], dtype=DT), "must start at t"),
        (lambda f, y0, t: torch.tensor([0.0, 0.5, 0.9], dtype=DT), "end at t"),
        (lambda f, y0, t: torch.tensor([0.0, 0.5, 1.0]), "dtype"),
        (lambda f, y0, t: [0.0, 0.5, 1.0], "1-D tensor"),
        (lambda f, y0, t: torch.tensor([0.0, math.nan, 1.0], dtype=DT), "non-finite"),
    ]
    for grid, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            run(grid)
    def good(f, y0, t):
        return torch.linspace(0, 1, 5, dtype=DT)

    with pytest.raises(InvalidInputError, match="must be a callable"):
        run([0.0, 1.0])
    with pytest.raises(UnsupportedCombinationError, match="adaptive steps"):
        run(good, method="dopri5")
    with pytest.raises(InvalidInputError, match="mutually exclusive"):
        run(good, step_size=0.1)
    with pytest.raises(UnsupportedCombinationError, match="jump_t"):
        run(good, jump_t=[0.5])
    with pytest.raises(odegrad.MaxStepsExceededError, match="max_steps=3"):
        run(good, max_steps=3)
    # an adaptive scheme told to take fixed steps takes the grid
    ys = run(good, method="dopri5", adaptive=False)
    assert torch.isfinite(ys).all()


def test_perturb_is_the_adams_option_and_refused_by_one_step_methods():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y0 = torch.ones(1, dtype=DT)
    with pytest.raises(UnsupportedCombinationError, match="perturb.*jump_t"):
        odegrad.odeint(lambda t, y: y, y0, t, method="rk4", step_size=0.1, perturb=True)
    ys = odegrad.odeint(lambda t, y: y, y0, t, method="adams_bashforth", step_size=0.1,
                        perturb=True)
    assert abs(float(ys[-1]) - math.e) < 1e-3


def test_float32_step_across_a_jump_does_not_underflow():
    """torchdiffeq's TestDiscontinuities case without jump_t (adaptive_heun, float32, forward
    and adjoint): crossing the jump in f takes steps of a few float32 ulps of t; odegrad used
    to refuse any proposal below 4 eps |t| as an underflow (issue 13)."""
    import odegrad.compat.torchdiffeq as torchdiffeq

    def f(t, x):
        return -0.5 * x if t < 0.5 else x**2

    exact_half = torch.exp(torch.tensor(-0.25, dtype=DT)) * torch.tensor([1.0, 2.0], dtype=DT)
    exact = exact_half / (1 - 0.5 * exact_half)  # x' = x² from t = 0.5 to 1
    for adjoint in (False, True):
        x0 = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True)
        t = torch.tensor([0.0, 1.0])
        if adjoint:
            xs = torchdiffeq.odeint_adjoint(f, x0, t, atol=1e-7, method="adaptive_heun",
                                            adjoint_params=())
        else:
            xs = torchdiffeq.odeint(f, x0, t, atol=1e-7, method="adaptive_heun")
        (grad,) = torch.autograd.grad(xs[-1].sum(), x0)
        assert (xs[-1].double() - exact).abs().max() < 1e-3 * exact.abs().max()
        want = exact**2 / exact_half**2 * math.exp(-0.25)  # d x(1) / d x0, component-wise
        assert (grad.double() - want).abs().max() < 1e-2 * want.abs().max()


def test_checkpoint_bytes_add_up_over_jump_pieces():
    """With jump_t the solve runs in pieces whose checkpoints all live until the backward pass:
    checkpoint_bytes is their sum (it was the last piece's alone), here the two separate
    solves' (fixed steps restart at the jump, so the pieces are exactly those solves)."""
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return -w * y

    y0 = torch.ones(3, dtype=torch.float64)
    options = dict(method="rk4", step_size=0.1, gradient="discrete", params=[w])
    whole = odegrad.solve(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                          jump_t=[0.45], **options)
    first = odegrad.solve(f, y0, torch.tensor([0.0, 0.45], dtype=torch.float64), **options)
    second = odegrad.solve(f, first.ys[-1].detach(),
                           torch.tensor([0.45, 1.0], dtype=torch.float64), **options)
    expected = first.stats["checkpoint_bytes"] + second.stats["checkpoint_bytes"]
    assert whole.stats["n_jump_pieces"] == 2
    assert whole.stats["checkpoint_bytes"] == expected > second.stats["checkpoint_bytes"]
