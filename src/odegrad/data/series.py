"""Irregularly sampled time series: synthetic spirals and real series from statsmodels.

Every dataset is a set of windows on a common time grid `t`. Each window keeps a random subset
of its grid points (`mask`), so series are sampled irregularly and differently from each other.
The first `n_observed` grid times form the observation window (what an encoder may see); the
rest is the extrapolation horizon. Spirals with `times="continuous"` are observed at their own
times instead: slot 0 at t_0, slots 1 … n_observed − 1 at sorted uniform random times in the
observation window [t_0, t[n_observed − 1]] (`Series.times`, (N, T)); the horizon slots stay
on the grid, and `keep` still masks the slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Series", "SeriesSplit", "make_spirals", "load_statsmodels_series", "SERIES",
           "TIMES"]

SERIES = ("spirals", "sunspots", "co2")
TIMES = ("grid", "continuous")  # where the series are observed: the shared grid or own times


@dataclass
class Series:
    """values (N, T, D) on the grid t (T,); mask (N, T) is 1 where a value was observed.

    `values` may be normalised: `original(values)` = values · scale + offset undoes it, with
    `offset` and `scale` of shape (N, 1, D) (None: the values are in original units).
    `times` (N, T): each series' own time of each slot (ascending, slot 0 at t_0), where the
    series are observed off the grid; None: every series is observed on the grid t.
    """

    t: Tensor
    values: Tensor
    mask: Tensor
    n_observed: int
    offset: Tensor | None = None
    scale: Tensor | None = None
    times: Tensor | None = None

    def original(self, values: Tensor, index: Tensor | slice = slice(None)) -> Tensor:
        """`values` of the series `index` (predictions too) back in the data's own units."""
        if self.scale is None:
            return values
        return values * self.scale[index].to(values) + self.offset[index].to(values)

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[-1]

    def series_times(self) -> Tensor:
        """Each series' time of each slot, (N, T): `times`, or the grid t for every series."""
        if self.times is not None:
            return self.times
        return self.t.expand(len(self), -1)

    def encoder_mask(self) -> Tensor:
        """The observations an encoder may read: the masked points of the observation window."""
        mask = self.mask.clone()
        mask[:, self.n_observed:] = 0.0
        return mask


@dataclass
class SeriesSplit:
    """Training and test windows of one dataset."""

    train: Series
    test: Series
    name: str
    time_unit: str = ""


def _irregular_mask(n: int, length: int, keep: float, g: torch.Generator) -> Tensor:
    """Keep each grid point with probability `keep`; every series keeps at least its first one."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    mask = (torch.rand(n, length, generator=g) < keep).float()
    mask[:, 0] = 1.0
    return mask


def make_spirals(
    n_train: int = 400, n_test: int = 100, length: int = 100, t_max: float = 6.0,
    observed_fraction: float = 0.6, keep: float = 0.5, noise: float = 0.05, seed: int = 0,
    times: str = "grid",
) -> SeriesSplit:
    """Archimedean spirals r(t) = r_0 + 0.3 t, angle φ ± 1.5 t, clockwise or counter-clockwise.

    Start radius r_0 ~ U(0.5, 1.5) and phase φ ~ U(0, 2π) vary per series; Gaussian noise of std
    `noise` is added to the observations. `times="continuous"`: each series is observed at its
    own sorted random times in the observation window (see the module docstring); the draws
    of "grid" come first and are unchanged, so both share r_0, φ, the noise and the mask.
    """
    if times not in TIMES:
        raise ValueError(f"times must be one of {', '.join(TIMES)}, got {times!r}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    t = torch.linspace(0.0, t_max, length)
    r0 = 0.5 + torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    direction = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    noise_draw = noise * torch.randn(n, length, 2, generator=g)
    mask = _irregular_mask(n, length, keep, g)
    n_observed = max(2, int(round(observed_fraction * length)))
    own = None
    if times == "continuous":
        own = _continuous_times(t, n, n_observed, g)
    radius = r0 + 0.3 * (t if own is None else own)
    angle = phase + direction * 1.5 * (t if own is None else own)
    values = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)
    values = values + noise_draw

    def part(rows: slice) -> Series:
        return Series(t, values[rows], mask[rows], n_observed,
                      times=None if own is None else own[rows])

    return SeriesSplit(train=part(slice(n_train)), test=part(slice(n_train, n)), name="spirals")


def _continuous_times(t: Tensor, n: int, n_observed: int, g: torch.Generator) -> Tensor:
    """(n, len(t)): slot 0 at t_0, slots 1 … n_observed − 1 sorted U(t_0, t[n_observed − 1])
    (drawn in float64, then nudged up by an ulp where float32 rounding made two equal, so each
    row is strictly increasing), the horizon slots on the grid."""
    start, end = float(t[0]), float(t[n_observed - 1])
    draws = start + (end - start) * torch.rand(n, n_observed - 1, generator=g,
                                               dtype=torch.float64)
    window = torch.cat([torch.full((n, 1), start, dtype=torch.float64),
                        draws.sort(dim=1).values], 1).to(t.dtype)
    for j in range(1, n_observed):
        window[:, j] = torch.maximum(window[:, j], torch.nextafter(window[:, j - 1],
                                                                   torch.tensor(math.inf)))
    horizon = t[n_observed:].expand(n, -1)
    own = torch.cat([window, horizon], 1)
    if not bool((own.diff(dim=1) > 0).all()):  # only if the window's last draws hit t[n_observed]
        raise ValueError("continuous times: a series' times are not strictly increasing")
    return own


def _raw_series(name: str) -> tuple[np.ndarray, str]:
    """The series as float64 and its time unit (sunspots: yearly; co2: monthly means)."""
    import statsmodels.datasets as datasets

    if name == "sunspots":
        frame = datasets.sunspots.load_pandas().data
        return frame["SUNACTIVITY"].to_numpy(dtype=np.float64), "year"
    if name == "co2":
        frame = datasets.co2.load_pandas().data
        monthly = frame["co2"].resample("MS").mean().interpolate(limit_direction="both")
        return monthly.to_numpy(dtype=np.float64), "month"
    raise ValueError(f"unknown statsmodels series {name!r}; valid: sunspots, co2")


def _window_statistics(windows: Tensor, mask: Tensor, n_observed: int) -> tuple[Tensor, Tensor]:
    """The mean and std (N, 1, 1) of each window's observed points in its observation window:
    what an encoder may see, so nothing from the extrapolation horizon leaks in."""
    seen = mask[:, :n_observed, None]
    count = seen.sum(1, keepdim=True)
    mean = (windows[:, :n_observed] * seen).sum(1, keepdim=True) / count
    spread = ((windows[:, :n_observed] - mean).pow(2) * seen).sum(1, keepdim=True) / count
    return mean, spread.sqrt().clamp_min(1e-3 * float(windows.abs().mean()))


def load_statsmodels_series(
    name: str = "sunspots", window: int = 24, stride: int = 1, time_step: float = 0.25,
    observed_fraction: float = 0.75, keep: float = 0.5, train_fraction: float = 0.7,
    normalise: str = "window", seed: int = 0,
) -> SeriesSplit:
    """Windows of a real series from statsmodels (sunspots 1700–2008 yearly, or Mauna Loa co2
    1958–2001 as monthly means), split in time: training windows lie in the first
    `train_fraction` of the record, test windows after it. Each window is subsampled
    irregularly (`keep`) and normalised (`normalise`: "window", by the mean and std of its own
    observed points in the observation window, so a model sees the shape and not the level
    that drifts across the record; or "global", by the training record's mean and std).
    Time runs `time_step` per sample. The defaults (24 samples over [0, 5.75]) hold about two
    solar or co2 cycles per window, which a latent ODE learns in a few hundred iterations;
    60-year windows stall on a smooth fit."""
    if normalise not in ("window", "global"):
        raise ValueError(f"normalise must be 'window' or 'global', got {normalise!r}")
    raw, unit = _raw_series(name)
    split = int(train_fraction * len(raw))
    if window < 4 or split - window < 0 or len(raw) - split < window:
        raise ValueError(
            f"window={window} does not fit the {name} record of {len(raw)} {unit}s split at "
            f"{split}"
        )
    values = torch.from_numpy(np.array(raw, dtype=np.float32))  # a copy: raw may be read-only

    def windows(start: int, stop: int) -> Tensor:
        starts = range(start, stop - window + 1, stride)
        return torch.stack([values[s:s + window] for s in starts])[..., None]

    g = torch.Generator().manual_seed(seed)
    t = time_step * torch.arange(window, dtype=torch.float32)
    n_observed = max(2, int(round(observed_fraction * window)))
    parts = []
    for start, stop in ((0, split), (split, len(raw))):
        data = windows(start, stop)
        mask = _irregular_mask(len(data), window, keep, g)
        if normalise == "global":
            record = values[:split]
            offset = torch.full((len(data), 1, 1), float(record.mean()))
            scale = torch.full((len(data), 1, 1), float(record.std(correction=0)))
        else:
            offset, scale = _window_statistics(data, mask, n_observed)
        parts.append(Series(t, (data - offset) / scale, mask, n_observed, offset, scale))
    return SeriesSplit(train=parts[0], test=parts[1], name=name, time_unit=unit)
