import torch

import odegrad


def test_linear_system_matches_matrix_exponential():
    a = torch.randn(4, 4, dtype=torch.float64)
    y0 = torch.randn(4, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ys = odegrad.odeint(lambda t, y: a @ y, y0, t, method="dopri5", rtol=1e-10, atol=1e-10)
    exact = torch.stack([torch.linalg.matrix_exp(a * ti) @ y0 for ti in t])
    assert (ys - exact).abs().max() < 1e-8
