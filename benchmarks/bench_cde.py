"""Neural CDE: time and peak memory of one forward + backward pass, odegrad against torchcde.

Model: odegrad.models.NeuralCDE as `odegrad train cde` builds it (hidden 32, field 32-128-(32 x
channels), ReLU then tanh), Hermite cubic path with backward differences through time, values
and cumulative observation counts, rk4 with one step per knot interval (torchcde: step_size =
the knot gap), cross-entropy on the readout of z(t_end). Peers in the same run, on the same path
data, field and weights:

    odegrad direct                 autograd through every rk4 step
    odegrad discrete               discrete adjoint, checkpoints="all"
    odegrad reversible             reversible_rk4 (McCallum-Foster), gradient="reversible"
    odegrad backsolve              continuous adjoint, rk4 backwards on the same knots
    torchcde adjoint=False         torchcde.cdeint + torchdiffeq rk4 (3/8 rule), step = knot gap
    torchcde adjoint=True          the same with torchdiffeq's odeint_adjoint

Two tables: (1) JapaneseVowels (first --batch training series, --drop of the values removed),
(2) the memory curve against sequence length on synthetic series of --lengths points.

Each configuration runs in its own subprocess: a warm-up pass on a 4-point series, then the
path is built (the input, O(length) whatever the method) and the measured passes run: z(t_0),
the solve, the readout's loss and its backward. Time: median of 1 + --repeats passes.
Memory: on the CPU the growth of the process's peak RSS (getrusage ru_maxrss, its high-water
mark reset through /proc/self/clear_refs once the path is built) over its RSS before the first
measured pass, with glibc told to mmap blocks of 64 KiB or more so that freed memory leaves the
RSS; on CUDA torch.cuda.max_memory_allocated over what was allocated before.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_cde.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = ("odegrad-direct", "odegrad-discrete", "odegrad-reversible", "odegrad-backsolve",
         "torchcde-backprop", "torchcde-adjoint")
_SETTINGS = {
    "odegrad-direct": dict(method="rk4", gradient="direct"),
    "odegrad-discrete": dict(method="rk4", gradient="discrete", checkpoints="all"),
    "odegrad-reversible": dict(method="reversible_rk4", gradient="reversible"),
    "odegrad-backsolve": dict(method="rk4", gradient="backsolve"),
}
_CHILD_ENV = {"PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}


def _data(config: dict, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """times (N, L), values (N, L, 12) and labels (N,)."""
    batch = config["batch"]
    if config["data"] == "japanese_vowels" and length is None:
        from odegrad.data.irregular import load_japanese_vowels

        train = load_japanese_vowels(drop=config["drop"]).train
        return train.times[:batch], train.values[:batch], train.labels[:batch]
    length = length or config["length"]
    g = torch.Generator().manual_seed(0)
    values = torch.randn(batch, length, 12, generator=g).cumsum(1) / math.sqrt(length)
    values[torch.rand(values.shape, generator=g) < config["drop"]] = math.nan
    times = torch.linspace(0, 1, length).expand(batch, length).contiguous()
    return times, values, torch.randint(0, 9, (batch,), generator=g)


def _model(case: str, time_step: float):
    from odegrad.models.cde import NeuralCDE

    settings = _SETTINGS.get(case, dict(method="rk4", gradient="direct"))
    torch.manual_seed(0)
    # no step_size: cdeint takes one step per knot interval (outputs at every knot)
    return NeuralCDE(12, 32, 9, width=128, count_scale=time_step, **settings)


def _path(case: str, model, times, values):
    """The control path of the batch (odegrad's, or torchcde's from the same data) and its
    grid: the input, built before the measurement."""
    X, grid, _ = model.path(times, values)
    if case.startswith("torchcde"):
        import torchcde

        _, data, _ = model.path_data(times, values)
        coefficients = torchcde.hermite_cubic_coefficients_with_backward_differences(data, grid)
        X = torchcde.CubicSpline(coefficients, grid)
    return X, grid


def _forward_backward(case: str, model, X, grid, labels) -> dict:
    """z(t_0), the solve, the readout's cross-entropy and its backward(); the solve's
    statistics."""
    ends = grid[[0, -1]]
    if case.startswith("odegrad"):
        z_end = model.hidden_states(X, ends)[-1]
    else:
        import torchcde

        z0 = model.initial(X.evaluate(grid[0]))
        adjoint = case == "torchcde-adjoint"
        extra = {"adjoint_params": tuple(model.field.parameters())} if adjoint else {}
        z_end = torchcde.cdeint(X, model.field, z0, ends, adjoint=adjoint, method="rk4",
                                options={"step_size": float(grid[1] - grid[0])}, **extra)[:, -1]
    loss = torch.nn.functional.cross_entropy(model.readout(z_end), labels)
    loss.backward()
    stats = dict(model.stats.items()) if case.startswith("odegrad") else {}
    return {k: stats[k] for k in ("nfe_forward", "nfe_backward", "checkpoint_bytes", "drift")
            if k in stats}


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of the RSS (and so getrusage's ru_maxrss) to the
    current RSS (Linux >= 4.0), so that building the path is not counted."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(config: dict) -> dict:
    """Measure one (case, data) in this process."""
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    times, values, labels = (x.to(device) for x in _data(config))
    time_step = float(times[0, 1] - times[0, 0])
    model = _model(config["case"], time_step).to(device)
    case = config["case"]
    warm_times, warm_values, warm_labels = (x.to(device) for x in _data(config, length=4))
    # imports, kernels, allocator pools
    _forward_backward(case, model, *_path(case, model, warm_times, warm_values), warm_labels)
    model.zero_grad()
    X, grid = _path(case, model, times, values)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_bytes()
    start = time.perf_counter()
    stats = _forward_backward(case, model, X, grid, labels)
    sync()
    durations = [time.perf_counter() - start]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for _ in range(config["repeats"]):
        model.zero_grad()
        sync()
        start = time.perf_counter()
        _forward_backward(case, model, X, grid, labels)
        sync()
        durations.append(time.perf_counter() - start)
    return {"time_s": statistics.median(durations), "peak_bytes": max(peak, 0),
            "length": int(times.shape[1]), **stats}


def _measure(config: dict) -> dict | str:
    result = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)],
                            capture_output=True, text=True, env={**os.environ, **_CHILD_ENV})
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"failed: {lines[-1] if lines else result.returncode}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _row(label: str, r: dict | str) -> str:
    if isinstance(r, str):
        return f"| {label} | {r} | | | |"
    nfe = f"{r['nfe_forward']} / {r['nfe_backward']}" if "nfe_forward" in r else "–"
    held = r.get("checkpoint_bytes")
    held = f"{held / 2**10:.0f} KiB" if held is not None else "–"
    return (f"| {label} | {1e3 * r['time_s']:.0f} | {r['peak_bytes'] / 2**20:.1f} | {held} | "
            f"{nfe} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--drop", type=float, default=0.3)
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--curve-cases", nargs="+", choices=CASES,
                        default=["odegrad-direct", "odegrad-discrete", "odegrad-reversible",
                                 "torchcde-backprop", "torchcde-adjoint"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = "cuda max_memory_allocated" if device == "cuda" else "peak RSS growth"
    base = {"device": device, "batch": args.batch, "drop": args.drop,
            "repeats": args.repeats, "threads": args.threads}
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}; batch {args.batch}; drop {args.drop}; repeats "
          f"1+{args.repeats}; threads {args.threads}; memory: {memory}\n")
    print("JapaneseVowels (training series, Hermite path of 25 channels, hidden 32)\n")
    print("| case | time (ms) | peak memory (MiB) | checkpoint_bytes | NFE fwd / bwd |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        r = _measure({**base, "case": case, "data": "japanese_vowels"})
        print(_row(case, r), flush=True)
    print("\nMemory against sequence length (synthetic random walks, same model)\n")
    print("| case | length | time (ms) | peak memory (MiB) | checkpoint_bytes | NFE fwd / bwd |")
    print("|---|---|---|---|---|---|")
    for case in args.curve_cases:
        for length in args.lengths:
            r = _measure({**base, "case": case, "data": "synthetic", "length": length})
            print(_row(f"{case} | {length}", r), flush=True)


if __name__ == "__main__":
    main()
