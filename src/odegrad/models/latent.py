"""Latent ODE for irregularly sampled time series (Chen et al. 2018 §5; Rubanova et al. 2019).

An encoder reads the observations backwards in time and gives q(z_0 | x) = N(μ, diag σ²): a GRU
with the gaps between observations as an input (`GRUEncoder`), or an ODE-RNN whose hidden state
follows an ODE between observations (`ODERNNEncoder`, Rubanova et al. 2019). z(t) solves
z' = f(z) from a sample of z_0 and a decoder maps z(t) to the mean of a Gaussian likelihood with
fixed noise. Training maximises the ELBO

    E_q[Σ_i log N(x_i; g(z(t_i)), s²)] − KL(q(z_0 | x) ‖ N(0, I)),

with the KL in closed form and one reparameterised sample. With `per_sample=True` the decoder
solve reads each series at its own observation times (`odegrad.solve(..., per_sample=True)`, t of
shape (N, n)) instead of at the union of all the batch's times (the shared grid).

Series observed at their own times (t of shape (N, T), each row ascending from a common t_0):
the GRU encoder reads each series' own gaps, and the decoder solves once on the union of the
batch's observed times (`decode_union`), or with `per_sample=True` at each series' own times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..api import solve
from ..errors import UnknownNameError
from .odeblock import ODEBlock

ENCODERS = ("gru", "ode_rnn")

# The per-gap solve statistics ODERNNEncoder.stats adds up.
_SUMMED_STATS = ("nfe_forward", "nfe_backward", "n_steps", "n_accepted", "n_rejected",
                 "checkpoint_bytes")


class GRUEncoder(nn.Module):
    """h ← GRU([x·m, m, Δt], h) over the grid from the last time to the first; h is held where
    nothing was observed and Δt is the gap to the previous (later) observation of that series."""

    def __init__(self, obs_dim: int, hidden: int, latent_dim: int):
        super().__init__()
        self.cell = nn.GRUCell(obs_dim + 2, hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, t: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z_0 | observations) from values (N, T, D) and mask (N, T); t is
        the shared grid (T,) or each series' own times (N, T)."""
        n, length, _ = values.shape
        h = values.new_zeros(n, self.cell.hidden_size)
        last_time = t[..., -1].expand(n)
        for j in range(length - 1, -1, -1):
            m = mask[:, j:j + 1]
            gap = (last_time - t[..., j]).unsqueeze(-1)
            update = self.cell(torch.cat([values[:, j] * m, m, gap], -1), h)
            h = m * update + (1 - m) * h
            last_time = torch.where(m[:, 0] > 0, t[..., j], last_time)
        mean, log_var = self.out(h).chunk(2, -1)
        return mean, log_var


class HiddenStateField(nn.Module):
    """g(t, h) = MLP(h): the ODE-RNN's hidden dynamics between observations (tanh activations)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        return self.net(h)


class ODERNNEncoder(nn.Module):
    """The ODE-RNN encoder of Rubanova, Chen & Duvenaud 2019 (§3.1, Algorithm 1), run backwards
    in time from the last grid time to the first as their latent ODE does (§3.2).

    With h = 0 at t_{T-1} and, for j = T-1, ..., 0,

        h'_j = ODESolve(g, h_{j+1}, (t_{j+1}, t_j))       (h'_{T-1} = 0: no gap before the start)
        h_j  = m_j · GRUCell([x_j · m_j, m_j], h'_j) + (1 − m_j) · h'_j

    where m_j is the (N, 1) mask at t_j: the hidden state flows by h' = g(h) through each gap and
    jumps by the GRU only where something was observed. The gap length enters through the ODE,
    not as a GRU input. (μ, log σ²) = Linear(h_0).

    The grid t (T,) is shared by the batch, so each gap is one solve for all N series. `solver`
    holds the ODEBlock keywords (method, gradient, step_size, rtol, atol, ...); fixed-step
    methods with no step_size take one step per gap.
    """

    def __init__(self, obs_dim: int, hidden: int, latent_dim: int, **solver):
        super().__init__()
        self.flow = ODEBlock(HiddenStateField(hidden), **solver)
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)
        self.gap_stats: list[dict] = []

    def forward(self, t: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z_0 | observations) from values (N, T, D) and mask (N, T)."""
        if t.dim() != 1:
            raise ValueError("the ODE-RNN encoder needs a shared time grid t (T,), not each "
                             "series' own times; use the GRU encoder")
        n, length, _ = values.shape
        h = values.new_zeros(n, self.cell.hidden_size)
        self.gap_stats = []
        for j in range(length - 1, -1, -1):
            if j < length - 1:
                h = self.flow.solve(h, t[j:j + 2].flip(0))[-1]  # from t[j + 1] back to t[j]
                self.gap_stats.append(self.flow.stats)
            m = mask[:, j:j + 1]
            update = self.cell(torch.cat([values[:, j] * m, m], -1), h)
            h = m * update + (1 - m) * h
        mean, log_var = self.out(h).chunk(2, -1)
        return mean, log_var

    @property
    def stats(self) -> dict:
        """The last forward pass's per-gap solve statistics, added up (NFE, steps, checkpoint
        bytes); read it after `loss.backward()` for the backward counters too."""
        total: dict = {}
        for gap in self.gap_stats:
            for key in _SUMMED_STATS:
                value = gap.get(key)
                if value is not None:
                    total[key] = total.get(key, 0) + value
        return total


class LatentField(nn.Module):
    """f(t, z) = MLP(z): autonomous latent dynamics with ELU activations."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
            nn.Linear(hidden, latent_dim),
        )

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class LatentODE(nn.Module):
    """Encoder, latent ODE block and decoder; `solver` holds the ODEBlock keywords.

    `encoder` picks q(z_0 | x): "gru" (`GRUEncoder`) or "ode_rnn" (`ODERNNEncoder`, whose gap
    solves use the same `solver` keywords as the latent ODE).
    """

    def __init__(
        self, obs_dim: int, latent_dim: int = 4, hidden: int = 32, encoder_hidden: int = 32,
        obs_std: float = 0.1, *, encoder: str = "gru", **solver,
    ):
        super().__init__()
        if encoder == "gru":
            self.encoder = GRUEncoder(obs_dim, encoder_hidden, latent_dim)
        elif encoder == "ode_rnn":
            self.encoder = ODERNNEncoder(obs_dim, encoder_hidden, latent_dim, **solver)
        else:
            raise UnknownNameError(
                f"unknown encoder {encoder!r}; valid encoders: {', '.join(ENCODERS)}"
            )
        self.block = ODEBlock(LatentField(latent_dim, hidden), **solver)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, obs_dim)
        )
        self.obs_std = obs_std

    def decode(self, z0: Tensor, t: Tensor) -> Tensor:
        """The decoded mean at every time of t: (N, T, D)."""
        zs = self.block.solve(z0, t)  # (T, N, latent)
        return self.decoder(zs).transpose(0, 1)

    def decode_per_sample(self, z0: Tensor, times: Tensor) -> Tensor:
        """The decoded mean at each series' own times, times (N, n) (row b strictly increasing
        from t_0): one per-sample solve, every series with its own steps; (N, n, D)."""
        block = self.block
        params = [p for p in block.func.parameters() if p.requires_grad]
        solution = solve(
            block.func, z0, times.to(z0), method=block.method, gradient=block.gradient,
            rtol=block.rtol, atol=block.atol, step_size=block.step_size,
            checkpoints=block.checkpoints, params=params, per_sample=True, **block.options,
        )
        block.stats = solution.stats
        return self.decoder(solution.ys).transpose(0, 1)

    def decode_union(self, z0: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
        """The decoded mean at each series' own times (N, T): one solve for the batch on the
        union of the times of the slots `mask` marks (all if None) and t_0, read back per
        slot; (N, T, D). Unmarked slots read a neighbouring union time (give them weight 0)."""
        chosen = times if mask is None else times[(mask > 0) | (torch.arange(
            times.shape[1], device=times.device) == 0)]
        union = torch.unique(chosen.reshape(-1))  # sorted
        position = torch.searchsorted(union, times.contiguous()).clamp_max(len(union) - 1)
        decoded = self.decode(z0, union)  # (N, U, D)
        return decoded.gather(1, position.unsqueeze(-1).expand(-1, -1, decoded.shape[-1]))

    def predict(self, t: Tensor, values: Tensor, encoder_mask: Tensor) -> Tensor:
        """The reconstruction/extrapolation from the posterior mean of z_0: (N, T, D); t the
        grid (T,) or each series' own times (N, T)."""
        mean, _ = self.encoder(t, values, encoder_mask)
        return self.decode(mean, t) if t.dim() == 1 else self.decode_union(mean, t)

    def forward(self, t: Tensor, values: Tensor, mask: Tensor, encoder_mask: Tensor,
                per_sample: bool = False) -> Tensor:
        """The negative ELBO per series, divided by the number of grid values T·D.

        The encoder reads `encoder_mask` (the observation window); the likelihood counts every
        observed value in `mask`, extrapolation horizon included. per_sample=True decodes each
        series at its own observed times only (`own_times`), not on the whole grid. t: the
        shared grid (T,), or each series' own times (N, T), decoded without per_sample on the
        union of the batch's observed times.
        """
        length = values.shape[1]
        mean, log_var = self.encoder(t, values, encoder_mask)
        z0 = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        if per_sample:
            index = own_times(mask)
            predicted = self.decode_per_sample(z0, t[index] if t.dim() == 1 else t.gather(1, index))
            values = values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
            mask = mask.gather(1, index)
        elif t.dim() == 1:
            predicted = self.decode(z0, t)
        else:
            predicted = self.decode_union(z0, t, mask)
        residual = (values - predicted) / self.obs_std
        log_lik = -0.5 * residual.pow(2) - math.log(self.obs_std) - 0.5 * math.log(2 * math.pi)
        log_lik = (log_lik * mask.unsqueeze(-1)).sum((1, 2))
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        return (kl - log_lik).mean() / (length * values.shape[2])


def own_times(mask: Tensor) -> Tensor:
    """Each series' grid indices for a per-sample solve, (N, n) ascending: index 0 (where z_0
    lives), then its observed points; n = the most any series needs, and a series with fewer
    is filled with its earliest unobserved points (weight 0 in the likelihood; read from the
    dense output, they cost no step unless they lie past the series' last observation)."""
    n_series, length = mask.shape
    columns = torch.arange(length, device=mask.device).expand(n_series, -1)
    key = torch.where(mask > 0, columns, columns + length)
    key = torch.where(columns == 0, -1, key)
    n = int((key < length).sum(1).max())  # one host read per batch
    return key.topk(n, dim=1, largest=False).indices.sort(dim=1).values
