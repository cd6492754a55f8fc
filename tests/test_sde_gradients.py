"""Gradients of SDE solves: discrete and reversible equal direct through the same scheme and
Brownian path (to 1e-10), direct agrees with central finite differences (it runs through the
JVP-based Milstein term and the Itô–Stratonovich conversion), the reversible schemes
reconstruct their states, and their memory does not grow with the number of steps."""

import pytest
import torch

import odegrad
from odegrad import BrownianInterval, solve_sde
from odegrad.sde_field import SDEField, StepGrid, fixed_grid
from odegrad.solvers.sde import make_sde_solver

DT = torch.float64


class Drift(torch.nn.Module):
    def __init__(self, d=3, width=8, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(width, d, generator=gen, dtype=DT))
        self.b = torch.nn.Parameter(0.3 * torch.randn(width, generator=gen, dtype=DT))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(d, width, generator=gen, dtype=DT))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T + t * self.b) @ self.w2.T - 0.2 * y


class Diffusion(torch.nn.Module):
    """g for each noise type: diagonal σ(y) (d), scalar (d, 1), general (d, m)."""

    def __init__(self, noise_type, d=3, m=2, seed=1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.noise_type, self.m = noise_type, m
        out = {"diagonal": d, "scalar": d, "general": d * m, "additive": d * m}[noise_type]
        if noise_type != "additive":
            self.w = torch.nn.Parameter(0.3 * torch.randn(out, d, generator=gen, dtype=DT))
        self.c = torch.nn.Parameter(0.2 + 0.1 * torch.rand(out, generator=gen, dtype=DT))

    def forward(self, t, y):
        if self.noise_type == "additive":
            return (self.c * torch.cos(t)).expand(*y.shape[:-1], -1).reshape(
                *y.shape, self.m)
        out = self.c * torch.sigmoid(y @ self.w.T)
        if self.noise_type == "diagonal":
            return out
        if self.noise_type == "scalar":
            return out[..., None]
        return out.reshape(*y.shape, self.m)


T = torch.tensor([0.0, 0.23, 0.5], dtype=DT)  # 0.23: an output inside a step


def gradients(method, gradient, noise_type="diagonal", sde_type="stratonovich", dt=0.05,
              seed=5, **options):
    f, g = Drift(), Diffusion(noise_type)
    y0 = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], dtype=DT, requires_grad=True)
    size = {"general": 2, "additive": 2}.get(noise_type)
    sol = solve_sde(f, g, y0, T, method=method, dt=dt, sde_type=sde_type, noise_type=noise_type,
                    gradient=gradient, seed=seed, brownian_size=size, **options)
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1].sin().sum()
    params = [y0, *f.parameters(), *g.parameters()]
    grads = torch.autograd.grad(loss, params)
    return sol, torch.cat([x.reshape(-1) for x in grads])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


NOISES = {  # the noise types each scheme accepts (one reversible and one plain of each kind)
    "euler": ["diagonal", "scalar", "general"],
    "milstein": ["diagonal", "scalar"],
    "heun": ["diagonal", "general"],
    "midpoint": ["scalar", "additive"],
    "reversible_heun": ["diagonal", "general"],
    "reversible_midpoint": ["diagonal", "scalar"],
}


@pytest.mark.parametrize("method, noise_type",
                         [(m, n) for m, ns in NOISES.items() for n in ns])
def test_discrete_equals_direct(method, noise_type):
    sde_type = "ito" if method == "euler" else "stratonovich"
    _, want = gradients(method, "direct", noise_type, sde_type)
    for checkpoints in ("all", "solution", 2):
        sol, got = gradients(method, "discrete", noise_type, sde_type, checkpoints=checkpoints)
        assert rel(got, want) < 1e-10, checkpoints
        assert sol.stats["nfe_backward"] > 0


@pytest.mark.parametrize("method", ["reversible_heun", "reversible_midpoint",
                                    "reversible_rk_heun", "reversible_euler_heun"])
@pytest.mark.parametrize("noise_type", ["diagonal", "general"])
def test_reversible_equals_direct(method, noise_type):
    _, want = gradients(method, "direct", noise_type)
    sol, got = gradients(method, "reversible", noise_type)
    assert rel(got, want) < 1e-10
    assert sol.stats["drift"] < 1e-12


def test_reversible_with_an_ito_problem_converted():
    """An Itô problem through a Stratonovich reversible scheme: the converted drift (JVPs of
    g) is differentiated exactly too."""
    _, want = gradients("reversible_heun", "direct", sde_type="ito")
    _, got = gradients("reversible_heun", "reversible", sde_type="ito")
    assert rel(got, want) < 1e-10


class OwnComponentDiffusion(torch.nn.Module):
    """Diagonal g with g_i a function of y_i alone (what derivative-free Milstein needs)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.4, 1.1], dtype=DT))
        self.c = torch.nn.Parameter(torch.tensor([0.3, 0.2, 0.25], dtype=DT))

    def forward(self, t, y):
        return self.c * torch.sigmoid(self.w * y)


@pytest.mark.parametrize("method, sde_type, options", [
    ("milstein", "ito", {}),
    ("milstein", "stratonovich", {"derivative_free": True}),
    ("heun", "ito", {}),  # Stratonovich scheme, Itô problem: the drift converted
])
def test_direct_agrees_with_finite_differences(method, sde_type, options):
    """Central differences at ε = 1e-6 on one entry of each parameter of f and g, with the
    same Brownian path (a fixed bm)."""
    f = Drift()
    g = OwnComponentDiffusion() if options else Diffusion("diagonal")
    y0 = torch.tensor([[0.3, -0.2, 0.5]], dtype=DT)
    bm = BrownianInterval(0.0, 0.5, (1, 3), dtype=DT, seed=2)
    params = [*f.parameters(), *g.parameters()]

    def loss():
        ys = odegrad.sdeint(f, g, y0, T, bm, method=method, dt=0.05, sde_type=sde_type,
                            **options)
        return ys[1:].pow(2).sum()

    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, grads):
            entry = (0,) * p.dim()
            p[entry] += eps
            up = loss()
            p[entry] -= 2 * eps
            down = loss()
            p[entry] += eps
            fd = (up - down) / (2 * eps)
            assert abs(float(fd - grad[entry])) < 1e-7 * max(1.0, abs(float(fd)))


def test_derivative_free_milstein_refuses_a_coupled_diagonal_g():
    with pytest.raises(odegrad.UnsupportedCombinationError, match="derivative_free=False"):
        odegrad.sdeint(Drift(), Diffusion("diagonal"), torch.ones(1, 3, dtype=DT), T,
                       method="milstein", dt=0.05, derivative_free=True, seed=0)


@pytest.mark.parametrize("method", ["reversible_heun", "reversible_midpoint"])
def test_reconstruction_over_1000_steps(method):
    """inverse_step undoes step to 1e-10 relative over 1000 steps of a small neural SDE."""
    f, g = Drift(), Diffusion("diagonal")
    y0 = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], dtype=DT)
    n, dt = 1000, 1e-3
    bm = BrownianInterval(0.0, n * dt, (2, 3), dtype=DT, seed=4)
    times = [0.0, n * dt]
    field = SDEField(f, g, "diagonal", bm, y0, {}, grid=StepGrid(fixed_grid(times, dt)))
    solver = make_sde_solver(method)
    with torch.no_grad():
        state = solver.initial_state(y0)
        carry = solver.init(field, torch.tensor(0.0, dtype=DT), state)
        for k in range(n):
            step = solver.step(field, torch.tensor(k * dt, dtype=DT), dt, state, carry)
            state, carry = step.y, step.carry
        for k in reversed(range(n)):
            state = solver.inverse_step(field, torch.tensor(k * dt, dtype=DT), dt, state)
    start = solver.initial_state(y0)
    assert float((state - start).abs().max() / start.abs().max()) < 1e-10


def reversible_checkpoint_bytes(steps):
    f, g = Drift(), Diffusion("diagonal")
    y0 = torch.tensor([[0.3, -0.2, 0.5]], dtype=DT, requires_grad=True)
    sizes = []
    for n in steps:
        t = torch.tensor([0.0, 1.0], dtype=DT)
        sol = solve_sde(f, g, y0, t, method="reversible_heun", dt=1.0 / n, gradient="reversible",
                        seed=0)
        assert sol.stats["n_steps"] == n
        sizes.append(sol.stats["checkpoint_bytes"])
    return sizes, 2 * y0.numel() * 8


def test_reversible_memory_does_not_grow_with_the_steps():
    sizes, state = reversible_checkpoint_bytes((100, 1000))
    assert sizes == [state, state]


@pytest.mark.slow
def test_reversible_memory_100_and_10000_steps():
    sizes, state = reversible_checkpoint_bytes((100, 10000))
    assert sizes == [state, state]


def test_counts():
    """Reversible Heun: one f and one g evaluation per step (plus the first)."""
    sol, _ = gradients("reversible_heun", "direct")
    n = sol.stats["n_steps"]
    assert sol.stats["nfe_forward"] == n + 1  # direct does not probe f
    assert sol.stats["nge_forward"] == n + 1


@pytest.mark.parametrize("method", ["reversible_heun",
                                    pytest.param("reversible_midpoint", marks=pytest.mark.slow)])
def test_reversible_over_1000_steps(method):
    """The backward pass's own reconstruction (`reverse`) over 1000 steps: the initial state
    is recovered to 1e-10 and the gradient equals direct to 1e-10."""
    _, want = gradients(method, "direct", dt=5e-4)
    sol, got = gradients(method, "reversible", dt=5e-4)
    assert sol.stats["n_steps"] == 1000
    assert sol.stats["drift"] < 1e-10
    assert rel(got, want) < 1e-10


def test_reversible_heun_backward_takes_one_vjp_per_step(monkeypatch):
    """Reversible Heun's backward pass: one autograd call per step through f and g (the
    update's own VJP is closed form), plus one at t0; one f and one g evaluation per step."""
    from odegrad.solvers.reversible import LocalAdjoint

    calls = []
    vjp = LocalAdjoint.vjp
    monkeypatch.setattr(LocalAdjoint, "vjp", lambda self, *a, **k: calls.append(1)
                        or vjp(self, *a, **k))
    sol, _ = gradients("reversible_heun", "reversible")
    n = sol.stats["n_steps"]
    assert len(calls) == n + 1
    assert sol.stats["nfe_backward"] == n + 1 and sol.stats["nge_backward"] == n + 1
