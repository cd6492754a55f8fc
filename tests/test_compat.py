"""odegrad.compat.torchdiffeq: torchdiffeq's signatures, options and method names."""

import pytest
import torch

import odegrad.compat.torchdiffeq as compat
from odegrad.errors import InvalidInputError, MaxStepsExceededError, UnknownNameError

DT = torch.float64


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.linear(y))


def test_odeint_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = Field()
    y0 = torch.randn(3, 2, dtype=DT)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    ours = compat.odeint(field, y0, t, rtol=1e-10, atol=1e-10)
    theirs = torchdiffeq.odeint(field, y0, t, rtol=1e-10, atol=1e-10)
    assert (ours - theirs).abs().max() < 1e-8
    reference = ours
    ours = compat.odeint(field, y0, t, method="rk4", options=dict(step_size=0.1))
    theirs = torchdiffeq.odeint(field, y0, t, method="rk4", options=dict(step_size=0.1))
    # The same steps land on t = 1 (torchdiffeq's "rk4" is the 3/8-rule variant: O(h^5) apart).
    assert (ours[-1] - theirs[-1]).abs().max() < 1e-7
    # Between grid points torchdiffeq interpolates linearly, odegrad with RK4's own dense output.
    assert (ours - reference).abs().max() < 0.1 * (theirs - reference).abs().max()


def test_odeint_adjoint_gives_gradients():
    field = Field()
    y0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    compat.odeint_adjoint(field, y0, t, rtol=1e-9, atol=1e-9)[-1].sum().backward()
    reference_field = Field()
    reference_field.load_state_dict(field.state_dict())
    y0_ref = y0.detach().clone().requires_grad_()
    compat.odeint(reference_field, y0_ref, t, rtol=1e-9, atol=1e-9)[-1].sum().backward()
    assert torch.allclose(y0.grad, y0_ref.grad, rtol=1e-5, atol=1e-7)
    for p, q in zip(field.parameters(), reference_field.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_options_are_translated():
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 10.0], dtype=DT)
    with pytest.raises(MaxStepsExceededError, match="max_steps=3"):
        compat.odeint(lambda t, y: -y, y0, t, options=dict(max_num_steps=3))
    ys = compat.odeint(lambda t, y: -y, y0, t, options=dict(first_step=1e-3))
    assert torch.allclose(ys[-1], torch.exp(torch.tensor(-10.0, dtype=DT)) * y0, rtol=1e-5)


def test_t_is_cast_like_torchdiffeq():
    ys = compat.odeint(lambda t, y: -y, torch.ones(2, dtype=DT), [0.0, 1.0])
    assert ys.dtype == DT


def test_unsupported_method_and_option_are_named():
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(UnknownNameError, match="explicit_adams"):
        compat.odeint(lambda t, y: -y, y0, t, method="explicit_adams")
    with pytest.raises(InvalidInputError, match="'grid_points'"):
        compat.odeint(lambda t, y: -y, y0, t, options=dict(grid_points=1))


def test_adaptive_heun_alias():
    ys = compat.odeint(lambda t, y: -y, torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       method="adaptive_heun", rtol=1e-6, atol=1e-6)
    assert torch.allclose(ys[-1], torch.exp(torch.tensor(-1.0, dtype=DT)) * torch.ones(2, dtype=DT),
                          rtol=1e-4)
