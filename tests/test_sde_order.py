"""Strong and weak orders of the SDE schemes against closed forms, the same Brownian path
refined (ALGORITHMS.md §11). Each batch row is an independent path.

- Geometric Brownian motion, diagonal noise: dY = μY dt + σY dW (Itô) has
  Y_T = Y_0 exp((μ − σ²/2)T + σW_T); in Stratonovich form the drift is (μ − σ²/2)Y.
- Ornstein–Uhlenbeck, additive noise: dY = −θY dt + σ dW has
  Y_T = e^{−θT}Y_0 + σ(W_T − θ ∫_0^T e^{−θ(T−s)} W_s ds) (integration by parts), the integral
  by the trapezoidal rule on a grid 64 times finer than the finest step.
"""

import math

import numpy as np
import pytest
import torch

from odegrad import BrownianInterval, sdeint

DT = torch.float64
MU, SIGMA, T_END = 0.5, 0.8, 1.0


def gbm(sde_type: str):
    drift = MU if sde_type == "ito" else MU - SIGMA**2 / 2
    return (lambda t, y: drift * y), (lambda t, y: SIGMA * y)


def gbm_errors(method, sde_type, steps, paths=400, seed=0, levy_area="none", **options):
    bm = BrownianInterval(0.0, T_END, (paths, 1), dtype=DT, seed=seed, levy_area=levy_area)
    y0 = torch.ones(paths, 1, dtype=DT)
    t = torch.tensor([0.0, T_END], dtype=DT)
    exact = torch.exp((MU - SIGMA**2 / 2) * T_END + SIGMA * bm(0.0, T_END))
    f, g = gbm(sde_type)
    errors = []
    for n in steps:
        ys = sdeint(f, g, y0, t, bm, method=method, dt=T_END / n, sde_type=sde_type,
                    noise_type="diagonal", **options)
        errors.append(float((ys[-1] - exact).abs().mean()))
    return errors


THETA, OU_SIGMA = 1.0, 0.7


_OU_PATHS: dict = {}


def ou_path(paths: int, seed: int, finest: int, levy_area: str = "none"):
    """The Brownian motion and the closed-form Y_T (computed once per module)."""
    key = (paths, seed, finest, levy_area)
    if key not in _OU_PATHS:
        bm = BrownianInterval(0.0, T_END, (paths, 1), dtype=DT, seed=seed, levy_area=levy_area)
        fine = 64 * finest
        s = np.linspace(0.0, T_END, fine + 1)
        increments = torch.stack([bm(float(a), float(b)) for a, b in zip(s[:-1], s[1:])])
        w = torch.cat([torch.zeros(1, paths, 1, dtype=DT), increments.cumsum(0)])
        weights = torch.tensor(np.exp(-THETA * (T_END - s)), dtype=DT)[:, None, None]
        integral = torch.trapezoid(weights * w, dx=T_END / fine, dim=0)
        y0 = torch.full((paths, 1), 0.8, dtype=DT)
        exact = math.exp(-THETA * T_END) * y0 + OU_SIGMA * (w[-1] - THETA * integral)
        _OU_PATHS[key] = bm, y0, exact
    return _OU_PATHS[key]


def ou_errors(method, steps, paths=200, seed=0, levy_area="none"):
    bm, y0, exact = ou_path(paths, seed, max(steps), levy_area)
    t = torch.tensor([0.0, T_END], dtype=DT)
    errors = []
    for n in steps:
        ys = sdeint(lambda t, y: -THETA * y,
                    lambda t, y: torch.full((*y.shape, 1), OU_SIGMA, dtype=DT),
                    y0, t, bm, method=method, dt=T_END / n, noise_type="additive")
        errors.append(float((ys[-1] - exact).abs().mean()))
    return errors


def slope(steps, errors):
    """The least-squares order p of error ≈ C dt^p."""
    return float(np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errors), 1)[0])


STEPS = [16, 32, 64, 128]


@pytest.mark.parametrize("method, sde_type, order, options", [
    ("euler", "ito", 0.5, {}),
    ("milstein", "ito", 1.0, {}),
    ("milstein", "ito", 1.0, {"derivative_free": True}),
    ("milstein", "stratonovich", 1.0, {}),
    ("heun", "stratonovich", 1.0, {}),
    ("midpoint", "stratonovich", 1.0, {}),
    ("euler_heun", "stratonovich", 1.0, {}),
])
def test_strong_order_geometric_brownian_motion(method, sde_type, order, options):
    errors = gbm_errors(method, sde_type, STEPS, **options)
    assert abs(slope(STEPS, errors) - order) < 0.15, errors


@pytest.mark.parametrize("method", ["reversible_heun", "reversible_midpoint",
                                    "reversible_rk_heun", "heun", "midpoint"])
def test_strong_order_ornstein_uhlenbeck_additive(method):
    errors = ou_errors(method, STEPS)
    assert abs(slope(STEPS, errors) - 1.0) < 0.15, errors


def test_srk_strong_order_one_and_a_half_geometric_brownian_motion():
    """Rößler's SRI2 (method "srk", Itô, reads the space-time Lévy area) on GBM."""
    errors = gbm_errors("srk", "ito", STEPS, levy_area="space-time")
    assert abs(slope(STEPS, errors) - 1.5) < 0.2, errors


def test_srk_strong_order_ornstein_uhlenbeck_additive():
    """SRA1 (method "srk" on additive noise): strong order at least 1.5 on OU (at large steps
    the drift's deterministic order-2 error dominates, so the fitted slope is 1.5 to 1.8)."""
    errors = ou_errors("srk", STEPS, levy_area="space-time")
    assert slope(STEPS, errors) > 1.5 - 0.2, errors


@pytest.mark.parametrize("method", ["reversible_heun", "reversible_midpoint"])
def test_reversible_schemes_converge_on_multiplicative_noise(method):
    """On GBM (diagonal, multiplicative) the reversible schemes converge at least with
    order ½ to the Stratonovich solution."""
    errors = gbm_errors(method, "stratonovich", STEPS)
    assert slope(STEPS, errors) > 0.5 - 0.15, errors


def test_weak_order_euler_maruyama():
    """|E[Y_N] − E[Y_T]| from the mean of Y_N − Y_T over the same paths (a control variate:
    its spread is the strong error, so few paths suffice)."""
    paths, steps = 20000, [4, 8, 16, 32]
    mu, sigma = 1.0, 0.5
    bm = BrownianInterval(0.0, T_END, (paths, 1), dtype=DT, seed=3)
    exact = torch.exp((mu - sigma**2 / 2) * T_END + sigma * bm(0.0, T_END))
    y0 = torch.ones(paths, 1, dtype=DT)
    t = torch.tensor([0.0, T_END], dtype=DT)
    errors = []
    for n in steps:
        ys = sdeint(lambda t, y: mu * y, lambda t, y: sigma * y, y0, t, bm, method="euler",
                    dt=T_END / n, sde_type="ito")
        errors.append(abs(float((ys[-1] - exact).mean())))
    assert abs(slope(steps, errors) - 1.0) < 0.2, errors


def test_ito_stratonovich_conversion_matches_the_closed_form():
    """The Itô GBM solved by Stratonovich Heun (drift converted by JVPs of g) and the
    Stratonovich GBM solved by Itô Milstein converge to the same closed form, with order 1;
    a g whose i-th component reads y_j (j ≠ i) gets the exact diagonal correction."""
    for method, sde_type in [("heun", "ito"), ("milstein", "stratonovich")]:
        errors = gbm_errors(method, sde_type, STEPS)
        assert abs(slope(STEPS, errors) - 1.0) < 0.15, (method, errors)
        assert errors[-1] < 0.02


def test_conversion_uses_the_exact_diagonal_correction():
    """g_i(y) = σ y_i + 0.3 y_j (j ≠ i) on diagonal noise: the Itô drift correction is
    ½ (∂g_i/∂y_i) g_i = ½ σ g_i, not ½ Σ_j (∂g_i/∂y_j) g_j (torchsde's assumption)."""
    from odegrad.sde_field import SDEField

    def g(t, y):
        return SIGMA * y + 0.3 * y.flip(-1)

    y = torch.tensor([[0.7, -1.3]], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (1, 2), dtype=DT, seed=0)
    field = SDEField(lambda t, y: torch.zeros_like(y), g, "diagonal", bm, y, {})
    c = field.correction(torch.tensor(0.0, dtype=DT), y)
    torch.testing.assert_close(c, SIGMA * g(0.0, y), rtol=1e-13, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("method, sde_type, order", [
    ("euler", "ito", 0.5), ("milstein", "ito", 1.0), ("heun", "stratonovich", 1.0),
    ("midpoint", "stratonovich", 1.0), ("reversible_heun", "stratonovich", 0.5),
    ("srk", "ito", 1.5),
])
def test_strong_order_many_paths(method, sde_type, order):
    levy_area = "space-time" if method == "srk" else "none"
    steps = [16, 32, 64, 128, 256, 512]
    errors = gbm_errors(method, sde_type, steps, paths=4000, seed=11, levy_area=levy_area)
    if order == 0.5 and method != "euler":
        assert slope(steps, errors) > 0.35, errors
    else:
        assert abs(slope(steps, errors) - order) < 0.1, errors
