"""The latent SDE (models/latent_sde.py) and `odegrad train sde`: gradients through the
augmented KL component, a tiny run's outputs and falling loss, the baselines and the errors."""

import json

import pytest
import torch

from odegrad.cli import main
from odegrad.data.series import Series
from odegrad.models.latent_sde import LatentSDE, PiecewiseContext
from odegrad.train_sde import (
    baseline_forecasts,
    baseline_log_likelihoods,
    gaussian_crps,
    make_lorenz,
    sample_crps,
)

TINY = ["--latent-dim", "2", "--context-dim", "4", "--hidden", "8", "--eval-samples", "1",
        "--forecast-samples", "4",
        "--plot-samples", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _batch(n=4, length=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    t = 0.25 * torch.arange(length, dtype=dtype)
    values = torch.randn(n, length, 1, generator=g, dtype=dtype)
    mask = torch.ones(n, length, dtype=dtype)
    mask[0, 2] = 0.0
    return t, values, mask


def _elbo_gradient(gradient, method="reversible_heun", **options):
    torch.manual_seed(0)
    model = LatentSDE(1, 2, 3, 8, dt=0.125, method=method, gradient=gradient,
                      **options).double()
    t, values, mask = _batch()
    torch.manual_seed(1)
    log_lik, initial_kl, path_kl = model(t, values, mask)
    assert bool((path_kl > 0).all())
    (initial_kl + path_kl - log_lik).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("gradient", ["discrete", "reversible"])
def test_exact_gradients_through_the_kl_component_equal_direct(gradient):
    # The path KL is a state component of the solve: every gradient method differentiates it,
    # the context from the encoder included (it is in params=).
    reference = _elbo_gradient("direct")
    assert torch.allclose(_elbo_gradient(gradient), reference, rtol=1e-10, atol=1e-12)


def test_backsolve_is_close_to_direct_through_midpoint():
    reference = _elbo_gradient("direct", method="midpoint")
    approximate = _elbo_gradient("backsolve", method="midpoint")
    assert float((approximate - reference).norm() / reference.norm()) < 0.05


def test_context_is_piecewise_constant_and_robust_to_round_off():
    times = torch.tensor([0.0, 0.25, 0.5])
    contexts = torch.arange(3.0).reshape(3, 1, 1)
    context = PiecewiseContext(times, contexts)
    read = [float(context(torch.tensor(s))) for s in (0.0, 0.1, 0.25 - 1e-9, 0.25, 0.4, 0.5)]
    assert read == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_baselines_prefer_the_process_that_made_the_data():
    # An OU path with strong mean reversion: the OU baseline beats the random walk on held-out
    # windows, and both are finite log-likelihoods per value.
    g = torch.Generator().manual_seed(0)
    n, length, rate, step = 100, 20, 2.0, 0.25
    decay = torch.exp(torch.tensor(-rate * step))
    x = torch.zeros(n, length, 1)
    x[:, 0] = torch.randn(n, 1, generator=g)
    for k in range(1, length):
        noise = torch.randn(n, 1, generator=g) * torch.sqrt(1 - decay**2)
        x[:, k] = decay * x[:, k - 1] + noise
    t = step * torch.arange(length, dtype=torch.float32)
    mask = torch.ones(n, length)
    result = baseline_log_likelihoods(Series(t, x[:75], mask[:75], length),
                                      Series(t, x[75:], mask[75:], length))
    assert result["ou_loglik_per_value"] > result["random_walk_loglik_per_value"]
    assert -2.0 < result["ou_loglik_per_value"] < 0.0


def test_sample_crps_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([-1.0, 0.0, 0.3, 2.5], dtype=torch.float64)
    samples = 0.5 + 2.0 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    exact = gaussian_crps(x, torch.tensor(0.5, dtype=torch.float64),
                          torch.tensor(4.0, dtype=torch.float64))
    assert torch.allclose(sample_crps(x, samples), exact, rtol=0.03)


def test_forecast_reads_only_the_observation_window():
    torch.manual_seed(0)
    model = LatentSDE(1, 2, 3, 8, dt=0.125).double()
    t, values, mask = _batch(n=3, length=6)
    zs = model.forecast(t, values, mask, n_observed=4, n=5, seed=3)
    assert zs.shape == (6, 5, 3, 2)
    changed = values.clone()
    changed[:, 4:] += 10.0
    assert torch.equal(model.forecast(t, changed, mask, n_observed=4, n=5, seed=3), zs)
    assert not torch.equal(model.forecast(t, values, mask, n_observed=4, n=5, seed=4), zs)


def test_baseline_forecasts_condition_on_the_last_observed_value():
    # Random walk data: its one-step joint forecast beats its multi-step marginal one, and the
    # CRPS is positive; a window whose last observation-window point is missing still works.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 10, 1, generator=g).cumsum(1) * 0.5
    t = 0.5 * torch.arange(10, dtype=torch.float32)
    mask = torch.ones(60, 10)
    mask[45, 6] = 0.0
    result = baseline_forecasts(Series(t, x[:40], mask[:40], 7), Series(t, x[40:], mask[40:], 7))
    walk = {key.split("_forecast_")[1]: value for key, value in result.items()
            if key.startswith("random_walk")}
    assert walk["joint_loglik_per_value"] > walk["loglik_per_value"]
    assert walk["crps_per_value"] > 0.0


def test_lorenz_is_standardised_and_seeded():
    split = make_lorenz(8, 4, length=10, dt=1e-2)
    again = make_lorenz(8, 4, length=10, dt=1e-2)
    assert split.train.values.shape == (8, 10, 3) and split.test.values.shape == (4, 10, 3)
    assert torch.equal(split.train.values, again.train.values)
    assert abs(float(split.train.values.mean())) < 0.1


def test_train_sde_writes_outputs_and_the_loss_falls(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "sde", "--epochs", "3", "--max-iters", "4", "--batch-size", "32",
                 "--window", "8", "--time-step", "0.5",
                 "--lr", "2e-2", "--kl-anneal", "0", "--gradient", "discrete", *TINY,
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["files"]) == ["curves.png", "forecast.png", "model.pt", "posterior.png",
                                        "prior.png", "summary.json"]
    for name in ("curves.png", "forecast.png", "posterior.png", "prior.png"):
        assert (out / name).stat().st_size > 1000
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    final = summary["final"]
    assert {"test_elbo_per_value", "random_walk_loglik_per_value", "ou_loglik_per_value",
            "elbo_minus_best_baseline", "forecast_loglik_per_value",
            "forecast_crps_minus_best_baseline", "ou_forecast_loglik_per_value"} <= set(final)
    assert all(isinstance(value, float) and value == value for value in final.values()
               if not isinstance(value, (str, list, dict)))
    assert summary["gradient"] == "discrete" and summary["method"] == "midpoint"
    assert summary["nfe_backward_per_iteration"] > 0
    model = LatentSDE(1, 2, 4, 8, dt=0.125).double()
    model.load_state_dict(torch.load(out / "model.pt"))


@pytest.mark.parametrize("argv, message", [
    (["--rtol", "1e-3"], "fixed steps"),
    (["--gradient", "interpolated"], "interpolated"),
    (["--method", "euler", "--gradient", "reversible"], "reversible"),
    (["--checkpoints", "4"], "checkpoints"),
    (["--option", "nonsense=1"], "nonsense"),
])
def test_bad_solver_settings_fail_fast_with_a_clear_error(tmp_path, capsys, argv, message):
    code = main(["train", "sde", *argv, *TINY, "--out", str(tmp_path / "run")])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_lorenz_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "sde", "--dataset", "lorenz", "--n-train", "64", "--n-test", "16",
                 "--length", "20", "--epochs", "1", "--max-iters", "2", *TINY,
                 "--out", str(out)])
    assert code == 0
    assert (out / "posterior.png").exists()
