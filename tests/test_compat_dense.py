"""torchdiffeq's odeint_dense through the shim: the dense output of one dopri5 solve against
torchdiffeq 0.2.5's own, values and gradients, and the refusals."""

import pytest
import torch

import odegrad.compat.torchdiffeq as shim
from odegrad.errors import InvalidInputError

torchdiffeq = pytest.importorskip("torchdiffeq")


def _problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.tanh(a @ y) * w - 0.1 * y * t

    y0 = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64)
    return f, w, y0


@pytest.mark.parametrize("time", [0.0, 0.37, 1.5, 2.0])
def test_dense_output_and_its_gradient_match_torchdiffeq(time):
    f, w, y0 = _problem()
    t0, t1 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    results = []
    for library in (torchdiffeq, shim):
        dense = library.odeint_dense(f, y0, t0, t1, rtol=1e-10, atol=1e-12)
        # torchdiffeq's own dense_output_fn indexes past its last step at t1 exactly
        at = torch.tensor(min(time, 2.0 - 1e-12), dtype=torch.float64)
        y = dense(at)
        (grad,) = torch.autograd.grad(y.sum(), w)
        results.append((y.detach(), grad))
    (y_ref, g_ref), (y, g) = results
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-9)
    assert abs(float(g - g_ref)) < 1e-8 * max(1.0, abs(float(g_ref)))


def test_dense_output_is_exact_at_the_ends_and_refuses_outside():
    f, _, y0 = _problem()
    dense = shim.odeint_dense(f, y0, torch.tensor(0.0, dtype=torch.float64),
                              torch.tensor(2.0, dtype=torch.float64))
    assert torch.equal(dense(torch.tensor(0.0, dtype=torch.float64)).detach(), y0)
    end = shim.odeint(f, y0, torch.tensor([0.0, 2.0], dtype=torch.float64))[-1]
    assert torch.allclose(dense(torch.tensor(2.0, dtype=torch.float64)), end, atol=1e-6)
    with pytest.raises(InvalidInputError, match="outside"):
        dense(torch.tensor(2.5, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rk4"), "dopri5. only"),
    (dict(options=dict(first_step=0.1)), "first_step"),
])
def test_refusals(kwargs, match):
    f, _, y0 = _problem()
    with pytest.raises(InvalidInputError, match=match):
        shim.odeint_dense(f, y0, torch.tensor(0.0, dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64), **kwargs)
    with pytest.raises(InvalidInputError, match="tensor y0"):
        shim.odeint_dense(f, (y0,), torch.tensor(0.0, dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64))
