"""checkpoints=c (an int) for gradient="discrete" with per_sample=True: at most c states per sample.

The meaning is that of the shared-step discrete adjoint (gradients/discrete.py): at most c
states kept, y_0 included, the rest recomputed from the nearest kept one in the backward
sweep. Here a kept state is the carry of the whole batch at the start of a masked step
(per_sample_gradients.py), one row y_n per sample, so each sample holds at most c of its own
states, the bound its lone solve with checkpoints=c has; the batch holds c·batch rows.

Schedule (ALGORITHMS.md §2, checkpointing.py). The forward pass does not know the number K of
masked steps, so it keeps states by dynamic checkpointing (`OnlineCheckpoints`, Wang, Moin &
Iaccarino 2009) over the masked-step index k; its decisions depend on k alone, so they cost no
host synchronisation. The backward pass reverses the segments between kept states by revolve
(`reverse_segments`): "Forward" re-runs masked steps without a graph from a kept state,
"Reverse" replays one step under autograd and pulls the adjoint back through it
(per_sample_gradients.Sweep), as checkpoints="solution" does for every step: the first stage
K1_n = f(t_n, y_n) is re-evaluated (the carried FSAL stage, up to rounding), so a state is y_n
alone. At no time are more than c states held. The recomputation, stats["n_recomputed_steps"],
is the schedule's number of Forward steps (each a masked step of the whole batch: s
evaluations of f), 0 when c ≥ K. It is at least revolve's optimum t(K + 1, c) − K
(checkpointing.py; the offline positions, which need K in advance) and close to it: with
(K, c) = (12, 2), (100, 5), (1000, 10) the online positions cost 24, 244, 3114 recomputed
steps against the optimum's 20, 220, 2640. Each "Reverse" also replays its step once under
autograd (as "solution" does), so the backward pass evaluates f s·(K + recomputed) times.

stats: "checkpoints" (c), "checkpoint_bytes" (the peak over both passes of the kept states
plus the per-step records), "sample_checkpoint_bytes" ((batch,) int64: each sample's share of
the kept states at that peak, its rows), "n_recomputed_steps" and "nfe_backward".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checkpointing import Delete, Forward, Load, OnlineCheckpoints, Reverse, Save, reverse_segments
from .per_sample_gradients import Sweep, _Run, _Step, replay_step

__all__ = ["BudgetRecorder", "reverse_with_budget"]


class BudgetRecorder:
    """The per-step records of every masked step, and the batch state y at the start of the
    steps that `OnlineCheckpoints(slots)` keeps (step 0's always)."""

    keep_stage = False

    def __init__(self, slots: int):
        self.slots = slots
        self.online = OnlineCheckpoints(slots)
        self.kept: dict[int, Tensor] = {}
        self.steps: list[_Step] = []
        self.peak_states = 0
        self.rows = 0  # nonzero once a step is recorded (solve_discrete reads it)

    def start(self, y0: Tensor, k1: Tensor) -> None:
        self.kept[0] = y0.detach()
        self.pending = None
        self.peak_states = 1
        self.row_bytes = y0[0].numel() * y0.element_size()
        self.batch, self.device = y0.shape[0], y0.device
        self.none = torch.zeros(0, dtype=torch.long, device=y0.device)

    def step(self, t_n, offset, h, lands, accepted, zeroed, stale, fresh, y, k1,
             n_accepted: int) -> None:
        """Step k's record; y is the state after it, the start of step k + 1 if there is one."""
        k = len(self.steps)
        if k > 0:  # the state at the start of step k is now known to be needed
            keep, dropped = self.online.add(k)
            if dropped is not None:
                del self.kept[dropped]
            if keep:
                self.kept[k] = self.pending
            self.peak_states = max(self.peak_states, len(self.kept))
        self.steps.append(_Step(t_n, offset, h, lands, accepted, zeroed, stale, bool(fresh),
                                self.none))
        self.pending = y.detach()
        self.rows = 1

    def emit(self, index: Tensor, emit: Tensor) -> None:
        self.steps[-1].passes.append((index, emit))

    def finish(self) -> None:
        self.pending = None

    def nbytes(self) -> tuple[int, Tensor]:
        """(peak bytes kept: states and records, (batch,) bytes of each sample's rows)."""
        held = self.peak_states * self.row_bytes
        records = sum(s.nbytes() for s in self.steps)
        per_sample = torch.full((self.batch,), held, dtype=torch.long, device=self.device)
        return held * self.batch + records, per_sample


def reverse_with_budget(run: _Run, y0: Tensor, times: Tensor, params: list[Tensor],
                        grad_ys: Tensor, needs: tuple[bool, ...]) -> list[Tensor | None]:
    """The backward sweep under revolve over the kept states: [∂L/∂y0, ∂L/∂t, ∂L/∂θ...]."""
    rec: BudgetRecorder = run.recorder
    sweep = Sweep(run, y0, times, params, grad_ys, needs, carried=False)
    steps = rec.steps
    recomputed = 0
    if steps:
        t_plain = times.detach()
        schedule = reverse_segments(sorted(rec.kept), len(steps), rec.slots)
        kept = dict(rec.kept)  # the forward pass's states stay for a second backward pass
        current: tuple[int, Tensor] | None = None
        for action in schedule.actions:
            if isinstance(action, Load):
                current = (action.n, kept[action.n])
            elif isinstance(action, Forward):
                y = current[1]
                with torch.no_grad():
                    for m in range(action.n0, action.n1):
                        y, _, _ = replay_step(sweep.f, sweep.tab, steps[m], y, None, t_plain,
                                              False, outputs=False)
                recomputed += action.n1 - action.n0
                current = (action.n1, y)
            elif isinstance(action, Save):
                kept[current[0]] = current[1]
                rec.peak_states = max(rec.peak_states, len(kept))
            elif isinstance(action, Delete):
                del kept[action.n]
            elif isinstance(action, Reverse):
                n, y = current
                assert n == action.n, (n, action.n)
                sweep.reverse(steps[action.n], y, None)
                current = None
        total, per_sample = rec.nbytes()
    else:  # a single output time: nothing was recorded
        total, per_sample = 0, torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
    run.stats.update(n_recomputed_steps=recomputed, checkpoint_bytes=total,
                     sample_checkpoint_bytes=per_sample)
    return sweep.finish()
