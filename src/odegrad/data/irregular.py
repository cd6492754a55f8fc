"""Labelled multivariate series, irregular and partially observed, for neural CDE classifiers.

Two datasets, each returned as a `ClassificationSplit` of `LabelledSeries`:

- `load_japanese_vowels`: the UEA JapaneseVowels set (Kudo, Toyama & Shimbo 1999; 9 speakers,
  12 LPC cepstrum channels, 7–29 frames per utterance, 270 training / 370 test series), read
  from the `.ts` files bundled with sktime (offline; `pip install -e ".[uea]"`).
- `make_cde_spirals`: torchcde's toy problem, spirals x = cos(φ + s)/(1 + s/2),
  y = sin(φ + s)/(1 + s/2) over s ∈ [0, 4π], with x mirrored for half of them so that they turn
  the other way; the label is the direction.

Conventions: `values` (N, L, C) hold NaN where a value is missing; `times` (N, L) hold each
series' observation times and NaN after its end, so series of different lengths share one
padded tensor (the padding is NaN in every channel). `drop_observations` removes each observed
value independently with a given probability. Values are normalised per channel by the mean
and standard deviation of the training split's observed values.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LabelledSeries", "ClassificationSplit", "IRREGULAR_DATASETS", "load_japanese_vowels",
           "make_cde_spirals", "drop_observations", "read_ts", "japanese_vowels_dir"]

IRREGULAR_DATASETS = ("spirals", "japanese_vowels")

_INSTALL_HINT = ('install sktime\'s bundled datasets with `pip install -e ".[uea]"` (or pass a '
                 "folder holding JapaneseVowels_TRAIN.ts and JapaneseVowels_TEST.ts), or use "
                 "--dataset spirals")


@dataclass
class LabelledSeries:
    """times (N, L), values (N, L, C) and integer labels (N,); NaN = missing or past the end."""

    times: Tensor
    values: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def channels(self) -> int:
        return self.values.shape[-1]

    @property
    def lengths(self) -> Tensor:
        """The number of time points of each series (its times up to the NaN padding)."""
        return (~torch.isnan(self.times)).sum(1)

    def observed_fraction(self) -> float:
        """The fraction of values observed within the series' lengths."""
        inside = ~torch.isnan(self.times)
        observed = ~torch.isnan(self.values) & inside[..., None]
        return float(observed.sum()) / float(inside.sum() * self.channels)


@dataclass
class ClassificationSplit:
    """Training and test series of one dataset, with the class names and the normalisation."""

    train: LabelledSeries
    test: LabelledSeries
    name: str
    class_names: tuple[str, ...]
    mean: Tensor  # (C,): subtracted from the raw values
    std: Tensor  # (C,): then divided by

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def time_step(self) -> float:
        """The smallest gap between consecutive times of the training series."""
        gaps = self.train.times.diff(dim=1)
        return float(gaps[~torch.isnan(gaps)].min())


# ---------------------------------------------------------------- transformations


def drop_observations(series: LabelledSeries, fraction: float,
                      generator: torch.Generator) -> LabelledSeries:
    """A copy of `series` with each value removed (set to NaN) with probability `fraction`,
    independently per series, time and channel; the times are kept."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of observations to drop must be in [0, 1), got "
                         f"{fraction}")
    values = series.values.clone()
    if fraction > 0:
        dropped = torch.rand(values.shape, generator=generator) < fraction
        values[dropped] = math.nan
    return LabelledSeries(series.times, values, series.labels)


def _channel_statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (C,) of each channel's observed (non-NaN) values."""
    flat = values.reshape(-1, values.shape[-1])
    observed = ~torch.isnan(flat)
    count = observed.sum(0).clamp_min(1)
    filled = torch.where(observed, flat, torch.zeros(()))
    mean = filled.sum(0) / count
    spread = torch.where(observed, flat - mean, torch.zeros(())).pow(2).sum(0) / count
    return mean, spread.sqrt().clamp_min(1e-6)


def _normalised_split(train: LabelledSeries, test: LabelledSeries, name: str,
                      class_names: tuple[str, ...]) -> ClassificationSplit:
    """Standardise both splits per channel with the training split's observed values."""
    mean, std = _channel_statistics(train.values)

    def scale(series: LabelledSeries) -> LabelledSeries:
        return LabelledSeries(series.times, (series.values - mean) / std, series.labels)

    return ClassificationSplit(scale(train), scale(test), name, class_names, mean, std)


# ---------------------------------------------------------------- torchcde's spirals


def make_cde_spirals(n_train: int = 256, n_test: int = 128, length: int = 100,
                     noise: float = 0.01, drop: float = 0.0, seed: int = 0) -> ClassificationSplit:
    """Spirals r(s) = 1/(1 + s/2) at angle φ + s, s ∈ [0, 4π] on `length` points, φ ~ U(0, 2π);
    class 1 mirrors x (turns clockwise). Gaussian noise of std `noise`; times s/(4π) ∈ [0, 1].
    """
    if length < 2:
        raise ValueError(f"spirals need at least 2 time points, got length={length}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    s = torch.linspace(0.0, 4 * math.pi, length)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    labels = (torch.rand(n, generator=g) < 0.5).long()
    radius = 1.0 / (1.0 + 0.5 * s)
    x = torch.cos(phase + s) * radius
    y = torch.sin(phase + s) * radius
    x = torch.where(labels[:, None] == 1, -x, x)
    values = torch.stack([x, y], -1) + noise * torch.randn(n, length, 2, generator=g)
    times = (s / (4 * math.pi)).expand(n, length).clone()
    full = LabelledSeries(times, values, labels)
    full = drop_observations(full, drop, g)
    train = LabelledSeries(full.times[:n_train], full.values[:n_train], labels[:n_train])
    test = LabelledSeries(full.times[n_train:], full.values[n_train:], labels[n_train:])
    return _normalised_split(train, test, "spirals", ("anticlockwise", "clockwise"))


# ---------------------------------------------------------------- UEA JapaneseVowels


def japanese_vowels_dir() -> Path | None:
    """The folder of sktime's bundled JapaneseVowels files, found without importing sktime
    (which takes seconds); None if sktime is not installed."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / \
        "JapaneseVowels"


def read_ts(path: Path) -> tuple[list[Tensor], list[str]]:
    """The series (each (length, channels), float64) and labels of a UEA/sktime `.ts` file with
    class labels: after `@data`, one series per line, channels separated by ':', values by ',',
    the label last; '?' is a missing value."""
    series: list[Tensor] = []
    labels: list[str] = []
    in_data = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        try:
            columns = [[math.nan if v == "?" else float(v) for v in c.split(",")]
                       for c in channels]
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not a number in a series ({error})") from None
        if not columns or len({len(c) for c in columns}) != 1:
            raise ValueError(f"{path}:{number}: the channels of a series differ in length")
        series.append(torch.tensor(columns, dtype=torch.float64).T)
        labels.append(label.strip())
    if not series:
        raise ValueError(f"{path}: no series after an @data line")
    return series, labels


def _padded(series: list[Tensor], labels: list[int], time_step: float) -> LabelledSeries:
    """Pad to the longest series with NaN; time of frame j is j · time_step."""
    n, longest, channels = len(series), max(len(s) for s in series), series[0].shape[1]
    values = torch.full((n, longest, channels), math.nan, dtype=torch.float32)
    times = torch.full((n, longest), math.nan, dtype=torch.float32)
    for i, s in enumerate(series):
        values[i, :len(s)] = s.float()
        times[i, :len(s)] = time_step * torch.arange(len(s), dtype=torch.float32)
    return LabelledSeries(times, values, torch.tensor(labels, dtype=torch.long))


def load_japanese_vowels(drop: float = 0.0, seed: int = 0,
                         data_dir: str | Path | None = None) -> ClassificationSplit:
    """JapaneseVowels (UEA) from `data_dir` or sktime's bundled files: frame j at time
    j/(L − 1), L the longest utterance of both splits (29), so the longest spans [0, 1]; each
    value dropped with probability `drop` (a fixed draw from `seed`); standardised per channel.
    Raises FileNotFoundError naming how to get the files."""
    folder = Path(data_dir) if data_dir is not None else japanese_vowels_dir()
    if folder is None:
        raise FileNotFoundError(f"JapaneseVowels needs sktime, which is not installed: "
                                f"{_INSTALL_HINT}")
    files = [folder / f"JapaneseVowels_{part}.ts" for part in ("TRAIN", "TEST")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"JapaneseVowels: {', '.join(missing)} not found; "
                                f"{_INSTALL_HINT}")
    (train_series, train_labels), (test_series, test_labels) = (read_ts(f) for f in files)
    class_names = tuple(sorted(set(train_labels) | set(test_labels), key=_label_order))
    index = {name: i for i, name in enumerate(class_names)}
    longest = max(len(s) for s in (*train_series, *test_series))
    step = 1.0 / max(1, longest - 1)
    g = torch.Generator().manual_seed(seed)
    train = drop_observations(
        _padded(train_series, [index[c] for c in train_labels], step), drop, g)
    test = drop_observations(
        _padded(test_series, [index[c] for c in test_labels], step), drop, g)
    return _normalised_split(train, test, "japanese_vowels", class_names)


def _label_order(label: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order, then the others alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
