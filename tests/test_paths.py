"""Control paths: knots reproduced, continuity, derivatives, NaN filling, torchcde's numbers."""

import pytest
import torch
import torchcde

from odegrad import InvalidInputError, paths

DT = torch.float64
KINDS = list(paths.KINDS)


def observations(batch=(3,), length=8, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.2 + torch.rand(length, generator=g, dtype=DT), 0)
    return t, torch.randn(*batch, length, channels, generator=g, dtype=DT)


def with_missing(x):
    x = x.clone()
    x[0, 2, 1] = x[0, 3, 1] = float("nan")  # an inner gap
    x[1, 0, 0] = float("nan")  # missing at the start
    x[2, -2:, 1] = float("nan")  # a shorter series, padded at the end
    return x


def make(kind, t, x):
    return paths.KINDS[kind](t, x)


@pytest.mark.parametrize("kind", KINDS)
def test_reproduces_the_observations_at_the_knots(kind):
    t, x = observations()
    x = with_missing(x)
    X = make(kind, t, x)
    values = X.evaluate(t)
    if kind == "rectilinear":  # time prepended as channel 0
        assert torch.allclose(values[..., 0], t.expand(3, -1), atol=1e-13)
        values = values[..., 1:]
    observed = ~torch.isnan(x)
    assert torch.allclose(values[observed], x[observed], atol=1e-12)


def one_sided(X, k, order):
    """The order-th derivative at knot t_k from piece k − 1 and from piece k."""
    tk = X.knots[k]
    if order == 1:
        return X.derivative_on_piece(tk, k - 1), X.derivative_on_piece(tk, k)
    h = tk - X.knots[k - 1]  # second derivative, from the stored coefficients
    left = X.two_c[..., k - 1, :] + 2 * X.three_d[..., k - 1, :] * h
    return left, X.two_c[..., k, :]


@pytest.mark.parametrize("kind", KINDS)
def test_continuity(kind):
    t, x = observations()
    X = make(kind, t, x)
    eps = 1e-7
    for k in range(1, len(X.knots) - 1):  # C0 for every kind
        jump = X.evaluate(X.knots[k] + eps) - X.evaluate(X.knots[k] - eps)
        assert jump.abs().max() < 1e-5
    smoothness = {"linear": 0, "rectilinear": 0, "hermite_cubic": 1, "natural_cubic": 2}[kind]
    for order in (1, 2):
        jumps = [(a - b).abs().max() for k in range(1, len(X.knots) - 1)
                 for a, b in [one_sided(X, k, order)]] if order <= max(smoothness, 1) else []
        if order <= smoothness:
            assert max(jumps) < 1e-11
        elif jumps:
            assert max(jumps) > 1e-3  # linear: the derivative does jump (the check can fail)


@pytest.mark.parametrize("kind", KINDS)
def test_derivative_matches_finite_differences(kind):
    t, x = observations()
    X = make(kind, t, with_missing(x))
    knots = X.knots
    s = (knots[:-1] + 0.37 * (knots[1:] - knots[:-1]))  # inside every piece
    h = 1e-6
    fd = (X.evaluate(s + h) - X.evaluate(s - h)) / (2 * h)
    assert torch.allclose(X.derivative(s), fd, atol=1e-7)


def test_evaluation_shapes_and_properties():
    t, x = observations(batch=(2, 3))
    X = paths.hermite_cubic(t, x)
    assert X.evaluate(0.5).shape == (2, 3, 2)
    assert X.derivative(torch.tensor(0.5, dtype=DT)).shape == (2, 3, 2)
    assert X.evaluate(t[:4]).shape == (2, 3, 4, 2)
    assert torch.equal(X.knots, t) and X.interval[0] == t[0] and X.interval[1] == t[-1]
    assert paths.linear(None, x).knots.tolist() == list(range(8))
    assert len(paths.rectilinear(t, x).knots) == 2 * len(t) - 1


def test_missing_values_follow_the_documented_rules():
    t = torch.tensor([0.0, 1.0, 3.0, 4.0, 6.0], dtype=DT)
    nan = float("nan")
    x = torch.tensor([[nan], [2.0], [nan], [8.0], [nan]], dtype=DT)
    lin = paths.linear(t, x).evaluate(t)[:, 0]
    # before the first observation: the first; between: on the line; after the last: the last
    assert lin.tolist() == pytest.approx([2.0, 2.0, 2.0 + 6.0 * 2 / 3, 8.0, 8.0], abs=1e-14)
    rect = paths.rectilinear(t, x).evaluate(t)[:, 1]
    assert rect.tolist() == pytest.approx([2.0, 2.0, 2.0, 8.0, 8.0], abs=1e-14)  # forward fill
    none = paths.hermite_cubic(t, torch.full((5, 1), nan, dtype=DT))
    assert none.evaluate(t).abs().max() == 0  # a channel never observed is 0


def test_natural_spline_runs_through_the_observations_only():
    t, x = observations(batch=(), length=9, channels=1)
    x = x.clone()
    x[3, 0] = x[5, 0] = float("nan")
    keep = ~torch.isnan(x[:, 0])
    full = paths.natural_cubic(t, x)
    subset = paths.natural_cubic(t[keep], x[keep])
    s = torch.linspace(float(t[0]), float(t[-1]), 41, dtype=DT)
    assert torch.allclose(full.evaluate(s), subset.evaluate(s), atol=1e-12)
    assert torch.allclose(full.derivative(s), subset.derivative(s), atol=1e-11)


def test_per_series_lengths_hold_the_last_value():
    t, x = observations()
    x = with_missing(x)
    for kind in ("linear", "rectilinear"):
        X = make(kind, t, x)
        after = torch.linspace(float(t[-3]) + 1e-9, float(t[-1]), 5, dtype=DT)
        assert X.derivative(after)[2, :, -1].abs().max() == 0


def torchcde_path(kind, t, x):
    if kind == "linear":
        return torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, t), t)
    if kind == "hermite_cubic":
        coeffs = torchcde.hermite_cubic_coefficients_with_backward_differences(x, t)
    else:
        coeffs = torchcde.natural_cubic_coeffs(x, t)
    return torchcde.CubicSpline(coeffs, t)


@pytest.mark.parametrize("kind", ["linear", "hermite_cubic", "natural_cubic"])
@pytest.mark.parametrize("missing", [False, True])
def test_matches_torchcde(kind, missing):
    t, x = observations()
    if missing:
        x = with_missing(x)
    ours, theirs = make(kind, t, x), torchcde_path(kind, t, x)
    if kind != "linear":
        coeffs = torch.cat([theirs._a, theirs._b, theirs._two_c, theirs._three_d], -1)
        assert (ours.coefficients() - coeffs).abs().max() < 1e-12
    s = torch.linspace(float(t[0]) - 0.5, float(t[-1]) + 0.5, 57, dtype=DT)
    s = torch.cat([s, t])  # the knots too (the same side convention)
    for name in ("evaluate", "derivative"):
        expected = torch.stack([getattr(theirs, name)(v) for v in s], dim=-2)
        assert (getattr(ours, name)(s) - expected).abs().max() < 1e-12


def test_rectilinear_matches_torchcde_reparametrised():
    t, x = observations()
    x = with_missing(x)
    ours = paths.rectilinear(t, x)
    data = torch.cat([t.view(-1, 1).expand(3, -1, 1), x], dim=-1)
    with pytest.warns(UserWarning):
        theirs = torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(
            data, rectilinear=0))
    # our knot j (t_k or the midpoint) is torchcde's knot j; linear in between
    u = torch.linspace(0, len(ours.knots) - 1, 61, dtype=DT)
    j = u.floor().clamp(max=len(ours.knots) - 2).long()
    s = ours.knots[j] + (u - j) * (ours.knots[j + 1] - ours.knots[j])
    expected = torch.stack([theirs.evaluate(v) for v in u], dim=-2)
    assert (ours.evaluate(s) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_the_data(kind):
    t, x = observations(batch=(1,), length=5, channels=1)
    x = x.clone().requires_grad_()
    s = torch.tensor([0.3, 1.1, 2.0], dtype=DT) + t[0]
    assert torch.autograd.gradcheck(
        lambda data: make(kind, t, data).derivative(s).sum(-1) + make(kind, t, data).evaluate(s)
        .sum(-1), (x,))


def test_invalid_observations_raise():
    t, x = observations()
    with pytest.raises(InvalidInputError, match="strictly increasing"):
        paths.linear(t.flip(0), x)
    with pytest.raises(InvalidInputError, match="one time per observation"):
        paths.linear(t[:-1], x)
    with pytest.raises(InvalidInputError, match="floating point"):
        paths.linear(t, x.long())
    with pytest.raises(InvalidInputError, match="at least 2"):
        paths.linear(t[:1], x[:, :1])
    with pytest.raises(InvalidInputError, match="time channel"):
        paths.rectilinear(t, with_missing(x), time_channel=1)
