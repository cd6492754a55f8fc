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

Forecast metrics (after the last epoch, windows with a horizon: the grid after the first
n_observed times, 6 of 24 for the statsmodels series): each model forecasts the horizon of a
test window from its observation window only, and is scored on the same observed horizon values
in the same units. The latent SDE: the posterior on the observation window, then the prior SDE
(`LatentSDE.forecast`, --forecast-samples paths); the baselines: their exact transition from
the last observed value. Per value: the marginal predictive log density of x(t_i) (a Monte
Carlo mixture for the latent SDE, biased low), the joint one of the horizon, and the CRPS.
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
from .train_tasks import TASKS, Task, _figure, _loss_figure, _save

SDE_DATASETS = ("sunspots", "co2", "lorenz")
OBS_SCALE = 0.3
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


def _fit_baselines(train: Series) -> dict:
    """Maximum-likelihood fits on `train`, per channel (D,): the first value's Gaussian
    (first_mean, first_var), the random walk (drift, rw_var) and the OU process (level, rate,
    ou_var); and `transition(name, x0, h)`: the mean and variance of x(t + h) | x(t) = x0."""
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
    level, rate, ou_var = level.detach(), log_rate.detach().exp(), log_var.detach().exp()

    def transition(name: str, x0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if name == "random_walk":
            return x0 + drift * h, rw_var * h
        return (level + (x0 - level) * torch.exp(-rate * h),
                ou_var * -torch.expm1(-2 * rate * h) / (2 * rate))

    return {"first_mean": first_mean, "first_var": first_var, "transition": transition}


BASELINES = ("random_walk", "ou")


def baseline_log_likelihoods(train: Series, test: Series) -> dict[str, float]:
    """Held-out log-likelihood per observed value of the random walk with drift and of the
    Ornstein–Uhlenbeck process (module docstring), both fitted by maximum likelihood on `train`
    per channel, each with a maximum-likelihood Gaussian for the first value."""
    fit = _fit_baselines(train)
    first, before, after, gap = _transitions(test)
    count = float(first.numel() + after.numel())
    start = _normal_log_prob(first, fit["first_mean"], fit["first_var"]).sum()
    result = {}
    for name in BASELINES:
        mean, var = fit["transition"](name, before, gap)
        result[f"{name}_loglik_per_value"] = float(start + _normal_log_prob(after, mean,
                                                                            var).sum()) / count
    return result


def _horizon(series: Series) -> tuple[Tensor, Tensor, Tensor]:
    """The forecast set-up of every window: (last observed value of the observation window
    (N, D) and its time (N, 1), the observed-horizon mask (N, H)), float64; the horizon is
    the grid after the first n_observed times."""
    t = series.t.double()
    seen = series.mask[:, :series.n_observed].bool()
    last = series.n_observed - 1 - seen.flip(1).float().argmax(1)  # every window sees t_0
    rows = torch.arange(len(series))
    return (series.values.double()[rows, last], t[last].unsqueeze(-1),
            series.mask[:, series.n_observed:].double())


def gaussian_crps(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """The continuous ranked probability score of N(mean, var) at x, element-wise (closed form,
    Gneiting & Raftery 2007): σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π], z = (x − mean)/σ."""
    std = var.sqrt()
    z = (x - mean) / std
    normal = torch.distributions.Normal(0.0, 1.0)
    return std * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp()
                  - 1 / math.sqrt(math.pi))


def sample_crps(x: Tensor, samples: Tensor) -> Tensor:
    """The fair (unbiased) sample CRPS: mean_s |y_s − x| − Σ_{s≠s'} |y_s − y_s'| / (2S(S − 1))
    for samples (S, ...) of the forecast at x (...)."""
    n = samples.shape[0]
    ordered = samples.sort(0).values
    rank = torch.arange(1, n + 1, dtype=samples.dtype, device=samples.device)
    weights = (2 * rank - n - 1).reshape(-1, *[1] * (samples.dim() - 1))
    spread = 2 * (weights * ordered).sum(0)  # Σ_{s,s'} |y_s − y_s'|
    return (samples - x).abs().mean(0) - spread / (2 * n * (n - 1))


def baseline_forecasts(train: Series, test: Series) -> dict[str, float]:
    """The random walk's and the OU process's forecasts of the horizon of every test window,
    given its last observed value in the observation window (both are Markov, so that value is
    all they condition on), per observed horizon value: the marginal predictive log density
    (`forecast_loglik`, x(t_i) | x(t_c) in closed form), the joint predictive log density of
    the horizon (`forecast_joint_loglik`, the chain of transitions) and the CRPS (closed form;
    lower is better). Empty when the test windows have no observed horizon value."""
    if test.n_observed >= len(test.t) or not bool(test.mask[:, test.n_observed:].any()):
        return {}
    fit = _fit_baselines(train)
    x_c, t_c, horizon = _horizon(test)
    t = test.t.double()[test.n_observed:]
    values = test.values.double()[:, test.n_observed:]
    seen = horizon.unsqueeze(-1).expand_as(values)
    count = float(seen.sum())
    result = {}
    for name in BASELINES:
        mean, var = fit["transition"](name, x_c.unsqueeze(1), (t - t_c).unsqueeze(-1))
        marginal = _normal_log_prob(values, mean, var)
        crps = gaussian_crps(values, mean, var)
        joint = 0.0
        for x, mask, x0, t0 in zip(values, horizon, x_c, t_c):
            times = torch.cat([t0, t[mask.bool()]])
            chain = torch.cat([x0.unsqueeze(0), x[mask.bool()]])
            mean_j, var_j = fit["transition"](name, chain[:-1],
                                              (times[1:] - times[:-1]).unsqueeze(-1))
            joint += float(_normal_log_prob(chain[1:], mean_j, var_j).sum())
        result[f"{name}_forecast_loglik_per_value"] = float((marginal * seen).sum()) / count
        result[f"{name}_forecast_joint_loglik_per_value"] = joint / count
        result[f"{name}_forecast_crps_per_value"] = float((crps * seen).sum()) / count
    return result


# ---------------------------------------------------------------- the task


class SDETask(Task):
    """A latent SDE (Li et al. 2020) on windows of a statsmodels series or on stochastic Lorenz
    paths, trained on the ELBO (KL annealed over --kl-anneal iterations, the observation scale
    fixed at --obs-scale unless --obs-scale-hold releases it); reports the held-out ELBO per
    observed value against the held-out log-likelihood of a random walk and an
    Ornstein–Uhlenbeck process fitted by maximum likelihood, and after the last epoch the
    forecast metrics of the module docstring for all three."""

    name = "sde"
    help = "latent SDE on a statsmodels series (sunspots, co2) or stochastic Lorenz paths"
    defaults = dict(method="midpoint", method_choices=SDE_METHODS, gradient="direct",
                    step_size=None, rtol=None, atol=None, epochs=80, batch_size=32, lr=1e-2,
                    weight_decay=0.0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", choices=SDE_DATASETS, default="sunspots",
                            help="a statsmodels series or simulated stochastic Lorenz paths")
        parser.add_argument("--latent-dim", type=positive_int, default=4,
                            help="dimension of the latent SDE")
        parser.add_argument("--context-dim", type=positive_int, default=16,
                            help="size of the encoder's context c(t)")
        parser.add_argument("--hidden", type=positive_int, default=32,
                            help="width of the drifts, the diffusion and the encoder")
        parser.add_argument("--likelihood", choices=LIKELIHOODS, default="gaussian",
                            help="the observation likelihood")
        parser.add_argument("--obs-scale", type=positive_float, default=OBS_SCALE,
                            help="the likelihood's scale (per channel) at the start")
        parser.add_argument("--obs-scale-hold", type=int, default=-1,
                            help="iterations during which the likelihood's scale stays at "
                                 "--obs-scale before it is learned (-1: never learned, a "
                                 "fixed scale as in torchsde's examples)")
        parser.add_argument("--forecast-samples", type=positive_int, default=256,
                            help="sample paths per test window in the final forecast metrics")
        parser.add_argument("--kl-anneal", type=int, default=300,
                            help="iterations over which the KL weight rises linearly to 1 "
                                 "(0: no annealing)")
        parser.add_argument("--eval-samples", type=positive_int, default=4,
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
        if args.obs_scale_hold < -1:
            raise InvalidInputError(f"--obs-scale-hold must be >= -1, got {args.obs_scale_hold}")
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
        self.baseline_forecasts = baseline_forecasts(self.split.train, self.split.test)
        self.evaluations = 0
        self.dtype = getattr(torch, a.dtype)
        self.t = self.split.train.t.to(self.device, self.dtype)
        self.iteration = 0
        train = self.split.train
        return TensorDataset(train.values.to(self.dtype), train.mask.to(self.dtype))

    def dt(self) -> float:
        """--step-size, or the grid spacing (the context is piecewise constant between
        observation times; see `PiecewiseContext` on which schemes read it in step)."""
        if self.args.step_size is not None:
            return self.args.step_size
        return float((self.t[1:] - self.t[:-1]).min())

    def build(self) -> nn.Module:
        a = self.args
        return LatentSDE(self.split.train.dim, a.latent_dim, a.context_dim, a.hidden,
                         dt=self.dt(), method=a.method, gradient=a.gradient,
                         checkpoints=a.checkpoints, likelihood=a.likelihood,
                         obs_scale=a.obs_scale, learn_obs_scale=self.obs_scale_hold() == 0,
                         **dict(a.option or [])).to(self.dtype)

    def obs_scale_hold(self) -> int:
        return self.args.obs_scale_hold

    def kl_weight(self) -> float:
        if self.args.kl_anneal == 0:
            return 1.0
        return min(1.0, self.iteration / self.args.kl_anneal)

    def loss(self, model, batch):
        values, mask = batch
        self.iteration += 1
        if self.iteration == self.obs_scale_hold() + 1:
            getattr(model, "module", model).obs_log_scale.requires_grad_(True)
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
        record = {"test_loss": -elbo, "test_elbo_per_value": elbo,
                  "test_kl_per_value": sums["kl"] / sums["count"], **self.baselines,
                  "elbo_minus_best_baseline": elbo - best,
                  "obs_scale": float(model.obs_log_scale.exp().mean())}
        self.evaluations += 1
        if self.evaluations == self.args.epochs and self.baseline_forecasts:
            record.update(self.forecast_metrics(model))
        return record

    @torch.no_grad()
    def forecast_metrics(self, model) -> dict:
        """The latent SDE's forecast of the horizon of every test window from its observation
        window (`LatentSDE.forecast`: the posterior on the observation window, the prior SDE
        after it; --forecast-samples paths), scored like `baseline_forecasts` on the same
        values: the marginal predictive log density per value, log (1/S) Σ_s p(x_i | D z_s(t_i))
        (a Monte Carlo estimate, biased low by Jensen), the joint one, log (1/S) Σ_s Π_i
        p(x_i | D z_s(t_i)) per value (biased low, more so), and the sample CRPS of
        D z_s(t_i) + observation noise."""
        test = self.split.test
        part = self._shard(len(test))
        values = test.values[part].to(self.device, self.dtype)
        mask = test.mask[part].to(self.device, self.dtype)
        n, h = self.args.forecast_samples, test.n_observed
        sums = {"marginal": 0.0, "joint": 0.0, "crps": 0.0}
        for start in range(0, len(values), max(1, 4096 // n)):
            chunk = slice(start, start + max(1, 4096 // n))
            zs = model.forecast(self.t, values[chunk], mask[chunk], h, n, seed=start)
            location = model.decoder(zs[h:]).transpose(0, 2)  # (N, S, H, D)
            x = values[chunk, h:].unsqueeze(1)
            seen = mask[chunk, h:, None].expand_as(x[:, 0])
            log_p = model.observation_log_density(x, location)  # (N, S, H, D)
            marginal = torch.logsumexp(log_p, 1) - math.log(n)
            joint = torch.logsumexp((log_p * seen.unsqueeze(1)).sum((2, 3)), 1) - math.log(n)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(start)
                draws = model.observation_noise(location)
            crps = sample_crps(x[:, 0], draws.transpose(0, 1))
            sums["marginal"] += float((marginal * seen).sum())
            sums["joint"] += float(joint.sum())
            sums["crps"] += float((crps * seen).sum())
        sums["count"] = float(mask[:, h:].sum()) * test.dim
        sums = self.all_reduce(sums)
        count = sums.pop("count")
        record = {f"forecast_{key}_per_value": value / count for key, value in sums.items()}
        record = {"forecast_loglik_per_value": record["forecast_marginal_per_value"],
                  "forecast_joint_loglik_per_value": record["forecast_joint_per_value"],
                  "forecast_crps_per_value": record["forecast_crps_per_value"],
                  **self.baseline_forecasts}
        for metric, better in (("loglik", max), ("joint_loglik", max), ("crps", min)):
            best = better(self.baseline_forecasts[f"{name}_forecast_{metric}_per_value"]
                          for name in BASELINES)
            record[f"forecast_{metric}_minus_best_baseline"] = (
                record[f"forecast_{metric}_per_value"] - best)
        return record

    # ------------------------------------------------------------ plots

    @torch.no_grad()
    def plot(self, model, history, out: Path) -> list[str]:
        files = [_save(self._curves(history), out / "curves.png"),
                 _save(self._posterior(model), out / "posterior.png"),
                 _save(self._prior(model), out / "prior.png")]
        if self.split.test.n_observed < len(self.split.test.t):
            files.append(_save(self._forecast(model), out / "forecast.png"))
        return files

    def _title(self) -> str:
        a = self.args
        return (f"latent SDE on {a.dataset}: method={a.method}, gradient={a.gradient}, "
                f"dt={self.dt():g}")

    def _curves(self, history):
        baselines = [(f"{name} test NLL", -self.baselines[key], style) for key, name, style in (
            ("random_walk_loglik_per_value", "random walk", "--"),
            ("ou_loglik_per_value", "Ornstein–Uhlenbeck", ":"))]
        return _loss_figure(history, "nats per observed value", self._title(), baselines,
                            labels=("train (KL-annealed)", "test −ELBO"), size=(7, 4.5))

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

    def _forecast(self, model, n_series: int = 4):
        """Per test window (channel 1): the latent SDE's forecast (`LatentSDE.forecast`:
        posterior on the observation window, prior SDE after its last time, observation noise
        added) as quantile bands, against the data and the Ornstein–Uhlenbeck baseline's
        marginal 5–95 % band on the horizon, in the data's own units."""
        test = self.split.test
        shown = torch.linspace(0, len(test) - 1, n_series).long().tolist()
        figure = _figure(1, n_series, (4.5 * n_series, 3.5))
        values = test.values[shown].to(self.device, self.dtype)
        mask = test.mask[shown].to(self.device, self.dtype)
        h = test.n_observed
        zs = model.forecast(self.t, values, mask, h, self.args.plot_samples, seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            paths = model.observation_noise(model.decoder(zs))
        paths = paths.permute(2, 1, 0, 3).float().cpu()  # (series, samples, T, D)
        transition = _fit_baselines(self.split.train)["transition"]
        x_c, t_c, _ = _horizon(test)
        t = test.t
        for column, index in enumerate(shown):
            ax = figure.axes[column]
            _bands(ax, t, self._units(paths[column], index)[..., 0], label="latent SDE")
            mean, var = transition("ou", x_c[index], (t[h:].double() - t_c[index]).unsqueeze(-1))
            band = torch.stack([mean - 1.645 * var.sqrt(), mean + 1.645 * var.sqrt()]).float()
            low, high = self._units(band, index)[..., 0]
            ax.plot(t[h:], low, color="C3", ls="--", lw=1, label="OU 5–95 %")
            ax.plot(t[h:], high, color="C3", ls="--", lw=1)
            seen = test.mask[index].bool()
            data = self._units(test.values[index], index)
            ax.plot(t[seen], data[seen, 0], "k.", ms=4, label="data")
            ax.axvline(float(t[h - 1]), color="0.5", lw=0.8)
            ax.set(xlabel="t", ylabel="channel 1", title=f"test window {index}")
        figure.axes[0].legend(fontsize=7)
        figure.suptitle(f"forecast after the observation window (grey line) — {self._title()}")
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
