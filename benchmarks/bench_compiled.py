"""compile=True against eager odegrad and the peers on issue 16's overhead-bound problem P1.

P1: f(t, y) = W₂ tanh(W₁ [y, t] + b₁) + b₂ (state 2, hidden 32, t as an input), batch 16,
rk4 with 100 fixed steps on [0, 1], forward + backward of Σ y(1)², float32, one thread.
Implementations, in interleaved rounds (median of --rounds, wall and CPU time: the machine is
shared, and CPU time is what other jobs disturb least):

  odegrad direct / discrete(all), eager and compile=True (blocks of odegrad.compiled.BLOCK
      steps, --block to change it), and compile=True with single steps (BLOCK = 1: the first
      slice), all in the same rounds
  odegrad discrete(all) with the reverse sweep of git revision --before (the eager sweep
      before issue 16's slimming: its discrete_sweep.py and checkpoint_store.py swapped in)
  torchdiffeq odeint / odeint_adjoint (rk4, step_size 0.01)
  a hand-written eager rk4 loop under autograd
  diffrax with the rk4 tableau (RecursiveCheckpointAdjoint) under jax.jit, if installed

Compile times: each in a fresh subprocess with inductor's caches off
(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1): the first call (compilation + one solve) minus a later
call, for compiled direct and discrete at N = 100 and N = 1000 steps.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_compiled.py --before 249d914
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import odegrad  # noqa: E402
from odegrad import compiled  # noqa: E402

compiled.BLOCK = int(os.environ.get("ODEGRAD_BENCH_BLOCK", compiled.BLOCK))

BATCH, HIDDEN, STEPS = 16, 32, 100


class Field(nn.Module):
    """P1's field: an MLP of (y, t)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 2)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(y.shape[0], 1)], -1))))


def setup(dtype=torch.float32):
    torch.manual_seed(0)
    return Field().to(dtype), torch.randn(BATCH, 2, dtype=dtype)


def odegrad_case(f, y0, gradient, compile_, steps=STEPS):
    t = torch.tensor([0.0, 1.0], dtype=y0.dtype)
    kw = {"checkpoints": "all"} if gradient == "discrete" else {}

    def run():
        y = y0.clone().requires_grad_()
        ys = odegrad.odeint(f, y, t, method="rk4", step_size=1.0 / steps, gradient=gradient,
                            compile=compile_, **kw)
        (ys[-1] ** 2).sum().backward()
    return run


def hand_rk4(f, y0):
    def run():
        y = y0.clone().requires_grad_()
        h, x = 1.0 / STEPS, y
        for n in range(STEPS):
            t = torch.tensor(n * h)
            k1 = f(t, x)
            k2 = f(t + h / 2, x + h / 2 * k1)
            k3 = f(t + h / 2, x + h / 2 * k2)
            k4 = f(t + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        (x ** 2).sum().backward()
    return run


def torchdiffeq_case(f, y0, adjoint):
    import torchdiffeq

    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    t = torch.tensor([0.0, 1.0])

    def run():
        y = y0.clone().requires_grad_()
        ys = solve(f, y, t, method="rk4", options={"step_size": 1.0 / STEPS})
        (ys[-1] ** 2).sum().backward()
    return run


def diffrax_case(f, y0):
    """The same weights in JAX; value_and_grad w.r.t. y0 and the weights under jax.jit."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    class RK4(diffrax.AbstractERK):
        """The classical rk4 tableau (diffrax ships none), as its docs build custom ERKs."""

        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]), b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    w = {k: jnp.asarray(v.detach().numpy()) for k, v in f.state_dict().items()}

    def field(t, y, p):
        z = jnp.concatenate([y, jnp.broadcast_to(t, (y.shape[0], 1))], -1)
        return jnp.tanh(z @ p["l1.weight"].T + p["l1.bias"]) @ p["l2.weight"].T + p["l2.bias"]

    def loss(y, p):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), RK4(), 0.0, 1.0, 1.0 / STEPS,
                                  y, args=p, max_steps=STEPS + 1,
                                  adjoint=diffrax.RecursiveCheckpointAdjoint())
        return (sol.ys[-1] ** 2).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    y = jnp.asarray(y0.numpy())
    start = time.perf_counter()
    jax.block_until_ready(step(y, w))
    compile_s = time.perf_counter() - start

    def run():
        jax.block_until_ready(step(y, w))
    return run, compile_s, diffrax.__version__


def before_sweep(revision: str):
    """Swap the reverse sweep of git `revision` into odegrad.gradients.discrete; returns
    (install, restore)."""
    import odegrad.gradients.discrete as discrete

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {}
    for name in ("checkpoint_store", "discrete_sweep"):
        source = subprocess.run(
            ["git", "show", f"{revision}:src/odegrad/gradients/{name}.py"], cwd=root,
            check=True, capture_output=True, text=True).stdout
        full = f"odegrad.gradients._before_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "odegrad.gradients"
        sys.modules[full] = module
        if name == "discrete_sweep":  # its own checkpoint store, not today's
            source = source.replace("from .checkpoint_store import",
                                    "from ._before_checkpoint_store import")
        exec(compile(source, f"{revision}:{name}.py", "exec"), module.__dict__)
        modules[name] = module
    names = ("_Backward", "_pack", "_unpack", "_Store", "_Kept", "_INIT")
    now = {k: getattr(discrete, k) for k in names}
    old = {k: getattr(modules["discrete_sweep" if k == "_Backward" else "checkpoint_store"], k)
           for k in names}
    return (lambda: [setattr(discrete, k, v) for k, v in old.items()],
            lambda: [setattr(discrete, k, v) for k, v in now.items()])


def single_steps(block: int):
    """(enter, leave): compile=True with BLOCK = 1 (one compiled call per step), and back."""
    def enter():
        compiled.BLOCK = 1

    def leave():
        compiled.BLOCK = block
    return enter, leave


def measure(cases: dict, rounds: int) -> dict:
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (run, enter, leave) in cases.items():
            enter()
            try:
                run()
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            finally:
                leave()
    return {k: {"wall_ms": 1e3 * statistics.median(wall[k]),
                "cpu_ms": 1e3 * statistics.median(cpu[k])} for k in cases}


def compile_time(gradient: str, steps: int) -> dict:
    """Run in a fresh process: first call (compile + solve) and a later call, in seconds."""
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
               ODEGRAD_BENCH_BLOCK=str(compiled.BLOCK))
    out = subprocess.run([sys.executable, __file__, "--compile-child", gradient, str(steps)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compile_child(gradient: str, steps: int) -> None:
    torch.set_num_threads(1)
    f, y0 = setup()
    run = odegrad_case(f, y0, gradient, True, steps)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    later = time.perf_counter() - start
    print(json.dumps({"first_s": first, "later_s": later, "compile_s": first - later}))


def gradient_error(dtype=torch.float64) -> dict:
    """Relative difference compiled vs eager of dL/d(y0, params), float64, per gradient."""
    f, y0 = setup(dtype)
    out = {}
    for gradient in ("direct", "discrete"):
        grads = []
        for compile_ in (False, True):
            f.zero_grad()
            y = y0.clone().requires_grad_()
            ys = odegrad.odeint(f, y, torch.tensor([0.0, 1.0], dtype=dtype), method="rk4",
                                step_size=1.0 / STEPS, gradient=gradient, compile=compile_)
            g = torch.autograd.grad((ys[-1] ** 2).sum(), [y, *f.parameters()])
            grads.append(torch.cat([x.reshape(-1) for x in g]))
        out[gradient] = float((grads[1] - grads[0]).norm() / grads[0].norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", default=None, help="git revision of the 'before' sweep")
    parser.add_argument("--no-compile-times", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--block", type=int, default=None,
                        help="odegrad.compiled.BLOCK for compile=True (default: the library's)")
    parser.add_argument("--compile-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_child:
        compile_child(args.compile_child[0], int(args.compile_child[1]))
        return
    torch.set_num_threads(1)
    if args.block is not None:
        compiled.BLOCK = args.block
    block = compiled.BLOCK
    result: dict = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "block": block,
                    "machine": platform.processor() or platform.machine(),
                    "command": " ".join(sys.argv)}
    if not args.no_compile_times:
        result["compile"] = {f"{g} N={n}": compile_time(g, n)
                             for g in ("direct", "discrete") for n in (100, 1000)}
        print(json.dumps(result["compile"], indent=1), flush=True)
    f, y0 = setup()
    nothing = (lambda: None, lambda: None)
    cases = {}
    for gradient in ("direct", "discrete"):
        cases[f"odegrad {gradient} eager"] = (odegrad_case(f, y0, gradient, False), *nothing)
        cases[f"odegrad {gradient} compiled, blocks of {block}"] = (
            odegrad_case(f, y0, gradient, True), *nothing)
        if block > 1:
            cases[f"odegrad {gradient} compiled, single steps"] = (
                odegrad_case(f, y0, gradient, True), *single_steps(block))
    if args.before:
        cases[f"odegrad discrete eager, sweep of {args.before}"] = (
            odegrad_case(f, y0, "discrete", False), *before_sweep(args.before))
    cases["hand-written eager rk4"] = (hand_rk4(f, y0), *nothing)
    try:
        cases["torchdiffeq odeint"] = (torchdiffeq_case(f, y0, False), *nothing)
        cases["torchdiffeq odeint_adjoint"] = (torchdiffeq_case(f, y0, True), *nothing)
    except ImportError:
        pass
    try:
        run, compile_s, version = diffrax_case(f, y0)
        cases[f"diffrax {version} RK4 under jax.jit"] = (run, *nothing)
        result["diffrax_compile_s"] = compile_s
    except ImportError:
        result["diffrax"] = "not installed: not measured"
    result["times"] = measure(cases, args.rounds)
    result["gradient_error_float64"] = gradient_error()
    base = result["times"]["odegrad direct eager"]["cpu_ms"]
    for name, row in result["times"].items():
        print(f"{name:55s} wall {row['wall_ms']:8.1f} ms  cpu {row['cpu_ms']:8.1f} ms  "
              f"x direct eager (cpu) {row['cpu_ms'] / base:5.2f}")
    print(json.dumps({k: v for k, v in result.items() if k != "times"}, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
