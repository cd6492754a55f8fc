"""per_sample=True reads many output times inside one step (per_sample_outputs.py): each
sample's outputs and their gradients (w.r.t. y0, its own times and the parameters) against the
lone solves of odegrad.solve, float64. The rows differ in how many outputs fall in one step
(from none to dozens), one runs backwards in time, and steps are loose (rtol 1e-4) so that most
steps pass several outputs.
"""

from __future__ import annotations

import torch

import odegrad

F64 = torch.float64
K = torch.tensor([0.5, 3.0, 20.0, 1.0], dtype=F64)


def field(k: torch.Tensor, w: torch.Tensor):
    """y0' = −k y0 + w y1, y1' = −k y1 − w y0 + sin(t) (elementwise: row b is the lone f)."""

    def f(t, y):
        a, b = y[..., 0], y[..., 1]
        return torch.stack([-k * a + w * b, -k * b - w * a + torch.sin(t)], dim=-1)

    return f


def dense_rows() -> torch.Tensor:
    """(4, 30) rows: 30 times packed into spans of 0.05, 0.4, 1.5 and 3 (decreasing)."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for start, span in ((0.0, 0.05), (0.2, 0.4), (-0.3, 1.5), (0.1, 3.0)):
        gaps = 0.2 + torch.rand(29, generator=generator, dtype=F64)
        rows.append(start + span * torch.cat([torch.zeros(1, dtype=F64), gaps.cumsum(0)])
                    / gaps.sum())
    rows[3] = rows[3].flip(0)  # backwards in time
    return torch.stack(rows)


def test_many_outputs_per_step_and_their_gradients():
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    y0.requires_grad_()
    t = dense_rows().requires_grad_()
    w = torch.tensor(2.0, dtype=F64, requires_grad=True)
    weights = torch.randn(30, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    options = dict(method="dopri5", rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the reads' weights from the host's float64 times
        constant = odegrad.solve(field(K, w), y0, t, per_sample=True, **options)
    sol = odegrad.solve(field(K, w), y0, t, per_sample=True, **options)  # differentiable in t
    assert int(sol.stats["sample_n_steps"].min()) < 30 // 3  # several outputs per step
    got = torch.autograd.grad((sol.ys * weights).sum(), [y0, t, w])
    grad_w = torch.zeros_like(w)
    for b in range(4):
        y0_b = y0.detach()[b].clone().requires_grad_()
        t_b = t.detach()[b].clone().requires_grad_()
        alone = odegrad.solve(field(K[b], w), y0_b, t_b, **options)
        torch.testing.assert_close(sol.ys[:, b], alone.ys, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(constant.ys[:, b], alone.ys, rtol=1e-12, atol=1e-12)
        assert int(sol.stats["sample_n_steps"][b]) == alone.stats["n_steps"]
        grads = torch.autograd.grad((alone.ys * weights[:, b]).sum(), [y0_b, t_b, w])
        torch.testing.assert_close(got[0][b], grads[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[1][b], grads[1], rtol=0, atol=1e-10)
        grad_w += grads[2]
    torch.testing.assert_close(got[2], grad_w, rtol=0, atol=1e-10)


def test_many_outputs_per_step_discrete_equals_direct():
    """The discrete adjoint replays the reads output by output (per_sample_gradients.py):
    its gradient equals the direct one through the batched reads."""
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    y0.requires_grad_()
    t = dense_rows().requires_grad_()
    w = torch.tensor(1.5, dtype=F64, requires_grad=True)
    weights = torch.randn(30, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    grads = {}
    for gradient in ("direct", "discrete"):
        sol = odegrad.solve(field(K, w), y0, t, per_sample=True, method="dopri5", rtol=1e-4,
                            atol=1e-7, gradient=gradient, params=[w])
        grads[gradient] = torch.autograd.grad((sol.ys * weights).sum(), [y0, t, w])
    for direct, discrete in zip(grads["direct"], grads["discrete"]):
        torch.testing.assert_close(discrete, direct, rtol=0, atol=1e-10)
