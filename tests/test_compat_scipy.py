"""torchdiffeq 0.2.5's method="scipy_solver" through odegrad.compat.torchdiffeq: the same
scipy.integrate.solve_ivp calls as torchdiffeq (scipy_wrapper.py), so the same numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

import odegrad.compat.torchdiffeq as compat
from odegrad.errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError

pytest.importorskip("scipy")
# torchdiffeq passes min_step to every scipy solver (also in its adjoint backward pass)
pytestmark = pytest.mark.filterwarnings("ignore:The following arguments have no effect")
DT = torch.float64
SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
T = torch.linspace(0.0, 2.0, 5, dtype=DT)
Y0 = torch.tensor([[1.0, -0.5]], dtype=DT)


class Field(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.linear(y)) * torch.cos(t)


def lsoda_time(f):
    """torchdiffeq's scipy_solver makes f's time with torch.tensor(t), which is float32 when
    LSODA passes t as a Python float; this f rounds its time the same way."""
    return lambda t, y: f(t.float().to(t.dtype), y)


def real(*args, **kwargs):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    with warnings.catch_warnings():
        # torchdiffeq passes min_step to every scipy solver: "no effect" warnings
        warnings.simplefilter("ignore")
        return getattr(torchdiffeq, kwargs.pop("fn", "odeint"))(*args, **kwargs)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_equals_torchdiffeq(solver, reverse):
    f = Field()
    t = T.flip(0) if reverse else T
    kwargs = dict(method="scipy_solver", options=dict(solver=solver), rtol=1e-8, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shim passes solve_ivp nothing it ignores
        ours = compat.odeint(lsoda_time(f) if solver == "LSODA" else f, Y0, t, **kwargs)
    theirs = real(f, Y0, t, **kwargs)
    assert ours.shape == theirs.shape == (5, 1, 2)
    assert (ours - theirs).abs().max() < 1e-10
    # and to the tolerance of an exact solution (odegrad's dopri8 at 1e-12)
    exact = compat.odeint(f, Y0, t, method="dopri8", rtol=1e-12, atol=1e-12)
    assert (ours.detach() - exact.detach()).abs().max() < 1e-5


def test_default_solver_is_lsoda_and_float32():
    f = lambda t, y: -y  # noqa: E731  (autonomous: LSODA's float32 time does not matter)
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float32)
    t = torch.linspace(0, 1, 4, dtype=torch.float32)
    ours = compat.odeint(f, y0, t, method="scipy_solver")
    assert ours.dtype == torch.float32
    assert torch.equal(ours, real(f, y0, t, method="scipy_solver"))
    assert torch.equal(ours, compat.odeint(f, y0, t, method="scipy_solver",
                                           options=dict(solver="LSODA")))
    assert not torch.equal(ours, compat.odeint(f, y0, t, method="scipy_solver",
                                               options=dict(solver="RK45")))


def test_tuple_state():
    f = lambda t, y: (-y[0] * torch.cos(t), y[0].sum() - y[1])  # noqa: E731
    state = (torch.tensor([1.0, 2.0], dtype=DT), torch.tensor(0.5, dtype=DT))
    ours = compat.odeint(f, state, T, method="scipy_solver", options=dict(solver="DOP853"))
    theirs = real(f, state, T, method="scipy_solver", options=dict(solver="DOP853"))
    assert ours[0].shape == (5, 2) and ours[1].shape == (5,)
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(ours, theirs))


def test_options_and_bad_solver_name():
    f = lambda t, y: -y  # noqa: E731
    with pytest.raises(UnknownNameError, match="'RK46'"):
        compat.odeint(f, Y0, T, method="scipy_solver", options=dict(solver="RK46"))
    with pytest.raises(UnknownNameError, match="adjoint_options\\['solver'\\]='rk45'"):
        compat.odeint_adjoint(Field(), Y0, T, method="scipy_solver",
                              adjoint_options=dict(solver="rk45"))
    for key, value in (("first_step", 0.1), ("norm", lambda x: x.abs().max())):
        with pytest.raises(InvalidInputError, match=f"'{key}'"):  # solve_ivp never sees them
            compat.odeint(f, Y0, T, method="scipy_solver", options={key: value})
    with pytest.raises(InvalidInputError, match="'min_step'.*LSODA"):  # RK45 has none
        compat.odeint(f, Y0, T, method="scipy_solver", options=dict(solver="RK45", min_step=0.1))
    with pytest.raises(InvalidInputError, match="'jac'"):  # not a torchdiffeq option
        compat.odeint(f, Y0, T, method="scipy_solver", options=dict(jac=None))
    with pytest.warns(UserWarning, match="ScipyWrapperODESolver: Unexpected arguments"):
        compat.odeint(f, Y0, T, method="scipy_solver", options=dict(step_size=0.1))
    # max_step and min_step (LSODA) reach solve_ivp: as many evaluations as torchdiffeq's
    for options in (dict(max_step=0.01), dict(), dict(min_step=0.5, max_step=1.0)):
        counts = []
        for lib in (compat, None):
            n = [0]

            def g(t, y, n=n):
                n[0] += 1
                return -y

            kwargs = dict(method="scipy_solver", options=options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compat.odeint(g, Y0, T, **kwargs) if lib else real(g, Y0, T, **kwargs)
            counts.append(n[0])
        assert counts[0] == counts[1], (options, counts)


def test_odeint_is_not_silently_differentiable():
    f = Field()
    ys = compat.odeint(f, Y0, T, method="scipy_solver")  # f's parameters require grad
    with pytest.raises(UnsupportedCombinationError, match="scipy_solver.*odeint_adjoint"):
        ys.sum().backward()
    closure = lambda t, y: f(t, y)  # noqa: E731  (parameters seen through a closure)
    loss = compat.odeint(closure, Y0, T, method="scipy_solver").sum() + f.linear.bias.sum()
    with pytest.raises(UnsupportedCombinationError, match="scipy_solver"):
        loss.backward()
    y0 = Y0.clone().requires_grad_()
    with pytest.raises(UnsupportedCombinationError):
        compat.odeint(lambda t, y: -y, y0, T, method="scipy_solver").sum().backward()
    # nothing to differentiate: a plain tensor, as torchdiffeq returns
    assert not compat.odeint(lambda t, y: -y, Y0, T, method="scipy_solver").requires_grad
    with torch.no_grad():
        assert not compat.odeint(f, y0, T, method="scipy_solver").requires_grad


def gradients(lib, f, t, fn="odeint_adjoint", **kwargs):
    y0 = Y0.clone().requires_grad_()
    t = t.clone().requires_grad_()
    f.zero_grad()
    if lib is None:
        out = real(f, y0, t, fn=fn, **kwargs)
    else:
        out = getattr(lib, fn)(f, y0, t, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape)
    (out * weights).sum().backward()
    return torch.cat([y0.grad.reshape(-1), t.grad.reshape(-1)]
                     + [p.grad.reshape(-1) for p in f.parameters()])


@pytest.mark.parametrize("solver,reverse", [("RK45", False), ("RK45", True), ("LSODA", True)])
def test_adjoint_equals_torchdiffeq(solver, reverse):
    f = Field()
    t = T.flip(0) if reverse else T
    kwargs = dict(method="scipy_solver", options=dict(solver=solver), rtol=1e-8, atol=1e-10)
    ours = gradients(compat, f, t, **kwargs)
    if solver == "LSODA":
        g = Field()  # the same parameters, time rounded as torchdiffeq's LSODA rounds it
        g.forward = lsoda_time(g.forward)
        ours = gradients(compat, g, t, **kwargs)
    theirs = gradients(None, f, t, **kwargs)
    assert (ours - theirs).abs().max() < 1e-6


def test_adjoint_equals_direct_gradient():
    f = Field()
    direct = gradients(compat, f, T, fn="odeint", method="dopri8", rtol=1e-12, atol=1e-12)
    tight = dict(rtol=1e-11, atol=1e-12, options=dict(solver="DOP853"))
    ours = gradients(compat, f, T, method="scipy_solver", **tight)
    assert (ours - direct).abs().max() < 1e-7
    # scipy only one way: the other solve by the shim (dopri5), as torchdiffeq allows
    ours = gradients(compat, f, T, method="scipy_solver", adjoint_method="dopri5",
                     adjoint_options={}, **tight)
    assert (ours - direct).abs().max() < 1e-7
    ours = gradients(compat, f, T, method="dopri5", adjoint_method="scipy_solver",
                     adjoint_options=dict(solver="DOP853"), rtol=1e-11, atol=1e-12)
    assert (ours - direct).abs().max() < 1e-7
    with pytest.raises(InvalidInputError, match="'norm'"):  # scipy's own error norm only
        compat.odeint_adjoint(f, Y0, T, method="scipy_solver",
                              adjoint_options=dict(norm="seminorm"))


def test_adjoint_tuple_state_and_params():
    a = torch.tensor(0.7, dtype=DT, requires_grad=True)
    f = lambda t, y: (-a * y[0], y[0].sum() - y[1])  # noqa: E731
    state = (torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True),
             torch.tensor(0.5, dtype=DT, requires_grad=True))
    kwargs = dict(method="scipy_solver", options=dict(solver="RK45"), rtol=1e-9, atol=1e-11)

    def grads(lib):
        for x in (a, *state):
            x.grad = None
        out = (lib.odeint_adjoint(f, state, T, adjoint_params=(a,), **kwargs) if lib else
               real(f, state, T, fn="odeint_adjoint", adjoint_params=(a,), **kwargs))
        (out[0][-1].sum() + 2 * out[1][-2]).backward()
        return torch.stack([a.grad, *state[0].grad, state[1].grad])

    ours = grads(compat)
    assert (ours - grads(None)).abs().max() < 1e-8
    out = compat.odeint(f, state, T, method="dopri8", rtol=1e-12, atol=1e-12)
    direct = torch.autograd.grad(out[0][-1].sum() + 2 * out[1][-2], (a, *state))
    direct = torch.cat([d.reshape(-1) for d in direct])
    assert (ours - direct).abs().max() < 1e-7
