"""gradient="backsolve" and "interpolated" with per_sample=True: the continuous adjoint solved
backwards per sample, each sample with its own adaptive backward steps (ALGORITHMS.md §3, §4).

Forward: the per-sample loop (per_sample_loop.py) without a graph; "interpolated" also reads
each sample's y at the n_nodes Chebyshev–Lobatto nodes of each of its output intervals from
its dense output (the nodes are extra output times of the loop, which never constrain the
steps, so the steps are those of the plain solve). Backward, for each output interval from the
last, every sample from its own t_b,i back to its own t_b,i−1:

    da/dt = −a^T ∂f/∂y(t, y(t)),   dμ/dt = −a^T ∂f/∂θ(t, y(t)),   (backsolve: dy/dt = f)

with its own t_n, h_n, error estimate, accept/reject and PI-controller state, as
gradients/continuous.sweep solves it for that sample alone: the same explicit Runge–Kutta
scheme (adjoint_method, default the forward's), the seminorm (the error of (y, a), max over the
blocks of each block's RMS, μ left out), the first step of the first interval the forward's
last unclipped accepted step and of each later interval the last one of the interval before.
At each sample's own output times a += ∂L/∂y(t_b,i) (backsolve resets y to the stored output).
y(t) is re-solved (backsolve) or read from the sample's barycentric interpolant (interpolated).

The parameter adjoint: f on the batch gives one VJP for all samples, Σ_b a_b^T ∂f_b/∂θ, so a
per-sample μ_b would need per-sample gradients (batch × n_params memory and batch VJPs). It is
not needed: μ is read only at the end, as Σ_b μ_b, and under the seminorm it does not steer the
steps, so each accepted masked step adds Σ_i Σ_b h_b b_i (−a_{b,i}^T ∂f_b/∂θ(T_{b,i}, Y_{b,i}))
= −∇_θ Σ_i ⟨f(T_i, Y_i), col(accepted · h · b_i) A_i⟩: one VJP per step w.r.t. θ over the
step's stage evaluations, weighted once the accept decisions are known (the stage graphs are
kept for that step only: s f-graphs, direct's memory for one step). Cost: each stage's
a^T ∂f/∂y is taken when the stage is computed and the θ-part once per step over the kept
graphs, so the backward through f is traversed twice (the lone solve takes both in one VJP);
and the first stage is evaluated afresh every step instead of reused (FSAL), since its
parameter VJP needs its graph and weight (one more F and B per step than the lone solve).
adjoint_norm="full" (μ in the error norm, which would need each μ_b) is refused.

Time gradients are closed forms (continuous.py): ∂L/∂t_b,i = g_b,i^T f(t_b,i, y_b,i) for i ≥ 1
and ∂L/∂t_b,0 = −a_b(t_0⁺)^T f(t_b,0, y_b,0).

Options: adjoint_method (an adaptive explicit Runge–Kutta method), adjoint_rtol, adjoint_atol
(scalars or tensors as rtol/atol, default the forward's), adjoint_step_size (the first backward
step), adjoint_norm="seminorm"; interpolated also n_nodes (default 16). The step hooks
adjoint_on_* are refused. stats: nfe_backward, n_steps_backward (masked iterations),
sample_n_steps_backward / sample_n_accepted_backward / sample_n_rejected_backward ((batch,)),
checkpoint_bytes (outputs, and the nodes), interpolation_error (interpolated; warns above 100).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .control import PIController, StepControl
from .errors import (
    InvalidInputError,
    MaxStepsExceededError,
    NonFiniteError,
    StepSizeUnderflowError,
    UnsupportedCombinationError,
)
from .gradients.continuous import ADJOINT_HOOKS, NORMS
from .gradients.continuous import OPTIONS as BACKSOLVE_OPTIONS
from .gradients.interpolated import DEFAULT_N_NODES, WARN_INTERPOLATION_ERROR
from .gradients.interpolated import OPTIONS as INTERPOLATED_OPTIONS
from .interpolation import chebyshev_tail, lobatto_weights
from .per_sample_control import clamp, propose, sample_scaled_error
from .per_sample_loop import SampleStats, integrate_per_sample
from .problem import restored_buffers
from .solvers.explicit import ExplicitRungeKutta

__all__ = ["adjoint_options", "solve_adjoint"]

_MAX_NONFINITE_RETRIES = 30


def adjoint_options(gradient: str) -> tuple[str, ...]:
    """The option names of gradient="backsolve" / "interpolated" (each honoured or refused)."""
    return INTERPOLATED_OPTIONS if gradient == "interpolated" else BACKSOLVE_OPTIONS


@dataclass
class _Settings:
    solver: ExplicitRungeKutta
    rtol: Tensor | float
    atol: Tensor | float
    step_size: float | None
    max_steps: int
    n_nodes: int


def _settings(gradient: str, forward: ExplicitRungeKutta, options: dict, y0: Tensor,
              rtol, atol, max_steps: int) -> _Settings:
    from .per_sample import _tolerance
    from .solvers import make_solver

    for name in ADJOINT_HOOKS:
        if options.get(name) is not None:
            raise UnsupportedCombinationError(
                f"{name}= (a step hook of the backward solve) is not supported with "
                "per_sample=True: the backward steps are masked steps of the whole batch"
            )
    norm = options.get("adjoint_norm", "seminorm")
    if norm not in NORMS:
        raise InvalidInputError(
            f"adjoint_norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}"
        )
    if norm == "full":
        raise UnsupportedCombinationError(
            "adjoint_norm='full' is not supported with per_sample=True: it puts each sample's "
            "parameter adjoint μ_b in its error norm, and the per-sample backward pass "
            "accumulates only Σ_b μ_b (one VJP for the batch); use adjoint_norm='seminorm'"
        )
    solver = forward
    method = options.get("adjoint_method")
    if method is not None:
        solver = make_solver(method)
        if type(solver) is not ExplicitRungeKutta or solver.error_order is None:
            raise UnsupportedCombinationError(
                f"adjoint_method={method!r} is not supported with per_sample=True: the "
                "per-sample backward solve takes adaptive explicit Runge–Kutta steps (e.g. "
                "'dopri5', 'tsit5', 'bosh3')"
            )
    step_size = options.get("adjoint_step_size")
    if step_size is not None:
        value = -1.0 if isinstance(step_size, bool) else step_size
        if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise InvalidInputError(
                f"adjoint_step_size must be a positive number, got {step_size!r}"
            )
        step_size = float(value)
    n_nodes = options.get("n_nodes", DEFAULT_N_NODES)
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 2:
        raise InvalidInputError(f"n_nodes must be an int >= 2, got {n_nodes!r}")
    adjoint_rtol = options.get("adjoint_rtol")
    adjoint_atol = options.get("adjoint_atol")
    return _Settings(
        solver=solver,
        rtol=rtol if adjoint_rtol is None else _tolerance(adjoint_rtol, "adjoint_rtol", y0),
        atol=atol if adjoint_atol is None else _tolerance(adjoint_atol, "adjoint_atol", y0),
        step_size=step_size, max_steps=max_steps, n_nodes=n_nodes,
    )


class _LastSteps:
    """A duck-typed per_sample_loop recorder: each sample's last two accepted step sizes, for
    the first backward step (continuous.last_step: the last step that was not clipped)."""

    def __init__(self, batch: int, like: Tensor):
        self.last = torch.zeros(batch, dtype=torch.float64, device=like.device)
        self.before = self.last.clone()
        self.count = torch.zeros(batch, dtype=torch.long, device=like.device)

    def start(self, *_, **__) -> None:
        return None

    def step(self, t_n, offset, h, lands, accepted, *_, **__) -> None:
        self.accept(h, accepted)

    def emit(self, *_, **__) -> None:
        return None

    def accept(self, h: Tensor, accepted: Tensor) -> None:
        self.before = torch.where(accepted, self.last, self.before)
        self.last = torch.where(accepted, h, self.last)
        self.count = self.count + accepted

    def first_step(self) -> Tensor:
        return torch.where(self.count > 1, self.before, self.last).abs()


def _lobatto(n: int, start: Tensor, end: Tensor) -> Tensor:
    """interpolation.lobatto_nodes per sample: (batch,) ends -> (batch, n), x_0 = end."""
    sines = torch.tensor([math.sin(math.pi * (n - 1 - 2 * j) / (2 * (n - 1))) for j in range(n)],
                         dtype=torch.float64, device=start.device)
    nodes = 0.5 * (start + end)[:, None] + (0.5 * (end - start))[:, None] * sines
    nodes[:, 0], nodes[:, -1] = end, start
    return nodes


class _Interpolant:
    """Each sample's barycentric interpolant through its Lobatto nodes of one interval (§4)."""

    def __init__(self, nodes: Tensor, values: Tensor):
        self.nodes = nodes.to(values.dtype)  # (batch, n)
        self.weights = lobatto_weights(nodes.shape[1], dtype=values.dtype, device=values.device)
        self.values = values  # (n, batch, ...)

    def __call__(self, t: Tensor) -> Tensor:
        c = self.weights / (t[:, None] - self.nodes)
        c = torch.nan_to_num(c / c.sum(dim=1, keepdim=True), nan=1.0)
        n, batch = self.values.shape[:2]
        flat = self.values.reshape(n, batch, -1)
        return torch.einsum("bj,jbk->bk", c, flat).reshape(self.values.shape[1:])


def _forward(f, y0: Tensor, times: Tensor, solver, settings: _Settings, interpolated: bool,
             sample: SampleStats, loop_kwargs: dict):
    """ys (n_times, batch, ...), the interior nodes (interpolated: (n_times − 1, n − 2, batch,
    ...)) and each sample's first backward step."""
    batch, n_times = times.shape
    recorder = _LastSteps(batch, y0)
    td = times.detach().double()
    if not interpolated or n_times == 1 or settings.n_nodes == 2:
        ys = integrate_per_sample(f, y0, times, solver, stats=sample, recorder=recorder,
                                  **loop_kwargs)
        interior = ys.new_zeros((max(n_times - 1, 0), 0, *y0.shape))
        return ys, interior, recorder.first_step(), td
    n = settings.n_nodes
    columns = [td[:, :1]]
    for i in range(n_times - 1):
        nodes = _lobatto(n, td[:, i], td[:, i + 1])  # x_0 = t_{i+1}
        columns += [nodes[:, 1:-1].flip(1), td[:, i + 1:i + 2]]
    extended = torch.cat(columns, dim=1).to(times.dtype)
    full = integrate_per_sample(f, y0, extended, solver, stats=sample, recorder=recorder,
                                **loop_kwargs)
    ys = full[::n - 1]
    interior = torch.stack([full[i * (n - 1) + 1:(i + 1) * (n - 1)].flip(0)
                            for i in range(n_times - 1)])
    return ys, interior, recorder.first_step(), td


def _interval_values(ys: Tensor, interior: Tensor, i: int) -> Tensor:
    """y at the Lobatto nodes of [t_i, t_{i+1}], x_0 = t_{i+1} first: (n, batch, ...)."""
    return torch.cat([ys[i + 1].unsqueeze(0), interior[i], ys[i].unsqueeze(0)])


class _Backward:
    """The per-sample backward sweep (see the module docstring)."""

    def __init__(self, f, solver: ExplicitRungeKutta, settings: _Settings, params, y0: Tensor,
                 stats: dict):
        tab = solver.tableau
        self.f, self.settings, self.params, self.stats = f, settings, list(params), stats
        self.a = [[float(v) for v in row[:i]] for i, row in enumerate(tab.a)]
        self.b = [float(v) for v in tab.b]
        self.e = [float(v) for v in tab.error]
        self.c = [float(v) for v in tab.c]
        self.stages = tab.stages
        self.controller = PIController(
            error_order=solver.error_order, beta1=solver.controller_coefficients[0],
            beta2=solver.controller_coefficients[1], safety=StepControl().safety,
            min_factor=StepControl().dfactor, max_factor=StepControl().ifactor,
        )
        self.control = StepControl()
        self.view = (y0.shape[0],) + (1,) * (y0.dim() - 1)
        self.mu = [torch.zeros_like(p) for p in self.params]
        batch = y0.shape[0]
        zeros = torch.zeros(batch, dtype=torch.long, device=y0.device)
        self.n_steps, self.n_accepted, self.n_rejected = zeros, zeros.clone(), zeros.clone()
        self.iterations = 0

    def _stages(self, t_n: Tensor, h: Tensor, y: Tensor | None, a: Tensor, y_of, keep: bool):
        """The s stages at once: K^y_i = f(T_i, Y_i), K^a_i = −A_i^T ∂f/∂y(T_i, Y_i); with
        `keep`, the f outputs with their graphs (for the parameter VJP)."""
        dtype = a.dtype
        ky: list[Tensor] = []
        ka: list[Tensor] = []
        kept: list[tuple[Tensor, Tensor]] = []
        for i in range(self.stages):
            t_i = (t_n + self.c[i] * h).to(dtype)
            a_i = a
            y_i = None if y_of is not None else y
            for j, coefficient in enumerate(self.a[i]):
                if coefficient != 0.0:
                    scale = (coefficient * h).to(dtype).reshape(self.view)
                    a_i = torch.addcmul(a_i, scale, ka[j])
                    if y_of is None:
                        y_i = torch.addcmul(y_i, scale, ky[j])
            if y_of is not None:
                y_i = y_of(t_i)
            with torch.enable_grad():
                y_leaf = y_i.detach().requires_grad_()
                fy = self.f(t_i, y_leaf)
                if fy.requires_grad:
                    (gy,) = torch.autograd.grad(fy, y_leaf, a_i, retain_graph=keep,
                                                allow_unused=True)
                else:
                    gy = None
            ky.append(fy.detach())
            ka.append(torch.zeros_like(a) if gy is None else -gy)
            if keep and fy.requires_grad:
                kept.append((fy, a_i, i))
        return ky, ka, kept

    def _combine(self, x: Tensor, weights: list[float], ks: list[Tensor], h: Tensor) -> Tensor:
        out = x
        for w, k in zip(weights, ks):
            if w != 0.0:
                scale = (w * h).to(k.dtype).reshape(self.view)
                out = k * scale if out is None else torch.addcmul(out, scale, k)
        return torch.zeros_like(ks[0]) if out is None else out

    def _flush(self, kept, h: Tensor, accepted: Tensor) -> None:
        """μ −= ∇_θ Σ_i ⟨f_i, col(accepted · h · b_i) A_i⟩: the accepted steps' quadrature."""
        outs, cotangents = [], []
        for fy, a_i, i in kept:
            if self.b[i] != 0.0:
                weight = torch.where(accepted, self.b[i] * h, 0.0).to(a_i.dtype).reshape(self.view)
                outs.append(fy)
                cotangents.append(a_i * weight)
        if not outs:
            return
        grads = torch.autograd.grad(outs, self.params, cotangents, allow_unused=True)
        self.mu = [m if g is None else m - g for m, g in zip(self.mu, grads)]

    def interval(self, t_from: Tensor, t_to: Tensor, h0: Tensor, y: Tensor | None, a: Tensor,
                 y_of) -> tuple[Tensor | None, Tensor, Tensor]:
        """Integrate every sample from t_from[b] to t_to[b] (float64 (batch,)); returns (y, a,
        each sample's first step for the next interval)."""
        settings, control, controller = self.settings, self.control, self.controller
        batch = a.shape[0]
        eps = torch.finfo(a.dtype).eps
        direction = torch.where(t_to > t_from, 1.0, -1.0)
        h = clamp(control, direction * h0)
        t_n = t_from.clone()
        previous = torch.ones_like(t_from)
        done = torch.zeros(batch, dtype=torch.bool, device=a.device)
        nonfinite = torch.zeros(batch, dtype=torch.long, device=a.device)
        steps = _LastSteps(batch, a)
        keep = bool(self.params)
        while True:
            active = ~done
            resolution = 8 * eps * torch.maximum(t_to.abs(), t_n.abs())
            reach = torch.maximum(1e-12 * torch.maximum(t_to.abs(), h.abs()), resolution)
            lands = active & (direction * (t_n + h - t_to) >= -reach)
            h = torch.where(lands, t_to - t_n, torch.where(active, h, 0.0))
            underflow = active & (h.abs() <= 4 * eps * t_n.abs().clamp(min=1e-300))
            ky, ka, kept = self._stages(t_n, h, y, a, y_of, keep)
            a_next = self._combine(a, self.b, ka, h)
            ratio = sample_scaled_error(self._combine(None, self.e, ka, h), a, a_next,
                                        settings.rtol, settings.atol)
            y_next = None
            if y_of is None:
                y_next = self._combine(y, self.b, ky, h)
                ratio = torch.maximum(ratio, sample_scaled_error(
                    self._combine(None, self.e, ky, h), y, y_next, settings.rtol, settings.atol))
            finite = torch.isfinite(ratio)
            nonfinite = torch.where(active & ~finite, nonfinite + 1,
                                    torch.where(active, 0, nonfinite))
            fatal = nonfinite > _MAX_NONFINITE_RETRIES
            accepted = active & finite & (ratio <= 1.0)
            h_proposed, previous_next = propose(controller, h, torch.where(finite, ratio, 1.0),
                                                accepted, previous)
            h_next = clamp(control, torch.where(finite, h_proposed, h * controller.min_factor))
            previous = torch.where(active, previous_next, previous)
            done_next = done | (accepted & lands)
            n_steps = self.n_steps + active
            over = ~done_next & (n_steps >= settings.max_steps)
            flags = torch.stack([done_next.all().long(), (underflow | fatal | over).any().long(),
                                 (active & ~finite).any().long()])
            all_done, any_failed, any_nonfinite = flags.tolist()  # the one sync
            if any_failed:
                _raise(underflow, fatal, over, t_n, h, settings.max_steps, t_from, t_to)
            if keep:
                if any_nonfinite:  # replay with h = 0 where the attempt overflowed (no 0·inf)
                    safe = torch.where(active & ~finite, 0.0, h)
                    kept = self._stages(t_n, safe, y, a, y_of, True)[2]
                self._flush(kept, h, accepted)
            column = accepted.reshape(self.view)
            a = torch.where(column, a_next, a)
            if y_of is None:
                y = torch.where(column, y_next, y)
            steps.accept(h, accepted)
            t_n = torch.where(accepted, torch.where(lands, t_to, t_n + h), t_n)
            done = done_next
            self.n_steps = n_steps
            self.n_accepted = self.n_accepted + accepted
            self.n_rejected = self.n_rejected + (active & ~accepted)
            self.iterations += 1
            if all_done:
                break
            h = torch.where(active, h_next, h)
        return y, a, steps.first_step()


def _raise(underflow, fatal, over, t_n, h, max_steps, t_from, t_to) -> None:
    for kind, mask in (("underflow", underflow), ("nonfinite", fatal), ("max_steps", over)):
        hits = mask.nonzero()
        if len(hits) == 0:
            continue
        b = int(hits[0, 0])
        where = (f"in the backward (adjoint) solve of sample {b} from t={float(t_from[b]):.10g} "
                 f"to t={float(t_to[b]):.10g}, at t={float(t_n[b]):.10g}")
        if kind == "max_steps":
            raise MaxStepsExceededError(f"max_steps={max_steps} exceeded {where}")
        if kind == "nonfinite":
            raise NonFiniteError(
                f"the adjoint dynamics (f and its vector-Jacobian products) returned a "
                f"non-finite value {where} (step size {float(h[b]):.3e})"
            )
        raise StepSizeUnderflowError(f"step size underflow {where}: h={float(h[b]):.3e}")


class _Run:
    def __init__(self, f, raw_f, solver, settings: _Settings, interpolated: bool,
                 loop_kwargs: dict, stats: dict, sample: SampleStats, module):
        self.f, self.raw_f, self.solver, self.settings = f, raw_f, solver, settings
        self.interpolated, self.loop_kwargs, self.stats = interpolated, loop_kwargs, stats
        self.sample, self.module = sample, module


class _AdjointPerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, y0: Tensor, times: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            ys, interior, first, td = _forward(run.f, y0, times, run.solver, run.settings,
                                               run.interpolated, run.sample, run.loop_kwargs)
        run.params, run.first, run.td, run.interior = params, first, td, interior
        ctx.run = run
        ctx.save_for_backward(ys, interior)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        run = ctx.run
        ys, interior = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        with restored_buffers(run.module), torch.no_grad():
            grads = _sweep(run, ys, interior, grad_ys, needs)
        return (None, *grads)


def _sweep(run: _Run, ys: Tensor, interior: Tensor, grad_ys: Tensor, needs):
    """[∂L/∂y0, ∂L/∂t, ∂L/∂θ...] from the backward sweep over the output intervals."""
    stats = run.stats

    def counted(t: Tensor, y: Tensor) -> Tensor:
        stats["nfe_backward"] += 1
        return run.raw_f(t, y)

    td, n_times = run.td, ys.shape[0]
    wanted = [p for p, need in zip(run.params, needs[2:]) if need]
    sweep = _Backward(counted, run.settings.solver, run.settings, wanted, ys[0], stats)
    a = grad_ys[-1] if n_times > 1 else torch.zeros_like(grad_ys[0])
    h0 = run.first if run.settings.step_size is None else torch.full_like(
        run.first, run.settings.step_size)
    for i in range(n_times - 1, 0, -1):
        y_of = None
        if run.interpolated:
            nodes = _lobatto(run.settings.n_nodes, td[:, i - 1], td[:, i])
            y_of = _Interpolant(nodes, _interval_values(ys, interior, i - 1))
        y = None if run.interpolated else ys[i]
        _, a, h0 = sweep.interval(td[:, i], td[:, i - 1], h0, y, a, y_of)
        if i > 1:
            a = a + grad_ys[i - 1]
    stats.update(n_steps_backward=sweep.iterations, sample_n_steps_backward=sweep.n_steps,
                 sample_n_accepted_backward=sweep.n_accepted,
                 sample_n_rejected_backward=sweep.n_rejected)
    grad_t = None
    if needs[1]:
        times = td.to(ys.dtype)
        dots = [-_dot(a, counted(times[:, 0], ys[0]))]
        dots += [_dot(grad_ys[i], counted(times[:, i], ys[i])) for i in range(1, n_times)]
        grad_t = torch.stack(dots, dim=1)
    it = iter(sweep.mu)
    return [a + grad_ys[0] if needs[0] else None, grad_t,
            *(next(it) if need else None for need in needs[2:])]


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample inner product: (batch, ...) x2 -> (batch,)."""
    return (x * y).reshape(x.shape[0], -1).sum(dim=1)


def _interpolation_error(ys: Tensor, interior: Tensor, rtol, atol) -> float:
    """interpolated.interpolation_error per sample, the largest over samples and intervals."""
    if len(ys) < 2 or interior.shape[1] == 0:
        return 0.0
    estimates = [
        sample_scaled_error(chebyshev_tail(_interval_values(ys, interior, i)), ys[i], ys[i + 1],
                            rtol, atol).max()
        for i in range(len(ys) - 1)
    ]
    return float(torch.stack(estimates).max())


def solve_adjoint(f, y0: Tensor, times: Tensor, solver: ExplicitRungeKutta, *, gradient: str,
                  raw_f, params: tuple[Tensor, ...], stats: dict, sample: SampleStats, module,
                  options: dict, **loop_kwargs) -> Tensor:
    """The per-sample solve with the continuous adjoint as its backward pass: ys (n_times,
    batch, ...); fills stats' checkpoint and backward entries."""
    interpolated = gradient == "interpolated"
    settings = _settings(gradient, solver, options, y0, loop_kwargs["rtol"], loop_kwargs["atol"],
                         loop_kwargs["max_steps"])
    stats["nfe_backward"] = 0
    run = _Run(f, raw_f, solver, settings, interpolated, loop_kwargs, stats, sample, module)
    ys = _AdjointPerSample.apply(run, y0, times, *params)
    with torch.no_grad():
        ys_kept, interior = ys.detach(), run.interior
        nbytes = ys_kept.numel() * ys_kept.element_size()
        if interpolated:
            nbytes += interior.numel() * interior.element_size()
            estimate = _interpolation_error(ys_kept, interior, loop_kwargs["rtol"],
                                            loop_kwargs["atol"])
            stats["interpolation_error"] = estimate
            if estimate > WARN_INTERPOLATION_ERROR:
                warnings.warn(
                    f"gradient='interpolated' with per_sample=True: the interpolant of y through "
                    f"n_nodes={settings.n_nodes} Chebyshev-Lobatto nodes per output interval has "
                    f"an estimated error of {estimate:.3g} times the tolerance; the gradient may "
                    "be inaccurate: raise n_nodes or add output times", RuntimeWarning,
                    stacklevel=3,
                )
    stats["checkpoint_bytes"] = nbytes
    return ys
