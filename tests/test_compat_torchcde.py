"""odegrad.compat.torchcde against torchcde 0.2.5 itself: coefficients, paths, and a small neural
CDE's outputs and gradients with adjoint=False and adjoint=True."""

import pytest
import torch
import torchcde

import odegrad.compat.torchcde as shim
from odegrad import InvalidInputError

DT = torch.float64
COEFFICIENTS = ["linear_interpolation_coeffs",
                "hermite_cubic_coefficients_with_backward_differences", "natural_cubic_coeffs",
                "natural_cubic_spline_coeffs"]


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.3 + torch.rand(7, generator=g, dtype=DT), 0)
    x = torch.randn(3, 7, 2, generator=g, dtype=DT)
    x[0, 2, 1] = x[1, 0, 0] = x[2, -2:, 1] = float("nan")
    return t, x


@pytest.mark.parametrize("name", COEFFICIENTS)
@pytest.mark.parametrize("with_t", [True, False])
def test_coefficients_equal_torchcde(name, with_t):
    t, x = data()
    t = t if with_t else None
    assert (getattr(shim, name)(x, t) - getattr(torchcde, name)(x, t)).abs().max() < 1e-12


def test_rectilinear_coefficients_equal_torchcde():
    t, x = data()
    x = torch.cat([t.view(-1, 1).expand(3, -1, 1), x], dim=-1)
    with pytest.warns(UserWarning):
        expected = torchcde.linear_interpolation_coeffs(x, rectilinear=0)
    with pytest.warns(UserWarning):
        got = shim.linear_interpolation_coeffs(x, rectilinear=0)
    assert (got - expected).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["LinearInterpolation", "CubicSpline"])
def test_paths_equal_torchcde(kind):
    t, x = data()
    make = "linear_interpolation_coeffs" if kind == "LinearInterpolation" else \
        "natural_cubic_coeffs"
    ours = getattr(shim, kind)(getattr(shim, make)(x, t), t)
    theirs = getattr(torchcde, kind)(getattr(torchcde, make)(x, t), t)
    assert torch.equal(ours.grid_points, theirs.grid_points)
    assert torch.equal(ours.interval, theirs.interval)
    for s in torch.linspace(0.0, 8.0, 23, dtype=DT):
        assert (ours.evaluate(s) - theirs.evaluate(s)).abs().max() < 1e-12
        assert (ours.derivative(s) - theirs.derivative(s)).abs().max() < 1e-12


class Func(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 6).double()

    def forward(self, t, z):
        return torch.tanh(self.linear(z)).view(*z.shape[:-1], 3, 2)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.25}), ("euler", {})])
def test_neural_cde_equals_torchcde(adjoint, method, options):
    _, x = data()
    # output times on the fixed grid: there the shim's adjoint steps as torchdiffeq's does (off
    # the grid, odegrad.compat.torchdiffeq's adjoint agrees to the scheme's order only)
    t = torch.arange(7, dtype=DT)
    func = Func()
    results = []
    for library in (torchcde, shim):
        observed = x.clone().requires_grad_()
        coeffs = library.hermite_cubic_coefficients_with_backward_differences(observed, t)
        X = library.CubicSpline(coeffs, t)
        z0 = torch.linspace(-1, 1, 9, dtype=DT).view(3, 3).requires_grad_()
        extra = {"adjoint_params": (*func.parameters(), coeffs)} if adjoint else {}
        z = library.cdeint(X, func, z0, t, adjoint=adjoint, method=method, options=options,
                           **extra)
        grads = torch.autograd.grad(z[:, -1].pow(2).sum() + z[:, 3].sum(),
                                    [z0, observed, *func.parameters()])
        results.append((z, grads))
    (z_theirs, g_theirs), (z_ours, g_ours) = results
    assert z_ours.shape == z_theirs.shape == (3, 7, 3)
    assert (z_ours - z_theirs).abs().max() < 1e-12
    for a, b in zip(g_ours, g_theirs):
        assert (a - b).abs().max() < 1e-11 * max(1.0, float(b.abs().max()))


def test_what_is_not_served_raises():
    with pytest.raises(AttributeError, match="log-ODE"):
        shim.logsig_windows  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        shim.nonsense  # noqa: B018
    t, x = data()
    X = shim.CubicSpline(shim.natural_cubic_coeffs(x.clone().requires_grad_(), t), t)
    z0 = torch.zeros(3, 3, dtype=DT)
    with pytest.raises(InvalidInputError, match="torchsde"):
        shim.cdeint(X, Func(), z0, t, backend="torchsde")
    with pytest.raises(InvalidInputError, match="adjoint_params"):
        shim.cdeint(X, Func(), z0, t, adjoint=True)
    with pytest.raises(ValueError, match="hidden_channels=3"):
        shim.cdeint(X, lambda s, z: torch.zeros(3, 4, 2, dtype=DT), z0, t, adjoint=False)
