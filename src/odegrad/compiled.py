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

Blocks (the overhead fix): torch.compile's per-call Python runtime (guards, AOTAutograd's
wrappers, saving activations) costs a few hundred µs a call, of the order of a small field's
kernels. So where the loop reads its stage times from its table (fixed steps, t not
differentiated: loop.stage_time_table), the step at row n runs BLOCK (a constant) steps at once
— one compiled function of (rows n … n+BLOCK−1 of the table, h, y_n[, K_1]) unrolling BLOCK
steps, compiled once whatever N — and hands the loop the next BLOCK − 1 steps from it as it
asks for them. Each of those is handed over only after checking that the loop asks for exactly
what the block computed (the same f, grad mode, step size, table row, and y_n and carry the
objects the block returned); anything else drops the rest of the block and steps singly (and,
after such a miss, the solve stays on single steps), so a block is never a different result.
A block never covers the last step (its clipped size is a different h), so the remainder (at
most BLOCK steps) goes through the single-step function. Under gradient="direct" autograd then
chains one compiled backward per block; the discrete sweep's forward runs in blocks too, and
so does its replay where it can (CompiledRungeKutta.block_vjp: BLOCK steps of one size with no
output inside, from a kept first state — every one under checkpoints "all" — replayed by the
block's compiled forward under autograd and pulled back by one torch.autograd.grad through its
compiled backward); the other steps (the last, those around outputs, those whose first state
is not kept, and every step of a state over BLOCK_REPLAY_MAX_BYTES, whose block replay would
hold BLOCK steps' activations at once) are replayed one by one. Evaluations of f are counted
when a block runs, all of them, so the steps of a block the loop then drops (only where the
steps differ in size: fixed steps of no step_size, one per output interval) count as the
evaluations they were.

Runs (the CPU's fix, which supersedes blocks there): where the loop has a stage-time table it
also hands the solver its step sizes and the steps with an output inside them
(`plan_step_sizes`); from row n the solver then runs every step up to the next such step (or
the end) as one compiled call: a `torch._higher_order_ops.scan` of the step over the rows
(t_n + c_i h_n, …, h_n), whose length is a symbolic size (torch._dynamo.mark_dynamic), so the
graph is compiled once whatever N and the loop over the steps runs inside inductor's C++
wrapper, forward and backward (the scan's autograd saves each step's residuals and runs the
reverse scan of the step's backward). The steps may differ in size (uneven output grids). A
run keeps y_{n+1} (and the FSAL carry) of every step and no stages: a step whose dense output
is read (an output inside it) is taken singly, and a stage read from a run's step is computed
then from its row, state and carry (_StagesOnDemand). The first step of the first solve for a
(f, shapes) is also single: it checks f's outputs, which the run cannot. The discrete sweep
replays runs too (`run_vjp`: the run from a kept state under autograd, the cotangents of its
states, outputs at step ends included, pulled back by one torch.autograd.grad), of fixed or
accepted adaptive steps, up to RUN_REPLAY_MAX_BYTES of states a run and only for states up to
BLOCK_REPLAY_MAX_BYTES (the replay holds the run's activations). An f whose run does not trace
(Python side effects, an attribute tensor read twice such as `self.W.T`, which torch's scan
refuses as aliasing inputs) falls back to blocks with one RuntimeWarning. Runs are off on
CUDA (never run on a GPU here: inductor's while loop keeps its counter on the host, so it
should not synchronise, but launches each iteration's kernels from the host and cannot be
captured in a CUDA graph; untested, so blocks stay there) and for backsolve's augmented
dynamics (torch.autograd.grad does not trace inside a scan).
Figures: benchmarks/RESULTS.md §11.5.

The cache is keyed on the user's f itself (the MAX_FIELDS most recently used), not on the
per-call wrappers that count evaluations; each entry owns a fresh copy of the step's code
object, so torch.compile's per-code cache holds one f's graphs only and different fields never
evict each other. A new lambda or bound method each call is a new f, compiled again.
f is counted outside the compiled region: s evaluations per step (s − 1 for an FSAL scheme,
whose first stage is the carry), as the eager loop counts them.

Adaptive steps (dopri5, tsit5, bosh3, ...): the loop calls `rate_errors(rtol, atol, norm)`
before its first step, and from then on the solver's steps run the rated single step: the
same step plus the error estimate h Σ_i e_i K_i and its scaled norm ‖err / (atol + rtol
max(|y_n|, |y_{n+1}|))‖ (control.scaled_error, from detached values), returned as a 0-dim
tensor (RatedStep.error_ratio). The loop's accept decision reads it: one host read a step
attempt, the only one (tests/test_compiled.py counts them); h, the times, rtol and atol enter
as tensors, so new step sizes and tolerances do not recompile. Rejected attempts run the same
step; the discrete sweep replays the accepted steps (their recorded h) singly through the
rated step's compiled backward (no blocks: the sizes differ), and a rejected attempt's carry
is the one it was given (`retry_keeps_carry`), so the replay skips the rejected attempts.
The ratio is computed with the compiled graph's roundings, not eager's: the estimate cancels
(Σ e_i = 0), so a rounding difference in the stages is amplified in it, and the next h differs
from eager's by rounding (~1e-12 relative on the tests' problem). Where the estimate is near
round-off (a smooth field, a high-order scheme, a loose tolerance: dopri8 there) the step
sizes, and so the discretisation, can differ visibly from eager's, and a ratio within
rounding of 1 can be accepted by one and rejected by the other: each solve is then a valid
solve at the tolerance and its gradient exact for its own steps, but the two are not equal to
1e-12. A non-FSAL scheme evaluates K_1 inside the step, so it re-evaluates f(t_n, y_n) after
a rejection (eager reuses it): one more evaluation a rejection.

Explicit Runge–Kutta solves with gradient="direct" or "discrete" are compiled, fixed-step
or adaptive; what else compile=True serves and refuses is in `check` (anything refused
raises UnsupportedCombinationError naming what is supported). A failure inside torch.compile
raises CompilationError with torch's message (no silent fall-back to eager: pass
compile=False for that).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._higher_order_ops import scan

from .control import scaled_error
from .errors import OdegradError, UnsupportedCombinationError
from .solvers.base import Scalar, Step, VectorField
from .solvers.explicit import ExplicitRungeKutta

SUPPORTED = (
    "compile=True supports explicit Runge–Kutta solves, fixed-step (euler, midpoint, heun, "
    "rk4, ralston, ...) or adaptive (dopri5, tsit5, bosh3, ...), with gradient='direct', "
    "'discrete' or 'backsolve'; gradient='reversible' with alf or reversible_<tableau> (or an "
    "explicit method it wraps) (compiled_reversible.py); without event_fn, step_t/jump_t or "
    "per_sample"
)
GRADIENTS = ("direct", "discrete", "backsolve", "reversible")


class CompilationError(OdegradError, RuntimeError):
    """torch.compile failed on the step; the message carries torch's reason."""


def check(
    *, gradient: str, solver: Any, adaptive: bool, event_fn: Any = None,
    step_times: bool = False, stochastic: bool = False, extra: Sequence[str] = (),
) -> None:
    """Raise UnsupportedCombinationError for what compile=True does not serve (adaptive
    steps are served: `adaptive` is kept for the callers)."""
    reasons = []
    if gradient not in GRADIENTS:
        reasons.append(f"gradient={gradient!r}")
    if gradient == "reversible" and solver is not None:
        from .compiled_reversible import serves

        if not (serves(solver) or _plain_rk(solver)):
            reasons.append(f"method={getattr(solver, 'name', solver)!r} with "
                           "gradient='reversible'")
    elif solver is not None and not _plain_rk(solver):
        reasons.append(f"method={getattr(solver, 'name', solver)!r} (not an explicit "
                       "Runge–Kutta tableau)")
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
        self._field, self._key = field, cache_key
        self.compiled = _compiled_step(field, cache_key, self)
        self.compiled_rated: Callable | None = None  # the step with its error ratio (adaptive)
        self._tolerances: tuple = ()  # (rtol, atol) as the loop gave them, then as tensors
        self.block = BLOCK
        self.compiled_block = _compiled_step(field, cache_key, self, BLOCK) if BLOCK > 1 else None
        # the CPU's whole runs of steps (a scan, see the module docstring); None: blocks
        self.compiled_run = (_compiled_step(field, cache_key, self, run=True)
                             if self.runs and RUNS
                             and cache_key[-1] == "cpu" else None)
        if self.compiled_run is not None and _entries(field, cache_key).get(_RUNS_FAILED):
            self.compiled_run = None
        self._plan: _Plan | None = None  # the loop's step sizes for its stage-time table
        self._pending: _Pending | None = None  # the steps of the current block not handed out
        self._blocks_off = False  # a block missed within one loop: single steps from then on
        self._h: dict[float, Tensor] = {}  # 0-dim tensors of the float step sizes seen
        self._checked = False

    def init(self, f: VectorField, t0: Tensor, y0: Tensor) -> Tensor | None:
        # An FSAL step takes K_1 as its carry; otherwise K_1 is evaluated inside the step.
        # f is called as the compiled step calls it (counted here, checked without reading t).
        if not self.fsal:
            return None
        k1 = self._field(t0, y0)
        self._count(1)
        self._check_outputs([k1], t0)
        return k1

    runs = True  # whole runs of steps where the device allows (CompiledAdjoint: never)

    def plan_step_sizes(self, table: Tensor, sizes: Sequence[float],
                        inside: Sequence[int] = ()) -> None:
        """The loop's fixed steps: `sizes[n]` is the step from row n of its stage-time table
        `table`; the steps `inside` have an output inside them (read from their stages, so
        taken singly: a run keeps no stages). Runs of steps (compiled_run) read them."""
        self._plan = (_Plan(table, list(sizes), inside) if self.compiled_run is not None
                      else None)

    # Adaptive steps (the loop asks through rate_errors, then reads Step.error_ratio).
    retry_keeps_carry = True  # a rejected attempt hands the next one the carry it was given

    def rate_errors(self, rtol: Tensor | float, atol: Tensor | float, norm: Callable) -> None:
        """From now on every step also returns ‖err / (atol + rtol max(|y_n|, |y_{n+1}|))‖
        (control.scaled_error, HNW II (4.11)) computed in its compiled graph, so the loop's
        accept decision reads one number per step. A scheme without an error estimate
        ignores this."""
        if self._e is None:
            return
        self._tolerances = (rtol, atol)
        self.compiled_rated = _compiled_step(self._field, self._key, self, norm=norm)

    def step(
        self, f: VectorField, t: Tensor, h: Scalar, y: Tensor, carry: Tensor | None,
        stage_times: Sequence[Tensor] | None = None,
    ) -> Step:
        if stage_times is not None and self.compiled_block is not None:
            step = self._from_block(f, h, y, carry, stage_times)
            if step is not None:
                return step
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
        ratio = None
        if self.compiled_rated is not None:
            y_next, ks, ratio = self._call(self.compiled_rated, tuple(stage_times), h_tensor, y,
                                           k1, *self._tolerance_tensors(y))
        else:
            y_next, ks = self._call(self.compiled, tuple(stage_times), h_tensor, y, k1)
        ks = list(ks) if k1 is None else [k1, *ks]
        return self._deliver(y_next, ks, t, ratio=ratio)

    def _tolerance_tensors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """rtol and atol as tensors of y's dtype and device (made once a solve), so their
        values are inputs of the compiled step, not constants baked into it."""
        rtol, atol = self._tolerances
        if not isinstance(rtol, Tensor) or not isinstance(atol, Tensor) or \
                rtol.dtype != like.dtype or atol.dtype != like.dtype:
            rtol, atol = (v.to(like.dtype) if isinstance(v, Tensor) else
                          torch.full((), v, dtype=like.dtype, device=like.device)
                          for v in (rtol, atol))
            self._tolerances = (rtol, atol)
        return rtol, atol

    def _from_block(self, f: VectorField, h: Scalar, y: Tensor, carry: Tensor | None,
                    stage_times: Sequence[Tensor]) -> Step | None:
        """The step at this table row from a run or a block: the next one of the current run
        or block if the loop asks for exactly what it computed, else a new run (every row
        left, on the CPU) or block (BLOCK rows before the last step); None: take a single
        step."""
        found = _table_row(stage_times)
        if found is None:
            return None
        table, n = found
        grad = torch.is_grad_enabled()
        pending, self._pending = self._pending, None
        if pending is not None:
            if (pending.table is table and pending.row == n and pending.f is f
                    and pending.grad == grad and pending.sizes[pending.taken] == h
                    and y is pending.y and (not self.fsal or carry is pending.carry)):
                return self._next_of(pending)
            if pending.table is table:  # the loop went elsewhere than the block: stop blocks
                self._blocks_off = True
        if self._blocks_off or isinstance(h, Tensor):
            return None
        k1 = carry if self.fsal else None
        plan = self._plan
        if self.compiled_run is not None and plan is not None and plan.table is table:
            if plan.run_end(n) - n >= RUN_MIN and plan.sizes[n] == h:
                step = self._run(f, table, n, plan, y, k1, stage_times[0], grad)
                if step is not None:
                    return step
            if self.compiled_run is not None:  # a short stretch, or f's outputs unchecked
                return None
        if n + self.block > table.shape[0] - 1:  # a block never takes the last (clipped) step
            return None
        h_tensor = self._step_tensor(h, y)
        if self.fsal and k1 is None:
            k1 = f(stage_times[0], y)
        rows = table[n:n + self.block]
        if not grad:
            y, h_tensor = y.detach(), h_tensor.detach()
            k1 = None if k1 is None else k1.detach()
        ys, kss = self._call(self.compiled_block, rows, h_tensor, y, k1)
        full = []  # every step's stages, an FSAL step's carry (the last stage before) first
        for ks in kss:
            full.append([k1, *ks] if self.fsal else list(ks))
            k1 = full[-1][-1]
        pending = _Pending(table, n, f, grad, [h] * self.block, ys, full)
        self._count(sum(len(ks) - (1 if self.fsal else 0) for ks in full))
        return self._next_of(pending, stage_times[0])

    def _run(self, f: VectorField, table: Tensor, n: int, plan: _Plan, y: Tensor,
             k1: Tensor | None, t: Tensor, grad: bool) -> Step | None:
        """Rows n, … of the table as one run, a scan of the compiled step (one graph whatever
        the number of rows); None when f's outputs are not checked yet for these shapes (the
        loop takes this step singly, which checks them) or the run cannot be compiled for
        this f (the solve then steps in blocks; a warning says so once per f)."""
        if not (self._checked or _entries(self._field, self._key).get(self._checked_key(y))):
            return None
        self._checked = True  # (checked by an earlier solve: these shapes give these outputs)
        if self.fsal and k1 is None:
            k1 = f(t, y)
        end = plan.run_end(n)
        rows = plan.rows(y).between(n, end)
        if not grad:
            y, k1 = y.detach(), None if k1 is None else k1.detach()
        elif not y.requires_grad:  # one graph for grad mode, whether y_0 requires grad or not
            y = y.detach().requires_grad_()
        out = self._scan(rows, y, k1)
        if out is None:
            return None
        ys, carries = out
        self._count((self.stages - (1 if self.fsal else 0)) * rows.length)
        pending = _Pending(table, n, f, grad, plan.sizes[n:end], None, None)
        # views of every step's state made at once (one unbind: ~0.6 µs a view, against ~2 µs
        # for an index a step)
        pending.run = _RunSteps(rows, y, k1, ys.unbind(0),
                                None if carries is None else carries.unbind(0))
        return self._next_of(pending, t)

    def _scan(self, rows: RunRows, y: Tensor, k1: Tensor | None) -> tuple | None:
        """The compiled run over `rows` from (y, K_1): (every y_{n+1}, every FSAL carry or
        None), stacked; None (runs off from now on) when it cannot be compiled for this f."""
        torch._dynamo.mark_dynamic(rows.rows, 0)
        try:
            return self._call(self.compiled_run, rows.rows, y, k1)
        except CompilationError as error:
            self.compiled_run = None
            _runs_failed(self._field, self._key, error)
            return None

    def run_vjp(self, rows: RunRows, y: Tensor, k1: Tensor | None, ys_bar: Tensor,
                carry_bar: Tensor | None, params: Sequence[Tensor]) -> tuple | None:
        """The reverse sweep's replay of the steps of `rows` at once: the run's compiled
        forward from (y, K_1) under autograd, then one pull-back of the cotangents of its
        states `ys_bar` (stacked, a row a step) and of its last FSAL carry through the run's
        compiled backward. Returns (∂/∂y, ∂/∂K_1 or None, the parameters' gradients), or None
        when the run does not compile (the caller replays step by step)."""
        with torch.enable_grad():
            y_in = y.detach().requires_grad_()
            k1_in = k1.detach().requires_grad_() if self.fsal and k1 is not None else None
            out = self._scan(rows, y_in, k1_in)
            if out is None:
                return None
            ys, carries = out
            self._count((self.stages - (1 if self.fsal else 0)) * rows.length)
            outs, cots = [ys], [ys_bar]
            if self.fsal and carry_bar is not None:
                carries_bar = torch.zeros_like(carries)
                carries_bar[-1] = carry_bar
                outs.append(carries)
                cots.append(carries_bar)
            inputs = [y_in] + ([k1_in] if k1_in is not None else []) + list(params)
            grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
        k = 2 if k1_in is not None else 1
        return grads[0], (grads[1] if k1_in is not None else None), grads[k:]

    def replay_bytes(self, y: Tensor) -> int | None:
        """The bytes one step's replay from a state like `y` saves for its backward, as
        measured by the discrete sweep (note_replay_bytes), or None."""
        return _entries(self._field, self._key).get(("replay bytes", y.shape, y.dtype,
                                                     y.device))

    def note_replay_bytes(self, y: Tensor, nbytes: int) -> None:
        _entries(self._field, self._key)[("replay bytes", y.shape, y.dtype, y.device)] = \
            nbytes

    def _checked_key(self, y: Tensor) -> tuple:
        return ("outputs checked", y.shape, y.dtype, y.device)

    def _next_of(self, pending: _Pending, t: Tensor | None = None) -> Step:
        j = pending.taken
        pending.taken += 1
        run = pending.run
        if run is None:
            y_next, ks = pending.ys[j], pending.kss[j]
            carry = ks[-1] if self.fsal else None
        else:  # a run keeps y_{n+1} (and an FSAL carry) of each step, the stages on demand
            y_next, carry = run.ys[j], run.carries[j] if self.fsal else None
            ks = _StagesOnDemand(self, run.rows, j, run.y0 if j == 0 else pending.y,
                                 run.k1 if j == 0 else pending.carry)
        if pending.taken < pending.length:
            pending.row, pending.y = pending.row + 1, y_next
            pending.carry = carry
            self._pending = pending
        return self._deliver(y_next, ks, t, counted=0, carry=carry)  # counted when it ran

    def _deliver(self, y_next: Tensor, ks: Sequence[Tensor], t: Tensor | None,
                 counted: int | None = None, ratio: Tensor | None = None,
                 carry: Tensor | None = None) -> Step:
        # s evaluations a step, s − 1 after an FSAL carry
        self._count(len(ks) - (1 if self.fsal else 0) if counted is None else counted)
        if not self._checked and t is not None:
            self._check_outputs(ks, t)
        if isinstance(ks, _StagesOnDemand):  # no retry: fixed steps are never rejected
            return RatedStep(y=y_next, error=None, dense=ks, carry=carry, error_ratio=ratio)
        return RatedStep(y=y_next, error=None, dense=ks, carry=ks[-1] if self.fsal else None,
                         retry_carry=ks[0], error_ratio=ratio)

    def _check_outputs(self, ks: Sequence[Tensor], t: Tensor) -> None:
        """f's outputs have y's shape, dtype and device (once a solve): compared here without
        reading t, so no host synchronisation; the counted field words the error."""
        counted = self.counted
        for k in ks:
            if (not isinstance(k, Tensor) or k.shape != counted._shape
                    or k.dtype != counted._dtype or k.device != counted._device):
                counted._check(k, t)
        self._checked = True
        if self.compiled_run is not None:  # the run's graphs give these shapes from now on
            _entries(self._field, self._key)[self._checked_key(ks[0])] = True

    def block_vjp(self, rows: Tensor, h: float, y: Tensor, k1: Tensor | None,
                  y_bar: Tensor | None, carry_bar: Tensor | None,
                  params: Sequence[Tensor]) -> tuple | None:
        """The reverse sweep's replay of `rows.shape[0]` (= BLOCK) steps at once: the block's
        compiled forward from (y, K_1) under autograd and one pull-back of the cotangents of
        its last state and (FSAL) carry through the block's compiled backward, instead of one
        replay and one torch.autograd.grad per step. Returns (∂/∂y, ∂/∂K_1 or None, the
        parameters' gradients), or None when no cotangent reaches the block or the state is
        over BLOCK_REPLAY_MAX_BYTES (the caller then replays step by step)."""
        if y.numel() * y.element_size() > BLOCK_REPLAY_MAX_BYTES:
            return None
        with torch.enable_grad():
            y_in = y.detach().requires_grad_()
            k1_in = k1.detach().requires_grad_() if self.fsal and k1 is not None else None
            ys, kss = self._call(self.compiled_block, rows, self._step_tensor(h, y), y_in, k1_in)
            outs, cots = [], []
            if y_bar is not None and ys[-1].requires_grad:
                outs.append(ys[-1])
                cots.append(y_bar)
            if self.fsal and carry_bar is not None and kss[-1][-1].requires_grad:
                outs.append(kss[-1][-1])
                cots.append(carry_bar)
            if not outs:  # (the caller replays step by step, counting those evaluations)
                return None
            self._count(sum(len(ks) for ks in kss))  # s (s − 1 after a carry) a step
            inputs = [y_in] + ([k1_in] if k1_in is not None else []) + list(params)
            grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
        k = 2 if k1_in is not None else 1
        return grads[0], (grads[1] if k1_in is not None else None), grads[k:]

    def _call(self, compiled: Callable, *args: Any) -> Any:
        try:
            return compiled(*args)
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

    def _step_tensor(self, h: float, like: Tensor) -> Tensor:
        value = self._h.get(h)
        if value is None:
            if len(self._h) >= 64:  # adaptive steps: a new size nearly every step
                self._h.clear()
            # a fill kernel, not a copy from the host: no synchronisation on a device
            value = self._h[h] = torch.full((), h, dtype=like.dtype, device=like.device)
        return value

    def _count(self, n: int) -> None:
        stats = self.counted.stats
        key = "nfe_backward" if stats.get("_phase") == "backward" else "nfe_forward"
        stats[key] = stats.get(key, 0) + n


@dataclasses.dataclass
class RatedStep(Step):
    """A step with its scaled error norm (0-dim, computed in the compiled graph; None for a
    step taken without rate_errors), which the loop reads for its accept decision."""

    error_ratio: Tensor | None = None


class _Pending:
    """A block's or a run's steps: what the next call must ask for (row, step size, y,
    carry) to be handed one. `run`: (rows, step sizes, K_1, the FSAL carries) of a run."""

    __slots__ = ("table", "row", "f", "grad", "sizes", "ys", "kss", "taken", "y", "carry",
                 "run")

    def __init__(self, table, row, f, grad, sizes, ys, kss):
        self.table, self.row, self.f, self.grad, self.sizes = table, row, f, grad, sizes
        self.ys, self.kss, self.taken, self.y, self.carry = ys, kss, 0, None, None
        self.run: _RunSteps | None = None

    @property
    def length(self) -> int:
        return len(self.sizes)


@dataclasses.dataclass
class _RunSteps:
    """What a run computed, y_{n+1} (and the FSAL carry) of every step, stacked, with the
    rows it ran (stage times, then the step size) from y_0 (and K_1)."""

    rows: RunRows
    y0: Tensor
    k1: Tensor | None
    ys: tuple[Tensor, ...]
    carries: tuple[Tensor, ...] | None


class RunRows:
    """What a run reads a step at a time: one row of (t_n + c_i h_n)_i then h_n, in the dtype
    of t and y (solve refuses t of another dtype than y0's; the stage times are the loop's
    table's, bit for bit, as the single step takes them)."""

    def __init__(self, rows: Tensor):
        self.rows = rows

    @classmethod
    def of(cls, table: Tensor, sizes: Sequence[float], like: Tensor) -> RunRows:
        """The rows of the stage-time `table` (N, s) with the step sizes `sizes` (N floats)."""
        if table.dtype != like.dtype:
            raise AssertionError(f"stage times in {table.dtype}, state in {like.dtype}")
        h = torch.tensor(list(sizes), dtype=like.dtype).to(like.device)
        return cls(torch.cat([table, h[:, None]], 1))

    @property
    def length(self) -> int:
        return self.rows.shape[0]

    def between(self, first: int, end: int) -> RunRows:
        """Rows first, …, end − 1, with storage offset 0 (torch.compile specialises offset 0
        against the others: one graph, whatever `first`)."""
        if not first and end == self.length:
            return self
        return RunRows(self.rows[first:end].clone())

    def step(self, j: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """Row j as the single step takes it: (stage times, h)."""
        *times, h = self.rows[j].unbind()
        return tuple(times), h


class _Plan:
    """The loop's fixed step sizes, as floats (what the loop asks for) and, made at the first
    run, as the rows of runs (RunRows)."""

    __slots__ = ("table", "sizes", "inside", "_rows")

    def __init__(self, table: Tensor, sizes: list[float], inside: Sequence[int]):
        self.table, self.sizes, self._rows = table, sizes, None
        self.inside = sorted(inside)

    def run_end(self, n: int) -> int:
        """The row a run from row n stops before: the next step with an output inside, or
        the end (n itself when step n has one)."""
        at = bisect.bisect_left(self.inside, n)
        return self.inside[at] if at < len(self.inside) else len(self.sizes)

    def rows(self, like: Tensor) -> RunRows:
        if self._rows is None:
            self._rows = RunRows.of(self.table, self.sizes, like)
        return self._rows


class _StagesOnDemand(Sequence):
    """The stages of one step of a run, computed when first read (an output inside the
    step reads the dense output): the compiled single step from the step's (times, h, y_n,
    K_1), under the grad mode of the read, so they differentiate as the step does."""

    def __init__(self, scheme: CompiledRungeKutta, rows: RunRows, j: int, y: Tensor,
                 k1: Tensor | None):
        self.scheme, self.rows, self.j, self.y, self.k1 = scheme, rows, j, y, k1
        self._stages: list[Tensor] | None = None

    def _all(self) -> list[Tensor]:
        if self._stages is None:
            scheme = self.scheme
            times, h = self.rows.step(self.j)
            _, ks = scheme._call(scheme.compiled, times, h, self.y, self.k1)
            self._stages = list(ks) if self.k1 is None else [self.k1, *ks]
            scheme._count(len(ks))  # evaluated again, for the dense output
        return self._stages

    def __len__(self) -> int:
        return self.scheme.stages

    def __getitem__(self, i):
        return self._all()[i]


def _table_row(stage_times: Sequence[Tensor]) -> tuple[Tensor, int] | None:
    """(table, n) when the stage times are row n of the loop's stage-time table
    (loop.StageTimes says so), else None."""
    table = getattr(stage_times, "table", None)
    return None if table is None else (table, stage_times.row)


class _ProxyFallbackNote(logging.Filter):
    """Drops inductor's note that its C++ wrapper calls an op without a C shim through the
    proxy executor (a run's select_copy and slice_copy, forward and backward: correct, and not
    the user's to act on), which it logs as a warning at every compilation of a run. Installed
    on that logger at import: a run's backward compiles lazily, inside autograd."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is missing a c-shim implementation" not in record.getMessage()


logging.getLogger("torch._inductor.ir").addFilter(_ProxyFallbackNote())


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
# Steps per compiled block (see the module docstring); 1 turns blocks off. A constant, so the
# compiled graphs do not depend on the step count.
BLOCK = 8
# A block's replay under autograd holds BLOCK steps' activations at once; blocks are the fix
# for small fields' per-call overhead, so above this state size (bytes) the discrete sweep
# replays step by step and keeps its one-step memory (the conv block: 368 MB with block
# replays against 105 MB step by step, no faster; benchmarks/RESULTS.md §11.4).
BLOCK_REPLAY_MAX_BYTES = 1 << 18
# Runs (the CPU's fix for the same overhead, see the module docstring): on, and the fewest
# steps a run takes (its scan has two or more, so its length stays symbolic).
RUNS = True
RUN_MIN = 3
# The discrete sweep's replay of a run holds its steps' activations at once: a run replayed
# saves at most this many bytes for its backward (one step's replay, measured, times the
# steps; P1: 9.6 KB a step, so runs of up to 218 steps; the compare default's MLP: a step's
# replay is over this, so step by step, as eager).
RUN_REPLAY_MAX_BYTES = 1 << 21
# Inductor's options on the CPU: the C++ wrapper (its Python one's buffer allocations and
# extern calls cost about a fifth of a small field's step: P1, benchmarks/RESULTS.md §11),
# built apart from the kernels (cpp_wrapper_build_separate): the wrapper at -O1 and the
# kernels at -O3, where one translation unit at -O3 spends most of its g++ time on the
# wrapper (P1's block backward: 11-15 s of g++ against 4 s; P1's compile, discrete 59.7 ->
# 44.8 s, backsolve 73.4 -> 50.4 s, direct 45.3 -> 35.1 s on 2 cores; runtime unchanged).
CPU_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


def _entries(field: VectorField, key: Any) -> dict:
    """The cache's entries of `field` (made, or moved to the most recent, here)."""
    owner = getattr(field, "f", field) if key[0] == "tuple" else field
    # keyed by id, the entry holding f itself (so the id cannot be reused while it is cached)
    held = _CACHE.get(id(owner))
    if held is None:
        held = _CACHE[id(owner)] = (owner, {})
        while len(_CACHE) > MAX_FIELDS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(id(owner))
    return held[1]


_RUNS_FAILED = "runs failed"  # an entry: this f's runs could not be compiled


def _runs_failed(field: VectorField, key: Any, error: CompilationError) -> None:
    """Remember that runs do not compile for this f (the solves step in blocks) and say so
    once: the result is the same, the speed is the blocks'."""
    entries = _entries(field, key)
    if not entries.get(_RUNS_FAILED):
        entries[_RUNS_FAILED] = True
        warnings.warn(
            f"compile=True: the run of steps (torch's scan) does not compile for this f, so "
            f"its fixed steps run in compiled blocks of {BLOCK} (the same result, more "
            f"overhead a step). torch's reason: {error.__cause__!s:.300}. A field with "
            "no Python side effects and no attribute tensors such as `self.W.T` (use "
            "torch.nn.functional.linear) compiles as one run",
            RuntimeWarning, stacklevel=4)


def _compiled_step(field: VectorField, key: Any, scheme: ExplicitRungeKutta,
                   block: int = 1, norm: Callable | None = None, run: bool = False) -> Callable:
    """The compiled step of `scheme` for `field` (`block` > 1: that many steps unrolled; a
    `norm`: the single step with its error ratio; `run`: a run of steps, see the module
    docstring), from the cache or built now (compiled lazily, at its first call, by
    torch.compile)."""
    entries = _entries(field, key)
    full_key = (key, BACKEND, scheme.name, tuple(scheme._c), tuple(map(tuple, scheme._a)),
                tuple(scheme._b), bool(scheme.tableau.fsal), block,
                None if norm is None else (tuple(scheme._e), norm), run)
    compiled = entries.get(full_key)
    if compiled is None:
        # On the CPU, a C++ wrapper around the generated kernels (CPU_OPTIONS). CUDA keeps
        # the default (no CUDA graphs in this slice: their outputs are overwritten by the
        # next replay, and the loop keeps every y_n).
        inductor = BACKEND == "inductor"
        options = dict(CPU_OPTIONS) if inductor and key[-1] == "cpu" else None
        compiled = entries[full_key] = torch.compile(
            _step_function(field, scheme, block, norm, run), backend=BACKEND, dynamic=False,
            fullgraph=True,
            options=options,
        )
    return compiled


def _step_function(field: VectorField, scheme: ExplicitRungeKutta, block: int = 1,
                   norm: Callable | None = None, run: bool = False) -> Callable:
    """The step (block == 1) or `block` steps as a plain function, with its own code object (so
    its own dynamo cache). A block takes the stage times as a (block, s) tensor and returns
    (y_{n+1}, …, y_{n+block}) and every step's stages (the first without an FSAL carry).
    With a `norm`, the step also takes (rtol, atol) and returns its error ratio
    ‖h Σ_i e_i K_i / (atol + rtol max(|y_n|, |y_{n+1}|))‖ (control.scaled_error), computed
    from detached values: no gradient flows through the controller."""
    a_terms, b_terms, stages = scheme._a, scheme._b, scheme.stages
    e_terms = scheme._e
    fsal = bool(scheme.tableau.fsal)

    def one(times, h: Tensor, y: Tensor, k1: Tensor | None):
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

    def step(times: tuple[Tensor, ...], h: Tensor, y: Tensor, k1: Tensor | None):
        return one(times, h, y, k1)

    def steps(times: Tensor, h: Tensor, y: Tensor, k1: Tensor | None):
        ys, kss = [], []
        for n in range(block):
            y, ks = one(times[n], h, y, k1)
            ys.append(y)
            kss.append(ks)
            k1 = (ks[-1] if ks else k1) if fsal else None
        return tuple(ys), tuple(kss)

    def rated_step(times: tuple[Tensor, ...], h: Tensor, y: Tensor, k1: Tensor | None,
                   rtol: Tensor, atol: Tensor):
        y_next, ks = one(times, h, y, k1)
        full = ks if k1 is None else (k1, *ks)
        (j, e), rest = e_terms[0], e_terms[1:]
        error = full[j] * (h * e)
        for j, e in rest:
            error = error + full[j] * (h * e)
        ratio = scaled_error(error.detach(), y.detach(), y_next.detach(), rtol, atol, norm)
        return y_next, ks, ratio

    def run_steps(rows: Tensor, y: Tensor, k1: Tensor | None):
        """A scan of the step over `rows` (RunRows: a step's stage times, then its size):
        every step's y_{n+1} (and FSAL carry) stacked. Nothing of f outside the scan:
        inductor (torch 2.13) miscompiles the parameters' gradients of a graph that evaluates
        f both outside and inside a scan (the biases' came out wrong)."""
        if fsal:
            def body(carry, row):
                y_next, ks = one(row, row[stages], carry[0], carry[1])
                return (y_next, ks[-1]), (y_next.clone(), ks[-1].clone())

            _, (ys, carries) = scan(body, (y, k1), rows)
            return ys, carries

        def body(carry, row):
            y_next, _ = one(row, row[stages], carry, None)
            return y_next, y_next.clone()

        _, ys = scan(body, y, rows)
        return ys, None

    chosen = (rated_step if norm is not None else run_steps if run
              else step if block == 1 else steps)
    code = chosen.__code__.replace(co_name=f"odegrad_compiled_step_{next(_serial)}")
    return types.FunctionType(code, chosen.__globals__, code.co_name, chosen.__defaults__,
                              chosen.__closure__)


def compiled_solver(solver: ExplicitRungeKutta, f: Callable, field: VectorField, counted: Any,
                    tuple_shapes: Sequence[torch.Size] | None) -> CompiledRungeKutta:
    """The compiled twin of `solver` for the user's f (`field`: what the step calls on the
    flat state, f itself or its tuple view)."""
    device = counted._device.type
    if tuple_shapes is None:
        return CompiledRungeKutta(solver, f, counted, ("plain", device))
    key = ("tuple", tuple(tuple(s) for s in tuple_shapes), device)
    return CompiledRungeKutta(solver, field, counted, key)
