"""Step callbacks of the native API: on_attempt=, on_accept=, on_reject= (t, y, h)."""

from __future__ import annotations

import pytest
import torch

import odegrad

DT = torch.float64


def oscillator(t, y):
    return torch.stack([y[..., 1], -(1.0 + t) * y[..., 0]], dim=-1)


class Recorder:
    """The three callbacks, each recording its (t, y, h) calls."""

    def __init__(self):
        self.calls = {"on_attempt": [], "on_accept": [], "on_reject": []}

    def options(self) -> dict:
        return {name: (lambda t, y, h, name=name: self.calls[name].append((t, y, h)))
                for name in self.calls}

    def counts(self) -> tuple[int, int, int]:
        return tuple(len(self.calls[name]) for name in ("on_attempt", "on_accept", "on_reject"))


def adaptive_solve(recorder: Recorder, **kwargs):
    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    t = torch.linspace(0.0, 5.0, 4, dtype=DT)
    settings = dict(method="dopri5", rtol=1e-9, atol=1e-12, step_size=2.0)  # rejects the first
    settings.update(kwargs)
    return odegrad.solve(oscillator, y0, t, **settings, **recorder.options()), y0, t


def test_counts_match_the_stats_of_an_adaptive_solve_with_rejections():
    recorder = Recorder()
    sol, _, _ = adaptive_solve(recorder)
    stats = sol.stats
    assert stats["n_rejected"] > 0
    assert recorder.counts() == (stats["n_steps"], stats["n_accepted"], stats["n_rejected"])


def test_times_and_steps_chain_over_the_interval():
    recorder = Recorder()
    _, y0, t = adaptive_solve(recorder)
    accepted = recorder.calls["on_accept"]
    for t_n, _, h in accepted:
        assert t_n.shape == () and h.shape == () and t_n.dtype == DT and h.dtype == DT
        assert not t_n.requires_grad and not h.requires_grad
    assert float(accepted[0][0]) == float(t[0])
    assert sum(float(h) for _, _, h in accepted) == pytest.approx(float(t[-1] - t[0]), abs=1e-12)
    for (t_n, _, h), (t_next, _, _) in zip(accepted, accepted[1:]):
        assert float(t_n + h) == pytest.approx(float(t_next), abs=1e-12)
    # Each attempt starts where the last accepted step ended; a rejection repeats its attempt.
    starts = {float(t_n) for t_n, _, _ in accepted}
    assert all(float(t_n) in starts for t_n, _, _ in recorder.calls["on_reject"])
    assert [float(t_n) for t_n, _, _ in recorder.calls["on_attempt"]][0] == float(t[0])
    # the first attempt (h = 2) was rejected, with the state at t0
    t_r, y_r, h_r = recorder.calls["on_reject"][0]
    assert float(t_r) == 0.0 and float(h_r) == 2.0
    torch.testing.assert_close(y_r, y0, rtol=0, atol=0)


def test_accepted_states_are_the_solution_at_the_step_ends():
    recorder = Recorder()
    adaptive_solve(recorder)
    accepted = recorder.calls["on_accept"]
    ends = torch.stack([t_n + h for t_n, _, h in accepted])
    times = torch.cat([torch.zeros(1, dtype=DT), ends])
    times[-1] = 5.0
    reference = odegrad.odeint(oscillator, torch.tensor([1.0, 0.5], dtype=DT), times,
                               method="dopri5", rtol=1e-9, atol=1e-12, step_size=2.0)
    got = torch.stack([y for _, y, _ in accepted])
    torch.testing.assert_close(got, reference[1:], rtol=1e-9, atol=1e-11)
    # and the rejected attempts saw the state at their start
    by_start = {float(t_n + h): y for t_n, y, h in accepted}
    for t_n, y, _ in recorder.calls["on_reject"]:
        if float(t_n) in by_start:
            torch.testing.assert_close(y, by_start[float(t_n)], rtol=0, atol=0)


def test_fixed_steps_backwards_in_time():
    recorder = Recorder()
    t = torch.tensor([1.0, 0.4, 0.0], dtype=DT)
    sol = odegrad.solve(oscillator, torch.ones(2, dtype=DT), t, method="rk4", step_size=0.3,
                        **recorder.options())
    n = sol.stats["n_accepted"]
    assert recorder.counts() == (n, n, 0) and n == 4
    hs = [float(h) for _, _, h in recorder.calls["on_accept"]]
    assert all(h < 0 for h in hs)
    assert sum(hs) == pytest.approx(-1.0, abs=1e-14)
    torch.testing.assert_close(recorder.calls["on_accept"][-1][1], sol.ys[-1], rtol=0, atol=0)


def test_callbacks_cannot_change_the_solve():
    def vandal(t, y, h):
        y.mul_(2.0)
        t.add_(1.0)
        h.mul_(0.0)
        return "ignored"

    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    for method, extra in (("dopri5", {}), ("rk4", {"step_size": 0.1})):
        plain = odegrad.odeint(oscillator, y0, t, method=method, **extra)
        touched = odegrad.odeint(oscillator, y0, t, method=method, on_attempt=vandal,
                                 on_accept=vandal, on_reject=vandal, **extra)
        torch.testing.assert_close(touched, plain, rtol=0, atol=0)


def test_exceptions_propagate():
    def boom(t, y, h):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        odegrad.odeint(oscillator, torch.ones(2, dtype=DT), torch.linspace(0, 1, 3, dtype=DT),
                       on_accept=boom)


@pytest.mark.parametrize("name", ["on_attempt", "on_accept", "on_reject"])
def test_non_callable_raises(name):
    with pytest.raises(odegrad.InvalidInputError, match=name):
        odegrad.odeint(oscillator, torch.ones(2, dtype=DT), torch.linspace(0, 1, 3, dtype=DT),
                       **{name: "print"})


def test_tuple_states_get_tuples():
    recorder = Recorder()

    def f(t, state):
        x, v = state
        return v, -x

    x0, v0 = torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT)
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)
    sol = odegrad.solve(f, (x0, v0), t, **recorder.options())
    for name, calls in recorder.calls.items():
        for _, y, _ in calls:
            assert isinstance(y, tuple) and len(y) == 2, name
            assert y[0].shape == (3,) and y[1].shape == (3,)
    last = recorder.calls["on_accept"][-1][1]
    torch.testing.assert_close(last[0], sol.ys[0][-1], rtol=0, atol=0)
    torch.testing.assert_close(last[1], sol.ys[1][-1], rtol=0, atol=0)


GRADIENTS = [
    ("direct", "dopri5", {}),
    ("discrete", "dopri5", {"checkpoints": 2}),
    ("reversible", "reversible_heun", {"step_size": 0.05}),
    ("reversible", "dopri5", {}),
    ("backsolve", "dopri5", {}),
    ("interpolated", "dopri5", {}),
]


def _field():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


@pytest.mark.parametrize("gradient,method,extra", GRADIENTS,
                         ids=[f"{g}-{m}" for g, m, _ in GRADIENTS])
def test_called_once_per_step_whatever_the_backward_pass(gradient, method, extra):
    net = _field()
    f = lambda t, y: net(y)  # noqa: E731
    params = list(net.parameters())
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    recorder = Recorder()
    sol = odegrad.solve(f, y0, t, method=method, gradient=gradient, params=params,
                        rtol=1e-7, atol=1e-9, **extra, **recorder.options())
    stats = sol.stats
    counts = recorder.counts()
    assert counts == (stats["n_steps"], stats["n_accepted"], stats["n_rejected"])
    assert counts[1] > 1
    # the observed solution (reversible schemes carry more than y)
    end = recorder.calls["on_accept"][-1][1]
    assert end.shape == y0.shape
    torch.testing.assert_close(end, sol.ys[-1].detach(), rtol=0, atol=0)

    loss = sol.ys[-1].pow(2).sum()
    grads = torch.autograd.grad(loss, [y0, *params], create_graph=True)
    assert recorder.counts() == counts
    second = sum(g.pow(2).sum() for g in grads)
    torch.autograd.grad(second, [y0, *params], allow_unused=True)
    assert recorder.counts() == counts

    # a plain first-order backward (the recomputing / reconstructing / adjoint passes)
    recorder2 = Recorder()
    sol2 = odegrad.solve(f, y0, t, method=method, gradient=gradient, params=params,
                         rtol=1e-7, atol=1e-9, **extra, **recorder2.options())
    counts2 = recorder2.counts()
    sol2.ys[-1].pow(2).sum().backward()
    assert recorder2.counts() == counts2 == counts
    assert sol2.stats["nfe_backward"] > 0 or gradient == "direct"


def test_no_callbacks_when_absent():
    # the loop is unchanged without them: the same outputs bit for bit
    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    t = torch.linspace(0.0, 1.0, 5, dtype=DT)
    a = odegrad.odeint(oscillator, y0, t, method="rk4", step_size=0.01)
    b = odegrad.odeint(oscillator, y0, t, method="rk4", step_size=0.01,
                       on_accept=lambda t, y, h: None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the backward solve's hooks: adjoint_on_attempt=, adjoint_on_accept=, adjoint_on_reject= ---

ADJOINT_HOOKS = ("adjoint_on_attempt", "adjoint_on_accept", "adjoint_on_reject")


class AdjointRecorder:
    def __init__(self):
        self.calls = {name: [] for name in ADJOINT_HOOKS}

    def options(self) -> dict:
        return {name: (lambda t, z, h, name=name: self.calls[name].append((t, z, h)))
                for name in self.calls}

    def counts(self) -> tuple[int, int, int]:
        return tuple(len(self.calls[name]) for name in ADJOINT_HOOKS)


@pytest.mark.parametrize("gradient", ["backsolve", "interpolated"])
def test_adjoint_hooks_once_per_backward_step(gradient):
    net = _field()
    params = list(net.parameters())
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)
    recorder = AdjointRecorder()
    # a first backward step of 2.0 is rejected
    sol = odegrad.solve(lambda t, y: net(y), y0, t, method="dopri5", gradient=gradient,
                        params=params, rtol=1e-8, atol=1e-10, adjoint_step_size=2.0,
                        **recorder.options())
    assert recorder.counts() == (0, 0, 0)  # nothing before the backward pass
    grads = torch.autograd.grad(sol.ys.pow(2).sum(), [y0, *params])
    stats = sol.stats
    counts = recorder.counts()
    assert counts == (stats["n_steps_backward"], stats["n_accepted_backward"],
                      stats["n_rejected_backward"])
    assert counts[2] > 0 and counts[1] > 2
    for name in ADJOINT_HOOKS:
        for t_n, z, h in recorder.calls[name]:
            assert t_n.shape == () and h.shape == () and t_n.dtype == DT and h.dtype == DT
            assert float(h) < 0  # backwards from t[-1]
            assert len(z) == 2 + len(params)
            assert z[0].shape == y0.shape and z[1].shape == y0.shape
            assert [m.shape for m in z[2:]] == [p.shape for p in params]
            assert not any(x.requires_grad for x in z)
    # the first attempt starts at t[-1] with y(t[-1]), a = ∂L/∂y(t[-1]) and μ = 0
    t_n, (y, a, *mu), h = recorder.calls["adjoint_on_attempt"][0]
    assert float(t_n) == 1.0 and float(h) == -0.5  # clipped to the output interval
    torch.testing.assert_close(y, sol.ys[-1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(a, 2 * sol.ys[-1].detach(), rtol=0, atol=0)
    assert all(float(m.abs().max()) == 0 for m in mu)
    # accepted steps chain back over [0, 1]; their states are at the step ends
    accepted = recorder.calls["adjoint_on_accept"]
    assert sum(float(h) for _, _, h in accepted) == pytest.approx(-1.0, abs=1e-12)
    for (t_n, _, h), (t_next, _, _) in zip(accepted, accepted[1:]):
        assert float(t_n + h) == pytest.approx(float(t_next), abs=1e-12)
    rejected_at = {float(t_n) for t_n, _, _ in recorder.calls["adjoint_on_reject"]}
    assert rejected_at <= {float(t_n) for t_n, _, _ in accepted}
    _, (y_end, _, *mu_end), _ = accepted[-1]
    torch.testing.assert_close(y_end, y0.detach(), rtol=0, atol=1e-6)  # y back at t[0]
    for m, g in zip(mu_end, grads[1:]):  # μ at t[0] is the parameters' gradient
        torch.testing.assert_close(m, g, rtol=0, atol=0)


def test_adjoint_hooks_fixed_steps_and_no_double_backward():
    y0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    recorder = AdjointRecorder()
    ys = odegrad.odeint(oscillator, y0, t, method="rk4", step_size=0.1, gradient="backsolve",
                        **recorder.options())
    ys[-1].sum().backward()
    assert recorder.counts() == (10, 10, 0)
    starts = [float(t_n) for t_n, _, _ in recorder.calls["adjoint_on_attempt"]]
    assert starts == pytest.approx([1.0 - 0.1 * k for k in range(10)], abs=1e-12)
    assert all(float(h) == pytest.approx(-0.1, abs=1e-12)
               for _, _, h in recorder.calls["adjoint_on_accept"])
    # accept sees the step's end, attempt its start: the next attempt's state
    for (_, z_end, _), (_, z_next, _) in zip(recorder.calls["adjoint_on_accept"],
                                             recorder.calls["adjoint_on_attempt"][1:]):
        for u, v in zip(z_end, z_next):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    # a backward pass with create_graph=True differentiates the forward scheme: no backward
    # solve, no hook; differentiating its result reaches the outputs' plain backward (one
    # backward solve) through the cotangent 2 y(1)
    recorder2 = AdjointRecorder()
    ys = odegrad.odeint(oscillator, y0, t, method="rk4", step_size=0.1, gradient="backsolve",
                        **recorder2.options())
    (g,) = torch.autograd.grad(ys[-1].pow(2).sum(), y0, create_graph=True)
    assert recorder2.counts() == (0, 0, 0)
    torch.autograd.grad(g.pow(2).sum(), y0)
    assert recorder2.counts() == (10, 10, 0)


def test_adjoint_hooks_tuple_state_and_interpolant():
    def f(t, state):
        x, v = state
        return v.sum(0), -torch.cat([x, x]).reshape(2, 1)

    pair = (torch.tensor([1.0], dtype=DT, requires_grad=True), torch.zeros(2, 1, dtype=DT))
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)
    seen = []
    ys = odegrad.odeint(f, pair, t, method="dopri5", gradient="interpolated",
                        adjoint_on_accept=lambda t, z, h: seen.append(z))
    (ys[0][-1].sum() + ys[1][-1].sum()).backward()
    assert seen
    y, a = seen[-1]  # no parameters: (y, a)
    assert isinstance(y, tuple) and isinstance(a, tuple)
    assert [p.shape for p in y] == [p.shape for p in a] == [(1,), (2, 1)]
    # the interpolated adjoint's y at t[0] is the interpolant's value there: y0
    torch.testing.assert_close(y[0], pair[0].detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(y[1], pair[1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ADJOINT_HOOKS)
def test_adjoint_hook_routing(name):
    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(odegrad.InvalidInputError, match=name):
        odegrad.odeint(oscillator, y0, t, gradient="backsolve", **{name: 3})
    for gradient in ("direct", "discrete"):  # only the continuous adjoints have a backward solve
        with pytest.raises(odegrad.UnknownNameError, match=name):
            odegrad.odeint(oscillator, y0, t, gradient=gradient, **{name: print})
