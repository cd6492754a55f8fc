"""Terminal events (ALGORITHMS.md §13): located on the dense output, differentiable through every
gradient method by the implicit function theorem; checked against closed forms and direct."""

import math

import pytest
import torch

import odegrad
from odegrad.errors import InvalidInputError, UnsupportedCombinationError

DT = torch.float64
G = 9.81
METHOD_OF = {"reversible": "reversible_dopri5"}


def bounce_times(h0, e, gradient, n=3):
    """A ball dropped from h0, restitution e: the times of its first n impacts, each a terminal
    event of a solve that starts at the previous one (its t0 is the previous event time)."""
    f = lambda t, s: torch.stack([s[1], torch.full_like(s[1], -G)])  # noqa: E731
    state = torch.stack([h0, torch.zeros((), dtype=DT)])
    t0 = torch.zeros((), dtype=DT)
    times = []
    for _ in range(n):
        sol = odegrad.solve(f, state, torch.stack([t0, t0 + 10]), gradient=gradient,
                            method=METHOD_OF.get(gradient, "dopri5"), rtol=1e-10, atol=1e-10,
                            event_fn=lambda t, s: s[0], event_direction=-1)
        t0 = sol.event_t
        times.append(t0)
        state = torch.stack([sol.event_y[0], -e * sol.event_y[1]])
    return torch.stack(times)


def exact_bounce_times(h0, e, n=3):
    v, t = math.sqrt(2 * G * h0), math.sqrt(2 * h0 / G)
    times = [t]
    for _ in range(n - 1):
        v *= e
        t += 2 * v / G
        times.append(t)
    return times


@pytest.mark.parametrize("gradient", odegrad.GRADIENTS)
def test_bouncing_ball_times_and_gradients_against_the_closed_form(gradient):
    h0 = torch.tensor(2.0, dtype=DT, requires_grad=True)
    e = torch.tensor(0.8, dtype=DT, requires_grad=True)
    times = bounce_times(h0, e, gradient)
    for got, want in zip(times.tolist(), exact_bounce_times(2.0, 0.8)):
        assert abs(got - want) < 1e-8
    d_h0, d_e = torch.autograd.grad(times[-1], [h0, e])
    # t3 = sqrt(2h/G) + 2 sqrt(2Gh)/G (e + e²)
    assert abs(float(d_h0) - (math.sqrt(2 / G) / (2 * math.sqrt(2.0))
                              + math.sqrt(2 * G) / (G * math.sqrt(2.0)) * (0.8 + 0.64))) < 1e-8
    assert abs(float(d_e) - 2 * math.sqrt(2 * G * 2.0) / G * (1 + 1.6)) < 1e-8
    # and against finite differences of the whole chain
    with torch.no_grad():
        eps = 1e-6
        fd = (bounce_times(h0 + eps, e, "direct")[-1] - bounce_times(h0 - eps, e, "direct")[-1])
    assert abs(float(fd) / (2 * eps) - float(d_h0)) < 1e-6


@pytest.mark.parametrize("gradient", odegrad.GRADIENTS)
@pytest.mark.parametrize("method", ["rk4", "dopri5", "tsit5"])
def test_event_time_of_a_decay_and_its_gradients(gradient, method):
    # y' = −k y, g = y − 1/2: t* = ln(2 y0)/k
    if gradient == "reversible":
        method = f"reversible_{method}"
    k = torch.tensor(1.3, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.7], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=DT)
    options = {"step_size": 0.01} if method.endswith("rk4") else {"rtol": 1e-10, "atol": 1e-12}
    sol = odegrad.solve(lambda t, y: -k * y, y0, t, method=method, gradient=gradient,
                        event_fn=lambda t, y: y - 0.5, params=[k], **options)
    t_star = math.log(2 * 1.7) / 1.3
    assert abs(float(sol.event_t) - t_star) < 1e-9
    assert float(sol.ts[-1]) == float(sol.event_t) and torch.equal(sol.ys[-1], sol.event_y)
    d_k, d_y0 = torch.autograd.grad(sol.event_t, [k, y0], retain_graph=True)
    tol = 1e-6 if gradient in ("backsolve", "interpolated") else 1e-8
    assert abs(float(d_k) + math.log(2 * 1.7) / 1.3**2) < tol
    assert abs(float(d_y0) - 1 / (1.3 * 1.7)) < tol
    # the event state is y(t*) = 1/2 whatever k and y0: its gradient vanishes
    d_k, d_y0 = torch.autograd.grad(sol.event_y.sum(), [k, y0])
    assert abs(float(d_k)) < tol and abs(float(d_y0)) < tol


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=DT))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) + torch.tensor([1.0, 0.0], dtype=DT) * (1 + t)


@pytest.mark.parametrize("gradient", ["discrete", "reversible"])
def test_exact_methods_give_directs_event_gradient(gradient):
    method = METHOD_OF.get(gradient, "dopri5")
    results = []
    for grad_method in ("direct", gradient):
        field = Field()
        y0 = torch.tensor([-0.3, 0.2], dtype=DT, requires_grad=True)
        t = torch.tensor([0.0, 3.0], dtype=DT, requires_grad=True)
        sol = odegrad.solve(field, y0, t, method=method, gradient=grad_method, rtol=1e-7,
                            atol=1e-9, event_fn=lambda t, y: y[0] - 0.4 * y[1] - 1.0)
        loss = sol.event_t * 2 + sol.event_y.pow(2).sum()
        results.append(torch.autograd.grad(loss, [y0, t, field.w]))
    for got, want in zip(results[1], results[0]):
        assert float((got - want).abs().max()) < 1e-10 * max(1.0, float(want.abs().max()))


def test_direction_and_no_event():
    t = torch.tensor([0.0, 4.0], dtype=DT)
    f = lambda t, y: torch.cos(t).reshape(1).expand_as(y)  # noqa: E731  y = sin t
    y0 = torch.zeros(1, dtype=DT)
    g = lambda t, y: y - 0.5  # noqa: E731
    rising = odegrad.solve(f, y0, t, event_fn=g, event_direction=1, rtol=1e-10, atol=1e-10)
    falling = odegrad.solve(f, y0, t, event_fn=g, event_direction=-1, rtol=1e-10, atol=1e-10)
    assert abs(float(rising.event_t) - math.pi / 6) < 1e-8
    assert abs(float(falling.event_t) - 5 * math.pi / 6) < 1e-8
    never = odegrad.solve(f, y0, t, event_fn=lambda t, y: y - 2.0)
    assert never.event_t is None and never.event_y is None
    assert abs(float(never.ys[-1]) - math.sin(4.0)) < 1e-6


def test_several_components_the_earliest_wins_and_tuple_states():
    t = torch.tensor([0.0, 10.0], dtype=DT)
    y0 = (torch.ones(1, dtype=DT), torch.zeros(1, dtype=DT))
    f = lambda t, y: (-y[0], torch.ones_like(y[1]))  # noqa: E731
    g = lambda t, y: torch.cat([y[0] - 0.2, y[1] - 0.7])  # noqa: E731  e^-t = 0.2 at 1.609
    sol = odegrad.solve(f, y0, t, event_fn=g, rtol=1e-10, atol=1e-10)
    assert abs(float(sol.event_t) - 0.7) < 1e-9
    assert isinstance(sol.event_y, tuple) and abs(float(sol.event_y[0]) - math.exp(-0.7)) < 1e-8
    event_t, ys = odegrad.odeint(f, y0, t, event_fn=g, rtol=1e-10, atol=1e-10)
    assert abs(float(event_t) - 0.7) < 1e-9 and ys[0].shape == (2, 1)


def test_event_errors():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y0 = torch.ones(1, dtype=DT)
    f = lambda t, y: -y  # noqa: E731
    with pytest.raises(InvalidInputError, match="t0, t_end"):
        odegrad.solve(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT), event_fn=lambda t, y: y)
    with pytest.raises(InvalidInputError, match="callable"):
        odegrad.solve(f, y0, t, event_fn=3)
    with pytest.raises(InvalidInputError, match="event_direction"):
        odegrad.solve(f, y0, t, event_fn=lambda t, y: y, event_direction=2)
    level = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with pytest.raises(UnsupportedCombinationError, match="event_fn depends"):
        odegrad.solve(f, y0, t, event_fn=lambda t, y: y - level)
    k = torch.tensor(1.0, dtype=DT, requires_grad=True)
    sol = odegrad.solve(lambda t, y: -k * y, y0, t, event_fn=lambda t, y: y - 0.5, params=[k])
    with pytest.raises(UnsupportedCombinationError, match="second-order"):
        torch.autograd.grad(sol.event_t, k, create_graph=True)


def test_an_event_that_rounds_to_t0_returns_y0():
    # float32: the crossing lies within t's resolution of t0, so the solve to it is empty
    t0 = torch.tensor(1.0, dtype=torch.float32)
    y0 = torch.tensor([1e-9], dtype=torch.float32, requires_grad=True)
    sol = odegrad.solve(lambda t, y: -torch.ones_like(y), y0, torch.stack([t0, t0 + 1]),
                        event_fn=lambda t, y: y, event_direction=-1, step_size=0.1)
    assert float(sol.event_t) == 1.0 and torch.equal(sol.event_y, y0.detach())
    sol.event_t.backward()
    assert float(y0.grad) == 1.0  # t* = t0 + y0 / 1
