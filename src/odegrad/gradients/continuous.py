"""What the continuous adjoints share (ALGORITHMS.md §3, §4): the augmented adjoint field, its
flat layout and error norm, and the backward sweep over the output intervals.

Between output times the adjoint a = ∂L/∂y(t) and the parameter gradient μ solve, backwards,

    da/dt = −a^T ∂f/∂y(t, y(t)),   dμ/dt = −a^T ∂f/∂θ(t, y(t)),

with y(t) either solved alongside (dy/dt = f, "backsolve") or read from an interpolant
("interpolated"). At each output time t_i, a += ∂L/∂y(t_i) (and backsolve resets y to the
stored y(t_i)). One evaluation of the augmented field is one f evaluation and one VJP: a single
`torch.autograd.grad` of f(t, y) with cotangent a gives a^T J and a^T P together.

The time gradients are closed forms, so no time adjoint is integrated:
∂L/∂t_i = ∂L/∂y(t_i)^T f(t_i, y(t_i)) for i ≥ 1 (an output time moves only its own output) and
∂L/∂t_0 = −a(t_0⁺)^T f(t_0, y_0), a(t_0⁺) the adjoint before ∂L/∂y(t_0) is added (moving t_0
with y_0 fixed shifts the whole trajectory: ∂y(t)/∂t_0 = −Φ(t, t_0) f(t_0, y_0)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..control import Norm, rms_norm
from ..errors import (
    InvalidInputError,
    NonFiniteError,
    OdegradError,
    UnsupportedCombinationError,
)
from ..loop import integrate
from ..problem import Problem, backward_phase, validate_tolerance
from ..solvers import make_solver
from ..solvers.base import Solver
from .second_order import differentiable_backward

ADJOINT_HOOKS = ("adjoint_on_attempt", "adjoint_on_accept", "adjoint_on_reject")
OPTIONS = ("adjoint_method", "adjoint_rtol", "adjoint_atol", "adjoint_step_size", "adjoint_norm",
           *ADJOINT_HOOKS)
NORMS = ("seminorm", "full")


@dataclass
class AdjointSettings:
    """How the backward solve is integrated."""

    solver: Solver
    rtol: Tensor | float
    atol: Tensor | float
    step_size: float | None  # fixed: the step; adaptive: the first step (None: see `sweep`)
    adaptive: bool
    seminorm: bool
    max_steps: int
    hooks: dict = field(default_factory=dict)  # adjoint_on_* name -> the user's callable


def adjoint_settings(
    problem: Problem,
    adjoint_method: str | None = None,
    adjoint_rtol: float | Tensor | None = None,
    adjoint_atol: float | Tensor | None = None,
    adjoint_step_size: float | None = None,
    adjoint_norm: str = "seminorm",
    adjoint_on_attempt: Callable | None = None,
    adjoint_on_accept: Callable | None = None,
    adjoint_on_reject: Callable | None = None,
    *,
    interpolant: bool = False,
) -> AdjointSettings:
    """The backward solve's settings; each defaults to the forward solve's.

    A fixed-step `adjoint_method` after an adaptive forward solve needs `adjoint_step_size`
    (the forward has no step size to share, and one step per output interval would be a
    silently inaccurate gradient). With `interpolant` (the interpolated adjoint, whose y(t) is
    known only on [t_0, T]) the backward scheme's stages must lie inside its steps: a scheme
    with a stage node c outside [0, 1] (kvaerno5: c = 1.23) is refused when asked for and, when
    it is only the forward's method, replaced by kvaerno3 (same family, every c in [0, 1]).

    `adjoint_on_attempt`, `adjoint_on_accept`, `adjoint_on_reject`: step hooks of the backward
    solve (see `BackwardHooks`).
    """
    hooks = {name: value for name, value in zip(ADJOINT_HOOKS, (
        adjoint_on_attempt, adjoint_on_accept, adjoint_on_reject)) if value is not None}
    for name, value in hooks.items():
        if not callable(value):
            raise InvalidInputError(
                f"{name}= must be a callable (t, z, h) or None, got {type(value).__name__}"
            )
    if adjoint_norm not in NORMS:
        raise InvalidInputError(
            f"adjoint_norm must be one of {', '.join(map(repr, NORMS))}, got {adjoint_norm!r}"
        )
    if adjoint_method is None:
        solver, adaptive = problem.solver, bool(problem.adaptive)
        if interpolant and not _stages_inside_step(solver):
            solver = make_solver("kvaerno3", **{
                name: getattr(solver, name) for name in _IMPLICIT_SHARED_OPTIONS
                if hasattr(solver, name)
            })
    else:
        solver = make_solver(adjoint_method)
        adaptive = solver.adaptive
        if interpolant and not _stages_inside_step(solver):
            raise UnsupportedCombinationError(
                f"adjoint_method={adjoint_method!r} has a stage outside its step (c = "
                f"{max(_stage_nodes(solver)):.4g}), where the interpolated adjoint has no y(t) "
                "at the first output time; use a method whose stage nodes lie in [0, 1] (e.g. "
                "'kvaerno3', 'dopri5') or gradient='backsolve'"
            )
        if not adaptive and adjoint_step_size is None and problem.adaptive:
            raise InvalidInputError(
                f"adjoint_method={adjoint_method!r} takes fixed steps, but the forward solve "
                "was adaptive, so there is no step size to reuse: give adjoint_step_size= (or "
                "an adaptive adjoint_method)"
            )
    step_size = adjoint_step_size
    if step_size is None and not adaptive:
        step_size = problem.step_size
    if step_size is not None:
        try:
            step_size = -1.0 if isinstance(step_size, bool) else float(step_size)
        except (TypeError, ValueError):
            step_size = -1.0
        if not (step_size > 0.0 and math.isfinite(step_size)):
            raise InvalidInputError(
                f"adjoint_step_size must be a positive number, got {adjoint_step_size!r}"
            )
    return AdjointSettings(
        solver=solver,
        rtol=validate_tolerance(
            problem.rtol if adjoint_rtol is None else adjoint_rtol, "adjoint_rtol"
        ),
        atol=validate_tolerance(
            problem.atol if adjoint_atol is None else adjoint_atol, "adjoint_atol"
        ),
        step_size=step_size, adaptive=adaptive, seminorm=adjoint_norm == "seminorm",
        max_steps=problem.max_steps, hooks=hooks,
    )


def check(problem: Problem) -> None:
    """The continuous adjoints re-evaluate f at new points in the backward pass: active dropout
    would draw masks the forward never used, a silently wrong gradient."""
    if problem.stochastic():
        raise UnsupportedCombinationError(
            "gradient='backsolve' and 'interpolated' need a deterministic f, but f draws random "
            "numbers (active dropout or noise): the backward pass would draw new ones at every "
            "evaluation; call f.eval() or use gradient='discrete' (which replays the forward "
            "pass's draws) or 'direct'"
        )


# Options of an implicit forward solver that its kvaerno3 stand-in keeps.
_IMPLICIT_SHARED_OPTIONS = ("linear_solver", "batch_independent", "preconditioner")


def _stage_nodes(solver: Solver) -> list[float]:
    """The stage nodes c_i of a Runge–Kutta solver (its own or its base's tableau)."""
    tableau = getattr(solver, "tableau", None) or getattr(getattr(solver, "base", None),
                                                          "tableau", None)
    return [] if tableau is None else [float(c) for c in tableau.c]


def _stages_inside_step(solver: Solver) -> bool:
    return all(0.0 <= c <= 1.0 for c in _stage_nodes(solver))


class Layout:
    """An augmented state (n_state blocks shaped like y, then one block per parameter) kept as
    one flat tensor, so that the core loop and solvers advance it unchanged."""

    def __init__(self, state_shape: torch.Size, n_state: int, params: Sequence[Tensor]):
        self.state_shape = state_shape
        self.n_state = n_state
        self.state_size = n_state * state_shape.numel()
        self.shapes = [state_shape] * n_state + [p.shape for p in params]
        self.sizes = [s.numel() for s in self.shapes]

    def pack(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    def unpack(self, z: Tensor) -> list[Tensor]:
        """Views of the blocks of z."""
        return [b.view(s) for b, s in zip(torch.split(z, self.sizes), self.shapes)]

    def norm(self, state_norm: Norm, seminorm: bool) -> Norm:
        """max over blocks of each block's norm: `state_norm` (the forward's) for the blocks
        shaped like y, RMS per parameter; the seminorm leaves the parameter blocks out
        (Kidger et al. 2021)."""
        n_params = 0 if seminorm else len(self.shapes) - self.n_state
        param_sizes = self.sizes[self.n_state:self.n_state + n_params]
        end = self.state_size + sum(param_sizes)
        fused = state_norm is rms_norm  # one reduction for all the y-shaped blocks

        def norm(x: Tensor) -> Tensor:
            state = x[: self.state_size].view(self.n_state, -1)
            if fused:
                values = [state.pow(2).mean(1).sqrt()]
            else:
                values = [state_norm(b.view(self.state_shape)).reshape(1) for b in state]
            if n_params:
                blocks = torch.split(x[self.state_size:end], param_sizes)
                values += [rms_norm(b).reshape(1) for b in blocks]
            return torch.cat(values).max()

        return norm

    def tolerance(self, value: Tensor | float) -> Tensor | float:
        """A per-component tolerance of y, laid out over the augmented state (each parameter
        block gets the tensor's smallest entry)."""
        if not isinstance(value, Tensor):
            return value
        state = value.expand(self.state_shape).reshape(-1)
        smallest = value.min()
        parts = [state] * self.n_state + [smallest.expand(n) for n in self.sizes[self.n_state:]]
        return torch.cat(parts)


def field_vjp(
    problem: Problem, t: Tensor, y: Tensor, a: Tensor, create_graph: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """f(t, y) and the VJP [a^T ∂f/∂y, a^T ∂f/∂θ_1, ...] from one `torch.autograd.grad`.

    With `create_graph` (an implicit adjoint method differentiating the augmented field), the
    results stay differentiable w.r.t. y and a.
    """
    with torch.enable_grad():
        y_in = y if create_graph and y.requires_grad else y.detach().requires_grad_()
        fy = problem.f(t.detach() if isinstance(t, Tensor) else t, y_in)
        inputs = (y_in, *problem.params)
        if not fy.requires_grad:  # f ignores y and every parameter
            return fy, [torch.zeros_like(x) for x in inputs]
        vjps = torch.autograd.grad(
            fy, inputs, a, allow_unused=True, materialize_grads=True, create_graph=create_graph
        )
    return (fy if create_graph else fy.detach()), list(vjps)


class AugmentedField:
    """dz/dt of the augmented state z = (y, a, μ) (backsolve) or (a, μ) with y = y_of(t)."""

    def __init__(self, problem: Problem, layout: Layout, y_of: Callable[[Tensor], Tensor] | None):
        self.problem = problem
        self.layout = layout
        self.y_of = y_of

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        parts = self.layout.unpack(z)
        if self.y_of is None:
            y, a = parts[0], parts[1]
        else:
            y, a = self.y_of(t), parts[0]
        create_graph = torch.is_grad_enabled() and z.requires_grad
        fy, vjps = field_vjp(self.problem, t, y, a, create_graph)
        head = [fy] if self.y_of is None else []
        out = self.layout.pack(head + vjps)
        if create_graph:
            return torch.cat([out[: fy.numel() * len(head)], -out[fy.numel() * len(head):]])
        out[fy.numel() * len(head):].neg_()
        return out


class BackwardHooks:
    """The backward solve's step hooks (backsolve's and interpolated's options
    `adjoint_on_attempt`, `adjoint_on_accept`, `adjoint_on_reject`), the counterparts of solve's
    on_attempt / on_accept / on_reject for the adjoint's own steps.

    Each is called as hook(t, z, h): `adjoint_on_attempt` before each step attempt of the
    backward solve (t_n, z_n, h), `adjoint_on_accept` after each accepted step (t_n, z_{n+1},
    h_n: the state at the step's end, as on_accept), `adjoint_on_reject` after each rejected
    attempt (t_n, z_n, the rejected h); once per count in stats n_steps_backward,
    n_accepted_backward, n_rejected_backward. t and h are 0-dim tensors of t's dtype, h signed
    in the backward direction (negative when the forward t increases). z = (y, a, *μ), detached
    copies: y(t) (backsolve: the re-solved state; interpolated: the interpolant's value), the
    adjoint a(t) = ∂L/∂y(t) (both in the user's view: tuples for a tuple state), and one
    tensor per parameter, μ_k = the part of ∂L/∂θ_k gathered from t to the last output time.
    The return value is ignored. No hook runs in a double backward (create_graph=True), which
    differentiates the forward scheme and has no backward solve.
    """

    def __init__(self, problem: Problem, layout: Layout, hooks: dict,
                 y_of: Callable[[Tensor], Tensor] | None):
        self.view, self.layout, self.y_of = problem.state_view, layout, y_of
        self.hooks = hooks

    def options(self) -> dict:
        """The loop's on_attempt / on_accept / on_reject calling the user's hooks."""
        return {name[len("adjoint_"):]: self._hook(user, name == "adjoint_on_accept")
                for name, user in self.hooks.items()}

    def _hook(self, user: Callable, at_end: bool) -> Callable:
        def hook(t: Tensor, z: Tensor, h: float) -> None:
            parts = [p.detach().clone() for p in self.layout.unpack(z)]
            if self.y_of is None:
                y, a, mu = parts[0], parts[1], parts[2:]
            else:
                s = t.detach() + h if at_end else t.detach()
                y, a, mu = self.y_of(s).detach().clone(), parts[0], parts[1:]
            if self.view is not None:
                y, a = self.view(y), self.view(a)
            user(t.detach().clone(), (y, a, *mu),
                 torch.full((), h, dtype=t.dtype, device=t.device))

        return hook


def backward_with_graph(problem: Problem, grad_ys: Tensor, needs) -> list[Tensor | None]:
    """Double backward (create_graph=True): the gradients w.r.t. (y0, t, *params) as direct
    gives them through the forward scheme, differentiable (gradients/second_order.py)."""
    with backward_phase(problem):
        return differentiable_backward(
            problem, grad_ys, [problem.y0, problem.t, *problem.params], needs
        )


def sweep(
    problem: Problem,
    ys: Tensor,
    grad_ys: Tensor,
    settings: AdjointSettings,
    interpolant: Callable[[int], Callable[[Tensor], Tensor]] | None = None,
    first_step: float | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Integrate the adjoint from t[-1] back to t[0], interval by interval.

    `interpolant(i)` gives y(t) on [t_i, t_{i+1}] (interpolated adjoint); None re-solves y
    (backsolve). Returns a(t_0⁺) — before ∂L/∂y(t_0) is added — and μ = ∂L/∂θ.
    An adaptive backward solve starts with `settings.step_size` if set, else `first_step` (the
    forward's last step, whose time scale the adjoint shares), else the automatic choice; each
    later interval starts with the last step of the one before.
    """
    stats = problem.stats
    t = problem.t.detach()
    layout = Layout(problem.y0.shape, 2 if interpolant is None else 1, problem.params)
    norm = layout.norm(problem.norm, settings.seminorm)
    rtol, atol = layout.tolerance(settings.rtol), layout.tolerance(settings.atol)
    a = grad_ys[-1] if len(t) > 1 else torch.zeros_like(grad_ys[0])
    mu = [torch.zeros_like(p) for p in problem.params]
    step_size = settings.step_size
    if settings.adaptive and step_size is None:
        step_size = first_step
    for i in range(len(t) - 1, 0, -1):
        head = [ys[i]] if interpolant is None else []
        field = AugmentedField(problem, layout, None if interpolant is None else interpolant(i - 1))
        interval = torch.stack([t[i], t[i - 1]])
        local: dict = {}
        hooks = {}
        if settings.hooks:
            hooks = BackwardHooks(problem, layout, settings.hooks, field.y_of).options()
        try:
            outputs, trajectory = integrate(
                field, layout.pack(head + [a] + mu), interval, settings.solver, rtol=rtol,
                atol=atol, step_size=step_size, adaptive=settings.adaptive,
                max_steps=settings.max_steps, norm=norm, stats=local, **hooks,
            )
        except NonFiniteError as error:
            raise NonFiniteError(
                f"in the backward (adjoint) solve from t={float(t[i]):.10g} to "
                f"t={float(t[i - 1]):.10g}: "
                + str(error).replace("f returned", "the adjoint dynamics (f and its "
                                     "vector-Jacobian products a^T ∂f/∂y, a^T ∂f/∂θ) returned", 1)
                + "; the forward solve was finite there, so a derivative of f is singular "
                "(e.g. sqrt or log at 0) or the backward re-solve of y diverged"
            ) from error
        except OdegradError as error:
            raise type(error)(
                f"in the backward (adjoint) solve from t={float(t[i]):.10g} to "
                f"t={float(t[i - 1]):.10g}: {error}"
            ) from error
        for key in ("n_steps", "n_accepted", "n_rejected"):
            stats[f"{key}_backward"] = stats.get(f"{key}_backward", 0) + local[key]
        parts = layout.unpack(outputs[-1])
        a, mu = parts[layout.n_state - 1], parts[layout.n_state:]
        if i > 1:
            a = a + grad_ys[i - 1]
        if settings.adaptive:
            step_size = last_step(trajectory.steps) or step_size
    return a, list(mu)


def last_step(steps: Sequence) -> float | None:
    """|h| of the last accepted step that was not clipped to land on an output time."""
    if not steps:
        return None
    return abs(steps[-2].h if len(steps) > 1 else steps[-1].h)


def time_gradient(problem: Problem, ys: Tensor, grad_ys: Tensor, a0: Tensor) -> Tensor:
    """∂L/∂t_i = g_i^T f(t_i, y_i) for i ≥ 1 and ∂L/∂t_0 = −a(t_0⁺)^T f(t_0, y_0) (§3)."""
    t = problem.t.detach()
    dots = [-(a0 * problem.f(t[0], ys[0])).sum()]
    dots += [(grad_ys[i] * problem.f(t[i], ys[i])).sum() for i in range(1, len(t))]
    return torch.stack(dots)


def state_bytes(*tensors: Tensor) -> int:
    """Bytes held by the given tensors."""
    return sum(x.numel() * x.element_size() for x in tensors)
