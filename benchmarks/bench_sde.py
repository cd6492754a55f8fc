"""Neural SDE gradients: odegrad (direct / discrete / reversible / backsolve) against torchsde
0.2.6 (sdeint, sdeint_adjoint with reversible Heun + adjoint_reversible_heun, and with midpoint
+ backsolve), in the same run.

The problem has the torchsde examples' size: state d, drift MLP d→W→d (tanh), diagonal
diffusion MLP d→W→d (tanh, sigmoid), batch B, Stratonovich, fixed dt on [0, 1] (steps = 1/dt),
outputs at the 9 times k/8, loss Σ y(t_i)² (times and dt = 1/steps are powers of two, exact
in float32; see RESULTS §9 for the float32 backsolve failure off such a grid). Each
configuration runs in a fresh subprocess:

- timing: float32, each library's own Brownian Interval; forward + backward time (median of
  --repeats after a short warm-up solve) and the process's high-water mark
  (resource.getrusage(RUSAGE_SELF).ru_maxrss) minus the mark after setup (the solve's own
  memory; the absolute peak is recorded too);
- error: the float32 gradient (y0 and every parameter, flattened) against a float64 reference
  of the same scheme by direct autograd (odegrad: `direct` with the same method; torchsde:
  `sdeint` with the same method), both on one shared Brownian path (float64 increments on the
  step grid, cast to the run's dtype), as ‖g − g_ref‖ / ‖g_ref‖.

    OMP_NUM_THREADS=1 python benchmarks/bench_sde.py --steps 128 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

# name -> (library, method, gradient or adjoint method)
CONFIGS = {
    "odegrad direct": ("odegrad", "reversible_heun", "direct"),
    "odegrad discrete": ("odegrad", "reversible_heun", "discrete"),
    "odegrad reversible": ("odegrad", "reversible_heun", "reversible"),
    "odegrad backsolve (midpoint)": ("odegrad", "midpoint", "backsolve"),
    "torchsde sdeint": ("torchsde", "reversible_heun", "direct"),
    "torchsde adjoint reversible_heun": ("torchsde", "reversible_heun",
                                         "adjoint_reversible_heun"),
    "torchsde adjoint midpoint": ("torchsde", "midpoint", "midpoint"),
}


class NeuralSDE(nn.Module):
    """dY = f(Y) dt + g(Y) ∘ dW, diagonal noise; the torchsde interface (f, g, noise_type,
    sde_type) and odegrad's (drift, diffusion) on one set of weights."""

    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.drift = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))
        self.diffusion = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim),
                                       nn.Sigmoid())

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return self.diffusion(y)


class GridBrownian:
    """One Brownian path as float64 increments on the grid t0 + k dt, cast to `dtype`; answers
    W(tb) − W(ta) for grid times in either order (torchsde and odegrad duck-typed interface)."""

    def __init__(self, shape, steps: int, seed: int, dtype: torch.dtype):
        g = torch.Generator().manual_seed(seed)
        increments = torch.randn(steps, *shape, generator=g, dtype=torch.float64) / steps ** 0.5
        self.w = torch.cat([torch.zeros(1, *shape, dtype=torch.float64),
                            increments.cumsum(0)]).to(dtype)
        self.steps, self.t0, self.t1 = steps, 0.0, 1.0
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cpu")
        self.levy_area_approximation = "none"

    def _index(self, t) -> int:
        k = float(t) * self.steps
        index = round(k)
        if abs(k - index) > 1e-4:
            raise ValueError(f"query at t={float(t)} is off the step grid")
        return index

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # noqa: N803 (torchsde)
        if return_U or return_A:
            raise ValueError("GridBrownian has no Lévy area")
        if tb is None:
            ta, tb = 0.0, ta
        return self.w[self._index(tb)] - self.w[self._index(ta)]


def _problem(args, dtype, device: str = "cpu"):
    torch.manual_seed(0)
    model = NeuralSDE(args.dim, args.width).to(dtype=dtype, device=device)
    y0 = (0.5 * torch.randn(args.batch, args.dim)).to(dtype=dtype, device=device)
    t = torch.linspace(0, 1, 9, dtype=dtype, device=device)
    return model, y0.requires_grad_(), t


def _solve(config: str, model: NeuralSDE, y0, t, steps: int, bm, seed: int):
    library, method, gradient = CONFIGS[config]
    dt = 1.0 / steps
    if library == "odegrad":
        import odegrad

        kwargs = {"bm": bm} if bm is not None else {"seed": seed}
        return odegrad.sdeint(model.f, model.g, y0, t, method=method, dt=dt,
                              gradient=gradient, params=list(model.parameters()), **kwargs)
    import torchsde

    if gradient == "direct":
        return torchsde.sdeint(model, y0, t, bm=bm, method=method, dt=dt)
    return torchsde.sdeint_adjoint(model, y0, t, bm=bm, method=method, dt=dt,
                                   adjoint_method=gradient)


def _gradient(config, model, y0, t, steps, bm, seed=0):
    ys = _solve(config, model, y0, t, steps, bm, seed)
    return torch.autograd.grad(ys.pow(2).sum(), [y0, *model.parameters()])


def _flat(grads):
    return torch.cat([g.reshape(-1).double() for g in grads])


def run_one(args) -> dict:
    """One configuration in this process: timing (float32) or error (float32 vs float64)."""
    torch.set_num_threads(1)
    config, steps = args.config, args.one_steps
    if args.mode == "error":
        model, y0, t = _problem(args, torch.float32)
        bm = GridBrownian((args.batch, args.dim), steps, seed=1, dtype=torch.float32)
        measured = _flat(_gradient(config, model, y0, t, steps, bm))
        model64, y064, t64 = _problem(args, torch.float64)
        bm64 = GridBrownian((args.batch, args.dim), steps, seed=1, dtype=torch.float64)
        library, method, _ = CONFIGS[config]
        reference = _flat(_direct_same_scheme(library, method, model64, y064, t64, steps, bm64))
        return {"config": config, "steps": steps,
                "relative_error": float((measured - reference).norm() / reference.norm())}
    model, y0, t = _problem(args, torch.float32, args.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _gradient(config, model, y0, t, max(2, steps // 100), None)  # warm-up on a short grid
    setup_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    times = []
    for r in range(args.repeats):
        sync()
        start = time.perf_counter()
        _gradient(config, model, y0, t, steps, None, seed=r)
        sync()
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"config": config, "steps": steps, "time_s": statistics.median(times),
              "times_s": times, "peak_rss_mib": peak_kib / 1024,
              "solve_rss_mib": (peak_kib - setup_kib) / 1024}
    if cuda:  # the solve's own device memory: the peak above what was allocated before it
        result["solve_rss_mib"] = (torch.cuda.max_memory_allocated() - allocated) / 2**20
    return result


def _direct_same_scheme(library, method, model, y0, t, steps, bm):
    """The float64 reference: plain autograd through `method` itself on the path `bm`."""
    dt = 1.0 / steps
    if library == "odegrad":
        import odegrad

        ys = odegrad.sdeint(model.f, model.g, y0, t, bm=bm, method=method, dt=dt,
                            gradient="direct")
    else:
        import torchsde

        ys = torchsde.sdeint(model, y0, t, bm=bm, method=method, dt=dt)
    return torch.autograd.grad(ys.pow(2).sum(), [y0, *model.parameters()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=8, help="state size d")
    parser.add_argument("--width", type=int, default=64, help="MLP width W")
    parser.add_argument("--batch", type=int, default=128, help="batch B")
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--error-steps", type=int, nargs="+", default=[128],
                        help="step counts of the gradient-error runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="timing runs' device (cuda: memory is max_memory_allocated)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config is not None:
        print(json.dumps(run_one(args)))
        return 0
    common = ["--dim", str(args.dim), "--width", str(args.width), "--batch", str(args.batch),
              "--repeats", str(args.repeats), "--device", args.device]
    results = []
    jobs = [(c, s, "time") for s in args.steps for c in args.configs]
    jobs += [(c, s, "error") for s in args.error_steps for c in args.configs]
    for config, steps, mode in jobs:
        command = [sys.executable, __file__, *common, "--config", config, "--one-steps",
                   str(steps), "--mode", mode]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{config} ({steps} steps, {mode}) failed:\n{done.stderr[-2000:]}",
                  file=sys.stderr)
            results.append({"config": config, "steps": steps, "mode": mode,
                            "failed": done.stderr.strip().splitlines()[-1]})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["mode"] = mode
        results.append(result)
        print(json.dumps(result), flush=True)
    _print_table(results, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "torch": torch.__version__,
                       "results": results}, handle, indent=2)
    return 0


def _print_table(results, args) -> None:
    timing = {(r["config"], r["steps"]): r for r in results if r["mode"] == "time"}
    errors = {r["config"]: r for r in results if r["mode"] == "error"}
    steps = args.steps
    head = " | ".join(f"{s} steps: ms, solve MiB (peak)" for s in steps)
    print(f"\n| configuration | {head} | grad. error ({args.error_steps[0]} steps) |")
    print("|---" * (len(steps) + 2) + "|")
    for config in args.configs:
        cells = []
        for s in steps:
            r = timing.get((config, s), {})
            cells.append("failed" if "failed" in r or not r else
                         f"{1e3 * r['time_s']:.0f}, {r['solve_rss_mib']:.1f} "
                         f"({r['peak_rss_mib']:.0f})")
        e = errors.get(config, {})
        error = f"{e['relative_error']:.1e}" if "relative_error" in e else "failed"
        print(f"| {config} | {' | '.join(cells)} | {error} |")


if __name__ == "__main__":
    sys.exit(main())
