"""gradient="discrete" with per_sample=True: the exact discrete adjoint of the masked scheme.

The forward pass runs the per-sample loop (per_sample_loop.py) without a graph and records,
for every masked step n of the batch, what replays it: each sample's t_n, offset and h_n, the
masks of the samples that land on their end time, were accepted, had a non-finite attempt or
a stale first stage, and the outputs the step emitted (which output index, which samples).
The step maps the carry (y_n, K1_n) to

    y_{n+1} = where(accepted, y_n + h_n Σ_i b_i K_i, y_n),
    K1_{n+1} = where(accepted, K_s, K1_n)                      (FSAL; else K1 = f(t_n, y_n)),
    y(t*) = y_n + h_n Σ_i b_i(θ) K_i,  θ = (t* − t_n)/h_n      (each output read in the step),

with K_i = f(t_n + c_i h_n, y_n + h_n Σ_{j<i} a_ij K_j) (ALGORITHMS.md §1). The backward pass
walks the steps in reverse and pulls (λ, μ) = (∂L/∂y_{n+1}, ∂L/∂K1_{n+1}) and the outputs'
cotangents back through one replay of the step under autograd (one `torch.autograd.grad` per
step: s evaluations of f and their VJPs), giving (λ_n, μ_n) and the step's share of ∂L/∂θ and
∂L/∂t (through t_n = t_b,0 + offset, the landing h = t_b,end − t_n and θ). So the gradient is
that of the discretisation, the one gradient="direct" gives, with each sample's step sizes and
accept/reject decisions as constants of the scheme.

`checkpoints=` (what the forward pass keeps; each sample's rows are kept only when they change,
so sample b holds 1 + its accepted steps, as if solved alone):
  "all" (default): y_n and, for FSAL schemes, the carried first stage K1_n; no recomputation.
  "solution": y_n only; the replay re-evaluates K1_n = f(t_n, y_n) (one more f per step for
      FSAL schemes: equal to the carried stage up to rounding). Non-FSAL schemes keep y_n only
      under both policies: their K1_n is f(t_n, y_n) bit for bit.
  int c: at most c states per sample, the rest recomputed by revolve in the backward pass
      (per_sample_checkpoints.py).
stats: "checkpoint_bytes" (the kept rows plus the per-step records), "sample_checkpoint_bytes"
((batch,) int64: the bytes of each sample's kept rows), "checkpoints" (the policy) and
"nfe_backward" (f calls in the backward pass, each on the whole batch).

f must be batch-independent (per_sample.py) and must not draw random numbers (the replays would
see other draws: refused), and the backward pass is not itself differentiable (no double
backward). f's buffers are restored after the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .per_sample_loop import SampleStats, _combine, _powers, _stages, _Tableau, integrate_per_sample
from .problem import restored_buffers

__all__ = ["StepRecorder", "solve_discrete", "CHECKPOINT_POLICIES"]

CHECKPOINT_POLICIES = ("all", "solution")


@dataclass
class _Step:
    """What replays one masked step: per sample (batch,) tensors, and the emitted outputs."""

    t_n: Tensor  # float64, the loop's t_n (for θ without a graph in t)
    offset: Tensor  # float64, t_n − t_b,0 as the loop accumulates it
    h: Tensor  # float64, the step taken (0 for finished samples)
    lands: Tensor
    accepted: Tensor
    zeroed: Tensor  # attempts that overflowed: replayed with h = 0, as direct redoes them
    stale: Tensor
    fresh: bool  # whether the loop re-evaluated the stale first stages this step
    row: Tensor  # int64: each sample's kept row of y_n (and K1_n)
    passes: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (output index, emit)

    def nbytes(self) -> int:
        tensors = [self.t_n, self.offset, self.h, self.lands, self.accepted, self.zeroed,
                   self.stale, self.row, *(x for p in self.passes for x in p)]
        return sum(x.numel() * x.element_size() for x in tensors)


class StepRecorder:
    """Keeps each sample's y_n (and K1_n with `keep_stage`) when it changes, and the records of
    every masked step; no host synchronisation besides the loop's own one per step."""

    def __init__(self, keep_stage: bool):
        self.keep_stage = keep_stage
        self.y_rows: list[Tensor] = []
        self.k1_rows: list[Tensor] = []
        self.steps: list[_Step] = []
        self.rows = 0

    def start(self, y0: Tensor, k1: Tensor) -> None:
        batch = y0.shape[0]
        self.y_rows.append(y0.detach())
        if self.keep_stage:
            self.k1_rows.append(k1.detach())
        self.current = torch.arange(batch, device=y0.device)
        self.sample_rows = torch.ones(batch, dtype=torch.long, device=y0.device)
        self.rows = batch

    def step(self, t_n, offset, h, lands, accepted, zeroed, stale, fresh, y, k1,
             n_accepted: int) -> None:
        """Step n's record; y and k1 are the carry after it (kept for the accepted samples)."""
        self.steps.append(_Step(t_n, offset, h, lands, accepted, zeroed, stale, bool(fresh),
                                self.current))
        if n_accepted:
            index = torch.nonzero_static(accepted, size=n_accepted).squeeze(1)
            self.y_rows.append(y.detach().index_select(0, index))
            if self.keep_stage:
                self.k1_rows.append(k1.detach().index_select(0, index))
            rank = accepted.long().cumsum(0) - 1
            self.current = torch.where(accepted, self.rows + rank, self.current)
            self.rows += n_accepted
            self.sample_rows = self.sample_rows + accepted

    def emit(self, index: Tensor, emit: Tensor) -> None:
        self.steps[-1].passes.append((index, emit))

    def finish(self) -> None:
        """Join the kept rows into one tensor each (gathered per step by the backward pass)."""
        if not self.y_rows:  # a single output time: nothing recorded
            return
        self.y_all = torch.cat(self.y_rows)
        self.k1_all = torch.cat(self.k1_rows) if self.keep_stage else None
        self.y_rows, self.k1_rows = [], []

    def nbytes(self) -> tuple[int, Tensor]:
        """(total bytes kept, (batch,) bytes of each sample's rows)."""
        row = self.y_all[0].numel() * self.y_all.element_size() * (2 if self.keep_stage else 1)
        total = self.rows * row + sum(s.nbytes() for s in self.steps)
        return total, self.sample_rows * row


class CountedCalls:
    """f counting its calls into stats[key]."""

    def __init__(self, f, stats: dict, key: str):
        self.f, self.stats, self.key = f, stats, key

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.stats[self.key] += 1
        return self.f(t, y)


def replay_step(f, tab: _Tableau, step: _Step, y: Tensor, k1: Tensor | None, times: Tensor,
                time_grad: bool, outputs: bool = True) -> tuple[Tensor, Tensor | None,
                                                                list[Tensor]]:
    """One masked step as per_sample_loop.py takes it, under whatever grad mode is on:
    (y_{n+1}, K1_{n+1} or None when K1 is re-evaluated, the outputs read in the step, none
    unless `outputs`)."""
    batch = y.shape[0]
    view = (batch,) + (1,) * (y.dim() - 1)
    dtype = y.dtype
    h = torch.where(step.zeroed, 0.0, step.h)
    if time_grad:
        t_step = times[:, 0] + step.offset.to(dtype)
        h_step = torch.where(step.lands, times[:, -1] - t_step, h.to(dtype))
        h_step = torch.where(step.zeroed, 0.0, h_step)
    else:
        t_step = times[:, 0] + step.offset.to(dtype)
        h_step = h.to(dtype)
    carried = k1 is not None
    if not carried:
        k1 = f(t_step, y)  # K1_n = f(t_n, y_n): non-FSAL, or checkpoints="solution"
    scaled = tab.scaled(h, h_step, time_grad, view)
    ks, y_stage = _stages(f, tab, t_step, scaled, y, k1)
    y_next = y_stage if tab.fsal else _combine(y, tab.b, ks, scaled[0])
    accepted = step.accepted.reshape(view)
    y_out = torch.where(accepted, y_next, y)
    k1_out = torch.where(accepted, ks[-1], k1) if carried else None
    values = []
    n_times = times.shape[1]
    td = times.detach().double()
    for index, emit in step.passes if outputs else ():
        if time_grad:
            theta = (times.gather(1, index[:, None]).squeeze(1) - t_step) / torch.where(
                emit, h_step, 1.0)
            weights = _powers(torch.where(emit, theta, 0.0), tab.dense.shape[0]) @ tab.dense
            coefficients = h_step[:, None] * weights
        else:
            t_out = td.gather(1, index[:, None]).squeeze(1)
            theta = (t_out - step.t_n) / torch.where(emit, h, 1.0)
            weights = _powers(torch.where(emit, theta, 0.0), tab.dense.shape[0]) @ tab.dense64
            coefficients = (h[:, None] * weights).to(dtype)
        value = y
        for j in tab.dense_stages:
            value = torch.addcmul(value, coefficients[:, j].reshape(view), ks[j])
        last = (step.lands & (index == n_times - 1)).reshape(view)
        values.append(torch.where(last, y_next, value))
    return y_out, k1_out, values


class _Run:
    """The forward pass's inputs and records, shared with the backward pass."""

    def __init__(self, f, raw_f, solver, loop_kwargs: dict, recorder, stats: dict,
                 sample: SampleStats, module):
        self.f, self.raw_f, self.solver, self.loop_kwargs = f, raw_f, solver, loop_kwargs
        self.recorder = recorder
        self.stats, self.sample, self.module = stats, sample, module


class _DiscretePerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, y0: Tensor, times: Tensor, *params: Tensor) -> Tensor:
        ys = integrate_per_sample(run.f, y0, times, run.solver, stats=run.sample,
                                  recorder=run.recorder, **run.loop_kwargs)
        run.recorder.finish()
        ctx.run, run.params = run, params  # f reads the params themselves: keep those objects
        ctx.save_for_backward(y0, times)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        run = ctx.run
        y0, times = ctx.saved_tensors
        params = run.params
        needs = ctx.needs_input_grad[1:]
        with restored_buffers(run.module), torch.enable_grad():
            if isinstance(run.recorder, StepRecorder):
                grads = _backward(run, y0, times, params, grad_ys, needs)
            else:
                from .per_sample_checkpoints import reverse_with_budget

                grads = reverse_with_budget(run, y0, times, params, grad_ys, needs)
        return (None, *grads)


def _backward(run: _Run, y0: Tensor, times: Tensor, params: list[Tensor], grad_ys: Tensor,
              needs: tuple[bool, ...]) -> list[Tensor | None]:
    """Reverse the recorded steps: [∂L/∂y0, ∂L/∂t, ∂L/∂θ...] (None where not needed)."""
    rec = run.recorder
    sweep = Sweep(run, y0, times, params, grad_ys, needs, carried=rec.keep_stage)
    for step in reversed(rec.steps):
        y = rec.y_all.index_select(0, step.row)
        k1 = rec.k1_all.index_select(0, step.row) if rec.keep_stage else None
        sweep.reverse(step, y, k1)
    return sweep.finish()


class Sweep:
    """The reverse sweep's cotangents: (λ, μ) = (∂L/∂y_{n+1}, ∂L/∂K1_{n+1}) of the batch, and
    the accumulated ∂L/∂t and ∂L/∂θ. `reverse` pulls them back through one masked step, given
    its y_n (and carried K1_n, or None when the replay re-evaluates it); `finish` adds the
    initial carry's share and returns [∂L/∂y0, ∂L/∂t, ∂L/∂θ...] (None where not needed)."""

    def __init__(self, run: _Run, y0: Tensor, times: Tensor, params: list[Tensor],
                 grad_ys: Tensor, needs: tuple[bool, ...], carried: bool):
        self.y0, self.grad_ys, self.needs, self.carried = y0, grad_ys, needs, carried
        batch = y0.shape[0]
        self.view = (batch,) + (1,) * (y0.dim() - 1)
        self.f = CountedCalls(run.raw_f, run.stats, "nfe_backward")
        self.time_grad = needs[1]
        self.wanted = [p for p, need in zip(params, needs[2:]) if need]
        self.lam = torch.zeros_like(y0)
        self.mu = torch.zeros_like(y0) if carried else None
        self.grad_t = torch.zeros_like(times) if self.time_grad else None
        self.grad_p = [torch.zeros_like(p) for p in self.wanted]
        self.per_sample_g = grad_ys.movedim(0, 1)  # (batch, n_times, ...)
        self.samples = torch.arange(batch, device=y0.device)
        self.tab = _Tableau(run.solver, y0)
        self.t_leaf = times.detach().requires_grad_(self.time_grad)
        self.reversed_any = False

    def reverse(self, step: _Step, y: Tensor, k1: Tensor | None) -> None:
        """(λ, μ) ← the pull-back of (λ, μ) and the step's outputs' cotangents through `step`."""
        self.reversed_any = True
        y = y.detach().requires_grad_()
        k1 = k1.detach().requires_grad_() if k1 is not None else None
        y_out, k1_out, values = replay_step(self.f, self.tab, step, y, k1, self.t_leaf,
                                            self.time_grad)
        outputs, cotangents = [y_out], [self.lam]
        if k1_out is not None:
            outputs.append(k1_out)
            cotangents.append(self.mu)
        for (index, emit), value in zip(step.passes, values):
            g = self.per_sample_g[self.samples, index]
            outputs.append(value)
            cotangents.append(torch.where(emit.reshape(self.view), g, 0.0))
        inputs = [y] + ([k1] if k1 is not None else []) + (
            [self.t_leaf] if self.time_grad else []) + self.wanted
        result = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        self.lam = _or_zero(result[0], y)
        position = 1
        if k1 is not None:
            self.mu, position = _or_zero(result[1], k1), 2
        if self.time_grad:
            self.grad_t = self.grad_t + _or_zero(result[position], self.t_leaf)
            position += 1
        self.grad_p = [acc + _or_zero(g, p)
                       for acc, g, p in zip(self.grad_p, result[position:], self.wanted)]

    def finish(self) -> list[Tensor | None]:
        lam, grad_t, grad_p, time_grad = self.lam, self.grad_t, self.grad_p, self.time_grad
        if self.carried and self.reversed_any:  # the first stage K1_0 = f(t_0, y0) of the carry
            y = self.y0.detach().requires_grad_()
            k1 = self.f(self.t_leaf[:, 0], y)
            inputs = [y] + ([self.t_leaf] if time_grad else []) + self.wanted
            result = torch.autograd.grad([k1], inputs, [self.mu], allow_unused=True)
            lam = lam + _or_zero(result[0], y)
            if time_grad:
                grad_t = grad_t + _or_zero(result[1], self.t_leaf)
            grad_p = [acc + _or_zero(g, p)
                      for acc, g, p in zip(grad_p, result[1 + time_grad:], self.wanted)]
        lam = lam + self.grad_ys[0]
        it = iter(grad_p)
        needs = self.needs
        return [lam if needs[0] else None, grad_t,
                *(next(it) if need else None for need in needs[2:])]


def _or_zero(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def solve_discrete(f, y0: Tensor, times: Tensor, solver, *, raw_f, params: tuple[Tensor, ...],
                   checkpoints: str | int, stats: dict, sample: SampleStats, module,
                   **loop_kwargs) -> Tensor:
    """The per-sample solve with the discrete adjoint as its backward pass: ys (n_times,
    batch, ...); fills stats' checkpoint and backward entries. f is the forward pass's
    (counted) field, raw_f the user's f, which the backward pass calls. An int `checkpoints`
    is a budget of states per sample (per_sample_checkpoints.py)."""
    stats["nfe_backward"] = 0
    if isinstance(checkpoints, int):
        from .per_sample_checkpoints import BudgetRecorder

        recorder = BudgetRecorder(checkpoints)
        stats["n_recomputed_steps"] = 0
    else:
        recorder = StepRecorder(checkpoints == "all" and solver.tableau.fsal)
    run = _Run(f, raw_f, solver, loop_kwargs, recorder, stats, sample, module)
    ys = _DiscretePerSample.apply(run, y0, times, *params)
    if run.recorder.rows:
        total, per_sample = run.recorder.nbytes()
    else:  # a single output time: nothing recorded
        total, per_sample = 0, torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
    stats.update(checkpoint_bytes=total, sample_checkpoint_bytes=per_sample,
                 checkpoints=checkpoints)
    return ys
