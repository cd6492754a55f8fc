"""The stochastic adjoint (gradient="backsolve" for SDEs, Li et al. 2020) converges to the
closed-form pathwise gradient of geometric Brownian motion as dt halves, and the SDE API's
refusals name what to use instead."""

import pytest
import torch

import odegrad
from odegrad import BrownianInterval, sdeint

DT = torch.float64
PATHS = 100
T = torch.tensor([0.0, 0.4, 1.0], dtype=DT)


def closed_form_and_solve():
    """Stratonovich GBM dy = μy dt + σy ∘ dW: y(t) = y0 exp(μt + σW_t), so the gradient of
    L = Σ y(1) + Σ y(0.4)² w.r.t. y0, μ and σ is known in closed form on each path."""
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=DT, requires_grad=True)
    y0 = torch.linspace(0.5, 1.5, PATHS, dtype=DT)[:, None].requires_grad_()
    bm = BrownianInterval(0.0, 1.0, (PATHS, 1), dtype=DT, seed=7)
    inputs = [y0, mu, sigma]
    y1 = y0 * torch.exp(mu + sigma * bm(0.0, 1.0))
    y04 = y0 * torch.exp(0.4 * mu + sigma * bm(0.0, 0.4))
    exact = torch.autograd.grad(y1.sum() + y04.pow(2).sum(), inputs)

    def gradient(method, dt, gradient):
        ys = sdeint(lambda t, y: mu * y, lambda t, y: sigma * y, y0, T, bm, method=method,
                    dt=dt, gradient=gradient, params=[mu, sigma])
        return torch.autograd.grad(ys[-1].sum() + ys[1].pow(2).sum(), inputs)

    return exact, gradient


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("method", ["midpoint", "reversible_heun"])
def test_backsolve_converges_as_dt_halves(method):
    exact, gradient = closed_form_and_solve()
    exact = flat(exact)
    errors = []
    for dt in (0.1, 0.05, 0.025):
        got = flat(gradient(method, dt, "backsolve"))
        errors.append(float((got - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 0.75 * errors[0] and errors[2] < 0.75 * errors[1], errors
    assert errors[-1] < 0.05, errors


def test_backsolve_and_direct_approach_each_other():
    """Both converge to the SDE's gradient, so their difference shrinks with dt."""
    _, gradient = closed_form_and_solve()
    gaps = []
    for dt in (0.1, 0.025):
        gaps.append(float((flat(gradient("heun", dt, "backsolve"))
                           - flat(gradient("heun", dt, "direct"))).abs().max()))
    assert gaps[1] < 0.5 * gaps[0], gaps


def test_backsolve_counts_and_memory():
    y0 = torch.ones(3, 2, dtype=DT, requires_grad=True)
    sol = odegrad.solve_sde(lambda t, y: -y, lambda t, y: 0.1 * y, y0, T, method="midpoint",
                            dt=0.1, gradient="backsolve", seed=0)
    sol.ys.sum().backward()
    assert sol.stats["checkpoint_bytes"] == sol.ys.numel() * 8
    assert sol.stats["nfe_backward"] > 0 and sol.stats["nge_backward"] > 0
    assert sol.stats["n_steps_backward"] >= sol.stats["n_steps"]


# ---- refusals -------------------------------------------------------------------------------


def solve(**kwargs):
    options = dict(method="midpoint", dt=0.1, seed=0) | kwargs
    y0 = options.pop("y0", torch.ones(2, 3, dtype=DT, requires_grad=True))
    t = options.pop("t", T)
    g = options.pop("g", lambda t, y: 0.1 * y)
    return odegrad.solve_sde(lambda t, y: -y, g, y0, t, **options)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"method": "euler", "gradient": "backsolve"}, odegrad.UnsupportedCombinationError,
     "Stratonovich"),
    ({"gradient": "interpolated"}, odegrad.UnsupportedCombinationError, "backsolve"),
    ({"gradient": "reversible"}, odegrad.UnsupportedCombinationError, "reversible_heun"),
    ({"method": "milstein", "noise_type": "general", "brownian_size": 2},
     odegrad.UnsupportedCombinationError, "euler"),
    ({"method": "nope"}, odegrad.UnknownNameError, "reversible_heun"),
    ({"gradient": "nope"}, odegrad.UnknownNameError, "discrete"),
    ({"noise_type": "nope"}, odegrad.UnknownNameError, "diagonal"),
    ({"sde_type": "nope"}, odegrad.UnknownNameError, "stratonovich"),
    ({"no_such_option": 1}, odegrad.UnknownNameError, "valid options"),
    ({"rtol": 1e-3}, odegrad.UnsupportedCombinationError, "dt"),
    ({"adaptive": True}, odegrad.UnsupportedCombinationError, "fixed steps"),
    ({"dt": None}, odegrad.InvalidInputError, "dt"),
    ({"dt": -0.1}, odegrad.InvalidInputError, "dt"),
    ({"noise_type": "general"}, odegrad.InvalidInputError, "brownian_size"),
    ({"t": T.clone().requires_grad_()}, odegrad.UnsupportedCombinationError, "t.detach()"),
    ({"y0": (torch.ones(2), torch.ones(2))}, odegrad.InvalidInputError, "concatenate"),
    ({"checkpoints": 2}, odegrad.InvalidInputError, "discrete"),
    ({"g": lambda t, y: y[..., :2]}, odegrad.InvalidInputError, "shape"),
    ({"bm": BrownianInterval(0.0, 0.5, (2, 3), dtype=DT), "seed": None},
     odegrad.InvalidInputError, "does not contain"),
    ({"bm": BrownianInterval(0.0, 1.0, (2, 2), dtype=DT), "seed": None},
     odegrad.InvalidInputError, "needs"),
])
def test_refusals_name_what_to_use(kwargs, error, words):
    with pytest.raises(error, match=words):
        solve(**kwargs)


def test_a_tensor_missing_from_params_is_refused():
    scale = torch.tensor(0.1, dtype=DT, requires_grad=True)
    with pytest.raises(odegrad.InvalidInputError, match="g depends on"):
        solve(g=lambda t, y: scale * y, gradient="discrete", params=[])
