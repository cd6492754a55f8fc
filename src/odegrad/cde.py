"""Neural controlled differential equations: dz = f(t, z) dX(t), solved as the ODE
dz/dt = f(t, z) · dX/dt(t) (Kidger et al. 2020; ALGORITHMS.md §12) through `odegrad.solve`, so
every ODE method and gradient method serves it.

Knots. dX/dt of a linear or rectilinear path jumps at the knots, and a cubic path's higher
derivatives do, so no step should cross one: cdeint restarts the solve at every knot inside
the output span, and between two knots f is multiplied by that piece's derivative (a step
ending on a knot reads the piece on its left, one starting there the piece on its right).
Steps of `step_size` start again from each knot, the last one before it clipped to land on it
(torchcde's fixed grid from t[0] would cross the knots). The restarts cost one solve per knot
interval: the gradient methods hold their checkpoints per segment, the state at each knot is
kept for the backward pass, and `max_steps` and an int `checkpoints` count per segment. With
gradient="direct" and fixed steps the pieces are one call of solve with the knots as jump_t
(the same steps and values, without the set-up cost of one call per piece).

One exception keeps a single solve: a cubic path (C1 or C2, so the side of a knot does not
matter) with a fixed-step method and no `step_size` takes one step per interval of the union
of the output times and the knots. When that union is evenly spaced (each time within 8 ulps
of its dtype of t_0 + k·gap, so a float32 linspace qualifies), the solve takes fixed steps of
the gap, ending on the knots up to those ulps, and keeps only t's outputs: checkpoints and
memory of one solve (the reversible method's flat in the length). Otherwise the knots are
output times of the solve, whose outputs at every knot are held until the backward pass
(O(length) memory whatever the gradient method; the loop keeps every output it computes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Number

import torch
from torch import Tensor

from .api import Solution, _resolve_method, _validate_t, solve
from .errors import InvalidInputError, UnsupportedCombinationError
from .paths import Path
from .solvers import make_solver

__all__ = ["cdeint", "solve_cde", "ControlledField"]


class ControlledField(torch.nn.Module):
    """The ODE field of a CDE: F(t, z) = f(t, z) · dX/dt(t), a batched matrix–vector product
    of f's (..., hidden, channels) with dX/dt's (..., channels). With `piece` set, dX/dt is read
    from that piece's polynomial (the one-sided derivative at its knots)."""

    def __init__(self, f: Callable, X: Path, z_shape: torch.Size, piece: int | None = None):
        super().__init__()
        self.f, self.X, self.piece, self.z_shape = f, X, piece, z_shape
        self._checked = False

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        matrix = self.f(t, z)
        if self.piece is None:
            control = self.X.derivative(t)
        else:
            control = self.X.derivative_on_piece(t, self.piece)
        if not self._checked:
            self._check(matrix, control)
        return (matrix @ control.unsqueeze(-1)).squeeze(-1)

    def _check(self, matrix: Tensor, control: Tensor) -> None:
        if not isinstance(matrix, Tensor):
            raise InvalidInputError(
                f"f(t, z) must return a tensor (..., hidden, channels), got "
                f"{type(matrix).__name__}")
        hidden, channels = self.z_shape[-1], control.shape[-1]
        if matrix.dim() < 2 or matrix.shape[-2:] != (hidden, channels):
            raise InvalidInputError(
                f"f(t, z) returned shape {tuple(matrix.shape)}; a CDE field must return "
                f"(..., hidden={hidden}, channels={channels}) (z0's last dim, the path's "
                "channels)")
        shape = _broadcast(matrix.shape[:-2], control.shape[:-1])
        if shape is None or shape + (hidden,) != self.z_shape:
            raise InvalidInputError(
                f"the batch shapes of f(t, z) {tuple(matrix.shape[:-2])} and of the path "
                f"{tuple(control.shape[:-1])} do not broadcast to z0's "
                f"{tuple(self.z_shape[:-1])}")
        self._checked = True


def _broadcast(a: Sequence[int], b: Sequence[int]) -> torch.Size | None:
    """The broadcast of two shapes, None if they do not broadcast (torch.broadcast_shapes's
    first call imports its symbolic-shape modules, about 1.7 s on the CPU here)."""
    a, b = (1,) * (len(b) - len(a)) + tuple(a), (1,) * (len(a) - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return None
    return torch.Size(max(x, y) if 1 not in (x, y) else x * y for x, y in zip(a, b))


class SegmentStats(Mapping):
    """The statistics of a solve made of several segments: numbers summed over the segments'
    live `stats` (so the backward pass's counts appear once it has run), others the first's;
    "segments" counts them."""

    def __init__(self, parts: Sequence[dict]):
        self.parts = list(parts)

    def __getitem__(self, key: str):
        if key == "segments":
            return len(self.parts)
        values = [p[key] for p in self.parts if key in p]
        if not values:
            raise KeyError(key)
        if all(isinstance(v, Number) and not isinstance(v, bool) for v in values):
            return sum(values)
        return values[0]

    def __iter__(self) -> Iterator[str]:
        keys = dict.fromkeys(k for p in self.parts for k in p if not k.startswith("_"))
        return iter([*keys, "segments"])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def cdeint(f: Callable, X: Path, z0: Tensor, t: Tensor, **kwargs) -> Tensor:
    """Solve dz = f(t, z) dX(t), z(t[0]) = z0, and return z at every time in t,
    shape (len(t), *z0.shape). Same arguments as `solve_cde`."""
    return solve_cde(f, X, z0, t, **kwargs).ys


def solve_cde(f: Callable, X: Path, z0: Tensor, t: Tensor, *,
              params: Sequence[Tensor] | None = None, **solve_kwargs) -> Solution:
    """Solve dz = f(t, z) dX(t) as dz/dt = f(t, z) · dX/dt(t) and return a `Solution`.

    Args:
        f: f(t, z) -> (..., hidden, channels) for z (..., hidden); its batch dims broadcast
            with the path's to z0's.
        X: an `odegrad.paths` path (linear, rectilinear, hermite_cubic, natural_cubic).
        z0: the initial state (..., hidden), a tensor.
        t: 1-D output times (increasing or decreasing); outside the knots the path's end
            pieces extend.
        params: tensors to differentiate besides z0 and t (default: f.parameters() when f is an
            nn.Module); the path's tensors that require grad (X.tensors(), so the data's
            gradient) are added, so every gradient method differentiates them.
        **solve_kwargs: everything `odegrad.solve` takes (method, rtol, atol, step_size,
            gradient, checkpoints, max_steps, method and gradient options, step callbacks),
            with the same meaning; at the knots as the module docstring says (the solve
            restarts at each knot, except for a cubic path with fixed steps and no step_size).
            event_fn is not supported.
    """
    if not isinstance(X, Path):
        raise InvalidInputError(
            f"X must be an odegrad.paths path (odegrad.paths.linear, rectilinear, "
            f"hermite_cubic, natural_cubic), got {type(X).__name__}; for torchcde's "
            "interpolation objects use odegrad.compat.torchcde.cdeint")
    if not isinstance(z0, Tensor):
        raise InvalidInputError(
            f"z0 must be a tensor (..., hidden), got {type(z0).__name__}; cdeint takes no "
            "tuple states")
    if z0.dim() == 0:
        raise InvalidInputError("z0 must be (..., hidden), got a 0-dim tensor")
    if z0.dtype != X.knots.dtype or z0.device != X.knots.device:
        raise InvalidInputError(
            f"z0 has dtype {z0.dtype} on {z0.device} but the path has {X.knots.dtype} on "
            f"{X.knots.device}; build the path from data of z0's dtype and device")
    for name in ("event_fn", "event_direction"):
        if name in solve_kwargs:
            raise UnsupportedCombinationError(
                f"{name}= is not supported by cdeint; solve the CDE to the final time and "
                "locate the event on the outputs, or use odegrad.solve with ControlledField")
    if params is None:
        params = list(f.parameters()) if isinstance(f, torch.nn.Module) else []
    X, path_params = _separate_tensors(X)
    params = [*params, *path_params]
    t = _validate_t(t, z0)
    one_step_per_interval = (_takes_fixed_steps(solve_kwargs)
                             and solve_kwargs.get("step_size") is None)
    if X.has_derivative_jumps and _jumps_serve(solve_kwargs):
        return _solve_with_jumps(f, X, z0, t, params, solve_kwargs)
    if X.has_derivative_jumps or not one_step_per_interval:
        return _solve_by_pieces(f, X, z0, t, params, solve_kwargs)
    times, requested = _with_knots(t, X)
    spacing = _uniform_spacing(times)
    if spacing is not None and len(times) > len(t):
        # Evenly spaced knots and outputs: fixed steps of that spacing land on every one of
        # them, and only t's own outputs are kept (memory of one solve flat in the length).
        # (solve_kwargs may hold step_size=None: the model passes every setting as is)
        return solve(ControlledField(f, X, z0.shape), z0, t, params=params,
                     **{**solve_kwargs, "step_size": spacing})
    solution = solve(ControlledField(f, X, z0.shape), z0, times, params=params, **solve_kwargs)
    return Solution(ts=t, ys=solution.ys[requested], stats=solution.stats)


def _uniform_spacing(times: Tensor) -> float | None:
    """The common gap of `times` if they are evenly spaced, else None: each time within 8 ulps
    (of the largest |time|, in times' dtype) of t_0 + k·gap, so that fixed steps of the gap end
    on the knots up to rounding (a float32 linspace has gaps that differ by ulps)."""
    values = times.detach().double().cpu()
    if len(values) < 3:
        return None
    span = float(values[-1] - values[0])
    gap = span / (len(values) - 1)
    lattice = values[0] + gap * torch.arange(len(values), dtype=torch.float64)
    tolerance = 8 * torch.finfo(times.dtype).eps * float(values.abs().max())
    if float((values - lattice).abs().max()) > tolerance:
        return None
    return abs(gap)


def _separate_tensors(X: Path) -> tuple[Path, list[Tensor]]:
    """The path reading a fresh view of each of its tensors that requires grad, and those views.

    The custom gradient methods return ∂L/∂p for each parameter p by a VJP of f; for a path's
    coefficients computed from one another (a Hermite 2c from b, ...) that VJP would follow the
    graph from one coefficient into another and count its share twice. Views make each
    parameter a separate node whose history the VJP never enters."""
    views = [p.view_as(p) if p.requires_grad else p for p in X.tensors()]
    return X.with_tensors(views), [p for p in views if p.requires_grad]


def _takes_fixed_steps(solve_kwargs: dict) -> bool:
    method = _resolve_method(solve_kwargs.get("method", "dopri5"))
    adaptive = solve_kwargs.get("adaptive")
    return not (make_solver(method).adaptive if adaptive is None else adaptive)


def _with_knots(t: Tensor, X: Path) -> tuple[Tensor, list[int]]:
    """The output times t together with the knots strictly inside their span, in t's order,
    and the positions of t's own times among them (t's entries stay differentiable)."""
    times = [float(v) for v in t.detach().cpu().tolist()]
    lo, hi = min(times), max(times)
    present = set(times)
    knots = X.knots.detach().to(t.dtype)
    entries = [(value, t[i]) for i, value in enumerate(times)]
    entries += [(float(k), k) for k in knots if lo < float(k) < hi and float(k) not in present]
    descending = len(times) > 1 and times[-1] < times[0]
    entries.sort(key=lambda e: e[0], reverse=descending)
    position = {value: i for i, (value, _) in enumerate(entries)}
    return torch.stack([e[1] for e in entries]), [position[v] for v in times]


def _jumps_serve(solve_kwargs: dict) -> bool:
    """Whether a path with derivative jumps is solved as one call of solve with the knots as
    jump_t (`_solve_with_jumps`) rather than one call per piece (`_solve_by_pieces`): both
    take the same steps, bit for bit the same values, only with fixed steps (adaptive pieces
    would carry the controller's step across a knot, so direct's steps would differ from the
    other gradients', which stay per piece), and only for gradient="direct" without
    count_graph_bytes: under jump_t each piece's solve overwrites stats["checkpoint_bytes"]
    instead of adding to it (step_times.solve_through), which would under-report the memory
    the other gradients hold per piece."""
    return (solve_kwargs.get("gradient", "direct") == "direct"
            and not solve_kwargs.get("count_graph_bytes")
            and _takes_fixed_steps(solve_kwargs)
            and not {"step_t", "jump_t"} & set(solve_kwargs))


def _solve_with_jumps(f: Callable, X: Path, z0: Tensor, t: Tensor, params: list,
                      solve_kwargs: dict) -> Solution:
    """A path whose derivative jumps at the knots: one call of solve with the knots inside t's
    span and t's own times inside as jump_t. The steps are those of `_solve_by_pieces` (the
    solve restarts at every knot and output time); f reads the
    piece's side of a knot at its ends (step_times.OneSidedField moves a time on a jump one ulp
    inside the piece; dX/dt is constant on a piece, so the values are the same), without the
    cost of one call of solve per piece (validation, set-up: ~2.6 ms each here)."""
    values = t.detach()
    lo, hi = values.min(), values.max()
    knots = X.knots.detach().to(t.dtype)
    # t's own times inside are pieces' ends too: the solve restarts there as per piece (fixed
    # steps of step_size from there; a reversible scheme from the observed state)
    jumps = torch.cat([knots, values])
    jumps = torch.unique(jumps[(jumps > lo) & (jumps < hi)])
    options = {"jump_t": jumps} if len(jumps) else {}
    return solve(ControlledField(f, X, z0.shape), z0, t, params=params, **options,
                 **solve_kwargs)


def _solve_by_pieces(f: Callable, X: Path, z0: Tensor, t: Tensor, params: list,
                     solve_kwargs: dict) -> Solution:
    """A path whose derivative jumps at the knots: one solve per interval between the union of
    the output times and the knots, each with its piece's derivative."""
    times, requested = _with_knots(t, X)
    states, stats = [z0], []
    midpoints = (times[1:].detach() + times[:-1].detach()) / 2
    pieces = X.piece_of(midpoints).tolist() if len(times) > 1 else []
    z = z0
    for i, piece in enumerate(pieces):
        field = ControlledField(f, X, z0.shape, piece=int(piece))
        solution = solve(field, z, times[i:i + 2], params=params, **solve_kwargs)
        z = solution.ys[-1]
        states.append(z)
        stats.append(solution.stats)
    if not pieces:  # a single output time: validate through solve
        solution = solve(ControlledField(f, X, z0.shape), z0, t, params=params, **solve_kwargs)
        return solution
    ys = torch.stack([states[i] for i in requested])
    return Solution(ts=t, ys=ys, stats=SegmentStats(stats))
