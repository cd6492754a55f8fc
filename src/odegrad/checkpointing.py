"""Checkpoint schedules for the discrete adjoint (ALGORITHMS.md §2). Pure Python, no tensors.

The model. The forward pass runs all N steps once and may keep the state y_n at the start of
some steps; it always keeps y_0. The backward pass reverses steps N−1, …, 0; reversing step n
needs y_n as the current state and recomputes that step's stages (one step evaluation). It
may load a kept state, recompute steps forward from it (one evaluation per step) and keep
states it passes. At no time are more than `slots` states kept (y_0 included). The cost is the
number of step evaluations of the backward pass, `Schedule.recomputed_steps`.

Binomial checkpointing (Griewank 1992; "revolve", Griewank & Walther 2000): with c snapshots,
l steps can be reversed by advancing each at most r times iff l ≤ β(c, r) = C(c + r, c), and
the least number of advances is t(l, c) = r·l − β(c + 1, r − 1), r minimal. Since the forward
sweep here may leave snapshots but not the state y_{N−1} in hand, the optimum of the model
above is t(N + 1, c), met by `offline_positions` + `reverse_segments`.

When N is not known in advance (adaptive steps), `OnlineCheckpoints` keeps at most c states
while the forward pass runs (dynamic checkpointing with levels, Wang, Moin & Iaccarino 2009);
the backward pass then reverses the segments between kept states with offline schedules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

__all__ = [
    "Forward", "Save", "Load", "Delete", "Reverse", "Action", "Schedule", "beta",
    "repetitions", "revolve_advances", "optimal_recomputations", "offline_positions",
    "reverse_segments", "OnlineCheckpoints",
]


@dataclass(frozen=True)
class Forward:
    """Recompute steps n0, …, n1 − 1 from the current state (at n0); it is then at n1."""

    n0: int
    n1: int


@dataclass(frozen=True)
class Save:
    """Keep the current state (at n)."""

    n: int


@dataclass(frozen=True)
class Load:
    """Make the kept state at n the current state."""

    n: int


@dataclass(frozen=True)
class Delete:
    """Drop the kept state at n."""

    n: int


@dataclass(frozen=True)
class Reverse:
    """Recompute step n's stages from the current state (at n) and pull the adjoint through it."""

    n: int


Action = Forward | Save | Load | Delete | Reverse


@dataclass
class Schedule:
    """The backward pass's actions, with its cost in step evaluations."""

    actions: list[Action] = field(default_factory=list)

    @property
    def recomputed_steps(self) -> int:
        return sum(
            a.n1 - a.n0 if isinstance(a, Forward) else 1
            for a in self.actions if isinstance(a, (Forward, Reverse))
        )


def beta(c: int, r: int) -> int:
    """β(c, r) = C(c + r, c): the most steps c snapshots reverse with r advances per step."""
    return comb(c + r, c) if r >= 0 else 0


def repetitions(l: int, c: int) -> int:
    """The least r with β(c, r) ≥ l."""
    r = 0
    while beta(c, r) < l:
        r += 1
    return r


def revolve_advances(l: int, c: int) -> int:
    """t(l, c) = r·l − β(c + 1, r − 1): revolve's least number of advances (Griewank 1992)."""
    if l <= 1:
        return 0
    r = repetitions(l, c)
    return r * l - beta(c + 1, r - 1)


def optimal_recomputations(n_steps: int, slots: int) -> int:
    """The least number of backward step evaluations in this module's model: t(N + 1, c)."""
    return revolve_advances(n_steps + 1, slots)


def _split(l: int, c: int) -> int:
    """An optimal first snapshot position m of revolve for l steps, c ≥ 2 snapshots.

    t(l, c) = min_m [m + t(m, c) + t(l − m, c − 1)] is attained exactly for
    max(β(c, r−2), l − β(c−1, r)) ≤ m ≤ min(β(c, r−1), l − β(c−1, r−1)); the largest is taken.
    """
    r = repetitions(l, c)
    return max(1, min(beta(c, r - 1), l - beta(c - 1, r - 1), l - 1))


def _revolve(a: int, b: int, c: int, out: list[Action]) -> None:
    """Reverse steps b − 1, …, a given the kept state at a and c slots (a's included)."""
    while b - a > 1 and c > 1:
        m = _split(b - a, c)
        out += [Load(a), Forward(a, a + m), Save(a + m)]
        _revolve(a + m, b, c - 1, out)
        out.append(Delete(a + m))
        b = a + m
    for n in range(b - 1, a - 1, -1):  # one slot (or one step): advance from a every time
        out.append(Load(a))
        if n > a:
            out.append(Forward(a, n))
        out.append(Reverse(n))


def offline_positions(n_steps: int, slots: int) -> list[int]:
    """The states the forward pass keeps when N is known in advance (the first revolve sweep).

    Position p_{j+1} = p_j + m with m an optimal revolve split of l + 1 steps (l = N − p_j) with
    c − j snapshots; reversing the segments then costs t(N + 1, c) in total.
    """
    if slots < 1:
        raise ValueError(f"a schedule needs at least one slot, got {slots}")
    positions, p, c = [0], 0, slots
    while n_steps - p > 1 and c > 1:
        p += min(_split(n_steps - p + 1, c), n_steps - p - 1)
        positions.append(p)
        c -= 1
    return positions


def reverse_segments(positions: list[int], n_steps: int, slots: int) -> Schedule:
    """Reverse N steps given the kept states (sorted, starting at 0): each segment between kept
    states, from the last, by revolve with the slots that the states left of it do not hold."""
    if not positions or positions[0] != 0 or len(positions) > slots:
        raise ValueError(f"kept positions {positions[:8]} do not fit {slots} slots from step 0")
    out: list[Action] = []
    ends = positions[1:] + [n_steps]
    for j in range(len(positions) - 1, -1, -1):
        _revolve(positions[j], ends[j], slots - j, out)
        if j > 0:
            out.append(Delete(positions[j]))
    return Schedule(out)


class OnlineCheckpoints:
    """Keep at most `slots` states of a forward pass of unknown length (y_0 always kept).

    Dynamic checkpointing (Wang, Moin & Iaccarino 2009): a new state enters with level 0; when
    the slots are full it replaces the latest "dispensable" state (one with a higher-level
    state after it), or, if none is, the latest state, taking that state's level + 1. The kept
    states then thin out like revolve's first sweep whatever N turns out to be.
    """

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"a schedule needs at least one slot, got {slots}")
        self.slots = slots
        self.levels: dict[int, float] = {0: float("inf")}

    @property
    def positions(self) -> list[int]:
        return sorted(self.levels)

    def add(self, n: int) -> tuple[bool, int | None]:
        """State n arrives: (keep it?, the position to drop or None)."""
        if len(self.levels) < self.slots:
            self.levels[n] = 0
            return True, None
        kept = self.positions
        if len(kept) == 1:
            return False, None
        highest = -1.0
        for k in reversed(kept[1:]):
            if self.levels[k] < highest:
                del self.levels[k]
                self.levels[n] = 0
                return True, k
            highest = max(highest, self.levels[k])
        last = kept[-1]
        level = self.levels.pop(last)
        self.levels[n] = level + 1
        return True, last
