"""`odegrad train cde`: a neural CDE classifier on irregular, partially observed series.

Datasets (`odegrad.data.irregular`): torchcde's spirals toy (the quick default) and the UEA
JapaneseVowels set bundled with sktime (`pip install -e ".[uea]"`); `--drop` removes each value
at random to make the series irregular. Reports test accuracy; plots the loss and accuracy
curves and, for a few test series, the control path and the hidden state z(t).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .argtypes import positive_int
from .data.irregular import IRREGULAR_DATASETS, load_japanese_vowels, make_cde_spirals
from .models.cde import ACTIVATIONS, INTERPOLATIONS, NeuralCDE
from .train_tasks import TASKS, Task, _accuracy_figure, _classification_loss, _figure, _save

_EVAL_CHUNK = 512


def drop_fraction(text: str) -> float:
    """A number in [0, 1): the probability of removing each observed value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


class CDETask(Task):
    """A neural CDE classifier (Kidger et al. 2020) on irregular series, trained with
    cross-entropy; reports test accuracy. The path has time, the values and (unless
    --no-mask-channels) each channel's cumulative observation count as channels; the solver
    steps onto the path's knots."""

    name = "cde"
    help = "neural CDE classifier on torchcde's spirals or JapaneseVowels (sktime)"
    defaults = dict(method="rk4", step_size=None, rtol=1e-3, atol=1e-4, epochs=15,
                    batch_size=32, lr=3e-3, weight_decay=0.0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", choices=IRREGULAR_DATASETS, default="spirals",
                            help="torchcde's spirals toy (generated here) or the UEA "
                                 "JapaneseVowels set bundled with sktime")
        parser.add_argument("--data-dir", default=None,
                            help="japanese_vowels: a folder with JapaneseVowels_TRAIN.ts and "
                                 "_TEST.ts (None: sktime's bundled files)")
        parser.add_argument("--drop", type=drop_fraction, default=0.0,
                            help="probability of removing each observed value (NaN), a fixed "
                                 "draw per dataset")
        parser.add_argument("--interpolation", choices=INTERPOLATIONS, default="hermite_cubic",
                            help="the control path through the observations")
        parser.add_argument("--no-mask-channels", action="store_true",
                            help="leave out the cumulative observation counts as channels")
        parser.add_argument("--hidden", type=positive_int, default=32,
                            help="dimension of the hidden state z")
        parser.add_argument("--width", type=positive_int, default=128,
                            help="width of the vector field's hidden layers")
        parser.add_argument("--depth", type=positive_int, default=1,
                            help="hidden layers of the vector field")
        parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu",
                            help="the vector field's hidden activation (a smooth one suits "
                                 "adaptive methods and the continuous adjoints)")
        parser.add_argument("--n-train", type=positive_int, default=256,
                            help="spirals: training series")
        parser.add_argument("--n-test", type=positive_int, default=128,
                            help="spirals: test series")
        parser.add_argument("--length", type=positive_int, default=100,
                            help="spirals: time points per series (at least 2)")

    def load(self) -> TensorDataset:
        a = self.args
        if a.dataset == "spirals":
            self.data = make_cde_spirals(a.n_train, a.n_test, a.length, drop=a.drop)
        else:
            self.data = load_japanese_vowels(drop=a.drop, data_dir=a.data_dir)
        train = self.data.train
        return TensorDataset(train.times, train.values, train.labels)

    def build(self) -> nn.Module:
        a = self.args
        return NeuralCDE(self.data.train.channels, a.hidden, self.data.num_classes,
                         width=a.width, depth=a.depth, activation=a.activation,
                         interpolation=a.interpolation,
                         mask_channels=not a.no_mask_channels,
                         count_scale=self.data.time_step, **self.solver())

    def loss(self, model, batch):
        times, values, labels = batch
        return _classification_loss(model(times, values), labels)

    @torch.no_grad()
    def evaluate(self, model):
        test = self.data.test
        part = self._shard(len(test))
        return self._classification_metrics(model, (test.times[part], test.values[part]),
                                            test.labels[part], _EVAL_CHUNK)

    # ------------------------------------------------------------ plots

    def plot(self, model, history, out: Path) -> list[str]:
        return [_save(_accuracy_figure(history, self._title()), out / "curves.png"),
                _save(self._sample_paths(model), out / "paths.png")]

    def _title(self) -> str:
        a = self.args
        drop = f", {a.drop:.0%} dropped" if a.drop else ""
        return (f"neural CDE on {a.dataset}{drop}: method={a.method}, gradient={a.gradient}, "
                f"{a.interpolation}")

    def _sample_paths(self, model, n_series: int = 3, n_channels: int = 3, n_hidden: int = 6):
        """Top row: a few value channels of test series, observed points and the path X(t);
        bottom row: components of the hidden state z(t) along the solve."""
        test = self.data.test
        shown = torch.linspace(0, len(test) - 1, n_series).long().tolist()
        figure = _figure(2, n_series, (5 * n_series, 7))
        axes = [figure.axes[:n_series], figure.axes[n_series:]]
        for column, index in enumerate(shown):
            times = test.times[index:index + 1].to(self.device)
            values = test.values[index:index + 1].to(self.device)
            with torch.no_grad():
                path, grid, _ = model.path(times, values)
                # the grid, or 4 points per interval of a short one (a linear path solves
                # each interval between output times and knots separately)
                fine = grid if len(grid) > 25 else torch.linspace(
                    float(grid[0]), float(grid[-1]), 4 * len(grid) - 3).to(grid)
                curve = path.evaluate(fine)[0].cpu()
                zs = model.hidden_states(path, fine)[:, 0].cpu()
                predicted = int(model(times, values).argmax())
            fine = fine.cpu()
            observed_times, observed = test.times[index], test.values[index]
            for k in range(min(n_channels, test.channels)):
                color = f"C{k}"
                axes[0][column].plot(fine, curve[:, 1 + k], color=color, lw=1)
                axes[0][column].plot(observed_times, observed[:, k], ".", color=color,
                                     label=f"channel {k + 1}")
            for k in range(min(n_hidden, zs.shape[-1])):
                axes[1][column].plot(fine, zs[:, k], lw=1)
            names = self.data.class_names
            axes[0][column].set_title(f"test series {index}\nclass {names[int(test.labels[index])]}"
                                      f", predicted {names[predicted]}", fontsize=10)
            axes[0][column].set(xlabel="t", ylabel="normalised value")
            axes[1][column].set(xlabel="t", ylabel="z(t)",
                                title=f"first {min(n_hidden, zs.shape[-1])} hidden components")
        axes[0][0].legend(fontsize=8)
        figure.suptitle(self._title())
        return figure


TASKS[CDETask.name] = CDETask
