"""solve's `step_t` and `jump_t`: times inside the interval where steps must end.

Both are merged into the output times, so the loop records a landing step as it records the
last one (h_n = t[stop] − t_n, loop.StepRecord.end_anchor) and every gradient method replays it
exactly. A `step_t` is a stop of one solve: the step sequence, the FSAL stage and the
controller carry on through it. At a `jump_t` (a discontinuity of f in t) the solve is split:
each piece runs as its own solve of the gradient method, from the last piece's end state, with
f evaluated one ulp inside the piece at a jump end (torchdiffeq's Perturb.PREV/NEXT), so no
step and no stage straddles or samples the far side of the jump; the pieces are chained by
autograd, so the gradient through them is each method's own, exact where it is exact. The next
piece's first step is the controller's proposal at the end of the last (as torchdiffeq carries
its step size across a jump).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from .errors import InvalidInputError
from .problem import Problem

# The names of solve's options read here (api.LOOP_OPTIONS).
STEP_TIME_OPTIONS = ("step_t", "jump_t")
# The key under which the loop hands back its last step-size proposal when asked (see
# loop.integrate); popped here, never left in the user's stats.
NEXT_STEP_KEY = "_next_step"


def read_times(value, name: str, t: Tensor) -> list[float]:
    """The values of step_t or jump_t (a 1-D tensor or a sequence of numbers), rounded to t's
    dtype, that lie strictly inside the integration interval (others are never reached)."""
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise InvalidInputError(
                f"{name} requires grad: the times where steps end are constants of the solve; "
                f"pass {name}.detach()"
            )
        values = value.detach().reshape(-1)
    else:
        try:
            values = torch.as_tensor(list(value), dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInputError(
                f"{name} must be a 1-D tensor or a sequence of numbers, got {value!r}"
            ) from None
    if not values.is_floating_point():
        values = values.double()
    values = values.to("cpu", t.dtype)
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError(f"{name} holds non-finite values")
    t0, t_end = float(t[0].detach()), float(t[-1].detach())
    direction = 1.0 if t_end > t0 else -1.0
    kept = [v for v in values.tolist() if direction * (v - t0) > 0 and direction * (t_end - v) > 0]
    if len(set(kept)) != len(kept):
        raise InvalidInputError(f"{name} has repeated values: give each time once")
    return kept


def solve_through(problem: Problem, solve: Callable[[Problem], Tensor], step_t: list[float],
                  jump_t: list[float]) -> Tensor:
    """`solve(problem)` with steps ending on every step_t and jump_t (see the module)."""
    if set(step_t) & set(jump_t):
        raise InvalidInputError(
            "step_t and jump_t share values: a time is either a step boundary or a jump"
        )
    t = problem.t
    times = t.detach().cpu().tolist()
    direction = 1.0 if times[-1] > times[0] else -1.0
    marks = [v for v in step_t + jump_t if v not in set(times)]
    every = times + marks
    order = sorted(range(len(every)), key=lambda k: direction * every[k])
    constants = torch.tensor(marks, dtype=t.dtype, device=t.device)
    merged = torch.cat([t, constants])[torch.tensor(order, device=t.device)]
    position = {k: p for p, k in enumerate(order)}
    keep = [position[i] for i in range(len(times))]
    value_at = [every[k] for k in order]
    index_of = {v: p for p, v in enumerate(value_at)}
    stops = sorted(index_of[v] for v in step_t)
    jumps = sorted(index_of[v] for v in jump_t)

    bounds = [0] + jumps + [len(merged) - 1]
    stats, totals = problem.stats, {"n_steps": 0, "n_accepted": 0, "n_rejected": 0}
    pieces, y, step_size, kept_bytes = [], problem.y0, problem.step_size, 0
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece_t = merged[a:b + 1]
        f = OneSidedField(problem.f, piece_t, start_jump=k > 0, end_jump=b != bounds[-1])
        piece = replace(problem, f=f, y0=y, t=piece_t, step_size=step_size,
                        stops=tuple(p - a for p in stops if a < p < b))
        if problem.adaptive:
            stats[NEXT_STEP_KEY] = None
        stats.pop("checkpoint_bytes", None)
        ys = solve(piece)
        for key in totals:
            totals[key] += stats.get(key, 0)
        # every piece's checkpoints live until the backward pass: their bytes add up (a
        # method that reports none, e.g. direct without count_graph_bytes, stays None)
        piece_bytes = stats.get("checkpoint_bytes", 0)
        kept_bytes = None if piece_bytes is None or kept_bytes is None \
            else kept_bytes + piece_bytes
        proposal = stats.pop(NEXT_STEP_KEY, None)
        if problem.adaptive and proposal is not None:
            step_size = proposal
        pieces.append(ys if k == 0 else ys[1:])
        y = ys[-1]
    stats.update(totals, checkpoint_bytes=kept_bytes)
    stats["n_jump_pieces"] = len(pieces)
    return torch.cat(pieces)[torch.tensor(keep, device=merged.device)]


class OneSidedField:
    """f on one piece [a, b] of the interval: at an end that is a jump, a time at or beyond it
    is moved one ulp inside the piece (torchdiffeq's Perturb: f(a⁺, y), f(b⁻, y)), so a stage
    at t_n + c·h that rounds onto or past the jump still sees this piece's side. The move is
    invisible to the time gradient (t + (t' − t).detach())."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], piece_t: Tensor, *,
                 start_jump: bool, end_jump: bool):
        self.f = f
        start, end = piece_t[0].detach(), piece_t[-1].detach()
        self.increasing = bool(end > start)
        inner_start = torch.nextafter(start, end) if start_jump else None
        inner_end = torch.nextafter(end, start) if end_jump else None
        self.low, self.high = (inner_start, inner_end) if self.increasing else (
            inner_end, inner_start)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        inside = t.detach()
        if self.low is not None:
            inside = torch.maximum(inside, self.low)
        if self.high is not None:
            inside = torch.minimum(inside, self.high)
        return self.f(t + (inside - t.detach()), y)
