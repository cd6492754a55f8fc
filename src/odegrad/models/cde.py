"""Neural CDE classifier (Kidger, Morrill, Foster & Lyons 2020) for irregular, partially observed
multivariate series.

The observations become a continuous path X: [t_0, t_end] → R^{d_X} (`odegrad.paths`), whose
channels are the time, the values and, optionally, each value channel's cumulative count of
observations (torchcde's recommendation for missing data: the model sees what was observed).
Then

    z(t_0) = ζ_θ(X(t_0)),   dz = f_θ(z) dX(t), i.e. dz/dt = f_θ(t, z) · dX/dt,   ŷ = ℓ_θ(z(t_end)),

t_end each series' final observation time, with f_θ an MLP whose tanh output is reshaped to
(hidden, d_X) (ALGORITHMS.md §12), ζ_θ and ℓ_θ linear maps. The CDE is solved by
`odegrad.cdeint` with any method and gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import paths
from ..cde import solve_cde
from ..errors import InvalidInputError, UnknownNameError
from ..paths import Path

INTERPOLATIONS = tuple(paths.KINDS)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


class CDEField(nn.Module):
    """f_θ(t, z) = tanh(W_L σ(… σ(W_1 z))) reshaped to (…, hidden, channels); σ = ReLU as in
    torchcde's examples, or a smooth activation (tanh, softplus), which adaptive solvers and
    the continuous adjoints handle far better: their error estimates assume a smooth field."""

    def __init__(self, hidden: int, channels: int, width: int = 128, depth: int = 1,
                 activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UnknownNameError(f"unknown activation {activation!r}; valid: "
                                   f"{', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        size = hidden
        for _ in range(depth):
            layers += [nn.Linear(size, width), ACTIVATIONS[activation]()]
            size = width
        layers += [nn.Linear(size, hidden * channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.hidden, self.channels = hidden, channels

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z).unflatten(-1, (self.hidden, self.channels))


class NeuralCDE(nn.Module):
    """A neural CDE classifier: series (times, values with NaN) → class logits.

    `channels` counts the value channels of the data; the path adds the time channel and, with
    `mask_channels`, one cumulative observation count per value channel, scaled by
    `count_scale` (the task passes the grid step, so a fully observed channel's count follows
    the time channel). Every solver setting (method, gradient, step_size, rtol, atol,
    checkpoints, options) goes to `odegrad.cdeint` as is. After each forward pass `stats` holds
    the solve's statistics (completed by `loss.backward()`).
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        num_classes: int,
        *,
        width: int = 128,
        depth: int = 1,
        activation: str = "relu",
        interpolation: str = "hermite_cubic",
        mask_channels: bool = True,
        count_scale: float = 1.0,
        method: str = "rk4",
        gradient: str = "direct",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        step_size: float | None = None,
        checkpoints: str | int | None = None,
        **options,
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise UnknownNameError(f"unknown interpolation {interpolation!r}; valid: "
                                   f"{', '.join(INTERPOLATIONS)}")
        self.channels = channels
        self.mask_channels = mask_channels
        self.count_scale = count_scale
        self.path_channels = 1 + channels * (2 if mask_channels else 1)
        self.interpolation = interpolation
        self.initial = nn.Linear(self.path_channels, hidden)
        self.field = CDEField(hidden, self.path_channels, width, depth, activation)
        self.readout = nn.Linear(hidden, num_classes)
        self.solver = dict(method=method, gradient=gradient, rtol=rtol, atol=atol,
                           step_size=step_size, checkpoints=checkpoints, **options)
        self.stats: Mapping = {}

    # ------------------------------------------------------------ the path

    def path_data(self, times: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's shared time grid (L,), the path's data (N, L, d_X) and each series'
        length (N,). The data's channels are the time, the values and the scaled cumulative
        observation counts, NaN where missing or past a series' end (except the time channel
        of a rectilinear path, which holds each series' final time there: the paths module
        requires it observed). Every path then holds each channel's last observation after
        a series' end.

        `times` (N, L) (or (L,) for all) are NaN after each series' end, and the series must
        share one grid up to their ends; trailing columns where no series has data are cut.
        """
        if values.dim() != 3 or values.shape[-1] != self.channels:
            raise InvalidInputError(f"values must be (batch, length, {self.channels}), got "
                                    f"{tuple(values.shape)}")
        if times.dim() == 1:
            times = times.expand(values.shape[0], -1)
        if times.shape != values.shape[:2]:
            raise InvalidInputError(f"times {tuple(times.shape)} do not match values "
                                    f"{tuple(values.shape)}: expected (batch, length)")
        inside = ~torch.isnan(times)
        lengths = inside.sum(1)
        longest = int(lengths.max())
        if longest < 2:
            raise InvalidInputError("a neural CDE needs series of at least 2 time points")
        times, values, inside = times[:, :longest], values[:, :longest], inside[:, :longest]
        grid = times[int(lengths.argmax())]
        agrees = torch.where(inside, times == grid, True).all()
        if not bool(agrees) or not bool((inside[:, :-1] >= inside[:, 1:]).all()):
            raise InvalidInputError(
                "the series of a batch must share one time grid, each with NaN times only "
                "after its end; put irregular observations on a common grid with NaN values "
                "where a series has none")
        if self.interpolation == "rectilinear":  # needs the time channel observed
            times = torch.where(inside, times, times.gather(1, (lengths - 1).unsqueeze(1)))
        parts = [times.unsqueeze(-1), values]
        if self.mask_channels:
            counts = (~torch.isnan(values)).to(values.dtype).cumsum(1) * self.count_scale
            parts.append(torch.where(inside.unsqueeze(-1), counts, torch.nan))
        return grid, torch.cat(parts, -1), lengths

    def path(self, times: Tensor, values: Tensor) -> tuple[Path, Tensor, Tensor]:
        """The control path X of the batch (`odegrad.paths`, this model's interpolation), the
        grid of observation times (L,) and each series' length (N,)."""
        grid, data, lengths = self.path_data(times, values)
        if self.interpolation == "rectilinear":
            return paths.rectilinear(grid, data, time_channel=0), grid, lengths
        return paths.KINDS[self.interpolation](grid, data), grid, lengths

    # ------------------------------------------------------------ the solve

    def hidden_states(self, X: Path, t: Tensor) -> Tensor:
        """z at the times `t` along the path X (from z(t_0) = ζ(X(t_0))), (len(t), N, hidden).
        """
        t0 = X.knots[0]
        z0 = self.initial(X.evaluate(t0))
        params = [p for p in self.field.parameters() if p.requires_grad]
        solution = solve_cde(self.field, X, z0, t, params=params, **self.solver)
        self.stats = solution.stats  # live: the backward pass completes it
        return solution.ys

    def final_states(self, times: Tensor, values: Tensor) -> Tensor:
        """z at each series' own final time (N, hidden): the solve outputs z at every grid time
        and each series reads its last one, so a series' result does not depend on the padding
        that the longer series of its batch add (except with natural_cubic: the padding
        becomes constant knots after the series' end, which change the non-causal spline
        before it, as in torchcde)."""
        X, grid, lengths = self.path(times, values)
        zs = self.hidden_states(X, grid)
        return zs[lengths - 1, torch.arange(len(lengths), device=zs.device)]

    def forward(self, times: Tensor, values: Tensor) -> Tensor:
        """Class logits (N, num_classes) from z at each series' final time."""
        return self.readout(self.final_states(times, values))

    def extra_repr(self) -> str:
        s = self.solver
        settings = (f"interpolation={self.interpolation!r}, mask_channels={self.mask_channels}, "
                    f"method={s['method']!r}, gradient={s['gradient']!r}")
        if s["step_size"] is not None:
            settings += f", step_size={s['step_size']}"
        if s["checkpoints"] is not None:
            settings += f", checkpoints={s['checkpoints']!r}"
        return settings

