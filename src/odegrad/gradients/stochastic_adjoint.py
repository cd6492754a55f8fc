"""gradient="backsolve" for SDEs: the stochastic adjoint of Li et al. 2020 (ALGORITHMS.md §11).

For a Stratonovich SDE dy = f dt + g ∘ dW the adjoint a = ∂L/∂y(t) and the parameter gradient
μ solve, backwards in time and with the same Brownian path,

    dy = f dt + g ∘ dW,  da = −a^T ∂_y f dt − a^T ∂_y g ∘ dW,  dμ = −a^T ∂_θ f dt − a^T ∂_θ g ∘ dW,

an SDE in Z = (y, a, μ) with the same m noise channels. The forward solve keeps only the
outputs; the backward pass integrates Z from t[-1] to t[0] (with `adjoint_method`, below),
interval by interval: at each output time y is reset to the stored output
and ∂L/∂y(t_i) is added to a. Its steps are the forward's steps backwards (`backward_grid`):
an output time within round-off of a step boundary (float32 t = linspace(0, 1, 11)) is read
as that boundary, so every Brownian query is a forward one, W(t + h) − W(t) with h < 0 the
exact negative of a forward increment. An output strictly inside a forward step (read there
by linear interpolation) splits that step in two at t_i, where W is read on the same path
(the only query the forward did not make); the gradient still converges to direct's as dt
shrinks (tests/test_sde_adjoint.py).

The Stratonovich schemes use g only through g(t, y)·ΔW, and the augmented diffusion times an
increment is (g·ΔW, −∂_y(g·ΔW)^T a, −∂_θ(g·ΔW)^T a): one g evaluation and one VJP, whatever the
noise type (the augmented noise is general even when the forward noise is diagonal). The
gradient is approximate and converges to the exact one of the SDE as dt → 0. Memory: the
outputs.

The calculus: the forward pass is a solve without a graph, by any scheme `solve_sde` serves
for the problem (Itô Euler–Maruyama or Milstein on an Itô SDE, Stratonovich Milstein, a scheme
of the other calculus with the drift converted). The backward pass always integrates the
Stratonovich form of the SDE: an Itô drift f becomes f − ½ Σ_k (∂g_{·k}/∂y) g_{·k}
(`SDEField.correction`, differentiated through in the adjoint's VJPs, so second derivatives of g
enter a and μ), which has the same solution. (torchsde keeps the adjoint of an Itô SDE in Itô
form, with the same correction in its drift, and integrates it with Itô schemes; converting
the forward SDE instead lets the same Stratonovich schemes serve both calculi.) The scheme of
the backward pass is `adjoint_method`: a Stratonovich scheme that uses g only through g·ΔW
(`adjoint_schemes()`); by default the forward scheme when it is one, else midpoint.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError, UnsupportedCombinationError
from ..problem import Problem, backward_phase
from ..sde_field import SDEField, StepGrid, apply_noise, fixed_grid
from ..solvers.sde import SDE_SOLVERS, SDESolver, make_sde_solver
from .continuous import Layout, state_bytes
from .second_order import differentiable_backward, graph_requested

OPTIONS = ("adjoint_method",)


DEFAULT_ADJOINT_METHOD = "midpoint"


def check(problem: Problem) -> None:
    """Deterministic f and g. (The forward scheme is free: it only runs without a graph; the
    backward scheme, `adjoint_method`, is checked by `adjoint_solver`.)"""
    if problem.stochastic():
        raise UnsupportedCombinationError(
            "gradient='backsolve' needs deterministic f and g, but they draw random numbers "
            "(active dropout): the backward pass would draw new ones; call .eval() or use "
            "gradient='discrete'"
        )


def _integrates_adjoint(solver: SDESolver) -> bool:
    return solver.sde_type == "stratonovich" and not solver.reads_diffusion_derivative


def adjoint_schemes() -> list[str]:
    """The SDE methods that can integrate the adjoint SDE (in Stratonovich form)."""
    return sorted(n for n, factory in SDE_SOLVERS.items() if _integrates_adjoint(factory()))


def adjoint_solver(problem: Problem, adjoint_method: str | None) -> SDESolver:
    """The scheme of the backward pass: `adjoint_method`, or by default the forward scheme
    when it can integrate the adjoint SDE (Stratonovich, g only through g·ΔW), else
    midpoint."""
    if adjoint_method is None:
        forward = problem.solver
        return forward if _integrates_adjoint(forward) else make_sde_solver(
            DEFAULT_ADJOINT_METHOD)
    solver = make_sde_solver(adjoint_method)
    if not _integrates_adjoint(solver):
        why = "reads ∂g/∂y" if solver.reads_diffusion_derivative else "is Itô"
        raise UnsupportedCombinationError(
            f"adjoint_method={adjoint_method!r} cannot integrate the adjoint SDE (it {why}; "
            f"the backward pass integrates the SDE's Stratonovich form with a scheme that uses "
            f"g only through g·ΔW); use one of {', '.join(adjoint_schemes())}, or omit "
            f"adjoint_method= (the forward scheme when it is one, else "
            f"{DEFAULT_ADJOINT_METHOD!r})"
        )
    return solver


def stratonovich_shift(problem: Problem) -> float:
    """κ such that the SDE's Stratonovich drift is f + κ c, f the user's drift and
    c = Σ_k (∂g_{·k}/∂y) g_{·k}: the forward field's drift is in the forward scheme's
    calculus (f + drift_correction · c), and an Itô drift loses ½ c."""
    field = problem.f
    ito = 0.5 if problem.solver.sde_type == "ito" else 0.0
    return float(getattr(field, "drift_correction", 0.0)) - ito


def solve(problem: Problem, adjoint_method: str | None = None) -> Tensor:
    """The outputs at problem.t, differentiable w.r.t. y0 and problem.params."""
    solver = adjoint_solver(problem, adjoint_method)
    solver.check_noise("general")  # the augmented noise
    problem.stats["adjoint_method"] = solver.name
    for key in ("n_steps_backward", "nfe_backward", "nge_backward"):
        problem.stats.setdefault(key, 0)
    return _StochasticAdjoint.apply(problem, solver, problem.y0, *problem.params)


class _StochasticAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, solver: SDESolver, y0: Tensor, *params: Tensor):
        with torch.no_grad():
            outputs, _ = problem.integrate()
            ys = torch.stack(outputs)
        problem.stats["checkpoint_bytes"] = state_bytes(ys)
        ctx.problem, ctx.solver = problem, solver
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        problem: Problem = ctx.problem
        if graph_requested():  # double backward: direct's, gradients/second_order.py
            with backward_phase(problem):
                grads = differentiable_backward(
                    problem, grad_ys, [problem.y0, *problem.params], ctx.needs_input_grad[2:]
                )
            return (None, None, *grads)
        (ys,) = ctx.saved_tensors
        with torch.no_grad(), backward_phase(problem):
            a0, mu = sweep(problem, ctx.solver, ys, grad_ys)
        return (None, None, a0 + grad_ys[0], *mu)


@dataclass
class _Linearised:
    """g(t, y) with its graph to y and the parameters, and the adjoint a: what the augmented
    diffusion needs to multiply an increment (one VJP per product)."""

    y: Tensor
    a: Tensor
    g: Tensor


class AugmentedSDEField:
    """The terms of the adjoint SDE in Z = (y, a, μ), flat (continuous.Layout)."""

    def __init__(self, problem: Problem, layout: Layout, grid: StepGrid):
        forward = problem.f
        shift = stratonovich_shift(problem)
        if shift != getattr(forward, "drift_correction", 0.0):
            # The forward drift is in another calculus: the Stratonovich one, same counts.
            forward = SDEField(forward.drift, forward.diffusion_fn, forward.noise_type,
                               forward.bm, problem.y0, forward.stats, drift_correction=shift)
        self.sde = forward
        self.params = tuple(problem.params)
        self.layout = layout
        self.grid = grid
        self.noise_type = "general"

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        parts = self.layout.unpack(z)
        return parts[0].detach(), parts[1].detach()

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        """(f, −a^T ∂_y f, −a^T ∂_θ f)."""
        y, a = self._split(z)
        with torch.enable_grad():
            y_in = y.requires_grad_()
            fy = self.sde(t, y_in)
            vjps = _vjp(fy, (y_in, *self.params), a, retain=False)
        return self.layout.pack([fy.detach(), *(-v for v in vjps)])

    def diffusion(self, t: Tensor, z: Tensor) -> _Linearised:
        y, a = self._split(z)
        with torch.enable_grad():
            y_in = y.requires_grad_()
            return _Linearised(y_in, a, self.sde.diffusion(t, y_in))

    def apply(self, g: _Linearised, dw: Tensor) -> Tensor:
        """(g·ΔW, −∂_y(g·ΔW)^T a, −∂_θ(g·ΔW)^T a)."""
        with torch.enable_grad():
            product = apply_noise(self.sde.noise_type, g.g, dw)
            vjps = _vjp(product, (g.y, *self.params), g.a, retain=True)
        return self.layout.pack([product.detach(), *(-v for v in vjps)])

    def diffusion_times(self, t: Tensor, z: Tensor, dw: Tensor) -> Tensor:
        return self.apply(self.diffusion(t, z), dw)

    def noise(self, t: Tensor, h) -> Tensor:
        ta = float(t)
        tb = ta + float(h)
        return self.sde.bm(self.grid.snap(ta), self.grid.snap(tb))


def _vjp(out: Tensor, inputs: Sequence[Tensor], cotangent: Tensor, retain: bool) -> list[Tensor]:
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    return list(torch.autograd.grad(out, inputs, cotangent, retain_graph=retain,
                                    allow_unused=True, materialize_grads=True))


def backward_grid(problem: Problem) -> tuple[StepGrid, list[list[float]]]:
    """The Brownian grid of the backward solve and its steps, output interval by interval (from
    t[i] back to t[i-1], i = N−1 … 1): the forward's step boundaries inside each interval,
    with each output time snapped to the forward grid when within its round-off tolerance
    (then every query is a forward point; an output strictly inside a forward step adds its
    own time, where W is read on the same path)."""
    times = [float(v) for v in problem.t.detach().cpu().tolist()]
    forward = getattr(problem.f, "grid", None)
    if forward is None:
        forward = StepGrid(fixed_grid(times, problem.step_size)).for_dtype(problem.y0.dtype)
    ends = [forward.snap(x) for x in times]
    points = forward.points
    intervals = []
    for i in range(len(times) - 1, 0, -1):
        a, b = ends[i], ends[i - 1]
        lo, hi = min(a, b), max(a, b)
        inside = points[bisect.bisect_right(points, lo):bisect.bisect_left(points, hi)]
        inside = [p for p in inside if p - lo > forward.tolerance and hi - p > forward.tolerance]
        intervals.append([a, *(reversed(inside) if a > b else inside), b])
    grid = StepGrid([*points, *ends], forward.resolution)
    grid.tolerance = min(grid.tolerance, forward.tolerance)
    return grid, intervals


def sweep(problem: Problem, solver: SDESolver, ys: Tensor, grad_ys: Tensor):
    """Integrate Z = (y, a, μ) from t[-1] back to t[0] through the steps of `backward_grid`;
    returns a(t_0⁺) and μ."""
    grid, intervals = backward_grid(problem)
    layout = Layout(problem.y0.shape, 2, problem.params)
    field = AugmentedSDEField(problem, layout, grid)
    a = grad_ys[-1]
    mu = [torch.zeros_like(p) for p in problem.params]
    like = problem.y0
    for i, points in zip(range(len(ys) - 1, 0, -1), intervals):
        times = torch.tensor(points, dtype=like.dtype, device=like.device)
        state = solver.initial_state(layout.pack([ys[i], a, *mu]))
        carry = solver.init(field, times[0], state)
        for k in range(len(points) - 1):
            step = solver.step(field, times[k], points[k + 1] - points[k], state, carry)
            state, carry = step.y, step.carry
        z = solver.observe(state)
        problem.stats["n_steps_backward"] += len(points) - 1
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                f"in the backward (stochastic adjoint) solve from t={points[0]:.10g} to "
                f"t={points[-1]:.10g}: the adjoint state became non-finite (inf or nan); take "
                "a smaller dt"
            )
        parts = layout.unpack(z)
        a, mu = parts[1], list(parts[2:])
        if i > 1:
            a = a + grad_ys[i - 1]
    return a, mu
