"""The forward time loop: accepted steps, outputs by dense interpolation, stats and errors.

The loop records what every gradient method replays (ALGORITHMS.md §1, "adaptive steps"): each
accepted step's (t_n, h_n) as constants of the discrete scheme, tied to the output times `t`
only through t_n = t[anchor] + offset and, for a step that lands on an output time,
h_n = t[end_anchor] − t_n. A gradient w.r.t. `t` therefore flows through the first time, the
clipped last step and the interpolation points, and nowhere through the controller. Steps land
on t[-1] and on the output times listed in `stops` (solve's step_t and jump_t, merged into t by
the API), in the same recorded way, so every gradient method replays them exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .control import (
    Norm,
    PIController,
    StepControl,
    initial_step_size,
    rms_norm,
    scaled_error,
)
from .errors import MaxStepsExceededError, NonFiniteError, StepSizeUnderflowError
from .solvers.base import Scalar, Solver, Step, StepRejected, VectorField

DEFAULT_MAX_STEPS = 10_000
_MAX_NONFINITE_RETRIES = 30
_MAX_FAILED_STEPS = 10  # StepRejected in a row before its error is raised
# The dtypes whose stage-time table reproduces the scalar ops bit for bit on every device (with
# NumPy's type of the same format): a 0-dim tensor plus a Python float rounds the float to the
# tensor's dtype and adds in it, as the table does. For float16 and bfloat16, CUDA reads the
# float in float32 (the op-math type) without rounding it to the dtype first, so those keep the
# scalar ops.
_TABLE_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# Building the table and its first views costs about what the scalar ops of two steps do:
# against them, per rk4 solve, −33 µs at one step, ±10 µs at two, +6 to +55 µs at three and
# +24 to +102 µs at four (1x1 state to small MLP; CPU, torch 2.13).
_MIN_TABLE_STEPS = 3


@dataclass
class StepRecord:
    """One accepted step, as the gradient methods replay it."""

    index: int
    t: float  # t_n
    h: float  # h_n
    start_anchor: int  # t_n = t[start_anchor] + start_offset
    start_offset: float
    end_anchor: int | None = None  # if set, h_n = t[end_anchor] − t_n
    # The step sizes tried from t_n and rejected before h_n, in order. A rejected attempt may
    # hand the next one a different carry (an implicit solver's refreshed Jacobian), so a
    # replay that must reproduce step n exactly repeats them (see `replay_rejected`).
    rejected: tuple[float, ...] = ()


@dataclass
class OutputRecord:
    """Where output i was read: y0 itself (step −1), a step end (θ = 1) or inside a step."""

    index: int
    step: int
    theta: float
    at_step_end: bool = False  # read as y_{n+1} itself (the step's end_anchor), not interpolated


@dataclass
class Trajectory:
    """The accepted steps and output locations of one forward solve."""

    steps: list[StepRecord] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)

    def step_time(self, t: Tensor, record: StepRecord) -> Tensor:
        """t_n as a function of the output times (differentiable when t is)."""
        return t[record.start_anchor] + record.start_offset

    def step_size(self, t: Tensor, record: StepRecord, t_n: Tensor | None = None) -> Scalar:
        """h_n: a constant, or t[end_anchor] − t_n for a step that lands on an output time."""
        if record.end_anchor is None or not t.requires_grad:
            return record.h
        t_n = self.step_time(t, record) if t_n is None else t_n
        return t[record.end_anchor] - t_n

    def theta(self, t: Tensor, output: OutputRecord, t_n: Tensor, h: Scalar) -> Scalar:
        """θ = (t_i − t_n)/h_n of an output inside a step (a tensor when t is differentiated)."""
        if not t.requires_grad:
            return output.theta
        return (t[output.index] - t_n) / h


class FixedGrid(float):
    """solve's `grid_constructor` grid, carried where a fixed step size goes (Problem.step_size,
    so every gradient method that re-runs the forward loop re-runs it on the same steps).

    Its float value is the grid's longest interval: what a reader of the step size that knows
    nothing of grids sees (a continuous adjoint's fixed-step backward solve, by default).
    `times`: the grid's times as floats of t's dtype, from t[0] to t[-1], strictly monotonic.
    """

    times: tuple[float, ...]

    def __new__(cls, times: Sequence[float]) -> FixedGrid:
        times = tuple(float(v) for v in times)
        grid = super().__new__(cls, max(abs(b - a) for a, b in zip(times[:-1], times[1:])))
        grid.times = times
        return grid

    def __repr__(self) -> str:
        return f"FixedGrid({len(self.times) - 1} steps from {self.times[0]:.10g} to " \
               f"{self.times[-1]:.10g})"


OnStep = Callable[[StepRecord, Tensor, Step], None]
# A user step callback as the loop calls it: (t_n as a tensor, the observed state, h as a float).
StepHook = Callable[[Tensor, Tensor, float], None]


def integrate(
    f: VectorField,
    y0: Tensor,
    t: Tensor,
    solver: Solver,
    *,
    rtol: Tensor | float = 1e-6,
    atol: Tensor | float = 1e-8,
    step_size: float | None = None,
    adaptive: bool | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    norm: Norm = rms_norm,
    on_step: OnStep | None = None,
    stats: dict | None = None,
    check_each_step: bool = False,
    on_attempt: StepHook | None = None,
    on_accept: StepHook | None = None,
    on_reject: StepHook | None = None,
    control: StepControl | None = None,
    stops: Sequence[int] = (),
) -> tuple[list[Tensor], Trajectory]:
    """Solve y' = f(t, y) from y0 at t[0] and return y at every t[i], with the trajectory.

    Adaptive (the default for schemes with an embedded estimate): PI control with `rtol`,
    `atol`; `step_size` is then the first step (chosen automatically when None). Fixed: steps
    of `step_size` from t[0], the last one clipped to land on t[-1]; with no step size, one step
    per output interval. Outputs between step ends come from the scheme's dense output.
    Differentiable by autograd when run with grad enabled ("direct"); `on_step` sees every
    accepted step (the gradient methods keep their checkpoints through it).

    `on_attempt(t_n, y_n, h)` runs before each step attempt, `on_accept(t_n, y_{n+1}, h_n)`
    after each accepted step and `on_reject(t_n, y_n, h)` after each rejected attempt (once per
    count in stats n_steps, n_accepted, n_rejected), with t_n the step's time tensor, y the
    observed state (`solver.observe`) and h the float step size; without them the loop does
    nothing more per step.

    `control` bounds adaptive steps and sets the controller's factors (control.StepControl).
    `stops`: indices of output times where a step must end, as at t[-1]: an adaptive step that
    would cross one is clipped to land on it (h_n = t[stop] − t_n, recorded as end_anchor); fixed
    steps of `step_size` restart from each stop.

    A `FixedGrid` as `step_size` (solve's grid_constructor): one fixed step per grid interval;
    a step whose end is an output time lands on it (end_anchor), the others are constants
    anchored on the last output time at or before their start. Outputs inside a grid interval
    come from the scheme's dense output. Not with `stops`.

    Fixed steps (three or more) with times that are not differentiated read t_n and the stage
    times of a solver that `takes_stage_times` from one table built before the loop
    (`stage_time_table`), bit for bit the values of the per-step scalar ops they replace, with no
    device op per step for them.

    Fixed steps make no host synchronisation: finiteness is checked once, on the final state
    (inf and nan persist through later steps); only when it fails is the solve replayed with
    `check_each_step=True` to name the step where f first returned a non-finite value.
    Adaptive steps read one number a step attempt on the host, the error ratio of the accept
    decision (a solver with `rate_errors`, compile=True, computes it inside its step and hands
    it over as Step.error_ratio).
    """
    stats = {} if stats is None else stats
    if adaptive is None:
        adaptive = solver.adaptive
    trajectory = Trajectory()
    outputs: list[Tensor | None] = [None] * len(t)
    outputs[0] = y0
    trajectory.outputs.append(OutputRecord(0, -1, 0.0))
    stats.update(n_steps=0, n_accepted=0, n_rejected=0)
    if len(t) == 1:
        return outputs, trajectory

    times = [float(v) for v in t.detach().cpu().tolist()]
    direction = 1.0 if times[-1] > times[0] else -1.0
    time_grad = t.requires_grad and torch.is_grad_enabled()
    control = StepControl() if control is None else control
    landings = sorted({int(i) for i in stops if 0 < int(i) < len(t) - 1} | {len(t) - 1})
    next_landing = 0  # landings[next_landing]: the next output time a step must end on

    solver.configure(rtol=rtol, atol=atol)
    if adaptive and hasattr(solver, "rate_errors"):  # compile=True: the ratio in the step
        solver.rate_errors(rtol, atol, norm)
    state = solver.initial_state(y0)
    carry = solver.init(f, t[0], state)
    if adaptive:
        beta1, beta2 = solver.controller_coefficients
        controller = PIController(
            error_order=solver.error_order or solver.order, beta1=beta1, beta2=beta2,
            safety=control.safety, min_factor=control.dfactor, max_factor=control.ifactor,
        )
        if step_size is None:
            f0 = solver.reuse_first_stage(carry)
            if f0 is None:
                f0 = f(t[0], y0)
            with torch.no_grad():
                h = initial_step_size(
                    f, t[0].detach(), y0.detach(), f0.detach(), direction, solver.order, rtol,
                    atol, norm,
                )
        else:
            h = direction * abs(float(step_size))
        h = control.clamp(h)
        plan = None
    else:
        plan = _fixed_plan(times, step_size, direction, max_steps, landings)
    # Fixed steps with constant times: every stage time up front, read as views per step.
    rows = None
    if (plan is not None and len(plan) >= _MIN_TABLE_STEPS and not time_grad
            and solver.takes_stage_times and t.dtype in _TABLE_DTYPES):
        rows = _StageTimeRows(stage_time_table(times, plan, solver.stage_nodes, t))
        plan_step_sizes = getattr(solver, "plan_step_sizes", None)  # compile=True: runs
        if plan_step_sizes is not None:
            plan_step_sizes(rows.table, [step[0] for step in plan],
                            _steps_with_inside_outputs(times, plan, direction))

    y, t_n, offset, anchor, next_output = state, times[0], 0.0, 0, 1
    y_previous = None  # the state before the last accepted step (for check_stability)
    nonfinite_retries = 0
    failed_steps = 0
    rejected: list[float] = []  # step sizes rejected from the current t_n
    recent_steps: deque[float] = deque(maxlen=20)  # for the stiffness hint
    while next_output < len(times):  # (a list's len: t's costs ~1 µs a step)
        if stats["n_steps"] >= max_steps:
            raise MaxStepsExceededError(
                _max_steps_message(max_steps, t_n, times, recent_steps, solver)
            )
        if plan is not None:
            h, end_anchor, step_anchor, step_offset = plan[stats["n_accepted"]]
        else:
            step_anchor, step_offset, end_anchor = anchor, offset, None
            # Land on the next stop (or the end) when the remainder would be below the
            # resolution of t in y's dtype (a step that short would then raise the underflow
            # error below).
            target = landings[next_landing]
            t_target = times[target]
            h_wanted = h  # the controller's step, before it is clipped to land
            resolution = 8 * torch.finfo(y.dtype).eps * max(abs(t_target), abs(t_n))
            if direction * (t_n + h - t_target) >= -max(
                    1e-12 * max(abs(t_target), abs(h)), resolution):
                h, end_anchor = t_target - t_n, target
            # The shortest step: eps |t_n| in y's dtype, at least one unit in the last place of
            # t_n there, so a step still moves t. A shorter proposal is raised to it; only a
            # rejection there is an underflow. (torchdiffeq, with float64 times, crosses a jump
            # of f in t by steps of a few float32 ulps; refusing every proposal below 4 eps |t|
            # stopped float32 solves that it completes, issue 13.)
            floor = torch.finfo(y.dtype).eps * max(abs(t_n), 1e-300)
            short = abs(h) < floor
            if short and end_anchor is None and not (
                    rejected and abs(rejected[-1]) <= floor * (1 + 1e-9)):
                h, short = direction * floor, False
            if short:
                if nonfinite_retries:
                    raise NonFiniteError(
                        f"f returned a non-finite value at t={t_n:.10g}: every step past it, "
                        f"down to h={h:.3e}, produced inf or nan"
                    )
                raise StepSizeUnderflowError(
                    f"step size underflow at t={t_n:.10g}: h={h:.3e} is below the resolution "
                    f"of t; the problem may be stiff or singular there"
                )
        record = StepRecord(
            stats["n_accepted"], t_n, h, step_anchor, step_offset, end_anchor, tuple(rejected)
        )
        if rows is not None:
            stage_times = rows[stats["n_accepted"]]
            t_tensor, options = stage_times[0], {"stage_times": stage_times}
        else:
            anchor_time = t[step_anchor] if time_grad else t[step_anchor].detach()
            t_tensor, options = anchor_time + step_offset, {}
        h_used = trajectory.step_size(t, record, t_tensor) if time_grad else h
        if on_attempt is not None:
            on_attempt(t_tensor, solver.observe(y), h)
        try:
            step = solver.step(f, t_tensor, h_used, y, carry, **options)
        except StepRejected as rejection:
            stats["n_steps"] += 1
            failed_steps += 1
            if plan is not None or failed_steps > _MAX_FAILED_STEPS:
                raise rejection.error from None
            stats["n_rejected"] += 1
            if on_reject is not None:
                on_reject(t_tensor, solver.observe(y), h)
            if isinstance(rejection.error, NonFiniteError):
                nonfinite_retries += 1  # so an underflow after it is reported as non-finite
            rejected.append(h)
            carry = rejection.retry_carry if rejection.retry_carry is not None else carry
            h = control.clamp(h * rejection.factor)
            continue
        failed_steps = 0
        stats["n_steps"] += 1

        if plan is None:
            # the accept decision's one host synchronisation a step; a step that computed its
            # ratio (compile=True: in its compiled graph) hands it over as error_ratio
            rated = getattr(step, "error_ratio", None)
            ratio = float(rated if rated is not None else scaled_error(
                step.error.detach(), solver.observe(y).detach(), solver.observe(step.y).detach(),
                rtol, atol,
                norm,
            ))
            if not math.isfinite(ratio):
                nonfinite_retries += 1
                first = solver.reuse_first_stage(carry)
                if nonfinite_retries > _MAX_NONFINITE_RETRIES or (
                    first is not None and not bool(torch.isfinite(first).all())
                ):
                    raise NonFiniteError(
                        f"f returned a non-finite value at t={t_n:.10g} (step size {h:.3e})"
                    )
                stats["n_rejected"] += 1
                if on_reject is not None:
                    on_reject(t_tensor, solver.observe(y), h)
                rejected.append(h)
                carry = step.retry_carry if step.retry_carry is not None else carry
                h = control.clamp(h * controller.min_factor)
                continue
            nonfinite_retries = 0
            # min_step accepts a step clipped to land, also when the clip rounded it above
            accepted = ratio <= 1.0 or control.forces_acceptance(min(abs(h), abs(h_wanted)))
            h_next = control.clamp(controller.propose(h, ratio, accepted))
            if not accepted:
                stats["n_rejected"] += 1
                if on_reject is not None:
                    on_reject(t_tensor, solver.observe(y), h)
                rejected.append(h)
                carry = step.retry_carry if step.retry_carry is not None else carry
                h = h_next
                continue
        elif check_each_step and not bool(torch.isfinite(step.y).all()):
            raise NonFiniteError(
                f"f returned a non-finite value in the step from t={t_n:.10g} to "
                f"t={t_n + h:.10g}"
            )

        stats["n_accepted"] += 1
        rejected.clear()
        trajectory.steps.append(record)
        if on_step is not None:
            on_step(record, y, step)
        if on_accept is not None:
            on_accept(t_tensor, solver.observe(step.y), h)
        t_next = t_n + h if end_anchor is None else times[end_anchor]
        next_output = _emit_outputs(
            solver, t, times, direction, record, t_tensor, h_used, y, step, t_next,
            next_output, outputs, trajectory, time_grad,
        )
        recent_steps.append(abs(h))
        y_previous, y, carry = y, step.y, step.carry
        if end_anchor is not None:
            anchor, offset, t_n = end_anchor, 0.0, times[end_anchor]
            if plan is None and end_anchor == landings[next_landing]:
                next_landing = min(next_landing + 1, len(landings) - 1)
        else:
            offset, t_n = offset + h, t_n + h
        if plan is None:
            h = h_next

    if plan is None and "_next_step" in stats:  # asked for by step_times (jump_t pieces)
        stats["_next_step"] = abs(h)
    if plan is not None and not check_each_step and not bool(torch.isfinite(y).all()):
        with torch.no_grad():
            integrate(f, y0, t, solver, step_size=step_size, adaptive=False, max_steps=max_steps,
                      stats={}, check_each_step=True, stops=stops)
        raise NonFiniteError("f returned a non-finite value during the solve")
    # Schemes with a parasitic mode (the reversible ones) check once, at the end, that it has
    # not spoilt the solution: one host synchronisation per solve.
    check_stability = getattr(solver, "check_stability", None)
    if check_stability is not None and trajectory.steps:
        check_stability(f, t, trajectory, y_previous, y, rtol=rtol, atol=atol)
    return outputs, trajectory


def _emit_outputs(
    solver, t, times, direction, record, t_tensor, h_used, y, step, t_next, next_output,
    outputs, trajectory, time_grad,
) -> int:
    """Read every output time inside (t_n, t_{n+1}] from the step just accepted.

    Only the step's anchored end is read as y_{n+1} itself; an output that merely coincides
    with a grid point is read from the interpolant (θ ≈ 1), so its time derivative is right.
    """
    while next_output < len(times) and _reached(times[next_output], t_next, record.h,
                                                direction):
        i = next_output
        if i == record.end_anchor:
            outputs[i] = solver.observe(step.y)
            trajectory.outputs.append(OutputRecord(i, record.index, 1.0, at_step_end=True))
        else:
            theta_value = (times[i] - record.t) / record.h
            output = OutputRecord(i, record.index, theta_value)
            theta = trajectory.theta(t, output, t_tensor, h_used) if time_grad else theta_value
            outputs[i] = solver.interpolate(y, h_used, step.dense, theta)
            trajectory.outputs.append(output)
        next_output += 1
    return next_output


def _reached(time: float, t_next: float, h: float, direction: float) -> bool:
    """Whether the step of size h ending at t_next reaches the output time `time` (to a
    relative 1e-12: `_emit_outputs` reads it from that step)."""
    return direction * (time - t_next) <= 1e-12 * max(abs(t_next), abs(h))


def _steps_with_inside_outputs(times: list[float], plan: list, direction: float) -> list[int]:
    """The steps of a fixed plan that `_emit_outputs` will read an output inside of (from the
    dense output), found with the loop's own float arithmetic for t_n."""
    found, t_n, next_output = [], times[0], 1
    for n, (h, end_anchor, _, _) in enumerate(plan):
        t_next = t_n + h if end_anchor is None else times[end_anchor]
        while next_output < len(times) and _reached(times[next_output], t_next, h, direction):
            if next_output != end_anchor and (not found or found[-1] != n):
                found.append(n)
            next_output += 1
        t_n = times[end_anchor] if end_anchor is not None else t_n + h
    return found


def fixed_step_count(t: Tensor, step_size: float | None, stops: Sequence[int] = ()) -> int:
    """The number of steps a fixed-step solve over the times t takes (known before it runs)."""
    times = [float(v) for v in t.detach().cpu().tolist()]
    if len(times) < 2:
        return 0
    if isinstance(step_size, FixedGrid):
        return len(step_size.times) - 1
    if step_size is None:
        return len(times) - 1
    bounds = _segments(len(times), stops)
    return sum(_fixed_step_total([times[a], times[b]], step_size) for a, b in bounds)


def _segments(n_times: int, stops: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) output indices of the stretches between consecutive stops (and the ends)."""
    marks = [0] + sorted({int(i) for i in stops if 0 < int(i) < n_times - 1}) + [n_times - 1]
    return list(zip(marks[:-1], marks[1:]))


def _fixed_step_total(times: list[float], step_size: float | None) -> int:
    """The number of steps of `_fixed_plan`, from two floats (no plan built)."""
    if step_size is None:
        return len(times) - 1
    span = abs(times[-1] - times[0])
    return max(1, math.ceil(span / abs(float(step_size)) * (1 - 1e-12)))


def _fixed_plan(
    times: list[float], step_size: float | None, direction: float, max_steps: int | None = None,
    stops: Sequence[int] = (),
) -> list:
    """(h, end_anchor, start_anchor, start_offset) of every step of a fixed-step solve; the
    step count is checked against `max_steps` before the plan is built. With `stops`, steps of
    `step_size` restart from each stop (the last one before it clipped to land on it). A
    `FixedGrid` step size: one step per grid interval (`_grid_plan`)."""
    if isinstance(step_size, FixedGrid):
        return _grid_plan(times, step_size, direction, max_steps)
    bounds = _segments(len(times), stops) if step_size is not None else [(0, len(times) - 1)]
    if len(bounds) > 1:
        n = sum(_fixed_step_total([times[a], times[b]], step_size) for a, b in bounds)
        if max_steps is not None and n > max_steps:
            raise MaxStepsExceededError(
                f"a fixed-step solve from {times[0]:.10g} to {times[-1]:.10g} with step_size="
                f"{step_size!r} and {len(bounds) - 1} stop(s) needs {n} steps, more than "
                f"max_steps={max_steps}; raise max_steps or take a larger step_size"
            )
        plan = []
        for a, b in bounds:
            for h, end, _, offset in _fixed_plan([times[a], times[b]], step_size, direction):
                plan.append((h, None if end is None else b, a, offset))
        return plan
    n = _fixed_step_total(times, step_size)
    if max_steps is not None and n > max_steps:
        raise MaxStepsExceededError(
            f"a fixed-step solve from {times[0]:.10g} to {times[-1]:.10g} with step_size="
            f"{step_size!r} needs {n} steps, more than max_steps={max_steps}; raise max_steps "
            "or take a larger step_size"
        )
    if step_size is None:
        return [(times[i + 1] - times[i], i + 1, i, 0.0) for i in range(len(times) - 1)]
    step = abs(float(step_size))
    plan = [(direction * step, None, 0, direction * step * k) for k in range(n - 1)]
    last_offset = direction * step * (n - 1)
    plan.append((times[-1] - (times[0] + last_offset), len(times) - 1, 0, last_offset))
    return plan


def _grid_plan(times: list[float], grid: FixedGrid, direction: float,
               max_steps: int | None) -> list:
    """The plan of one step per interval of `grid` (the API checked that it runs from t[0] to
    t[-1], strictly monotonic, in t's dtype). A step ending on an output time lands on it; a
    step starts at the last output time at or before it plus a constant offset."""
    points = grid.times
    if points[0] != times[0] or points[-1] != times[-1]:
        raise ValueError(f"{grid!r} does not run from t[0] to t[-1]")
    n = len(points) - 1
    if max_steps is not None and n > max_steps:
        raise MaxStepsExceededError(
            f"the grid of grid_constructor has {n} steps, more than max_steps={max_steps}; "
            "raise max_steps or build a coarser grid"
        )
    index = {v: i for i, v in enumerate(times)}
    plan, anchor = [], 0
    for start, end in zip(points[:-1], points[1:]):
        while anchor + 1 < len(times) and direction * (times[anchor + 1] - start) <= 0:
            anchor += 1
        end_anchor = index.get(end)
        h = end - start if end_anchor is None else times[end_anchor] - start
        plan.append((h, end_anchor, anchor, start - times[anchor]))
    return plan


def stage_time_table(
    times: list[float], plan: list, nodes: Sequence[float], like: Tensor
) -> Tensor:
    """The time of every stage of a fixed-step plan, (N, s), in `like`'s dtype and on its device.

    Row n, column i is bit for bit what the per-step scalar ops give: t_n = t[start_anchor] +
    start_offset, then t_n + c_i h_n (a Python float product), each a 0-dim tensor plus a
    Python float, which rounds the float to the dtype and adds in the dtype (_TABLE_DTYPES).
    Here the same roundings run element-wise in NumPy on the host: t[a] (exact in `times`),
    the offsets and the products c_i h_n (float64, as in Python) rounded to the dtype, then the
    two adds in the dtype (IEEE adds, the same on any device); the table reaches t's device in
    one copy. Column 0 is t_n itself (t_n + 0.0 would turn −0.0 into +0.0).
    """
    values = np.empty((len(plan), 2 + len(nodes)))  # float64: Python floats and their products
    values[:, 0] = np.asarray(times)[[step[2] for step in plan]]
    values[:, 1] = [step[3] for step in plan]
    values[:, 2:] = np.multiply.outer([step[0] for step in plan], nodes)
    values = values.astype(_TABLE_DTYPES[like.dtype])
    base = values[:, 0] + values[:, 1]
    table = base[:, None] + values[:, 2:]
    table[:, 0] = base
    return torch.from_numpy(table).to(like.device)


class StageTimes(tuple):
    """Row `row` of the stage-time `table` as a tuple of 0-dim views (what a solver that
    `takes_stage_times` reads), which says where it comes from (compile=True's runs)."""

    table: Tensor
    row: int


class _StageTimeRows:
    """Row n of a stage-time table as a tuple of 0-dim views, which cost no kernel: one unbind
    makes the views of `block` rows, ~0.6 µs each on the host (CPU, torch 2.13) against ~1.2 µs
    for an indexing view and ~4 µs for each scalar op they replace (benchmarks/RESULTS.md §1)."""

    def __init__(self, table: Tensor, block: int = 64):
        self.table, self.block, self.stages = table, block, table.shape[1]
        self.start, self.views = -block, ()

    def __getitem__(self, n: int) -> StageTimes:
        if not self.start <= n < self.start + self.block:
            self.start = n - n % self.block
            self.views = self.table[self.start:self.start + self.block].reshape(-1).unbind()
        k = (n - self.start) * self.stages
        row = StageTimes(self.views[k:k + self.stages])
        row.table, row.row = self.table, n
        return row


def _max_steps_message(
    max_steps: int, t_n: float, times: list[float], recent: deque[float], solver: Solver
) -> str:
    message = (
        f"max_steps={max_steps} exceeded at t={t_n:.10g} while integrating from {times[0]:.10g} "
        f"to {times[-1]:.10g}; raise max_steps or loosen rtol/atol"
    )
    span = abs(times[-1] - times[0])
    median = sorted(recent)[len(recent) // 2] if recent else 0.0
    hint = getattr(solver, "stability_hint", None)  # reversible schemes: the parasitic mode
    if hint is not None and recent:
        message += "; " + hint(median)
    elif recent and median < 1e-4 * span:
        message += (
            f"; the steps collapsed to a median of {median:.3e}, {span / median:.1e} times "
            "shorter than the interval: unless a low-order method at a tight tolerance explains "
            "it, the problem looks stiff; try an implicit method such as method='kvaerno5', "
            "'kvaerno3', 'implicit_euler' or 'crank_nicolson'"
        )
    return message


def replay_rejected(
    solver: Solver, f: VectorField, t_n: Tensor, record: StepRecord, y: Tensor, carry
):
    """The carry that the accepted attempt of step `record` started from: `carry` (the one
    step n − 1 handed on) passed again through the attempts the loop rejected at t_n, with
    the loop's retry rule. Without rejections, or for a solver whose retry carry is the one
    it was given (`retry_keeps_carry`: a compiled explicit step), this is `carry` itself."""
    if getattr(solver, "retry_keeps_carry", False):
        return carry
    for h in record.rejected:
        try:
            attempt = solver.step(f, t_n, h, y, carry)
        except StepRejected as rejection:
            retry = rejection.retry_carry
        else:
            retry = attempt.retry_carry
        carry = retry if retry is not None else carry
    return carry
