"""compile=True against eager odegrad and the peers (issue 16), on one of three problems:

  p1       (default) the overhead-bound P1: f(t, y) = W₂ tanh(W₁ [y, t] + b₁) + b₂ (state 2,
           hidden 32, t as an input), batch 16, rk4 with 100 fixed steps on [0, 1], loss
           Σ y(1)², float32
  default  `odegrad compare`'s default: its MLP 32-128-128-32 (two tanh layers, t as an input),
           batch 256, float64, dopri5 adaptive at rtol = atol = 1e-6, loss Σ w·y(1)
  conv     compare's conv block (16 channels, 16x16, batch 16, two 3x3 convolutions, t as a
           channel) with rk4, 10 fixed steps, float64, loss Σ w·y(1)

Rows, forward + backward, in interleaved rounds (median of --rounds, wall and CPU time: the
machine is shared, and CPU time is what other jobs disturb least):

  odegrad eager and compile=True for each configuration of CONFIGS: direct, discrete
      (checkpoints "all"), reversible with alf, with reversible_<the problem's method> and
      with reversible_heun (diffrax's ReversibleHeun's scheme), backsolve. A compiled row that
      odegrad does not serve yet is listed as "unsupported" with the first line of its
      UnsupportedCombinationError, so rows join as odegrad serves them. For direct and discrete
      on fixed steps the compile=True row says how the steps run (src/odegrad/compiled.py's
      docstring): on the CPU "compile=True (runs)" (odegrad.compiled.RUNS: one compiled scan
      of the step over all remaining steps), on CUDA, where runs are off by design, or with
      --no-runs "compile=True, blocks of 8" (compiled.BLOCK steps unrolled per call; --block
      changes it); each also has the rows "compile=True, blocks of 8" (RUNS = False, where
      the default row is runs) and "compile=True, single steps" (RUNS = False, BLOCK = 1: one
      compiled call per step), the same solve with the per-call overhead of each. Adaptive
      steps and the other configurations are plain "compile=True" (adaptive steps run singly;
      on the CPU the discrete sweep's replay of them still runs in runs).
  odegrad compile=True discrete at the matched tolerance (adaptive problems, --matched-tol,
      default rtol = atol = 2e-6: on the default problem diffrax's step count at 1e-6, with a
      smaller gradient error than diffrax's)
  odegrad discrete eager with the reverse sweep of git revision --before (P1's history)
  a hand-written eager rk4 loop (fixed-step rk4 problems)
  torchdiffeq odeint / odeint_adjoint (rk4 is torchdiffeq's 3/8 rule: odegrad's rk4_38)
  torchode AutoDiffAdjoint (rk4 tableau / dopri5), eager and compiled: torch.compile(solver) as
      its README writes it compiles only the module's forward, which solve() does not call, so
      the compiled row compiles the bound method torch.compile(solver.solve)
  diffrax under jax.jit: RecursiveCheckpointAdjoint (the rk4 tableau / Dopri5), ReversibleHeun
      with BacksolveAdjoint (diffrax 0.7 has no discrete reversible adjoint: the state is
      reconstructed exactly, but the adjoint is the continuous one, so its gradient is off
      the scheme's by the step's error; odegrad's reversible_heun row is the same scheme) and
      BacksolveAdjoint

Steps and checkpoints: for each odegrad row the accepted / rejected steps and the f
evaluations of its solve (Solution.stats) and the discrete adjoint's checkpoint_bytes; for
diffrax its accepted / rejected steps (sol.stats).

Gradient errors, ‖g − g_ref‖/‖g_ref‖ over (y0, parameters): `ode` against direct through dopri8
at rtol = atol = 1e-12 in float64 (as `odegrad compare`); `scheme` (fixed steps) against
float64 direct through the row's own scheme; `vs eager` for each compiled odegrad row against
its eager row in the same run; and, for float32 problems, gradient_error_float64: compiled vs
eager in float64 per served configuration (the 1e-12 acceptance of issue 16; it compiles
every served configuration once more, --no-float64-check skips it).

Compile times: each compiled configuration, as its default compile=True row runs it (runs on
the CPU, blocks on CUDA or with --no-runs), in a fresh subprocess with inductor's caches off
(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1; the child gets compiled.RUNS and compiled.BLOCK through
ODEGRAD_BENCH_RUNS and ODEGRAD_BENCH_BLOCK): the first call (compilation + one solve) minus a
later call; direct and discrete also at 10x the steps (compile time must not grow with N).
One such child by hand (configuration: a key of CONFIGS, N: the step count, 0 the problem's):

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/bench_compiled.py --problem p1 \\
        --device cpu --compile-child <configuration> <N>

The peers' compile times are their first call, in this process (first_call_s; for odegrad's
compiled rows that first call may reuse graphs an earlier row compiled, so it is no compile
time).

Peak memory (--memory): odegrad.compare.peak_memory of one call after the warm-up, in this
process (CPU: the resident-set high-water mark with glibc mmapping every block of 64 KiB or
more, as `odegrad compare` measures; CUDA: max_memory_allocated). In-process, so the CPU figures
are rougher than compare's one-process-per-row ones. --device cuda runs the torch rows on the
GPU (compiled rows use what odegrad's compile=True does there); diffrax stays on JAX's CPU.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_compiled.py --before 249d914
    flock /tmp/odegrad-bench.lock python benchmarks/bench_compiled.py --problem default --memory

The compare default's acceptance run (formerly benchmarks/bench_compiled_default.py: odegrad
direct and discrete(all), eager and compiled, the matched-tolerance row, diffrax's Dopri5 with
RecursiveCheckpointAdjoint; with torchdiffeq's and torchode's rows too here):

    flock /tmp/odegrad-bench.lock python benchmarks/bench_compiled.py --problem default \\
        --configs direct discrete --no-compile-times --memory --json default.json
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
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import odegrad  # noqa: E402
from bench_compiled_peers import diffrax_case, torch_flat, torchode_case  # noqa: E402
from odegrad import compiled  # noqa: E402
from odegrad.compare import Config, build, peak_memory, resolve  # noqa: E402
from odegrad.compiled import CompilationError  # noqa: E402
from odegrad.errors import UnsupportedCombinationError  # noqa: E402
from odegrad.peers import PEERS, Integration  # noqa: E402
from odegrad.solvers import make_solver  # noqa: E402

# the compile-time child's configuration: the parent's compiled.BLOCK and compiled.RUNS
compiled.BLOCK = int(os.environ.get("ODEGRAD_BENCH_BLOCK", compiled.BLOCK))
compiled.RUNS = os.environ.get("ODEGRAD_BENCH_RUNS", "1" if compiled.RUNS else "0") != "0"

BATCH, HIDDEN, STEPS = 16, 32, 100  # P1
PROBLEMS = ("p1", "default", "conv")
REFERENCE_METHOD, REFERENCE_TOL = "dopri8", 1e-12


# ---- the problems -----------------------------------------------------------------------------


class Field(nn.Module):
    """P1's field: an MLP of (y, t); t a number or one time per batch element (torchode)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 2)

    def forward(self, t, y):
        t = t.reshape(-1, 1).expand(y.shape[0], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, t], -1))))


def setup(dtype=torch.float32):
    """P1's field and y0, drawn in float32 and cast (float32 and float64 share them exactly)."""
    torch.manual_seed(0)
    return Field().to(dtype), torch.randn(BATCH, 2).to(dtype)


@dataclass
class Problem:
    """One benchmark problem: the field, y0 on [t0, t1], the loss, and how to integrate."""

    kind: str  # the field: "p1", "mlp" or "conv"
    field: nn.Module
    y0: Tensor
    t: Tensor
    weight: Tensor | None  # None: loss Σ y(t1)²; else Σ w·y(t1)
    method: str  # "rk4" (fixed steps) or "dopri5" (adaptive)
    steps: int | None
    rtol: float = 1e-6
    atol: float = 1e-6

    @property
    def step_size(self) -> float | None:
        return None if self.steps is None else float(self.t[-1] - self.t[0]) / self.steps

    def params(self) -> list[Tensor]:
        return list(self.field.parameters())

    def loss(self, y_end: Tensor) -> Tensor:
        return (y_end ** 2).sum() if self.weight is None else (self.weight * y_end).sum()

    def integration(self, method: str) -> dict:
        """odeint's keywords for `method`: the fixed step, or the tolerances."""
        if self.steps is None:
            return {"rtol": self.rtol, "atol": self.atol}
        options = {"step_size": self.step_size}
        if make_solver(method).adaptive:
            options["adaptive"] = False
        return options

    def sync(self) -> None:
        if self.y0.device.type == "cuda":
            torch.cuda.synchronize(self.y0.device)


def make_problem(name: str, device: str = "cpu", dtype: str | None = None,
                 steps: int | None = None) -> Problem:
    """The problem `name` (PROBLEMS) in `dtype` (default: the problem's own) on `device`."""
    if name == "p1":
        f, y0 = setup(getattr(torch, dtype or "float32"))
        t = torch.tensor([0.0, 1.0], dtype=y0.dtype)
        return Problem("p1", f.to(device), y0.to(device), t.to(device), None, "rk4",
                       steps or STEPS)
    if name not in PROBLEMS:
        raise SystemExit(f"--problem must be one of {', '.join(PROBLEMS)}, got {name!r}")
    config = (Config(device=device, dtype=dtype or "float64") if name == "default" else
              Config(problem="conv", method="rk4", steps=steps or 10, device=device,
                     dtype=dtype or "float64"))
    config = resolve(config)
    run = build(config)
    return Problem(config.problem, run.field, run.y0, run.t, run.weight, config.method,
                   config.steps, config.rtol, config.atol)


def flat_gradients(problem: Problem, method: str, gradient: str = "direct", **options) -> Tensor:
    """One odegrad forward + backward: the gradients as one float64 CPU tensor."""
    y0 = problem.y0.detach().clone().requires_grad_()
    ys = odegrad.odeint(problem.field, y0, problem.t, method=method, gradient=gradient,
                        **options)
    return torch_flat(torch.autograd.grad(problem.loss(ys[-1]), [y0, *problem.params()]))


def ode_reference(name: str, steps: int | None) -> Tensor:
    """The exact gradient of the ODE: direct through dopri8 at 1e-12, float64 on the CPU."""
    problem = make_problem(name, "cpu", "float64", steps)
    return flat_gradients(problem, REFERENCE_METHOD, rtol=REFERENCE_TOL, atol=REFERENCE_TOL)


def scheme_reference(name: str, steps: int | None, method: str) -> Tensor:
    """Fixed steps: the exact gradient of the scheme `method`, float64 direct on the CPU."""
    problem = make_problem(name, "cpu", "float64", steps)
    return flat_gradients(problem, method, **problem.integration(method))


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- the odegrad configurations ---------------------------------------------------------------

# key -> (gradient, method; None: the problem's, "reversible_*": over the problem's method)
CONFIGS = {
    "direct": ("direct", None),
    "discrete": ("discrete", None),
    "reversible alf": ("reversible", "alf"),
    "reversible reversible_*": ("reversible", "reversible_*"),
    "reversible reversible_heun": ("reversible", "reversible_heun"),
    "backsolve": ("backsolve", None),
}


def config_method(problem: Problem, key: str) -> tuple[str, str]:
    """(gradient, method) of configuration `key` on `problem`."""
    gradient, method = CONFIGS[key]
    if method is None:
        method = problem.method
    elif method == "reversible_*":
        method = f"reversible_{problem.method}"
    return gradient, method


def config_label(problem: Problem, key: str) -> str:
    gradient, method = config_method(problem, key)
    return gradient if key in ("direct", "discrete", "backsolve") else f"{gradient} {method}"


def odegrad_case(problem: Problem, key: str, compile_: bool, tol: float | None = None,
                 stats: dict | None = None) -> Callable[[], tuple]:
    """One forward + backward of configuration `key` (adaptive: at rtol = atol = `tol` if
    given); `stats` (if given) gets the last call's Solution.stats, read after the backward."""
    gradient, method = config_method(problem, key)
    kw = {"checkpoints": "all"} if gradient == "discrete" else {}
    kw |= problem.integration(method)
    if tol is not None and problem.steps is None:
        kw |= {"rtol": tol, "atol": tol}

    def run():
        y = problem.y0.detach().clone().requires_grad_()
        sol = odegrad.solve(problem.field, y, problem.t, method=method, gradient=gradient,
                            compile=compile_, **kw)
        grads = torch.autograd.grad(problem.loss(sol.ys[-1]), [y, *problem.params()])
        problem.sync()
        if stats is not None:
            stats.clear()
            stats.update(sol.stats)
        return grads
    return run


def hand_rk4(problem: Problem):
    f, steps = problem.field, problem.steps
    h = problem.step_size

    def run():
        y = problem.y0.detach().clone().requires_grad_()
        x = y
        for n in range(steps):
            t = torch.tensor(n * h, dtype=y.dtype, device=y.device)
            k1 = f(t, x)
            k2 = f(t + h / 2, x + h / 2 * k1)
            k3 = f(t + h / 2, x + h / 2 * k2)
            k4 = f(t + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        grads = torch.autograd.grad(problem.loss(x), [y, *problem.params()])
        problem.sync()
        return grads
    return run


def torchdiffeq_case(problem: Problem, peer: str):
    setting = Integration(problem.method, problem.step_size, problem.rtol, problem.atol)
    solve = PEERS[peer].solve
    t0, t1 = (float(x) for x in problem.t)

    def run():
        y = problem.y0.detach().clone().requires_grad_()
        y_end = solve(problem.field, y, t0, t1, setting)
        grads = torch.autograd.grad(problem.loss(y_end), [y, *problem.params()])
        problem.sync()
        return grads
    return run


# ---- P1's history: the eager sweep of an older revision; blocks and single compiled steps ------


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


def compiled_setting(runs: bool, block: int):
    """(enter, leave): compile=True with odegrad.compiled.RUNS = `runs` and BLOCK = `block`
    (RUNS False, BLOCK 8: blocks of 8 steps a compiled call; BLOCK 1: one step a call), and
    back to the settings at enter."""
    saved = []

    def enter():
        saved.append((compiled.RUNS, compiled.BLOCK))
        compiled.RUNS, compiled.BLOCK = runs, block

    def leave():
        compiled.RUNS, compiled.BLOCK = saved.pop()
    return enter, leave


def runs_on(problem: Problem) -> bool:
    """Whether compile=True runs fixed steps as runs here (the CPU, compiled.RUNS)."""
    return compiled.RUNS and problem.y0.device.type == "cpu"


def compiled_label(runs: bool, block: int) -> str:
    """How compile=True takes fixed steps with these settings: runs, blocks or single steps."""
    if runs:
        return "compile=True (runs)"
    return f"compile=True, blocks of {block}" if block > 1 else "compile=True, single steps"


# ---- measuring --------------------------------------------------------------------------------


@dataclass
class Case:
    """One row: run() is one forward + backward returning the gradients, flat() makes them one
    float64 CPU tensor; enter/leave bracket every run (a swapped sweep, compiled.RUNS and
    compiled.BLOCK); stats, filled by run() (odegrad: Solution.stats; diffrax: its steps)."""

    run: Callable
    flat: Callable = torch_flat
    scheme: str | None = None  # the odegrad method whose float64 direct gradient it computes
    eager: str | None = None  # a compiled row: the label of its eager row
    enter: Callable = lambda: None
    leave: Callable = lambda: None
    stats: dict | None = None

    def call(self):
        self.enter()
        try:
            return self.run()
        finally:
            self.leave()


def measure(cases: dict, rounds: int) -> dict:
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            case.enter()
            try:
                case.run()
                w0, c0 = time.perf_counter(), time.process_time()
                case.run()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            finally:
                case.leave()
    return {k: {"wall_ms": 1e3 * statistics.median(wall[k]),
                "cpu_ms": 1e3 * statistics.median(cpu[k])} for k in cases}


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def compile_time(args, key: str, steps: int | None) -> dict:
    """Run in a fresh process: first call (compile + solve) and a later call, in seconds."""
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
               ODEGRAD_BENCH_BLOCK=str(compiled.BLOCK),
               ODEGRAD_BENCH_RUNS="1" if compiled.RUNS else "0")
    child = [sys.executable, __file__, "--problem", args.problem, "--device", args.device,
             "--compile-child", key, str(steps or 0)]
    if args.dtype:
        child += ["--dtype", args.dtype]
    done = subprocess.run(child, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"failed": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_child(args, key: str, steps: int) -> None:
    torch.set_num_threads(1)
    problem = make_problem(args.problem, args.device, args.dtype, steps or None)
    run = odegrad_case(problem, key, True)
    start = time.perf_counter()
    try:
        run()
    except UnsupportedCombinationError as error:
        print(json.dumps({"unsupported": first_line(error)}))
        return
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    later = time.perf_counter() - start
    print(json.dumps({"first_s": first, "later_s": later, "compile_s": first - later}))


def compile_times(args, problem: Problem, keys: list[str]) -> dict:
    """Compile time per served configuration; on fixed steps direct and discrete also at 10x
    the step count (it must not grow with N)."""
    out = {}
    for key in keys:
        label = config_label(problem, key)
        if problem.steps is None:
            runs = {label: None}
        else:
            counts = (1, 10) if key in ("direct", "discrete") else (1,)
            runs = {f"{label} N={k * problem.steps}": k * problem.steps for k in counts}
        for name, steps in runs.items():
            out[name] = compile_time(args, key, steps)
            print(json.dumps({name: out[name]}), flush=True)
    return out


def gradient_error_float64(args, keys: list[str]) -> dict:
    """Relative difference compiled vs eager of dL/d(y0, params) in float64, per served
    configuration."""
    problem = make_problem(args.problem, args.device, "float64")
    out = {}
    for key in keys:
        eager = torch_flat(odegrad_case(problem, key, False)())
        try:
            got = torch_flat(odegrad_case(problem, key, True)())
        except UnsupportedCombinationError:
            continue
        out[config_label(problem, key)] = relative(got, eager)
    return out


def odegrad_cases(args, problem: Problem, result: dict) -> dict:
    """The odegrad rows: each configuration eager, then compiled where odegrad serves it (a
    first compiled call here: its seconds go to result["first_call_s"]); for direct and
    discrete on fixed steps the compiled row is labelled by how its steps run (runs on the
    CPU, else blocks) and followed by the blocks (if the default is runs) and single-steps
    rows; on adaptive steps, discrete at --matched-tol too."""
    cases, block, runs = {}, compiled.BLOCK, runs_on(problem)
    fixed = problem.steps is not None
    for key in args.configs:
        gradient, method = config_method(problem, key)
        label = f"odegrad {config_label(problem, key)}"
        eager = f"{label} eager"
        stats: dict = {}
        cases[eager] = Case(odegrad_case(problem, key, False, stats=stats),
                            scheme=method if fixed else None, stats=stats)
        stepped = fixed and gradient in ("direct", "discrete")  # runs, blocks or single steps
        name = f"{label} " + (compiled_label(runs, block) if stepped else "compile=True")
        stats = {}
        run = odegrad_case(problem, key, True, stats=stats)
        start = time.perf_counter()
        try:
            run()
        except UnsupportedCombinationError as error:
            result["unsupported"][name] = first_line(error)
            print(f"{name}: unsupported: {first_line(error)}", flush=True)
            continue
        except CompilationError as error:
            result["unsupported"][name] = f"compilation failed: {first_line(error)}"
            continue
        result["first_call_s"][name] = time.perf_counter() - start
        cases[name] = Case(run, scheme=cases[eager].scheme, eager=eager, stats=stats)
        others = [(False, block)] if runs and block > 1 else []
        others += [(False, 1)] if runs or block > 1 else []
        for setting in others if stepped else ():
            enter, leave = compiled_setting(*setting)
            stats = {}
            cases[f"{label} {compiled_label(*setting)}"] = Case(
                odegrad_case(problem, key, True, stats=stats), scheme=cases[eager].scheme,
                eager=eager, enter=enter, leave=leave, stats=stats)
        if gradient == "discrete" and not fixed and args.matched_tol:
            stats = {}
            matched = f"{name}, rtol=atol={args.matched_tol:g}"
            cases[matched] = Case(odegrad_case(problem, key, True, args.matched_tol, stats),
                                  stats=stats)
    if args.before:
        enter, leave = before_sweep(args.before)
        cases[f"odegrad discrete eager, sweep of {args.before}"] = Case(
            odegrad_case(problem, "discrete", False), enter=enter, leave=leave)
    return cases


def peer_cases(args, problem: Problem, result: dict) -> dict:
    cases = {}
    fixed = problem.steps is not None
    if fixed and problem.method == "rk4":
        cases["hand-written eager rk4"] = Case(hand_rk4(problem), scheme="rk4")
    if importlib.util.find_spec("torchdiffeq"):
        # torchdiffeq's rk4 is the 3/8 rule
        scheme = "rk4_38" if fixed and problem.method == "rk4" else None
        cases["torchdiffeq odeint"] = Case(torchdiffeq_case(problem, "torchdiffeq"),
                                           scheme=scheme)
        cases["torchdiffeq odeint_adjoint"] = Case(torchdiffeq_case(problem, "torchdiffeq_adjoint"))
    else:
        result["torchdiffeq"] = "not installed: not measured"
    if importlib.util.find_spec("torchode"):
        scheme = problem.method if fixed else None
        cases["torchode eager"] = Case(torchode_case(problem, False)[0], scheme=scheme)
        name = "torchode compiled (torch.compile(solver.solve))"
        try:
            run, first = torchode_case(problem, True)
            cases[name] = Case(run, scheme=scheme, eager="torchode eager")
            result["first_call_s"][name] = first
        except Exception as error:  # noqa: BLE001 - reported, the eager row stays
            result["unsupported"][name] = f"compilation failed: {type(error).__name__}: " \
                                          f"{first_line(error)}"
    else:
        result["torchode"] = "not installed: not measured"
    if not importlib.util.find_spec("diffrax"):
        result["diffrax"] = "not installed: not measured"
        return cases
    if problem.y0.device.type != "cpu":
        result["diffrax"] = "jax on the CPU only here: not measured on CUDA"
        return cases
    for config in ("checkpoint", "reversible", "backsolve"):
        stats: dict = {}
        run, flat, compile_s, label = diffrax_case(problem, config, stats)
        # the scheme each computes the gradient of, or approaches (ReversibleHeun)
        scheme = {"checkpoint": problem.method, "reversible": "reversible_heun"}.get(config)
        cases[label] = Case(run, flat, scheme=scheme if fixed else None, stats=stats)
        result["first_call_s"][label] = compile_s
        if config == "checkpoint":
            result["diffrax_compile_s"] = compile_s
    return cases


def gradient_errors(problem_name: str, steps: int | None, cases: dict) -> dict:
    ode = ode_reference(problem_name, steps)
    schemes: dict = {}
    grads = {name: case.flat(case.call()) for name, case in cases.items()}
    out = {}
    for name, case in cases.items():
        row = {"ode": relative(grads[name], ode)}
        if case.scheme is not None:
            if case.scheme not in schemes:
                schemes[case.scheme] = scheme_reference(problem_name, steps, case.scheme)
            row["scheme"] = relative(grads[name], schemes[case.scheme])
        if case.eager is not None:
            row["vs eager"] = relative(grads[name], grads[case.eager])
        out[name] = row
    return out


def memory(cases: dict, device: torch.device) -> dict:
    from odegrad.compare import _mmap_threshold

    out = {}
    if device.type == "cpu":
        _mmap_threshold(64 * 1024)
    try:
        for name, case in cases.items():
            case.call()
            peak, how = peak_memory(case.call, device)
            out[name] = None if peak is None else peak / 2**20
        out["how"] = how
    finally:
        if device.type == "cpu":
            _mmap_threshold(32 * 2**20)
    return out


def case_stats(cases: dict) -> dict:
    """Each row's steps (accepted / rejected), f evaluations and checkpoint bytes, where its
    run reports them (odegrad's Solution.stats, diffrax's sol.stats)."""
    keys = ("n_accepted", "n_rejected", "nfe_forward", "nfe_backward", "checkpoint_bytes")
    return {name: {k: case.stats[k] for k in keys if k in case.stats}
            for name, case in cases.items() if case.stats}


def print_table(result: dict) -> None:
    times, errors = result["times"], result.get("gradient_errors", {})
    mem, stats = result.get("peak_mb", {}), result.get("stats", {})
    base_name = next((k for k in times if k.startswith("odegrad direct eager")), None)
    base = times[base_name]["cpu_ms"] if base_name else None
    print(f"{'row':62s} {'wall ms':>9s} {'cpu ms':>9s} {'x dir.':>6s} {'acc/rej':>8s} "
          f"{'err ode':>9s} {'err scheme':>10s} {'vs eager':>9s} {'peak MB':>8s} "
          f"{'ckpt MB':>8s}")
    for name, row in times.items():
        err, stat = errors.get(name, {}), stats.get(name, {})

        def show(value, spec):
            return format(value, spec) if value is not None else "-"
        steps = (f"{stat['n_accepted']}/{stat.get('n_rejected', '?')}"
                 if "n_accepted" in stat else "-")
        ckpt = stat.get("checkpoint_bytes")
        print(f"{name:62s} {row['wall_ms']:9.1f} {row['cpu_ms']:9.1f} "
              f"{show(row['cpu_ms'] / base if base else None, '6.2f'):>6s} {steps:>8s} "
              f"{show(err.get('ode'), '9.2e'):>9s} {show(err.get('scheme'), '10.2e'):>10s} "
              f"{show(err.get('vs eager'), '9.1e'):>9s} {show(mem.get(name), '8.1f'):>8s} "
              f"{show(None if ckpt is None else ckpt / 2**20, '8.2f'):>8s}")
    for name, why in result["unsupported"].items():
        print(f"{name:62s} unsupported: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=PROBLEMS, default="p1")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="default: the problem's (p1 float32, default and conv float64)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="the odegrad configurations (default: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", default=None, help="git revision of the 'before' sweep")
    parser.add_argument("--no-compile-times", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-float64-check", action="store_true",
                        help="skip compiled vs eager in float64 (float32 problems)")
    parser.add_argument("--memory", action="store_true", help="peak memory of each row")
    parser.add_argument("--json", default=None)
    parser.add_argument("--block", type=int, default=None,
                        help="odegrad.compiled.BLOCK: the steps of the blocks rows, and of the "
                        "compile=True row where it runs blocks (default: the library's)")
    parser.add_argument("--no-runs", action="store_true",
                        help="odegrad.compiled.RUNS = False: the compile=True rows run blocks "
                        "on the CPU too (as on CUDA), compile times included")
    parser.add_argument("--matched-tol", type=float, default=2e-6,
                        help="adaptive problems: also compile=True discrete at this rtol = "
                        "atol (default 2e-6: on the default problem diffrax's step count at "
                        "1e-6, with a smaller gradient error than diffrax's); 0: not")
    parser.add_argument("--compile-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.block is not None:
        compiled.BLOCK = args.block
    if args.no_runs:
        compiled.RUNS = False
    if args.compile_child:
        compile_child(args, args.compile_child[0], int(args.compile_child[1]))
        return
    torch.set_num_threads(1)
    block = compiled.BLOCK
    problem = make_problem(args.problem, args.device, args.dtype)
    result: dict = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "block": block, "runs": runs_on(problem), "problem": args.problem,
                    "device": args.device,
                    "dtype": str(problem.y0.dtype).removeprefix("torch."),
                    "machine": platform.processor() or platform.machine(),
                    "command": " ".join(sys.argv), "unsupported": {}, "first_call_s": {}}
    cases = odegrad_cases(args, problem, result)
    served = [k for k in args.configs
              if not any(n.startswith(f"odegrad {config_label(problem, k)} compile=True")
                         for n in result["unsupported"])]
    if not args.no_compile_times:
        result["compile"] = compile_times(args, problem, served)
    if not args.no_peers:
        cases |= peer_cases(args, problem, result)
    result["gradient_errors"] = gradient_errors(args.problem, problem.steps, cases)
    result["stats"] = case_stats(cases)
    if problem.y0.dtype != torch.float64 and not args.no_float64_check:
        result["gradient_error_float64"] = gradient_error_float64(args, served)
    if args.memory:
        result["peak_mb"] = memory(cases, problem.y0.device)
    result["times"] = measure(cases, args.rounds)
    print_table(result)
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("times", "gradient_errors", "peak_mb", "stats")},
                     indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
