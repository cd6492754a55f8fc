"""`odegrad train cde`, its neural CDE model and its datasets (odegrad.data.irregular).

Quick: tiny spirals runs through the command line, the model's path data and its independence
of padding, its gradients against direct autograd, and the JapaneseVowels loader against
sktime's own reader (skipped without sktime). Slow: the acceptance run on JapaneseVowels.
"""

import json
import math

import pytest
import torch

from odegrad.cli import main
from odegrad.data.irregular import (
    LabelledSeries,
    drop_observations,
    japanese_vowels_dir,
    load_japanese_vowels,
    make_cde_spirals,
)
from odegrad.errors import InvalidInputError, UnknownNameError
from odegrad.models.cde import INTERPOLATIONS, NeuralCDE

HAVE_SKTIME = japanese_vowels_dir() is not None
TINY = ["--dataset", "spirals", "--n-train", "32", "--n-test", "16", "--length", "12",
        "--hidden", "6", "--width", "16", "--batch-size", "16", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(tmp_path, *argv):
    out = tmp_path / "run"
    return main(["train", "cde", *argv, "--out", str(out)]), out


# ---------------------------------------------------------------- the command


def test_spirals_run_writes_outputs_and_the_loss_decreases(tmp_path, capsys):
    code, out = _train(tmp_path, *TINY, "--epochs", "4", "--lr", "1e-2", "--drop", "0.3")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert summary["iterations"] == 8 and summary["time_per_iteration_s"] > 0
    assert summary["peak_memory"]["bytes"] > 0
    # rk4 without step_size: one step per knot interval, 11 intervals, 4 stages each
    assert summary["nfe_forward_per_iteration"] == 44
    assert sorted(summary["files"]) == ["curves.png", "model.pt", "paths.png", "summary.json"]
    assert (out / "paths.png").stat().st_size > 1000
    model = NeuralCDE(2, 6, 2, width=16)
    model.load_state_dict(torch.load(out / "model.pt"))
    assert "test_accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("gradient, method", [("discrete", "rk4"),
                                              ("reversible", "reversible_rk4")])
def test_memory_bounded_gradients_train_and_report_checkpoint_bytes(tmp_path, gradient, method):
    code, out = _train(tmp_path, *TINY, "--epochs", "1", "--max-iters", "1",
                       "--gradient", gradient, "--method", method,
                       "--interpolation", "linear", "--drop", "0.3")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_bytes"] > 0
    assert summary["nfe_backward_per_iteration"] > 0


def test_missing_japanese_vowels_files_give_a_clear_message(tmp_path, capsys):
    code, _ = _train(tmp_path, "--dataset", "japanese_vowels", "--data-dir", str(tmp_path),
                     "--no-progress")
    assert code == 2
    error = capsys.readouterr().err
    assert "JapaneseVowels_TRAIN.ts" in error and 'pip install -e ".[uea]"' in error
    assert "--dataset spirals" in error


def test_drop_must_leave_something(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "cde", "--drop", "1", "--out", str(tmp_path / "run")])
    assert "[0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------- the model


def _ragged_batch(dtype=torch.float64):
    """Two series on one grid of 6 times: one of length 4 (NaN padded), one of length 6, with
    missing values."""
    g = torch.Generator().manual_seed(3)
    times = torch.linspace(0, 1, 6, dtype=dtype).repeat(2, 1)
    values = torch.randn(2, 6, 3, generator=g, dtype=dtype)
    times[0, 4:] = math.nan
    values[0, 4:] = math.nan
    values[0, 1, 0] = values[1, 2, 2] = values[1, 0, 1] = math.nan
    return times, values


def test_path_data_has_time_values_and_observation_counts():
    model = NeuralCDE(3, 4, 2, count_scale=0.5)
    times, values = _ragged_batch(torch.float32)
    grid, data, lengths = model.path_data(times, values)
    assert lengths.tolist() == [4, 6] and torch.equal(grid, times[1])
    assert data.shape == (2, 6, 7)
    torch.testing.assert_close(data[..., 0], times, equal_nan=True)
    rectilinear = NeuralCDE(3, 4, 2, interpolation="rectilinear")
    held = rectilinear.path_data(times, values)[1][0, :, 0]  # its final time after the end
    assert torch.equal(held, torch.cat([times[0, :4], times[0, 3].repeat(2)]))
    torch.testing.assert_close(data[..., 1:4], values, equal_nan=True)
    # counts: 0.5 per observation, cumulative; NaN after the end (the path holds them)
    assert data[0, :4, 4].tolist() == [0.5, 0.5, 1.0, 1.5]
    assert data[1, :, 5].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert torch.isnan(data[0, 4:, 4:]).all()


# natural_cubic is left out: its fill makes the padding constant knots (torchcde's rule), and
# the spline, not being causal, changes before them
@pytest.mark.parametrize("interpolation", [i for i in INTERPOLATIONS if i != "natural_cubic"])
def test_a_series_result_does_not_depend_on_the_padding(interpolation):
    torch.manual_seed(0)
    model = NeuralCDE(3, 4, 2, width=8, interpolation=interpolation).double()
    times, values = _ragged_batch()
    together = model(times, values)
    alone = torch.cat([model(times[:1, :4], values[:1, :4]), model(times[1:], values[1:])])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_a_batch_must_share_one_grid():
    model = NeuralCDE(3, 4, 2)
    times, values = _ragged_batch(torch.float32)
    times[1, 2] += 0.01
    with pytest.raises(InvalidInputError, match="share one time grid"):
        model(times, values)
    with pytest.raises(UnknownNameError, match="hermite_cubic"):
        NeuralCDE(3, 4, 2, interpolation="cubic")


@pytest.mark.parametrize("gradient, method, options, tol", [
    ("discrete", "rk4", {"checkpoints": 2}, 1e-10),
    ("reversible", "reversible_rk4", {}, 1e-8),
    ("backsolve", "dopri5", {"adjoint_rtol": 1e-9, "adjoint_atol": 1e-9}, 1e-6),
])
def test_model_gradients_match_direct_autograd(gradient, method, options, tol):
    """Every parameter's gradient, and the data's, against direct autograd through the same
    scheme (float64). Backsolve: both solves at tolerance 1e-9 and a smooth field (with ReLU
    the continuous adjoint converges far more slowly: 6e-4 at 1e-10, 4e-6 at 1e-12)."""
    times, values = _ragged_batch()
    labels = torch.tensor([0, 1])
    tolerances = {"rtol": 1e-9, "atol": 1e-9, "activation": "tanh"} if method == "dopri5" else {}

    def gradients(gradient_method, **more):
        torch.manual_seed(0)
        model = NeuralCDE(3, 4, 2, width=8, method=method, gradient=gradient_method,
                          **tolerances, **more).double()
        data = values.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(model(times, data), labels)
        loss.backward()
        return [p.grad for p in model.parameters()] + [data.grad]

    for ours, reference in zip(gradients(gradient, **options), gradients("direct")):
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol, equal_nan=True)


# ---------------------------------------------------------------- the datasets


def test_spirals_turn_the_way_their_label_says():
    split = make_cde_spirals(n_train=64, n_test=8, length=50, noise=0.0)
    raw = split.train.values * split.std + split.mean
    x, y = raw[..., 0], raw[..., 1]
    turning = (x[:, :-1] * y[:, 1:] - y[:, :-1] * x[:, 1:]).sum(1)  # Σ x dy − y dx
    assert ((turning > 0) == (split.train.labels == 0)).all()
    assert 0 < int(split.train.labels.sum()) < 64


def test_drop_removes_the_given_fraction_and_keeps_the_times():
    series = LabelledSeries(torch.zeros(50, 40), torch.zeros(50, 40, 4),
                            torch.zeros(50, dtype=torch.long))
    dropped = drop_observations(series, 0.3, torch.Generator().manual_seed(1))
    assert abs(dropped.observed_fraction() - 0.7) < 0.02
    assert torch.equal(dropped.times, series.times)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_observations(series, 1.0, torch.Generator())


@pytest.mark.skipif(not HAVE_SKTIME, reason='sktime not installed (pip install -e ".[uea]")')
def test_japanese_vowels_loads_with_its_documented_shapes():
    split = load_japanese_vowels()
    train, test = split.train, split.test
    assert (len(train), len(test), train.channels, split.num_classes) == (270, 370, 12, 9)
    assert torch.bincount(train.labels).tolist() == [30] * 9  # 30 utterances per speaker
    lengths = torch.cat([train.lengths, test.lengths])
    assert (int(lengths.min()), int(lengths.max())) == (7, 29)
    assert abs(train.observed_fraction() - 1.0) < 1e-12
    for part in (train, test):  # NaN exactly after each series' end
        inside = torch.arange(part.values.shape[1]) < part.lengths[:, None]
        assert torch.equal(torch.isnan(part.values).all(-1), ~inside)
    # standardised with the training split's statistics
    flat = train.values.reshape(-1, 12)
    flat = flat[~torch.isnan(flat[:, 0])]
    torch.testing.assert_close(flat.mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, correction=0), torch.ones(12), atol=1e-5, rtol=0)
    dropped = load_japanese_vowels(drop=0.3)
    assert abs(dropped.train.observed_fraction() - 0.7) < 0.02


@pytest.mark.slow  # sktime's import alone takes 3-8 s
@pytest.mark.skipif(not HAVE_SKTIME, reason='sktime not installed (pip install -e ".[uea]")')
def test_japanese_vowels_matches_sktimes_reader():
    from sktime.datasets import load_japanese_vowels as sktime_loader

    split = load_japanese_vowels()
    for part, name in ((split.train, "train"), (split.test, "test")):
        frame, labels = sktime_loader(split=name, return_type="nested_univ")
        for i in range(len(part)):
            expected = torch.tensor([frame.iloc[i, k].to_numpy() for k in range(12)]).T
            n = len(expected)
            assert int(part.lengths[i]) == n
            raw = part.values[i, :n].double() * split.std.double() + split.mean.double()
            torch.testing.assert_close(raw, expected, rtol=1e-6, atol=1e-6)
            assert split.class_names[int(part.labels[i])] == labels[i]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SKTIME, reason='sktime not installed (pip install -e ".[uea]")')
@pytest.mark.parametrize("gradient", ["discrete", "reversible"])
def test_japanese_vowels_with_30_percent_dropped_reaches_90_percent(tmp_path, gradient):
    code, out = _train(tmp_path, "--dataset", "japanese_vowels", "--drop", "0.3",
                       "--gradient", gradient, "--no-progress")
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["final"]["test_accuracy"] >= 0.9
