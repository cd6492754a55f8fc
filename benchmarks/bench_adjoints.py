"""Continuous adjoints side by side: odegrad backsolve and interpolated (seminorm and full norm)
against torchdiffeq's odeint_adjoint, in the same run (ALGORITHMS.md §3, §4).

Problems: an MLP field (tanh, t concatenated) and the conv ODE block (two 3x3 convolutions with
tanh between, t concatenated as a channel; batch 128, 64 channels, 16x16 on a GPU, smaller on
the CPU unless the flags say otherwise). For each method: forward and backward time (best of
--repeats, after a warm-up round), forward and backward f evaluations, and the gradient's
relative error against a float64 reference (gradient="direct", dopri5, rtol = atol = 1e-11).

    flock /tmp/odegrad-bench.lock python benchmarks/bench_adjoints.py
    python benchmarks/bench_adjoints.py --nodes     # interpolation nodes: accuracy vs cost

Run under `flock /tmp/odegrad-bench.lock` so that timings do not overlap with others.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torchdiffeq

import odegrad
from odegrad.gradients.interpolated import DEFAULT_N_NODES

ON_GPU = torch.cuda.is_available()


class MLPField(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(*y.shape[:-1], 1)], dim=-1))


class ConvField(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t, y):
        tt = t.expand(y.shape[0], 1, *y.shape[2:])
        h = torch.tanh(self.conv1(torch.cat([y, tt], dim=1)))
        return self.conv2(torch.cat([h, tt], dim=1))


class Damped(torch.nn.Module):
    """f(t, y) − k y: a dissipative field, whose backward re-solve of y is unstable."""

    def __init__(self, f, k: float):
        super().__init__()
        self.f = f
        self.k = k

    def forward(self, t, y):
        return self.f(t, y) - self.k * y


class Counted(torch.nn.Module):
    """Counts the evaluations of a peer's vector field."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.f(t, y)


def make_problem(name: str, args, device, dtype):
    torch.manual_seed(0)
    if name == "mlp":
        f = MLPField(args.dim, args.hidden)
        y0 = torch.randn(args.mlp_batch, args.dim)
    else:
        f = ConvField(args.channels)
        y0 = torch.randn(args.conv_batch, args.channels, args.size, args.size)
    if args.damping:
        f = Damped(f, args.damping)
    t = torch.linspace(0.0, args.horizon, args.n_outputs)
    cotangent = torch.randn(args.n_outputs, *y0.shape)
    return (f.to(device, dtype), y0.to(device, dtype), t.to(device, dtype),
            cotangent.to(device, dtype))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_odegrad(f, y0, t, cotangent, tol, **options):
    y = y0.clone().requires_grad_()
    f.zero_grad(set_to_none=True)
    start = time.perf_counter()
    sol = odegrad.solve(f, y, t, rtol=tol, atol=tol, **options)
    sync(y0.device)
    middle = time.perf_counter()
    (sol.ys * cotangent).sum().backward()
    sync(y0.device)
    end = time.perf_counter()
    grads = [y.grad] + [p.grad for p in f.parameters()]
    return middle - start, end - middle, sol.stats["nfe_forward"], sol.stats["nfe_backward"], grads


def run_torchdiffeq(f, y0, t, cotangent, tol, **options):
    counted = Counted(f)
    y = y0.clone().requires_grad_()
    f.zero_grad(set_to_none=True)
    start = time.perf_counter()
    ys = torchdiffeq.odeint_adjoint(counted, y, t, rtol=tol, atol=tol, method="dopri5",
                                    adjoint_params=tuple(f.parameters()), **options)
    sync(y0.device)
    middle = time.perf_counter()
    nfe_forward, counted.nfe = counted.nfe, 0
    (ys * cotangent).sum().backward()
    sync(y0.device)
    end = time.perf_counter()
    grads = [y.grad] + [p.grad for p in f.parameters()]
    return middle - start, end - middle, nfe_forward, counted.nfe, grads


METHODS = {
    "odegrad backsolve (seminorm)": (run_odegrad, dict(gradient="backsolve")),
    "odegrad backsolve (full)": (run_odegrad, dict(gradient="backsolve", adjoint_norm="full")),
    "odegrad interpolated (seminorm)": (run_odegrad, dict(gradient="interpolated")),
    "odegrad interpolated (full)": (
        run_odegrad, dict(gradient="interpolated", adjoint_norm="full")),
    "torchdiffeq odeint_adjoint (seminorm)": (
        run_torchdiffeq, dict(adjoint_options=dict(norm="seminorm"))),
    "torchdiffeq odeint_adjoint (full)": (run_torchdiffeq, {}),
}


def reference_gradient(f, y0, t, cotangent):
    """float64 gradient through dopri5 at rtol = atol = 1e-11 (gradient="direct")."""
    f64 = copy.deepcopy(f).to(torch.float64)
    _, _, _, _, grads = run_odegrad(f64, y0.double(), t.double(), cotangent.double(), 1e-11,
                                    gradient="direct")
    return grads


def relative_error(grads, reference) -> float:
    num = sum(float((g.double() - r).pow(2).sum()) for g, r in zip(grads, reference))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return (num / den) ** 0.5


def bench(problem: str, args, device, dtype) -> None:
    f, y0, t, cotangent = make_problem(problem, args, device, dtype)
    reference = reference_gradient(f, y0, t, cotangent) if args.reference else None
    damping = f" − {args.damping:g} y" if args.damping else ""
    print(f"\n### {problem}{damping}: y0 {tuple(y0.shape)}, t = linspace(0, {args.horizon}, "
          f"{args.n_outputs}), {dtype}, dopri5, n_nodes = {DEFAULT_N_NODES}\n")
    print("| tol | method | forward ms | backward ms | NFE fwd | NFE bwd | grad rel. error |")
    print("|---|---|---|---|---|---|---|")
    for tol in args.tol:
        times: dict = {name: ([], []) for name in METHODS}
        counts, errors = {}, {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, (runner, options) in METHODS.items():
                forward, backward, nfe_f, nfe_b, grads = runner(f, y0, t, cotangent, tol,
                                                                **options)
                times[name][0].append(forward)
                times[name][1].append(backward)
                counts[name] = (nfe_f, nfe_b)
                if reference is not None:
                    errors[name] = relative_error(grads, reference)
        for name in METHODS:
            forward = min(times[name][0][1:]) * 1e3
            backward = min(times[name][1][1:]) * 1e3
            error = f"{errors[name]:.2e}" if name in errors else "-"
            print(f"| {tol:g} | {name} | {forward:.1f} | {backward:.1f} | {counts[name][0]} | "
                  f"{counts[name][1]} | {error} |")


def bench_nodes(args, device) -> None:
    """Gradient error and backward time of the interpolated adjoint against n_nodes (float64)."""
    dtype = torch.float64
    # the "interpolation error / tol" column shows what the warning would say
    warnings.filterwarnings("ignore", message="gradient='interpolated'")
    print("\n### interpolated adjoint: n_nodes (MLP, float64)\n")
    print("| horizon | tol | n_nodes | backward ms | NFE bwd | grad rel. error | "
          "interpolation error / tol | checkpoint bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for horizon in args.node_horizons:
        args.horizon, args.damping = horizon, 0.0
        f, y0, t, cotangent = make_problem("mlp", args, device, dtype)
        reference = reference_gradient(f, y0, t, cotangent)
        for tol in args.node_tols:
            for n in args.node_counts:
                backward_times = []
                for _ in range(args.repeats + 1):
                    _, backward, _, nfe_b, grads = run_odegrad(
                        f, y0, t, cotangent, tol, gradient="interpolated", n_nodes=n)
                    backward_times.append(backward)
                sol = odegrad.solve(f, y0.to(dtype), t, rtol=tol, atol=tol, gradient="interpolated",
                                    n_nodes=n)
                print(f"| {horizon:g} | {tol:g} | {n} | "
                      f"{min(backward_times[1:]) * 1e3:.1f} | {nfe_b} | "
                      f"{relative_error(grads, reference):.2e} | "
                      f"{sol.stats['interpolation_error']:.2g} | {sol.stats['checkpoint_bytes']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=["mlp", "conv", "all"], default="all")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7])
    parser.add_argument("--repeats", type=int, default=3 if ON_GPU else 2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--horizon", type=float, default=1.0)
    parser.add_argument("--damping", type=float, default=0.0,
                        help="k > 0 integrates f − k y (dissipative) instead of f")
    parser.add_argument("--n-outputs", type=int, default=2)
    parser.add_argument("--mlp-batch", type=int, default=1024 if ON_GPU else 256)
    parser.add_argument("--dim", type=int, default=32 if ON_GPU else 16)
    parser.add_argument("--hidden", type=int, default=256 if ON_GPU else 64)
    parser.add_argument("--conv-batch", type=int, default=128 if ON_GPU else 16)
    parser.add_argument("--channels", type=int, default=64 if ON_GPU else 16)
    parser.add_argument("--size", type=int, default=16 if ON_GPU else 8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadier timings on a shared machine)")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--nodes", action="store_true",
                        help="only the n_nodes sweep of the interpolated adjoint")
    parser.add_argument("--node-counts", type=int, nargs="+",
                        default=[4, 6, 8, 12, 16, 24, 32, 48])
    parser.add_argument("--node-tols", type=float, nargs="+", default=[1e-5, 1e-8])
    parser.add_argument("--node-horizons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    args = parser.parse_args()
    device = torch.device("cuda" if ON_GPU else "cpu")
    if not ON_GPU:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if ON_GPU else "cpu"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.nodes:
        bench_nodes(args, device)
        return
    dtype = getattr(torch, args.dtype)
    for problem in (["mlp", "conv"] if args.problem == "all" else [args.problem]):
        bench(problem, args, device, dtype)


if __name__ == "__main__":
    main()
