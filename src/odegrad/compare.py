"""Every gradient method side by side on a neural ODE: time, peak memory, NFE, gradient error.

`odegrad compare` runs each gradient method present (`odegrad.GRADIENTS`; `discrete` once per
checkpoint policy: all, solution and a binomial budget) and, with --peers, the peer libraries
on one problem, and prints one table. The loss is L = Σ w · y(T) with a fixed random w; the
gradient is the one w.r.t. (y0, the parameters).

Gradient error, ‖g − g_ref‖ / ‖g_ref‖ against two float64 references:
  scheme: the exact gradient of the same discrete scheme, gradient="direct" in float64 through
          the same solver and the same steps (the accepted steps are recorded in the run's own
          dtype and replayed; ALGORITHMS.md §1, "adaptive steps"). Exact methods (direct,
          discrete, reversible) reach round-off here: about 1e-12 in float64.
  ODE:    the gradient of the exact solution: direct through dopri8 at rtol = atol = 1e-12.
          Continuous adjoints (backsolve, interpolated) are judged here: their error is
          tolerance-sized.
Peak memory: on CUDA, torch.cuda.max_memory_allocated after a reset, less what was allocated
before the run; on the CPU, the resident-set high-water mark (VmHWM, reset by writing 5 to
/proc/self/clear_refs) less the resident set before the run, measured on the second run of a
fresh process per method while glibc serves every allocation of 64 KiB or more by its own
mmap (mallopt M_MMAP_THRESHOLD), so that freed tensors leave the resident set at once and the
mark follows the live tensors rather than heap fragmentation (with --in-process the rows after
the first reuse a grown heap, and their peaks are less clean). `ckpt MB` is the method's own
stats["checkpoint_bytes"] (for direct: the bytes its autograd graph saves).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .api import solve
from .errors import InvalidInputError
from .gradients import available_gradients, load_gradient
from .loop import Trajectory, integrate
from .peers import PEERS, Integration, peer_solve
from .solvers import SOLVERS, make_solver

EXACT_GRADIENTS = ("direct", "discrete", "reversible")
REFERENCE_METHOD = "dopri8"
REFERENCE_TOL = 1e-12
DEFAULT_STEPS = 20
WORKER_TIMEOUT_S = 900
FIELD_GAIN = 2.0  # weights ~ N(0, gain²/fan_in): nonlinear enough for ~15 dopri5 steps at 1e-6

# ---- the problems ----------------------------------------------------------------------------


def _time_like(t, y: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t (a number, a 0-dim tensor or one time per batch element) broadcast to `shape`."""
    t = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(-1)
    return t.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


class MLPField(nn.Module):
    """f(t, y) = W₃ tanh(W₂ tanh(W₁ [y, t] + b₁) + b₂) + b₃: two tanh layers, t as an input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, dim)

    def forward(self, t, y: Tensor) -> Tensor:
        tt = _time_like(t, y, (y.shape[0], 1))
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))))


class ConvField(nn.Module):
    """The conv ODE block: two 3x3 convolutions with tanh between, t concatenated as a channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.c1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t, y: Tensor) -> Tensor:
        tt = _time_like(t, y, (y.shape[0], 1, *y.shape[2:]))
        h = torch.tanh(self.c1(torch.cat([y, tt], dim=1)))
        return self.c2(torch.cat([h, tt], dim=1))


class CountingField(nn.Module):
    """Counts f's evaluations in the forward and the backward phase (for the peers)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.phase = "forward"
        self.counts = {"forward": 0, "backward": 0}

    def forward(self, t, y: Tensor) -> Tensor:
        self.counts[self.phase] += 1
        return self.field(t, y)


@dataclass
class Config:
    """One comparison: the problem, the integration and the measurement settings."""

    problem: str = "mlp"
    device: str = "auto"
    dtype: str = "float64"
    method: str = "dopri5"
    steps: int | None = None  # fixed steps; None: adaptive when the method is
    rtol: float = 1e-6
    atol: float | None = None  # None: rtol
    t_end: float = 1.0
    batch: int | None = None
    dim: int | None = None  # mlp: the state size; conv: the channels
    hidden: int | None = None  # mlp: the hidden width
    image: int | None = None  # conv: the image side
    budget: int = 4  # the checkpoint budget of discrete's binomial policy
    repeats: int = 3
    seed: int = 0
    gradients: list[str] | None = None  # None: every available one
    peers: list[str] | None = None  # None: no peers; [] stands for all of them
    isolate: bool = True
    threads: int | None = None

    @property
    def fixed(self) -> bool:
        return self.steps is not None

    @property
    def step_size(self) -> float | None:
        return None if self.steps is None else self.t_end / self.steps


_SIZES = {  # (batch, dim, hidden, image) per problem, on the CPU and on CUDA
    ("mlp", "cpu"): (256, 32, 128, None), ("mlp", "cuda"): (1024, 64, 256, None),
    ("conv", "cpu"): (16, 16, None, 16), ("conv", "cuda"): (128, 64, None, 16),
}


def resolve(config: Config) -> Config:
    """Validate the configuration and fill the defaults that depend on the device."""
    if config.problem not in ("mlp", "conv"):
        raise InvalidInputError(f"--problem must be mlp or conv, got {config.problem!r}")
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(
            f"--device {device!r} is not a device (cpu, cuda, cuda:1)"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device must be cpu or cuda, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: CUDA is not available on this machine")
    if config.dtype not in ("float32", "float64"):
        raise InvalidInputError(f"--dtype must be float32 or float64, got {config.dtype!r}")
    if config.method not in SOLVERS:
        raise InvalidInputError(
            f"--method {config.method!r} is unknown; valid methods: {', '.join(sorted(SOLVERS))}"
        )
    steps = config.steps
    if steps is not None and steps < 1:
        raise InvalidInputError(f"--steps must be a positive integer, got {steps}")
    if steps is None and not make_solver(config.method).adaptive:
        steps = DEFAULT_STEPS
    for name in ("rtol", "t_end"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise InvalidInputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    atol = config.rtol if config.atol is None else config.atol
    if not (math.isfinite(atol) and atol >= 0):
        raise InvalidInputError(f"--atol must be non-negative, got {atol}")
    for name in ("repeats", "budget", "threads"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise InvalidInputError(f"--{name} must be at least 1, got {getattr(config, name)}")
    present = available_gradients()
    if config.gradients is not None:
        unknown = [g for g in config.gradients if g not in present]
        if unknown:
            raise InvalidInputError(
                f"--gradients: {', '.join(unknown)} not available; available: {', '.join(present)}"
            )
    peers = config.peers
    if peers is not None:
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise InvalidInputError(
                f"--peers: unknown {', '.join(unknown)}; valid peers: {', '.join(PEERS)}"
            )
        peers = list(peers) or list(PEERS)
    batch, dim, hidden, image = _SIZES[(config.problem, parsed.type)]
    sizes = {"batch": config.batch or batch, "dim": config.dim or dim,
             "hidden": config.hidden or hidden, "image": config.image or image}
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise InvalidInputError(f"--{name} must be at least 1, got {value}")
    return replace(
        config, device=str(parsed), steps=steps, atol=atol, peers=peers,
        threads=config.threads or (1 if parsed.type == "cpu" else torch.get_num_threads()),
        **sizes,
    )


@dataclass
class Setup:
    """The problem's tensors: f, y0, the output times and the loss weights w."""

    field: nn.Module
    y0: Tensor
    t: Tensor
    weight: Tensor

    def params(self) -> list[Tensor]:
        return list(self.field.parameters())

    def loss(self, y_end: Tensor) -> Tensor:
        return (self.weight * y_end).sum()


def build(config: Config, dtype: torch.dtype | None = None) -> Setup:
    """The seeded problem: built in float32 and cast, so float32 and float64 share it exactly."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.problem == "mlp":
            field_ = MLPField(config.dim, config.hidden)
            shape = (config.batch, config.dim)
        else:
            field_ = ConvField(config.dim)
            shape = (config.batch, config.dim, config.image, config.image)
        for layer in field_.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                nn.init.normal_(layer.weight, 0.0, FIELD_GAIN / math.sqrt(fan_in))
    y0 = torch.randn(shape, generator=generator)
    weight = torch.randn(shape, generator=generator) / math.sqrt(y0.numel())
    dtype = dtype or getattr(torch, config.dtype)
    device = torch.device(config.device)
    field_ = field_.to(device=device, dtype=dtype)
    t = torch.tensor([0.0, config.t_end], dtype=torch.float32).to(device=device, dtype=dtype)
    y0, weight = y0.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)
    return Setup(field_, y0, t, weight)


def describe(config: Config) -> str:
    if config.problem == "mlp":
        what = (f"mlp field (state {config.dim}, hidden {config.hidden}, two tanh layers, t as "
                f"an input), batch {config.batch}")
    else:
        what = (f"conv block ({config.dim} channels, {config.image}x{config.image}, two 3x3 "
                f"convolutions, tanh, t as a channel), batch {config.batch}")
    if config.fixed:
        how = f"{config.method}, {config.steps} fixed steps"
    else:
        how = f"{config.method}, adaptive, rtol={config.rtol:g} atol={config.atol:g}"
    return f"{what}; t in [0, {config.t_end:g}]; {how}; {config.dtype} on {config.device}"


# ---- the rows --------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: an odegrad gradient (with its options) or a peer."""

    label: str
    kind: str  # "odegrad" or "peer"
    name: str  # the gradient or the peer
    method: str  # the solver
    options: dict = field(default_factory=dict)
    scheme: str | None = None  # the solver of the scheme reference (None: no such reference)
    exact: bool | None = None
    solver: str | None = None  # what the table shows as the solver (default: method)

    def __post_init__(self):
        if self.solver is None:
            self.solver = self.method


def plan_rows(config: Config) -> list[Row]:
    """Every available gradient (each discrete policy; reversible also through alf), then peers."""
    rows: list[Row] = []
    method = config.method
    for gradient in config.gradients or available_gradients():
        if gradient == "discrete":
            for policy in ("all", "solution", config.budget):
                rows.append(Row(f"discrete ({policy})", "odegrad", gradient, method,
                                {"checkpoints": policy}, method, True))
        elif gradient == "reversible":
            if method == "alf" or method.startswith("reversible_"):
                rows.append(Row("reversible", "odegrad", gradient, method, {}, method, True))
                continue
            # gradient="reversible" wraps a plain explicit method as reversible_<method>
            wrapped = f"reversible_{method}"
            known = wrapped in SOLVERS
            rows.append(Row("reversible", "odegrad", gradient, method, {},
                            wrapped if known else None, True, wrapped if known else method))
            if "alf" in SOLVERS:
                rows.append(Row("reversible (alf)", "odegrad", gradient, "alf", {}, "alf", True))
        else:
            rows.append(Row(gradient, "odegrad", gradient, method, {},
                            method, gradient in EXACT_GRADIENTS))
    setting = Integration(method, config.step_size, config.rtol, config.atol)
    for name in config.peers or ():
        peer = PEERS[name]
        try:
            scheme = peer.scheme(setting)
        except (KeyError, InvalidInputError):
            scheme = method
        rows.append(Row(peer.label, "peer", name, method, {}, None, peer.exact, scheme))
    return rows


def _integration_options(config: Config, method: str) -> dict:
    if config.fixed:
        options = {"step_size": config.step_size}
        if make_solver(method).adaptive:
            options["adaptive"] = False
        return options
    return {"rtol": config.rtol, "atol": config.atol}


# ---- the references --------------------------------------------------------------------------


def _flat(grads) -> Tensor:
    return torch.cat([g.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                      for g in grads])


def relative_error(grads, reference: Tensor) -> float:
    """‖g − g_ref‖ / ‖g_ref‖ over the concatenated (y0, parameter) gradients."""
    g = _flat(grads)
    return float((g - reference).norm() / reference.norm())


def replay(f, y0: Tensor, t: Tensor, solver, trajectory: Trajectory) -> Tensor:
    """y(t[-1]) by the accepted steps of `trajectory`, differentiable by autograd ("direct")."""
    state = solver.initial_state(y0)
    carry = solver.init(f, t[0], state)
    for record in trajectory.steps:
        step = solver.step(f, t[record.start_anchor] + record.start_offset, record.h, state, carry)
        state, carry = step.y, step.carry
    return solver.observe(state)


def scheme_reference(config: Config, method: str) -> Tensor:
    """The exact float64 gradient of the scheme `method` with the steps the run takes.

    The steps are recorded by a forward solve in the run's dtype and device (the loop is the
    same for every gradient method), then replayed in float64 under autograd.
    """
    run = build(config)
    solver = make_solver(method)
    options = _integration_options(config, method)
    with torch.no_grad():
        _, trajectory = integrate(
            run.field, run.y0, run.t, solver, rtol=options.get("rtol", 1e-6),
            atol=options.get("atol", 1e-8), step_size=options.get("step_size"),
            adaptive=not config.fixed,
        )
    exact = build(config, torch.float64)
    y0 = exact.y0.clone().requires_grad_()
    y_end = replay(exact.field, y0, exact.t, solver, trajectory)
    return _flat(torch.autograd.grad(exact.loss(y_end), [y0, *exact.params()]))


def ode_reference(config: Config) -> Tensor:
    """The float64 gradient of the exact solution: direct through dopri8 at 1e-12."""
    exact = build(config, torch.float64)
    y0 = exact.y0.clone().requires_grad_()
    sol = solve(exact.field, y0, exact.t, method=REFERENCE_METHOD, rtol=REFERENCE_TOL,
                atol=REFERENCE_TOL, gradient="direct")
    return _flat(torch.autograd.grad(exact.loss(sol.ys[-1]), [y0, *exact.params()]))


# ---- measuring one row -----------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_call(config: Config, row: Row, setup: Setup):
    """A function running one forward+backward: returns (grads, stats, forward s, total s)."""
    device = setup.y0.device
    if row.kind == "peer":
        counted = CountingField(setup.field)
        setting = Integration(row.method, config.step_size, config.rtol, config.atol)

        def call_peer(first: bool = False):
            counted.counts.update(forward=0, backward=0)
            counted.phase = "forward"
            y0 = setup.y0.detach().clone().requires_grad_()
            _sync(device)
            start = time.perf_counter()
            y_end = peer_solve(row.name, counted, y0, 0.0, config.t_end, setting)
            loss = setup.loss(y_end)
            _sync(device)
            middle = time.perf_counter()
            counted.phase = "backward"
            grads = torch.autograd.grad(loss, [y0, *setup.params()], allow_unused=True)
            _sync(device)
            end = time.perf_counter()
            grads = [torch.zeros_like(p) if g is None else g
                     for g, p in zip(grads, [y0, *setup.params()])]
            stats = {"nfe_forward": counted.counts["forward"],
                     "nfe_backward": counted.counts["backward"], "checkpoint_bytes": None}
            return grads, stats, middle - start, end - start

        return call_peer

    kwargs = dict(method=row.method, gradient=row.name, **_integration_options(config, row.method),
                  **row.options)
    counts_graph = "count_graph_bytes" in getattr(load_gradient(row.name), "OPTIONS", ())

    def call(first: bool = False):
        y0 = setup.y0.detach().clone().requires_grad_()
        extra = {"count_graph_bytes": True} if first and counts_graph else {}
        _sync(device)
        start = time.perf_counter()
        sol = solve(setup.field, y0, setup.t, **kwargs, **extra)
        loss = setup.loss(sol.ys[-1])
        _sync(device)
        middle = time.perf_counter()
        grads = torch.autograd.grad(loss, [y0, *setup.params()], allow_unused=True)
        _sync(device)
        end = time.perf_counter()
        grads = [torch.zeros_like(p) if g is None else g
                 for g, p in zip(grads, [y0, *setup.params()])]
        return grads, sol.stats, middle - start, end - start

    return call


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1))


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mmap_threshold(nbytes: int) -> None:
    """Fix glibc's M_MMAP_THRESHOLD: allocations of at least `nbytes` get their own mmap."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _cpu_peak(call) -> int:
    """The resident-set high-water mark of one run, less the resident set before it.

    VmHWM is reset by writing 5 to /proc/self/clear_refs (Linux). For the mark to follow the
    live tensors rather than heap fragmentation, run it while `_mmap_threshold(64 KiB)` holds
    in a process whose heap has not grown yet (see `measure`).
    """
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    call()
    return (_status_kb("VmHWM") - base) * 1024


def peak_memory(call, device: torch.device) -> tuple[int | None, str]:
    """The bytes one run adds at its peak, and how they were measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    try:
        return _cpu_peak(call), "resident-set high-water mark (VmHWM)"
    except OSError:
        return None, "unavailable (needs Linux /proc)"


def _result_head(row: Row) -> dict:
    return {"label": row.label, "kind": row.kind, "name": row.name, "method": row.method,
            "solver": row.solver, "options": row.options, "exact": row.exact, "error": None}


def measure(config: Config, row: Row, references: dict) -> dict:
    """Run one row: gradient error and stats from a first run, then memory, then timings."""
    torch.set_num_threads(config.threads)
    result = _result_head(row)
    cpu = torch.device(config.device).type == "cpu"
    if cpu:
        # Every tensor of 64 KiB or more gets its own mmap, returned to the system when freed,
        # so the resident set follows the live tensors (for the memory run only: it is slow).
        _mmap_threshold(64 * 1024)
    try:
        setup = build(config)
        call = _make_call(config, row, setup)
        grads, stats, _, _ = call(first=True)
        result.update(
            nfe_forward=stats.get("nfe_forward"), nfe_backward=stats.get("nfe_backward"),
            n_steps=stats.get("n_accepted"), checkpoint_bytes=stats.get("checkpoint_bytes"),
        )
        scheme = references.get("scheme", {}).get(row.scheme) if row.scheme else None
        ode = references.get("ode")
        result["err_scheme"] = relative_error(grads, scheme) if scheme is not None else None
        result["err_ode"] = relative_error(grads, ode) if ode is not None else None
        del grads
        result["peak_bytes"], result["memory"] = peak_memory(call, setup.y0.device)
        if cpu:
            _mmap_threshold(32 * 2**20)  # the top of glibc's dynamic range: fast again
        times = [call()[2:] for _ in range(config.repeats)]
        result["forward_ms"] = 1e3 * statistics.median(t[0] for t in times)
        result["total_ms"] = 1e3 * statistics.median(t[1] for t in times)
        result["total_ms_all"] = [1e3 * t[1] for t in times]
    except Exception as error:  # noqa: BLE001 - a failing method is reported in its row
        result["error"] = f"{type(error).__name__}: {error}"
    return result


def _worker(spec_path: str, out_path: str) -> int:
    """Entry point of the per-row process: read the spec, measure, write the result."""
    spec = json.loads(Path(spec_path).read_text())
    references = torch.load(spec["references"]) if spec["references"] else {}
    result = measure(Config(**spec["config"]), Row(**spec["row"]), references)
    Path(out_path).write_text(json.dumps(result))
    return 0


def measure_isolated(config: Config, row: Row, references_path: str | None) -> dict:
    """`measure` in a fresh Python process, so the memory peak is this row's alone."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="odegrad-compare-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(
            {"config": asdict(config), "row": asdict(row), "references": references_path}
        ))
        code = ("import sys; from odegrad.compare import _worker; "
                "sys.exit(_worker(sys.argv[1], sys.argv[2]))")
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(spec_path), str(out_path)],
                                  env=env, capture_output=True, text=True,
                                  timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc = None
        if out_path.exists():
            return json.loads(out_path.read_text())
    if proc is None:
        reason = f"timed out after {WORKER_TIMEOUT_S} s"
    else:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        reason = f"worker exited with {proc.returncode}: {tail[0]}"
    return dict(_result_head(row), error=reason)


# ---- the whole comparison --------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            match = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_compare(config: Config, progress: bool | None = None) -> dict:
    """Measure every row of `config`; returns {"meta", "config", "rows"} (the JSON report)."""
    from tqdm import tqdm

    config = resolve(config)
    rows = plan_rows(config)
    schemes = sorted({row.scheme for row in rows if row.scheme})
    device = torch.device(config.device)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": config.threads, "problem": describe(config), "isolated": config.isolate,
        "reference_errors": {},
    }
    references: dict = {"scheme": {}}
    results = []
    started = time.perf_counter()
    with tqdm(total=1 + len(schemes) + len(rows), desc="compare", unit="run", file=sys.stderr,
              disable=None if progress is None else not progress, leave=False) as bar:
        for name in [None, *schemes]:
            bar.set_postfix_str(f"reference {name or 'ODE'}")
            ref_start = time.perf_counter()
            try:
                if name is None:
                    references["ode"] = ode_reference(config)
                else:
                    references["scheme"][name] = scheme_reference(config, name)
            except Exception as error:  # noqa: BLE001 - reported with the rows it affects
                meta["reference_errors"][name or "ode"] = f"{type(error).__name__}: {error}"
            meta.setdefault("reference_s", {})[name or "ode"] = time.perf_counter() - ref_start
            bar.update()
        with tempfile.TemporaryDirectory(prefix="odegrad-compare-") as tmp:
            references_path = str(Path(tmp, "references.pt"))
            torch.save(references, references_path)
            for row in rows:
                bar.set_postfix_str(row.label)
                row_start = time.perf_counter()
                if config.isolate:
                    result = measure_isolated(config, row, references_path)
                else:
                    result = measure(config, row, references)
                result["wall_s"] = time.perf_counter() - row_start
                results.append(result)
                bar.update()
    meta["wall_s"] = time.perf_counter() - started
    return {"meta": meta, "config": asdict(config), "rows": results}


# ---- output ----------------------------------------------------------------------------------


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _err(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0.0 else f"{value:.1e}"


def _count(value) -> str:
    return "-" if value is None else str(value)


def format_table(report: dict) -> str:
    """The report as the text table `odegrad compare` prints."""
    meta, config = report["meta"], report["config"]
    header = ("gradient", "solver", "fwd ms", "f+b ms", "peak MB", "ckpt MB", "NFE f", "NFE b",
              "err scheme", "err ODE")
    lines = [f"odegrad compare: {meta['problem']}",
             f"device: {meta['device']} (threads: {meta['threads']}), torch {meta['torch']}; "
             f"times: median of {config['repeats']} forward+backward runs",
             ""]
    widths = (26, 18, 8, 8, 8, 8, 6, 6, 10, 9)

    def line(cells) -> str:
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:])]
        return " ".join(out).rstrip()

    lines.append(line(header))
    lines.append("-" * (sum(widths) + len(widths) - 1))
    for r in report["rows"]:
        if r.get("error"):
            message = r["error"].splitlines()[0] if r["error"] else ""
            if len(message) > 120:
                message = message[:117] + "..."
            lines.append(f"{r['label']:<{widths[0]}} {r['solver']:<{widths[1]}} error: {message}")
            continue
        lines.append(line((
            r["label"], r["solver"], _ms(r.get("forward_ms")), _ms(r.get("total_ms")),
            _mb(r.get("peak_bytes")), _mb(r.get("checkpoint_bytes")),
            _count(r.get("nfe_forward")), _count(r.get("nfe_backward")),
            _err(r.get("err_scheme")), _err(r.get("err_ode")),
        )))
    memory = next((r["memory"] for r in report["rows"] if r.get("memory")), "-")
    lines += [
        "",
        "err scheme: vs the exact float64 gradient of the same scheme and steps (exact methods: "
        "round-off)",
        f"err ODE: vs the float64 gradient of the exact solution ({REFERENCE_METHOD}, "
        f"rtol=atol={REFERENCE_TOL:g}) (continuous adjoints: tolerance-sized)",
        f"peak MB: {memory}, above what was resident before the run"
        + ("; each method in its own process" if meta["isolated"] else "; in one process"),
    ]
    for name, error in meta.get("reference_errors", {}).items():
        lines.append(f"reference {name} failed: {error}")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """Time and memory bars and the gradient errors on a log scale, as an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r.get("error")]
    labels = [r["label"] for r in rows]
    ypos = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2.0), sharey=True)
    total = [r.get("total_ms") or 0.0 for r in rows]
    forward = [r.get("forward_ms") or 0.0 for r in rows]
    axes[0].barh(ypos, total, color="tab:blue", label="forward+backward")
    axes[0].barh(ypos, forward, color="tab:cyan", label="forward")
    axes[0].set_xlabel("time per run (ms, median)")
    axes[0].legend(loc="best", fontsize="small")
    peak = [(r.get("peak_bytes") or 0) / 2**20 for r in rows]
    axes[1].barh(ypos, peak, color="tab:orange")
    axes[1].set_xlabel("peak memory (MB)")
    floor = 1e-17
    for offset, key, color, name in ((-0.2, "err_scheme", "tab:green", "vs scheme"),
                                     (0.2, "err_ode", "tab:red", "vs ODE")):
        values = [max(r.get(key) or 0.0, floor) if r.get(key) is not None else 0.0 for r in rows]
        axes[2].barh([y + offset for y in ypos], values, height=0.4, color=color, label=name,
                     left=floor)
        for y, r in zip(ypos, rows):
            if r.get(key) == 0.0:
                axes[2].text(floor * 3, y + offset, "0 (the reference itself)", va="center",
                             fontsize="x-small")
    axes[2].set_xscale("log")
    axes[2].set_xlim(left=floor)
    axes[2].set_xlabel("relative gradient error")
    axes[2].legend(loc="best", fontsize="small")
    axes[0].set_yticks(list(ypos))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    fig.suptitle(report["meta"]["problem"], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the command line ------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--problem", choices=("mlp", "conv"), default="mlp",
        help="the vector field: an MLP (default) or the conv ODE block")
    add("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    add("--dtype", choices=("float32", "float64"), default="float64",
        help="the run's dtype (default float64, where exact methods show round-off errors)")
    add("--method", default="dopri5", help="the solver (default dopri5)")
    add("--steps", type=int, default=None,
        help=f"fixed steps over [0, T] (default: adaptive, or {DEFAULT_STEPS} for fixed-step "
             "methods)")
    add("--rtol", type=float, default=1e-6, help="relative tolerance when adaptive (1e-6)")
    add("--atol", type=float, default=None, help="absolute tolerance when adaptive (rtol)")
    add("--t-end", dest="t_end", type=float, default=1.0, help="integrate over [0, T] (1)")
    add("--batch", type=int, default=None, help="batch size (cpu: 256 mlp, 16 conv)")
    add("--dim", type=int, default=None, help="state size (mlp, 32) or channels (conv, 16)")
    add("--hidden", type=int, default=None, help="mlp hidden width (128)")
    add("--image", type=int, default=None, help="conv image side (16)")
    add("--budget", type=int, default=4, help="discrete's binomial checkpoint budget (4)")
    add("--repeats", type=int, default=3, help="timed runs per method, median reported (3)")
    add("--gradients", type=_names, default=None,
        help="comma-separated gradient methods (default: every available one)")
    add("--peers", nargs="?", const=[], default=None, type=_names,
        help="also run the peers, all or a comma-separated list of: " + ", ".join(PEERS))
    add("--in-process", dest="isolate", action="store_false",
        help="run every method in this process (faster; the CPU memory peaks are less clean)")
    add("--json", metavar="FILE", default=None, help="write the report as JSON")
    add("--plot", metavar="FILE", default=None, help="write a figure (png, svg, pdf)")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bar")
    add("--seed", type=int, default=0, help="seed of the problem (0)")
    add("--threads", type=int, default=None,
        help="torch CPU threads (default 1: reproducible timings, and no oversubscription "
             "when other processes share the cores)")


def config_from_args(args: argparse.Namespace) -> Config:
    names = {f for f in Config.__dataclass_fields__ if hasattr(args, f)}
    return Config(**{name: getattr(args, name) for name in names})


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, write the JSON and the figure when asked."""
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path is not None and not Path(path).resolve().parent.is_dir():
            print(f"odegrad compare: error: --{option} {path}: the directory does not exist",
                  file=sys.stderr)
            return 2
    try:
        report = run_compare(config_from_args(args), progress=args.progress)
    except InvalidInputError as error:
        print(f"odegrad compare: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
