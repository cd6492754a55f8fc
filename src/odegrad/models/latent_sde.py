"""Latent SDE (Li, Wong, Chen & Duvenaud 2020, §5 and §7; ALGORITHMS.md §11, "Latent SDE KL").

Generative model (the prior), with a diffusion σ shared by prior and posterior:

    z_0 ~ N(m_p, diag s_p²),   dz = f_θ(z) dt + σ(z) ∘ dW,   x_i ~ p(x | D z(t_i))

Variational posterior, its drift reading a context c(t) that a GRU computes from the
observations at and after t (it runs backwards in time):

    z_0 ~ N(m_q, diag s_q²),   dz = h_φ(z, c(t)) dt + σ(z) ∘ dW

Evidence lower bound per series (Girsanov: the two path measures differ only in their drift):

    ELBO = E_q[Σ_i log p(x_i | z(t_i))] − KL(q(z_0) ‖ p(z_0)) − E_q ∫ ½ |u|² dt,
    u = (h_φ − f_θ) / σ   (diagonal noise, element-wise).

Both SDEs are written in Stratonovich form; the Itô drifts of prior and posterior differ from
these by the same term ½ Σ_j (∂σ/∂z_j) σ_j, so u is the same in either calculus. The path term
is a (d+1)-th state component of the posterior solve, with drift ½|u|² and no diffusion, so each
gradient method (direct, discrete, reversible, backsolve) differentiates it together with z.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from ..errors import UnknownNameError
from ..sde import solve_sde

__all__ = ["LatentSDE", "ContextEncoder", "PiecewiseContext", "DiagonalDiffusion", "LIKELIHOODS"]

LIKELIHOODS = ("gaussian", "laplace")


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                         nn.Softplus(), nn.Linear(hidden, n_out))


class ContextEncoder(nn.Module):
    """c_j = [Linear(GRU state after reading [x_k·m_k, m_k] for k = T−1, ..., j), x_j·m_j, m_j]:
    a summary of the observations at and after t_j (m the observation mask) with the next
    observation itself passed through (so the posterior drift can steer towards it from the
    first iterations), and q(z_0) from c_0. `size` = context_dim + obs_dim + 1."""

    def __init__(self, obs_dim: int, hidden: int, context_dim: int, latent_dim: int):
        super().__init__()
        self.gru = nn.GRU(obs_dim + 1, hidden, batch_first=True)
        self.context = nn.Linear(hidden, context_dim)
        self.size = context_dim + obs_dim + 1
        self.initial = nn.Linear(self.size, 2 * latent_dim)

    def forward(self, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(context (T, N, size), mean and log std of q(z_0), each (N, d)) from values
        (N, T, D) and mask (N, T)."""
        m = mask.unsqueeze(-1)
        inputs = torch.cat([values * m, m], -1)
        states, _ = self.gru(inputs.flip(1))
        context = torch.cat([self.context(states.flip(1)), inputs], -1).transpose(0, 1)
        mean, log_std = self.initial(context[0]).chunk(2, -1)
        return context, mean, log_std


class PiecewiseContext:
    """c(t) = c_k for t in [t_{k−1}, t_k) (the summary from the next observation time on) and
    c_{T−1} from t_{T−1} on, read from contexts (T, N, C) on the grid t (T,). A time within a
    millionth of the smallest gap below t_k counts as t_k, so the floats t_n + h and t_{n+1}
    of one step boundary (forward and backward pass) read the same context.

    Alignment with the scheme: a step from t_n towards t_{n+1} should steer by c_{n+1}. Euler
    and midpoint evaluate the drift at times in [t_n, t_{n+1}) only, so with steps that divide
    the observation gaps every evaluation reads c_{n+1}. Heun and reversible Heun also
    evaluate it at the step's end, where c jumps to the next interval's summary (reversible
    Heun shares that evaluation between two steps): with dt = the gap, half of each step's
    drift steers by the wrong observation, a lag that on sunspots cost the fit most of its
    accuracy (benchmarks/RESULTS.md §9); a finer dt shrinks the mismatch."""

    def __init__(self, times: Tensor, contexts: Tensor):
        self.times, self.contexts = times, contexts
        gaps = (times[1:] - times[:-1]).abs()
        self.tolerance = 1e-6 * float(gaps.min()) if len(gaps) else 0.0

    def __call__(self, t: Tensor) -> Tensor:
        where = torch.as_tensor(t, dtype=self.times.dtype, device=self.times.device).reshape(1)
        k = torch.searchsorted(self.times, where + self.tolerance, right=True)
        return self.contexts.index_select(0, k.clamp(max=len(self.times) - 1))[0]


class DiagonalDiffusion(nn.Module):
    """σ_i(z) = s_max · sigmoid(w2_i · softplus(w1_i z_i + b1_i) + b2_i): one small MLP per
    latent dimension, each reading its own component only (diagonal noise: ∂σ_i/∂z_j = 0 for
    j ≠ i), evaluated for all dimensions at once."""

    def __init__(self, dim: int, hidden: int, max_scale: float = 1.0):
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(dim, hidden).uniform_(-1.0, 1.0))
        self.b1 = nn.Parameter(torch.empty(dim, hidden).uniform_(-1.0, 1.0))
        self.w2 = nn.Parameter(torch.empty(dim, hidden).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.max_scale = max_scale

    def forward(self, z: Tensor) -> Tensor:
        hidden = nn.functional.softplus(z.unsqueeze(-1) * self.w1 + self.b1)
        return self.max_scale * torch.sigmoid((hidden * self.w2).sum(-1) + self.b2)


class LatentSDE(nn.Module):
    """Encoder, posterior drift h_φ(z, c), prior drift f_θ(z), diffusion σ(z), linear decoder
    and observation likelihood ("gaussian" or "laplace", its scale learned per channel unless
    `obs_scale` fixes it).

    The observation scale starts at `obs_scale` (1 when None) and is a parameter; with
    `learn_obs_scale=False` it is held there (`obs_log_scale.requires_grad_(True)` releases it
    later: a small scale held during the first iterations keeps the posterior from collapsing
    onto the prior while a large learned noise explains the data).

    Every solve goes through `odegrad.solve_sde` with `method`, `gradient`, `dt`, `checkpoints`
    and `options` as given (default: reversible Heun with the exact reversible gradient, memory
    constant in the number of steps). After each forward pass `stats` holds the posterior
    solve's statistics (backward counters once `loss.backward()` has run).
    """

    def __init__(
        self, obs_dim: int, latent_dim: int = 4, context_dim: int = 16, hidden: int = 64, *,
        dt: float, method: str = "reversible_heun", gradient: str = "reversible",
        checkpoints: str | int | None = None, likelihood: str = "gaussian",
        obs_scale: float | None = None, learn_obs_scale: bool = True,
        max_diffusion: float = 1.0, **options,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise UnknownNameError(
                f"unknown likelihood {likelihood!r}; valid: {', '.join(LIKELIHOODS)}")
        self.encoder = ContextEncoder(obs_dim, hidden, context_dim, latent_dim)
        self.posterior_drift = _mlp(latent_dim + self.encoder.size, hidden, latent_dim)
        self.prior_drift = _mlp(latent_dim, hidden, latent_dim)
        self.diffusion = DiagonalDiffusion(latent_dim, hidden, max_diffusion)
        self.decoder = nn.Linear(latent_dim, obs_dim)
        self.prior_mean = nn.Parameter(torch.zeros(latent_dim))
        self.prior_log_std = nn.Parameter(torch.zeros(latent_dim))
        self.likelihood = likelihood
        self.obs_log_scale = nn.Parameter(
            torch.full((obs_dim,), 0.0 if obs_scale is None else math.log(obs_scale)),
            requires_grad=learn_obs_scale)
        self.solver = dict(method=method, gradient=gradient, dt=dt, checkpoints=checkpoints,
                           **options)
        self.latent_dim = latent_dim
        self.stats: dict = {}

    # ---- the two SDEs -------------------------------------------------------------------------

    def augmented_drift(self, context: PiecewiseContext, t: Tensor, y: Tensor) -> Tensor:
        """[h_φ(z, c(t)), ½ |(h_φ − f_θ)/σ|²] for y = [z, ∫ ½|u|² dt] (the KL rate of §11)."""
        z = y[..., :-1]
        posterior = self.posterior_drift(torch.cat([z, context(t)], -1))
        u = (posterior - self.prior_drift(z)) / self.diffusion(z)
        return torch.cat([posterior, 0.5 * u.pow(2).sum(-1, keepdim=True)], -1)

    def augmented_diffusion(self, t: Tensor, y: Tensor) -> Tensor:
        """[σ(z), 0]: the KL component carries no noise."""
        sigma = self.diffusion(y[..., :-1])
        return torch.cat([sigma, torch.zeros_like(sigma[..., :1])], -1)

    def prior(self, t: Tensor, z: Tensor) -> Tensor:
        return self.prior_drift(z)

    def noise(self, t: Tensor, z: Tensor) -> Tensor:
        return self.diffusion(z)

    def _seed(self) -> int:
        """A Brownian seed from torch's generator (so runs repeat under torch.manual_seed)."""
        return int(torch.randint(0, 2**62, (1,)))

    # ---- inference --------------------------------------------------------------------------

    def posterior_paths(self, t: Tensor, values: Tensor, mask: Tensor,
                        seed: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One posterior sample per series: (zs (T, N, d), KL path term (N,), mean and log std
        of q(z_0)). t (T,) is the shared grid of values (N, T, D), mask (N, T)."""
        context, mean, log_std = self.encoder(values, mask)
        drift = functools.partial(self.augmented_drift, PiecewiseContext(t, context))
        z0 = mean + log_std.exp() * torch.randn_like(mean)
        y0 = torch.cat([z0, torch.zeros_like(z0[..., :1])], -1)
        params = [context, *self.posterior_drift.parameters(), *self.prior_drift.parameters(),
                  *self.diffusion.parameters()]
        solution = solve_sde(
            drift, self.augmented_diffusion, y0, t, sde_type="stratonovich",
            noise_type="diagonal", params=params, seed=self._seed() if seed is None else seed,
            **self.solver,
        )
        self.stats = solution.stats
        ys = solution.ys
        return ys[..., :-1], ys[-1, :, -1], mean, log_std

    def log_likelihood(self, zs: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Σ over observed (time, channel) of log p(x | D z), per series (N,); zs (T, N, d)."""
        log_p = self.observation_log_density(values, self.decoder(zs).transpose(0, 1))
        return (log_p * mask.unsqueeze(-1)).sum((1, 2))

    def observation_log_density(self, x: Tensor, location: Tensor) -> Tensor:
        """log p(x | location) element-wise (broadcasting; the last dimension the channel)."""
        log_scale = self.obs_log_scale
        residual = (x - location) / log_scale.exp()
        if self.likelihood == "gaussian":
            return -0.5 * residual.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
        return -residual.abs() - log_scale - math.log(2.0)

    @torch.no_grad()
    def observation_noise(self, location: Tensor) -> Tensor:
        """A draw from p(x | location) (torch's generator)."""
        scale = self.obs_log_scale.exp()
        if self.likelihood == "gaussian":
            return location + scale * torch.randn_like(location)
        uniform = torch.rand_like(location) - 0.5
        return location - scale * uniform.sign() * torch.log1p(-2 * uniform.abs())

    def initial_kl(self, mean: Tensor, log_std: Tensor) -> Tensor:
        """KL(N(mean, e^{2 log_std}) ‖ N(m_p, s_p²)) per series, in closed form."""
        prior_log_std = self.prior_log_std
        ratio = (2 * (log_std - prior_log_std)).exp()
        shift = ((mean - self.prior_mean) / prior_log_std.exp()).pow(2)
        return 0.5 * (ratio + shift - 1.0 - 2 * (log_std - prior_log_std)).sum(-1)

    def forward(self, t: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log-likelihood, KL of z_0, KL of the path) per series, each (N,), from one
        reparameterised posterior sample: ELBO = first − second − third."""
        zs, path_kl, mean, log_std = self.posterior_paths(t, values, mask)
        return (self.log_likelihood(zs, values, mask), self.initial_kl(mean, log_std), path_kl)

    # ---- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, zs: Tensor) -> Tensor:
        """The likelihood's location D z for latent paths (T, N, d): (N, T, D)."""
        return self.decoder(zs).transpose(0, 1)

    @torch.no_grad()
    def sample_prior(self, n: int, t: Tensor, seed: int = 0) -> Tensor:
        """n latent paths of the prior SDE on the grid t: (T, n, d)."""
        generator = torch.Generator(device=self.prior_mean.device).manual_seed(seed)
        eps = torch.randn(n, self.latent_dim, generator=generator,
                          device=self.prior_mean.device, dtype=self.prior_mean.dtype)
        z0 = self.prior_mean + self.prior_log_std.exp() * eps
        solution = solve_sde(self.prior, self.noise, z0, t.to(z0), sde_type="stratonovich",
                             noise_type="diagonal", seed=seed, **self.solver)
        return solution.ys

    @torch.no_grad()
    def sample_posterior(self, t: Tensor, values: Tensor, mask: Tensor, n: int,
                         seed: int = 0) -> Tensor:
        """n posterior latent paths per series: (T, n, N, d) (each draw its own Brownian
        path and z_0; torch's generator is forked, so the caller's stream is untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draws = [self.posterior_paths(t, values, mask, seed=seed + 1 + k)[0]
                     for k in range(n)]
        return torch.stack(draws, 1)

    @torch.no_grad()
    def forecast(self, t: Tensor, values: Tensor, mask: Tensor, n_observed: int, n: int,
                 seed: int = 0) -> Tensor:
        """Latent paths of the model's forecast: n per series, (T, n, N, d) on the grid t (T,).

        Up to t[n_observed − 1] the posterior SDE conditioned on the observations of the first
        n_observed times only (values (N, T, D) and mask (N, T) beyond them are not read);
        from there on the prior SDE, started from the posterior's state at t[n_observed − 1].
        Each draw has its own z_0 and Brownian paths (all draws in one batched solve); torch's
        generator is forked, so the caller's stream is untouched.
        """
        if not 1 <= n_observed < len(t):
            raise ValueError(f"n_observed must be in [1, {len(t) - 1}], got {n_observed}")
        batch = values.shape[0]
        seen_values = values[:, :n_observed].repeat(n, 1, 1)
        seen_mask = mask[:, :n_observed].repeat(n, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if n_observed > 1:
                observed = self.posterior_paths(t[:n_observed], seen_values, seen_mask,
                                                seed=seed + 1)[0]
            else:
                _, mean, log_std = self.encoder(seen_values, seen_mask)
                observed = (mean + log_std.exp() * torch.randn_like(mean)).unsqueeze(0)
            ahead = solve_sde(self.prior, self.noise, observed[-1], t[n_observed - 1:],
                              sde_type="stratonovich", noise_type="diagonal", seed=seed + 2,
                              **self.solver).ys
        zs = torch.cat([observed, ahead[1:]])
        return zs.reshape(len(t), n, batch, -1)
