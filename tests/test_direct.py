"""gradient="direct": gradcheck w.r.t. y0, parameters and t; tuple states; stats."""

import pytest
import torch

import odegrad

DT = torch.float64


def make_problem():
    a = (0.5 * torch.randn(3, 3, dtype=DT)).requires_grad_()
    y0 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=DT, requires_grad=True)
    return a, y0, t


def field_of(a):
    return lambda t, y: torch.tanh(y @ a.T) * (1 + 0.3 * torch.sin(2 * t))


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("rk4", {"step_size": 0.07}),
        ("euler", {"step_size": 0.07}),
        ("rk4", {}),
        ("dopri5", {"rtol": 1e-10, "atol": 1e-10}),
        ("tsit5", {"rtol": 1e-10, "atol": 1e-10}),
        ("bosh3", {"rtol": 1e-8, "atol": 1e-8}),
        ("dopri5", {"step_size": 0.07, "adaptive": False}),
    ],
)
def test_gradcheck(method, kwargs):
    a, y0, t = make_problem()

    def run(y0, t, a):
        return odegrad.odeint(field_of(a), y0, t, method=method, params=[a], **kwargs)

    assert torch.autograd.gradcheck(run, (y0, t, a))


def test_gradcheck_backward_in_time():
    a, y0, t = make_problem()
    t_reverse = t.detach().flip(0).requires_grad_()

    def run(y0, t, a):
        return odegrad.odeint(field_of(a), y0, t, method="rk4", step_size=0.07)

    assert torch.autograd.gradcheck(run, (y0, t_reverse, a))


def test_module_parameters_receive_gradients():
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    field = Field()
    ys = odegrad.odeint(field, torch.randn(4, 3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT))
    ys[-1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())


def test_tuple_state_forward_and_backward():
    omega = torch.tensor(1.3, dtype=DT, requires_grad=True)
    x0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    v0 = torch.tensor([[0.0, 0.2]], dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)

    def oscillator(t, state):
        x, v = state
        return v.reshape(x.shape), (-(omega**2) * x).reshape(v.shape)

    xs, vs = odegrad.odeint(oscillator, (x0, v0), t, rtol=1e-11, atol=1e-11)
    assert xs.shape == (5, 2) and vs.shape == (5, 1, 2)
    w = float(omega.detach())
    exact_x = (
        x0.detach() * torch.cos(w * t)[:, None] + v0.detach()[0] / w * torch.sin(w * t)[:, None]
    )
    assert (xs - exact_x).abs().max() < 1e-8
    (xs[-1].sum() + vs[-1].sum()).backward()
    # d x(T)/d x0 = cos(wT) for each component.
    assert torch.allclose(x0.grad, torch.cos(w * t[-1]) - w * torch.sin(w * t[-1]), atol=1e-7)
    assert omega.grad is not None

    def run(x0, v0, omega_):
        def field(t, state):
            x, v = state
            return v.reshape(x.shape), (-(omega_**2) * x).reshape(v.shape)

        return odegrad.odeint(field, (x0, v0), t, method="rk4", step_size=0.1)

    assert torch.autograd.gradcheck(run, (x0, v0, omega))


def test_stats_are_filled():
    sol = odegrad.solve(
        lambda t, y: -y, torch.ones(3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    )
    for key in (
        "nfe_forward",
        "nfe_backward",
        "n_steps",
        "n_accepted",
        "n_rejected",
        "checkpoint_bytes",
    ):
        assert key in sol.stats
    assert sol.stats["nfe_forward"] > 0 and sol.stats["n_accepted"] > 0


def test_graph_bytes_grow_with_steps():
    net = torch.nn.Linear(3, 3).double()
    y0 = torch.randn(8, 3, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    counts = [
        odegrad.solve(
            lambda t, y: net(y), y0, t, method="rk4", step_size=1.0 / n, count_graph_bytes=True
        ).stats["checkpoint_bytes"]
        for n in (10, 20)
    ]
    assert counts[1] > 1.8 * counts[0]


def test_single_time_returns_y0():
    y0 = torch.randn(3, dtype=DT)
    ys = odegrad.odeint(lambda t, y: -y, y0, torch.tensor([0.5], dtype=DT))
    assert ys.shape == (1, 3) and torch.equal(ys[0], y0)
