"""compile=True with gradient="reversible": the reversible scheme's forward step and its
backward step, each one compiled function with f inlined (issue 16).

Served: the asynchronous leapfrog `alf` (MALI, ALGORITHMS.md §5) and McCallum–Foster
`reversible_<tableau>` over any explicit Runge–Kutta base (§6; also a plain explicit method
wrapped with coupling=), fixed or adaptive steps. Not reversible_heun, whose backward carries a
graph of f from one step into the next (rejected by compiled.check).

Forward: the step (alf: s = z_n + (h/2) v_n, u = f(t_n + h/2, s), v_{n+1} = v_n + 2η(u − v_n),
z_{n+1} = s + (h/2) v_{n+1}; McCallum–Foster: y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n),
z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})) as one compiled function of (t_n, h, state[, carry]),
without grad. An adaptive McCallum–Foster step's error (the base's embedded estimate and the
parasitic term, which reads two norms on the host) is formed from its outputs outside, as the
eager step forms it; the loop's accept decision is the one host read per step.

Backward: the scheme's own `reverse` — the algebraic inverse of the step and the local VJP of
the step at the reconstructed state, sharing its f-evaluations (alf: 1 F + 1 B a step) — runs
inside one compiled function of (t_n, h, state_{n+1}, ∂L/∂state_{n+1}, the outputs' θ and
cotangents, the parameters, the parameters' running gradient), its `torch.autograd.grad`
traced into the graph (compiled_graphs.py). It returns state_n, ∂L/∂state_n and the updated
parameter gradient; with times differentiated, also ∂L/∂(t_n, h, θ), chained to t outside.
One graph per number of outputs inside a step (0, 1, ...) and per time-gradient mode. The
first-step `finish` (alf: v_0 = f(t_0, z_0)) and the end-of-solve stability check run eagerly,
once per solve; so does a re-run under autograd (double backward), with the eager step.

f is counted outside the compiled region, as the eager scheme counts it: alf one evaluation a
step forward and backward; McCallum–Foster s + s' forward (one less after a carried first
stage) and 2 s' backward (s' + s with an output inside the step), s' the stages up to the last
nonzero b_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import compiled_graphs
from .solvers.alf import AsynchronousLeapfrog
from .solvers.base import Scalar, Step, VectorField, axpy_sum
from .solvers.parasitic import _parasitic_error
from .solvers.reversible import LocalAdjoint, ReversibleRungeKutta, ReversibleSolver

SERVED = (AsynchronousLeapfrog, ReversibleRungeKutta)


def serves(solver: Any) -> bool:
    """Whether compile=True serves this reversible scheme."""
    return isinstance(solver, SERVED)


class CompiledReversible(ReversibleSolver):
    """`base` (alf or McCallum–Foster) with its step and backward step compiled for `field`
    (the user's f, or its flat view of a tuple state); everything else is the base's."""

    def __init__(self, base: ReversibleSolver, field: VectorField, owner: Any, counted: Any,
                 adaptive: bool, shapes_key: Any):
        self.base = base
        self.name, self.order, self.error_order = base.name, base.order, base.error_order
        self.controller_coefficients = base.controller_coefficients
        self.counted, self.adaptive_steps = counted, adaptive
        self._h: dict[float, Tensor] = {}
        key, device = (_scheme_key(base), shapes_key), shapes_key[-1]
        self._forward = compiled_graphs.cached(
            owner, ("reversible step", *key), lambda: _forward_function(base, field), device)
        self._backward = compiled_graphs.cached(
            owner, ("reversible backward", *key), lambda: _backward_function(base, field),
            device)

    def __getattr__(self, name: str) -> Any:  # the base's options (eta, coupling, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    # --- the base's own --------------------------------------------------------------------
    def configure(self, **tolerances: Any) -> None:
        self.base.configure(**tolerances)

    def initial_state(self, y0: Tensor) -> Tensor:
        return self.base.initial_state(y0)

    def observe(self, state: Tensor) -> Tensor:
        return self.base.observe(state)

    def init(self, f: VectorField, t0: Tensor, state: Tensor) -> Any:
        return self.base.init(f, t0, state)

    def reuse_first_stage(self, carry: Any) -> Tensor | None:
        return self.base.reuse_first_stage(carry)

    def interpolate(self, state: Tensor, h: Scalar, dense: Any, theta: Scalar) -> Tensor:
        return self.base.interpolate(state, h, dense, theta)

    def inverse_step(self, f: VectorField, t: Tensor, h: Scalar, state_next: Tensor) -> Tensor:
        return self.base.inverse_step(f, t, h, state_next)

    def finish(self, f, t0, y0, adjoint, local, back):
        return self.base.finish(f, t0, y0, adjoint, local, back)

    def check_stability(self, *args: Any, **kwargs: Any) -> None:
        return self.base.check_stability(*args, **kwargs)

    def stability_hint(self, h: float) -> str:
        return self.base.stability_hint(h)

    # --- compiled ----------------------------------------------------------------------------
    def step(self, f: VectorField, t: Tensor, h: Scalar, state: Tensor, carry: Any) -> Step:
        if torch.is_grad_enabled():  # a re-run under autograd (double backward): eager
            return self.base.step(f, t, h, state, carry)
        h_tensor = h if isinstance(h, Tensor) else self._scalar(h, state)
        self._count(self._forward_evaluations(carry))
        if isinstance(self.base, AsynchronousLeapfrog):
            y_next, error, dense = self._call(self._forward, "step", t, h_tensor, state, carry,
                                              autograd=False)
            return Step(y=y_next, error=error, dense=dense, carry=None, retry_carry=carry)
        y_next, ks = self._call(self._forward, "step", t, h_tensor, state, carry,
                                autograd=False)
        return Step(y=y_next, error=self._rk_error(h, state, y_next, ks), dense=list(ks),
                    carry=None, retry_carry=ks[0])

    def _rk_error(self, h: Scalar, state: Tensor, state_next: Tensor, ks) -> Tensor | None:
        """McCallum–Foster's error, as ReversibleRungeKutta.step forms it (adaptive only)."""
        base = self.base
        if not self.adaptive_steps or base._e is None:
            return None
        parasitic = _parasitic_error(state, state_next[0], state_next[1], base._rtol,
                                     base._atol, base.coupling)
        return torch.hypot(axpy_sum(None, h, base._e, ks), parasitic)

    def reverse(self, f, t, h, state_next, adjoint, outputs, local: LocalAdjoint, back):
        """The base's reverse, compiled: (state_n, ∂L/∂state_n, None); the parameters'
        gradients accumulate into `local.grads` (and t's, when differentiated, through
        ∂L/∂(t_n, h, θ))."""
        time_grad = isinstance(t, Tensor) and t.requires_grad
        params = local.wrt[:-1] if time_grad else local.wrt
        h_tensor = h if isinstance(h, Tensor) else self._scalar(h, state_next)
        thetas = tuple(th if isinstance(th, Tensor) else self._scalar(th, state_next, False)
                       for th, _ in outputs)
        cotangents = tuple(g for _, g in outputs)
        sums = tuple(torch.zeros_like(p) if g is None else g
                     for p, g in zip(params, local.grads))
        self._count(self._backward_evaluations(len(outputs)))
        with torch.no_grad():  # (detached: whether h or θ carry t's graph is no new graph)
            state, adjoint, sums, time_bars = self._call(
                self._backward, "backward step", t.detach(), h_tensor.detach(), state_next,
                adjoint, tuple(x.detach() for x in thetas), cotangents, tuple(params), sums,
                time_grad)
        local.grads[:len(params)] = list(sums)
        if time_grad:
            local.vjp([t, h_tensor, *thetas], [], list(time_bars))
        return state, adjoint, None

    def _forward_evaluations(self, carry: Any) -> int:
        base = self.base
        if isinstance(base, AsynchronousLeapfrog):
            return 1
        return base.stages - (carry is not None) + base._n_psi

    def _backward_evaluations(self, n_outputs: int) -> int:
        base = self.base
        if isinstance(base, AsynchronousLeapfrog):
            return 1
        return base._n_psi + (base.stages if n_outputs else base._n_psi)

    def _call(self, function, what: str, *args: Any, autograd: bool = True) -> Any:
        return compiled_graphs.call(function, f"the {what} of method {self.name!r}", *args,
                                    autograd=autograd)

    def _scalar(self, value: float, like: Tensor, keep: bool = True) -> Tensor:
        """A 0-dim tensor of `value` (the step sizes are kept: a fixed-step solve has two)."""
        found = self._h.get(value) if keep else None
        if found is None:
            found = torch.tensor(value, dtype=like.dtype, device=like.device)
            if keep and len(self._h) < 64:
                self._h[value] = found
        return found

    def _count(self, n: int) -> None:
        stats = self.counted.stats
        key = "nfe_backward" if stats.get("_phase") == "backward" else "nfe_forward"
        stats[key] = stats.get(key, 0) + n


def _scheme_key(scheme: ReversibleSolver) -> tuple:
    """What the compiled functions of `scheme` depend on besides f."""
    if isinstance(scheme, AsynchronousLeapfrog):
        return ("alf", scheme.eta)
    tableau = scheme.base
    return (scheme.name, scheme.coupling, tuple(tableau._c), tuple(map(tuple, tableau._a)),
            tuple(tableau._b))


def _forward_function(scheme: ReversibleSolver, field: VectorField):
    """The step as a plain function of (t, h, state, carry)."""
    if isinstance(scheme, AsynchronousLeapfrog):
        def leapfrog_step(t: Tensor, h: Tensor, state: Tensor, carry: Tensor | None):
            step = scheme.step(field, t, h, state, carry)
            return step.y, step.error, tuple(step.dense)

        return leapfrog_step
    lam = scheme.coupling

    def reversible_rk_step(t: Tensor, h: Tensor, state: Tensor, carry: Tensor | None):
        y, z = state[0], state[1]
        psi, ks = scheme._increment(field, t, h, z, carry, scheme.stages)
        y_next = psi + torch.lerp(z, y, lam)
        back, _ = scheme._increment(field, t + h, -h, y_next, None, scheme._n_psi)
        return torch.stack([y_next, z - back]), tuple(ks)

    return reversible_rk_step


def _backward_function(scheme: ReversibleSolver, field: VectorField):
    """The backward step as a plain function: the scheme's `reverse` with a local adjoint of
    its own, returning the parameters' running gradient `sums` updated."""

    def backward_step(t: Tensor, h: Tensor, state_next: Tensor, adjoint: Tensor,
                      thetas: Sequence[Tensor], cotangents: Sequence[Tensor],
                      params: Sequence[Tensor], sums: Sequence[Tensor], time_grad: bool):
        with torch.enable_grad():
            if time_grad:
                t, h = t.clone().requires_grad_(), h.clone().requires_grad_()
                thetas = tuple(x.clone().requires_grad_() for x in thetas)
            times = (t, h, *thetas) if time_grad else ()
            local = LocalAdjoint((*params, *times))
            state, adjoint, _ = scheme.reverse(
                field, t, h, state_next, adjoint, list(zip(thetas, cotangents)), local, None)
        n = len(params)
        sums = tuple(s if g is None else s + g for s, g in zip(sums, local.grads[:n]))
        time_bars = tuple(torch.zeros_like(x) if g is None else g
                          for x, g in zip(times, local.grads[n:]))
        return state.detach(), adjoint.detach(), sums, time_bars

    return backward_step


def compiled_reversible(scheme: ReversibleSolver, f: VectorField, field: VectorField,
                        counted: Any, tuple_shapes: Sequence[torch.Size] | None,
                        adaptive: bool) -> CompiledReversible:
    """The compiled twin of the reversible `scheme` for the user's f (`field`: what the step
    calls on the flat state, f itself or its tuple view)."""
    device = counted._device.type
    if tuple_shapes is None:
        return CompiledReversible(scheme, f, f, counted, bool(adaptive), ("plain", device))
    key = ("tuple", tuple(tuple(s) for s in tuple_shapes), device)
    return CompiledReversible(scheme, field, f, counted, bool(adaptive), key)
