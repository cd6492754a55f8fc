"""Per-step overhead of odegrad's loop against torchdiffeq on the same problem, in the same run.

The problem of issue 8: an MLP field (state 64, hidden 256, two tanh layers), batch 1024,
rk4 with 40 fixed steps over [0, 1], float32; CUDA when available, else the CPU. Measured,
interleaved and as medians:

  f x160                  the 160 evaluations of f alone (no graph): the forward's floor
  f x160 + backward       160 chained evaluations y <- y + h f(y) and one backward: the floor
                          of any forward+backward with 160 evaluations
  odegrad / torchdiffeq forward           the solve under torch.no_grad()
  odegrad / torchdiffeq forward+backward  gradient="direct" / odeint, then backward
  odegrad discrete (all)                  when present; and torchdiffeq's odeint_adjoint

Overhead per step = (time − floor) / 40, from the fastest of the interleaved repeats (on a
shared machine the other processes only ever add time). --profile adds what bounds the loop:
the loop with a constant f (the Runge–Kutta arithmetic and the Python of the loop), the loop
on a 1x1 state (the Python alone), and cProfile's top functions of one odegrad forward.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_overhead.py [--profile] [--json F]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import platform
import pstats
import statistics
import time

import torch
from torch import nn

import odegrad

STEPS = 40


class Field(nn.Module):
    """f(t, y) = W₃ tanh(W₂ tanh(W₁ y + b₁) + b₂) + b₃."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


class ConstantField(nn.Module):
    """f returning one fixed tensor: what the loop costs without the network."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, t, y):
        return self.value


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cases: dict, device, repeats: int, warmup: int = 2, stat=statistics.median) -> dict:
    """Seconds per case (median, or `stat`), the cases interleaved so drifts hit them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (stat(values), min(values)) for name, values in times.items()}


def build_cases(field, y0, t, h):
    params = list(field.parameters())

    def f_only():
        with torch.no_grad():
            for _ in range(4 * STEPS):
                field(t[0], y0)

    def f_chain_backward():
        y = y0
        for _ in range(4 * STEPS):
            y = y + h * field(t[0], y)
        torch.autograd.grad(y.sum(), params)

    def ours_forward():
        with torch.no_grad():
            odegrad.odeint(field, y0, t, method="rk4", step_size=h)

    def ours_backward(gradient="direct", **options):
        def run():
            ys = odegrad.odeint(field, y0, t, method="rk4", step_size=h, gradient=gradient,
                                **options)
            torch.autograd.grad(ys[-1].sum(), params)
        return run

    cases = {"f x160": f_only, "f x160 + backward": f_chain_backward,
             "odegrad forward": ours_forward, "odegrad fwd+bwd (direct)": ours_backward()}
    if "discrete" in odegrad.GRADIENTS:
        cases["odegrad fwd+bwd (discrete all)"] = ours_backward("discrete", checkpoints="all")
    try:
        import torchdiffeq
    except ImportError:
        print("torchdiffeq is not installed: no peer in this run")
        return cases

    def theirs_forward():
        with torch.no_grad():
            torchdiffeq.odeint(field, y0, t, method="rk4", options={"step_size": h})

    def theirs_backward():
        ys = torchdiffeq.odeint(field, y0, t, method="rk4", options={"step_size": h})
        torch.autograd.grad(ys[-1].sum(), params)

    def theirs_adjoint():
        ys = torchdiffeq.odeint_adjoint(field, y0, t, method="rk4", options={"step_size": h},
                                        adjoint_params=tuple(params))
        torch.autograd.grad(ys[-1].sum(), params)

    cases.update({"torchdiffeq forward": theirs_forward,
                  "torchdiffeq fwd+bwd (odeint)": theirs_backward,
                  "torchdiffeq fwd+bwd (odeint_adjoint)": theirs_adjoint})
    return cases


def profile_loop(field, y0, t, h, device, repeats: int) -> dict:
    """What bounds the forward loop: the RK arithmetic and the loop's own Python."""
    k = field(t[0], y0).detach()
    tiny = torch.zeros(1, 1, dtype=y0.dtype, device=device)

    def loop(f, y):
        def run():
            with torch.no_grad():
                odegrad.odeint(f, y, t, method="rk4", step_size=h)
        return run

    return measure({"loop, constant f": loop(ConstantField(k), y0),
                    "loop, constant f, 1x1 state": loop(ConstantField(tiny), tiny)},
                   device, repeats)


def cprofile_forward(field, y0, t, h, top: int = 12) -> str:
    profiler = cProfile.Profile()
    with torch.no_grad():
        odegrad.odeint(field, y0, t, method="rk4", step_size=h)
        profiler.enable()
        for _ in range(5):
            odegrad.odeint(field, y0, t, method="rk4", step_size=h)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    field = Field(args.dim, args.hidden).to(device)
    y0 = torch.randn(args.batch, args.dim, device=device)
    t = torch.tensor([0.0, 1.0], device=device)
    h = 1.0 / STEPS

    results = measure(build_cases(field, y0, t, h), device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# MLP field {args.dim}-{args.hidden}-{args.hidden}-{args.dim}, batch {args.batch}, "
          f"rk4 x {STEPS} steps, float32, {device} ({name or 'cpu'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{datetime.date.today()}, {args.repeats} interleaved repeats")
    floors = {"forward": results["f x160"], "backward": results["f x160 + backward"]}
    print(f"{'case':<38} {'median ms':>10} {'min ms':>9} {'min: ms/step over floor':>24}")
    for case, (median, fastest) in results.items():
        floor = floors["forward" if "forward" in case else "backward"][1]
        over = (fastest - floor) / STEPS * 1e3 if not case.startswith("f x160") else 0.0
        print(f"{case:<38} {median * 1e3:10.2f} {fastest * 1e3:9.2f} {over:24.3f}")
    pairs = [("odegrad forward", "torchdiffeq forward"),
             ("odegrad fwd+bwd (direct)", "torchdiffeq fwd+bwd (odeint)"),
             ("odegrad fwd+bwd (discrete all)", "torchdiffeq fwd+bwd (odeint)"),
             ("odegrad fwd+bwd (discrete all)", "torchdiffeq fwd+bwd (odeint_adjoint)")]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            print(f"ratio {ours} / {theirs}: median {results[ours][0] / results[theirs][0]:.2f}, "
                  f"min {results[ours][1] / results[theirs][1]:.2f}")
    report = {"median_ms": {k: v[0] * 1e3 for k, v in results.items()},
              "min_ms": {k: v[1] * 1e3 for k, v in results.items()}, "device": str(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.profile:
        loop = {k: v[1] for k, v in profile_loop(field, y0, t, h, device, args.repeats).items()}
        print()
        for case, seconds in loop.items():
            print(f"{case:<38} min {seconds * 1e3:9.2f} ms = {seconds / STEPS * 1e3:.3f} ms/step")
        print()
        print(cprofile_forward(field, y0, t, h))
        report["profile_ms"] = {k: v * 1e3 for k, v in loop.items()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
