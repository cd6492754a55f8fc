"""The parasitic mode of the reversible schemes on dissipative problems (ALGORITHMS.md §5–§7):
the forward pass is right or raises, never a wrong number.

On y' = ay the McCallum–Foster map has a parasitic eigenvalue ≈ λ/R(ha), reversible Heun and the
leapfrog one ≈ −e^{−ha}: on a dissipative mode (a < 0) it grows unless h|a| ≲ −ln λ (never, for
Heun and alf at η = 1). Adaptive McCallum–Foster steps see the growth of y − z in their error
estimate and shrink to that limit; every solve ends with `check_stability`, which raises
InstabilityError when the mode has spoilt y.
"""

import math

import pytest
import torch

import odegrad
import odegrad.solvers.parasitic as parasitic
import odegrad.solvers.reversible as reversible
from odegrad.errors import InstabilityError, MaxStepsExceededError
from odegrad.solvers import make_solver

F64 = torch.float64
T_END = 2.0


def _decay(k, method, **options):
    """y(2) of y' = −ky, y(0) = 1, or the error raised."""
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, T_END], dtype=F64)
    try:
        sol = odegrad.solve(lambda t, y: -k * y, y0, t, method=method, **options)
    except (InstabilityError, MaxStepsExceededError) as error:
        return None, error
    return sol, None


CASES = [
    ("reversible_dopri5", dict(rtol=1e-8, atol=1e-8)),
    ("reversible_dopri5", dict(rtol=1e-4, atol=1e-6)),
    ("reversible_rk4", dict(step_size=0.05)),
    ("reversible_rk4", dict(step_size=1e-3)),
    ("reversible_bosh3", dict(rtol=1e-6, atol=1e-8)),
    ("reversible_heun", dict(adaptive=False, step_size=0.01)),
    ("reversible_heun", dict(rtol=1e-6, atol=1e-8)),  # right-or-raise before the change too
    ("alf", dict(adaptive=False, step_size=0.01)),
    ("alf", dict(rtol=1e-6, atol=1e-8)),  # right-or-raise before the change too
]


@pytest.mark.parametrize("k", [10, 50])
@pytest.mark.parametrize("method, options", CASES)
def test_dissipative_decay_is_right_or_raises(method, options, k):
    sol, error = _decay(k, method, **options)
    if error is not None:
        return
    atol, rtol = options.get("atol", 1e-8), options.get("rtol", 1e-6)
    got = float(sol.ys[-1])
    assert abs(got - math.exp(-k * T_END)) <= 10 * (atol + rtol * 1.0), got


def test_fixed_steps_past_the_limit_raise_naming_h_rate_and_coupling():
    with pytest.raises(InstabilityError) as info:
        odegrad.solve(lambda t, y: -10.0 * y, torch.ones(1, dtype=F64),
                      torch.tensor([0.0, T_END], dtype=F64), method="reversible_rk4",
                      step_size=0.05)
    message = str(info.value)
    assert "h=0.05" in message
    assert "coupling=0.999" in message and "−ln(coupling) = 0.001" in message
    assert "a ≈ -10" in message and "h|a| ≈ 0.5" in message  # the rate, read off the growth
    assert "gradient='discrete'" in message and "'rk4'" in message  # the remedies
    assert "h ≲ 0.0001" in message


@pytest.mark.parametrize("method", ["reversible_heun", "alf"])
def test_marginally_stable_schemes_name_their_remedy(method):
    with pytest.raises(InstabilityError, match=r"h=0\.01.*a ≈ -(9\.\d|10).*gradient='discrete'"):
        odegrad.solve(lambda t, y: -10.0 * y, torch.ones(1, dtype=F64),
                      torch.tensor([0.0, T_END], dtype=F64), method=method, adaptive=False,
                      step_size=0.01)


def test_adaptive_steps_shrink_to_the_stability_limit_and_are_right():
    """coupling 0.9 allows h|a| ≲ 0.105: on y' = −10y that is ~200 steps, which the controller
    finds through the growth of y − z, and the answer is right to the tolerance."""
    sol = odegrad.solve(lambda t, y: -10.0 * y, torch.ones(1, dtype=F64),
                        torch.tensor([0.0, T_END], dtype=F64), method="reversible_dopri5",
                        coupling=0.9, gradient="reversible", rtol=1e-8, atol=1e-8)
    assert abs(float(sol.ys[-1]) - math.exp(-20.0)) <= 4e-8  # 2 (atol + rtol |y0|)
    steps = sol.stats["n_accepted"]
    assert 120 <= steps <= 400  # about the limit, 2·10/0.105 ≈ 190, not dopri5's 30
    assert sol.stats["n_rejected"] <= steps // 10


def _without_the_guard(monkeypatch):
    """The forward pass as it was: no parasitic term in the error, no check at the end."""
    monkeypatch.setattr(reversible, "_parasitic_error",
                        lambda state, y_next, *args: torch.zeros_like(y_next))
    monkeypatch.setattr(reversible.ReversibleSolver, "check_stability",
                        lambda self, *args, **kwargs: None)


@pytest.mark.parametrize("method", ["reversible_dopri5", "reversible_tsit5"])
@pytest.mark.parametrize("rtol", [1e-4, 1e-7])
def test_mild_problems_keep_their_solution_and_steps(mlp_field, monkeypatch, method, rtol):
    cases = [  # a tanh MLP over [0, 10]; y' = −y over [0, 2] (over [0, 10] it was wrong)
        (mlp_field, torch.randn(3, dtype=F64), torch.tensor([0.0, 1.0, 10.0], dtype=F64)),
        (lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 0.5, 2.0], dtype=F64)),
    ]
    runs = []
    for guarded in (True, False):
        if not guarded:
            _without_the_guard(monkeypatch)
        with torch.no_grad():
            runs.append([odegrad.solve(f, x0, t, method=method, rtol=rtol, atol=rtol / 100)
                         for f, x0, t in cases])
    for (f, x0, t), now, before in zip(cases, *runs):
        if f is mlp_field:
            assert now.stats["n_accepted"] == before.stats["n_accepted"]
        else:  # y' = −y at rtol 1e-7: 16 steps before, 18 now
            assert now.stats["n_accepted"] <= 1.25 * before.stats["n_accepted"]
        with torch.no_grad():
            exact = odegrad.solve(f, x0, t, method="dopri5", rtol=1e-12, atol=1e-14).ys
        error_now = float((now.ys - exact).abs().max())
        error_before = float((before.ys - exact).abs().max())
        assert error_now <= 1.5 * error_before + rtol * float(exact.abs().max()) / 10


@pytest.mark.parametrize("method", ["reversible_dopri5", "reversible_bosh3"])
def test_float32_round_off_is_not_taken_for_growth(method):
    """In float32 at rtol 1e-6 the round-off of y − z is about a tenth of a tolerance per step;
    no step size removes it, so it must not drive the steps down to an underflow."""
    y0 = torch.ones(3, dtype=torch.float32)
    sol = odegrad.solve(lambda t, y: -y, y0, torch.tensor([0.0, T_END]), method=method,
                        rtol=1e-6, atol=1e-8)
    assert sol.stats["n_accepted"] < 200
    assert float((sol.ys[-1] - math.exp(-T_END)).abs().max()) < 1e-5


def test_non_dissipative_coarse_steps_do_not_raise():
    """A rotation with coarse reversible Heun steps over a long interval: y − z accumulates
    truncation errors without any dissipation, so nothing is raised and the error is the
    scheme's own (that of plain Heun)."""
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)

    def field(t, y):
        return (1 + 0.5 * torch.cos(t)) * (rot @ y)

    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 20.0], dtype=F64)
    exact = torch.linalg.matrix_exp(rot * (20.0 + 0.5 * math.sin(20.0))) @ y0
    for method, plain in [("reversible_heun", "heun"), ("alf", "midpoint"),
                          ("reversible_rk4", "rk4")]:
        ys = odegrad.odeint(field, y0, t, method=method, adaptive=False, step_size=0.1)
        base = odegrad.odeint(field, y0, t, method=plain, adaptive=False, step_size=0.1)
        assert float((ys[-1] - exact).norm()) <= 2 * float((base[-1] - exact).norm())


def test_mildly_dissipative_fixed_steps_do_not_raise():
    """y' = −y over [0, 2] with rk4 at h = 0.2: the parasitic mode grows (h|a| = 0.2 > 0.001)
    but only by e^2 in all, so y's error stays that of rk4 and nothing is raised."""
    sol, error = _decay(1.0, "reversible_rk4", step_size=0.2)
    assert error is None
    plain = odegrad.odeint(lambda t, y: -y, torch.ones(1, dtype=F64),
                           torch.tensor([0.0, T_END], dtype=F64), method="rk4", step_size=0.2)
    exact = math.exp(-2.0)
    assert abs(float(sol.ys[-1]) - exact) <= 3 * abs(float(plain[-1]) - exact)


@pytest.mark.parametrize("n0, n1", [
    (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (5.0, 5.001),
    (5.0, 4.999), (10.0, 9.995), (100.0, 99.99), (0.5, 0.4997), (1e-3, 1.0), (3.0, math.inf),
])
@pytest.mark.parametrize("coupling", [0.999, 0.5, 1.0])
def test_device_ratio_matches_the_host_ratio(n0, n1, coupling):
    """Off the CPU the parasitic error ratio is computed in 0-dim tensor ops (no host sync)."""
    host = parasitic._parasitic_ratio(n0, n1, coupling)
    host_factor = host / n1 if host > 0.0 else 0.0
    ratio = parasitic._parasitic_ratio_tensor(
        torch.tensor(n0, dtype=F64), torch.tensor(n1, dtype=F64), coupling
    )
    device_factor = float(torch.nan_to_num(ratio / n1, 0.0, 0.0, 0.0))
    assert device_factor == pytest.approx(host_factor, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-6, 1e-4, 1e-2])
def test_device_error_matches_the_host_error(scale):
    y = torch.randn(4, 3, dtype=F64)
    state = torch.stack([y, y + scale * torch.randn(4, 3, dtype=F64)])
    y_next = 0.9 * y
    for grow in (0.5, 0.999, 1.0, 1.3, 30.0):
        z_next = y_next - grow * (state[0] - state[1]) + 1e-9 * torch.randn(4, 3, dtype=F64)
        args = (state, y_next, z_next, 1e-6, 1e-8, 0.999)
        host = parasitic._parasitic_error(*args, on_host=True)
        device = parasitic._parasitic_error(*args, on_host=False)
        assert torch.allclose(device, host, rtol=1e-10, atol=0.0)


def test_growth_ratio_regimes():
    """d may grow freely while small; past GROWTH_ALLOWANCE tolerances a growth at h|a| well
    above −ln λ is rejected; decay near the limit restrains the controller without rejecting."""
    lam = 0.999
    assert parasitic._parasitic_ratio(0.0, 0.5, lam) == 0.0  # d_0 = 0: the first step
    assert parasitic._parasitic_ratio(0.1, 0.2, lam) < 0.1  # small d doubling
    assert parasitic._parasitic_ratio(8.0, 8.0 * math.exp(0.1) * lam, lam) > 1.0
    near = parasitic._parasitic_ratio(8.0, 8.0 * math.exp(0.0009) * lam, lam)
    assert 0.5 < near <= 0.9  # decaying slowly: close to the limit, not rejected
    assert parasitic._parasitic_ratio(8.0, 8.0 * lam, lam) == 0.0  # no dissipation at all


def test_stability_hint_for_the_max_steps_error():
    hint = make_solver("reversible_dopri5").stability_hint(1.2e-4)
    assert "coupling=0.999" in hint and "0.00012" in hint and "'dopri5'" in hint
    assert "grows like e^{|a|t}" in make_solver("reversible_heun").stability_hint(1e-5)
    assert "eta" in make_solver("alf").stability_hint(1e-5)
