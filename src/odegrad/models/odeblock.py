"""ODEBlock: y(t_1) = y(t_0) + ∫ f(t, y) dt as a layer, with any method and any gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..api import solve


class ODEBlock(nn.Module):
    """Solve y' = func(t, y) from the input and return the state at the last time (or all).

    Every solver setting is fixed at construction and passed to `odegrad.solve` as is, so any
    method and any gradient works. The parameters of `func` are handed to the solve explicitly
    (`params=`): the gradient methods built on custom autograd functions then return them as
    ordinary parameter gradients, which DistributedDataParallel reduces like any other.

    After each forward pass `stats` holds the solve's statistics; its backward counters
    (nfe_backward, ...) are filled in once `loss.backward()` has run.
    """

    def __init__(
        self,
        func: nn.Module,
        t: Sequence[float] | Tensor = (0.0, 1.0),
        *,
        method: str = "dopri5",
        gradient: str = "direct",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        step_size: float | None = None,
        checkpoints: str | int | None = None,
        **options,
    ):
        super().__init__()
        self.func = func
        times = tuple(float(v) for v in torch.as_tensor(t, dtype=torch.float64).reshape(-1))
        if len(times) < 2:
            raise ValueError(f"ODEBlock needs at least two times, got {list(times)}")
        self.times = times  # Python floats: exact in any dtype the input comes in
        self._t_cache: dict = {}
        self.method = method
        self.gradient = gradient
        self.rtol, self.atol, self.step_size = rtol, atol, step_size
        self.checkpoints = checkpoints
        self.options = options
        self.stats: dict = {}

    def solve(self, y0: Tensor, t: Tensor | None = None) -> Tensor:
        """y at every time of `t` (default: the block's times), shape (len(t), *y0.shape)."""
        t = self.t_like(y0) if t is None else t.to(dtype=y0.dtype, device=y0.device)
        params = [p for p in self.func.parameters() if p.requires_grad]
        solution = solve(
            self.func, y0, t, method=self.method, gradient=self.gradient, rtol=self.rtol,
            atol=self.atol, step_size=self.step_size, checkpoints=self.checkpoints,
            params=params, **self.options,
        )
        self.stats = solution.stats
        return solution.ys

    def t_like(self, y: Tensor) -> Tensor:
        """The block's times as a tensor of y's dtype and device (built once per kind)."""
        key = (y.dtype, y.device)
        if key not in self._t_cache:
            self._t_cache[key] = torch.tensor(self.times, dtype=y.dtype, device=y.device)
        return self._t_cache[key]

    def forward(self, y0: Tensor) -> Tensor:
        return self.solve(y0)[-1]

    def extra_repr(self) -> str:
        settings = f"method={self.method!r}, gradient={self.gradient!r}"
        if self.step_size is not None:
            settings += f", step_size={self.step_size}"
        if self.checkpoints is not None:
            settings += f", checkpoints={self.checkpoints!r}"
        return settings + f", t={list(self.times)}"
