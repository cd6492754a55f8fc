"""The per-sample time loop: a batch of independent ODEs, each with its own steps.

Sample b of y0 (its leading index) advances with its own t_n, h_n, error estimate (the RMS over
its own components), accept/reject decision and PI-controller state, exactly as
`loop.integrate` would advance it alone: the same initial step (HNW I, II.4), controller,
clipping of the last step onto its end time and dense output at its own output times. Each
iteration is one masked step of the whole batch: f is called on every sample, and
`torch.where` keeps the results of the samples whose step was accepted; finished samples step
by h = 0 and are left as they are.

The step-size control runs on the host: each sample's t_n, h_n, offset, controller state,
counters and masks are float64 / bool NumPy arrays of shape (batch,) (float64 as the shared
loop's Python floats, so each sample takes its lone solve's steps), updated with a few dozen
NumPy operations per step instead of ~150 small tensor operations on y's device. The device
receives what the step needs (the products h · a_ij, h · b_j, h · e_j, h · c_i and the offsets,
rounded to y's dtype as the lone solve rounds h · a; which samples were accepted; the dense-output
weights) by non-blocking host-to-device copies; it sends back one (2, batch) tensor per
step, each sample's error ratio and whether its first stage is finite, read by one `.tolist()`:
the one host synchronisation per iteration, for the whole batch. Outputs: per_sample_outputs.py.

Under autograd, an iteration where some sample's attempt overflowed is redone with h = 0 for
those samples, so that no inf/nan enters the graph of the kept branch. When every sample's step
is accepted (none finished, none rejected), y_{n+1} and the carried stage are taken as they
are, without a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .control import PIController, StepControl
from .errors import MaxStepsExceededError, NonFiniteError, StepSizeUnderflowError
from .per_sample_control import clamp, initial_step_sizes, propose, sample_scaled_error
from .per_sample_outputs import (
    OutputReads,
    dense_reads,
    differentiable_weights,
    host_weights,
)
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

    Every coefficient the state arithmetic multiplies by h (a_ij, b_j, e_j) is an entry of
    `values`; the terms name their entry, so one product h · values per step serves them all,
    and one product h · c the stage times (c[i] = i names node c_i).
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
        self.c = list(range(self.stages))
        self.values64 = torch.tensor(values, dtype=torch.float64, device=like.device)
        self.values = self.values64.to(like.dtype)
        self.nodes64 = torch.tensor(tab.c, dtype=torch.float64, device=like.device)
        self.nodes = self.nodes64.to(like.dtype)
        dense = np.asarray(tab.dense, dtype=np.float64)  # (s, degree)
        self.dense64 = torch.from_numpy(dense.T.copy()).to(like.device)  # (degree, s)
        self.dense = self.dense64.to(like.dtype)
        self.dense_stages = [j for j in range(tab.stages) if dense[j].any()]
        self.exponents = torch.arange(1, dense.shape[1] + 1, dtype=torch.float64,
                                      device=like.device)  # θ^k, k = 1 … degree
        # the same on the host (the loop's float64 NumPy control): dense weights of the
        # stages that have any, (degree, stages)
        self.values_np = np.array(values)
        self.coefficients_np = np.concatenate([values, np.asarray(tab.c, dtype=np.float64)])
        self.exponents_np = np.arange(1, dense.shape[1] + 1, dtype=np.float64)
        self.dense_np = dense.T[:, self.dense_stages].copy()

    def scaled(self, h: Tensor, h_step: Tensor, time_grad: bool, view: tuple[int, ...]):
        """h · value for every coefficient, per sample: in float64 then rounded to y's dtype
        (as the shared loop's Python float h·a is), or, when times are differentiated, the
        differentiable h_step · value. Returns (for the state: shape `view`, h · c_i for the stage
        times: (batch,))."""
        if time_grad:
            state = self.values[:, None] * h_step[None, :]
            nodes = self.nodes[:, None] * h_step[None, :]
        else:
            state = (self.values64[:, None] * h[None, :]).to(h_step.dtype)
            nodes = (self.nodes64[:, None] * h[None, :]).to(h_step.dtype)
        return state.reshape(len(self.values64), *view).unbind(0), nodes.unbind(0)

    def host_scaled(self, h: np.ndarray, dtype: torch.dtype, view: tuple[int, ...], device):
        """`scaled` from the host's float64 h: the products in float64 NumPy, one upload, then
        rounded to y's dtype on its device."""
        products = torch.from_numpy(self.coefficients_np[:, None] * h).to(
            device, non_blocking=True).to(dtype)
        n = len(self.values_np)
        return products[:n].reshape(n, *view).unbind(0), products[n:].unbind(0)


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
    td = times.detach().double().cpu().numpy()  # the times on the host, float64
    t_start, t_end = td[:, 0], td[:, -1]
    direction = np.where(t_end > t_start, 1.0, -1.0)
    first_time = times[:, 0] if time_grad else times[:, 0].detach()

    def upload(array: np.ndarray) -> Tensor:
        """Host -> y's device as a non-blocking copy (safe: the host arrays it reads are never
        written again, every update makes a new array). Not a read back from the device."""
        return torch.from_numpy(array).to(device, non_blocking=True)

    k1 = f(first_time, y0)  # the first stage of the first step
    nfe = np.ones(batch, dtype=np.int64)
    if recorder is not None:
        recorder.start(y0, k1)
    if step_size is None:
        with torch.no_grad():
            h = initial_step_sizes(f, times[:, 0].detach(), y0.detach(), k1.detach(),
                                   upload(direction), solver.order, rtol, atol)
        h = np.array(h.tolist(), dtype=np.float64)  # a host read before the loop
        nfe += 1
    else:
        h = direction * abs(float(step_size))
    h = clamp(control, h)

    t_n, offset = t_start.copy(), np.zeros(batch)
    previous = np.ones(batch)  # the controller's ε_{n−1}
    done = np.zeros(batch, dtype=bool)
    stale = done.copy()  # non-FSAL: k1 is not f(t_n, y_n) after an accepted step
    nonfinite = np.zeros(batch, dtype=np.int64)
    n_steps, n_accepted, n_rejected = nonfinite.copy(), nonfinite.copy(), nonfinite.copy()
    next_output = np.ones(batch, dtype=np.int64)
    columns = np.arange(n_times)
    reads = OutputReads(y0, n_times)
    y = y0
    t_end_abs, t_first = np.abs(t_end), times[:, 0].detach()
    need_fresh = False
    while True:
        active = ~done
        # Land on the end time when the remainder would be below the resolution of t.
        h_wanted = h
        t_n_abs = np.abs(t_n)
        resolution = 8 * eps * np.maximum(t_end_abs, t_n_abs)
        reach = np.maximum(1e-12 * np.maximum(t_end_abs, np.abs(h)), resolution)
        lands = active & (direction * (t_n + h - t_end) >= -reach)
        h = np.where(lands, t_end - t_n, np.where(active, h, 0.0))
        underflow = active & (np.abs(h) <= 4 * eps * np.maximum(t_n_abs, 1e-300))

        offset_step = upload(offset).to(dtype)
        if time_grad:
            t_step = times[:, 0] + offset_step
            h_step = torch.where(upload(lands), times[:, -1] - t_step, upload(h).to(dtype))
        else:
            t_step, h_step = t_first + offset_step, None
        if need_fresh:
            k1 = torch.where(col(upload(stale)), f(t_step, y), k1)
            nfe += active & stale
        scaled = tab.host_scaled(h, dtype, view, device) if h_step is None else tab.scaled(
            None, h_step, True, view)
        ks, y_stage = _stages(f, tab, t_step, scaled, y, k1)
        nfe += active * (tab.stages - 1)
        y_next = y_stage if tab.fsal else _combine(y, tab.b, ks, scaled[0])
        error = _combine(None, tab.e, ks, scaled[0])
        ratio = sample_scaled_error(error.detach(), y.detach(), y_next.detach(), rtol, atol)
        first_finite = torch.isfinite(k1.detach()).reshape(batch, -1).all(dim=1)
        ratio, first_finite = np.array(  # the one host synchronisation of the step
            torch.stack([ratio, first_finite.double()]).tolist(), dtype=np.float64)
        first_finite = first_finite > 0

        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            finite = np.isfinite(ratio)
            retried = nonfinite  # non-finite attempts before this one (names an underflow's cause)
            nonfinite = np.where(active & ~finite, nonfinite + 1, np.where(active, 0, nonfinite))
            fatal = active & ~finite & ((nonfinite > _MAX_NONFINITE_RETRIES) | ~first_finite)
            forced = np.minimum(np.abs(h), np.abs(h_wanted)) <= control.min_step
            if control.min_step == 0:  # StepControl.forces_acceptance: only with min_step > 0
                forced = np.zeros_like(forced)
            accepted = active & finite & ((ratio <= 1.0) | forced)
            safe_ratio = np.where(finite, ratio, 1.0)
            h_proposed, previous_next = propose(controller, h, safe_ratio, accepted, previous)
            h_next = clamp(control, np.where(finite, h_proposed, h * controller.min_factor))
        previous = np.where(active, previous_next, previous)

        t_next = np.where(lands, t_end, t_n + h)
        tol = 1e-12 * np.maximum(np.abs(t_next), np.abs(h))
        passed = ((columns >= next_output[:, None]) & accepted[:, None]
                  & (direction[:, None] * (td - t_next[:, None]) <= tol[:, None]))
        done_next = done | (accepted & lands)
        n_steps = n_steps + active
        over = ~done_next & (n_steps >= max_steps)
        failed = underflow | fatal | over
        stale_next = stale if tab.fsal else np.where(active, accepted, stale)
        trial_nonfinite = active & ~finite
        if failed.any():
            failures = (underflow, fatal, over, retried, t_n, h)
            raise_first_failure(*(torch.from_numpy(a) for a in failures), max_steps)
        if trial_nonfinite.any() and torch.is_grad_enabled():
            # Redo the step with h = 0 for the samples whose attempt overflowed (rejected):
            # their inf/nan would otherwise turn the zero gradient of the discarded branch
            # into nan (0 · inf) through f's derivative. The other samples get the same values.
            h = np.where(trial_nonfinite, 0.0, h)
            if h_step is None:
                scaled = tab.host_scaled(h, dtype, view, device)
            else:
                h_step = torch.where(upload(trial_nonfinite), 0.0, h_step)
                scaled = tab.scaled(None, h_step, True, view)
            ks, y_stage = _stages(f, tab, t_step, scaled, y, k1)
            y_next = y_stage if tab.fsal else _combine(y, tab.b, ks, scaled[0])

        y_old, t_old = y, t_n
        if accepted.all():  # no masking needed (and none to differentiate)
            y, k1 = y_next, ks[-1] if tab.fsal else k1
        else:
            kept = col(upload(accepted))
            y = torch.where(kept, y_next, y)
            if tab.fsal:
                k1 = torch.where(kept, ks[-1], k1)
        if recorder is not None:
            recorder.step(*(torch.tensor(a, device=device) for a in (
                t_n, offset, h, lands, accepted, trial_nonfinite, stale)), need_fresh,
                y, k1, int(accepted.sum()))
        offset = np.where(accepted, offset + h, offset)
        t_n = np.where(accepted, t_next, t_n)
        done, stale = done_next, stale_next
        n_accepted = n_accepted + accepted
        n_rejected = n_rejected + (active & ~accepted)
        stats.iterations += 1
        need_fresh = not tab.fsal and bool((stale_next & ~done_next).any())

        counts = passed.sum(axis=1)  # the outputs inside (t_n, t_{n+1}], all read at once
        width = int(counts.max())
        if width:
            index, emit = reads.slots(next_output, counts, width)
            if time_grad:
                weights = differentiable_weights(tab, upload(index), upload(emit), times,
                                                 t_step, h_step)
            else:
                weights = upload(host_weights(tab, index, emit, td, t_old, h)).to(dtype)
            values = dense_reads(tab, weights, y_old, ks)
            last = emit & lands[:, None] & (index == n_times - 1)
            if last.any():
                values = torch.where(upload(last).reshape(*last.shape, *view[1:]),
                                     y_next.unsqueeze(1), values)
            reads.add(values, index, emit)
            next_output = next_output + counts
            if recorder is not None:
                for p in range(width):
                    recorder.emit(upload(index[:, p].copy()), upload(emit[:, p].copy()))
        if done.all():
            break
        h = np.where(active, h_next, h)
    stats.n_steps, stats.n_accepted, stats.n_rejected, stats.nfe = (
        upload(a) for a in (n_steps, n_accepted, n_rejected, nfe))
    return reads.assemble()


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


def raise_first_failure(underflow: Tensor, fatal: Tensor, over: Tensor, nonfinite: Tensor | None,
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
        if kind == "nonfinite" or (nonfinite is not None and int(nonfinite[b]) > 0):
            raise NonFiniteError(
                f"f returned a non-finite value for {where} (step size {float(h[b]):.3e})"
            )
        raise StepSizeUnderflowError(
            f"step size underflow for {where}: h={float(h[b]):.3e} is below the resolution of "
            "t; the problem may be stiff or singular there"
        )
