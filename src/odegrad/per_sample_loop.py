"""The per-sample time loop: a batch of independent ODEs, each with its own steps.

Sample b of y0 (its leading index) advances with its own t_n, h_n, error estimate (the RMS over
its own components), accept/reject decision and PI-controller state, exactly as
`loop.integrate` would advance it alone: the same initial step (HNW I, II.4), controller,
clipping of the last step onto its end time and dense output at its own output times. Each
iteration is one masked step of the whole batch: f is called on every sample, and
`torch.where` keeps the results of the samples whose step was accepted; finished samples step
by h = 0 and are left as they are. The controller's values are float64 and detached, as the
shared loop's Python floats are.

One host synchronisation per iteration, for the whole batch: a small tensor (all done?, the most
outputs one step passed, any error?, any stale first stage?, any non-finite attempt?) read by
one `.tolist()`. Under autograd, an iteration where some sample's attempt overflowed is redone
with h = 0 for those samples, so that no inf/nan enters the graph of the kept branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .control import PIController, StepControl
from .errors import MaxStepsExceededError, NonFiniteError, StepSizeUnderflowError
from .per_sample_control import clamp, initial_step_sizes, propose, sample_scaled_error
from .solvers.explicit import ExplicitRungeKutta

_MAX_NONFINITE_RETRIES = 30  # as loop.py


@dataclass
class SampleStats:
    """Per-sample counts, (batch,) int64, each what the sample's lone solve reports."""

    n_steps: Tensor
    n_accepted: Tensor
    n_rejected: Tensor
    nfe: Tensor
    iterations: int = 0  # masked batch steps (every f evaluation covers the whole batch)


class _Tableau:
    """An explicit tableau's nonzero coefficients, and its dense-output matrix as tensors.

    Every coefficient the stage arithmetic multiplies by h (a_ij, b_j, e_j, c_i) is an entry of
    `values`; the terms name their entry, so one product h · values per step serves them all.
    """

    def __init__(self, solver: ExplicitRungeKutta, like: Tensor):
        tab = solver.tableau
        self.stages, self.fsal = tab.stages, tab.fsal
        values: list[float] = []

        def terms(row) -> list[tuple[int, int]]:
            out = []
            for j, v in enumerate(row):
                if v != 0.0:
                    out.append((j, len(values)))
                    values.append(float(v))
            return out

        self.a = [terms(row[:i]) for i, row in enumerate(tab.a)]
        self.b, self.e = terms(tab.b), terms(tab.error)
        self.c = [len(values) + i for i in range(self.stages)]
        values.extend(float(c) for c in tab.c)
        self.values64 = torch.tensor(values, dtype=torch.float64, device=like.device)
        self.values = self.values64.to(like.dtype)
        dense = np.asarray(tab.dense, dtype=np.float64)  # (s, degree)
        self.dense64 = torch.from_numpy(dense.T.copy()).to(like.device)  # (degree, s)
        self.dense = self.dense64.to(like.dtype)
        self.dense_stages = [j for j in range(tab.stages) if dense[j].any()]

    def scaled(self, h: Tensor, h_step: Tensor, time_grad: bool, view: tuple[int, ...]):
        """h · value for every coefficient, per sample: in float64 then rounded to y's dtype
        (as the shared loop's Python float h·a is), or, when times are differentiated, the
        differentiable h_step · value. Returns (for the state: shape `view`, for t: (batch,))."""
        if time_grad:
            products = self.values[:, None] * h_step[None, :]
        else:
            products = (self.values64[:, None] * h[None, :]).to(h_step.dtype)
        return products.reshape(len(self.values64), *view).unbind(0), products.unbind(0)


def integrate_per_sample(
    f, y0: Tensor, times: Tensor, solver: ExplicitRungeKutta, *,
    rtol: Tensor | float, atol: Tensor | float, step_size: float | None, max_steps: int,
    control: StepControl, stats: SampleStats, recorder=None,
) -> Tensor:
    """Solve y_b' = f(t, y)_b from y0[b] at times[b, 0] and return y_b at every times[b, i].

    f(t, y) receives t of shape (batch,) (sample b at t[b]) and y of y0's shape. `times` is
    (batch, n_times), each row strictly monotonic. Returns (n_times, batch, *y0.shape[1:]).
    Differentiable by autograd (gradient="direct"), also w.r.t. `times` when it requires grad,
    with the shared loop's dependence: t_n = times[b, 0] + offset, the landing step
    h = times[b, -1] − t_n and θ = (times[b, i] − t_n)/h for an output inside a step.
    `recorder` (per_sample_gradients.StepRecorder), if given, is told the initial state and,
    after each iteration's one host read, what replays that masked step (gradient="discrete").
    """
    batch, n_times = times.shape
    dtype, device = y0.dtype, y0.device
    view = (batch,) + (1,) * (y0.dim() - 1)

    def col(v: Tensor) -> Tensor:
        return v.reshape(view)

    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    stats.n_steps, stats.n_accepted, stats.n_rejected = zeros, zeros.clone(), zeros.clone()
    stats.nfe = zeros.clone()
    if n_times == 1:
        return y0.unsqueeze(0)

    tab = _Tableau(solver, y0)
    controller = PIController(
        error_order=solver.error_order, beta1=solver.controller_coefficients[0],
        beta2=solver.controller_coefficients[1], safety=control.safety,
        min_factor=control.dfactor, max_factor=control.ifactor,
    )
    eps = torch.finfo(dtype).eps
    time_grad = times.requires_grad and torch.is_grad_enabled()
    td = times.detach().double()
    t_start, t_end = td[:, 0], td[:, -1]
    direction = torch.where(t_end > t_start, 1.0, -1.0)
    first_time = times[:, 0] if time_grad else times[:, 0].detach()

    k1 = f(first_time, y0)  # the first stage of the first step
    stats.nfe += 1
    if recorder is not None:
        recorder.start(y0, k1)
    if step_size is None:
        with torch.no_grad():
            h = initial_step_sizes(f, times[:, 0].detach(), y0.detach(), k1.detach(),
                                   direction, solver.order, rtol, atol)
        stats.nfe += 1
    else:
        h = direction * abs(float(step_size))
    h = clamp(control, h)

    y, t_n, offset = y0, t_start.clone(), torch.zeros_like(t_start)
    previous = torch.ones_like(t_start)  # the controller's ε_{n−1}
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stale = torch.zeros_like(done)  # non-FSAL: k1 is not f(t_n, y_n) after an accepted step
    nonfinite = zeros.clone()
    next_output = torch.ones_like(zeros)
    columns = torch.arange(n_times, device=device)
    outputs = y0.unsqueeze(1).expand(batch, n_times, *y0.shape[1:])  # column 0 stays y0
    need_fresh = False
    while True:
        active = ~done
        # Land on the end time when the remainder would be below the resolution of t.
        h_wanted = h
        resolution = 8 * eps * torch.maximum(t_end.abs(), t_n.abs())
        reach = torch.maximum(1e-12 * torch.maximum(t_end.abs(), h.abs()), resolution)
        lands = active & (direction * (t_n + h - t_end) >= -reach)
        h = torch.where(lands, t_end - t_n, torch.where(active, h, 0.0))
        underflow = active & (h.abs() <= 4 * eps * t_n.abs().clamp(min=1e-300))

        if time_grad:
            t_step = times[:, 0] + offset.to(dtype)
            h_step = torch.where(lands, times[:, -1] - t_step, h.to(dtype))
        else:
            t_step = times[:, 0].detach() + offset.to(dtype)
            h_step = h.to(dtype)
        if need_fresh:
            k1 = torch.where(col(stale), f(t_step, y), k1)
            stats.nfe += active & stale
        scaled = tab.scaled(h, h_step, time_grad, view)
        ks, y_stage = _stages(f, tab, t_step, scaled, y, k1)
        stats.nfe += active.long() * (tab.stages - 1)
        y_next = y_stage if tab.fsal else _combine(y, tab.b, ks, scaled[0])
        error = _combine(None, tab.e, ks, scaled[0])
        ratio = sample_scaled_error(error.detach(), y.detach(), y_next.detach(), rtol, atol)

        finite = torch.isfinite(ratio)
        retried = nonfinite  # non-finite attempts before this one (names an underflow's cause)
        nonfinite = torch.where(active & ~finite, nonfinite + 1,
                                torch.where(active, 0, nonfinite))
        first_finite = torch.isfinite(k1.detach()).reshape(batch, -1).all(dim=1)
        fatal = active & ~finite & ((nonfinite > _MAX_NONFINITE_RETRIES) | ~first_finite)
        forced = torch.minimum(h.abs(), h_wanted.abs()) <= control.min_step
        if control.min_step == 0:  # StepControl.forces_acceptance: only with min_step > 0
            forced = torch.zeros_like(forced)
        accepted = active & finite & ((ratio <= 1.0) | forced)
        safe_ratio = torch.where(finite, ratio, 1.0)
        h_proposed, previous_next = propose(controller, h, safe_ratio, accepted, previous)
        h_next = clamp(control, torch.where(finite, h_proposed, h * controller.min_factor))
        previous = torch.where(active, previous_next, previous)

        t_next = torch.where(lands, t_end, t_n + h)
        tol = 1e-12 * torch.maximum(t_next.abs(), h.abs())
        passed = ((columns >= next_output[:, None]) & accepted[:, None]
                  & (direction[:, None] * (td - t_next[:, None]) <= tol[:, None]))
        done_next = done | (accepted & lands)
        n_steps = stats.n_steps + active
        over = ~done_next & (n_steps >= max_steps)
        failed = underflow | fatal | over
        stale_next = stale if tab.fsal else torch.where(active, accepted, stale)
        trial_nonfinite = active & ~finite
        flags = torch.stack([
            done_next.all().long(), passed.sum(dim=1).max(), failed.any().long(),
            (stale_next & ~done_next).any().long(), trial_nonfinite.any().long(),
            accepted.sum(),
        ])
        (all_done, n_passed, any_failed, any_stale, any_nonfinite,
         n_accepted) = flags.tolist()  # the one sync
        if any_failed:
            _raise_first(underflow, fatal, over, retried, t_n, h, max_steps)
        if any_nonfinite and torch.is_grad_enabled():
            # Redo the step with h = 0 for the samples whose attempt overflowed (rejected):
            # their inf/nan would otherwise turn the zero gradient of the discarded branch
            # into nan (0 · inf) through f's derivative. The other samples get the same values.
            h = torch.where(trial_nonfinite, 0.0, h)
            h_step = torch.where(trial_nonfinite, 0.0, h_step)
            scaled = tab.scaled(h, h_step, time_grad, view)
            ks, y_stage = _stages(f, tab, t_step, scaled, y, k1)
            y_next = y_stage if tab.fsal else _combine(y, tab.b, ks, scaled[0])

        y_old, t_old = y, t_n
        y = torch.where(col(accepted), y_next, y)
        if tab.fsal:
            k1 = torch.where(col(accepted), ks[-1], k1)
        if recorder is not None:
            recorder.step(t_n, offset, h, lands, accepted, trial_nonfinite, stale, need_fresh,
                          y, k1, n_accepted)
        offset = torch.where(accepted, offset + h, offset)
        t_n = torch.where(accepted, t_next, t_n)
        done, stale = done_next, stale_next
        stats.n_steps = n_steps
        stats.n_accepted = stats.n_accepted + accepted
        stats.n_rejected = stats.n_rejected + (active & ~accepted)
        stats.iterations += 1
        need_fresh = not tab.fsal and bool(any_stale)

        for _ in range(n_passed):  # outputs inside (t_n, t_{n+1}], one per sample per pass
            index = next_output.clamp(max=n_times - 1)
            t_out = td.gather(1, index[:, None]).squeeze(1)
            emit = accepted & (next_output < n_times) & (direction * (t_out - t_next) <= tol)
            if time_grad:
                theta = (times.gather(1, index[:, None]).squeeze(1) - t_step) / torch.where(
                    emit, h_step, 1.0)
                weights = _powers(torch.where(emit, theta, 0.0), tab.dense.shape[0]) @ tab.dense
                coefficients = h_step[:, None] * weights
            else:
                theta = (t_out - t_old) / torch.where(emit, h, 1.0)
                weights = _powers(torch.where(emit, theta, 0.0), tab.dense.shape[0]) @ tab.dense64
                coefficients = (h[:, None] * weights).to(dtype)
            value = y_old
            for j in tab.dense_stages:
                value = torch.addcmul(value, col(coefficients[:, j]), ks[j])
            value = torch.where(col(lands & (index == n_times - 1)), y_next, value)
            slot = (columns[None, :] == index[:, None]) & emit[:, None]
            outputs = torch.where(slot.reshape(batch, n_times, *view[1:]), value.unsqueeze(1),
                                  outputs)
            next_output = next_output + emit
            if recorder is not None:
                recorder.emit(index, emit)
        if all_done:
            break
        h = torch.where(active, h_next, h)
    return outputs.movedim(1, 0)


def _powers(theta: Tensor, degree: int) -> Tensor:
    """(θ, θ², ..., θ^degree) per sample: (batch,) -> (batch, degree)."""
    return torch.stack([theta ** (k + 1) for k in range(degree)], dim=1)


def _combine(y: Tensor | None, terms, ks: list[Tensor], scaled) -> Tensor:
    """y + Σ_j (h a_j) K_j per sample over the nonzero terms (ALGORITHMS.md §1)."""
    out = y
    for j, index in terms:  # addcmul rounds as the shared loop's torch.add(out, k, alpha=h·a)
        out = ks[j] * scaled[index] if out is None else torch.addcmul(out, scaled[index], ks[j])
    return torch.zeros_like(ks[0]) if out is None else out


def _stages(f, tab: _Tableau, t: Tensor, scaled, y: Tensor, k1: Tensor):
    """K_i = f(t + c_i h, y + h Σ_{j<i} a_ij K_j) per sample; the stages and the last point."""
    for_state, for_time = scaled
    ks, y_stage = [k1], y
    for i in range(1, tab.stages):
        y_stage = _combine(y, tab.a[i], ks, for_state)
        ks.append(f(t + for_time[tab.c[i]], y_stage))
    return ks, y_stage


def _raise_first(underflow: Tensor, fatal: Tensor, over: Tensor, nonfinite: Tensor,
                 t_n: Tensor, h: Tensor, max_steps: int) -> None:
    """Raise the error of the first failed sample (several host reads: the solve ends here)."""
    for kind, mask in (("underflow", underflow), ("nonfinite", fatal), ("max_steps", over)):
        hits = mask.nonzero()
        if len(hits) == 0:
            continue
        b = int(hits[0, 0])
        where = f"sample {b} at t={float(t_n[b]):.10g}"
        if kind == "max_steps":
            raise MaxStepsExceededError(
                f"max_steps={max_steps} exceeded for {where} (per_sample=True counts each "
                "sample's steps); raise max_steps or loosen rtol/atol"
            )
        if kind == "nonfinite" or int(nonfinite[b]) > 0:
            raise NonFiniteError(
                f"f returned a non-finite value for {where} (step size {float(h[b]):.3e})"
            )
        raise StepSizeUnderflowError(
            f"step size underflow for {where}: h={float(h[b]):.3e} is below the resolution of "
            "t; the problem may be stiff or singular there"
        )
