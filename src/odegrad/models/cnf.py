"""Continuous normalizing flow in the FFJORD style (Grathwohl et al. 2019).

The flow maps data x = z(0) to z(T) ~ N(0, I) with dz/dt = f(t, z); the log-density follows
from the instantaneous change of variables d log p(z(t))/dt = −tr(∂f/∂z), so

    log p(x) = log N(z(T); 0, I) + ∫_0^T tr(∂f/∂z(t, z(t))) dt,

computed by solving the augmented state (z, ℓ) with dℓ/dt = tr(∂f/∂z), ℓ(0) = 0. The trace is
exact (one VJP per dimension) for small dimensions and Hutchinson's unbiased estimate
ε^T (∂f/∂z) ε otherwise, with ε drawn once per solve and held fixed through it (so the
augmented field is one deterministic function that every gradient method can replay).

`per_sample=True` solves the batch with `odegrad.solve(..., per_sample=True)`: every sample
its own adaptive steps, so each sample's (z, ℓ), its log-density included, meets rtol/atol on
its own (the error norm is each sample's RMS, not the batch's) and the batch does not step at
the pace of its stiffest member. The augmented field is batch-independent: the field sees t of
shape (N,) (one time per sample, ConcatSquashLinear), the exact trace sums each row's own
diagonal, and Hutchinson's ε is one row per sample, fixed through the solve, so sample b's
estimate ε_b^T (∂f/∂z)_b ε_b is what its lone solve with ε_b computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedCombinationError
from .odeblock import ODEBlock

TRACES = ("auto", "exact", "hutchinson")
EXACT_TRACE_MAX_DIM = 8  # "auto" uses the exact trace up to this dimension


class ConcatSquashLinear(nn.Module):
    """(W x + b) ⊙ σ(a t + c) + d t: a linear layer gated and shifted by the time."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        time = t.to(x.dtype).reshape(-1, 1)  # a scalar t, or one time per row (per_sample)
        return self.linear(x) * torch.sigmoid(self.gate(time)) + self.shift(time)


class CNFField(nn.Module):
    """f(t, z): concat-squash layers with a smooth activation (the flow's velocity field)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh"):
        super().__init__()
        sizes = [dim, *hidden, dim]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )
        activations = {"tanh": torch.tanh, "softplus": nn.functional.softplus}
        if activation not in activations:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(activations)}")
        self.activation = activations[activation]

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for k, layer in enumerate(self.layers):
            z = layer(t, z)
            if k < len(self.layers) - 1:
                z = self.activation(z)
        return z


class AugmentedDynamics(nn.Module):
    """The field on (z, ℓ) stored as one tensor (N, d + 1): returns (f(t, z), tr ∂f/∂z).

    The divergence is built with `create_graph` exactly when the caller records a graph, so a
    graph-free forward pass (what memory-lean gradient methods run) stores nothing, while the
    direct gradient and the VJPs of the other methods differentiate through it.
    """

    def __init__(self, field: nn.Module, trace: str = "exact"):
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
        self.field = field
        self.trace = trace
        self.noise: Tensor | None = None  # ε for Hutchinson's estimator, set per solve

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        record = torch.is_grad_enabled()
        z = state[..., :-1]
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.field(t, z)
            divergence = self._divergence(dz, z, record)
        if not record:
            dz = dz.detach()
        return torch.cat([dz, divergence.unsqueeze(-1)], -1)

    def _divergence(self, dz: Tensor, z: Tensor, create_graph: bool) -> Tensor:
        if self.trace == "hutchinson":
            if self.noise is None or self.noise.shape != z.shape:
                raise RuntimeError(
                    "Hutchinson's trace needs the noise ε of shape "
                    f"{tuple(z.shape)} set before the solve (CNF.log_prob does it)"
                )
            (vjp,) = torch.autograd.grad(dz, z, self.noise, create_graph=create_graph)
            return (vjp * self.noise).sum(-1)
        columns = []
        for i in range(z.shape[-1]):
            (row,) = torch.autograd.grad(
                dz[..., i].sum(), z, create_graph=create_graph, retain_graph=True
            )
            columns.append(row[..., i])
        return torch.stack(columns, -1).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi))


class CNF(nn.Module):
    """A continuous normalizing flow on R^d, trained by maximum likelihood.

    `solver` holds the ODEBlock keywords (method, gradient, rtol, atol, step_size, ...).
    `trace`: "exact", "hutchinson" or "auto" (exact up to EXACT_TRACE_MAX_DIM dimensions).
    `field`: a velocity field f(t, z) to use instead of the concat-squash network (with
    `per_sample`, it gets t of shape (N,) and must treat the rows independently).
    `per_sample`: each sample solved with its own adaptive steps (module docstring).
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh",
        trace: str = "auto", t_end: float = 1.0, field: nn.Module | None = None,
        per_sample: bool = False, **solver,
    ):
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"unknown trace {trace!r}; valid: {', '.join(TRACES)}")
        if trace == "auto":
            trace = "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
        self.dim = dim
        self.field = field if field is not None else CNFField(dim, hidden, activation)
        self.dynamics = AugmentedDynamics(self.field, trace)
        if per_sample:
            solver["per_sample"] = True
        self.block = ODEBlock(self.dynamics, (0.0, t_end), **solver)

    def log_prob(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """log p(x) for each row of x (N, d), by the augmented solve from 0 to T. `noise`:
        Hutchinson's ε (N, d) (default: Rademacher, drawn here), one row per sample."""
        if self.dynamics.trace == "hutchinson":
            if noise is None:
                noise = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
            elif noise.shape != x.shape:
                raise InvalidInputError(
                    f"noise has shape {tuple(noise.shape)}; it must have x's {tuple(x.shape)}")
            self.dynamics.noise = noise
        elif noise is not None:
            raise UnsupportedCombinationError(
                "noise= is Hutchinson's ε, but this CNF uses the exact trace")
        state = torch.cat([x, x.new_zeros(x.shape[0], 1)], -1)
        end = self.block(state)
        z, trace_integral = end[:, :-1], end[:, -1]
        return standard_normal_log_prob(z) + trace_integral

    def forward(self, x: Tensor) -> Tensor:
        """The negative log-likelihood of x, averaged over the rows (nats)."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples: z(T) ~ N(0, I) carried back to t = 0 by the flow (no trace needed)."""
        param = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=param.dtype).to(param.device)
        block = self.block
        t = block.times[::-1]
        with_field = ODEBlock(
            self.field, t, method=block.method, gradient=block.gradient, rtol=block.rtol,
            atol=block.atol, step_size=block.step_size, checkpoints=block.checkpoints,
            **block.options,
        )
        return with_field(z)
