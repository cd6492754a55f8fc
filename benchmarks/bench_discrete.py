"""Discrete adjoint vs direct and the peers on a conv ODE block: time and peak memory.

The block (issue 3): y' = f(t, y) with f two 3x3 convolutions, tanh between, t concatenated as
a channel before each; float32; loss = mean of y(1)^2; one forward + backward per iteration.
Cases: rk4 with N = 10, 40, 160 fixed steps and dopri5 at rtol = atol = 1e-3, each with
odegrad direct, discrete all / solution / c = 4, torchdiffeq odeint and odeint_adjoint, and
TorchDiffEqPack's ACA (odesolve_adjoint).

Every case runs in its own subprocess (same machine, one after another) so that peak memory is
its own: torch.cuda.max_memory_allocated above the allocation after setup on a GPU; on the CPU
the peak resident set size (VmHWM, reset after the warm-up runs) above the RSS then, with glibc
told to mmap every block of 64 KiB or more so that freed tensors leave the RSS; and odegrad's
deterministic checkpoint_bytes. Times: median of --repeats runs after --warmup runs.

TorchDiffEqPack 0.1.0's ACA backward fails on fixed-grid solvers: it calls list(error) on the
error None that their steps return, and prepends to their steps as a list while they are a
tensor. The harness makes those steps return () and the grid a list of 0-dim tensors.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_discrete.py            # CUDA if present
    flock /tmp/odegrad-bench.lock python benchmarks/bench_discrete.py --batch 8 --channels 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ["direct", "discrete-all", "discrete-solution", "discrete-c4",
           "torchdiffeq", "torchdiffeq-adjoint", "aca"]
SETTINGS = ["rk4-10", "rk4-40", "rk4-160", "dopri5"]


def parse(argv=None):
    cuda = _cuda_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128 if cuda else 8)
    parser.add_argument("--channels", type=int, default=64 if cuda else 8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=2 if cuda else 1)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--settings", nargs="*", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--threads", type=int, default=None if cuda else 1,
                        help="torch CPU threads (default 1 on the CPU: a shared machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--case", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _block(channels: int):
    import torch

    class ConcatConv(torch.nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = torch.nn.Conv2d(c_in + 1, c_out, 3, padding=1)

        def forward(self, t, x):
            tt = torch.ones_like(x[:, :1]) * t
            return self.conv(torch.cat([tt, x], dim=1))

    class ConvField(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConcatConv(channels, channels)
            self.conv2 = ConcatConv(channels, channels)

        def forward(self, t, y):
            return self.conv2(t, torch.tanh(self.conv1(t, y)))

    return ConvField()


def _runner(setting: str, method: str, field, y0, device):
    """A function running one forward + backward; returns odegrad's stats (or {})."""
    import torch

    import odegrad

    t = torch.tensor([0.0, 1.0], device=device)
    fixed = setting.startswith("rk4")
    n_steps = int(setting.split("-")[1]) if fixed else None
    ours = dict(method="rk4", step_size=1.0 / n_steps) if fixed else \
        dict(method="dopri5", rtol=1e-3, atol=1e-3)
    if method.startswith("discrete") or method == "direct":
        gradient = "direct" if method == "direct" else "discrete"
        extra = {} if method == "direct" else \
            {"checkpoints": {"all": "all", "solution": "solution", "c4": 4}[method.split("-")[1]]}

        def run():
            sol = odegrad.solve(field, y0, t, gradient=gradient, **ours, **extra)
            sol.ys[-1].pow(2).mean().backward()
            return sol.stats

        return run
    if method.startswith("torchdiffeq"):
        import torchdiffeq

        options = dict(method="rk4", options=dict(step_size=1.0 / n_steps)) if fixed else \
            dict(method="dopri5", rtol=1e-3, atol=1e-3)
        if method == "torchdiffeq":
            solver = torchdiffeq.odeint
        else:
            solver = torchdiffeq.odeint_adjoint
            options["adjoint_params"] = tuple(field.parameters())
            if fixed:
                options["adjoint_options"] = dict(step_size=1.0 / n_steps)

        def run():
            ys = solver(field, y0, t, **options)
            ys[-1].pow(2).mean().backward()
            return {}

        return run
    from TorchDiffEqPack import odesolve_adjoint
    from TorchDiffEqPack.odesolver.fixed_grid_solver import RK4, FixedGridSolver

    original_step, original_integrate = RK4.step, FixedGridSolver.integrate

    def step(self, func, t, dt, y, return_variables=False):
        out = original_step(self, func, t, dt, y, return_variables)
        return (out[0], (), *out[2:]) if return_variables else out

    def integrate(self, y0, t0, predefine_steps=None, return_steps=False, t_eval=None):
        out = original_integrate(self, y0, t0, predefine_steps, return_steps, t_eval)
        return (out[0], list(out[1])) if return_steps else out

    RK4.step, FixedGridSolver.integrate = step, integrate

    def run():
        options = dict(method="rk4", h=1.0 / n_steps) if fixed else \
            dict(method="dopri5", h=None, rtol=1e-3, atol=1e-3)
        options.update(t0=0.0, t1=1.0, print_neval=False, neval_max=1_000_000, t_eval=None)
        out = odesolve_adjoint(field, y0, options=options)
        out.pow(2).mean().backward()
        return {}

    return run


def _status_bytes(key: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(args) -> dict:
    """Time and memory of one (setting, method), in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    setting, method = args.case
    device = torch.device(args.device)
    torch.manual_seed(0)
    field = _block(args.channels).to(device)
    y0 = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    run = _runner(setting, method, field, y0, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        run()
        field.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
        baseline = _status_bytes("VmRSS")
    times, stats = [], {}
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        stats = run()
        sync()
        times.append(time.perf_counter() - start)
        field.zero_grad(set_to_none=True)
    result = {
        "setting": setting, "method": method, "ms": 1e3 * statistics.median(times),
        "nfe_forward": stats.get("nfe_forward"), "nfe_backward": stats.get("nfe_backward"),
        "n_steps": stats.get("n_accepted"), "checkpoint_mb": _mb(stats.get("checkpoint_bytes")),
    }
    if device.type == "cuda":
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        result["peak_mb"] = max(0, _status_bytes("VmHWM") - baseline) / 2**20
    return result


def _mb(value):
    return None if value is None else value / 2**20


def main(argv=None) -> None:
    args = parse(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    import torch

    print(f"device={args.device} batch={args.batch} channels={args.channels} size={args.size} "
          f"repeats={args.repeats} torch={torch.__version__}", flush=True)
    results = []
    for setting in args.settings:
        for method in args.methods:
            command = [sys.executable, __file__, "--case", setting, method,
                       "--batch", str(args.batch), "--channels", str(args.channels),
                       "--size", str(args.size), "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup), "--device", args.device]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{setting} {method}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(_row(result, results), flush=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _row(result, results) -> str:
    return (f"{result['setting']:8s} {result['method']:20s} {result['ms']:9.1f} ms "
            f"peak {result['peak_mb']:8.1f} MB")


def table(results: list[dict]) -> str:
    """A markdown table; ratios against odegrad direct of the same setting."""
    lines = ["| setting | method | ms | x direct | peak MB | x direct | checkpoint MB | "
             "NFE fwd/bwd |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    direct = {r["setting"]: r for r in results if r["method"] == "direct"}
    for r in results:
        ref = direct.get(r["setting"])
        t_ratio = f"{r['ms'] / ref['ms']:.2f}" if ref else "-"
        m_ratio = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] else "-"
        ckpt = "-" if r["checkpoint_mb"] is None else f"{r['checkpoint_mb']:.2f}"
        nfe = "-" if r["nfe_forward"] is None else f"{r['nfe_forward']}/{r['nfe_backward']}"
        lines.append(f"| {r['setting']} | {r['method']} | {r['ms']:.1f} | {t_ratio} | "
                     f"{r['peak_mb']:.1f} | {m_ratio} | {ckpt} | {nfe} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
