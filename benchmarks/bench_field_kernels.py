"""The float64 kernels of `odegrad compare`'s default field (MLP 32-128-128-32 with t as an
input, batch 256), one thread: torch (ATen, what eager calls; inductor calls the same matrix
products) against jax.jit (XLA): the forward products x @ W, the backward's dy @ W^T and
x^T @ dy, and tanh on a hidden layer (256x128) with its derivative. What one evaluation of f
costs each library, behind benchmarks/RESULTS.md §11.5's compare-default gap.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 .venv/bin/python benchmarks/bench_field_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(256, 33, 128), (256, 128, 128), (256, 128, 32)]  # (m, k, n) of the three layers


def median_us(fn, repeats: int) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    print(f"{'product':>30} {'torch us':>9} {'jax us':>9} {'ratio':>6}")
    totals = [0.0, 0.0]
    for m, k, n in SHAPES:
        x = torch.randn(m, k, dtype=torch.float64)
        w = torch.randn(k, n, dtype=torch.float64)
        dy = torch.randn(m, n, dtype=torch.float64)
        cases = [(f"{m}x{k} @ {k}x{n}", x, w, lambda a, b: a @ b),
                 (f"{m}x{n} @ ({k}x{n})^T", dy, w, lambda a, b: a @ b.T),
                 (f"({m}x{k})^T @ {m}x{n}", x, dy, lambda a, b: a.T @ b)]
        for label, a, b, op in cases:
            ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
            jitted = jax.jit(op)
            t_torch = median_us(lambda a=a, b=b, op=op: op(a, b), args.repeats)
            t_jax = median_us(lambda ja=ja, jb=jb, f=jitted: f(ja, jb).block_until_ready(),
                              args.repeats)
            totals[0] += t_torch
            totals[1] += t_jax
            print(f"{label:>30} {t_torch:9.1f} {t_jax:9.1f} {t_torch / t_jax:6.2f}")
    print(f"{'all nine products':>30} {totals[0]:9.1f} {totals[1]:9.1f} "
          f"{totals[0] / totals[1]:6.2f}")
    h = torch.randn(256, 128, dtype=torch.float64)
    g = torch.randn(256, 128, dtype=torch.float64)
    jh, jg = jnp.asarray(h.numpy()), jnp.asarray(g.numpy())
    pointwise = [("tanh 256x128", lambda: torch.tanh(h), jax.jit(jnp.tanh), (jh,)),
                 ("tanh' 256x128: g (1 - tanh^2)", lambda: g * (1 - torch.tanh(h) ** 2),
                  jax.jit(lambda x, y: y * (1 - jnp.tanh(x) ** 2)), (jh, jg))]
    for label, eager, jitted, inputs in pointwise:
        t_torch = median_us(eager, args.repeats)
        t_jax = median_us(lambda f=jitted, i=inputs: f(*i).block_until_ready(), args.repeats)
        print(f"{label:>30} {t_torch:9.1f} {t_jax:9.1f} {t_torch / t_jax:6.2f}")

if __name__ == "__main__":
    main()
