"""A validated ODE problem: what every gradient method receives from the API."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .control import Norm, StepControl, rms_norm
from .loop import DEFAULT_MAX_STEPS, Trajectory, integrate
from .solvers.base import Solver, VectorField


@dataclass
class Problem:
    """y' = f(t, y), y(t[0]) = y0, outputs at t; y0 is one tensor (tuples are flattened).

    `f` counts its evaluations into `stats["nfe_forward"]` or, while `stats` has
    `"_phase" == "backward"`, into `stats["nfe_backward"]`.
    """

    f: VectorField
    y0: Tensor
    t: Tensor
    solver: Solver
    params: tuple[Tensor, ...] = ()
    rtol: Tensor | float = 1e-6
    atol: Tensor | float = 1e-8
    step_size: float | None = None
    adaptive: bool | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    norm: Norm = rms_norm
    stats: dict = field(default_factory=dict)
    module: torch.nn.Module | None = None  # f's module, when f is one (for buffer handling)
    # f was seen to draw random numbers (api.probe_field), e.g. dropout inside a closure.
    draws_random: bool = False
    # The user's step callbacks, each (t, y, h) -> ignored (solve's options of these names): before
    # each step attempt, after each accepted step, after each rejected attempt. `state_view` maps
    # the flat state to the user's (a tuple state's tensors). Called by the forward solve only.
    on_attempt: Callable | None = None
    on_accept: Callable | None = None
    on_reject: Callable | None = None
    state_view: Callable | None = None
    # Adaptive step-size settings (solve's min_step, max_step, safety, ifactor, dfactor), and
    # the indices of t where a step must end (solve's step_t merged into t).
    control: StepControl = field(default_factory=StepControl)
    stops: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from .errors import InvalidInputError

        for name in STEP_CALLBACKS:
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidInputError(
                    f"{name}= must be a callable (t, y, h) or None, got {type(value).__name__}"
                )

    def stochastic(self) -> bool:
        """Whether f's value depends on random draws: active dropout in f's module, or random
        numbers drawn by one probed evaluation of f."""
        return self.draws_random or has_active_dropout(self.module)

    def integrate(self, y0: Tensor | None = None, on_step=None) -> tuple[list[Tensor], Trajectory]:
        """Run the forward loop with this problem's settings (grad mode as the caller has it).

        The user's step callbacks see this run unless it is a re-run of a backward pass
        (`backward_phase`: a double backward's re-run, ...), so each sees every step once."""
        callbacks = {}
        if self.stats.get("_phase") != "backward":
            callbacks = {
                name: _user_callback(getattr(self, name), self.state_view)
                for name in STEP_CALLBACKS if getattr(self, name) is not None
            }
        return integrate(
            self.f, self.y0 if y0 is None else y0, self.t, self.solver,
            rtol=self.rtol, atol=self.atol, step_size=self.step_size, adaptive=self.adaptive,
            max_steps=self.max_steps, norm=self.norm, on_step=on_step, stats=self.stats,
            control=self.control, stops=self.stops, **callbacks,
        )


STEP_CALLBACKS = ("on_attempt", "on_accept", "on_reject")


def _user_callback(callback: Callable, view: Callable | None) -> Callable:
    """The loop's (t_n tensor, observed state, h float) hook calling `callback(t, y, h)` with
    copies: t and h fresh 0-dim tensors (t's dtype and device, made by a copy and a fill kernel,
    so no host synchronisation), y a detached copy in the user's view. Nothing the callback does
    to them reaches the solve or its gradient; its return value is ignored."""

    def hook(t: Tensor, y: Tensor, h: float) -> None:
        y = y.detach().clone()
        callback(
            t.detach().clone(), y if view is None else view(y),
            torch.full((), h, dtype=t.dtype, device=t.device),
        )

    return hook


class CountedField:
    """Wraps f: counts evaluations and checks the first output's shape, dtype and device."""

    def __init__(self, f: VectorField, y0: Tensor, stats: dict, name: str = "f"):
        self.f = f
        self.stats = stats
        self.name = name
        self._checked = False
        self._shape, self._dtype, self._device = y0.shape, y0.dtype, y0.device

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        key = "nfe_backward" if self.stats.get("_phase") == "backward" else "nfe_forward"
        self.stats[key] = self.stats.get(key, 0) + 1
        out = self.f(t, y)
        if not self._checked:
            self._check(out, t)
            self._checked = True
        return out

    def _check(self, out, t) -> None:
        from .errors import InvalidInputError

        where = f"at t={float(t.detach()):.6g}"
        if not isinstance(out, Tensor):
            raise InvalidInputError(
                f"{self.name} returned {type(out).__name__} {where}, not a tensor"
            )
        if out.shape != self._shape:
            raise InvalidInputError(
                f"{self.name} returned shape {tuple(out.shape)} {where}, but y has shape "
                f"{tuple(self._shape)}"
            )
        if out.dtype != self._dtype:
            raise InvalidInputError(
                f"{self.name} returned dtype {out.dtype} {where}, but y has dtype {self._dtype}"
            )
        if out.device != self._device:
            raise InvalidInputError(
                f"{self.name} returned a tensor on {out.device} {where}, but y is on {self._device}"
            )


class TupleField:
    """f on a tuple state, seen as a field on the flat concatenation of its tensors."""

    def __init__(self, f, shapes: list[torch.Size]):
        self.f = f
        self.shapes = shapes
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]

    def unflatten(self, y: Tensor) -> tuple[Tensor, ...]:
        """The tuple of tensors a flat state (with any leading dims) stands for."""
        lead = y.shape[:-1]
        return tuple(
            part.reshape((*lead, *shape))
            for part, shape in zip(torch.split(y, self.sizes, dim=-1), self.shapes)
        )

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        from .errors import InvalidInputError

        out = self.f(t, self.unflatten(y))
        if not isinstance(out, (tuple, list)) or len(out) != len(self.shapes):
            raise InvalidInputError(
                f"f must return a tuple of {len(self.shapes)} tensors for a tuple state, got "
                f"{type(out).__name__}"
            )
        for k, (o, shape) in enumerate(zip(out, self.shapes)):
            if not isinstance(o, Tensor) or o.shape != shape:
                got = tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
                raise InvalidInputError(
                    f"f returned {got} for tuple element {k} at t={float(t.detach()):.6g}, "
                    f"expected shape {tuple(shape)}"
                )
        return torch.cat([o.reshape(-1) for o in out])


@contextmanager
def restored_buffers(module: torch.nn.Module | None) -> Iterator[None]:
    """Put every buffer of `module` back as it was on entry.

    Gradient methods that re-evaluate f in their backward pass wrap it in this, so BatchNorm
    running statistics and other buffers count the forward evaluations once, as with direct
    (ALGORITHMS.md §2, "side effects").
    """
    buffers = [] if module is None else [b for b in module.buffers() if b is not None]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@contextmanager
def backward_phase(problem: Problem) -> Iterator[None]:
    """Count f evaluations into stats["nfe_backward"] while the backward pass runs, and undo
    what its f evaluations write into f's buffers (BatchNorm running statistics, ALGORITHMS.md
    §2 "side effects"): the module is left as the forward pass left it."""
    stats = problem.stats
    previous = stats.get("_phase")
    stats["_phase"] = "backward"
    try:
        with restored_buffers(problem.module):
            yield
    finally:
        if previous is None:
            stats.pop("_phase", None)
        else:
            stats["_phase"] = previous


def probe_graph(f, y0: Tensor, t: Tensor, params: Sequence[Tensor],
                module: torch.nn.Module | None = None) -> tuple[list[Tensor], bool]:
    """The leaves requiring grad that one evaluation f(t0, y0) reaches without passing
    through `params`, and whether the evaluation advanced a random generator."""
    targets = {id(p) for p in params}
    stops = {p.grad_fn for p in params if p.grad_fn is not None}
    generators = [torch.default_generator]
    if y0.device.type == "cuda":
        index = y0.device.index if y0.device.index is not None else torch.cuda.current_device()
        generators.append(torch.cuda.default_generators[index])
    with torch.enable_grad(), restored_buffers(module), torch.random.fork_rng(
        devices=[y0.device] if y0.device.type == "cuda" else []
    ):
        before = [g.get_state() for g in generators]
        out = f(t[0].detach(), y0.detach())
        draws_random = any(not torch.equal(b, g.get_state()) for b, g in zip(before, generators))
    roots = [out.grad_fn] if isinstance(out, Tensor) and out.grad_fn is not None else []
    missing: list[Tensor] = []
    seen: set = set()
    while roots:
        node = roots.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in targets:
                missing.append(variable)
            continue
        roots.extend(next_node for next_node, _ in node.next_functions)
    return missing, draws_random


def has_active_dropout(module: torch.nn.Module | None) -> bool:
    """Whether `module` holds a dropout layer in training mode with p > 0."""
    if module is None:
        return False
    return any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        for m in module.modules()
    )


def validate_tolerance(value, name: str, y0: Tensor | None = None) -> Tensor | float:
    """A non-negative scalar (returned as a float) or per-component tensor (broadcast to y0)."""
    from .errors import InvalidInputError

    if isinstance(value, Tensor):
        if y0 is not None:
            value = value.to(dtype=y0.dtype, device=y0.device)
        if value.numel() > 1:
            if y0 is not None:
                try:
                    torch.broadcast_shapes(value.shape, y0.shape)
                except RuntimeError:
                    raise InvalidInputError(
                        f"{name} of shape {tuple(value.shape)} does not broadcast to y0's shape "
                        f"{tuple(y0.shape)}"
                    ) from None
            if not bool(torch.isfinite(value).all()):
                raise InvalidInputError(f"{name} holds non-finite values (inf or nan)")
            if bool((value < 0).any()):
                raise InvalidInputError(f"{name} must be non-negative")
            return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number or a tensor, got {value!r}") from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise InvalidInputError(f"{name} must be non-negative and finite, got {value}")
    return value
