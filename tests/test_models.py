"""The models: ODEBlock, ODE-Net classifier, FFJORD CNF and latent ODE (GRU or ODE-RNN encoder).

References: matrix exponentials (linear fields have closed-form flows and log-densities),
finite differences (gradcheck), the "direct" gradient in float64 for every other gradient
method, and closed-form KL divergences.
"""

import math

import pytest
import torch
from torch import nn

from odegrad.errors import UnknownNameError
from odegrad.gradients import available_gradients
from odegrad.models import (
    CNF,
    AugmentedDynamics,
    CNFField,
    LatentODE,
    ODEBlock,
    ODENetClassifier,
    ODERNNEncoder,
    standard_normal_log_prob,
)

GRADIENTS = available_gradients()



# Tolerances for comparing a gradient method with "direct" at rtol = atol = 1e-10: exact methods
# agree to round-off; the continuous adjoints and the reversible scheme (a different scheme over
# the same base) to the solve's accuracy.
TIGHT = dict(method="dopri5", rtol=1e-10, atol=1e-10)


class Linear(nn.Module):
    """f(t, y) = y A^T, a field with a closed-form flow exp(tA)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, y):
        return y @ self.a.T


class Autonomous(nn.Module):
    """f(t, y) = net(y)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


def _relative(a, b):
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def test_odeblock_matches_matrix_exponential():
    a = torch.randn(3, 3, dtype=torch.float64) * 0.5
    block = ODEBlock(Linear(a), (0.0, 0.7), **TIGHT)
    y0 = torch.randn(5, 3, dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp(0.7 * a).T
    assert _relative(block(y0), exact) < 1e-8
    assert block.stats["nfe_forward"] > 0
    ys = block.solve(y0, torch.tensor([0.0, 0.3, 0.7]))
    assert ys.shape == (3, 5, 3)
    assert _relative(ys[1], y0 @ torch.linalg.matrix_exp(0.3 * a).T) < 1e-8


def test_odeblock_float32_lands_on_the_end_time():
    """A step that would stop within the resolution of t (float32) short of the end is
    stretched to it, instead of leaving a remainder that raises StepSizeUnderflowError (a
    latent-ODE training run hit this at t = 5.99999721 of 6)."""
    class Zero(nn.Module):
        def forward(self, t, y):
            return torch.zeros_like(y)

    block = ODEBlock(Zero(), (0.0, 6.0), method="dopri5", step_size=6.0 - 2e-6)
    y = block(torch.ones(3))
    assert torch.equal(y, torch.ones(3)) and block.stats["n_accepted"] == 1


def test_odeblock_gradcheck_fixed_step():
    torch.manual_seed(1)
    field = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    block = ODEBlock(Autonomous(field), method="rk4", step_size=0.25)

    def run(y0, *params):
        return block(y0)

    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, *field.parameters()))


def _grads(module, loss_fn):
    module.zero_grad()
    loss_fn().backward()
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_odeblock_passes_parameters_to_every_gradient(gradient):
    """Parameter gradients through any gradient method equal direct's (float64, tight tol)."""
    torch.manual_seed(2)
    field = Autonomous(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double())
    y0 = torch.randn(4, 3, dtype=torch.float64)
    reference = _grads(field, lambda: ODEBlock(field, **TIGHT)(y0).pow(2).sum())
    got = _grads(field, lambda: ODEBlock(field, gradient=gradient, **TIGHT)(y0).pow(2).sum())
    for g, r in zip(got, reference):
        assert _relative(g, r) < 1e-5


def test_classifier_shapes_and_downsampling():
    for size, downsample, blocks in ((8, 0, 1), (28, 2, 2)):
        model = ODENetClassifier(1, 10, channels=4, downsample=downsample, blocks=blocks,
                                 method="euler", step_size=0.5)
        logits = model(torch.randn(3, 1, size, size))
        assert logits.shape == (3, 10)
        assert len(model.ode_stats()) == blocks
        # the ODE block runs on the downsampled map: 8x8 stays, 28 -> 14 -> 7
        shapes = []
        model.blocks[0].func.register_forward_hook(lambda m, i, o, s=shapes: s.append(o.shape))
        model(torch.randn(3, 1, size, size))
        assert shapes[0][-1] == size // 2 ** downsample


def test_classifier_learns_digits_quickly():
    """30 full-batch steps on 100 real digits: from chance to most of the batch right."""
    from odegrad.data import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x, y = data.x_train[:100], data.y_train[:100]
    model = ODENetClassifier(1, 10, channels=8, method="rk4", step_size=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.9


def test_cnf_log_prob_of_a_linear_flow_is_exact():
    """z(T) = e^{TA} x and log p(x) = log N(e^{TA} x) + T tr(A) for f(z) = A z. The off-diagonal
    of A is antisymmetric, so Hutchinson's εᵀAε = tr A for every Rademacher ε: exact too."""
    a = torch.tensor([[-0.3, 0.8], [-0.8, 0.2]], dtype=torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    z = x @ torch.linalg.matrix_exp(0.8 * a).T
    exact = standard_normal_log_prob(z) + 0.8 * torch.trace(a)
    for trace in ("exact", "hutchinson"):
        cnf = CNF(2, trace=trace, field=Linear(a), t_end=0.8, **TIGHT)
        assert _relative(cnf.log_prob(x), exact) < 1e-9


def test_hutchinson_estimate_averages_to_the_exact_trace():
    """For d = 2 and Rademacher ε, E[εᵀJε] = tr J + E[ε1ε2](J12 + J21): the two sign patterns
    (1, 1) and (1, −1) average to the trace exactly."""
    torch.manual_seed(3)
    field = CNFField(2, (16, 16)).double()
    z = torch.randn(5, 2, dtype=torch.float64)
    state = torch.cat([z, torch.zeros(5, 1, dtype=torch.float64)], -1)
    t = torch.tensor(0.3, dtype=torch.float64)
    exact = AugmentedDynamics(field, "exact")(t, state)[:, -1]
    hutchinson = AugmentedDynamics(field, "hutchinson")
    estimates = []
    for noise in ((1.0, 1.0), (1.0, -1.0)):
        hutchinson.noise = torch.tensor(noise, dtype=torch.float64).expand(5, 2)
        estimates.append(hutchinson(t, state)[:, -1])
    assert torch.allclose((estimates[0] + estimates[1]) / 2, exact, atol=1e-12)
    assert not torch.allclose(estimates[0], exact, atol=1e-6)


def test_cnf_density_integrates_to_one():
    torch.manual_seed(4)
    cnf = CNF(2, hidden=(16, 16), method="dopri5", rtol=1e-6, atol=1e-6).double()
    axis = torch.linspace(-7, 7, 81, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = cnf.log_prob(grid).exp()
    cell = float(axis[1] - axis[0]) ** 2
    assert abs(float(density.sum()) * cell - 1.0) < 0.01


def test_cnf_sample_inverts_the_flow():
    torch.manual_seed(5)
    cnf = CNF(2, hidden=(16, 16), **TIGHT).double()
    x = cnf.sample(7, torch.Generator().manual_seed(9))
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert _relative(cnf.block.solve(torch.cat([x, torch.zeros(7, 1, dtype=x.dtype)], -1))[-1,
                     :, :2], z) < 1e-8


def test_cnf_graph_free_under_no_grad():
    cnf = CNF(2, hidden=(8,), method="rk4", step_size=0.5)
    with torch.no_grad():
        log_p = cnf.log_prob(torch.randn(4, 2))
    assert not log_p.requires_grad


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_cnf_parameter_gradients_match_direct(gradient, trace):
    """The augmented field differentiates through its own VJP; every gradient must serve it."""
    torch.manual_seed(6)
    cnf = CNF(2, hidden=(8, 8), trace=trace, **TIGHT).double()
    x = torch.randn(5, 2, dtype=torch.float64)

    def loss(gradient_name):
        cnf.block.gradient = gradient_name
        torch.manual_seed(7)  # the same Hutchinson noise for both
        return cnf(x)

    reference = _grads(cnf, lambda: loss("direct"))
    got = _grads(cnf, lambda: loss(gradient))
    for g, r in zip(got, reference):
        assert _relative(g, r) < 1e-5


def test_latent_encoder_ignores_unobserved_values():
    torch.manual_seed(8)
    model = LatentODE(2, latent_dim=3, hidden=8, encoder_hidden=8, method="rk4", step_size=0.5)
    t = torch.linspace(0, 2, 9)
    values = torch.randn(4, 9, 2)
    mask = (torch.rand(4, 9) < 0.5).float()
    changed = values + 5.0 * (1 - mask).unsqueeze(-1) * torch.randn(4, 9, 2)
    mean, log_var = model.encoder(t, values, mask)
    mean2, log_var2 = model.encoder(t, changed, mask)
    assert torch.allclose(mean, mean2) and torch.allclose(log_var, log_var2)
    # ... but it does read the observed ones and their times
    assert not torch.allclose(model.encoder(t, values + mask.unsqueeze(-1), mask)[0], mean)
    assert not torch.allclose(model.encoder(t * 1.5, values, mask)[0], mean)


def test_latent_loss_is_the_negative_elbo():
    """With obs_std s and q(z0) = N(μ, σ²): the loss equals the ELBO built from
    torch.distributions, for the same reparameterised sample."""
    torch.manual_seed(9)
    model = LatentODE(1, latent_dim=2, hidden=8, encoder_hidden=8, obs_std=0.3,
                      method="rk4", step_size=0.25).double()
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    values = torch.randn(3, 6, 1, dtype=torch.float64)
    mask = (torch.rand(3, 6) < 0.6).double()
    torch.manual_seed(10)
    loss = model(t, values, mask, mask)
    mean, log_var = model.encoder(t, values, mask)
    torch.manual_seed(10)
    z0 = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
    predicted = model.decode(z0, t)
    log_lik = (torch.distributions.Normal(predicted, 0.3).log_prob(values) * mask[..., None])
    posterior = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    elbo = log_lik.sum((1, 2)) - kl
    assert math.isclose(float(loss.detach()), float(-elbo.mean().detach() / 6), rel_tol=1e-10)


def test_latent_predictions_cover_the_grid():
    model = LatentODE(2, latent_dim=3, hidden=8, encoder_hidden=8, method="dopri5")
    t = torch.linspace(0, 3, 11)
    values = torch.randn(2, 11, 2)
    mask = torch.ones(2, 11)
    assert model.predict(t, values, mask).shape == (2, 11, 2)


def test_ode_rnn_encoder_with_a_still_field_is_a_masked_gru():
    """g ≡ 0 (its last layer zeroed): the hidden state is held through the gaps, so the ODE-RNN
    encoder is a GRU over [x, 1] at the observed times only, read backwards in time (checked
    against a loop of GRUCell calls, one series at a time)."""
    torch.manual_seed(11)
    model = LatentODE(2, latent_dim=3, hidden=8, encoder_hidden=5, encoder="ode_rnn",
                      method="rk4", step_size=0.25)
    encoder = model.encoder
    assert isinstance(encoder, ODERNNEncoder)
    assert (encoder.flow.method, encoder.flow.step_size) == ("rk4", 0.25)
    with torch.no_grad():
        encoder.flow.func.net[-1].weight.zero_()
        encoder.flow.func.net[-1].bias.zero_()
    t = torch.tensor([0.0, 0.3, 0.4, 1.1, 1.5, 2.6, 3.0])  # irregular gaps
    values = torch.randn(4, 7, 2)
    mask = (torch.rand(4, 7) < 0.5).float()
    mean, log_var = encoder(t, values, mask)
    assert mean.shape == log_var.shape == (4, 3)
    assert len(encoder.gap_stats) == 6 and encoder.stats["nfe_forward"] > 0

    reference = []
    for i in range(4):
        h = torch.zeros(1, 5)
        for j in range(6, -1, -1):
            if mask[i, j] > 0:
                h = encoder.cell(torch.cat([values[i, j], torch.ones(1)])[None], h)
        reference.append(encoder.out(h)[0])
    expected_mean, expected_log_var = torch.stack(reference).chunk(2, -1)
    assert torch.allclose(mean, expected_mean, atol=1e-6)
    assert torch.allclose(log_var, expected_log_var, atol=1e-6)


def test_ode_rnn_hidden_state_follows_the_ode_between_observations():
    """g(h) = A h: between observations h is carried by exp((t_j − t_{j+1}) A), backwards in
    time, and a GRU jump happens at each observation (series 0: observed at t_5 and t_2;
    series 1: at t_5 only, so it flows from t_5 all the way back to t_0)."""
    torch.manual_seed(12)
    encoder = ODERNNEncoder(1, hidden=3, latent_dim=2, **TIGHT).double()
    a = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    encoder.flow.func = Linear(a)
    t = torch.tensor([0.0, 0.2, 0.7, 0.9, 1.6, 2.0], dtype=torch.float64)
    values = torch.randn(2, 6, 1, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.float64)
    mask[0, [2, 5]] = 1.0
    mask[1, 5] = 1.0
    mean, log_var = encoder(t, values, mask)

    def flow(h, start, end):
        return h @ torch.linalg.matrix_exp((end - start) * a).T

    def jump(h, x):
        return encoder.cell(torch.cat([x, torch.ones(1, dtype=torch.float64)])[None], h)

    with torch.no_grad():
        zero = torch.zeros(1, 3, dtype=torch.float64)
        h0 = flow(jump(flow(jump(zero, values[0, 5]), t[5], t[2]), values[0, 2]), t[2], t[0])
        h1 = flow(jump(zero, values[1, 5]), t[5], t[0])
        expected = encoder.out(torch.cat([h0, h1]))
    assert torch.allclose(torch.cat([mean, log_var], -1), expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_ode_rnn_gradients_reach_the_field_and_agree(method):
    """The ODE field's parameters get gradients, and the discrete adjoint of the per-gap solves
    equals backpropagation through them (float64)."""
    torch.manual_seed(13)
    solver = dict(method=method, step_size=0.2) if method == "rk4" else TIGHT
    encoder = ODERNNEncoder(2, hidden=4, latent_dim=2, **solver).double()
    t = torch.tensor([0.0, 0.3, 0.5, 1.2, 1.4], dtype=torch.float64)
    values = torch.randn(3, 5, 2, dtype=torch.float64)
    mask = (torch.rand(3, 5) < 0.6).double()
    weights = torch.randn(3, 4, dtype=torch.float64)

    def loss(gradient):
        encoder.flow.gradient = gradient
        return (torch.cat(encoder(t, values, mask), -1) * weights).sum()

    reference = _grads(encoder, lambda: loss("direct"))
    got = _grads(encoder, lambda: loss("discrete"))
    assert encoder.stats["nfe_backward"] > 0  # the adjoint of every gap ran
    field_grads = [p.grad for p in encoder.flow.func.parameters()]
    assert all(float(g.abs().max()) > 0 for g in field_grads)
    for g, r in zip(got, reference):
        assert _relative(g, r) < 1e-10


def test_latent_ode_rejects_an_unknown_encoder():
    with pytest.raises(UnknownNameError, match="unknown encoder 'lstm'; valid encoders: gru, "
                                               "ode_rnn"):
        LatentODE(2, encoder="lstm")
