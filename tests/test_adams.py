"""Adams–Bashforth and Adams–Bashforth–Moulton (solvers/adams.py): orders on y' = −y, agreement
with torchdiffeq 0.2.5's explicit_adams / implicit_adams where its scheme is well defined,
gradients against direct autograd and finite differences, and the refusals."""

import math
import warnings

import numpy as np
import pytest
import torch

import odegrad
import odegrad.compat.torchdiffeq as shim
from odegrad.solvers import make_solver
from odegrad.solvers.adams import lagrange_integrals, uniform_coefficients

DT = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=DT)


def decay(t, y):
    return -y


def forced(t, y):
    return -y + torch.sin(t)


def forced_exact(y0: torch.Tensor, t: float) -> torch.Tensor:
    """y' = −y + sin t: y = (y0 + 1/2) e^{−t} + (sin t − cos t)/2."""
    return (y0 + 0.5) * math.exp(-t) + (math.sin(t) - math.cos(t)) / 2


@pytest.mark.parametrize("method, max_order", [
    ("adams_bashforth", 3), ("adams_bashforth", 4), ("adams_bashforth", 6),
    ("adams_bashforth_moulton", 4), ("adams_bashforth_moulton", 5),
    ("adams_bashforth_moulton", 8),
])
def test_order_on_decay(method, max_order):
    """Slope of log error against log h within 0.3 of the claimed order (the ramp's AB3 step
    bounds it at 4, 5 with the corrector). The corrector iterates to convergence (max_iters=30):
    a corrector that stops early drops its oldest value and the order does not ramp up."""
    claimed = make_solver(method, max_order=max_order).order
    corrector = method == "adams_bashforth_moulton"
    steps = [1 / 20, 1 / 40, 1 / 80] if corrector else [1 / 80, 1 / 160, 1 / 320]
    extra = {"max_iters": 30} if corrector else {}
    errors = []
    for h in steps:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the corrector converged at every step
            ys = odegrad.odeint(decay, torch.ones(1, dtype=DT), T01, method=method,
                                step_size=h, max_order=max_order, rtol=1e-13, atol=1e-15,
                                **extra)
        errors.append(abs(float(ys[-1, 0]) - math.exp(-1)))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - claimed) < 0.3, (slope, claimed, errors)


def test_uniform_coefficients_are_the_classical_ones():
    assert uniform_coefficients(4, False) == pytest.approx([55 / 24, -59 / 24, 37 / 24, -9 / 24])
    assert uniform_coefficients(4, True) == pytest.approx([9 / 24, 19 / 24, -5 / 24, 1 / 24])
    # the quadrature formula on the same nodes, in floats and as tensors
    nodes = tuple(-float(j) for j in range(11))
    want = np.array(uniform_coefficients(11, False))
    assert np.abs(lagrange_integrals(nodes, 1.0) - want).max() < 1e-10
    tensor = lagrange_integrals(torch.tensor(nodes, dtype=DT), 1.0)
    assert np.abs(tensor.numpy() - want).max() < 1e-10


def _both(method, y0, t, options, **kwargs):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = shim.odeint(forced, y0, t, method=method, options=options, **kwargs)
        theirs = torchdiffeq.odeint(forced, y0, t, method=method, options=options, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
@pytest.mark.parametrize("options", [dict(step_size=0.05), dict(step_size=0.05, max_order=6),
                                     dict(), dict(step_size=0.05, max_order=3)])
def test_equal_to_torchdiffeq_on_equal_steps(method, options):
    """Equal steps (a step_size dividing the interval, or equally spaced outputs): the same
    scheme, so the same numbers to round-off (explicit_adams' AB11 at h = 0.05 is unstable,
    parasitic root 1.9, and amplifies round-off to 3e-13); max_order=3 is torchdiffeq's RK4
    fallback."""
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    t = torch.linspace(0, 1, 7, dtype=DT)
    ours, theirs = _both(method, y0, t, options)
    assert float((ours - theirs).abs().max()) < 1e-12


def test_uneven_last_step_is_exact_where_torchdiffeq_is_not():
    """step_size=0.03 on [0, 1] clips the last step to 0.01: torchdiffeq keeps the equal-step
    coefficients there (error 2.4e-5 with implicit_adams), odegrad takes the coefficients of the
    actual nodes (4e-10): both against the closed form."""
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    ours, theirs = _both("implicit_adams", y0, T01, dict(step_size=0.03, max_order=5))
    exact = forced_exact(y0, 1.0)
    ours_error = float((ours[-1] - exact).abs().max())
    theirs_error = float((theirs[-1] - exact).abs().max())
    assert ours_error < 1e-8 < 1e-6 < theirs_error


def test_explicit_adams_at_step_001_is_the_unstable_ab11():
    """The issue's 0.7354 for y' = −y at t = 1, step 0.01: torchdiffeq's explicit_adams ramps up
    to AB11, whose parasitic root at hλ = −0.01 has modulus 1.26; the scheme itself gives
    0.735429186 in 50-digit arithmetic, so torchdiffeq computes its scheme right. The shim gives
    the same number (round-off amplified ~1e9 by the instability: agreement to 1e-7); AB4
    (odegrad's default max_order) is accurate."""
    y0 = torch.ones(1, dtype=DT)
    ys = shim.odeint(decay, y0, T01, method="explicit_adams", options=dict(step_size=0.01))
    assert abs(float(ys[-1, 0]) - 0.73542918589) < 1e-7
    ys = odegrad.odeint(decay, y0, T01, method="explicit_adams", step_size=0.01)
    assert abs(float(ys[-1, 0]) - math.exp(-1)) < 1e-9


def _field():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=DT))

    def f(t, y):
        return torch.tanh(y @ w.T) * torch.cos(t) - 0.2 * y

    return f, w


@pytest.mark.parametrize("method", ["adams_bashforth", "adams_bashforth_moulton"])
def test_discrete_and_time_gradients_equal_direct(method):
    """Uneven output times (coefficients from the nodes), gradients w.r.t. y0, t and w: discrete
    (the step replayed with its carry of past f values and times) equals direct to 1e-10, and
    direct's t-gradient equals central finite differences."""
    f, w = _field()
    t = torch.tensor([0.0, 0.23, 0.61, 0.7, 1.1], dtype=DT)

    def loss(gradient, y0, t, **extra):
        ys = odegrad.odeint(f, y0, t, method=method, gradient=gradient, params=[w],
                            rtol=1e-10, atol=1e-12, **extra)
        return ys[1:].pow(2).sum()

    y0 = torch.tensor([[0.3, -0.7]], dtype=DT, requires_grad=True)
    t.requires_grad_()
    want = torch.autograd.grad(loss("direct", y0, t), [y0, t, w])
    got = torch.autograd.grad(loss("discrete", y0, t), [y0, t, w])
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) < 1e-10 * max(1.0, float(b.abs().max()))
    eps = 1e-6
    with torch.no_grad():
        for i in range(len(t)):
            up, down = t.detach().clone(), t.detach().clone()
            up[i] += eps
            down[i] -= eps
            fd = (loss("direct", y0, up) - loss("direct", y0, down)) / (2 * eps)
            assert abs(float(fd) - float(want[1][i])) < 1e-6, i


@pytest.mark.parametrize("method", ["adams_bashforth", "adams_bashforth_moulton"])
def test_backsolve_converges_to_direct_and_reversible_refuses(method):
    f, w = _field()
    t = torch.linspace(0, 1, 3, dtype=DT)
    y0 = torch.tensor([[0.3, -0.7]], dtype=DT, requires_grad=True)

    def grads(gradient, h):
        ys = odegrad.odeint(f, y0, t, method=method, gradient=gradient, params=[w],
                            step_size=h, rtol=1e-10, atol=1e-12)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys[-1].sum(), [y0, w])])

    exact = grads("direct", 1 / 400)
    coarse = float((grads("backsolve", 1 / 10) - exact).abs().max())
    fine = float((grads("backsolve", 1 / 20) - exact).abs().max())
    assert fine < coarse / 8 and fine < 1e-4, (coarse, fine)
    with pytest.raises(odegrad.UnsupportedCombinationError, match="reversible"):
        odegrad.odeint(f, y0, t, method=method, gradient="reversible", params=[w],
                       step_size=0.1)


def test_refusals():
    y0 = torch.ones(1, dtype=DT)
    with pytest.raises(odegrad.InvalidInputError, match="max_order"):
        odegrad.odeint(decay, y0, T01, method="adams_bashforth", step_size=0.1, max_order=2)
    with pytest.raises(odegrad.InvalidInputError, match="max_order"):
        odegrad.odeint(decay, y0, T01, method="adams_bashforth_moulton", step_size=0.1,
                       max_order=13)
    with pytest.raises(odegrad.InvalidInputError, match="max_iters"):
        odegrad.odeint(decay, y0, T01, method="adams_bashforth_moulton", step_size=0.1,
                       max_iters=0)
    with pytest.raises(odegrad.InvalidInputError, match="perturb"):
        odegrad.odeint(decay, y0, T01, method="adams_bashforth", step_size=0.1, perturb=1)
    with pytest.raises(TypeError, match="implicit"):
        shim.odeint(decay, y0, T01, method="explicit_adams",
                    options=dict(step_size=0.1, implicit=True))
    with pytest.raises(AssertionError, match="max_order"):
        shim.odeint(decay, y0, T01, method="implicit_adams", options=dict(max_order=13))
    with pytest.raises(odegrad.InvalidInputError, match="adjoint_options"):
        shim.odeint_adjoint(decay, y0, T01, method="implicit_adams", adjoint_params=(),
                            options=dict(step_size=0.1),
                            adjoint_options=dict(step_size=0.1, max_order=5))


def test_corrector_warns_when_it_does_not_converge():
    """implicit_adams with max_iters=1 at tight tolerances: torchdiffeq's warning, and the
    oldest past value dropped (so the order does not ramp up): same numbers as torchdiffeq."""
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    t = torch.linspace(0, 1, 11, dtype=DT)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        shim.odeint(forced, y0, t, method="implicit_adams", options=dict(max_iters=1))
    ours, theirs = _both("implicit_adams", y0, t, dict(max_iters=1))
    assert float((ours - theirs).abs().max()) < 1e-13


class _Jump:
    """f = −y before t = 0.5 and −3y from it on (a jump in t at a grid point), recording the
    times it is called at."""

    def __init__(self):
        self.times = []

    def __call__(self, t, y):
        self.times.append(float(t.detach()))
        return -y * (1 + 2 * (t >= 0.5).to(y))


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_perturb_keeps_the_history_and_equals_torchdiffeq(method, adjoint):
    """perturb=True: f evaluated one ulp inside every step at its ends (never at a grid point),
    the Adams history kept across the steps, as torchdiffeq's fixed_adams: the same values and
    (odeint_adjoint) gradients to round-off, and the same number of f evaluations."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = torch.linspace(0, 1, 3, dtype=DT)
    results = []
    for library in (shim, torchdiffeq):
        f = _Jump()
        y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
        odeint = library.odeint
        if adjoint:
            def odeint(*args, library=library, **kwargs):
                return library.odeint_adjoint(*args, adjoint_params=(), **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys = odeint(f, y0, t, method=method, options=dict(step_size=0.05, perturb=True))
            forward = list(f.times)
            f.times.clear()
            ys.sum().backward()
        # never at the output times nor at the jump (a wrong side there would move y by O(h))
        assert not {0.0, 0.5, 1.0} & set(forward + f.times)
        assert all(0.0 < v < 1.0 for v in forward + f.times)
        results.append((ys.detach(), y0.grad, len(forward), len(f.times)))
    (ours, g_ours, n_ours, b_ours), (theirs, g_theirs, n_theirs, b_theirs) = results
    assert float((ours - theirs).abs().max()) < 1e-10
    assert float((g_ours - g_theirs).abs().max()) < 1e-10
    assert b_ours == b_theirs and n_ours == n_theirs + (1 if adjoint else 0)  # + odegrad's probe


@pytest.mark.parametrize("method", ["adams_bashforth", "adams_bashforth_moulton"])
def test_perturb_native_one_solve_and_gradients(method):
    """odegrad's option perturb: one solve (the history is not restarted: the same f
    evaluations as without perturb), f never at a step end, results within O(ulp) of the
    unperturbed solve for a smooth f, and discrete's gradient equal to direct's."""
    f, w = _field()
    t = torch.linspace(0, 1, 3, dtype=DT)
    y0 = torch.tensor([[0.3, -0.7]], dtype=DT, requires_grad=True)
    times = []

    def recorded(s, y):
        times.append(float(s))
        return f(s, y)

    sols = [odegrad.solve(recorded, y0, t, method=method, step_size=0.1, perturb=perturb,
                          params=[w]) for perturb in (False, True)]
    n_plain = sols[0].stats["nfe_forward"]
    assert sols[1].stats["nfe_forward"] == n_plain
    perturbed = times[n_plain:]
    assert {0.0, 0.5} <= set(times[:n_plain]) and not {0.0, 0.5, 1.0} & set(perturbed)
    assert all(0.0 < v < 1.0 for v in perturbed)
    assert float((sols[0].ys - sols[1].ys).abs().max()) < 1e-12

    def grads(gradient):
        ys = odegrad.odeint(f, y0, t, method=method, gradient=gradient, params=[w],
                            step_size=0.1, perturb=True)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys[-1].sum(), [y0, w])])

    assert float((grads("discrete") - grads("direct")).abs().max()) < 1e-10
