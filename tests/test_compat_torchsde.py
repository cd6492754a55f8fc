"""odegrad.compat.torchsde against torchsde 0.2.6 itself, on the same Brownian path.

Both solve with the same increments: a torchsde.BrownianInterval is handed to the real
torchsde and to the shim (which queries it through its adapter, brownian.py `_Foreign`), with
dt a power of two so that both step grids are exact and identical. Where the scheme is the
same (Euler–Maruyama, Milstein, Euler–Heun, Heun, midpoint, reversible Heun, srk) the outputs and
their gradients must agree to round-off; logqp, names and the specialised sde methods too.
"""

from __future__ import annotations

import math

import pytest
import torch

import odegrad.compat.torchsde as shim
from odegrad.errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError

torchsde = pytest.importorskip("torchsde")

DT = 2.0**-5
TS = [0.0, 0.25, 0.5, 1.0]
BATCH, D, M = 3, 2, 2


class Diagonal(torch.nn.Module):
    """Diagonal noise, g_i depending on y_i alone (so Milstein's derivative terms agree)."""

    noise_type = "diagonal"

    def __init__(self, sde_type: str):
        super().__init__()
        self.sde_type = sde_type
        self.a = torch.nn.Parameter(torch.tensor([0.4, -0.7], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([0.3, 0.2], dtype=torch.float64))

    def f(self, t, y):
        return self.a * y + torch.cos(t) * 0.1

    def g(self, t, y):
        return self.b * torch.sin(y) + 0.2

    def h(self, t, y):
        return -y


class General(torch.nn.Module):
    noise_type = "general"

    def __init__(self, sde_type: str):
        super().__init__()
        self.sde_type = sde_type
        self.weight = torch.nn.Parameter(0.3 * torch.randn(D, D * M, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(3)))

    def f(self, t, y):
        return -y + torch.tanh(y) * 0.5

    def g(self, t, y):
        return (0.2 * torch.tanh(y @ self.weight) + 0.3).view(y.shape[0], D, M)

    def h(self, t, y):
        return torch.zeros_like(y)


def _y0():
    return torch.linspace(0.1, 0.9, BATCH * D, dtype=torch.float64).view(BATCH, D)


def _bm(size, entropy=11, levy_area_approximation="none"):
    return torchsde.BrownianInterval(TS[0], TS[-1], size, dtype=torch.float64, entropy=entropy,
                                     levy_area_approximation=levy_area_approximation)


def _both(sde, method, size, **kwargs):
    """(real torchsde, shim) outputs of sdeint on one shared Brownian path (with the
    space-time Lévy area, which srk reads, for srk and torchsde's Itô default)."""
    levy = "space-time" if method in ("srk", None) and sde.sde_type == "ito" else "none"
    bm = _bm(size, levy_area_approximation=levy)
    real = torchsde.sdeint(sde, _y0(), TS, bm, method=method, dt=DT, **kwargs)
    mine = shim.sdeint(sde, _y0(), TS, bm, method=method, dt=DT, **kwargs)
    return real, mine


@pytest.mark.parametrize("sde_type, method, options", [
    ("ito", "euler", None),
    ("ito", "milstein", None),
    ("ito", "milstein", {"grad_free": True}),
    ("stratonovich", "milstein", None),
    ("stratonovich", "euler_heun", None),
    ("stratonovich", "heun", None),
    ("stratonovich", "midpoint", None),
    ("stratonovich", "reversible_heun", None),
])
def test_same_path_same_result_diagonal(sde_type, method, options):
    real, mine = _both(Diagonal(sde_type), method, (BATCH, D), options=options)
    assert mine.shape == real.shape == (len(TS), BATCH, D)
    torch.testing.assert_close(mine, real, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_type, method", [
    ("ito", "euler"), ("stratonovich", "midpoint"), ("stratonovich", "heun"),
    ("stratonovich", "euler_heun"), ("stratonovich", "reversible_heun")])
def test_same_path_same_result_general(sde_type, method):
    real, mine = _both(General(sde_type), method, (BATCH, M))
    torch.testing.assert_close(mine, real, rtol=1e-12, atol=1e-12)


class Scalar(Diagonal):
    noise_type = "scalar"

    def g(self, t, y):
        return (self.b * torch.sin(y) + 0.2)[..., None]


class Additive(Diagonal):
    noise_type = "additive"

    def g(self, t, y):
        return (self.b * torch.cos(t) + 0.2).expand(y.shape[0], D)[..., None].expand(
            y.shape[0], D, M).contiguous() * torch.tensor([1.0, -0.5], dtype=torch.float64)


@pytest.mark.parametrize("sde_cls, size", [(Diagonal, (BATCH, D)), (Scalar, (BATCH, 1)),
                                           (Additive, (BATCH, M))])
@pytest.mark.parametrize("method", ["srk", None])
def test_srk_same_path_same_result(sde_cls, size, method):
    """Rößler's SRI2 / SRA1 (torchsde's "srk", its Itô default) with the same ΔW and U."""
    real, mine = _both(sde_cls("ito"), method, size)
    torch.testing.assert_close(mine, real, rtol=1e-10, atol=1e-10)


def test_srk_gradients_match_torchsde():
    sde = Diagonal("ito")
    bm = _bm((BATCH, D), levy_area_approximation="space-time")
    _, real = _gradients(lambda y0: torchsde.sdeint(sde, y0, TS, bm, method="srk", dt=DT),
                         sde, _y0())
    _, mine = _gradients(lambda y0: shim.sdeint(sde, y0, TS, bm, method="srk", dt=DT),
                         sde, _y0())
    torch.testing.assert_close(mine, real, rtol=1e-10, atol=1e-10)


def test_srk_refuses_a_brownian_motion_without_levy_area():
    with pytest.raises(InvalidInputError, match="Lévy area"):
        shim.sdeint(Diagonal("ito"), _y0(), TS, _bm((BATCH, D)), method="srk", dt=DT)
    with pytest.raises(UnsupportedCombinationError, match="'euler'"):
        shim.sdeint(General("ito"), _y0(), TS, method="srk", dt=DT)


def test_default_stratonovich_method_is_midpoint():
    real, mine = _both(Diagonal("stratonovich"), None, (BATCH, D))
    torch.testing.assert_close(mine, real, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_cls, size", [(Diagonal, (BATCH, D + 1)), (General, (BATCH, M))])
def test_logqp_matches_torchsde(sde_cls, size):
    (real_ys, real_kl), (ys, kl) = _both(sde_cls("ito"), "euler", size, logqp=True)
    assert kl.shape == (len(TS) - 1, BATCH)
    torch.testing.assert_close(ys, real_ys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, real_kl, rtol=1e-12, atol=1e-12)


def test_logqp_is_the_path_integral_of_the_drift_difference():
    """With constant g = s and h = 0, f = a y: the increments are Σ_n ½ |a y_n / s|² h (Euler),
    recomputed here from the returned path on a grid that has every step as an output."""
    class Linear(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -0.5 * y

        def g(self, t, y):
            return torch.full_like(y, 0.4)

        def h(self, t, y):
            return torch.zeros_like(y)

    ts = torch.arange(0, 17, dtype=torch.float64) * DT
    bm = torchsde.BrownianInterval(0.0, float(ts[-1]), (BATCH, D + 1), dtype=torch.float64,
                                   entropy=5)
    ys, kl = shim.sdeint(Linear(), _y0(), ts, bm, method="euler", dt=DT, logqp=True)
    expected = 0.5 * ((-0.5 * ys[:-1] / 0.4) ** 2).sum(-1) * DT
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-14)


def test_names_rename_the_methods():
    class Renamed(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.inner = Diagonal("stratonovich")

        def drift(self, t, y):
            return self.inner.f(t, y)

        def noise(self, t, y):
            return self.inner.g(t, y)

        def prior(self, t, y):
            return self.inner.h(t, y)

    names = {"drift": "drift", "diffusion": "noise", "prior_drift": "prior"}
    renamed = Renamed()
    bm = _bm((BATCH, D + 1))
    real = torchsde.sdeint(renamed, _y0(), TS, bm, method="midpoint", dt=DT, names=names,
                           logqp=True)
    mine = shim.sdeint(renamed, _y0(), TS, bm, method="midpoint", dt=DT, names=names,
                       logqp=True)
    for a, b in zip(mine, real):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = shim.sdeint(renamed.inner, _y0(), TS, bm, method="midpoint", dt=DT, logqp=True)
    torch.testing.assert_close(mine[0], plain[0], rtol=0, atol=0)


def test_specialised_methods_give_the_same_solution():
    """f_and_g, g_prod and f_and_g_prod serve as f and g (g rebuilt exactly from g_prod)."""
    base = General("stratonovich")

    class FAndG(torch.nn.Module):
        noise_type, sde_type = "general", "stratonovich"

        def f_and_g(self, t, y):
            return base.f(t, y), base.g(t, y)

    class GProd(torch.nn.Module):
        noise_type, sde_type = "general", "stratonovich"

        def f(self, t, y):
            return base.f(t, y)

        def g_prod(self, t, y, v):
            return torch.bmm(base.g(t, y), v.unsqueeze(-1)).squeeze(-1)

    class FAndGProd(torch.nn.Module):
        noise_type, sde_type = "general", "stratonovich"

        def f_and_g_prod(self, t, y, v):
            return base.f(t, y), torch.bmm(base.g(t, y), v.unsqueeze(-1)).squeeze(-1)

    bm = _bm((BATCH, M))
    reference = torchsde.sdeint(base, _y0(), TS, bm, method="heun", dt=DT)
    for sde in (FAndG(), GProd(), FAndGProd()):
        out = shim.sdeint(sde, _y0(), TS, bm, method="heun", dt=DT)
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def _gradients(fn, sde, y0):
    y0 = y0.clone().requires_grad_()
    ys = fn(y0)
    weights = torch.linspace(-1, 1, ys.numel(), dtype=ys.dtype).view_as(ys)
    (ys * weights).sum().backward()
    grads = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in sde.parameters()])
    sde.zero_grad()
    return ys.detach(), grads


@pytest.mark.parametrize("sde_type, method", [("ito", "euler"), ("stratonovich", "heun")])
def test_sdeint_gradients_match_torchsde(sde_type, method):
    sde = Diagonal(sde_type)
    bm = _bm((BATCH, D))
    _, real = _gradients(lambda y0: torchsde.sdeint(sde, y0, TS, bm, method=method, dt=DT),
                         sde, _y0())
    _, mine = _gradients(lambda y0: shim.sdeint(sde, y0, TS, bm, method=method, dt=DT),
                         sde, _y0())
    torch.testing.assert_close(mine, real, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("sde_cls, size", [(Diagonal, (BATCH, D)), (General, (BATCH, M))])
def test_adjoint_reversible_heun_is_the_exact_gradient(sde_cls, size):
    """sdeint_adjoint(reversible_heun) = odegrad's reversible gradient: equal to autograd
    through the same scheme (torchsde's sdeint) to round-off, and to torchsde's own adjoint."""
    sde = sde_cls("stratonovich")
    bm = _bm(size)
    ys_real, direct = _gradients(
        lambda y0: torchsde.sdeint(sde, y0, TS, bm, method="reversible_heun", dt=DT), sde, _y0())
    ys, mine = _gradients(
        lambda y0: shim.sdeint_adjoint(sde, y0, TS, bm, method="reversible_heun", dt=DT),
        sde, _y0())
    _, real_adjoint = _gradients(
        lambda y0: torchsde.sdeint_adjoint(sde, y0, TS, bm, method="reversible_heun", dt=DT),
        sde, _y0())
    torch.testing.assert_close(ys, ys_real, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine, direct, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mine, real_adjoint, rtol=1e-8, atol=1e-10)


def test_adjoint_midpoint_converges_to_the_direct_gradient():
    """The stochastic adjoint (backsolve) is approximate; its error against autograd through
    the same scheme and path shrinks as dt does."""
    sde = Diagonal("stratonovich")
    ts = [0.0, 1.0]
    bm = torchsde.BrownianInterval(0.0, 1.0, (BATCH, D), dtype=torch.float64, entropy=7)
    errors = []
    for dt in (2.0**-4, 2.0**-7):
        _, direct = _gradients(
            lambda y0, dt=dt: shim.sdeint(sde, y0, ts, bm, method="midpoint", dt=dt), sde, _y0())
        _, adjoint = _gradients(
            lambda y0, dt=dt: shim.sdeint_adjoint(sde, y0, ts, bm, method="midpoint", dt=dt),
            sde, _y0())
        errors.append(float((adjoint - direct).norm() / direct.norm()))
    assert errors[1] < 0.3 * errors[0] and errors[1] < 1e-2, errors


def test_brownian_interval_conditioned_on_w():
    w = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64)
    bm = shim.BrownianInterval(0.0, 2.0, W=w, entropy=4, levy_area_approximation="space-time")
    torch.testing.assert_close(bm(0.0, 2.0), w, rtol=1e-14, atol=1e-14)
    left, right = bm(0.0, 0.6), bm(0.6, 2.0)
    torch.testing.assert_close(left + right, w, rtol=1e-14, atol=1e-14)
    again, u = bm(0.0, 0.6, return_U=True)
    assert torch.equal(again, left)
    free = shim.BrownianInterval(0.0, 2.0, (3,), dtype=torch.float64, entropy=4,
                                 levy_area_approximation="space-time")
    free_w, free_u = free(0.0, 0.6, return_U=True)
    # the drift added to condition on W shifts U by its integral ½ (b − a)² (W − B(t0, t1)) / T
    shift = 0.5 * 0.6**2 * (w - free(0.0, 2.0)) / 2.0
    torch.testing.assert_close(u, free_u + shift, rtol=1e-12, atol=1e-14)


def test_brownian_interval_statistics():
    bm = shim.BrownianInterval(0.0, 1.0, (20000,), entropy=1, levy_area_approximation="space-time")
    w, u = bm(0.25, 0.75, return_U=True)
    h = u / 0.5 - 0.5 * w
    assert abs(float(w.var()) - 0.5) < 0.03 and abs(float(w.mean())) < 0.02
    assert abs(float(h.var()) - 0.5 / 12) < 0.003
    assert abs(float((w * h).mean())) < 0.005


def test_reverse_brownian_and_path():
    bm = shim.BrownianInterval(0.0, 1.0, (BATCH, D), entropy=2)
    reverse = shim.ReverseBrownian(bm)
    assert torch.equal(reverse(-0.75, -0.25), bm(0.25, 0.75))
    w0 = torch.ones(BATCH, D, dtype=torch.float64)
    path = shim.BrownianPath(0.0, w0)  # dtype and device from w0
    torch.testing.assert_close(path(0.5) - w0, path(0.0, 0.5), rtol=0, atol=1e-15)


def test_brownian_protocol_follows_torchsde():
    bm = shim.BrownianInterval(0.0, 1.0, (2,), entropy=3)
    with pytest.raises(RuntimeError, match="must respect ta <= tb"):
        bm(0.6, 0.4)
    with pytest.warns(UserWarning, match="Should have tb<=t1"):
        out = bm(0.5, 1.5)
    torch.testing.assert_close(out, bm(0.5, 1.0), rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="return_U"):
        bm(0.1, 0.2, return_U=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(halfway_tree=True, tol=1e-5), "halfway_tree"),
    (dict(tol=1e-5), "tol"),
    (dict(pool_size=16), "pool_size"),
    (dict(H=torch.zeros(2)), "H="),
])
def test_brownian_refusals(kwargs, match):
    with pytest.raises(UnsupportedCombinationError, match=match):
        shim.BrownianInterval(0.0, 1.0, (2,), **kwargs)


def test_brownian_tree_and_return_a_without_an_approximation_refused():
    with pytest.raises(UnsupportedCombinationError, match="halfway_tree"):
        shim.BrownianTree(0.0, torch.zeros(2))
    bm = shim.BrownianInterval(0.0, 1.0, (2,), levy_area_approximation="space-time")
    with pytest.raises(InvalidInputError, match="return_A"):
        bm(0.0, 0.5, return_A=True)


@pytest.mark.parametrize("approximation", ["davie", "foster"])
def test_levy_area_approximations_protocol_and_shapes(approximation):
    """torchsde's return orders and shapes (as test_shape of its suite); W and U are those of
    'space-time' with the same entropy; a reversed path (ReverseBrownian) passes A through."""
    for size, a_shape in (((BATCH, D), (BATCH, D, D)), ((BATCH,), (BATCH,)), ((), ())):
        bm = shim.BrownianInterval(0.0, 1.0, size, entropy=7,
                                   levy_area_approximation=approximation)
        plain = shim.BrownianInterval(0.0, 1.0, size, entropy=7,
                                      levy_area_approximation="space-time")
        w, u, a = bm(0.25, 0.75, return_U=True, return_A=True)
        w2, a2 = bm(0.25, 0.75, return_A=True)
        assert w.shape == u.shape == size and a.shape == a_shape
        assert torch.equal(w2, w) and torch.equal(a2, a)
        w3, u3 = plain(0.25, 0.75, return_U=True)
        assert torch.equal(w3, w) and torch.equal(u3, u)
        assert torch.equal(shim.ReverseBrownian(bm)(-0.75, -0.25, return_A=True)[1], a)


@pytest.mark.parametrize("approximation", ["davie", "foster"])
def test_levy_area_approximations_against_torchsde(approximation):
    """Both give A = H⊗W − W⊗H + λ, λ antisymmetric, centred, independent of W (the same
    definition); λ's variance differs by design: the shim's is the literature's (h²/12 for
    Davie, h²/20 + (h/5)(H_i² + H_j²) for Foster, so Var(A_ij) = h²/4 as for the true Lévy
    area), torchsde 0.2.6's is twice Davie's and h²/50 + (h/5)(...) for Foster."""
    rows, ta, tb = 20000, 0.0, 1.0  # the root interval: one node in both

    def residual(module, bm_kwargs):
        bm = module.BrownianInterval(ta, tb, (rows, 2), dtype=torch.float64, entropy=3,
                                     levy_area_approximation=approximation, **bm_kwargs)
        w, u, a = bm(ta, tb, return_U=True, return_A=True)
        h = u / (tb - ta) - 0.5 * w
        # antisymmetric (torchsde's to rounding: its Foster σ_ij sums H_i², H_j² in order)
        torch.testing.assert_close(a, -a.transpose(-1, -2), rtol=0, atol=1e-15)
        lam = a[:, 0, 1] - (h[:, 0] * w[:, 1] - w[:, 0] * h[:, 1])
        return lam, h, w

    tol = 5 / math.sqrt(rows)
    variances = {}
    for name, module in (("shim", shim), ("torchsde", torchsde)):
        lam, h, w = residual(module, {})
        squares = h[:, 0] ** 2 + h[:, 1] ** 2
        base = torch.full_like(squares, 1 / 12) if approximation == "davie" else \
            1 / 20 + squares / 5
        ratio = float((lam**2 / base).mean())
        variances[name] = ratio
        assert abs(float(lam.mean()) / float(lam.std())) < tol
        assert abs(float(torch.corrcoef(torch.stack([lam, w[:, 0]]))[0, 1])) < tol
    assert abs(variances["shim"] - 1) < 0.05, variances
    if approximation == "davie":  # torchsde: sigma (N - N^T), twice the variance
        assert abs(variances["torchsde"] - 2) < 0.1, variances
    else:  # torchsde: 2 (h/10)(h/10 + H_i^2 + H_j^2), below the exact conditional variance
        assert variances["torchsde"] < 0.85, variances


def test_levy_area_approximation_conditioned_on_w():
    """With W=, A of the conditioned path is H⊗W − W⊗H + λ with the free path's λ."""
    w_end = torch.tensor([[0.7, -1.2, 0.1]], dtype=torch.float64)
    bm = shim.BrownianInterval(0.0, 2.0, W=w_end, entropy=4, levy_area_approximation="davie")
    free = shim.BrownianInterval(0.0, 2.0, (1, 3), dtype=torch.float64, entropy=4,
                                 levy_area_approximation="davie")
    free(0.0, 2.0)
    for ta, tb in ((0.0, 2.0), (0.0, 0.6), (0.6, 2.0)):
        results = []
        for motion in (bm, free):
            w, u, a = motion(ta, tb, return_U=True, return_A=True)
            h = u / (tb - ta) - 0.5 * w
            mean = h.unsqueeze(-1) * w.unsqueeze(-2)
            results.append((w, a - (mean - mean.transpose(-1, -2))))
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bm(0.0, 2.0), w_end, rtol=1e-14, atol=1e-14)


def test_sdeint_with_a_davie_brownian_motion_solves_on_the_same_path():
    sde = Diagonal("ito")
    y0 = torch.full((BATCH, D), 0.5, dtype=torch.float64)
    ts = torch.tensor(TS, dtype=torch.float64)
    outs = []
    for approximation in ("davie", "space-time"):
        bm = shim.BrownianInterval(0.0, 1.0, (BATCH, D), dtype=torch.float64, entropy=9,
                                   levy_area_approximation=approximation)
        outs.append(shim.sdeint(sde, y0, ts, bm, method="euler", dt=DT))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sde_type, kwargs, error, match", [
    ("ito", dict(method="log_ode"), UnsupportedCombinationError, "log_ode"),
    ("ito", dict(method="midpoint"), UnsupportedCombinationError, "type stratonovich"),
    ("stratonovich", dict(method="euler"), UnsupportedCombinationError, "type ito"),
    ("stratonovich", dict(method="midpoint", adaptive=True), UnsupportedCombinationError,
     "adaptive"),
    ("stratonovich", dict(method="blah"), UnknownNameError, "blah"),
    ("stratonovich", dict(method="adjoint_reversible_heun"), InvalidInputError,
     "adjoint_method"),
    ("stratonovich", dict(method="midpoint", options={"grad_free": True}), UnknownNameError,
     "grad_free"),
    ("stratonovich", dict(method="midpoint", names={"drfit": "f"}), UnknownNameError, "drfit"),
    ("stratonovich", dict(method="midpoint", rtoll=1e-3), UnknownNameError, "rtoll"),
    ("stratonovich", dict(method="heun", extra_solver_state=(torch.zeros(1),)),
     InvalidInputError, "keeps no extra state"),
    ("stratonovich", dict(method="reversible_heun", extra_solver_state=(torch.zeros(1),)),
     InvalidInputError, "solver_state"),
])
def test_sdeint_refusals(sde_type, kwargs, error, match):
    with pytest.raises(error, match=match):
        shim.sdeint(Diagonal(sde_type), _y0(), TS, dt=DT, **kwargs)


@pytest.mark.parametrize("sde_type, kwargs, match", [
    ("ito", dict(method="euler", adjoint_method="euler"), "converted to Stratonovich"),
    ("ito", dict(method="milstein", adjoint_method="milstein"), "converted to Stratonovich"),
    ("ito", dict(method="euler", adjoint_method="srk"), "Stratonovich scheme"),
    ("stratonovich", dict(method="reversible_heun", extra=True), "torch.no_grad"),
    ("stratonovich", dict(method="reversible_heun", extra_solver_state=(torch.zeros(1),) * 3),
     "use sdeint"),
    ("stratonovich", dict(method="midpoint", adjoint_adaptive=True), "adjoint_adaptive"),
    ("stratonovich", dict(method="midpoint", adjoint_method="adjoint_reversible_heun"),
     "needs method='reversible_heun'"),
    ("stratonovich", dict(method="midpoint", adjoint_method="milstein"), "adjoint_method"),
    ("stratonovich", dict(method="midpoint", adjoint_options={"grad_free": False}),
     "adjoint_options"),
])
def test_sdeint_adjoint_refusals(sde_type, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        shim.sdeint_adjoint(Diagonal(sde_type), _y0(), TS, dt=DT, **kwargs)


def test_extra_state_of_stateless_methods_is_empty():
    bm = _bm((BATCH, D))
    ys, extra = shim.sdeint(Diagonal("ito"), _y0(), TS, bm, method="euler", dt=DT, extra=True)
    assert extra == () and ys.shape == (len(TS), BATCH, D)
    again = shim.sdeint(Diagonal("ito"), _y0(), TS, bm, method="euler", dt=DT,
                        extra_solver_state=())
    torch.testing.assert_close(again, ys, rtol=0, atol=0)


@pytest.mark.parametrize("sde_cls, size", [(Diagonal, (BATCH, D)), (General, (BATCH, M))])
def test_reversible_heun_extra_state_matches_torchsde(sde_cls, size):
    """extra=True gives reversible Heun's (f, g, z) at ts[-1], torchsde's own on the same path;
    extra_solver_state= continues from it: [0, 0.5] then [0.5, 1] is the solve over [0, 1], in
    the shim as in torchsde, and the gradient flows through the state (sdeint: autograd)."""
    sde = sde_cls("stratonovich")
    bm = _bm(size)
    kwargs = dict(method="reversible_heun", dt=DT, extra=True)
    ys_real, state_real = torchsde.sdeint(sde, _y0(), TS, bm, **kwargs)
    ys, state = shim.sdeint(sde, _y0(), TS, bm, **kwargs)
    torch.testing.assert_close(ys, ys_real, rtol=1e-12, atol=1e-12)
    assert len(state) == 3
    for a, b in zip(state, state_real):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    y0 = _y0().requires_grad_()
    whole, _ = shim.sdeint(sde, y0, TS, bm, **kwargs)
    first, middle = shim.sdeint(sde, y0, TS[:3], bm, **kwargs)
    second, end = shim.sdeint(sde, first[-1], TS[2:], bm, extra_solver_state=middle, **kwargs)
    real_second, real_end = torchsde.sdeint(sde, ys_real[2], TS[2:], bm,
                                            extra_solver_state=state_middle_real(sde, bm),
                                            **kwargs)
    torch.testing.assert_close(second[-1], whole[-1], rtol=0, atol=1e-15)
    torch.testing.assert_close(second, real_second, rtol=1e-12, atol=1e-12)
    for a, b in zip(end, real_end):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(whole[-1].pow(2).sum(), [y0, *sde.parameters()])
    got = torch.autograd.grad(second[-1].pow(2).sum(), [y0, *sde.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def state_middle_real(sde, bm):
    """torchsde's reversible Heun state at TS[2] (detached)."""
    with torch.no_grad():
        _, state = torchsde.sdeint(sde, _y0(), TS[:3], bm, method="reversible_heun", dt=DT,
                                   extra=True)
    return state


def test_reversible_heun_extra_state_under_sdeint_adjoint_without_grad():
    sde = Diagonal("stratonovich")
    bm = _bm((BATCH, D))
    with torch.no_grad():
        ys, state = shim.sdeint_adjoint(sde, _y0(), TS, bm, method="reversible_heun", dt=DT,
                                        extra=True)
        _, real = torchsde.sdeint(sde, _y0(), TS, bm, method="reversible_heun", dt=DT,
                                  extra=True)
    for a, b in zip(state, real):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adjoint_stratonovich_milstein_forward_equals_torchsde_adjoint():
    """A forward milstein under sdeint_adjoint (odegrad's stochastic adjoint constrains only
    the backward scheme): the default adjoint_method is midpoint in both, and torchsde's own
    adjoint gives the same gradient on the same path to round-off."""
    sde = Diagonal("stratonovich")
    bm = _bm((BATCH, D))
    kwargs = dict(method="milstein", dt=DT)
    ys, mine = _gradients(lambda y0: shim.sdeint_adjoint(sde, y0, TS, bm, **kwargs), sde, _y0())
    ys_real, real = _gradients(lambda y0: torchsde.sdeint_adjoint(sde, y0, TS, bm, **kwargs),
                               sde, _y0())
    torch.testing.assert_close(ys, ys_real, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine, real, rtol=1e-10, atol=1e-12)
    # grad_free (odegrad's auxiliary point differs, module docstring): the forward is sdeint's
    options = {"grad_free": True}
    free = shim.sdeint_adjoint(sde, _y0(), TS, bm, options=options, **kwargs)
    torch.testing.assert_close(free, shim.sdeint(sde, _y0(), TS, bm, options=options, **kwargs),
                               rtol=0, atol=0)


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_adjoint_ito_approaches_direct_and_torchsde_adjoint(method):
    """sdeint_adjoint on an Itô SDE (odegrad: Stratonovich form of the adjoint, midpoint;
    torchsde: its Itô adjoint, milstein): both approximate the same gradient, so they approach
    each other as dt shrinks, and for Milstein (strong order 1) the shim's approaches autograd
    through the same forward scheme."""
    sde = Diagonal("ito")
    ts = [0.0, 0.5, 1.0]
    bm = torchsde.BrownianInterval(0.0, 1.0, (BATCH, D), dtype=torch.float64, entropy=7)
    to_real, to_direct = [], []
    for dt in (2.0**-4, 2.0**-6, 2.0**-8):
        _, direct = _gradients(
            lambda y0, dt=dt: shim.sdeint(sde, y0, ts, bm, method=method, dt=dt), sde, _y0())
        ys, mine = _gradients(
            lambda y0, dt=dt: shim.sdeint_adjoint(sde, y0, ts, bm, method=method, dt=dt),
            sde, _y0())
        ys_real, real = _gradients(
            lambda y0, dt=dt: torchsde.sdeint_adjoint(sde, y0, ts, bm, method=method, dt=dt),
            sde, _y0())
        torch.testing.assert_close(ys, ys_real, rtol=1e-12, atol=1e-12)
        to_real.append(float((mine - real).norm() / real.norm()))
        to_direct.append(float((mine - direct).norm() / direct.norm()))
    assert to_real[1] < 0.4 * to_real[0] and to_real[2] < 0.4 * to_real[1], to_real
    assert to_real[2] < 2e-3, to_real
    if method == "milstein":
        assert to_direct[1] < 0.4 * to_direct[0] and to_direct[2] < 0.4 * to_direct[1]
        assert to_direct[2] < 3e-3, to_direct


def test_settings_and_types_as_torchsde():
    from torchsde import settings as real

    for name in ("METHODS", "NOISE_TYPES", "SDE_TYPES", "LEVY_AREA_APPROXIMATIONS",
                 "METHOD_OPTIONS"):
        assert getattr(shim.settings, name).all() == getattr(real, name).all()
    assert "srk" in shim.settings.METHODS and "rk4" not in shim.settings.METHODS
    assert shim.types.TensorOrTensors is not None and math.isclose(DT, 1 / 32)
