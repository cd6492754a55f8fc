"""`odegrad train sde`: a latent SDE (models/latent_sde.py) on a real series or on Lorenz paths.

Datasets: sunspots or co2 from statsmodels (windows of the record, split in time, standardised
by the training record's mean and std so the likelihood is a density of the series up to one
constant), or `lorenz`: paths of the stochastic Lorenz system of Li et al. 2020 §7.2 (Itô,
diagonal multiplicative noise), simulated here by Euler–Maruyama, standardised, with Gaussian
observation noise.

Metric: the held-out ELBO per observed value, a lower bound on the latent SDE's log-likelihood,
against the exact held-out log-likelihood of two constant-volatility baselines fitted by maximum
likelihood on the training windows, per channel: a Gaussian random walk with drift
(x' | x ~ N(x + μΔ, σ²Δ)) and an Ornstein–Uhlenbeck process (the continuous-time AR(1):
x' | x ~ N(c + (x − c)e^{−θΔ}, σ²(1 − e^{−2θΔ})/(2θ))), each with a Gaussian for the first value.
Δ is the gap between consecutive observed points, so irregular windows (--keep < 1) are exact.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .argtypes import fraction, positive_float, positive_int
from .data.series import Series, SeriesSplit
from .errors import InvalidInputError, UnsupportedCombinationError
from .models.latent_sde import LIKELIHOODS, LatentSDE
from .sde import SDE_METHODS, solve_sde
from .train_tasks import TASKS, Task, _figure, _save

SDE_DATASETS = ("sunspots", "co2", "lorenz")
_EVAL_CHUNK = 256


# ---------------------------------------------------------------- data


def make_lorenz(n_train: int = 512, n_test: int = 128, length: int = 100, t1: float = 2.0,
                noise_std: float = 0.01, dt: float = 1e-3, seed: int = 0) -> SeriesSplit:
    """Stochastic Lorenz (Itô): dx = a1(y − x) dt + b1 x dW1, dy = (a2 x − y − x z) dt
    + b2 y dW2, dz = (x y − a3 z) dt + b3 z dW3, a = (10, 28, 8/3), b = (0.1, 0.28, 0.3),
    x_0 ~ N(0, I); `length` times on [0, t1], Euler–Maruyama with step dt; standardised by the
    training paths' mean and std per channel, plus N(0, noise_std²) observation noise."""
    a1, a2, a3 = 10.0, 28.0, 8.0 / 3.0
    b = torch.tensor([0.1, 0.28, 0.3], dtype=torch.float64)

    def drift(t: Tensor, s: Tensor) -> Tensor:
        x, y, z = s.unbind(-1)
        return torch.stack([a1 * (y - x), a2 * x - y - x * z, x * y - a3 * z], -1)

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n_train + n_test, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.0, t1, length, dtype=torch.float64)
    with torch.no_grad():
        paths = solve_sde(drift, lambda t, s: b * s, x0, t, method="euler", sde_type="ito",
                          noise_type="diagonal", dt=dt, seed=seed).ys.transpose(0, 1)
    train = paths[:n_train]
    mean, std = train.mean((0, 1)), train.std((0, 1))
    values = (paths - mean) / std + noise_std * torch.randn(paths.shape, generator=g,
                                                            dtype=torch.float64)
    values, t = values.float(), t.float()
    mask = torch.ones(values.shape[:2])
    return SeriesSplit(train=Series(t, values[:n_train], mask[:n_train], length),
                       test=Series(t, values[n_train:], mask[n_train:], length),
                       name="lorenz", time_unit="time unit")


# ---------------------------------------------------------------- baselines


def _transitions(series: Series) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(first observed value of each window (N, D); previous value, next value and gap (M, D)
    of every pair of consecutive observed points), float64."""
    firsts, before, after, gaps = [], [], [], []
    t = series.t.double()
    for values, mask in zip(series.values.double(), series.mask):
        seen = mask.nonzero()[:, 0]
        v, times = values[seen], t[seen]
        firsts.append(v[0])
        before.append(v[:-1])
        after.append(v[1:])
        gaps.append((times[1:] - times[:-1]).unsqueeze(-1).expand_as(v[1:]))
    return torch.stack(firsts), torch.cat(before), torch.cat(after), torch.cat(gaps)


def _normal_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * ((x - mean).pow(2) / var + var.log() + math.log(2 * math.pi))


def baseline_log_likelihoods(train: Series, test: Series) -> dict[str, float]:
    """Held-out log-likelihood per observed value of the random walk with drift and of the
    Ornstein–Uhlenbeck process (module docstring), both fitted by maximum likelihood on `train`
    per channel, each with a maximum-likelihood Gaussian for the first value."""
    first, before, after, gap = _transitions(train)
    first_mean, first_var = first.mean(0), first.var(0, correction=0).clamp_min(1e-12)
    # Random walk with drift: closed-form maximum likelihood.
    step = after - before
    drift = step.sum(0) / gap.sum(0)
    rw_var = ((step - drift * gap).pow(2) / gap).mean(0).clamp_min(1e-12)
    # Ornstein–Uhlenbeck: numerical maximum likelihood in (c, log θ, log σ²).
    level = torch.cat([before, after]).mean(0).clone().requires_grad_()
    log_rate = torch.zeros_like(level).requires_grad_()
    log_var = rw_var.log().clone().requires_grad_()

    def ou_log_prob(x0: Tensor, x1: Tensor, h: Tensor) -> Tensor:
        rate = log_rate.exp()
        mean = level + (x0 - level) * torch.exp(-rate * h)
        var = log_var.exp() * -torch.expm1(-2 * rate * h) / (2 * rate)
        return _normal_log_prob(x1, mean, var)

    optimizer = torch.optim.LBFGS([level, log_rate, log_var], max_iter=200,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -ou_log_prob(before, after, gap).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    first, before, after, gap = _transitions(test)
    count = float(first.numel() + after.numel())
    start = _normal_log_prob(first, first_mean, first_var).sum()
    with torch.no_grad():
        rw = _normal_log_prob(after, before + drift * gap, rw_var * gap).sum()
        ou = ou_log_prob(before, after, gap).sum()
    return {"random_walk_loglik_per_value": float(start + rw) / count,
            "ou_loglik_per_value": float(start + ou) / count}


# ---------------------------------------------------------------- the task


class SDETask(Task):
    """A latent SDE (Li et al. 2020) on windows of a statsmodels series or on stochastic Lorenz
    paths, trained on the ELBO (KL annealed over --kl-anneal iterations); reports the held-out
    ELBO per observed value against the held-out log-likelihood of a random walk and an
    Ornstein–Uhlenbeck process fitted by maximum likelihood."""

    name = "sde"
    help = "latent SDE on a statsmodels series (sunspots, co2) or stochastic Lorenz paths"
    defaults = dict(method="reversible_heun", method_choices=SDE_METHODS, gradient="reversible",
                    step_size=None, rtol=None, atol=None, epochs=40, batch_size=32, lr=5e-3,
                    weight_decay=0.0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", choices=SDE_DATASETS, default="sunspots",
                            help="a statsmodels series or simulated stochastic Lorenz paths")
        parser.add_argument("--latent-dim", type=positive_int, default=4,
                            help="dimension of the latent SDE")
        parser.add_argument("--context-dim", type=positive_int, default=16,
                            help="size of the encoder's context c(t)")
        parser.add_argument("--hidden", type=positive_int, default=64,
                            help="width of the drifts, the diffusion and the encoder")
        parser.add_argument("--likelihood", choices=LIKELIHOODS, default="gaussian",
                            help="the observation likelihood")
        parser.add_argument("--obs-scale", type=positive_float, default=None,
                            help="fixed scale of the likelihood (None: learned per channel)")
        parser.add_argument("--kl-anneal", type=int, default=200,
                            help="iterations over which the KL weight rises linearly to 1 "
                                 "(0: no annealing)")
        parser.add_argument("--eval-samples", type=positive_int, default=8,
                            help="posterior samples averaged in the held-out ELBO")
        parser.add_argument("--plot-samples", type=positive_int, default=64,
                            help="sample paths behind each quantile band of the plots")
        parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                            help="precision of the model and data (float64 keeps the reversible "
                                 "reconstruction of the state at round-off)")
        parser.add_argument("--keep", type=fraction, default=1.0,
                            help="statsmodels series: fraction of grid points each window "
                                 "keeps (irregular sampling below 1)")
        parser.add_argument("--window", type=positive_int, default=24,
                            help="statsmodels series: samples per window")
        parser.add_argument("--time-step", type=positive_float, default=0.25,
                            help="statsmodels series: time between samples")
        parser.add_argument("--normalise", choices=("window", "global"), default="window",
                            help="statsmodels series: standardise each window by its own "
                                 "observation window (the first 75 %%), or all windows by the "
                                 "training record's mean and std")
        parser.add_argument("--n-train", type=positive_int, default=512,
                            help="lorenz: training paths")
        parser.add_argument("--n-test", type=positive_int, default=128,
                            help="lorenz: test paths")
        parser.add_argument("--length", type=positive_int, default=100,
                            help="lorenz: observation times on [0, 2]")
        parser.add_argument("--noise-std", type=positive_float, default=0.01,
                            help="lorenz: observation noise (standardised units)")

    @staticmethod
    def check_solver(args: argparse.Namespace) -> None:
        """Fail fast on bad SDE solver settings, on a scalar linear SDE with a parameter."""
        for name in ("rtol", "atol"):
            if getattr(args, name) is not None:
                raise UnsupportedCombinationError(
                    f"--{name} belongs to adaptive ODE steps; SDE solves take fixed steps "
                    "(--step-size is dt)")
        if args.kl_anneal < 0:
            raise InvalidInputError(f"--kl-anneal must be >= 0, got {args.kl_anneal}")
        rate = torch.tensor(1.0, requires_grad=True)
        solution = solve_sde(lambda t, y: -rate * y, lambda t, y: 0.1 + 0.0 * y,
                             torch.ones(2, 1), torch.tensor([0.0, 0.5, 1.0]),
                             method=args.method, gradient=args.gradient,
                             dt=args.step_size or 0.25, checkpoints=args.checkpoints, seed=0,
                             params=[rate], **dict(args.option or []))
        solution.ys[-1].sum().backward()

    def load(self) -> TensorDataset:
        from .data import load_statsmodels_series

        a = self.args
        if a.dataset == "lorenz":
            self.split = make_lorenz(a.n_train, a.n_test, a.length, noise_std=a.noise_std,
                                     seed=1234)
        else:
            self.split = load_statsmodels_series(a.dataset, window=a.window,
                                                 time_step=a.time_step, keep=a.keep,
                                                 normalise=a.normalise)
        self.baselines = baseline_log_likelihoods(self.split.train, self.split.test)
        self.dtype = getattr(torch, a.dtype)
        self.t = self.split.train.t.to(self.device, self.dtype)
        self.iteration = 0
        train = self.split.train
        return TensorDataset(train.values.to(self.dtype), train.mask.to(self.dtype))

    def dt(self) -> float:
        """--step-size, or half the grid spacing."""
        if self.args.step_size is not None:
            return self.args.step_size
        return 0.5 * float((self.t[1:] - self.t[:-1]).min())

    def build(self) -> nn.Module:
        a = self.args
        return LatentSDE(self.split.train.dim, a.latent_dim, a.context_dim, a.hidden,
                         dt=self.dt(), method=a.method, gradient=a.gradient,
                         checkpoints=a.checkpoints, likelihood=a.likelihood,
                         obs_scale=a.obs_scale, **dict(a.option or [])).to(self.dtype)

    def kl_weight(self) -> float:
        if self.args.kl_anneal == 0:
            return 1.0
        return min(1.0, self.iteration / self.args.kl_anneal)

    def loss(self, model, batch):
        values, mask = batch
        self.iteration += 1
        log_lik, initial_kl, path_kl = model(self.t, values, mask)
        count = mask.sum() * values.shape[-1]
        negative_elbo = (self.kl_weight() * (initial_kl + path_kl) - log_lik).sum()
        return negative_elbo / count, {"loss": negative_elbo.detach(), "count": count}

    @torch.no_grad()
    def evaluate(self, model):
        test = self.split.test
        part = self._shard(len(test))
        values = test.values[part].to(self.device, self.dtype)
        mask = test.mask[part].to(self.device, self.dtype)
        sums = {"elbo": 0.0, "kl": 0.0, "count": float(mask.sum()) * test.dim}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(self.args.eval_samples):
                for start in range(0, len(values), _EVAL_CHUNK):
                    chunk = slice(start, start + _EVAL_CHUNK)
                    log_lik, initial_kl, path_kl = model(self.t, values[chunk], mask[chunk])
                    kl = float((initial_kl + path_kl).sum())
                    sums["elbo"] += (float(log_lik.sum()) - kl) / self.args.eval_samples
                    sums["kl"] += kl / self.args.eval_samples
        sums = self.all_reduce(sums)
        elbo = sums["elbo"] / sums["count"]
        best = max(self.baselines.values())
        return {"test_loss": -elbo, "test_elbo_per_value": elbo,
                "test_kl_per_value": sums["kl"] / sums["count"], **self.baselines,
                "elbo_minus_best_baseline": elbo - best}

    # ------------------------------------------------------------ plots

    @torch.no_grad()
    def plot(self, model, history, out: Path) -> list[str]:
        return [_save(self._curves(history), out / "curves.png"),
                _save(self._posterior(model), out / "posterior.png"),
                _save(self._prior(model), out / "prior.png")]

    def _title(self) -> str:
        a = self.args
        return (f"latent SDE on {a.dataset}: method={a.method}, gradient={a.gradient}, "
                f"dt={self.dt():g}")

    def _curves(self, history):
        figure = _figure(1, 1, (7, 4.5))
        ax = figure.axes[0]
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (KL-annealed)")
        ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test −ELBO")
        for key, name, style in (("random_walk_loglik_per_value", "random walk", "--"),
                                 ("ou_loglik_per_value", "Ornstein–Uhlenbeck", ":")):
            ax.axhline(-self.baselines[key], color="0.4", ls=style, label=f"{name} test NLL")
        ax.set(xlabel="epoch", ylabel="nats per observed value", title=self._title())
        ax.grid(alpha=0.3)
        ax.legend()
        return figure

    def _units(self, values: Tensor, index: int) -> Tensor:
        """values (..., T, D) of test window `index` in the data's own units."""
        return self.split.test.original(values, index)

    def _posterior(self, model, n_series: int = 4):
        """Per test window and channel: the data, and quantile bands (5–95 %, 25–75 %), the
        median and three paths of the decoded posterior sample paths."""
        test = self.split.test
        shown = torch.linspace(0, len(test) - 1, n_series).long().tolist()
        channels = min(3, test.dim)
        figure = _figure(channels, n_series, (4.5 * n_series, 3.2 * channels))
        values = test.values[shown].to(self.device, self.dtype)
        mask = test.mask[shown].to(self.device, self.dtype)
        zs = model.sample_posterior(self.t, values, mask, self.args.plot_samples)
        paths = model.decoder(zs).permute(2, 1, 0, 3).float().cpu()  # (series, samples, T, D)
        t = test.t
        for column, index in enumerate(shown):
            data = self._units(test.values[index], index)
            sampled = self._units(paths[column], index)
            seen = test.mask[index].bool()
            for k in range(channels):
                ax = figure.axes[k * n_series + column]
                _bands(ax, t, sampled[..., k])
                ax.plot(t[seen], data[seen, k], "k.", ms=4, label="data")
                if k == 0:
                    ax.set_title(f"test window {index}")
                ax.set(xlabel="t", ylabel=f"channel {k + 1}")
        figure.axes[0].legend(fontsize=7)
        figure.suptitle(f"posterior sample paths — {self._title()}")
        return figure

    def _prior(self, model):
        """Per channel: quantile bands of decoded prior sample paths against those of the test
        windows (in standardised units)."""
        test = self.split.test
        channels = min(3, test.dim)
        figure = _figure(1, channels + 1, (4.5 * (channels + 1), 3.5))
        zs = model.sample_prior(self.args.plot_samples, self.t)
        paths = model.decoder(zs).transpose(0, 1).float().cpu()  # (samples, T, D)
        t = test.t
        for k in range(channels):
            data_ax = figure.axes[k]
            _bands(data_ax, t, test.values[..., k], color="0.3", label="test data")
            _bands(data_ax, t, paths[..., k], color="C0", label="prior", paths=0)
            data_ax.set(xlabel="t", ylabel=f"channel {k + 1} (standardised)")
        figure.axes[0].legend(fontsize=7)
        ax = figure.axes[channels]
        for j in range(min(8, len(paths))):
            ax.plot(t, paths[j, :, 0], lw=0.8)
        ax.set(xlabel="t", ylabel="channel 1 (standardised)", title="prior sample paths")
        figure.suptitle(f"prior sample paths — {self._title()}")
        return figure


def _bands(ax, t: Tensor, samples: Tensor, color: str = "C0", label: str = "posterior",
           paths: int = 3) -> None:
    """5–95 % and 25–75 % quantile bands, the median and a few paths of samples (S, T)."""
    samples = samples.detach().float()
    q = torch.quantile(samples, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=0)
    ax.fill_between(t, q[0], q[4], color=color, alpha=0.15, lw=0, label=f"{label} 5–95 %")
    ax.fill_between(t, q[1], q[3], color=color, alpha=0.3, lw=0, label=f"{label} 25–75 %")
    ax.plot(t, q[2], color=color, lw=1.2, label=f"{label} median")
    for j in range(min(paths, len(samples))):
        ax.plot(t, samples[j], color=color, lw=0.5, alpha=0.6)


TASKS[SDETask.name] = SDETask
