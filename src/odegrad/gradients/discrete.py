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

import torch
from torch import Tensor

from ..checkpointing import (
    OnlineCheckpoints,
    offline_positions,
)
from ..errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from ..loop import Trajectory, fixed_step_count
from ..problem import Problem, backward_phase
from ..solvers.base import Solver, Step
from ..solvers.explicit import ExplicitRungeKutta
from .checkpoint_store import _INIT, _Kept, _pack, _Store, _unpack
from .discrete_sweep import _Backward
from .replay_rng import _forked_rng, _KeyedSolver, _Streams
from .second_order import differentiable_backward, graph_requested

OPTIONS = ("checkpoints", "memory_budget", "reproduce_rng")


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
    return fixed_step_count(problem.t, problem.step_size, problem.stops)


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
