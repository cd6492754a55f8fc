"""gradient="reversible" with per_sample=True: each sample's steps undone in reverse, masked.

The schemes of gradients/reversible.py (MALI's asynchronous leapfrog, ALGORITHMS.md §5;
McCallum–Foster reversible Runge–Kutta, §6; reversible Heun, §7), each sample with its own
adaptive steps as in per_sample_loop.py: its own t_n, h_n, error estimate (RMS over its own
components), accept/reject decision and PI-controller state, and outputs read from its own
dense output at its own output times. A masked step of the batch maps the augmented state S
(rows (y, w), each of y0's shape) to

    S_{n+1} = where(accepted, Φ_h(t_n, S_n), S_n)                   (h = h_b,n per sample)

The forward pass keeps no graph: only the final state (2 d per sample) and, for every
iteration where some sample accepted a step, each sample's step size (0: no step), offset
t_n − t_b,0 and landing flag (float64/bool scalars per sample), and which outputs the step
emitted. The backward pass walks those records in reverse; for the samples with a step it
reconstructs S_n = Φ_h^{−1}(S_{n+1}) and pulls the adjoint back through the step and the
outputs read inside it (`ReversibleSolver.reverse`, the cotangents of the other samples set to
0 so that they add nothing to ∂L/∂θ); the other samples keep their state and adjoint. So the
gradient is that of the discrete scheme with each sample's accepted steps, exact up to the
round-off of the reconstruction, w.r.t. y0, the parameters and the output times.

The per-sample stepping needs h per sample: the solvers' arithmetic gets t and h of shape
(batch, 1, ..., 1), and f is handed t flattened to (batch,). Reversible Heun's fused backward
carry (one evaluation serving two steps) does not survive masking, so each step's pending VJP
is taken at once (one more F and B per step than the shared solve). McCallum–Foster's error
estimate includes its parasitic mode's growth (solvers/parasitic.py), here per sample.
The end-of-solve stability check of the shared loop (ParasiticModeCheck) is not run per sample;
the reconstruction's drift is measured per sample after the backward pass
(stats["sample_drift"], stats["drift"] its max; ReversibleDriftWarning above drift_tol).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .control import PIController, StepControl
from .errors import (
    ReversibleDriftWarning,
)
from .per_sample_control import clamp, initial_step_sizes, propose, sample_scaled_error
from .per_sample_gradients import CountedCalls
from .per_sample_loop import SampleStats, raise_first_failure
from .problem import restored_buffers
from .solvers.alf import AsynchronousLeapfrog
from .solvers.base import Step, axpy_sum
from .solvers.parasitic import _parasitic_ratio_tensor
from .solvers.reversible import LocalAdjoint, ReversibleRungeKutta, ReversibleSolver

__all__ = ["solve_reversible", "runs_reversible_per_sample", "reversible_solver"]

_MAX_NONFINITE_RETRIES = 30  # as loop.py


def runs_reversible_per_sample(solver) -> bool:
    """Reversible schemes with an error estimate and dense output (adaptive per sample)."""
    if not isinstance(solver, ReversibleSolver) or solver.error_order is None:
        return False
    if isinstance(solver, ReversibleRungeKutta):
        return solver.base.tableau.dense is not None and solver._e is not None
    return True


class _ViewField:
    """f under the solvers' arithmetic: t arrives shaped (batch, 1, ..., 1) (t + c·h per
    sample) and is passed on as (batch,); counts the calls."""

    def __init__(self, f: Callable, batch: int):
        self.f, self.batch, self.calls = f, batch, 0

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return self.f(t.reshape(self.batch), y)


def _sample_parasitic_error(state: Tensor, y_next: Tensor, z_next: Tensor, rtol, atol,
                            coupling: float) -> Tensor:
    """solvers.parasitic._parasitic_error per sample: each sample's norms and ratio."""
    with torch.no_grad():
        d1 = y_next - z_next
        batch = d1.shape[0]
        size = torch.maximum(state[0].abs(), y_next.abs())
        scaled = torch.stack([state[0] - state[1], d1, size]) / (atol + rtol * size)
        norms = torch.linalg.vector_norm(scaled.reshape(3, batch, -1), dim=2)
        norms = norms / math.sqrt(max(d1[0].numel(), 1))
        n0, n1, size_norm = norms.unbind()
        ratio = _parasitic_ratio_tensor(n0, n1, coupling, size_norm * 8 * torch.finfo(d1.dtype).eps)
        factor = (ratio / n1).nan_to_num(0.0, 0.0, 0.0)
        return d1 * factor.reshape((batch,) + (1,) * (d1.dim() - 1))


def _step(solver: ReversibleSolver, f, t: Tensor, h: Tensor, state: Tensor, carry, rtol,
          atol) -> Step:
    """One attempted step of every sample (t, h of shape (batch, 1, ...))."""
    if not isinstance(solver, ReversibleRungeKutta):
        return solver.step(f, t, h, state, carry)
    # ReversibleRungeKutta.step with the parasitic part of its estimate per sample
    y, z = state[0], state[1]
    lam = solver.coupling
    psi, ks = solver._increment(f, t, h, z, carry, solver.stages)
    y_next = lam * y + (1 - lam) * z + psi
    back, _ = solver._increment(f, t + h, -h, y_next, None, solver._n_psi)
    z_next = z - back
    error = torch.hypot(axpy_sum(None, h, solver._e, ks),
                        _sample_parasitic_error(state, y_next, z_next, rtol, atol, lam))
    return Step(y=torch.stack([y_next, z_next]), error=error, dense=ks, carry=None,
                retry_carry=ks[0])


@dataclass
class _Record:
    """One iteration where some sample accepted its step (per sample, (batch,) tensors)."""

    h: Tensor  # float64, the step taken; 0 where the sample took none
    offset: Tensor  # float64, t_n − t_b,0
    lands: Tensor  # the step landed on the sample's end time
    passes: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (output index, emit)

    def nbytes(self) -> int:
        tensors = [self.h, self.offset, self.lands, *(x for p in self.passes for x in p)]
        return sum(x.numel() * x.element_size() for x in tensors)


def _forward(f, y0: Tensor, times: Tensor, solver: ReversibleSolver, *, rtol, atol,
             step_size: float | None, max_steps: int, control: StepControl,
             stats: SampleStats, records: list[_Record]) -> tuple[Tensor, Tensor]:
    """The per-sample loop over the reversible scheme, without a graph: (outputs (n_times,
    batch, ...), the final augmented state). Mirrors per_sample_loop.integrate_per_sample."""
    batch, n_times = times.shape
    dtype, device = y0.dtype, y0.device
    view = (batch,) + (1,) * (y0.dim() - 1)
    rows = (1,) + view  # a per-sample mask over the augmented state's two rows

    def col(v: Tensor) -> Tensor:
        return v.reshape(view)

    fv = _ViewField(f, batch)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    stats.n_steps, stats.n_accepted, stats.n_rejected = zeros, zeros.clone(), zeros.clone()
    stats.nfe = zeros.clone()
    state = solver.initial_state(y0)
    td = times.detach().double()
    t0 = times[:, 0].detach()
    carry = solver.init(fv, col(t0), state)  # f(t_0, y_0) for every scheme here
    stats.nfe += 1
    first_stage = carry
    if isinstance(solver, AsynchronousLeapfrog):  # v_0 in the state instead of the carry
        state, carry = torch.stack([y0, carry]), None
    if n_times == 1:
        return y0.unsqueeze(0), state

    controller = PIController(
        error_order=solver.error_order, beta1=solver.controller_coefficients[0],
        beta2=solver.controller_coefficients[1], safety=control.safety,
        min_factor=control.dfactor, max_factor=control.ifactor,
    )
    eps = torch.finfo(dtype).eps
    t_start, t_end = td[:, 0], td[:, -1]
    direction = torch.where(t_end > t_start, 1.0, -1.0)
    if step_size is None:
        h = initial_step_sizes(f, t0, y0, first_stage, direction, solver.order, rtol, atol)
        stats.nfe += 1
    else:
        h = direction * abs(float(step_size))
    h = clamp(control, h)

    t_n, offset = t_start.clone(), torch.zeros_like(t_start)
    previous = torch.ones_like(t_start)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    nonfinite = zeros.clone()
    next_output = torch.ones_like(zeros)
    columns = torch.arange(n_times, device=device)
    outputs = y0.unsqueeze(1).expand(batch, n_times, *y0.shape[1:])
    while True:
        active = ~done
        h_wanted = h
        resolution = 8 * eps * torch.maximum(t_end.abs(), t_n.abs())
        reach = torch.maximum(1e-12 * torch.maximum(t_end.abs(), h.abs()), resolution)
        lands = active & (direction * (t_n + h - t_end) >= -reach)
        h = torch.where(lands, t_end - t_n, torch.where(active, h, 0.0))
        underflow = active & (h.abs() <= 4 * eps * t_n.abs().clamp(min=1e-300))
        t_step = col(t0 + offset.to(dtype))
        h_step = col(h.to(dtype))
        calls = fv.calls
        step = _step(solver, fv, t_step, h_step, state, carry, rtol, atol)
        stats.nfe += active.long() * (fv.calls - calls)
        ratio = sample_scaled_error(step.error, state[0], step.y[0], rtol, atol)

        finite = torch.isfinite(ratio)
        nonfinite = torch.where(active & ~finite, nonfinite + 1,
                                torch.where(active, 0, nonfinite))
        fatal = active & ~finite & (nonfinite > _MAX_NONFINITE_RETRIES)
        forced = torch.minimum(h.abs(), h_wanted.abs()) <= control.min_step
        if control.min_step == 0:
            forced = torch.zeros_like(forced)
        accepted = active & finite & ((ratio <= 1.0) | forced)
        h_proposed, previous_next = propose(controller, h, torch.where(finite, ratio, 1.0),
                                            accepted, previous)
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
        flags = torch.stack([done_next.all().long(), passed.sum(dim=1).max(),
                             failed.any().long(), accepted.any().long()])
        all_done, n_passed, any_failed, any_accepted = flags.tolist()  # the one sync
        if any_failed:
            raise_first_failure(underflow, fatal, over, None, t_n, h, max_steps)

        state_old, t_old = state, t_n
        state = torch.where(accepted.reshape(rows), step.y, state)
        carry = (None if step.carry is None or step.retry_carry is None
                 else torch.where(col(accepted), step.carry, step.retry_carry))
        if any_accepted:
            records.append(_Record(torch.where(accepted, h, 0.0), offset, lands & accepted))
        offset = torch.where(accepted, offset + h, offset)
        t_n = torch.where(accepted, t_next, t_n)
        done = done_next
        stats.n_steps = n_steps
        stats.n_accepted = stats.n_accepted + accepted
        stats.n_rejected = stats.n_rejected + (active & ~accepted)
        stats.iterations += 1

        for _ in range(n_passed):  # outputs inside (t_n, t_{n+1}], one per sample per pass
            index = next_output.clamp(max=n_times - 1)
            t_out = td.gather(1, index[:, None]).squeeze(1)
            emit = accepted & (next_output < n_times) & (direction * (t_out - t_next) <= tol)
            theta = torch.where(emit, (t_out - t_old) / torch.where(emit, h, 1.0), 0.0)
            value = solver.interpolate(state_old, h_step, step.dense, col(theta.to(dtype)))
            value = torch.where(col(lands & (index == n_times - 1)), step.y[0], value)
            slot = (columns[None, :] == index[:, None]) & emit[:, None]
            outputs = torch.where(slot.reshape(batch, n_times, *view[1:]), value.unsqueeze(1),
                                  outputs)
            next_output = next_output + emit
            records[-1].passes.append((index, emit))
        if all_done:
            break
        h = torch.where(active, h_next, h)
    return outputs.movedim(1, 0), state


class _Run:
    """The forward pass's inputs and records, shared with the backward pass."""

    def __init__(self, f, raw_f, solver, loop_kwargs: dict, stats: dict, sample: SampleStats,
                 module, drift_tol: float | None):
        self.f, self.raw_f, self.solver, self.loop_kwargs = f, raw_f, solver, loop_kwargs
        self.stats, self.sample, self.module, self.drift_tol = stats, sample, module, drift_tol
        self.records: list[_Record] = []


class _ReversiblePerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, y0: Tensor, times: Tensor, *params: Tensor) -> Tensor:
        ys, run.final = _forward(run.f, y0, times, run.solver, stats=run.sample,
                                 records=run.records, **run.loop_kwargs)
        ctx.run, run.params = run, params
        ctx.save_for_backward(y0, times)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        run = ctx.run
        y0, times = ctx.saved_tensors
        with restored_buffers(run.module), torch.enable_grad():
            grads = _backward(run, y0, times, grad_ys, ctx.needs_input_grad[1:])
        return (None, *grads)


def _backward(run: _Run, y0: Tensor, times: Tensor, grad_ys: Tensor,
              needs: tuple[bool, ...]) -> list[Tensor | None]:
    """Reverse the recorded steps: [∂L/∂y0, ∂L/∂t, ∂L/∂θ...] (None where not needed)."""
    solver: ReversibleSolver = run.solver
    batch, n_times = times.shape
    dtype = y0.dtype
    view = (batch,) + (1,) * (y0.dim() - 1)
    rows = (1,) + view
    fv = _ViewField(CountedCalls(run.raw_f, run.stats, "nfe_backward"), batch)
    time_grad = needs[1]
    wanted = [p for p, need in zip(run.params, needs[2:]) if need]
    t_leaf = times.detach().requires_grad_(time_grad)
    param_grads: list[Tensor | None] = [None] * len(wanted)
    grad_t = torch.zeros_like(times) if time_grad else None

    def gather(local: LocalAdjoint) -> list[Tensor | None]:
        """Add the parameters' share of `local` to param_grads; the rest (time inputs)."""
        for k, g in enumerate(local.grads[:len(wanted)]):
            if g is not None:
                param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
        return local.grads[len(wanted):]

    per_sample_g = grad_ys.movedim(0, 1)  # (batch, n_times, ...)
    samples = torch.arange(batch, device=y0.device)
    y0_bar = grad_ys[0].clone()
    state = run.final
    adjoint = torch.zeros_like(state)
    zero = torch.zeros_like(y0)
    for record in reversed(run.records):
        inside = []
        for index, emit in record.passes:
            g = per_sample_g[samples, index]
            at_end = emit & record.lands & (index == n_times - 1)
            adjoint = adjoint + torch.stack([torch.where(at_end.reshape(view), g, 0.0), zero])
            inner = emit & ~at_end
            inside.append((index, inner, torch.where(inner.reshape(view), g, 0.0)))
        t_n = t_leaf[:, 0] + record.offset.to(dtype)
        h = record.h.to(dtype)
        if time_grad:
            h = torch.where(record.lands, t_leaf[:, -1] - t_n, h)
        thetas, cotangents = [], []
        for index, inner, g in inside:
            t_out = t_leaf.gather(1, index[:, None]).squeeze(1)
            thetas.append(torch.where(inner, (t_out - t_n) / torch.where(inner, h, 1.0), 0.0))
            cotangents.append(g)
        # The step's time inputs as leaves (several VJPs of one step read them), chained to
        # the output times afterwards.
        time_inputs = [t_n, h, *thetas]
        leaves = [x.detach().requires_grad_(time_grad) for x in time_inputs]
        local = LocalAdjoint((*wanted, *leaves) if time_grad else wanted)
        t_in, h_in, *theta_in = leaves
        outputs = [(th.reshape(view), g) for th, g in zip(theta_in, cotangents)]
        stepped = (record.h != 0).reshape(rows)
        previous, pulled, back = solver.reverse(
            fv, t_in.reshape(view), h_in.reshape(view), state,
            torch.where(stepped, adjoint, 0.0), outputs, local, None,
        )
        if back is not None:  # reversible Heun's pending VJP of f(t_n, z_n), taken now
            z_leaf, value, cotangent = back
            (dz,) = local.vjp([value], [z_leaf], [cotangent])
            pulled = pulled + torch.stack([zero, dz])
        time_bars = gather(local)
        if time_grad:
            pairs = [(x, g) for x, g in zip(time_inputs, time_bars) if g is not None]
            if pairs:
                (dt,) = torch.autograd.grad([x for x, _ in pairs], [t_leaf],
                                            [g for _, g in pairs], allow_unused=True)
                if dt is not None:
                    grad_t = grad_t + dt
        state = torch.where(stepped, previous.detach(), state)
        adjoint = torch.where(stepped, pulled, adjoint)
    local = LocalAdjoint((*wanted, t_leaf) if time_grad else wanted)
    t0 = t_leaf[:, 0] if time_grad else t_leaf[:, 0].detach()
    dy0, true_state = solver.finish(fv, t0.reshape(view), y0, adjoint, local, None)
    rest = gather(local)
    if time_grad and rest[0] is not None:
        grad_t = grad_t + rest[0]
    y0_bar = y0_bar + dy0
    if run.records:
        _check_drift(run, state.detach(), true_state.detach())
    else:
        run.stats["drift"] = 0.0
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, param_grads)]
    it = iter(grads)
    return [y0_bar if needs[0] else None, grad_t,
            *(next(it) if need else None for need in needs[2:])]


def _check_drift(run: _Run, state: Tensor, true_state: Tensor) -> None:
    """stats["sample_drift"] = per sample max|reconstructed − true| / max|true|; warn above
    drift_tol (default max(rtol, 1000 eps), as gradients/reversible.py)."""
    batch = state.shape[1]
    with torch.no_grad():
        difference = (state - true_state).abs().transpose(0, 1).reshape(batch, -1).amax(1)
        scale = true_state.abs().transpose(0, 1).reshape(batch, -1).amax(1)
        drift = difference / scale.clamp_min(torch.finfo(state.dtype).tiny)
    worst = float(drift.max())
    run.stats["sample_drift"], run.stats["drift"] = drift, worst
    drift_tol = run.drift_tol
    if drift_tol is None:
        rtol = run.loop_kwargs["rtol"]
        rtol = float(rtol.max()) if isinstance(rtol, Tensor) else float(rtol)
        drift_tol = max(rtol, 1000 * torch.finfo(state.dtype).eps)
    if not worst <= drift_tol:
        b = int(drift.argmax())
        warnings.warn(
            f"gradient='reversible' with method {run.solver.name!r} and per_sample=True: the "
            f"reconstructed initial state of sample {b} drifted from the true one by "
            f"{worst:.3e} (relative), above {drift_tol:.1e}, so its gradient is inaccurate; use "
            "tighter tolerances, a coupling= (reversible Runge–Kutta) or eta= (alf) closer to "
            "1, or float64", ReversibleDriftWarning, stacklevel=2,
        )


def solve_reversible(f, y0: Tensor, times: Tensor, solver: ReversibleSolver, *, raw_f,
                     params: tuple[Tensor, ...], stats: dict, sample: SampleStats, module,
                     drift_tol: float | None, **loop_kwargs) -> Tensor:
    """The per-sample solve of a reversible scheme with the reversible backward pass: ys
    (n_times, batch, ...); stats["checkpoint_bytes"] counts the final state and the records."""
    stats["nfe_backward"] = 0
    run = _Run(f, raw_f, solver, loop_kwargs, stats, sample, module, drift_tol)
    ys = _ReversiblePerSample.apply(run, y0, times, *params)
    final = run.final
    stats["checkpoint_bytes"] = (final.numel() * final.element_size()
                                 + sum(r.nbytes() for r in run.records))
    return ys


REVERSIBLE_OPTIONS = ("coupling", "eta", "drift_tol")


def reversible_solver(method: str, coupling: float | None = None,
                      eta: float | None = None) -> ReversibleSolver:
    """The scheme gradient="reversible" runs per sample: `method` itself when reversible (with
    its own coupling= or eta=), or McCallum–Foster over a plain explicit Runge–Kutta method
    (coupling=, default 0.999), as gradients/reversible.solver_for; it must be adaptive with a
    dense output."""
    from .errors import InvalidInputError, UnsupportedCombinationError
    from .solvers import SOLVERS, make_solver
    from .solvers.explicit import ExplicitRungeKutta

    given = {name: value for name, value in (("coupling", coupling), ("eta", eta))
             if value is not None}
    solver = make_solver(method)
    if type(solver) is ExplicitRungeKutta:
        if eta is not None:
            raise InvalidInputError("eta= is an option of method='alf' only")
        solver = ReversibleRungeKutta(solver, coupling=0.999 if coupling is None else coupling)
    elif isinstance(solver, ReversibleSolver):
        try:
            solver = make_solver(method, **given)
        except TypeError:
            raise InvalidInputError(
                f"method {method!r} takes no option {', '.join(f'{k}=' for k in given)}"
            ) from None
    else:
        raise UnsupportedCombinationError(
            f"gradient='reversible' cannot serve method {method!r}: it needs an algebraically "
            "reversible scheme or an explicit Runge–Kutta base to wrap"
        )
    if not runs_reversible_per_sample(solver):
        valid = []
        for name in sorted(SOLVERS):
            try:
                candidate = make_solver(name)
            except TypeError:
                continue
            if runs_reversible_per_sample(candidate):
                valid.append(name)
        raise UnsupportedCombinationError(
            f"gradient='reversible' with per_sample=True needs an adaptive reversible scheme "
            f"with dense output (per-sample steps are adaptive); {solver.name!r} is not one; "
            f"valid methods: {', '.join(valid)} (or a plain adaptive explicit method, wrapped)"
        )
    return solver
