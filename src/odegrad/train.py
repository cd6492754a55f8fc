"""Train an ODE model with any method and gradient: `odegrad train classifier|cnf|latent`.

classifier: an ODE-Net on scikit-learn's digits (or MNIST from local IDX files); cnf: a FFJORD
flow on a 2-D toy density; latent: a latent ODE on irregularly sampled spirals or a real
statsmodels series. Each run shows progress bars, prints metrics per epoch and writes to --out:
model.pt (state_dict), summary.json (final metrics, time per iteration, peak memory, NFE) and
PNG plots. Data parallel on several processes or GPUs when started by torchrun, e.g.

    torchrun --standalone --nproc_per_node=2 -m odegrad train classifier
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from . import distributed
from .api import solve
from .argtypes import (
    checkpoints,
    non_empty_path,
    non_negative_float,
    non_negative_int,
    option,
    output_dir_problem,
    positive_float,
    positive_int,
    seed,
)
from .errors import OdegradError
from .gradients import available_gradients, load_gradient
from .models import ODEBlock, ODERNNEncoder
from .models.cde import NeuralCDE
from .models.latent_sde import LatentSDE
from .solvers import SOLVERS
from .train_tasks import TASKS, ClassifierTask, CNFTask, LatentTask, Task

__all__ = ["TASKS", "Task", "ClassifierTask", "CNFTask", "LatentTask", "TrainingFailed",
           "add_arguments", "run", "train"]

# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, task in TASKS.items():
        command = sub.add_parser(
            name, help=task.help, description=task.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _add_common(command, task.defaults, name)
        task.add_arguments(command)


def _add_common(parser: argparse.ArgumentParser, defaults: dict, name: str) -> None:
    solver = parser.add_argument_group("solver")
    solver.add_argument("--method", choices=defaults.get("method_choices", sorted(SOLVERS)),
                        default=defaults["method"], help="the scheme")
    solver.add_argument("--gradient", choices=available_gradients(),
                        default=defaults.get("gradient", "direct"),
                        help="how the solves are differentiated")
    solver.add_argument("--checkpoints", type=checkpoints, default=None,
                        help="what gradient=discrete keeps: all, solution or an int budget")
    solver.add_argument("--step-size", type=positive_float, default=defaults["step_size"],
                        help="fixed-step methods: the step; adaptive ones: the first step")
    solver.add_argument("--rtol", type=positive_float, default=defaults["rtol"],
                        help="relative tolerance of adaptive methods")
    solver.add_argument("--atol", type=positive_float, default=defaults["atol"],
                        help="absolute tolerance of adaptive methods")
    solver.add_argument("--option", type=option, action="append", metavar="KEY=VALUE",
                        help="a method or gradient option passed to odegrad.solve, e.g. "
                             "coupling=0.999 (repeatable)")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=positive_int, default=defaults["epochs"],
                          help="passes over the training set")
    training.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"],
                          help="the global batch, split evenly over the processes")
    training.add_argument("--lr", type=positive_float, default=defaults["lr"],
                          help="AdamW's learning rate")
    training.add_argument("--weight-decay", type=non_negative_float,
                          default=defaults["weight_decay"], help="AdamW's weight decay")
    training.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                          help="learning-rate schedule over all iterations")
    training.add_argument("--max-iters", type=positive_int, default=None,
                          help="stop each epoch after this many iterations (quick checks)")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    training.add_argument("--seed", type=seed, default=0,
                          help="seed of the initialisation, shuffling and sampling, in "
                               "[0, 2**63 - 1]")
    training.add_argument("--threads", type=non_negative_int, default=1,
                          help="torch CPU threads per process (0: torch's default); these "
                               "small models gain little from more and suffer from "
                               "oversubscription")
    training.add_argument("--out", type=non_empty_path, default=Path("runs") / name,
                          help="folder for model.pt, summary.json and the plots")
    training.add_argument("--no-progress", action="store_true", help="hide the progress bars")


class TrainingFailed(OdegradError, RuntimeError):
    """The run cannot go on: the loss or a solve became non-finite, or --out cannot be written.
    The message names where (epoch, iteration) and what to change."""


def _error(args: argparse.Namespace, message: str, code: int = 2) -> int:
    """Print `odegrad train MODEL: error: message` on stderr; return the exit status: 2 for bad
    settings, 1 for a run that failed on the way."""
    print(f"odegrad train {args.model}: error: {message}", file=sys.stderr)
    return code


def _check_solver(args: argparse.Namespace) -> None:
    """Fail fast on a bad method/gradient/options combination, on a tiny linear problem."""
    if args.checkpoints is not None and "checkpoints" not in getattr(
        load_gradient(args.gradient), "OPTIONS", ()
    ):
        raise ValueError(f"--checkpoints applies to --gradient discrete, not {args.gradient!r}")
    y0 = torch.ones(2, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0])
    solution = solve(lambda t, y: -y, y0, t, method=args.method, gradient=args.gradient,
                     rtol=args.rtol, atol=args.atol, step_size=args.step_size,
                     checkpoints=args.checkpoints, **dict(args.option or []))
    solution.ys[-1].sum().backward()


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    problem = output_dir_problem(args.out)
    if problem is not None:
        return _error(args, f"--out {args.out}: {problem}")
    try:
        getattr(TASKS[args.model], "check_solver", _check_solver)(args)
    except (OdegradError, ValueError, TypeError) as error:
        return _error(args, str(error))
    try:
        context = distributed.setup(args.device)
    except ValueError as error:
        return _error(args, str(error))
    try:
        if args.batch_size % context.world_size:
            return _error(args, f"--batch-size {args.batch_size} is not divisible by the "
                                f"{context.world_size} processes")
        task = TASKS[args.model](args, context)
        try:
            train_set = task.load()
        except (FileNotFoundError, ValueError) as error:
            return _error(args, str(error))
        try:
            summary = train(task, train_set)
        except TrainingFailed as error:
            return _error(args, str(error), code=1)
        if context.is_main:
            _print_summary(summary)
        return 0
    finally:
        distributed.shutdown(context)


# ---------------------------------------------------------------- the training loop


def _solvers(model: nn.Module) -> list[nn.Module]:
    """The modules whose `stats` count the solves of a forward pass: every ODEBlock, neural
    CDE and latent SDE, except those an ODE-RNN encoder runs once per gap (their `stats` hold
    the last gap only), which count through the encoder's summed `stats`."""
    encoders = [m for m in model.modules() if isinstance(m, ODERNNEncoder)]
    per_gap = {id(encoder.flow) for encoder in encoders}
    blocks = [m for m in model.modules()
              if isinstance(m, (ODEBlock, NeuralCDE, LatentSDE)) and id(m) not in per_gap]
    return [*blocks, *encoders]


def train(task: Task, train_set: TensorDataset) -> dict:
    """Train `task`'s model on `train_set`; write model.pt, summary.json and plots (rank 0)."""
    args, context = task.args, task.context
    torch.manual_seed(args.seed)
    model = task.build().to(context.device)
    ddp_model = distributed.wrap(model, context)
    torch.manual_seed(args.seed + context.rank)  # per-rank noise (latent samples, Hutchinson)
    sampler = distributed.sampler(train_set, context, shuffle=True, seed=args.seed)
    loader = DataLoader(
        train_set, batch_size=args.batch_size // context.world_size, sampler=sampler,
        shuffle=sampler is None, generator=torch.Generator().manual_seed(args.seed),
    )
    iters_per_epoch = len(loader) if args.max_iters is None else min(len(loader), args.max_iters)
    total_iters = args.epochs * iters_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_iters)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    out = Path(args.out)
    if context.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrainingFailed(f"--out {out}: cannot create the folder: "
                                 f"{error.strerror or error}") from error
        n_params = sum(p.numel() for p in model.parameters())
        print(f"odegrad train {args.model}: {args.dataset}, {n_params} parameters, "
              f"method={args.method}, gradient={args.gradient}, {context.world_size} "
              f"process(es) on {context.device}, {total_iters} iterations")

    solvers = _solvers(model)  # whose stats count the NFE
    history: list[dict] = []
    iteration_times: list[float] = []
    nfe_forward = nfe_backward = 0
    checkpoint_bytes = None
    for epoch in range(1, args.epochs + 1):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        sums: dict = {}
        epoch_start = time.perf_counter()
        bar = tqdm(loader, total=iters_per_epoch, desc=f"epoch {epoch}/{args.epochs}",
                   disable=args.no_progress or not context.is_main, leave=False,
                   dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if i >= iters_per_epoch:
                break
            start = time.perf_counter()
            batch = [b.to(context.device) for b in batch]
            failure = None
            try:
                loss, batch_sums = task.loss(ddp_model, batch)
                loss_value = float(loss.detach())  # the one host sync of the iteration
                if not math.isfinite(loss_value):
                    failure = f"the training loss is {loss_value}"
            except (OdegradError, ArithmeticError) as error:
                failure = f"{type(error).__name__}: {error}"
            failure = _agree(failure, context)
            where = f"at epoch {epoch}, iteration {i + 1} of {iters_per_epoch}"
            if failure is not None:
                bar.close()
                raise TrainingFailed(_failure_message(args, model, failure, where,
                                                      len(iteration_times)))
            optimizer.zero_grad(set_to_none=True)
            try:
                loss.backward()
            except (OdegradError, ArithmeticError) as error:  # e.g. an adjoint solve
                bar.close()
                raise TrainingFailed(_failure_message(
                    args, model, f"{type(error).__name__} in the backward pass: {error}", where,
                    len(iteration_times))) from error
            optimizer.step()
            scheduler.step()
            if context.device.type == "cuda":
                torch.cuda.synchronize(context.device)
            iteration_times.append(time.perf_counter() - start)
            for module in solvers:
                stats = module.stats
                nfe_forward += stats.get("nfe_forward", 0)
                nfe_backward += stats.get("nfe_backward", 0)
                held = stats.get("checkpoint_bytes")
                if held is not None:
                    checkpoint_bytes = max(checkpoint_bytes or 0, int(held))
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + (value.detach() if torch.is_tensor(value)
                                                  else value)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.close()
        train_time = time.perf_counter() - epoch_start
        sums = task.all_reduce(sums)
        record = {"epoch": epoch, "train_loss": sums["loss"] / sums["count"]}
        if "correct" in sums:
            record["train_accuracy"] = sums["correct"] / sums["count"]
        model.eval()
        try:
            record.update(task.evaluate(model))
        except (OdegradError, ArithmeticError) as error:
            raise TrainingFailed(_failure_message(
                args, model, f"{type(error).__name__}: {error}",
                f"evaluating the test set after epoch {epoch}", len(iteration_times))) from error
        record["epoch_time_s"] = train_time
        history.append(record)
        if context.is_main:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                                if k not in ("epoch", "epoch_time_s"))
            tqdm.write(f"epoch {epoch}/{args.epochs}  {metrics}  ({train_time:.1f} s)")

    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "method": args.method,
        "gradient": args.gradient,
        "checkpoints": args.checkpoints,
        "final": {k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_time_s")},
        "epochs": args.epochs,
        "iterations": len(iteration_times),
        "time_per_iteration_s": sum(iteration_times) / max(1, len(iteration_times)),
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "nfe_forward_per_iteration": nfe_forward / max(1, len(iteration_times)),
        "nfe_backward_per_iteration": nfe_backward / max(1, len(iteration_times)),
        "checkpoint_bytes": checkpoint_bytes,
        "peak_memory": _peak_memory(context.device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": context.world_size,
        "device": str(context.device),
        "torch": torch.__version__,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("run",)},
        "history": history,
    }
    if context.is_main:
        try:
            torch.save(model.state_dict(), out / "model.pt")
            summary["files"] = ["model.pt", *task.plot(model, history, out), "summary.json"]
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        except OSError as error:
            raise TrainingFailed(f"--out {out}: cannot write the results: "
                                 f"{error.strerror or error}") from error
    return summary


def _agree(failure: str | None, context: distributed.Context) -> str | None:
    """Whether any process failed this iteration, so that all stop together (a process that
    went on into backward() would wait forever for the gradients of one that stopped)."""
    if not context.distributed:
        return failure
    flag = torch.tensor([0.0 if failure is None else 1.0],
                        device=context.device if context.device.type == "cuda" else "cpu")
    if float(distributed.all_reduce_sum(flag, context)[0]) > 0 and failure is None:
        failure = "another process failed this iteration (its message names the cause)"
    return failure


def _failure_message(args: argparse.Namespace, model: nn.Module, failure: str, where: str,
                     updates: int) -> str:
    """What failed, where, and what to change: the learning rate once updates have happened."""
    message = f"training failed {where}, after {updates} parameter update(s): {failure}. "
    if updates == 0:
        return message + ("No update has happened yet: check the solver settings (--method, "
                          "--rtol/--atol, --step-size) and the data options.")
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    state = "diverged: the parameters are no longer finite" if not finite else "probably diverged"
    return message + (f"The training {state}; try a smaller --lr (now {args.lr:g}), or "
                      f"tighter --rtol/--atol or a smaller --step-size.")


def _peak_memory(device: torch.device) -> dict:
    """CUDA: the peak bytes allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated",
                "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"kind": "cpu_max_rss", "bytes": rss}


def _print_summary(summary: dict) -> None:
    final = "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    peak = summary["peak_memory"]
    print(f"done: {final}")
    print(f"      {summary['iterations']} iterations, "
          f"{1e3 * summary['time_per_iteration_s']:.1f} ms/iteration, NFE/iteration "
          f"{summary['nfe_forward_per_iteration']:.1f} forward + "
          f"{summary['nfe_backward_per_iteration']:.1f} backward, peak memory "
          f"{peak['bytes'] / 2**20:.0f} MiB ({peak['kind']})")
    print(f"      wrote {', '.join(summary.get('files', []))} to {summary['arguments']['out']}")
