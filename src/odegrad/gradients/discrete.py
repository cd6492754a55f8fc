"""gradient="discrete": the discrete adjoint of the time integrator (PNODE; ALGORITHMS.md §1, §2).

The forward pass runs the loop without an autograd graph and keeps checkpoints; the backward
pass walks the accepted steps in reverse and pulls ∂L/∂y back through each one exactly, so the
gradient is that of the discretisation (the one `gradient="direct"` gives), with the steps of
an adaptive solve as constants of the scheme.

Explicit Runge–Kutta steps use the stage recurrence of §1 with one VJP of f per stage (each
VJP re-runs f at the stage point: F + B). The FSAL stage is evaluated once: its cotangent is
carried into the previous step, where it is pulled back with that step's last stage. Outputs
read inside a step add h b_i(θ) ∂L/∂y(t*) to κ_i and ∂L/∂y(t*) to λ_n. Gradients w.r.t. t flow
through the stage times t_n + c_i h, the h of steps that land on an output time and the θ of
interpolated outputs. Any other `Solver` is served by replaying its step under autograd (one
`torch.autograd.grad` per step, through its carry too), or by its own `step_vjp` if it has one.

`checkpoints=` (§2, §8; costs for an s-stage explicit method, N steps, state size d):
  "all" (default): y_n and the stages of every step that the backward pass reads (those
      in some stage point: not the last stage of a non-FSAL scheme, unless t requires grad),
      at most N(s+1)d (rk4: 4Nd); no recomputation, backward N·s·(F+B).
  "solution": y_n of every step, N·d; each step recomputed once, backward N·s·(2F+B).
  int c: at most c states (y_0 included) under a binomial schedule: revolve (offline) when the
      steps are fixed, so N is known, with the least number of recomputed steps; dynamic
      checkpointing (online) for adaptive steps, the segments then reversed offline.
stats: nfe_backward; n_recomputed_steps (steps re-run without a graph: to rebuild states or
stages; the generic path's replays are its VJPs and do not count); checkpoint_bytes (the peak
bytes of checkpoints, each tensor counted once, y_0 included); checkpoints (the policy used).
`memory_budget=` bytes picks one: "all" if it fits, else "solution", else c = budget // (d
bytes). For adaptive steps (N unknown) it keeps "all" while that fits, then drops the stages
and thins the states as if online with c = budget // (d bytes) from the start.

Module state. Recomputations and VJPs re-run f. When f is an nn.Module, every buffer is
restored after the backward pass to its value after the forward pass, so BatchNorm running
statistics count the forward evaluations once, as with "direct". When f draws random numbers
(`Problem.stochastic`: dropout in training mode in f's module, or any draw seen when the API
probed one evaluation of f, e.g. a closure over a module with dropout; or `reproduce_rng=True`),
every evaluation of f in the forward
pass draws from its own seed, and a re-run replays that seed, so it sees the same mask (the
masks then differ from those of "direct"; the global random stream advances by one draw).
f must not change its output through buffers it writes (BatchNorm in training mode uses batch
statistics and is fine). For solvers with `step_vjp`, randomness is the solver's concern.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from ..checkpointing import (
    Delete,
    Forward,
    Load,
    OnlineCheckpoints,
    Reverse,
    Save,
    Schedule,
    offline_positions,
    reverse_segments,
)
from ..errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from ..loop import Trajectory, fixed_step_count, replay_rejected
from ..problem import Problem, backward_phase
from ..solvers.base import Solver, Step
from ..solvers.explicit import ExplicitRungeKutta, combine
from .second_order import differentiable_backward, graph_requested

OPTIONS = ("checkpoints", "memory_budget", "reproduce_rng")

_INIT = object()  # the carry of step 0: the solver's `init`, re-run when needed


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the forward pass keeps: "all", "solution", "binomial" with `slots` states, "budget"
    ("all" while it fits in `budget` bytes, then binomial with `slots`) or "none"."""

    kind: str
    slots: int | None = None
    budget: float | None = None

    def describe(self) -> str | int:
        return self.slots if self.kind == "binomial" else self.kind


def check(problem: Problem) -> None:
    """Solvers with their own `step_vjp` give no time gradients."""
    if hasattr(problem.solver, "step_vjp") and problem.t.requires_grad:
        raise UnsupportedCombinationError(
            f"gradient='discrete' with method {problem.solver.name!r} (through its step_vjp) "
            "gives no gradient w.r.t. t; pass t without requires_grad"
        )


def solve(
    problem: Problem,
    checkpoints: str | int | None = None,
    memory_budget: float | None = None,
    reproduce_rng: bool | None = None,
) -> Tensor:
    """Outputs at problem.t, stacked, differentiable w.r.t. y0, t and problem.params."""
    policy = resolve_policy(problem, checkpoints, memory_budget)
    problem.stats.update(checkpoint_bytes=0, n_recomputed_steps=0, checkpoints=policy.describe())
    if reproduce_rng is None:
        reproduce_rng = problem.stochastic()
    wanted = problem.y0.requires_grad or problem.t.requires_grad or bool(problem.params)
    if not (wanted and torch.is_grad_enabled()):
        with torch.no_grad():
            return _Run(problem, Policy("none"), bool(reproduce_rng)).forward()
    run = _Run(problem, policy, bool(reproduce_rng))
    return _DiscreteAdjoint.apply(run, problem.y0, problem.t, *problem.params)


def resolve_policy(
    problem: Problem, checkpoints: str | int | None, memory_budget: float | None
) -> Policy:
    """The checkpoint policy from `checkpoints=` or `memory_budget=` (default "all")."""
    if checkpoints is not None and memory_budget is not None:
        raise InvalidInputError("give checkpoints= or memory_budget=, not both")
    if memory_budget is not None:
        return _policy_for_budget(problem, memory_budget)
    if checkpoints is None or checkpoints in ("all", "solution"):
        return Policy(checkpoints or "all")
    if isinstance(checkpoints, int) and not isinstance(checkpoints, bool) and checkpoints >= 1:
        return Policy("binomial", checkpoints)
    raise UnknownNameError(
        f"checkpoints must be 'all', 'solution' or a positive int (the number of states "
        f"kept), got {checkpoints!r}"
    )


def _policy_for_budget(problem: Problem, budget: float) -> Policy:
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"memory_budget must be a number of bytes, got {budget!r}"
        ) from None
    with torch.no_grad():
        state = problem.solver.initial_state(problem.y0)
    state_bytes = state.numel() * state.element_size()
    slots = int(budget // state_bytes) if math.isfinite(budget) else 2**62
    if slots < 1:
        raise InvalidInputError(
            f"memory_budget={budget:.0f} bytes holds no state: one needs {state_bytes} bytes"
        )
    n_steps = _planned_steps(problem)
    solver = problem.solver
    if n_steps is None:
        return Policy("budget", slots, budget) if _is_plain_rk(solver) else \
            Policy("binomial", slots)
    if _is_plain_rk(solver):
        stages = len(_kept_stages(solver.tableau, problem.t.requires_grad))
        if (n_steps * (stages + 1) + 1) * state_bytes <= budget:
            return Policy("all")
    if slots >= n_steps:
        return Policy("solution")
    return Policy("binomial", slots)


def _planned_steps(problem: Problem) -> int | None:
    """N for fixed steps (known before the solve), None for adaptive ones."""
    if problem.adaptive:
        return None
    return fixed_step_count(problem.t, problem.step_size)


def _is_plain_rk(solver: Solver) -> bool:
    """An explicit Runge–Kutta solver whose step is the tableau's (the stage-recurrence path)."""
    cls = type(solver)
    return (
        isinstance(solver, ExplicitRungeKutta)
        and not hasattr(solver, "step_vjp")
        and all(
            getattr(cls, name) is getattr(ExplicitRungeKutta, name)
            for name in ("step", "stages_from", "interpolate", "initial_state", "observe", "init")
        )
    )


def _kept_stages(tableau, time: bool) -> list[int]:
    """The stages "all" keeps: those some stage point reads (a_ij ≠ 0), the FSAL stage (the
    next step's first), and every stage when t is differentiated (∂/∂h reads them all)."""
    s = tableau.stages
    return [
        j for j in range(s)
        if time or (tableau.fsal and j == s - 1) or any(tableau.a[i][j] != 0.0 for i in range(s))
    ]


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors inside a carry, a list of stages or a Step."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Step):
        obj = (obj.y, obj.error, obj.dense, obj.carry)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [x for item in obj for x in _tensors(item)]
    return []


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


@dataclasses.dataclass
class _Kept:
    """One checkpoint: the state at the start of step n, and per policy its carry, its stages
    (explicit Runge–Kutta, "all") or its whole Step (solvers with step_vjp, "all")."""

    state: Tensor
    carry: Any = None
    stages: list[Tensor] | None = None
    step: Step | None = None

    def tensors(self) -> list[Tensor]:
        carry = None if self.carry is _INIT else self.carry
        return _tensors([self.state, carry, self.stages, self.step])


class _Store:
    """The checkpoints, with a deterministic count of the bytes they hold (each tensor once)."""

    def __init__(self):
        self.kept: dict[int, _Kept] = {}
        self._refs: dict[int, list] = {}
        self.bytes = 0
        self.peak = 0

    def save(self, n: int, kept: _Kept) -> None:
        if n in self.kept:
            self.delete(n)
        self.kept[n] = kept
        for x in kept.tensors():
            ref = self._refs.get(id(x))
            if ref is None:
                self._refs[id(x)] = [x, 1]
                self.bytes += _nbytes(x)
            else:
                ref[1] += 1
        self.peak = max(self.peak, self.bytes)

    def extra_bytes(self, kept: _Kept) -> int:
        """What saving `kept` would add."""
        new = {id(x): x for x in kept.tensors() if id(x) not in self._refs}
        return sum(_nbytes(x) for x in new.values())

    def delete(self, n: int) -> None:
        for x in self.kept.pop(n).tensors():
            ref = self._refs[id(x)]
            ref[1] -= 1
            if ref[1] == 0:
                del self._refs[id(x)]
                self.bytes -= _nbytes(x)


class _Streams:
    """A seed for every evaluation of f, so that a re-run draws the same random numbers."""

    def __init__(self, device: torch.device):
        self.base = int(torch.randint(0, 2**62, ()))
        self.generators = [torch.default_generator]
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.generators.append(torch.cuda.default_generators[index])
        self.count = 0
        self.key_of: dict[int, int] = {}  # id(f's output) -> its key, for explicit stages
        self.attempt = range(0)  # keys of the last solver.step / solver.init call
        self.init_keys = range(0)

    def seed(self, key: int) -> None:
        seed = (self.base + 0x9E3779B97F4A7C15 * (key + 1)) % 2**63
        for generator in self.generators:  # torch.manual_seed would cost ~0.4 ms
            generator.manual_seed(seed)

    def recording(self, f: Callable) -> Callable:
        """f for the forward pass: each call seeded with a new key."""

        def call(t, y):
            key = self.count
            self.count += 1
            self.seed(key)
            out = f(t, y)
            self.key_of[id(out)] = key
            return out

        return call

    def replaying(self, f: Callable, keys) -> Callable:
        """f for a re-run: the calls take `keys` in order."""
        it = iter(keys)

        def call(t, y):
            self.seed(next(it))
            return f(t, y)

        return call


class _KeyedSolver:
    """A solver seen by the forward loop that notes which keys each init/step call drew."""

    def __init__(self, solver: Solver, streams: _Streams):
        self._solver = solver
        self._streams = streams

    def __getattr__(self, name):
        return getattr(self._solver, name)

    def init(self, f, t0, y0):
        start = self._streams.count
        carry = self._solver.init(f, t0, y0)
        self._streams.init_keys = range(start, self._streams.count)
        return carry

    def step(self, f, t, h, y, carry, **options):
        start = self._streams.count
        step = self._solver.step(f, t, h, y, carry, **options)
        self._streams.attempt = range(start, self._streams.count)
        return step



def _forked_rng(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class _Acc:
    """A running sum Σ α_k x_k that adds in place only into tensors it allocated itself."""

    def __init__(self):
        self.value: Tensor | None = None
        self._owned = False

    def add(self, x: Tensor | None, alpha: float = 1.0) -> None:
        if x is None or alpha == 0.0:
            return
        if self.value is None:
            self.value, self._owned = (x, False) if alpha == 1.0 else (x * alpha, True)
        elif self._owned:
            self.value.add_(x, alpha=alpha)
        else:
            self.value, self._owned = torch.add(self.value, x, alpha=alpha), True


class _Run:
    """One solve: the forward pass with its checkpoints, and the backward pass over them."""

    def __init__(self, problem: Problem, policy: Policy, reproduce_rng: bool):
        self.problem = problem
        self.policy = policy
        self.solver = problem.solver
        self.rk = _is_plain_rk(self.solver)
        self.has_step_vjp = hasattr(self.solver, "step_vjp")
        self.streams = _Streams(problem.y0.device) if reproduce_rng else None
        self.store = _Store()
        self.trajectory: Trajectory | None = None
        self.stage_keys: list[list[int]] = []  # explicit RK: key of every stage of every step
        self.step_keys: list[range] = []  # other solvers: keys of every accepted step
        if self.rk:
            tableau = self.solver.tableau
            self.fsal = bool(tableau.fsal)
            self.c = [float(v) for v in tableau.c]
            self.a_terms = [
                [(j, float(v)) for j, v in enumerate(row[:i]) if v != 0.0]
                for i, row in enumerate(tableau.a)
            ]
            self.b = [float(v) for v in tableau.b]
            self.a = [[float(v) for v in row] for row in tableau.a]
            self.dense = tableau.dense
            self.kept_stages = set(_kept_stages(tableau, problem.t.requires_grad))

    # ---- forward ----------------------------------------------------------------------------

    def forward(self) -> Tensor:
        problem, policy = self.problem, self.policy
        n_planned = _planned_steps(problem)
        keep_all = policy.kind in ("all", "solution")
        positions = online = None
        if policy.kind == "binomial":
            if n_planned is None:
                online = OnlineCheckpoints(policy.slots)
            else:
                positions = set(offline_positions(max(n_planned, 1), policy.slots))
        store_stages = policy.kind in ("all", "budget") and self.rk
        store_steps = policy.kind == "all" and self.has_step_vjp
        streams = self.streams
        previous_carry = [_INIT]
        store = self.store

        def thin_to_budget(n: int) -> OnlineCheckpoints:
            """"budget" outgrew "all": keep states only, thinned as if online from the start."""
            for m in list(store.kept):
                store.save(m, _Kept(state=store.kept[m].state))
            schedule = OnlineCheckpoints(policy.slots)
            for m in range(1, n):
                schedule.add(m)
            for m in set(store.kept) - set(schedule.positions):
                store.delete(m)
            return schedule

        def on_step(record, y, step):
            nonlocal online, store_stages
            n = record.index
            if streams is not None:
                if self.rk:
                    self.stage_keys.append([streams.key_of[id(k)] for k in step.dense])
                    streams.key_of = {id(k): streams.key_of[id(k)] for k in step.dense}
                else:
                    keys = streams.attempt
                    if n == 0:
                        keys = list(streams.init_keys) + list(keys)
                    self.step_keys.append(keys)
                    streams.key_of.clear()  # used for explicit stages only
            if store_stages and policy.kind == "budget":
                new = _Kept(state=y, stages=self.stages_to_keep(step))
                if store.bytes + store.extra_bytes(new) > policy.budget:
                    online, store_stages = thin_to_budget(n), False
            keep = keep_all or policy.kind == "budget" or (n == 0 and policy.kind != "none")
            if positions is not None:
                keep = n in positions
            elif online is not None and n > 0:
                keep, dropped = online.add(n)
                if dropped is not None:
                    self.store.delete(dropped)
            if keep:
                self.store.save(n, _Kept(
                    state=y,
                    carry=None if self.rk else previous_carry[0],
                    stages=self.stages_to_keep(step) if store_stages else None,
                    step=step if store_steps else None,
                ))
            previous_carry[0] = step.carry

        run_problem = problem
        if streams is not None:
            solver = problem.solver if self.rk else _KeyedSolver(problem.solver, streams)
            run_problem = dataclasses.replace(
                problem, f=streams.recording(problem.f), solver=solver
            )
        with torch.no_grad(), _forked_rng(problem.y0.device, streams is not None):
            outputs, self.trajectory = run_problem.integrate(on_step=on_step)
        if streams is not None:
            streams.key_of = {}
        problem.stats["checkpoint_bytes"] = self.forward_peak = self.store.peak
        if policy.kind == "budget":
            problem.stats["checkpoints"] = "all" if online is None else policy.slots
        self.saved: list[Tensor] = []
        self.template = _pack(self.store.kept, self.saved, {})
        self.store = None  # the checkpoints now live in ctx.save_for_backward only
        return torch.stack(outputs)

    def stages_to_keep(self, step: Step) -> list[Tensor | None]:
        return [k if j in self.kept_stages else None for j, k in enumerate(step.dense)]

    # ---- backward ---------------------------------------------------------------------------

    def backward(self, grad_ys: Tensor, saved: tuple[Tensor, ...], needs_input_grad) -> tuple:
        """The reverse sweep; the checkpoints come back from ctx.saved_tensors, so autograd
        frees them after the backward pass unless retain_graph=True."""
        problem = self.problem
        self.store = _Store()
        for n, kept in _unpack(self.template, saved).items():
            self.store.save(n, kept)
        try:
            with backward_phase(problem), torch.no_grad(), \
                    _forked_rng(problem.y0.device, self.streams is not None):
                result = _Backward(self, grad_ys, bool(needs_input_grad[2])).run()
        finally:
            problem.stats["checkpoint_bytes"] = max(self.forward_peak, self.store.peak)
            self.store = None
        return result


    def backward_with_graph(self, grad_ys: Tensor, needs) -> list[Tensor | None]:
        """The gradients as a differentiable function of y0, t, the parameters and grad_ys:
        the forward solve re-run under autograd and differentiated with create_graph
        (gradients/second_order.py). Recorded random streams are replayed from the start, so
        f sees the forward pass's dropout masks again."""
        problem = self.problem
        f = None
        if self.streams is not None:
            self.streams.count = 0
            f = self.streams.recording(problem.f)
        inputs = [problem.y0, problem.t, *problem.params]
        with backward_phase(problem), _forked_rng(problem.y0.device, f is not None):
            return differentiable_backward(problem, grad_ys, inputs, needs, f)


class _Backward:
    """The reverse sweep: λ = ∂L/∂y_{n+1} pulled back through steps N−1, …, 0 (ALGORITHMS §1)."""

    def __init__(self, run: _Run, grad_ys: Tensor, time: bool):
        self.run_ = run
        self.problem = run.problem
        self.solver = run.solver
        self.f = run.problem.f
        self.params = list(run.problem.params)
        self.grad_ys = grad_ys
        self.time = time
        t = run.problem.t
        self.t = t.detach()
        self.t_bar = torch.zeros_like(self.t) if time else None
        self.steps = run.trajectory.steps
        self.ends: dict[int, list[int]] = {}
        self.inside: dict[int, list[tuple[int, float]]] = {}
        for out in run.trajectory.outputs:
            if out.step < 0:
                continue
            if out.index == self.steps[out.step].end_anchor:
                self.ends.setdefault(out.step, []).append(out.index)
            else:
                self.inside.setdefault(out.step, []).append((out.index, out.theta))
        self.lam: Tensor | None = None  # ∂L/∂state_{n+1}
        self.carry_bar: Any = None  # ∂L/∂(carry of step n+1): FSAL stage or solver carry
        self.param_bars: list[Tensor | None] = [None] * len(self.params)
        self.current: tuple[int, Tensor, Any] | None = None  # (n, state, carry)
        self.recomputed = 0

    # ---- the sweep --------------------------------------------------------------------------

    def run(self) -> tuple:
        run, store, n_steps = self.run_, self.run_.store, len(self.steps)
        if n_steps:
            slots = run.policy.slots if run.policy.kind in ("binomial", "budget") else 0
            schedule = reverse_segments(sorted(store.kept), n_steps, max(slots, len(store.kept)))
            self.execute(schedule)
        state0 = self.problem.solver.initial_state(self.problem.y0.detach())
        lam = self.lam
        if run.rk and run.fsal and self.carry_bar is not None:
            key = run.stage_keys[0][0] if run.streams is not None else None
            g_y, g_t = self.vjp(self.t[0], state0, self.carry_bar, key)
            lam = _sum(lam, g_y)
            if g_t is not None:
                self.t_bar[0] += g_t
        y0_bar = _sum(self.grad_ys[0], self.initial_state_vjp(lam))
        self.problem.stats["n_recomputed_steps"] += self.recomputed
        return (y0_bar, self.t_bar, *self.param_bars)

    def execute(self, schedule: Schedule) -> None:
        store = self.run_.store
        for action in schedule.actions:
            if isinstance(action, Load):
                kept = store.kept[action.n]
                self.current = (action.n, kept.state, kept.carry)
            elif isinstance(action, Forward):
                self.advance(action.n0, action.n1)
            elif isinstance(action, Save):
                n, state, carry = self.current
                store.save(n, _Kept(state=state, carry=None if self.run_.rk else carry))
            elif isinstance(action, Delete):
                store.delete(action.n)
            elif isinstance(action, Reverse):
                kept = store.kept.get(action.n)
                self.reverse(action.n, kept)
                self.current = None

    def t_n(self, n: int) -> Tensor:
        record = self.steps[n]
        return self.t[record.start_anchor] + record.start_offset

    def retried(
        self, n: int, state: Tensor, carry: Any, graph: bool = False, t_n: Tensor | None = None
    ) -> Any:
        """The carry step n's accepted attempt started from: the forward loop's rejected
        attempts at t_n replayed (loop.replay_rejected). A solver whose retry carry is the
        incoming one (explicit) gets `carry` back unchanged; one whose retry carry is computed
        in the attempt (the first stage f(t_n, z_n) of a reversible Runge–Kutta step) gets it
        recomputed, with a graph back to `state` and the parameters when `graph` is set (the
        replay that differentiates the step needs it: without it the carry's dependence on
        the state would be dropped); an implicit solver gets the refreshed Jacobian its retry
        used, so the replay is exact. Rejected attempts of a stochastic f are replayed with
        fresh randomness. `t_n`: the step's time as the caller differentiates it."""
        if not self.steps[n].rejected:
            return carry
        t_n = self.t_n(n) if t_n is None else t_n
        with torch.enable_grad() if graph else torch.no_grad():
            return replay_rejected(self.solver, self.f, t_n, self.steps[n], state, carry)

    def keyed(self, keys) -> Callable:
        streams = self.run_.streams
        return self.f if streams is None else streams.replaying(self.f, keys)

    # ---- recomputation ----------------------------------------------------------------------

    def first_stage(self, n: int, y: Tensor) -> Tensor:
        """K_1 of step n as the forward pass evaluated it (the FSAL stage of step n − 1)."""
        run = self.run_
        f = self.keyed(run.stage_keys[n][:1] if run.streams is not None else ())
        if n == 0:
            return f(self.t[0], y)
        if run.fsal:
            prev = self.steps[n - 1]
            return f(self.t_n(n - 1) + run.c[-1] * prev.h, y)
        return f(self.t_n(n), y)

    def advance(self, n0: int, n1: int) -> None:
        """Recompute steps n0, …, n1 − 1 without a graph from the current state (at n0)."""
        run = self.run_
        n, state, carry = self.current
        assert n == n0, (n, n0)
        for m in range(n0, n1):
            record = self.steps[m]
            if run.rk:
                k1 = carry if carry is not None else self.first_stage(m, state)
                keys = run.stage_keys[m][1:] if run.streams is not None else ()
                step = self.solver.step(self.keyed(keys), self.t_n(m), record.h, state, k1)
                carry = step.carry
            else:
                keys = run.step_keys[m] if run.streams is not None else ()
                f = self.keyed(keys)
                if carry is _INIT:
                    carry = self.solver.init(f, self.t[0], state)
                carry = self.retried(m, state, carry)
                step = self.solver.step(f, self.t_n(m), record.h, state, carry)
                carry = step.carry
            state = step.y
            self.recomputed += 1
        self.current = (n1, state, carry)

    def reverse(self, n: int, kept: _Kept | None) -> None:
        run = self.run_
        if run.rk:
            if kept is not None and kept.stages is not None:
                y, ks = kept.state, kept.stages
            else:
                m, y, carry = self.current
                assert m == n, (m, n)
                k1 = carry if carry is not None else self.first_stage(n, y)
                keys = run.stage_keys[n][1:] if run.streams is not None else ()
                ks, _ = self.solver.stages_from(
                    self.keyed(keys), self.t_n(n), self.steps[n].h, y, k1
                )
                self.recomputed += 1
            self.reverse_rk(n, y, ks)
        elif run.has_step_vjp:
            self.reverse_step_vjp(n, kept)
        else:
            m, state, carry = self.current
            assert m == n, (m, n)
            self.reverse_replay(n, state, carry)

    # ---- one step back: explicit Runge–Kutta ------------------------------------------------

    def reverse_rk(self, n: int, y: Tensor, ks: list[Tensor]) -> None:
        """κ_i = h(b_i λ + Σ_o b_i(θ_o) ȳ_o + Σ_{j>i} a_ji J_j^T κ_j),
        λ_n = λ + Σ_o ȳ_o + Σ_i J_i^T κ_i (ALGORITHMS §1). The FSAL stage's cotangent from
        step n + 1 is added to κ_s; κ_1 of an FSAL scheme goes back to step n − 1 instead of
        through a VJP here."""
        run, record = self.run_, self.steps[n]
        h, t_n, s = record.h, self.t_n(n), len(ks)
        lam = self.lam
        for i in self.ends.get(n, []):
            lam = _sum(lam, self.grad_ys[i])
        inside = [(i, theta, self.grad_ys[i], self.solver.dense_weights(theta))
                  for i, theta in self.inside.get(n, [])]
        lam_n = _Acc()
        lam_n.add(lam)
        for _, _, g, _ in inside:
            lam_n.add(g)
        keys = run.stage_keys[n] if run.streams is not None else None
        y_bars: list[Tensor | None] = [None] * s
        t_n_bar = h_bar = None
        carry_bar = None
        for i in range(s - 1, -1, -1):
            kappa = _Acc()
            kappa.add(lam, h * run.b[i])
            for _, _, g, w in inside:
                kappa.add(g, h * w[i])
            for j in range(i + 1, s):
                kappa.add(y_bars[j], h * run.a[j][i])
            if self.time and kappa.value is not None:  # ∂/∂h of the h Σ_j (·) K_j terms
                h_bar = _sum(h_bar, (ks[i] * kappa.value).sum() / h)
            if i == s - 1 and run.fsal:
                kappa.add(self.carry_bar)
            if i == 0 and run.fsal:
                carry_bar = kappa.value
                continue
            if kappa.value is None:
                continue
            point = y if i == 0 else combine(y, h, run.a_terms[i], ks)
            time_i = t_n if i == 0 else t_n + run.c[i] * h
            y_bars[i], g_t = self.vjp(time_i, point, kappa.value, None if keys is None else keys[i])
            lam_n.add(y_bars[i])
            if g_t is not None:
                t_n_bar = _sum(t_n_bar, g_t)
                h_bar = _sum(h_bar, run.c[i] * g_t)
        if self.time:
            theta_bars = []
            for i, theta, g, _ in inside:
                slopes = self.dense_slopes(theta)
                dots = sum(float(slopes[j]) * (g * ks[j]).sum() for j in range(s) if slopes[j])
                theta_bars.append((i, theta, h * dots))
            self.chain_time(record, t_n_bar, h_bar, theta_bars)
        self.lam, self.carry_bar = lam_n.value, carry_bar

    def dense_slopes(self, theta: float) -> list[float]:
        """b_i'(θ) = Σ_k P[i, k] (k + 1) θ^k."""
        dense = self.run_.dense
        powers = [(k + 1) * theta**k for k in range(dense.shape[1])]
        return [float(sum(p * q for p, q in zip(row, powers))) for row in dense]

    def vjp(self, t: Tensor, y: Tensor, cotangent: Tensor, key: int | None):
        """J^T κ and P^T κ (accumulated) and ∂/∂t of <κ, f(t, y)>: one VJP of f."""
        with torch.enable_grad():
            y_in = y.detach().requires_grad_()
            t_in = t.detach().requires_grad_() if self.time else t
            if key is not None:
                self.run_.streams.seed(key)
            out = self.f(t_in, y_in)
            if not out.requires_grad:
                return None, None
            inputs = [y_in] + ([t_in] if self.time else []) + self.params
            grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
        self.add_params(grads[len(grads) - len(self.params):])
        return grads[0], (grads[1] if self.time else None)

    def add_params(self, grads) -> None:
        for k, g in enumerate(grads):
            if g is not None:
                self.param_bars[k] = g if self.param_bars[k] is None else self.param_bars[k] + g

    def chain_time(self, record, t_n_bar, h_bar, theta_bars) -> None:
        """dL/dt from dL/dt_n, dL/dh_n and dL/dθ: t_n = t[a] + offset, h_n = t[e] − t_n for a
        step that lands on an output time, θ = (t_i − t_n)/h_n (see loop.Trajectory)."""
        zero = self.t.new_zeros(())
        t_n_bar = zero if t_n_bar is None else t_n_bar
        h_bar = zero if h_bar is None else h_bar
        for i, theta, g in theta_bars:
            self.t_bar[i] += g / record.h
            t_n_bar = t_n_bar - g / record.h
            h_bar = h_bar - g * theta / record.h
        if record.end_anchor is not None:
            self.t_bar[record.end_anchor] += h_bar
            t_n_bar = t_n_bar - h_bar
        self.t_bar[record.start_anchor] += t_n_bar

    # ---- one step back: any solver ----------------------------------------------------------

    def reverse_replay(self, n: int, state: Tensor, carry: Any) -> None:
        """Replay solver.step under autograd and pull back the cotangents of everything it
        hands on (next state, carry, outputs) in one torch.autograd.grad."""
        record, solver = self.steps[n], self.solver
        run = self.run_
        f = self.keyed(run.step_keys[n] if run.streams is not None else ())
        with torch.enable_grad():
            state_in = state.detach().requires_grad_()
            t_in = self.t_n(n).requires_grad_(self.time)
            h_in = torch.tensor(record.h, dtype=self.t.dtype, device=self.t.device,
                                requires_grad=True) if self.time else record.h
            carry_leaves: list[Tensor] = []
            if carry is _INIT:
                carry_in = solver.init(f, t_in, state_in)
            else:
                carry_in = _leaves(carry, carry_leaves)
            carry_in = self.retried(n, state_in, carry_in, graph=True, t_n=t_in)
            step = solver.step(f, t_in, h_in, state_in, carry_in)
            outs, cots = [], []
            if self.lam is not None:
                outs.append(step.y)
                cots.append(self.lam)
            end_bar = None
            for i in self.ends.get(n, []):
                end_bar = _sum(end_bar, self.grad_ys[i])
            if end_bar is not None:
                outs.append(solver.observe(step.y))
                cots.append(end_bar)
            if self.carry_bar is not None:
                for x, g in zip(_tensors(step.carry), self.carry_bar):
                    if g is not None:
                        outs.append(x)
                        cots.append(g)
            thetas = []
            for i, theta in self.inside.get(n, []):
                th = torch.tensor(theta, dtype=self.t.dtype, device=self.t.device,
                                  requires_grad=True) if self.time else theta
                thetas.append((i, theta, th))
                outs.append(solver.interpolate(state_in, h_in, step.dense, th))
                cots.append(self.grad_ys[i])
            pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
            carry_diff = [x for x in carry_leaves if x.requires_grad]
            time_inputs = [t_in, h_in] + [th for _, _, th in thetas] if self.time else []
            inputs = [state_in] + carry_diff + time_inputs + self.params
            if pairs:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True
                )
            else:
                grads = [None] * len(inputs)
        k = 1 + len(carry_diff)
        self.lam = grads[0]
        carry_grads = iter(grads[1:k])
        self.carry_bar = [next(carry_grads) if x.requires_grad else None for x in carry_leaves]
        if self.time:
            theta_bars = [(i, theta, g) for (i, theta, _), g in
                          zip(thetas, grads[k + 2:k + 2 + len(thetas)]) if g is not None]
            self.chain_time(record, grads[k], grads[k + 1], theta_bars)
        self.add_params(grads[len(grads) - len(self.params):])

    def reverse_step_vjp(self, n: int, kept: _Kept | None) -> None:
        """The solver's own adjoint step (implicit methods: transposed stage solves)."""
        record, solver = self.steps[n], self.solver
        t_n = self.t_n(n)
        if kept is not None and kept.step is not None:
            state, step = kept.state, kept.step
        else:
            m, state, carry = self.current
            assert m == n, (m, n)
            if carry is _INIT:
                carry = solver.init(self.f, self.t[0], state)
            carry = self.retried(n, state, carry)
            step = solver.step(self.f, t_n, record.h, state, carry)
            self.recomputed += 1
        lam = self.lam if self.lam is not None else torch.zeros_like(step.y)
        end_bar = None
        for i in self.ends.get(n, []):
            end_bar = _sum(end_bar, self.grad_ys[i])
        if end_bar is not None:
            lam = lam + self.observe_vjp(step.y, end_bar)
        dense_bars = [(theta, self.grad_ys[i]) for i, theta in self.inside.get(n, [])]
        state_bar, param_bars = solver.step_vjp(
            self.f, t_n, record.h, state, step, lam, dense_bars, tuple(self.params)
        )
        self.lam = state_bar
        self.add_params(param_bars)

    def observe_vjp(self, state: Tensor, y_bar: Tensor) -> Tensor:
        if type(self.solver).observe is Solver.observe:
            return y_bar
        with torch.enable_grad():
            state_in = state.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.solver.observe(state_in), state_in, y_bar)
        return g

    def initial_state_vjp(self, lam: Tensor | None) -> Tensor | None:
        if lam is None or type(self.solver).initial_state is Solver.initial_state:
            return lam
        with torch.enable_grad():
            y0 = self.problem.y0.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.solver.initial_state(y0), y0, lam, allow_unused=True)
        return g


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int


def _pack(obj: Any, saved: list[Tensor], index: dict[int, int]) -> Any:
    """obj with every tensor replaced by its slot in `saved` (each tensor saved once)."""
    if isinstance(obj, Tensor):
        if id(obj) not in index:
            index[id(obj)] = len(saved)
            saved.append(obj)
        return _Slot(index[id(obj)])
    if isinstance(obj, (list, tuple)):
        items = [_pack(x, saved, index) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _pack(v, saved, index) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{
            f.name: _pack(getattr(obj, f.name), saved, index)
            for f in dataclasses.fields(obj) if f.init
        })
    return obj


def _unpack(obj: Any, saved: tuple[Tensor, ...]) -> Any:
    if isinstance(obj, _Slot):
        return saved[obj.index]
    if isinstance(obj, (list, tuple)):
        items = [_unpack(x, saved) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _unpack(v, saved) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{
            f.name: _unpack(getattr(obj, f.name), saved)
            for f in dataclasses.fields(obj) if f.init
        })
    return obj


def _sum(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _leaves(obj: Any, leaves: list[Tensor]) -> Any:
    """A copy of a carry whose floating-point tensors are fresh leaves requiring grad."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            leaf = obj.detach().requires_grad_()
            leaves.append(leaf)
            return leaf
        leaves.append(obj)  # keeps positions aligned with _tensors(); not differentiated
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_leaves(x, leaves) for x in obj]
        return type(obj)(items) if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _leaves(v, leaves) for k, v in obj.items()}
    return obj


class _DiscreteAdjoint(torch.autograd.Function):
    """Outputs of the solve; backward = the discrete adjoint sweep over the checkpoints."""

    @staticmethod
    def forward(ctx, run: _Run, y0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        ctx.run = run
        ys = run.forward()
        ctx.save_for_backward(*run.saved)
        run.saved = None
        return ys

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        if graph_requested():  # double backward: §10 (a), see gradients/second_order.py
            return (None, *ctx.run.backward_with_graph(grad_ys, ctx.needs_input_grad[1:]))
        y0_bar, t_bar, *param_bars = ctx.run.backward(
            grad_ys, ctx.saved_tensors, ctx.needs_input_grad
        )
        return (None, y0_bar, t_bar, *param_bars)
