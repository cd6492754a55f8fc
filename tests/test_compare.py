"""`odegrad compare`: one row per gradient method, correct error magnitudes, outputs, bad input."""

import json
import sys

import pytest
import torch

import odegrad
import odegrad.peers
from odegrad import cli, compare
from odegrad.compare import Config, run_compare
from odegrad.gradients import available_gradients
from odegrad.loop import integrate
from odegrad.solvers import SOLVERS, make_solver

TINY = dict(problem="mlp", batch=4, dim=3, hidden=8, repeats=1, isolate=False)


def expected_labels(method: str) -> list[str]:
    """What plan_rows must produce, written out from the spec of the table."""
    labels = []
    for gradient in available_gradients():
        if gradient == "discrete":
            labels += ["discrete (all)", "discrete (solution)", "discrete (4)"]
        elif gradient == "reversible":
            labels.append("reversible")
            if "alf" in SOLVERS:
                labels.append("reversible (alf)")
        else:
            labels.append(gradient)
    return labels


@pytest.mark.parametrize("method, steps", [("rk4", 6), ("dopri5", None)])
def test_float64_table_has_every_gradient_with_correct_errors(method, steps):
    report = run_compare(Config(**TINY, method=method, steps=steps, rtol=1e-7), progress=False)
    rows = report["rows"]
    assert [r["label"] for r in rows] == expected_labels(method)
    assert not report["meta"]["reference_errors"]
    for row in rows:
        assert row["error"] is None, f"{row['label']}: {row['error']}"
        assert row["total_ms"] > 0 and row["nfe_forward"] > 0
        if row["exact"]:
            # exact for the discrete scheme: round-off against direct in float64
            assert row["err_scheme"] < 1e-10, row
        # every method is close to the exact ODE gradient: rk4 with h = 1/6, dopri5 at 1e-7;
        # alf is second order
        assert 0.0 < row["err_ode"] < (1e-2 if row["method"] == "alf" else 1e-3), row


def test_float32_errors_are_reported_honestly():
    report = run_compare(Config(**TINY, method="rk4", steps=6, dtype="float32",
                                gradients=["direct"]), progress=False)
    (row,) = report["rows"]
    # float32 round-off against the float64 gradient of the very same scheme: not zero, not big
    assert 1e-9 < row["err_scheme"] < 1e-4


def test_replay_reproduces_an_adaptive_solve():
    config = compare.resolve(Config(**TINY, method="dopri5", rtol=1e-5))
    setup = compare.build(config)
    solver = make_solver("dopri5")
    with torch.no_grad():
        _, trajectory = integrate(setup.field, setup.y0, setup.t, solver, rtol=1e-5, atol=1e-5)
        replayed = compare.replay(setup.field, setup.y0, setup.t, solver, trajectory)
    solved = odegrad.odeint(setup.field, setup.y0, setup.t, method="dopri5", rtol=1e-5, atol=1e-5)
    assert len(trajectory.steps) > 3
    torch.testing.assert_close(replayed, solved[-1], rtol=1e-14, atol=1e-14)


def test_ode_reference_is_converged():
    config = compare.resolve(Config(**TINY))
    tighter = compare.ode_reference(config)
    setup = compare.build(config, torch.float64)
    y0 = setup.y0.clone().requires_grad_()
    ys = odegrad.odeint(setup.field, y0, setup.t, method="dopri5", rtol=1e-9, atol=1e-9)
    looser = compare._flat(torch.autograd.grad(setup.loss(ys[-1]), [y0, *setup.params()]))
    error = float((looser - tighter).norm() / tighter.norm())
    assert error < 1e-6  # dopri5 at 1e-9 agrees with the dopri8 reference at 1e-12


def test_a_method_that_raises_gets_its_error_in_its_row(monkeypatch):
    real_solve = compare.solve

    def failing(*args, **kwargs):
        if kwargs.get("checkpoints") == "solution" or kwargs.get("gradient") == "direct":
            raise RuntimeError("boom from the test")
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(compare, "solve", failing)
    report = run_compare(Config(**TINY, method="rk4", steps=4), progress=False)
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["direct"]["error"] == "RuntimeError: boom from the test"
    others = [r for r in report["rows"] if r["label"] not in ("direct", "discrete (solution)")]
    assert all(r["error"] is None for r in others)
    assert "boom from the test" in compare.format_table(report)


def test_cpu_peak_sees_a_known_allocation():
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    peak = compare._cpu_peak(lambda: torch.ones(25_000_000))  # 100 MB
    assert 0.9 * 100e6 < peak < 1.1 * 100e6


def test_isolated_row_measures_its_own_memory():
    config = compare.resolve(Config(problem="mlp", batch=64, dim=16, hidden=64, method="rk4",
                                    steps=20, repeats=1, gradients=["direct"], threads=1))
    (row,) = compare.plan_rows(config)
    result = compare.measure_isolated(config, row, None)
    assert result["error"] is None, result["error"]
    graph = result["checkpoint_bytes"]  # the bytes direct's autograd graph keeps
    assert graph > 5e6
    if sys.platform.startswith("linux"):
        # the graph is alive at the peak; the rest is the backward pass's transient buffers
        assert graph <= result["peak_bytes"] < graph + 20e6


def test_cli_prints_the_table_and_writes_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "report.json", tmp_path / "report.png"
    rc = cli.main(["compare", "--batch", "4", "--dim", "3", "--hidden", "8", "--method", "rk4",
                   "--steps", "4", "--repeats", "2", "--in-process", "--no-progress",
                   "--json", str(json_path), "--plot", str(plot_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "err scheme" in out and "rk4, 4 fixed steps" in out
    report = json.loads(json_path.read_text())
    assert [r["label"] for r in report["rows"]] == expected_labels("rk4")
    assert len(report["rows"][0]["total_ms_all"]) == 2
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--method", "rk5"], "--method 'rk5' is unknown; valid methods:"),
    (["--gradients", "direct,magic"], "--gradients: magic not available"),
    (["--peers", "scipy"], "--peers: unknown scipy"),
    (["--rtol=-1e-3"], "--rtol must be positive"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--device", "tpu"], "--device"),
    (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json"),
])
def test_bad_arguments_are_rejected_with_a_clear_message(argv, message, capsys):
    assert cli.main(["compare", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--dtype", "float16"], ["--problem", "cnn"],
                                  ["--steps", "ten"]])
def test_bad_argument_types_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_peers_join_the_table():
    pytest.importorskip("torchdiffeq")
    report = run_compare(Config(**TINY, method="rk4", steps=6, gradients=["direct"],
                                peers=["torchdiffeq", "torchdiffeq_adjoint", "torchode"]),
                         progress=False)
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["torchdiffeq odeint"]["solver"] == "rk4 (3/8 rule)"
    for label in ("torchdiffeq odeint", "torchdiffeq odeint_adjoint"):
        assert rows[label]["error"] is None
        assert rows[label]["err_scheme"] is None  # another scheme: only the ODE error applies
        assert 0.0 < rows[label]["err_ode"] < 1e-3
        assert rows[label]["nfe_forward"] == 6 * 4
    assert rows["torchdiffeq odeint_adjoint"]["nfe_backward"] > 0
    expected = "torchode has no method 'rk4'" if odegrad.peers.PEERS["torchode"].available \
        else "not installed"
    assert expected in rows["torchode"]["error"]
