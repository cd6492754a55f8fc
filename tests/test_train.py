"""`odegrad train classifier|cnf|latent`: outputs, summaries and argument errors.

The quick tests train for one or two iterations on tiny models; the slow ones (make test-slow)
train to the acceptance targets with the default settings.
"""

import json

import pytest
import torch

from odegrad.cli import main
from odegrad.gradients import available_gradients
from odegrad.models import CNF, LatentODE, ODENetClassifier

QUICK = ["--epochs", "1", "--max-iters", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(tmp_path, *argv):
    out = tmp_path / "run"
    code = main(["train", *argv, "--out", str(out)])
    return code, out


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_classifier_writes_model_plots_and_summary(tmp_path, capsys):
    code, out = _train(tmp_path, "classifier", "--channels", "4", *QUICK)
    assert code == 0
    summary = _summary(out)
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert summary["iterations"] == 2 and summary["time_per_iteration_s"] > 0
    assert summary["nfe_forward_per_iteration"] == 16  # rk4, 4 steps of 0.25
    assert summary["peak_memory"]["bytes"] > 0
    assert sorted(summary["files"]) == ["curves.png", "model.pt", "summary.json"]
    assert (out / "curves.png").stat().st_size > 1000
    model = ODENetClassifier(1, 10, channels=4, method="rk4", step_size=0.25)
    model.load_state_dict(torch.load(out / "model.pt"))
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "test_accuracy" in printed and "done:" in printed


def test_cnf_writes_density_plot(tmp_path):
    code, out = _train(tmp_path, "cnf", "--n-train", "64", "--n-test", "64", "--hidden", "8",
                       "--batch-size", "32", "--grid", "12", "--rtol", "1e-3", "--atol", "1e-3",
                       *QUICK)
    assert code == 0
    summary = _summary(out)
    assert {"test_nll", "gaussian_test_nll"} <= set(summary["final"])
    assert (out / "density.png").exists()
    CNF(2, hidden=(8,)).load_state_dict(torch.load(out / "model.pt"))


@pytest.mark.parametrize("dataset", ["spirals", "sunspots"])
def test_latent_writes_reconstructions(tmp_path, dataset):
    code, out = _train(tmp_path, "latent", "--dataset", dataset, "--hidden", "8",
                       "--latent-dim", "2", "--method", "rk4", "--step-size", "0.5", *QUICK)
    assert code == 0
    final = _summary(out)["final"]
    assert final["reconstruction_mse"] > 0 and final["extrapolation_mse"] > 0
    assert (out / "reconstructions.png").exists()
    LatentODE(2 if dataset == "spirals" else 1, 2, 8, 8).load_state_dict(
        torch.load(out / "model.pt"))


def test_latent_trains_with_the_ode_rnn_encoder(tmp_path):
    code, out = _train(tmp_path, "latent", "--encoder", "ode_rnn", "--hidden", "8",
                       "--latent-dim", "2", "--method", "rk4", "--step-size", "0.5", *QUICK)
    assert code == 0
    summary = _summary(out)
    assert summary["arguments"]["encoder"] == "ode_rnn"
    assert summary["final"]["reconstruction_mse"] > 0
    # rk4 (4 evaluations a step): 12 steps of 0.5 over the spirals' [0, 6] for the latent ODE,
    # and one step for each of the 99 gaps of the encoder's grid
    assert summary["nfe_forward_per_iteration"] == 4 * (12 + 99)
    LatentODE(2, 2, 8, 8, encoder="ode_rnn").load_state_dict(torch.load(out / "model.pt"))


@pytest.mark.parametrize("argv, message", [
    (["classifier", "--epochs", "0"], "expected a positive integer"),
    (["classifier", "--gradient", "nope"], "invalid choice: 'nope'"),
    (["classifier", "--method", "nope"], "invalid choice: 'nope'"),
    (["classifier", "--checkpoints", "some"], "'all', 'solution' or a positive integer"),
    (["classifier", "--lr", "-1"], "expected a positive number"),
    (["cnf", "--hidden", "8,x"], "comma-separated positive integers"),
    (["cnf", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["latent", "--option", "novalue"], "expected KEY=VALUE"),
    (["latent", "--encoder", "lstm"], "invalid choice: 'lstm' (choose from 'gru', 'ode_rnn')"),
    ([], "the following arguments are required: MODEL"),
])
def test_bad_arguments_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["classifier", "--checkpoints", "all", "--gradient", "direct"],
     "--checkpoints applies to --gradient discrete"),
    (["classifier", "--option", "coupling=0.5"], "unknown option 'coupling'"),
    (["classifier", "--device", "cuda:7"], "cuda"),
    (["classifier", "--device", "tpu"], "device"),
    (["classifier", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"],
     "copy the four IDX files"),
])
def test_bad_settings_get_a_clear_message(tmp_path, argv, message, capsys):
    code, _ = _train(tmp_path, *argv, *QUICK)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"odegrad train {argv[0]}: error:") and message in err


# ---------------------------------------------------------------- acceptance (slow)

ACCEPTANCE_GRADIENTS = [g for g in ("direct", "discrete", "reversible")
                        if g in available_gradients()]


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ACCEPTANCE_GRADIENTS)
def test_classifier_reaches_97_percent_on_digits(tmp_path, gradient):
    code, out = _train(tmp_path, "classifier", "--gradient", gradient, "--no-progress")
    assert code == 0
    assert _summary(out)["final"]["test_accuracy"] >= 0.97


@pytest.mark.slow
def test_cnf_beats_a_gaussian_on_moons(tmp_path):
    code, out = _train(tmp_path, "cnf", "--no-progress")
    assert code == 0
    final = _summary(out)["final"]
    assert final["test_nll"] < final["gaussian_test_nll"] - 0.3


@pytest.mark.slow
def test_latent_ode_learns_spirals(tmp_path):
    code, out = _train(tmp_path, "latent", "--no-progress")
    assert code == 0
    final = _summary(out)["final"]
    # the spirals have std ≈ 1.5 and observation noise 0.05 (variance 0.0025)
    assert final["reconstruction_mse"] < 0.05 and final["extrapolation_mse"] < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["sunspots", "co2"])
def test_latent_ode_forecasts_a_real_series(tmp_path, dataset):
    code, out = _train(tmp_path, "latent", "--dataset", dataset, "--no-progress")
    assert code == 0
    final = _summary(out)["final"]
    assert final["extrapolation_mse"] < 0.9 * final["constant_extrapolation_mse"]
