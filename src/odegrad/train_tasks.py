"""The models `odegrad train` trains: each task's arguments, data, loss, metrics and plots.

A task is a `Task` subclass registered in `TASKS` by name (classifier, cnf, latent); the
command line and the training loop are in `odegrad.train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from . import distributed
from .argtypes import fraction, int_at_least, int_list, positive_float, positive_int
from .models import CNF, ENCODERS, LatentODE, ODENetClassifier


class Task:
    """One kind of model: its arguments, data, loss, evaluation and plots."""

    name = ""
    help = ""
    defaults: dict = {}

    def __init__(self, args: argparse.Namespace, context: distributed.Context):
        self.args = args
        self.context = context
        self.device = context.device

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Task-specific arguments."""

    def solver(self) -> dict:
        """The ODEBlock keywords every task passes on."""
        a = self.args
        return dict(method=a.method, gradient=a.gradient, rtol=a.rtol, atol=a.atol,
                    step_size=a.step_size, checkpoints=a.checkpoints, **dict(a.option or []))

    def load(self) -> TensorDataset:
        """Load the data; return the training set."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: list[Tensor]) -> tuple[Tensor, dict]:
        """The training loss of a local batch and sums to log (each a float, with 'count')."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        """Test metrics over the whole test set (sharded over ranks, then all-reduced)."""
        raise NotImplementedError

    def plot(self, model: nn.Module, history: list[dict], out: Path) -> list[str]:
        """Write the task's PNGs; return their file names."""
        return []

    def _shard(self, n: int) -> slice:
        return slice(self.context.rank, n, self.context.world_size)

    def all_reduce(self, sums: dict) -> dict:
        """Sums over all ranks of a dict of numbers (floats or 0-dim tensors)."""
        keys = sorted(sums)
        values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        values = distributed.all_reduce_sum(values, self.context)
        return dict(zip(keys, values.tolist()))

    def _classification_metrics(self, model: nn.Module, inputs: tuple[Tensor, ...],
                                labels: Tensor, chunk: int) -> dict:
        """Test cross-entropy and accuracy of a classifier, `model(*inputs)` → logits, over
        this rank's part of the test set (`inputs`, `labels`), `chunk` items at a time; summed
        over all ranks."""
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for start in range(0, len(labels), chunk):
            part = slice(start, start + chunk)
            y = labels[part].to(self.device)
            logits = model(*(x[part].to(self.device) for x in inputs))
            sums["loss"] += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            sums["correct"] += float((logits.argmax(-1) == y).sum())
            sums["count"] += len(y)
        sums = self.all_reduce(sums)
        return {"test_loss": sums["loss"] / sums["count"],
                "test_accuracy": sums["correct"] / sums["count"]}


class ClassifierTask(Task):
    """An ODE-Net image classifier trained with cross-entropy; reports test accuracy."""

    name = "classifier"
    help = "ODE-Net image classifier on digits (8x8, offline) or MNIST (local IDX files)"
    defaults = dict(method="rk4", step_size=0.25, rtol=1e-3, atol=1e-4, epochs=10,
                    batch_size=64, lr=3e-3, weight_decay=1e-4)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                            help="the images")
        parser.add_argument("--data-dir", default=None,
                            help="folder with the MNIST IDX files (None: $ODEGRAD_DATA/mnist "
                                 "or ~/.cache/odegrad/mnist)")
        parser.add_argument("--channels", type=positive_int, default=32,
                            help="feature maps of the ODE block")
        parser.add_argument("--downsample", type=int, choices=(0, 1, 2), default=None,
                            help="stride-2 convolutions before the ODE block (None: 0 for "
                                 "digits, 2 for MNIST)")
        parser.add_argument("--blocks", type=positive_int, default=1, help="ODE blocks")

    def load(self) -> TensorDataset:
        from .data import load_digits, load_mnist

        a = self.args
        self.data = load_digits() if a.dataset == "digits" else load_mnist(a.data_dir)
        return TensorDataset(self.data.x_train, self.data.y_train)

    def build(self) -> nn.Module:
        a = self.args
        downsample = a.downsample if a.downsample is not None else (
            0 if a.dataset == "digits" else 2)
        return ODENetClassifier(self.data.shape[0], self.data.num_classes, a.channels,
                                downsample, a.blocks, **self.solver())

    def loss(self, model, batch):
        x, y = batch
        return _classification_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model):
        part = self._shard(len(self.data.y_test))
        return self._classification_metrics(model, (self.data.x_test[part],),
                                             self.data.y_test[part], 500)

    def plot(self, model, history, out):
        return [_save(_accuracy_figure(history, self._title()), out / "curves.png")]

    def _title(self) -> str:
        a = self.args
        return f"ODE-Net on {a.dataset}: method={a.method}, gradient={a.gradient}"


class CNFTask(Task):
    """A FFJORD continuous normalizing flow on a 2-D toy density, by maximum likelihood;
    reports the test NLL next to a fitted Gaussian's."""

    name = "cnf"
    help = "FFJORD continuous normalizing flow on a 2-D toy density"
    defaults = dict(method="dopri5", step_size=None, rtol=1e-5, atol=1e-5, epochs=10,
                    batch_size=256, lr=1e-2, weight_decay=0.0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from .data import TOY_DENSITIES

        parser.add_argument("--dataset", choices=TOY_DENSITIES, default="moons",
                            help="the 2-D density")
        parser.add_argument("--n-train", type=int_at_least(3), default=8192,
                            help="training points (at least 3, for the fitted Gaussian)")
        parser.add_argument("--n-test", type=positive_int, default=4096, help="test points")
        parser.add_argument("--hidden", type=int_list, default=(64, 64, 64),
                            help="hidden widths of the concat-squash field, comma-separated")
        parser.add_argument("--trace", choices=("auto", "exact", "hutchinson"), default="auto",
                            help="the divergence: exact, Hutchinson's estimate, or auto (exact "
                                 "up to 8 dimensions)")
        parser.add_argument("--grid", type=int_at_least(2), default=120,
                            help="points per axis of the density plot")
        parser.add_argument("--per-sample", action="store_true",
                            help="solve each point with its own adaptive steps (one "
                                 "per_sample=True solve): each log-density meets the tolerance "
                                 "on its own, and the batch does not step at the pace of its "
                                 "hardest point")

    def load(self) -> TensorDataset:
        from .data import sample_toy

        g = torch.Generator().manual_seed(1234)
        self.x_train = sample_toy(self.args.dataset, self.args.n_train, g)
        self.x_test = sample_toy(self.args.dataset, self.args.n_test, g)
        self.gaussian_nll = _gaussian_nll(self.x_train, self.x_test)
        return TensorDataset(self.x_train)

    def build(self) -> nn.Module:
        return CNF(2, hidden=self.args.hidden, trace=self.args.trace,
                   per_sample=self.args.per_sample, **self.solver())

    def loss(self, model, batch):
        (x,) = batch
        loss = model(x)
        return loss, {"loss": loss.detach() * len(x), "count": len(x)}

    @torch.no_grad()
    def evaluate(self, model):
        x = self.x_test[self._shard(len(self.x_test))]
        total = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for start in range(0, len(x), 1024):
                total -= float(model.log_prob(x[start:start + 1024].to(self.device)).sum())
        sums = self.all_reduce({"nll": total, "count": len(x)})
        return {"test_nll": sums["nll"] / sums["count"], "gaussian_test_nll": self.gaussian_nll}

    def plot(self, model, history, out):
        files = [_save(_loss_figure(history, "negative log-likelihood (nats)",
                                    f"CNF on {self.args.dataset}",
                                    baselines=[("fitted Gaussian (test)", self.gaussian_nll,
                                                "--")]),
                       out / "curves.png")]
        limit, n = 4.0, self.args.grid
        axis = torch.linspace(-limit, limit, n)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            log_density = torch.cat([model.log_prob(chunk.to(self.device)).cpu()
                                     for chunk in grid.split(2048)])
            samples = model.sample(4096, torch.Generator().manual_seed(0)).cpu()
        figure = _figure(1, 3, (15, 5))
        extent = (-limit, limit, -limit, limit)
        data_ax, density_ax, sample_ax = figure.axes
        data_ax.hist2d(*self.x_test.T.numpy(), bins=n // 2, range=[[-limit, limit]] * 2,
                       cmap="viridis")
        data_ax.set_title(f"data: {self.args.dataset} (test set)")
        density_ax.imshow(log_density.exp().reshape(n, n).numpy(), origin="lower",
                          extent=extent, cmap="viridis")
        density_ax.set_title("model density p(x)")
        sample_ax.hist2d(*samples.T.numpy(), bins=n // 2, range=[[-limit, limit]] * 2,
                         cmap="viridis")
        sample_ax.set_title("model samples")
        for ax in figure.axes:
            ax.set_aspect("equal")
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
        figure.suptitle(f"FFJORD CNF, method={self.args.method}, gradient={self.args.gradient}")
        files.append(_save(figure, out / "density.png"))
        return files


class LatentTask(Task):
    """A latent ODE on irregularly sampled series; reports reconstruction and extrapolation
    MSE (standardised units) from the posterior mean."""

    name = "latent"
    help = "latent ODE on irregularly sampled spirals or a statsmodels series"
    defaults = dict(method="dopri5", step_size=None, rtol=1e-3, atol=1e-4, epochs=80,
                    batch_size=32, lr=5e-3, weight_decay=0.0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from .data import SERIES

        parser.add_argument("--dataset", choices=SERIES, default="spirals",
                            help="synthetic spirals or a statsmodels series")
        parser.add_argument("--latent-dim", type=positive_int, default=6,
                            help="dimension of the latent state")
        parser.add_argument("--hidden", type=positive_int, default=48,
                            help="width of the field, decoder and encoder")
        parser.add_argument("--encoder", choices=ENCODERS, default="gru",
                            help="q(z_0 | x): a GRU with the gaps as input, or an ODE-RNN "
                                 "(Rubanova et al. 2019) whose hidden state follows an ODE "
                                 "between observations, solved with the solver settings")
        parser.add_argument("--obs-std", type=positive_float, default=0.1,
                            help="the likelihood's noise std (standardised units)")
        parser.add_argument("--per-sample", action="store_true",
                            help="training: decode each series at its own observation times "
                                 "(one per_sample=True solve, every series with its own steps) "
                                 "instead of at the union of the batch's times; evaluation "
                                 "stays on the shared grid")
        parser.add_argument("--keep", type=fraction, default=0.5,
                            help="fraction of grid points each series keeps (irregular sampling)")
        parser.add_argument("--times", choices=("grid", "continuous"), default="grid",
                            help="spirals: observed on the shared grid, or each series at its "
                                 "own sorted random times in the observation window (the "
                                 "horizon stays on the grid; --keep still masks the slots): "
                                 "the padded decoder then solves on the union of the batch's "
                                 "observed times, --per-sample on each series' own")
        parser.add_argument("--window", type=positive_int, default=None,
                            help="statsmodels series: samples per window (None: 24)")
        parser.add_argument("--time-step", type=positive_float, default=None,
                            help="statsmodels series: time between samples (None: 0.25)")
        parser.add_argument("--normalise", choices=("window", "global"), default="window",
                            help="statsmodels series: standardise each window by its observed "
                                 "points, or all by the training record")

    def load(self) -> TensorDataset:
        from .data import load_statsmodels_series, make_spirals

        a = self.args
        if a.times == "continuous" and (a.dataset != "spirals" or a.encoder != "gru"):
            raise ValueError("--times continuous needs --dataset spirals and --encoder gru "
                             "(the ODE-RNN encoder steps on a shared grid)")
        if a.dataset == "spirals":
            self.split = make_spirals(keep=a.keep, times=a.times)
        else:
            options = {k: v for k, v in (("window", a.window), ("time_step", a.time_step))
                       if v is not None}
            self.split = load_statsmodels_series(a.dataset, keep=a.keep,
                                                 normalise=a.normalise, **options)
        train = self.split.train
        self.t = train.t.to(self.device)
        if train.times is not None:  # each series' own times travel with its batch
            return TensorDataset(train.values, train.mask, train.encoder_mask(), train.times)
        return TensorDataset(train.values, train.mask, train.encoder_mask())

    def build(self) -> nn.Module:
        a = self.args
        return LatentODE(self.split.train.dim, a.latent_dim, a.hidden, a.hidden, a.obs_std,
                         encoder=a.encoder, **self.solver())

    def loss(self, model, batch):
        values, mask, encoder_mask, *times = batch
        t = times[0] if times else self.t
        loss = model(t, values, mask, encoder_mask, per_sample=self.args.per_sample)
        return loss, {"loss": loss.detach() * len(values), "count": len(values)}

    @torch.no_grad()
    def evaluate(self, model):
        test = self.split.test
        part = self._shard(len(test))
        values = test.values[part].to(self.device)
        mask = test.mask[part].to(self.device)
        encoder_mask = test.encoder_mask()[part].to(self.device)
        # continuous times: each series' own slots, decoded on the union of the split's times
        t = self.t if test.times is None else test.times[part].to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss = float(model(t, values, mask, encoder_mask)) * len(values)
        predicted = model.predict(t, values, encoder_mask)
        error = (predicted - values).pow(2).mean(-1)
        error_original = (test.original(predicted, part) - test.original(values, part)).pow(2)
        error_original = error_original.mean(-1)
        k = test.n_observed
        # a naive reference: each series' mean over what the encoder saw, held constant
        seen = encoder_mask.unsqueeze(-1)
        level = (values * seen).sum(1, keepdim=True) / seen.sum(1, keepdim=True)
        naive = (level - values[:, k:]).pow(2).mean(-1)
        sums = self.all_reduce({
            "loss": loss, "count": len(values),
            "recon": float(error[:, :k].mean(-1).sum()),
            "extrap": float(error[:, k:].mean(-1).sum()),
            "naive": float(naive.mean(-1).sum()),
            "recon_original": float(error_original[:, :k].mean(-1).sum()),
            "extrap_original": float(error_original[:, k:].mean(-1).sum()),
        })
        n = sums["count"]
        metrics = {"test_loss": sums["loss"] / n, "reconstruction_mse": sums["recon"] / n,
                   "extrapolation_mse": sums["extrap"] / n,
                   "constant_extrapolation_mse": sums["naive"] / n}
        if test.scale is not None:
            metrics["reconstruction_mse_original_units"] = sums["recon_original"] / n
            metrics["extrapolation_mse_original_units"] = sums["extrap_original"] / n
        return metrics

    def plot(self, model, history, out):
        files = [_save(_loss_figure(history, "negative ELBO per grid value",
                                    f"latent ODE on {self.args.dataset}"), out / "curves.png")]
        test = self.split.test
        shown = torch.linspace(0, len(test) - 1, 4).long()
        values = test.values[shown].to(self.device)
        encoder_mask = test.encoder_mask()[shown].to(self.device)
        t = self.t if test.times is None else test.times[shown].to(self.device)
        with torch.no_grad():
            predicted = model.predict(t, values, encoder_mask).cpu()
        values, encoder_mask, t = values.cpu(), encoder_mask.cpu().bool(), test.t
        k = test.n_observed
        figure = _figure(1, 4, (18, 4.5))
        for j, ax in enumerate(figure.axes):
            seen = encoder_mask[j]
            if test.dim == 2:
                ax.plot(*values[j].T, color="0.75", lw=1, label="truth")
                ax.plot(*values[j][seen].T, "k.", label="observed")
                ax.plot(*predicted[j, :k].T, "C0-", label="reconstruction")
                ax.plot(*predicted[j, k - 1:].T, "C3--", label="extrapolation")
                ax.set_aspect("equal")
            else:
                truth = test.original(values[j], shown[j])[:, 0]
                guess = test.original(predicted[j], shown[j])[:, 0]
                steps = torch.arange(len(t))
                ax.plot(steps, truth, color="0.75", lw=1, label="truth")
                ax.plot(steps[seen], truth[seen], "k.", label="observed")
                ax.plot(steps[:k], guess[:k], "C0-", label="reconstruction")
                ax.plot(steps[k - 1:], guess[k - 1:], "C3--", label="extrapolation")
                ax.axvline(k - 1, color="0.5", ls=":")
                ax.set_xlabel(f"{self.split.time_unit}s from window start")
            ax.set_title(f"test series {int(shown[j])}")
        figure.axes[0].legend(fontsize=8)
        figure.suptitle(f"latent ODE on {self.args.dataset}: method={self.args.method}, "
                        f"gradient={self.args.gradient}")
        files.append(_save(figure, out / "reconstructions.png"))
        return files


TASKS: dict[str, type[Task]] = {t.name: t for t in (ClassifierTask, CNFTask, LatentTask)}


# ---------------------------------------------------------------- plotting helpers


def _figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    figure.subplots(rows, cols)
    return figure


def _save(figure, path: Path) -> str:
    figure.savefig(path, dpi=100)
    return path.name


def _loss_figure(history, ylabel: str, title: str, baselines=(), labels=("train", "test"),
                 size: tuple[float, float] = (6, 4)):
    """Train and test loss per epoch (the test NLL where the history has one), with a
    horizontal line per (label, value, line style) of `baselines`."""
    figure = _figure(1, 1, size)
    ax = figure.axes[0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label=labels[0])
    test_key = "test_nll" if "test_nll" in history[0] else "test_loss"
    ax.plot(epochs, [h[test_key] for h in history], "s-", label=labels[1])
    for label, value, style in baselines:
        ax.axhline(value, color="0.4", ls=style, label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def _accuracy_figure(history, title: str):
    """A classifier's curves: train and test cross-entropy (log scale) and accuracy."""
    figure = _figure(1, 2, (10, 4))
    epochs = [h["epoch"] for h in history]
    left, right = figure.axes
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    right.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    right.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in figure.axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return figure


def _classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
    """A classifier's training loss (mean cross-entropy) and the sums it logs."""
    loss = nn.functional.cross_entropy(logits, labels)
    correct = (logits.argmax(-1) == labels).sum()
    return loss, {"loss": loss.detach() * len(labels), "correct": correct,
                  "count": len(labels)}


def _gaussian_nll(x_train: Tensor, x_test: Tensor) -> float:
    """The mean test NLL (nats) of the maximum-likelihood full-covariance Gaussian."""
    x_train, x_test = x_train.double(), x_test.double()
    mean = x_train.mean(0)
    cov = torch.cov(x_train.T, correction=0)
    gaussian = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return float(-gaussian.log_prob(x_test).mean())

from . import train_cde, train_sde  # noqa: E402, F401, I001  (register CDETask, SDETask in TASKS)
