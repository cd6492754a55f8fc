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
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .api import solve
from .argtypes import output_file_problem
from .compare_problems import (
    DEFAULT_STEPS,
    FIELD_GAIN,
    REFERENCE_METHOD,
    REFERENCE_TOL,
    Config,
    ConvField,
    CountingField,
    MLPField,
    Setup,
    build,
    describe,
    resolve,
)
from .compare_report import format_table, write_plot
from .errors import InvalidInputError
from .gradients import available_gradients, load_gradient
from .loop import Trajectory, integrate
from .peers import PEERS, Integration, peer_solve
from .solvers import SOLVERS, make_solver

__all__ = [
    "Config", "MLPField", "ConvField", "CountingField", "Setup", "Row", "resolve", "build",
    "describe", "plan_rows", "relative_error", "replay", "scheme_reference", "ode_reference",
    "peak_memory", "measure", "measure_isolated", "run_compare", "format_table", "write_plot",
    "add_arguments", "config_from_args", "run", "EXACT_GRADIENTS", "REFERENCE_METHOD",
    "REFERENCE_TOL", "DEFAULT_STEPS", "FIELD_GAIN", "WORKER_TIMEOUT_S",
]

EXACT_GRADIENTS = ("direct", "discrete", "reversible")
WORKER_TIMEOUT_S = 900

# The problems (the fields, Config, resolve, build) are in compare_problems; the table and the
# figure in compare_report.

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
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # the references too: 2 threads on busy cores spin
    try:
        _run_rows(config, rows, schemes, references, results, meta, progress)
    finally:
        torch.set_num_threads(threads)
    meta["wall_s"] = time.perf_counter() - started
    return {"meta": meta, "config": asdict(config), "rows": results}


def _run_rows(config: Config, rows: list[Row], schemes: list[str], references: dict,
              results: list[dict], meta: dict, progress: bool | None) -> None:
    """The references first (in this process), then every row; fills `results` and `meta`."""
    from tqdm import tqdm

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


# ---- the command line ------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _gradient_names(text: str) -> list[str]:
    names = _names(text)
    if not names:  # not "every gradient": that is the default, without --gradients
        raise argparse.ArgumentTypeError(
            f"expected comma-separated gradient methods, got {text!r}; available: "
            f"{', '.join(available_gradients())}")
    return names


def _peer_names(text: str) -> list[str]:
    names = _names(text)
    if not names:  # not "every peer": that is --peers alone
        raise argparse.ArgumentTypeError(
            f"expected comma-separated peers, got {text!r} (--peers alone runs all of them); "
            f"valid peers: {', '.join(PEERS)}")
    return names


def _plot_format_problem(path: str) -> str | None:
    """Why matplotlib cannot write a figure named `path`, or None (no suffix: its png)."""
    suffix = Path(path).suffix.lstrip(".").lower()
    if not suffix:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        return f"matplotlib cannot write .{suffix} files; formats: {', '.join(sorted(formats))}"
    return None


def output_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with --json and --plot, checked before the run rather than after it."""
    problems = []
    for option in ("json", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        problem = output_file_problem(path)
        if problem is None and option == "plot":
            problem = _plot_format_problem(path)
        if problem is not None:
            problems.append(f"--{option} {path or repr(path)}: {problem}")
    if (not problems and args.json is not None and args.plot is not None
            and os.path.realpath(args.json) == os.path.realpath(args.plot)):
        problems.append(f"--json and --plot name the same file, {args.json}")
    return problems


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
    add("--gradients", type=_gradient_names, default=None,
        help="comma-separated gradient methods (default: every available one)")
    add("--peers", nargs="?", const=[], default=None, type=_peer_names,
        help="also run the peers, all or a comma-separated list of: " + ", ".join(PEERS))
    add("--in-process", dest="isolate", action="store_false",
        help="run every method in this process (faster; the CPU memory peaks are less clean)")
    add("--json", metavar="FILE", default=None, help="write the report as JSON")
    add("--plot", metavar="FILE", default=None, help="write a figure (png, svg, pdf)")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bar")
    add("--seed", type=int, default=0, help="seed of the problem, in [0, 2**63 - 1] (0)")
    add("--threads", type=int, default=None,
        help="torch CPU threads (default 1: reproducible timings, and no oversubscription "
             "when other processes share the cores)")


def config_from_args(args: argparse.Namespace) -> Config:
    names = {f for f in Config.__dataclass_fields__ if hasattr(args, f)}
    return Config(**{name: getattr(args, name) for name in names})


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, write the JSON and the figure when asked."""
    problems = output_problems(args)
    if problems:
        for problem in problems:
            print(f"odegrad compare: error: {problem}", file=sys.stderr)
        return 2
    try:
        report = run_compare(config_from_args(args), progress=args.progress)
    except InvalidInputError as error:
        print(f"odegrad compare: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    return _write_outputs(report, args)


def _write_outputs(report: dict, args: argparse.Namespace) -> int:
    """Write --json and --plot; 1, with a message, if one cannot be written after all."""
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        try:
            if option == "json":
                Path(path).write_text(json.dumps(report, indent=2))
            else:
                write_plot(report, path)
        except (OSError, ValueError, RuntimeError) as error:  # e.g. a full disk; pgf: no LaTeX
            print(f"odegrad compare: error: --{option} {path}: cannot write it: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 0
