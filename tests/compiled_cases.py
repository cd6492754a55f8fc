"""What the compile=True test modules share: a small MLP field and the outputs and gradients of a
solve (the counting-backend fixture `counter` is in conftest.py)."""

import torch
from torch import nn

import odegrad

DT = torch.float64


class Field(nn.Module):
    """A small MLP with t as an input (issue 16's P1 shape, smaller)."""

    def __init__(self, dim: int = 2, hidden: int = 8):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(*y.shape[:-1], 1)], -1))))


def gradients(field, y0, t, **kwargs):
    """Outputs, ∂L/∂(y0, θ[, t]) of a loss reading every output, and the stats."""
    y0 = y0.detach().clone().requires_grad_()
    sol = odegrad.solve(field, y0, t, **kwargs)
    weights = torch.linspace(-1.0, 1.0, sol.ys.numel(), dtype=DT).reshape(sol.ys.shape)
    loss = (sol.ys * weights).sum() + (sol.ys[-1] ** 2).sum()
    inputs = [y0, *field.parameters()] + ([t] if t.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return sol.ys.detach(), torch.cat([g.reshape(-1) for g in grads]), sol.stats


def tuple_state_problem():
    """gradients(compile_, t, **options): ∂L/∂(x0, v0, w) of Σ x² over every output + v(t_end)
    summed, for the tuple state (x, v)' = (v, tanh(x w) − 0.1 v); one f for every call (so
    compiled graphs are reused)."""
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=DT, requires_grad=True)
    x0, v0 = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)

    def f(t, state):
        x, v = state
        return v, torch.tanh(x @ w) - 0.1 * v

    def gradients(compile_: bool, t: list[float], **options):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        xs, vs = odegrad.odeint(f, (x, v), torch.tensor(t, dtype=DT), params=[w],
                                compile=compile_, **options)
        return torch.autograd.grad((xs ** 2).sum() + vs[-1].sum(), [x, v, w])
    return gradients
