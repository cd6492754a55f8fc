"""Train an ODE model with any method and gradient: `odegrad train classifier|cnf|latent`.

classifier: an ODE-Net on scikit-learn's digits (or MNIST from local IDX files); cnf: a FFJORD
flow on a 2-D toy density; latent: a latent ODE on irregularly sampled spirals or a real
statsmodels series. Each run shows progress bars, prints metrics per epoch and writes to --out:
model.pt (state_dict), summary.json (final metrics, time per iteration, peak memory, NFE) and
PNG plots. Data parallel on several processes or GPUs when started by torchrun, e.g.

    torchrun --standalone --nproc_per_node=2 -m odegrad train classifier
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from . import distributed
from .api import solve
from .errors import OdegradError
from .gradients import available_gradients, load_gradient
from .models import CNF, ENCODERS, LatentODE, ODEBlock, ODENetClassifier, ODERNNEncoder
from .solvers import SOLVERS

# ---------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _checkpoints(text: str) -> str | int:
    """"all", "solution" or a positive int (a binomial checkpoint budget)."""
    if text in ("all", "solution"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'all', 'solution' or a positive integer budget, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the checkpoint budget must be positive, got {value}")
    return value


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as int, float, true/false or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: object = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---------------------------------------------------------------- tasks


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
        parser.add_argument("--channels", type=_positive_int, default=32,
                            help="feature maps of the ODE block")
        parser.add_argument("--downsample", type=int, choices=(0, 1, 2), default=None,
                            help="stride-2 convolutions before the ODE block (None: 0 for "
                                 "digits, 2 for MNIST)")
        parser.add_argument("--blocks", type=_positive_int, default=1, help="ODE blocks")

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
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        correct = (logits.argmax(-1) == y).sum()
        return loss, {"loss": loss.detach() * len(y), "correct": correct, "count": len(y)}

    @torch.no_grad()
    def evaluate(self, model):
        part = self._shard(len(self.data.y_test))
        x, y = self.data.x_test[part], self.data.y_test[part]
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for start in range(0, len(y), 500):
            xb, yb = x[start:start + 500].to(self.device), y[start:start + 500].to(self.device)
            logits = model(xb)
            sums["loss"] += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            sums["correct"] += float((logits.argmax(-1) == yb).sum())
            sums["count"] += len(yb)
        sums = self.all_reduce(sums)
        return {"test_loss": sums["loss"] / sums["count"],
                "test_accuracy": sums["correct"] / sums["count"]}

    def plot(self, model, history, out):
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
        figure.suptitle(self._title())
        return [_save(figure, out / "curves.png")]

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
        parser.add_argument("--n-train", type=_positive_int, default=8192,
                            help="training points")
        parser.add_argument("--n-test", type=_positive_int, default=4096, help="test points")
        parser.add_argument("--hidden", type=_int_list, default=(64, 64, 64),
                            help="hidden widths of the concat-squash field, comma-separated")
        parser.add_argument("--trace", choices=("auto", "exact", "hutchinson"), default="auto",
                            help="the divergence: exact, Hutchinson's estimate, or auto (exact "
                                 "up to 8 dimensions)")
        parser.add_argument("--grid", type=_positive_int, default=120,
                            help="points per axis of the density plot")

    def load(self) -> TensorDataset:
        from .data import sample_toy

        g = torch.Generator().manual_seed(1234)
        self.x_train = sample_toy(self.args.dataset, self.args.n_train, g)
        self.x_test = sample_toy(self.args.dataset, self.args.n_test, g)
        self.gaussian_nll = _gaussian_nll(self.x_train, self.x_test)
        return TensorDataset(self.x_train)

    def build(self) -> nn.Module:
        return CNF(2, hidden=self.args.hidden, trace=self.args.trace, **self.solver())

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
                                    baseline=("fitted Gaussian (test)", self.gaussian_nll)),
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
        parser.add_argument("--latent-dim", type=_positive_int, default=6,
                            help="dimension of the latent state")
        parser.add_argument("--hidden", type=_positive_int, default=48,
                            help="width of the field, decoder and encoder")
        parser.add_argument("--encoder", choices=ENCODERS, default="gru",
                            help="q(z_0 | x): a GRU with the gaps as input, or an ODE-RNN "
                                 "(Rubanova et al. 2019) whose hidden state follows an ODE "
                                 "between observations, solved with the solver settings")
        parser.add_argument("--obs-std", type=_positive_float, default=0.1,
                            help="the likelihood's noise std (standardised units)")
        parser.add_argument("--keep", type=_fraction, default=0.5,
                            help="fraction of grid points each series keeps (irregular sampling)")
        parser.add_argument("--window", type=_positive_int, default=None,
                            help="statsmodels series: samples per window (None: 24)")
        parser.add_argument("--time-step", type=_positive_float, default=None,
                            help="statsmodels series: time between samples (None: 0.25)")
        parser.add_argument("--normalise", choices=("window", "global"), default="window",
                            help="statsmodels series: standardise each window by its observed "
                                 "points, or all by the training record")

    def load(self) -> TensorDataset:
        from .data import load_statsmodels_series, make_spirals

        a = self.args
        if a.dataset == "spirals":
            self.split = make_spirals(keep=a.keep)
        else:
            options = {k: v for k, v in (("window", a.window), ("time_step", a.time_step))
                       if v is not None}
            self.split = load_statsmodels_series(a.dataset, keep=a.keep,
                                                 normalise=a.normalise, **options)
        train = self.split.train
        self.t = train.t.to(self.device)
        return TensorDataset(train.values, train.mask, train.encoder_mask())

    def build(self) -> nn.Module:
        a = self.args
        return LatentODE(self.split.train.dim, a.latent_dim, a.hidden, a.hidden, a.obs_std,
                         encoder=a.encoder, **self.solver())

    def loss(self, model, batch):
        values, mask, encoder_mask = batch
        loss = model(self.t, values, mask, encoder_mask)
        return loss, {"loss": loss.detach() * len(values), "count": len(values)}

    @torch.no_grad()
    def evaluate(self, model):
        test = self.split.test
        part = self._shard(len(test))
        values = test.values[part].to(self.device)
        mask = test.mask[part].to(self.device)
        encoder_mask = test.encoder_mask()[part].to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss = float(model(self.t, values, mask, encoder_mask)) * len(values)
        predicted = model.predict(self.t, values, encoder_mask)
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
        with torch.no_grad():
            predicted = model.predict(self.t, values, encoder_mask).cpu()
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


def _loss_figure(history, ylabel: str, title: str, baseline=None):
    figure = _figure(1, 1, (6, 4))
    ax = figure.axes[0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    test_key = "test_nll" if "test_nll" in history[0] else "test_loss"
    ax.plot(epochs, [h[test_key] for h in history], "s-", label="test")
    if baseline is not None:
        ax.axhline(baseline[1], color="0.4", ls="--", label=baseline[0])
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def _gaussian_nll(x_train: Tensor, x_test: Tensor) -> float:
    """The mean test NLL (nats) of the maximum-likelihood full-covariance Gaussian."""
    x_train, x_test = x_train.double(), x_test.double()
    mean = x_train.mean(0)
    cov = torch.cov(x_train.T, correction=0)
    gaussian = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return float(-gaussian.log_prob(x_test).mean())


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, task in TASKS.items():
        command = sub.add_parser(
            name, help=task.help, description=task.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _add_common(command, task.defaults, name)
        task.add_arguments(command)


def _add_common(parser: argparse.ArgumentParser, defaults: dict, name: str) -> None:
    solver = parser.add_argument_group("solver")
    solver.add_argument("--method", choices=sorted(SOLVERS), default=defaults["method"],
                        help="the ODE scheme")
    solver.add_argument("--gradient", choices=available_gradients(), default="direct",
                        help="how the solves are differentiated")
    solver.add_argument("--checkpoints", type=_checkpoints, default=None,
                        help="what gradient=discrete keeps: all, solution or an int budget")
    solver.add_argument("--step-size", type=_positive_float, default=defaults["step_size"],
                        help="fixed-step methods: the step; adaptive ones: the first step")
    solver.add_argument("--rtol", type=_positive_float, default=defaults["rtol"],
                        help="relative tolerance of adaptive methods")
    solver.add_argument("--atol", type=_positive_float, default=defaults["atol"],
                        help="absolute tolerance of adaptive methods")
    solver.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                        help="a method or gradient option passed to odegrad.solve, e.g. "
                             "coupling=0.999 (repeatable)")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=defaults["epochs"],
                          help="passes over the training set")
    training.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"],
                          help="the global batch, split evenly over the processes")
    training.add_argument("--lr", type=_positive_float, default=defaults["lr"],
                          help="AdamW's learning rate")
    training.add_argument("--weight-decay", type=float, default=defaults["weight_decay"],
                          help="AdamW's weight decay")
    training.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                          help="learning-rate schedule over all iterations")
    training.add_argument("--max-iters", type=_positive_int, default=None,
                          help="stop each epoch after this many iterations (quick checks)")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    training.add_argument("--seed", type=int, default=0,
                          help="seed of the initialisation, shuffling and sampling")
    training.add_argument("--threads", type=int, default=1,
                          help="torch CPU threads per process (0: torch's default); these "
                               "small models gain little from more and suffer from "
                               "oversubscription")
    training.add_argument("--out", type=Path, default=Path("runs") / name,
                          help="folder for model.pt, summary.json and the plots")
    training.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"odegrad train {args.model}: error: {message}", file=sys.stderr)
    return 2


def _check_solver(args: argparse.Namespace) -> None:
    """Fail fast on a bad method/gradient/options combination, on a tiny linear problem."""
    if args.checkpoints is not None and "checkpoints" not in getattr(
        load_gradient(args.gradient), "OPTIONS", ()
    ):
        raise ValueError(f"--checkpoints applies to --gradient discrete, not {args.gradient!r}")
    y0 = torch.ones(2, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0])
    solution = solve(lambda t, y: -y, y0, t, method=args.method, gradient=args.gradient,
                     rtol=args.rtol, atol=args.atol, step_size=args.step_size,
                     checkpoints=args.checkpoints, **dict(args.option or []))
    solution.ys[-1].sum().backward()


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    try:
        _check_solver(args)
    except (OdegradError, ValueError, TypeError) as error:
        return _error(args, str(error))
    try:
        context = distributed.setup(args.device)
    except ValueError as error:
        return _error(args, str(error))
    try:
        if args.batch_size % context.world_size:
            return _error(args, f"--batch-size {args.batch_size} is not divisible by the "
                                f"{context.world_size} processes")
        task = TASKS[args.model](args, context)
        try:
            train_set = task.load()
        except (FileNotFoundError, ValueError) as error:
            return _error(args, str(error))
        summary = train(task, train_set)
        if context.is_main:
            _print_summary(summary)
        return 0
    finally:
        distributed.shutdown(context)


# ---------------------------------------------------------------- the training loop


def _solvers(model: nn.Module) -> list[nn.Module]:
    """The modules whose `stats` count the solves of a forward pass: every ODEBlock, except those
    an ODE-RNN encoder runs once per gap (their `stats` hold the last gap only), which count
    through the encoder's summed `stats`."""
    encoders = [m for m in model.modules() if isinstance(m, ODERNNEncoder)]
    per_gap = {id(encoder.flow) for encoder in encoders}
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock) and id(m) not in per_gap]
    return [*blocks, *encoders]


def train(task: Task, train_set: TensorDataset) -> dict:
    """Train `task`'s model on `train_set`; write model.pt, summary.json and plots (rank 0)."""
    args, context = task.args, task.context
    torch.manual_seed(args.seed)
    model = task.build().to(context.device)
    ddp_model = distributed.wrap(model, context)
    torch.manual_seed(args.seed + context.rank)  # per-rank noise (latent samples, Hutchinson)
    sampler = distributed.sampler(train_set, context, shuffle=True, seed=args.seed)
    loader = DataLoader(
        train_set, batch_size=args.batch_size // context.world_size, sampler=sampler,
        shuffle=sampler is None, generator=torch.Generator().manual_seed(args.seed),
    )
    iters_per_epoch = len(loader) if args.max_iters is None else min(len(loader), args.max_iters)
    total_iters = args.epochs * iters_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_iters)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    out = Path(args.out)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"odegrad train {args.model}: {args.dataset}, {n_params} parameters, "
              f"method={args.method}, gradient={args.gradient}, {context.world_size} "
              f"process(es) on {context.device}, {total_iters} iterations")

    solvers = _solvers(model)  # whose stats count the NFE
    history: list[dict] = []
    iteration_times: list[float] = []
    nfe_forward = nfe_backward = 0
    checkpoint_bytes = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        sums: dict = {}
        epoch_start = time.perf_counter()
        bar = tqdm(loader, total=iters_per_epoch, desc=f"epoch {epoch}/{args.epochs}",
                   disable=args.no_progress or not context.is_main, leave=False,
                   dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if i >= iters_per_epoch:
                break
            start = time.perf_counter()
            batch = [b.to(context.device) for b in batch]
            loss, batch_sums = task.loss(ddp_model, batch)
            loss_value = float(loss.detach())  # the one host sync of the iteration
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss became {loss_value} at epoch "
                                         f"{epoch}, iteration {i}; lower --lr or the tolerances")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if context.device.type == "cuda":
                torch.cuda.synchronize(context.device)
            iteration_times.append(time.perf_counter() - start)
            for module in solvers:
                stats = module.stats
                nfe_forward += stats.get("nfe_forward", 0)
                nfe_backward += stats.get("nfe_backward", 0)
                held = stats.get("checkpoint_bytes")
                if held is not None:
                    checkpoint_bytes = max(checkpoint_bytes or 0, int(held))
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + (value.detach() if torch.is_tensor(value)
                                                  else value)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.close()
        train_time = time.perf_counter() - epoch_start
        sums = task.all_reduce(sums)
        record = {"epoch": epoch, "train_loss": sums["loss"] / sums["count"]}
        if "correct" in sums:
            record["train_accuracy"] = sums["correct"] / sums["count"]
        model.eval()
        record.update(task.evaluate(model))
        record["epoch_time_s"] = train_time
        history.append(record)
        if context.is_main:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                                if k not in ("epoch", "epoch_time_s"))
            tqdm.write(f"epoch {epoch}/{args.epochs}  {metrics}  ({train_time:.1f} s)")

    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "method": args.method,
        "gradient": args.gradient,
        "checkpoints": args.checkpoints,
        "final": {k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_time_s")},
        "epochs": args.epochs,
        "iterations": len(iteration_times),
        "time_per_iteration_s": sum(iteration_times) / max(1, len(iteration_times)),
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "nfe_forward_per_iteration": nfe_forward / max(1, len(iteration_times)),
        "nfe_backward_per_iteration": nfe_backward / max(1, len(iteration_times)),
        "checkpoint_bytes": checkpoint_bytes,
        "peak_memory": _peak_memory(context.device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": context.world_size,
        "device": str(context.device),
        "torch": torch.__version__,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("run",)},
        "history": history,
    }
    if context.is_main:
        torch.save(model.state_dict(), out / "model.pt")
        summary["files"] = ["model.pt", *task.plot(model, history, out), "summary.json"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _peak_memory(device: torch.device) -> dict:
    """CUDA: the peak bytes allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated",
                "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"kind": "cpu_max_rss", "bytes": rss}


def _print_summary(summary: dict) -> None:
    final = "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    peak = summary["peak_memory"]
    print(f"done: {final}")
    print(f"      {summary['iterations']} iterations, "
          f"{1e3 * summary['time_per_iteration_s']:.1f} ms/iteration, NFE/iteration "
          f"{summary['nfe_forward_per_iteration']:.1f} forward + "
          f"{summary['nfe_backward_per_iteration']:.1f} backward, peak memory "
          f"{peak['bytes'] / 2**20:.0f} MiB ({peak['kind']})")
    print(f"      wrote {', '.join(summary.get('files', []))} to {summary['arguments']['out']}")
