"""Random streams for the discrete adjoint (gradients/discrete.py): a seed for every evaluation of
f in the forward pass, so that a re-run in the backward pass draws the same random numbers
(dropout masks) without storing them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..solvers.base import Solver


class _Streams:
    """A seed for every evaluation of f, so that a re-run draws the same random numbers."""

    def __init__(self, device: torch.device):
        self.base = int(torch.randint(0, 2**62, ()))
        self.generators = [torch.default_generator]
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.generators.append(torch.cuda.default_generators[index])
        self.count = 0
        self.key_of: dict[int, int] = {}  # id(f's output) -> its key, for explicit stages
        self.attempt = range(0)  # keys of the last solver.step / solver.init call
        self.init_keys = range(0)

    def seed(self, key: int) -> None:
        seed = (self.base + 0x9E3779B97F4A7C15 * (key + 1)) % 2**63
        for generator in self.generators:  # torch.manual_seed would cost ~0.4 ms
            generator.manual_seed(seed)

    def recording(self, f: Callable) -> Callable:
        """f for the forward pass: each call seeded with a new key."""

        def call(t, y):
            key = self.count
            self.count += 1
            self.seed(key)
            out = f(t, y)
            self.key_of[id(out)] = key
            return out

        return call

    def replaying(self, f: Callable, keys) -> Callable:
        """f for a re-run: the calls take `keys` in order."""
        it = iter(keys)

        def call(t, y):
            self.seed(next(it))
            return f(t, y)

        return call


class _KeyedSolver:
    """A solver seen by the forward loop that notes which keys each init/step call drew."""

    def __init__(self, solver: Solver, streams: _Streams):
        self._solver = solver
        self._streams = streams

    def __getattr__(self, name):
        return getattr(self._solver, name)

    def init(self, f, t0, y0):
        start = self._streams.count
        carry = self._solver.init(f, t0, y0)
        self._streams.init_keys = range(start, self._streams.count)
        return carry

    def step(self, f, t, h, y, carry, **options):
        start = self._streams.count
        step = self._solver.step(f, t, h, y, carry, **options)
        self._streams.attempt = range(start, self._streams.count)
        return step



def _forked_rng(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
