"""Bad command-line input gets a clear error before any work, never a traceback or a silent default.

`odegrad compare`: unwritable --json/--plot are refused before the run; 0 is not "the default"
for the sizes; an empty --gradients/--peers list is an error. `odegrad train`: an unwritable
--out, a negative --weight-decay or --threads, a bad seed are refused; a diverging run stops with
the epoch and iteration and a hint about --lr.
"""

import os
import subprocess
import sys

import pytest
import torch

from odegrad import argtypes, compare, distributed, train
from odegrad.cli import main
from odegrad.compare import Config, resolve
from odegrad.errors import InvalidInputError

TINY = ["--batch", "2", "--dim", "2", "--hidden", "4", "--method", "rk4", "--steps", "2",
        "--repeats", "1", "--in-process", "--no-progress", "--gradients", "direct"]
QUICK = ["--epochs", "1", "--max-iters", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the comparison starts: the output paths must be checked first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the comparison ran before its output paths were checked")

    monkeypatch.setattr(compare, "run_compare", refuse)


def _read_only(monkeypatch, folder):
    """`folder` as a read-only directory, also for root (who may write anywhere)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(folder) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(argtypes.os, "access", access)


# ---------------------------------------------------------------- compare: output paths


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where, message", [
    ("{tmp}", "it is a directory"),
    ("{tmp}/missing/out.x", "does not exist"),
    ("{tmp}/file/out.x", "is not a directory"),
    ("{tmp}/newdir/", "names a folder"),
    ("", "the path is empty"),
])
def test_compare_refuses_an_unwritable_output_before_the_run(tmp_path, capsys, no_run, option,
                                                             where, message):
    (tmp_path / "file").write_text("")
    path = where.format(tmp=tmp_path)
    if option == "--plot" and path.endswith(".x"):
        path = path[:-2] + ".png"
    assert main(["compare", *TINY, option, path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"odegrad compare: error: {option} ") and message in err


@pytest.mark.parametrize("option, name", [("--json", "r.json"), ("--plot", "r.png")])
def test_compare_refuses_a_read_only_directory(tmp_path, capsys, no_run, monkeypatch, option,
                                               name):
    _read_only(monkeypatch, tmp_path)
    assert main(["compare", *TINY, option, str(tmp_path / name)]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write into a read-only directory")
def test_compare_refuses_a_chmod_read_only_directory(tmp_path, capsys, no_run):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["compare", *TINY, "--json", str(folder / "r.json")]) == 2
    finally:
        folder.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


def test_compare_refuses_a_plot_format_matplotlib_cannot_write(tmp_path, capsys, no_run):
    assert main(["compare", *TINY, "--plot", str(tmp_path / "r.xyz")]) == 2
    assert "matplotlib cannot write .xyz files; formats:" in capsys.readouterr().err


def test_compare_refuses_json_and_plot_in_one_file(tmp_path, capsys, no_run):
    path = str(tmp_path / "report")
    assert main(["compare", *TINY, "--json", path, "--plot", path]) == 2
    assert "--json and --plot name the same file" in capsys.readouterr().err


def test_compare_unwritable_output_is_a_clean_error_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "odegrad", "compare", *TINY, "--json", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"odegrad compare: error: --json {tmp_path}: it is a directory" in proc.stderr
    assert "err scheme" not in proc.stdout  # refused before the run


# ---------------------------------------------------------------- compare: numbers and lists


@pytest.mark.parametrize("name", ["batch", "dim", "hidden", "image"])
def test_compare_zero_sizes_are_errors_not_defaults(name, capsys):
    argv = ["compare", *TINY, f"--{name}", "0"]
    if name == "image":
        argv += ["--problem", "conv"]
    assert main(argv) == 2
    assert f"--{name} must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match=f"--{name} must be at least 1"):
        resolve(Config(**{name: 0}))


@pytest.mark.parametrize("option, names", [("--gradients", "direct, discrete"),
                                           ("--peers", "torchdiffeq")])
@pytest.mark.parametrize("text", ["", ","])
def test_compare_empty_name_lists_are_errors(option, names, text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *TINY, option, text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected comma-separated" in err and names in err


def test_compare_config_with_no_gradients_is_an_error():
    with pytest.raises(InvalidInputError, match="--gradients: the list is empty; available: "):
        resolve(Config(gradients=[]))


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**63 - 1], got -1"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**63 - 1]"),
    (["--t-end", "1e39"], "--t-end 1e+39 is not a positive float32 number"),
    (["--t-end", "1e-50"], "--t-end 1e-50 is not a positive float32 number"),
])
def test_compare_rejects_seeds_and_times_the_problem_cannot_take(argv, message, capsys):
    assert main(["compare", *TINY, *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- train: arguments


@pytest.mark.parametrize("argv, message", [
    (["classifier", "--weight-decay", "-1"], "argument --weight-decay: expected a finite "
                                             "non-negative number, got -1"),
    (["classifier", "--weight-decay", "nan"], "argument --weight-decay: expected a finite"),
    (["classifier", "--lr", "0"], "argument --lr: expected a positive number"),
    (["classifier", "--lr", "inf"], "argument --lr: expected a positive number"),
    (["classifier", "--threads", "-1"], "argument --threads: expected a non-negative integer"),
    (["classifier", "--seed", "-1"], "argument --seed: expected a seed in [0, 2**63 - 1]"),
    (["classifier", "--seed", str(2**70)], "argument --seed: expected a seed"),
    (["classifier", "--out", ""], "argument --out: expected a path, got an empty string"),
    (["cnf", "--grid", "1"], "argument --grid: expected an integer of at least 2, got 1"),
    (["cnf", "--n-train", "2"], "argument --n-train: expected an integer of at least 3"),
])
def test_train_rejects_bad_numbers_and_paths_in_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, *QUICK])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [
    ("file", "it exists and is not a directory"),
    ("file/run", "is not a directory"),
])
def test_train_refuses_an_out_that_is_not_a_folder(tmp_path, capsys, out, message):
    (tmp_path / "file").write_text("")
    code = main(["train", "classifier", *QUICK, "--out", str(tmp_path / out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("odegrad train classifier: error: --out ") and message in err


def test_train_refuses_a_read_only_out(tmp_path, capsys, monkeypatch):
    _read_only(monkeypatch, tmp_path)
    code = main(["train", "classifier", *QUICK, "--out", str(tmp_path / "a" / "run")])
    assert code == 2
    assert f"the directory {tmp_path} is not writable" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- train: divergence


def test_train_with_a_huge_lr_stops_with_the_iteration_and_a_hint(tmp_path, capsys):
    code = main(["train", "classifier", "--channels", "2", "--lr", "1e30", *QUICK,
                 "--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("odegrad train classifier: error: training failed at epoch 1, "
                          "iteration 2 of 2, after 1 parameter update(s)")
    assert "try a smaller --lr (now 1e+30)" in err


def test_train_stops_on_a_non_finite_loss(tmp_path, capsys, monkeypatch):
    real_loss = train.ClassifierTask.loss

    def nan_loss(self, model, batch):
        loss, sums = real_loss(self, model, batch)
        return loss * float("nan"), sums

    monkeypatch.setattr(train.ClassifierTask, "loss", nan_loss)
    code = main(["train", "classifier", "--channels", "2", *QUICK,
                 "--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "training failed at epoch 1, iteration 1 of 2, after 0 parameter update(s): " \
           "the training loss is nan" in err
    assert "No update has happened yet: check the solver settings" in err


def test_all_processes_stop_when_one_fails(monkeypatch):
    context = distributed.Context(rank=1, world_size=2)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values, context: values + 1)
    assert "another process failed" in train._agree(None, context)
    assert train._agree("mine", context) == "mine"
    assert train._agree(None, distributed.Context()) is None


def test_train_stops_on_a_failing_backward_pass(tmp_path, capsys, monkeypatch):
    from odegrad.errors import NonFiniteError

    class Failing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise NonFiniteError("the adjoint state became inf at t=0.5")

    real_loss = train.ClassifierTask.loss

    def failing_loss(self, model, batch):
        loss, sums = real_loss(self, model, batch)
        return Failing.apply(loss), sums

    monkeypatch.setattr(train.ClassifierTask, "loss", failing_loss)
    code = main(["train", "classifier", "--channels", "2", *QUICK,
                 "--out", str(tmp_path / "run")])
    assert code == 1
    assert "iteration 1 of 2, after 0 parameter update(s): NonFiniteError in the backward " \
           "pass: the adjoint state became inf at t=0.5" in capsys.readouterr().err
