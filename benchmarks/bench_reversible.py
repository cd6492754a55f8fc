"""Reversible gradients: time and peak memory of one forward + backward pass against peers.

Problems: a conv ODE block (two 3x3 convolutions with tanh, t as an extra channel) and an MLP
field of the size of a 2-D CNF's. Methods, all with fixed steps of 1/N on [0, 1]:

    odegrad alf, gradient="reversible" (MALI)       TorchDiffEqPack odesolve_adjoint_sym12
    odegrad alf, gradient="direct"                  torchdiffeq odeint, midpoint (backprop)
    odegrad reversible_heun, gradient="reversible"  torchdiffeq odeint_adjoint, midpoint
    odegrad reversible_rk4, gradient="reversible"

Each (problem, method, N) runs in its own subprocess, after a warm-up run with one step. Time:
median of 1 + --repeats runs of forward + backward (1 + --large-repeats for N >= 1000).
Memory, of the first of those runs: on CUDA the peak of torch.cuda.max_memory_allocated above
what was allocated before it; on the CPU the growth of the process's peak RSS, with glibc told
to mmap every block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_) so that freed blocks leave the
RSS at once instead of fragmenting the heap (without it the RSS of a 1000-step loop grows by
~100 MB of freed-but-retained heap, whatever the method).

    flock /tmp/odegrad-bench.lock python benchmarks/bench_reversible.py            # CPU sizes
    python benchmarks/bench_reversible.py --batch 128 --channels 64 --size 16      # the paper's
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

METHODS = (
    "odegrad-alf-reversible",
    "tdep-mali",
    "odegrad-alf-direct",
    "odegrad-reversible_heun-reversible",
    "odegrad-reversible_rk4-reversible",
    "torchdiffeq-midpoint-direct",
    "torchdiffeq-midpoint-adjoint",
)
_CHILD_ENV = {"PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
CONSTANT_MEMORY = ("odegrad-alf-reversible", "tdep-mali", "odegrad-reversible_heun-reversible",
                   "torchdiffeq-midpoint-adjoint")


class ConvField(nn.Module):
    """f(t, y) = conv2([tanh(conv1([y, t])), t]): the ODE block of an image classifier."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t, y):
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)  # TorchDiffEqPack passes floats
        tt = t.reshape(1, 1, 1, 1).expand(y.shape[0], 1, *y.shape[2:])
        h = torch.tanh(self.conv1(torch.cat([y, tt], 1)))
        return self.conv2(torch.cat([h, tt], 1))


class MLPField(nn.Module):
    """A CNF-sized field on R^2: 2+1 -> 64 -> 64 -> 64 -> 2 with tanh."""

    def __init__(self, dim: int = 2, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim),
        )

    def forward(self, t, y):
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        return self.net(torch.cat([y, t.reshape(1, 1).expand(y.shape[0], 1)], 1))


def _problem(config: dict, device: torch.device):
    torch.manual_seed(0)
    if config["problem"] == "conv":
        field = ConvField(config["channels"]).to(device)
        y0 = torch.randn(config["batch"], config["channels"], config["size"], config["size"],
                         device=device)
    else:
        field = MLPField().to(device)
        y0 = torch.randn(config["mlp_batch"], 2, device=device)
    return field, y0


def _forward_backward(method: str, field: nn.Module, y0: torch.Tensor, n: int) -> dict:
    """One forward + backward pass; returns the stats it can report."""
    y0 = y0.detach().requires_grad_()
    t = torch.tensor([0.0, 1.0], device=y0.device)
    h = 1.0 / n
    stats = {}
    if method.startswith("odegrad-"):
        import odegrad

        _, scheme, gradient = method.split("-")
        options = {"adaptive": False} if scheme != "reversible_rk4" else {}
        sol = odegrad.solve(field, y0, t, method=scheme, gradient=gradient, step_size=h,
                            **options)
        out = sol.ys[-1]
        stats = sol.stats
    elif method == "tdep-mali":
        from TorchDiffEqPack import odesolve_adjoint_sym12

        options = {"method": "fixedstep_sym12async", "h": h, "t0": 0.0, "t1": 1.0,
                   "rtol": 1e-3, "atol": 1e-6, "print_neval": False, "neval_max": 10**7}
        out = odesolve_adjoint_sym12(field, y0, options=options)
    else:
        import torchdiffeq

        solve = torchdiffeq.odeint_adjoint if method.endswith("adjoint") else torchdiffeq.odeint
        out = solve(field, y0, t, method="midpoint", options={"step_size": h})[-1]
    out.pow(2).mean().backward()
    return {k: stats[k] for k in ("nfe_forward", "nfe_backward", "checkpoint_bytes")
            if k in stats}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(config: dict) -> dict:
    """Measure one (problem, method, N) in this process."""
    device = torch.device(config["device"])
    torch.set_num_threads(config["threads"])
    field, y0 = _problem(config, device)
    _forward_backward(config["method"], field, y0, 1)  # imports, kernels, allocator pools
    field.zero_grad()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    stats = _forward_backward(config["method"], field, y0, config["steps"])
    sync()
    times = [time.perf_counter() - start]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for _ in range(config["repeats"]):
        field.zero_grad()
        sync()
        start = time.perf_counter()
        _forward_backward(config["method"], field, y0, config["steps"])
        sync()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_bytes": max(peak, 0), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["conv", "mlp"], choices=["conv", "mlp"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--max-steps-all", type=int, default=100,
                        help="methods whose memory grows with N run only up to this N")
    parser.add_argument("--batch", type=int, default=None, help="conv batch (128 on CUDA)")
    parser.add_argument("--channels", type=int, default=None, help="conv channels (64 on CUDA)")
    parser.add_argument("--size", type=int, default=16, help="conv image side")
    parser.add_argument("--mlp-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--large-repeats", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (128 if cuda else 16)
    channels = args.channels or (64 if cuda else 32)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
          f"conv {batch}x{channels}x{args.size}x{args.size}; mlp batch {args.mlp_batch}; "
          f"repeats 1+{args.repeats} (N >= 1000: 1+{args.large_repeats}); threads {args.threads}\n")
    print("| problem | method | N | time (ms) | peak memory (MB) | nfe fwd / bwd |")
    print("|---|---|---|---|---|---|")
    for problem in args.problems:
        for method in args.methods:
            for n in args.steps:
                if n > args.max_steps_all and method not in CONSTANT_MEMORY:
                    continue
                config = {"problem": problem, "method": method, "steps": n, "device": device,
                          "batch": batch, "channels": channels, "size": args.size,
                          "mlp_batch": args.mlp_batch,
                          "repeats": args.repeats if n < 1000 else args.large_repeats,
                          "threads": args.threads}
                result = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(config)],
                    capture_output=True, text=True,
                    env={**os.environ, **_CHILD_ENV},
                )
                if result.returncode != 0:
                    print(f"| {problem} | {method} | {n} | failed: "
                          f"{result.stderr.strip().splitlines()[-1]} | | |")
                    continue
                r = json.loads(result.stdout.strip().splitlines()[-1])
                nfe = f"{r['nfe_forward']} / {r['nfe_backward']}" if "nfe_forward" in r else ""
                print(f"| {problem} | {method} | {n} | {1e3 * r['time_s']:.1f} | "
                      f"{r['peak_bytes'] / 2**20:.1f} | {nfe} |", flush=True)


if __name__ == "__main__":
    main()
