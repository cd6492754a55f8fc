"""Training-step cost on the stiff example (examples/learn_robertson.py): one forward solve and
one backward pass of the mass-action + MLP neural ODE on Robertson kinetics, batch of 4.

Cases, all in the same run (each in a fresh subprocess so that peak memory is its own):
  cn_direct        odegrad crank_nicolson (one step per output interval) + gradient="direct"
  cn_discrete      odegrad crank_nicolson + gradient="discrete" (when that gradient exists)
  kvaerno5_direct  odegrad kvaerno5 (adaptive) + gradient="direct"
  dopri5_direct    odegrad dopri5 (adaptive) + gradient="direct"
  tde_adjoint      torchdiffeq.odeint_adjoint with dopri5 (continuous adjoint)
  tde_direct       torchdiffeq.odeint with dopri5, backpropagated through (for context)
Reported: median wall time of a training step, peak memory above the pre-step baseline (CUDA:
max_memory_allocated; CPU: the growth of the process's peak RSS), accepted steps, f-evaluations,
and the gradient's relative error against kvaerno5 at rtol 1e-10 (the exact ODE gradient to
~1e-8). Run under `flock /tmp/odegrad-bench.lock`:

    python benchmarks/bench_stiff.py [--t-end 1.0] [--outputs 25] [--repeats 3] [--threads 1]

`--step-counts` instead counts the accepted steps of kvaerno5 and dopri5 (rtol 1e-6,
atol 1e-10) on Robertson (t to 1e5) and van der Pol (μ = 1000, t to 3000); dopri5 is run on
a prefix of each interval (it would need millions of steps) and its count extrapolated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["cn_direct", "cn_discrete", "kvaerno5_direct", "dopri5_direct", "tde_adjoint",
         "tde_direct"]
RTOL, ATOL = 1e-6, 1e-10


def _example():
    spec = importlib.util.spec_from_file_location(
        "learn_robertson", ROOT / "examples" / "learn_robertson.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(args, device):
    import torch

    example = _example()
    times = torch.cat([torch.zeros(1), torch.logspace(-5, args.log_t_end, args.outputs)])
    times = times.double().to(device)
    y0 = torch.tensor(
        [[1.0, 0.0, 0.0], [0.9, 0.0, 0.1], [0.7, 1e-5, 0.3], [0.5, 2e-5, 0.5]],
        dtype=torch.float64, device=device,
    )
    data = example.make_data(times, y0)
    torch.manual_seed(0)
    model = example.RobertsonODE(guess=(0.04 * 2.0, 3e7 / 5.0, 1e4 * 3.0)).to(device)
    example.SCALE = example.SCALE.to(device)
    return example, model, times, y0, data


def _solve(case, model, times, y0):
    """(outputs, stats) of one differentiable forward solve."""
    import odegrad

    if case.startswith("tde_"):
        import torchdiffeq

        counter = {"nfe": 0}

        def counted(t, y):
            counter["nfe"] += 1
            return model(t, y)

        if case == "tde_direct":
            ys = torchdiffeq.odeint(counted, y0, times, method="dopri5", rtol=RTOL, atol=ATOL)
        else:
            ys = torchdiffeq.odeint_adjoint(
                counted, y0, times, method="dopri5", rtol=RTOL, atol=ATOL,
                adjoint_params=tuple(model.parameters()),
            )
        return ys, counter
    options = {
        "cn_direct": dict(method="crank_nicolson", batch_independent=True),
        "cn_discrete": dict(method="crank_nicolson", batch_independent=True,
                            gradient="discrete"),
        "kvaerno5_direct": dict(method="kvaerno5", batch_independent=True),
        "dopri5_direct": dict(method="dopri5"),
        "reference": dict(method="kvaerno5", batch_independent=True),
    }[case]
    tolerances = (1e-10, 1e-14) if case == "reference" else (RTOL, ATOL)
    sol = odegrad.solve(model, y0, times, rtol=tolerances[0], atol=tolerances[1],
                        max_steps=1_000_000, **options)
    return sol.ys, sol.stats


def run_case(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case == "cn_discrete":
        from odegrad.gradients import available_gradients

        if "discrete" not in available_gradients():
            return {"case": args.case, "skipped": "gradient='discrete' is not installed"}
    example, model, times, y0, data = _setup(args, device)

    def training_step():
        model.zero_grad()
        ys, stats = _solve(args.case, model, times, y0)
        loss = ((ys - data) * example.SCALE).pow(2).mean()
        loss.backward()
        return loss, stats

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    durations = []
    repeats = 1 if args.case == "reference" else args.repeats
    for _ in range(repeats):
        start = time.perf_counter()
        loss, stats = training_step()
        if device == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).tolist()
    steps = stats.get("n_accepted")
    nfe = stats.get("nfe") if "nfe" in stats else stats["nfe_forward"] + stats["nfe_backward"]
    return {
        "case": args.case, "device": device, "seconds": statistics.median(durations),
        "all_seconds": durations, "peak_bytes": peak, "steps": steps, "nfe": nfe,
        "loss": float(loss), "grad": grad,
    }


def step_counts(threads: int) -> None:
    import torch

    import odegrad

    torch.set_num_threads(threads)
    robertson = _example().mass_action
    rates = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)

    def van_der_pol(t, y):
        x, v = y.unbind(-1)
        return torch.stack([v, 1000.0 * (1 - x**2) * v - x], -1)

    problems = [
        ("Robertson", lambda t, y: robertson(y, rates), [1.0, 0.0, 0.0], 1e5, 10.0),
        ("van der Pol mu=1000", van_der_pol, [2.0, 0.0], 3000.0, 20.0),
    ]
    print("| problem | method | interval | accepted steps | rejected | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, field, y0, t_end, prefix in problems:
        y0 = torch.tensor(y0, dtype=torch.float64)
        for method, end in [("kvaerno5", t_end), ("dopri5", prefix)]:
            start = time.perf_counter()
            with torch.no_grad():
                sol = odegrad.solve(field, y0, torch.tensor([0.0, end], dtype=torch.float64),
                                    method=method, rtol=RTOL, atol=ATOL, max_steps=10_000_000)
            wall = time.perf_counter() - start
            steps = sol.stats["n_accepted"]
            print(f"| {name} | {method} | [0, {end:g}] | {steps} | {sol.stats['n_rejected']} | "
                  f"{wall:.1f} |")
            if end < t_end:
                print(f"| {name} | dopri5, extrapolated | [0, {t_end:g}] | "
                      f"≳ {steps * t_end / end:.1e} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--t-end", type=float, default=1.0)
    parser.add_argument("--outputs", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-counts", action="store_true")
    args = parser.parse_args()
    import math

    if args.step_counts:
        step_counts(args.threads)
        return

    args.log_t_end = math.log10(args.t_end)
    if args.case is not None:
        print(json.dumps(run_case(args)))
        return

    results = {}
    for case in ["reference"] + args.cases.split(","):
        command = [sys.executable, __file__, "--case", case, "--t-end", str(args.t_end),
                   "--outputs", str(args.outputs), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines()
                      if re.match(r"^[\w.]+(Error|Exception)\b", line)]
            message = (errors or done.stderr.strip().splitlines())[-1]
            results[case] = {"case": case, "failed": message[:120]}
        else:
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"# {case}: done", file=sys.stderr)
    reference = results.pop("reference")
    ref = reference["grad"]
    ref_norm = math.sqrt(sum(g * g for g in ref))
    print(f"device: {reference['device']}, t in [0, {args.t_end:g}] with {args.outputs} "
          f"log-spaced outputs, batch 4, rtol {RTOL:g}, atol {ATOL:g}, {args.threads} thread(s)")
    print("| case | step time (s) | ratio to cn_direct | peak memory (MB) | steps | nfe "
          "| gradient rel. error | loss |")
    print("|---|---|---|---|---|---|---|---|")
    base = results.get("cn_direct", {}).get("seconds")
    for case, r in results.items():
        if "skipped" in r or "failed" in r:
            status = "skipped" if "skipped" in r else "failed"
            print(f"| {case} | {status}: {r[status]} | | | | | | |")
            continue
        error = math.sqrt(sum((a - b) ** 2 for a, b in zip(r["grad"], ref))) / ref_norm
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"| {case} | {r['seconds']:.3f} | {ratio} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{r['steps'] if r['steps'] is not None else '-'} | {r['nfe']} | {error:.1e} | "
              f"{r['loss']:.4e} |")


if __name__ == "__main__":
    main()
