"""compile=True on the compare default (issue 16's acceptance item): odegrad eager and compiled,
direct and discrete(all), against diffrax's Dopri5 under jax.jit with RecursiveCheckpointAdjoint.

The problem is `odegrad compare`'s default (src/odegrad/compare_problems.py): MLP field
32-128-128-32 with two tanh layers and t as an input, batch 256, float64, t in [0, 1], dopri5
adaptive at rtol = atol = 1e-6; the loss is Σ w · y(1) with compare's seeded weights w. Each
case is one forward + backward returning the gradients w.r.t. (y0, the field's parameters).

Reported per case: CPU time (time.process_time) and wall time of one forward + backward,
medians of `--rounds` interleaved rounds, one thread (torch.set_num_threads(1),
OMP_NUM_THREADS=1, XLA's CPU client on one thread); the first call's seconds (compilation);
the accepted / rejected steps and f evaluations; peak memory, as `odegrad compare` measures it
on the CPU (the resident-set high-water mark of one run less the resident set before it,
glibc's mmap threshold at 64 KiB: odegrad.compare._cpu_peak), and odegrad's checkpoint_bytes;
the gradient error against the float64 gradient of the exact solution (eager direct through
dopri8 at rtol = atol = 1e-12, as compare does), and each compiled case against its eager
twin (the same scheme and steps: round-off).

    flock /tmp/odegrad-bench.lock .venv/bin/python benchmarks/bench_compiled_default.py \\
        --json default.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import odegrad  # noqa: E402
from odegrad.compare import _cpu_peak, _mmap_threshold  # noqa: E402
from odegrad.compare_problems import Config, Setup, build, resolve  # noqa: E402

RTOL = ATOL = 1e-6
ODEGRAD_CASES = {  # name: (gradient, compile, options)
    "odegrad direct, eager": ("direct", False, {}),
    "odegrad discrete(all), eager": ("discrete", False, {"checkpoints": "all"}),
    "odegrad direct, compile=True": ("direct", True, {}),
    "odegrad discrete(all), compile=True": ("discrete", True, {"checkpoints": "all"}),
}


def flat(grads) -> Tensor:
    return torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads])


def odegrad_case(setup: Setup, gradient: str, compile_: bool, options: dict,
                 stats_out: dict, method: str = "dopri5", tol: float = RTOL) -> Callable:
    params = setup.params()

    def run():
        y0 = setup.y0.clone().requires_grad_()
        sol = odegrad.solve(setup.field, y0, setup.t, method=method, rtol=tol, atol=tol,
                            gradient=gradient, compile=compile_, **options)
        grads = torch.autograd.grad(setup.loss(sol.ys[-1]), [y0, *params])
        stats_out.clear()
        stats_out.update(sol.stats)
        return grads

    return run


def diffrax_case(setup: Setup, stats_out: dict) -> tuple[Callable, Callable, str]:
    """value_and_grad of the same loss under jax.jit: Dopri5, PIDController(rtol, atol) (its
    defaults otherwise: an I controller, its own first step), RecursiveCheckpointAdjoint()
    (its default checkpoints), diffeqsolve's default max_steps. Returns (run, flat, label)."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    state = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in
             setup.field.state_dict().items()}
    names = [name for name, _ in setup.field.named_parameters()]
    weight = jnp.asarray(setup.weight.cpu().numpy())
    t0, t1 = (float(x) for x in setup.t)

    def field(t, y, p):  # compare_problems.MLPField
        tt = jnp.broadcast_to(jnp.asarray(t, y.dtype), (y.shape[0], 1))
        h = jnp.tanh(jnp.concatenate([y, tt], -1) @ p["l1.weight"].T + p["l1.bias"])
        h = jnp.tanh(h @ p["l2.weight"].T + p["l2.bias"])
        return h @ p["l3.weight"].T + p["l3.bias"]

    def solve(y, p):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), t0, t1, None, y, args=p,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            adjoint=diffrax.RecursiveCheckpointAdjoint())

    def loss(y, p):
        return (weight * solve(y, p).ys[-1]).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    y = jnp.asarray(setup.y0.cpu().numpy())
    stats = jax.jit(lambda y, p: solve(y, p).stats)(y, state)
    stats_out.update({k: int(v) for k, v in stats.items() if np.ndim(v) == 0})

    def run():
        return jax.block_until_ready(step(y, state))[1]

    def to_flat(grads) -> Tensor:
        gy, gp = grads
        parts = [np.asarray(gy).reshape(-1)] + [np.asarray(gp[k]).reshape(-1) for k in names]
        return torch.from_numpy(np.concatenate(parts).astype(np.float64))

    label = f"diffrax {diffrax.__version__} Dopri5, RecursiveCheckpointAdjoint, jax.jit"
    return run, to_flat, label


def timed(call: Callable) -> tuple[float, float, object]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="odegrad cases to run (substrings of their names); default all")
    parser.add_argument("--matched-tol", type=float, default=2e-6,
                        help="also compiled discrete(all) at this rtol = atol (default 2e-6: "
                        "diffrax's step count and a smaller gradient error than diffrax's at "
                        "1e-6 on this problem); 0: not")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _mmap_threshold(64 * 1024)
    config = resolve(Config(device="cpu"))
    setup = build(config)
    result: dict = {"problem": "compare default: MLP 32-128-128-32, batch 256, float64, dopri5 "
                    f"rtol=atol={RTOL:g}, t in [0, 1]", "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": {}}

    print("reference: eager direct dopri8, rtol=atol=1e-12 ...", flush=True)
    reference = flat(odegrad_case(setup, "direct", False, {}, {}, "dopri8", 1e-12)())

    cases: dict[str, tuple[Callable, Callable, dict]] = {}
    for name, (gradient, compile_, options) in ODEGRAD_CASES.items():
        if args.cases and not any(part in name for part in args.cases):
            continue
        stats: dict = {}
        cases[name] = (odegrad_case(setup, gradient, compile_, options, stats), flat, stats)
    if args.matched_tol:
        stats = {}
        name = f"odegrad discrete(all), compile=True, rtol=atol={args.matched_tol:g}"
        cases[name] = (odegrad_case(setup, "discrete", True, {"checkpoints": "all"}, stats,
                                    tol=args.matched_tol), flat, stats)
    if not args.no_diffrax:
        stats = {}
        run, to_flat, label = diffrax_case(setup, stats)
        cases[label] = (run, to_flat, stats)

    grads = {}
    for name, (run, to_flat, _) in cases.items():  # first calls: compilation
        cpu, wall, out = timed(run)
        grads[name] = to_flat(out)
        entry = result["cases"][name] = {"first_call_cpu_s": cpu, "first_call_wall_s": wall}
        entry["grad_error_vs_exact_ode"] = float((grads[name] - reference).norm()
                                                  / reference.norm())
        print(f"{name}: first call {wall:.1f} s wall", flush=True)
    for name in cases:
        if name.endswith("compile=True"):
            twin = name.replace("compile=True", "eager")
            if twin in grads:
                result["cases"][name]["grad_diff_vs_eager"] = float(
                    (grads[name] - grads[twin]).norm() / grads[twin].norm())

    for name, (run, _, stats) in cases.items():  # memory and stats (after the warm-up)
        peak = _cpu_peak(run)
        entry = result["cases"][name]
        entry["peak_rss_mb"] = peak / 1e6
        for key in ("n_accepted", "n_rejected", "nfe_forward", "nfe_backward",
                    "checkpoint_bytes", "num_accepted_steps", "num_rejected_steps",
                    "num_steps"):
            if key in stats:
                entry[key] = stats[key]

    cpu = {name: [] for name in cases}
    wall = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved rounds
        for name, (run, _, _) in cases.items():
            c, w, _ = timed(run)
            cpu[name].append(c)
            wall[name].append(w)
    for name in cases:
        result["cases"][name]["cpu_ms"] = 1e3 * statistics.median(cpu[name])
        result["cases"][name]["wall_ms"] = 1e3 * statistics.median(wall[name])

    print(f"\n{result['problem']}; torch {result['torch']}, one thread; median of "
          f"{args.rounds} interleaved rounds\n")
    head = (f"{'case':62} {'CPU ms':>8} {'wall ms':>8} {'1st s':>6} {'acc/rej':>8} "
            f"{'peak MB':>8} {'ckpt MB':>8} {'err ODE':>8} {'vs eager':>8}")
    print(head)
    print("-" * len(head))
    for name, e in result["cases"].items():
        steps = (f"{e.get('n_accepted', e.get('num_accepted_steps', '?'))}/"
                 f"{e.get('n_rejected', e.get('num_rejected_steps', '?'))}")
        ckpt = e.get("checkpoint_bytes")
        print(f"{name:62} {e['cpu_ms']:8.1f} {e['wall_ms']:8.1f} {e['first_call_wall_s']:6.1f} "
              f"{steps:>8} {e['peak_rss_mb']:8.1f} "
              f"{'-' if ckpt is None else f'{ckpt / 1e6:.1f}':>8} "
              f"{e['grad_error_vs_exact_ode']:8.1e} "
              f"{e['grad_diff_vs_eager'] if 'grad_diff_vs_eager' in e else float('nan'):8.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
