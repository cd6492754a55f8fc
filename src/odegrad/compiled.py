"""compile=True: one explicit Runge–Kutta step, f inlined, under torch.compile (issue 16).

What is compiled is the step, never the loop: the scheme's stages with f inlined and the
linear combinations, as one function of (stage times, h, y[, K_1]) returning y_{n+1} and the
stages. It is compiled once per (f, scheme, shapes, dtype, device, grad mode) and reused for
every step and every later call: the times and the step size enter as 0-dim tensors, so new
values of t, a clipped last step or another step count do not recompile (torch.compile with
dynamic=False; a new shape, dtype or device does). Its backward (AOTAutograd's compiled
backward of the step) is what differentiates it: under gradient="direct" autograd chains the
compiled backward of every step; under gradient="discrete" the reverse sweep replays each step
from its saved state and pulls the adjoint back through that compiled backward (the replay of
gradients/discrete_sweep.py), so both stay exact for the computed discretisation. The replay
recomputes a step's stages in its graph, so under "discrete" every checkpoint policy keeps
states only: "all" holds the N states, as "solution" does (stats checkpoint_bytes says so).

The cache is keyed on the user's f itself (the MAX_FIELDS most recently used), not on the
per-call wrappers that count evaluations; each entry owns a fresh copy of the step's code
object, so torch.compile's per-code cache holds one f's graphs only and different fields never
evict each other. A new lambda or bound method each call is a new f, compiled again.
f is counted outside the compiled region: s evaluations per step (s − 1 for an FSAL scheme,
whose first stage is the carry), as the eager loop counts them.

Only fixed-step explicit Runge–Kutta solves with gradient="direct" or "discrete" are
compiled; anything else with compile=True raises UnsupportedCombinationError naming what is
supported (see `check`). A failure inside torch.compile raises CompilationError with
torch's message (no silent fall-back to eager: pass compile=False for that).
"""

from __future__ import annotations

import itertools
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import OdegradError, UnsupportedCombinationError
from .solvers.base import Scalar, Step, VectorField
from .solvers.explicit import ExplicitRungeKutta

SUPPORTED = (
    "compile=True supports fixed-step explicit Runge–Kutta solves (euler, midpoint, heun, "
    "rk4, ralston, ..., or an adaptive tableau with adaptive=False) with gradient='direct' or "
    "'discrete', without event_fn, step_t/jump_t or per_sample"
)
GRADIENTS = ("direct", "discrete")


class CompilationError(OdegradError, RuntimeError):
    """torch.compile failed on the step; the message carries torch's reason."""


def check(
    *, gradient: str, solver: Any, adaptive: bool, event_fn: Any = None,
    step_times: bool = False, stochastic: bool = False, extra: Sequence[str] = (),
) -> None:
    """Raise UnsupportedCombinationError for what compile=True does not serve."""
    reasons = []
    if gradient not in GRADIENTS:
        reasons.append(f"gradient={gradient!r}")
    if solver is not None and not _plain_rk(solver):
        reasons.append(f"method={getattr(solver, 'name', solver)!r} (not an explicit "
                       "Runge–Kutta tableau)")
    elif solver is not None and adaptive:
        reasons.append(f"adaptive steps of method={solver.name!r} (pass adaptive=False and "
                       "step_size=)")
    if event_fn is not None:
        reasons.append("event_fn")
    if step_times:
        reasons.append("step_t/jump_t")
    if stochastic and gradient == "discrete":
        reasons.append("a field that draws random numbers (dropout) with gradient='discrete'")
    reasons.extend(extra)
    if reasons:
        raise UnsupportedCombinationError(
            f"compile=True does not support {', '.join(reasons)}. {SUPPORTED}; pass "
            "compile=False for the rest"
        )


def _plain_rk(solver: Any) -> bool:
    from .gradients.discrete import _is_plain_rk

    return _is_plain_rk(solver)


class CompiledRungeKutta(ExplicitRungeKutta):
    """An explicit Runge–Kutta scheme whose step runs as one compiled function of f.

    `field` is what the step calls (the user's f, or its flat view for a tuple state),
    `counted` the API's counting wrapper of it, whose statistics this step updates: the
    compiled region calls `field` directly, so the count is added here, outside it."""

    def __init__(self, base: ExplicitRungeKutta, field: VectorField, counted: Any,
                 cache_key: Any):
        super().__init__(base.tableau)
        self.fsal = bool(base.tableau.fsal)
        self.counted = counted
        self.compiled = _compiled_step(field, cache_key, self)
        self._h: dict[float, Tensor] = {}  # 0-dim tensors of the float step sizes seen
        self._checked = False

    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> Tensor | None:
        # An FSAL step takes K_1 as its carry; otherwise K_1 is evaluated inside the step.
        return f(t0, y0) if self.fsal else None

    def step(
        self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: Tensor | None,
        stage_times: Sequence[Tensor] | None = None,
    ) -> Step:
        if stage_times is None:  # the eager scheme's scalar ops, bit for bit
            stage_times = [t] + [t + c * h for c in self._c[1:]]
        h_tensor = h if isinstance(h, Tensor) else self._step_tensor(h, y)
        k1 = carry if self.fsal else None
        if self.fsal and k1 is None:
            k1 = f(t, y)
        if not torch.is_grad_enabled():  # one inference graph, whatever requires grad
            y, h_tensor = y.detach(), h_tensor.detach()
            k1 = None if k1 is None else k1.detach()
            stage_times = [x.detach() for x in stage_times]
        try:
            y_next, ks = self.compiled(tuple(stage_times), h_tensor, y, k1)
        except OdegradError:
            raise
        except Exception as error:  # torch.compile's own failures (dynamo, inductor)
            if not _is_compile_error(error):
                raise
            raise CompilationError(
                f"torch.compile failed on the step of method {self.name!r}: "
                f"{type(error).__name__}: {str(error).strip().splitlines()[0]}. Pass "
                "compile=False to solve eagerly"
            ) from error
        self._count(len(ks))  # s, or s − 1 after an FSAL carry
        ks = list(ks) if k1 is None else [k1, *ks]
        if not self._checked:
            for k in ks:
                self.counted._check(k, t)
            self._checked = True
        return Step(y=y_next, error=None, dense=ks, carry=ks[-1] if self.fsal else None,
                    retry_carry=ks[0])

    def _step_tensor(self, h: float, like: Tensor) -> Tensor:
        value = self._h.get(h)
        if value is None:
            value = self._h[h] = torch.tensor(h, dtype=like.dtype, device=like.device)
        return value

    def _count(self, n: int) -> None:
        stats = self.counted.stats
        key = "nfe_backward" if stats.get("_phase") == "backward" else "nfe_forward"
        stats[key] = stats.get(key, 0) + n


def _is_compile_error(error: Exception) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch",
                              "torch.fx", "torch._subclasses"))


# id(f) -> (f, {key: compiled step}) for the MAX_FIELDS most recently used fields. Not weak:
# every compiled step holds its f, so a weak key would never die; the bound keeps a new f per
# call (a lambda) from growing it without end.
_CACHE: OrderedDict = OrderedDict()
MAX_FIELDS = 16
_serial = itertools.count()
# torch.compile's backend; tests swap in a counting backend (torch._dynamo.testing).
BACKEND: Any = "inductor"


def _compiled_step(field: VectorField, key: Any, scheme: ExplicitRungeKutta) -> Callable:
    """The compiled step of `scheme` for `field`, from the cache or built now (compiled lazily,
    at its first call, by torch.compile)."""
    owner = getattr(field, "f", field) if key[0] == "tuple" else field
    # keyed by id, the entry holding f itself (so the id cannot be reused while it is cached)
    held = _CACHE.get(id(owner))
    if held is None:
        held = _CACHE[id(owner)] = (owner, {})
        while len(_CACHE) > MAX_FIELDS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(id(owner))
    entries = held[1]
    full_key = (key, BACKEND, scheme.name, tuple(scheme._c), tuple(map(tuple, scheme._a)),
                tuple(scheme._b), bool(scheme.tableau.fsal))
    compiled = entries.get(full_key)
    if compiled is None:
        # On the CPU, a C++ wrapper around the generated kernels: the Python one's buffer
        # allocations and extern calls cost about a fifth of a small field's step (P1,
        # benchmarks/RESULTS.md §11). CUDA keeps the default (no CUDA graphs in this slice:
        # their outputs are overwritten by the next replay, and the loop keeps every y_n).
        inductor = BACKEND == "inductor"
        options = {"cpp_wrapper": True} if inductor and key[-1] == "cpu" else None
        compiled = entries[full_key] = torch.compile(
            _step_function(field, scheme), backend=BACKEND, dynamic=False, fullgraph=True,
            options=options,
        )
    return compiled


def _step_function(field: VectorField, scheme: ExplicitRungeKutta) -> Callable:
    """The step as a plain function, with its own code object (so its own dynamo cache)."""
    a_terms, b_terms, stages = scheme._a, scheme._b, scheme.stages
    fsal = bool(scheme.tableau.fsal)

    def step(times: tuple[Tensor, ...], h: Tensor, y: Tensor, k1: Tensor | None):
        ks = [field(times[0], y) if k1 is None else k1]
        point = y
        for i in range(1, stages):
            point = y
            for j, a in a_terms[i]:
                point = point + ks[j] * (h * a)
            ks.append(field(times[i], point))
        if fsal:
            y_next = point
        else:
            y_next = y
            for j, b in b_terms:
                y_next = y_next + ks[j] * (h * b)
        return y_next, tuple(ks if k1 is None else ks[1:])

    code = step.__code__.replace(co_name=f"odegrad_compiled_step_{next(_serial)}")
    return types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__,
                              step.__closure__)


def compiled_solver(solver: ExplicitRungeKutta, f: Callable, field: VectorField, counted: Any,
                    tuple_shapes: Sequence[torch.Size] | None) -> CompiledRungeKutta:
    """The compiled twin of `solver` for the user's f (`field`: what the step calls on the
    flat state, f itself or its tuple view)."""
    device = counted._device.type
    if tuple_shapes is None:
        return CompiledRungeKutta(solver, f, counted, ("plain", device))
    key = ("tuple", tuple(tuple(s) for s in tuple_shapes), device)
    return CompiledRungeKutta(solver, field, counted, key)
