"""solve(..., per_sample=True): a batch of independent ODEs, each with its own adaptive steps.

The leading dimension of y0 indexes independent problems y_b' = f(t, y)_b. Each sample has its
own t_n, h_n, error estimate (the RMS over its own components), accept/reject decision,
PI-controller state and initial step, and may have its own output times: `t` of shape
(batch, n_times), each row strictly monotonic with its own start and end, or a shared 1-D `t`.
The outputs, (n_times, batch, ...), are read from each sample's own dense output, and equal
those of solving each sample alone (per_sample_loop.py).

Contract for f: it is called on the whole batch, f(t, y) with t of shape (batch,) (sample b at
time t[b], as in torchode) and y of y0's shape, and must treat the samples independently: row b
of its output may depend only on t[b] and y[b] (finished or rejected samples' rows are
computed and discarded). A BatchNorm in training mode inside an f module breaks this and is
refused.

Explicit Runge–Kutta methods with an error estimate and dense output, adaptive steps;
gradient="direct" (autograd through the loop) or gradient="discrete" (the exact discrete adjoint
of the masked scheme, per_sample_gradients.py, checkpoints="all", "solution" or an int budget
of states per sample, per_sample_checkpoints.py); gradient="backsolve" or "interpolated" (the
continuous adjoint solved backwards per sample with its own adaptive steps, y re-solved or read
from each sample's Lobatto-node interpolant, per_sample_adjoint.py; options adjoint_method,
adjoint_rtol, adjoint_atol, adjoint_step_size, adjoint_norm="seminorm", n_nodes); and
gradient="reversible" with the adaptive reversible schemes (alf, reversible_heun,
reversible_<base> for a base with an error estimate and dense output, or such a plain method
wrapped with coupling=; options coupling, eta, drift_tol): each sample's accepted steps undone
in reverse, masked (per_sample_reversible.py). Every other option raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .api import (
    LOOP_OPTIONS,
    Solution,
    _check_function_transforms,
    _check_tolerances_positive,
    _is_positive_number,
    _resolve_method,
)
from .control import CONTROL_OPTIONS, StepControl
from .errors import (
    InvalidInputError,
    NonFiniteError,
    UnknownNameError,
    UnsupportedCombinationError,
)
from .gradients import load_gradient
from .per_sample_loop import SampleStats, integrate_per_sample
from .problem import validate_tolerance
from .solvers import make_solver
from .solvers.explicit import ExplicitRungeKutta

__all__ = ["solve_per_sample", "PER_SAMPLE_OPTIONS", "per_sample_methods"]

# The solve options that per_sample=True honours (besides method, rtol, atol, step_size,
# max_steps and params).
PER_SAMPLE_OPTIONS = ("first_step", "adaptive", *CONTROL_OPTIONS)


def per_sample_methods() -> list[str]:
    """The methods per_sample=True runs: explicit Runge–Kutta with an estimate and dense output."""
    from .solvers import SOLVERS

    names = []
    for name in sorted(SOLVERS):
        try:
            solver = make_solver(name)
        except TypeError:  # a factory with required options is not an explicit tableau
            continue
        if _runs_per_sample(solver):
            names.append(name)
    return names


def _runs_per_sample(solver) -> bool:
    return (type(solver) is ExplicitRungeKutta and solver.error_order is not None
            and solver.tableau.dense is not None)


def solve_per_sample(
    f: Callable, y0: Tensor, t: Tensor, *, method: str = "dopri5",
    rtol: float | Tensor | Sequence = 1e-6, atol: float | Tensor | Sequence = 1e-8,
    step_size: float | None = None, gradient: str = "direct", checkpoints=None,
    params: Sequence[Tensor] | None = None, max_steps: int = 10_000,
    event_fn: Callable | None = None, event_direction: int = 0, **options,
) -> Solution:
    """`solve` with per_sample=True (see the module docstring and `odegrad.solve`).

    rtol and atol may be tensors broadcasting to y0's shape, e.g. (batch, 1, ...) for one
    tolerance per sample. Returns a Solution with ys of shape (n_times, batch, ...) and ts = t
    as given. stats: "n_steps" (masked batch steps), "nfe_forward" (f calls, each on the
    whole batch) and, per sample as (batch,) int64 tensors, "sample_n_steps",
    "sample_n_accepted", "sample_n_rejected" and "sample_nfe": what each sample's lone solve
    reports as n_steps, n_accepted, n_rejected and nfe_forward. The gradient methods add their
    own (per_sample_gradients.py, per_sample_adjoint.py, per_sample_reversible.py).
    """
    method = _resolve_method(method)
    load_gradient(gradient)  # an unknown name raises UnknownNameError
    _check_function_transforms(gradient)
    gradient_options = _gradient_options(gradient, options)
    checkpoints = _checkpoint_policy(checkpoints, gradient)
    _refuse(event_fn is not None, "event_fn=")
    _refuse(event_direction != 0, "event_direction=")
    for name in options:
        if name in PER_SAMPLE_OPTIONS:
            continue
        if name in LOOP_OPTIONS or name in ("count_graph_bytes", "memory_budget",
                                            "reproduce_rng"):
            _refuse(True, f"{name}=")
        raise UnknownNameError(
            f"unknown option {name!r} with per_sample=True; valid options: "
            f"{', '.join(PER_SAMPLE_OPTIONS)}"
        )
    if options.get("adaptive") is False:
        _refuse(True, "adaptive=False (fixed steps)")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InvalidInputError(f"max_steps must be a positive int, got {max_steps!r}")

    if gradient == "reversible":
        from .per_sample_reversible import reversible_solver

        solver = reversible_solver(method, gradient_options.pop("coupling", None),
                                   gradient_options.pop("eta", None))
    else:
        solver = make_solver(method)
    if gradient != "reversible" and not _runs_per_sample(solver):
        raise UnsupportedCombinationError(
            f"method={method!r} does not run with per_sample=True yet; use one of "
            f"{', '.join(per_sample_methods())} (explicit Runge–Kutta with adaptive steps)"
        )
    y0 = _validate_y0(y0)
    times = _validate_t(t, y0)
    module = f if isinstance(f, torch.nn.Module) else None
    _check_batch_independent(module)

    if options.get("first_step") is not None and step_size is None:
        step_size = options["first_step"]
    if step_size is not None and not _is_positive_number(step_size):
        raise InvalidInputError(f"step_size must be a positive finite number, got {step_size!r}")
    control = StepControl(**{k: options[k] for k in CONTROL_OPTIONS if k in options})
    rtol = _tolerance(rtol, "rtol", y0)
    atol = _tolerance(atol, "atol", y0)
    _check_tolerances_positive(rtol, atol)

    stats: dict = {"nfe_forward": 0, "nfe_backward": 0, "method": solver.name,
                   "checkpoint_bytes": None}
    sample = SampleStats(*(torch.zeros(0, dtype=torch.long),) * 4)
    loop_kwargs = dict(rtol=rtol, atol=atol, max_steps=max_steps, control=control,
                       step_size=None if step_size is None else float(step_size))
    if gradient != "direct":
        from .api import _unique_params, probe_field

        if params is None:
            params = list(module.parameters()) if module is not None else []
        params = _unique_params(params)
        if torch.is_grad_enabled() and probe_field(f, y0, times.transpose(0, 1), params,
                                                   gradient, module):
            raise UnsupportedCombinationError(
                f"f draws random numbers (e.g. dropout in training mode): gradient={gradient!r} "
                "with per_sample=True evaluates f again in the backward pass and would see "
                "other draws; use gradient='direct', or call f.eval()"
            )
    if gradient == "reversible":
        from .per_sample_reversible import solve_reversible

        ys = solve_reversible(_BatchField(f, y0, stats), y0, times, solver, raw_f=f,
                              params=params, stats=stats, sample=sample, module=module,
                              drift_tol=gradient_options.get("drift_tol"), **loop_kwargs)
    elif gradient in ("backsolve", "interpolated"):
        from .per_sample_adjoint import solve_adjoint

        ys = solve_adjoint(_BatchField(f, y0, stats), y0, times, solver, gradient=gradient,
                           raw_f=f, params=params, stats=stats, sample=sample, module=module,
                           options=gradient_options, **loop_kwargs)
    elif gradient == "discrete":
        from .per_sample_gradients import solve_discrete

        ys = solve_discrete(_BatchField(f, y0, stats), y0, times, solver, raw_f=f, params=params,
                            checkpoints=checkpoints, stats=stats, sample=sample, module=module,
                            **loop_kwargs)
    else:
        ys = integrate_per_sample(_BatchField(f, y0, stats), y0, times, solver, stats=sample,
                                  **loop_kwargs)
    stats.update(
        n_steps=sample.iterations, sample_n_steps=sample.n_steps,
        sample_n_accepted=sample.n_accepted, sample_n_rejected=sample.n_rejected,
        sample_nfe=sample.nfe, per_sample=True,
    )
    return Solution(ts=t, ys=ys, stats=stats)


def _gradient_options(gradient: str, options: dict) -> dict:
    """Take the options of `gradient` out of `options`: backsolve's and interpolated's
    adjoint_* (and n_nodes), reversible's coupling, eta and drift_tol (per_sample_adjoint.py,
    per_sample_reversible.py)."""
    if gradient in ("backsolve", "interpolated"):
        from .per_sample_adjoint import adjoint_options

        names = adjoint_options(gradient)
    elif gradient == "reversible":
        from .per_sample_reversible import REVERSIBLE_OPTIONS as names
    else:
        names = ()
    return {name: options.pop(name) for name in names if name in options}


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise UnsupportedCombinationError(
            f"{what} is not supported with per_sample=True yet; drop it, or solve without "
            "per_sample (shared steps)"
        )


def _checkpoint_policy(checkpoints, gradient: str) -> str | int | None:
    """checkpoints= for gradient="discrete": "all" (default), "solution" or an int c ≥ 1 (at
    most c states per sample, per_sample_checkpoints.py); refused otherwise."""
    if gradient != "discrete":
        _refuse(checkpoints is not None, "checkpoints= (it applies to gradient='discrete')")
        return None
    if checkpoints is None:
        return "all"
    if isinstance(checkpoints, str) and checkpoints in ("all", "solution"):
        return checkpoints
    if isinstance(checkpoints, int) and not isinstance(checkpoints, bool) and checkpoints >= 1:
        return checkpoints
    raise InvalidInputError(
        f"checkpoints must be 'all', 'solution' or a positive int (the states kept per "
        f"sample), got {checkpoints!r}"
    )


def _validate_y0(y0) -> Tensor:
    if isinstance(y0, (tuple, list)):
        _refuse(True, "a tuple y0")
    if not isinstance(y0, Tensor):
        raise InvalidInputError(f"y0 must be a torch.Tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise InvalidInputError(f"y0 must be floating point, got dtype {y0.dtype}")
    if y0.dim() < 1 or y0.numel() == 0:
        raise InvalidInputError(
            f"per_sample=True needs y0 of shape (batch, ...) with batch >= 1 and a non-empty "
            f"state, got shape {tuple(y0.shape)}"
        )
    if not bool(torch.isfinite(y0).all()):
        raise NonFiniteError("y0 holds non-finite values (inf or nan)")
    return y0


def _validate_t(t, y0: Tensor) -> Tensor:
    """t as (batch, n_times): a shared 1-D t expanded, or per-sample rows, each strictly
    monotonic (each row its own direction)."""
    if not isinstance(t, Tensor):
        raise InvalidInputError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.device != y0.device or t.dtype != y0.dtype:
        raise InvalidInputError(
            f"t has dtype {t.dtype} on {t.device} but y0 has dtype {y0.dtype} on {y0.device}"
        )
    batch = y0.shape[0]
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(batch, -1)
    elif t.dim() != 2 or t.shape[0] != batch:
        raise InvalidInputError(
            f"with per_sample=True, t must be 1-D (shared) or (batch, n_times) = ({batch}, n), "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 0:
        raise InvalidInputError("t is empty: give at least the initial time")
    values = t.detach().cpu().double()
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError("t holds non-finite values")
    if values.shape[1] > 1:
        steps = (values[:, 1:] - values[:, :-1]) * torch.sign(values[:, -1:] - values[:, :1])
        bad = (steps <= 0).nonzero()
        if len(bad) > 0:
            b, i = int(bad[0, 0]), int(bad[0, 1])
            raise InvalidInputError(
                f"t[{b}] must be strictly increasing or strictly decreasing: t[{b}, {i}]="
                f"{float(values[b, i]):.10g}, t[{b}, {i + 1}]={float(values[b, i + 1]):.10g}"
            )
    return t


def _tolerance(value, name: str, y0: Tensor) -> Tensor | float:
    """A scalar, or a tensor that broadcasts to y0's shape without enlarging it (so (batch, 1,
    ...) gives one tolerance per sample)."""
    if isinstance(value, (tuple, list)):
        value = torch.as_tensor(value, dtype=y0.dtype, device=y0.device)
    value = validate_tolerance(value, name, y0)
    if isinstance(value, Tensor) and torch.broadcast_shapes(value.shape, y0.shape) != y0.shape:
        raise InvalidInputError(
            f"{name} of shape {tuple(value.shape)} would enlarge y0's shape {tuple(y0.shape)} "
            f"when broadcast; give it y0's shape, or (batch, 1, ...) for one value per sample"
        )
    return value


def _check_batch_independent(module: torch.nn.Module | None) -> None:
    """A BatchNorm in training mode mixes the samples (batch statistics): refused."""
    if module is None:
        return
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            raise InvalidInputError(
                f"f contains a BatchNorm in training mode ({name or 'f itself'}): its batch "
                "statistics couple the samples, but per_sample=True needs f to treat each "
                "sample independently (finished samples are evaluated and discarded). Call "
                "f.eval(), or solve without per_sample"
            )


class _BatchField:
    """f on the batch: counts its calls into stats["nfe_forward"] and checks the first
    output's shape, dtype and device."""

    def __init__(self, f: Callable, y0: Tensor, stats: dict):
        self.f, self.stats, self.like, self.checked = f, stats, y0, False

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.stats["nfe_forward"] += 1
        out = self.f(t, y)
        if not self.checked:
            like = self.like
            if not isinstance(out, Tensor) or out.shape != like.shape or (
                    out.dtype != like.dtype or out.device != like.device):
                got = (f"shape {tuple(out.shape)}, {out.dtype} on {out.device}"
                       if isinstance(out, Tensor) else type(out).__name__)
                raise InvalidInputError(
                    f"f returned {got}; with per_sample=True it must return y's shape "
                    f"{tuple(like.shape)}, {like.dtype} on {like.device} (f gets t of shape "
                    "(batch,))"
                )
            self.checked = True
        return out
