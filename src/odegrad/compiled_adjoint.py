"""compile=True with gradient="backsolve": the backward solve's step, with the augmented
dynamics inlined, compiled once per (f, parameters, shapes, dtype, device) (issue 16).

Backsolve's backward solve integrates z = (y, a, μ) backwards (ALGORITHMS.md §3):

    dy/dt = f(t, y),   da/dt = −a^T ∂f/∂y(t, y),   dμ/dt = −a^T ∂f/∂θ(t, y).

`AugmentedDynamics` evaluates that field as continuous.AugmentedField does (one f evaluation
and one torch.autograd.grad with cotangent a), for the user's f and parameters, and
`CompiledAdjoint` is odegrad.compiled's Runge–Kutta step (blocks of steps for fixed steps, the
error ratio in the graph for adaptive ones) with it inlined: the VJP of f is traced into the
step (compiled_graphs.py) and the whole step — its s evaluations of f and their VJPs, the
stage combinations — is one compiled function, reused for every step, interval and call.
The forward solve is the compiled step of odegrad.compiled. Each evaluation of the augmented
field counts one evaluation of f in stats["nfe_backward"], as the eager sweep counts it.

The backward scheme must be an explicit Runge–Kutta method (the forward's, or adjoint_method=),
fixed-step or adaptive; anything else raises UnsupportedCombinationError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import compiled_graphs
from .compiled import CompiledRungeKutta, _plain_rk
from .errors import UnsupportedCombinationError
from .gradients.continuous import AdjointSettings, Layout
from .problem import CountedField, Problem, TupleField
from .solvers.base import VectorField
from .solvers.explicit import ExplicitRungeKutta


class AugmentedDynamics:
    """dz/dt of z = (y, a, μ) laid out flat (continuous.Layout with two state blocks), for
    `field` and its parameters `params`: the function the compiled step inlines."""

    def __init__(self, field: VectorField, params: Sequence[Tensor], layout: Layout):
        self.field, self.params, self.layout = field, tuple(params), layout
        self._norms: dict = {}

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        y, a = self.layout.unpack(z)[:2]
        with torch.enable_grad():
            y_in = y.detach().requires_grad_()
            fy = self.field(t.detach(), y_in)
            inputs = (y_in, *self.params)
            if fy.requires_grad:
                vjps = torch.autograd.grad(fy, inputs, a, allow_unused=True,
                                           materialize_grads=True)
            else:  # f ignores y and every parameter
                vjps = tuple(torch.zeros_like(x) for x in inputs)
        return torch.cat([fy.detach().reshape(-1), *(-v.reshape(-1) for v in vjps)])

    def norm(self, state_norm: Callable, seminorm: bool) -> Callable:
        """The sweep's error norm (Layout.norm), one function per (state norm, seminorm), so
        the compiled step that reads it is not compiled again for each backward pass."""
        key = (state_norm, seminorm)
        found = self._norms.get(key)
        if found is None:
            found = self._norms[key] = self.layout.norm(state_norm, seminorm)
        return found


class CompiledAdjoint(CompiledRungeKutta):
    """odegrad.compiled's step with the augmented dynamics inlined, their VJP traced."""

    runs = False  # torch.autograd.grad does not trace inside torch's scan: blocks of steps

    def __init__(self, base: ExplicitRungeKutta, dynamics: AugmentedDynamics, counted: Any,
                 cache_key: Any, norm: Callable):
        super().__init__(base, dynamics, counted, cache_key)
        self.norm = norm

    def rate_errors(self, rtol: Tensor | float, atol: Tensor | float, norm: Callable) -> None:
        """The sweep builds its norm anew each backward pass (Layout.norm); the step reads the
        equal one kept with the dynamics, so it is compiled once."""
        super().rate_errors(rtol, atol, self.norm)

    def _call(self, compiled: Callable, *args: Any) -> Any:
        with compiled_graphs.autograd_traced():
            return super()._call(compiled, *args)


def compiled_settings(problem: Problem, settings: AdjointSettings) -> AdjointSettings:
    """`settings` with the backward solve's scheme compiled for problem's f (compile=True)."""
    scheme = settings.solver
    if not (isinstance(scheme, CompiledRungeKutta) or _plain_rk(scheme)):
        raise UnsupportedCombinationError(
            f"compile=True with gradient='backsolve' compiles the backward solve of an explicit "
            f"Runge–Kutta method, and adjoint_method={scheme.name!r} is not one; give an "
            "explicit adjoint_method (rk4, dopri5, ...) or pass compile=False"
        )
    counted: CountedField = problem.f
    field = counted.f
    owner = field.f if isinstance(field, TupleField) else field
    layout = Layout(problem.y0.shape, 2, problem.params)
    key = ("augmented dynamics", tuple(id(p) for p in problem.params),
           tuple(problem.y0.shape), problem.y0.dtype, problem.y0.device)
    entries = compiled_graphs.held(owner)
    dynamics = entries.get(key)
    if dynamics is None:
        dynamics = entries[key] = AugmentedDynamics(field, problem.params, layout)
    like = torch.empty(layout.state_size + sum(layout.sizes[2:]), dtype=problem.y0.dtype,
                       device=problem.y0.device)
    augmented = CountedField(dynamics, like, problem.stats, name="the adjoint dynamics")
    solver = CompiledAdjoint(ExplicitRungeKutta(scheme.tableau), dynamics, augmented,
                             ("plain", problem.y0.device.type),
                             dynamics.norm(problem.norm, settings.seminorm))
    return replace(settings, solver=solver)
