"""gradient="backsolve" for SDEs: the stochastic adjoint of Li et al. 2020 (ALGORITHMS.md §11).

For a Stratonovich SDE dy = f dt + g ∘ dW the adjoint a = ∂L/∂y(t) and the parameter gradient
μ solve, backwards in time and with the same Brownian path,

    dy = f dt + g ∘ dW,  da = −a^T ∂_y f dt − a^T ∂_y g ∘ dW,  dμ = −a^T ∂_θ f dt − a^T ∂_θ g ∘ dW,

an SDE in Z = (y, a, μ) with the same m noise channels. The forward solve keeps only the
outputs; the backward pass integrates Z from t[-1] to t[0] with fixed steps dt (the forward's
scheme unless `adjoint_method=`), interval by interval: at each output time y is reset to the
stored output and ∂L/∂y(t_i) is added to a. The Brownian motion is queried backwards: a step
from t to t + h with h < 0 reads W(t + h) − W(t), the exact negative of a forward increment.

The Stratonovich schemes use g only through g(t, y)·ΔW, and the augmented diffusion times an
increment is (g·ΔW, −∂_y(g·ΔW)^T a, −∂_θ(g·ΔW)^T a): one g evaluation and one VJP, whatever the
noise type (the augmented noise is general even when the forward noise is diagonal). The
gradient is approximate and converges to the exact one of the SDE as dt → 0. Memory: the
outputs. Itô schemes are refused (an Itô problem solved by a Stratonovich scheme has been
converted already, and is served).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import OdegradError, UnsupportedCombinationError
from ..loop import integrate
from ..problem import Problem, backward_phase
from ..sde_field import StepGrid, apply_noise, fixed_grid
from ..solvers.sde import SDE_SOLVERS, SDESolver, make_sde_solver
from .continuous import Layout, state_bytes
from .second_order import differentiable_backward, graph_requested

OPTIONS = ("adjoint_method",)


def check(problem: Problem) -> None:
    """A Stratonovich scheme and a deterministic f and g."""
    solver = problem.solver
    if getattr(solver, "sde_type", None) != "stratonovich" or solver.reads_diffusion_derivative:
        why = "reads ∂g/∂y" if solver.reads_diffusion_derivative else "is Itô"
        raise UnsupportedCombinationError(
            f"gradient='backsolve' (the stochastic adjoint) needs a Stratonovich scheme that "
            f"uses g only through g·ΔW, but {solver.name!r} {why}; use one of "
            f"{', '.join(adjoint_schemes())} (sde_type='ito' problems are converted), or "
            "gradient='discrete'"
        )
    if problem.stochastic():
        raise UnsupportedCombinationError(
            "gradient='backsolve' needs deterministic f and g, but they draw random numbers "
            "(active dropout): the backward pass would draw new ones; call .eval() or use "
            "gradient='discrete'"
        )


def adjoint_schemes() -> list[str]:
    """The SDE methods that can integrate the adjoint SDE."""
    return sorted(n for n, factory in SDE_SOLVERS.items()
                  if (s := factory()).sde_type == "stratonovich"
                  and not s.reads_diffusion_derivative)


def solve(problem: Problem, adjoint_method: str | None = None) -> Tensor:
    """The outputs at problem.t, differentiable w.r.t. y0 and problem.params."""
    solver = problem.solver if adjoint_method is None else make_sde_solver(adjoint_method)
    if solver.sde_type != "stratonovich" or solver.reads_diffusion_derivative:
        raise UnsupportedCombinationError(
            f"adjoint_method={adjoint_method!r} cannot integrate the adjoint SDE; use one of "
            f"{', '.join(adjoint_schemes())}"
        )
    solver.check_noise(problem.f.noise_type)
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
        self.sde = problem.f
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


def sweep(problem: Problem, solver: SDESolver, ys: Tensor, grad_ys: Tensor):
    """Integrate Z = (y, a, μ) from t[-1] back to t[0]; returns a(t_0⁺) and μ."""
    t = problem.t.detach()
    times = [float(v) for v in t.cpu().tolist()]
    dt = problem.step_size
    points = [p for i in range(len(times) - 1, 0, -1)
              for p in fixed_grid([times[i], times[i - 1]], dt)]
    layout = Layout(problem.y0.shape, 2, problem.params)
    field = AugmentedSDEField(problem, layout, StepGrid(points))
    a = grad_ys[-1]
    mu = [torch.zeros_like(p) for p in problem.params]
    for i in range(len(times) - 1, 0, -1):
        local: dict = {}
        try:
            outputs, _ = integrate(
                field, layout.pack([ys[i], a, *mu]), torch.stack([t[i], t[i - 1]]), solver,
                step_size=dt, adaptive=False, max_steps=problem.max_steps + len(times), stats=local,
            )
        except OdegradError as error:
            raise type(error)(
                f"in the backward (stochastic adjoint) solve from t={times[i]:.10g} to "
                f"t={times[i - 1]:.10g}: {error}"
            ) from error
        problem.stats["n_steps_backward"] += local["n_steps"]
        parts = layout.unpack(outputs[-1])
        a, mu = parts[1], list(parts[2:])
        if i > 1:
            a = a + grad_ys[i - 1]
    return a, mu
