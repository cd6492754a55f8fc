"""The checkpoints of the discrete adjoint (gradients/discrete.py): what one kept step holds, a
store that counts its bytes deterministically (each tensor once), and the packing of the store
into autograd's saved tensors between the forward and the backward pass."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ..solvers.base import Step

_INIT = object()  # the carry of step 0: the solver's `init`, re-run when needed


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors inside a carry, a list of stages or a Step."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Step):
        obj = (obj.y, obj.error, obj.dense, obj.carry)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [x for item in obj for x in _tensors(item)]
    return []


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


@dataclasses.dataclass
class _Kept:
    """One checkpoint: the state at the start of step n, and per policy its carry, its stages
    (explicit Runge–Kutta, "all") or its whole Step (solvers with step_vjp, "all")."""

    state: Tensor
    carry: Any = None
    stages: list[Tensor] | None = None
    step: Step | None = None

    def tensors(self) -> list[Tensor]:
        out = [self.state]
        if self.carry is not None and self.carry is not _INIT:
            out += _tensors(self.carry)
        if self.stages is not None:
            out += [k for k in self.stages if k is not None]
        if self.step is not None:
            out += _tensors(self.step)
        return out


class _Store:
    """The checkpoints, with a deterministic count of the bytes they hold (each tensor once)."""

    def __init__(self):
        self.kept: dict[int, _Kept] = {}
        self._refs: dict[int, list] = {}
        self.bytes = 0
        self.peak = 0

    def save(self, n: int, kept: _Kept) -> None:
        if n in self.kept:
            self.delete(n)
        self.kept[n] = kept
        for x in kept.tensors():
            ref = self._refs.get(id(x))
            if ref is None:
                self._refs[id(x)] = [x, 1]
                self.bytes += _nbytes(x)
            else:
                ref[1] += 1
        self.peak = max(self.peak, self.bytes)

    def extra_bytes(self, kept: _Kept) -> int:
        """What saving `kept` would add."""
        new = {id(x): x for x in kept.tensors() if id(x) not in self._refs}
        return sum(_nbytes(x) for x in new.values())

    def delete(self, n: int) -> None:
        for x in self.kept.pop(n).tensors():
            ref = self._refs[id(x)]
            ref[1] -= 1
            if ref[1] == 0:
                del self._refs[id(x)]
                self.bytes -= _nbytes(x)


class _Slot:
    """Where a packed tensor lies in the saved tensors."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _slot(x: Tensor, saved: list[Tensor], index: dict[int, int]) -> _Slot:
    i = index.get(id(x))
    if i is None:
        i = index[id(x)] = len(saved)
        saved.append(x)
    return _Slot(i)


def _pack(obj: Any, saved: list[Tensor], index: dict[int, int]) -> Any:
    """obj with every tensor replaced by its slot in `saved` (each tensor saved once)."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return _slot(obj, saved, index)
    if isinstance(obj, (list, tuple)):
        items = [_pack(x, saved, index) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _pack(v, saved, index) for k, v in obj.items()}
    if type(obj) is _Kept:  # the common case, without dataclasses.replace's introspection
        stages = obj.stages
        if stages is not None:
            stages = [None if k is None else _slot(k, saved, index) for k in stages]
        return _Kept(_slot(obj.state, saved, index), _pack(obj.carry, saved, index), stages,
                     _pack(obj.step, saved, index))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{
            f.name: _pack(getattr(obj, f.name), saved, index)
            for f in dataclasses.fields(obj) if f.init
        })
    return obj


def _unpack(obj: Any, saved: tuple[Tensor, ...]) -> Any:
    if obj is None:
        return None
    if isinstance(obj, _Slot):
        return saved[obj.index]
    if isinstance(obj, (list, tuple)):
        items = [_unpack(x, saved) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _unpack(v, saved) for k, v in obj.items()}
    if type(obj) is _Kept:
        stages = obj.stages
        if stages is not None:
            stages = [None if k is None else saved[k.index] for k in stages]
        return _Kept(saved[obj.state.index], _unpack(obj.carry, saved), stages,
                     _unpack(obj.step, saved))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{
            f.name: _unpack(getattr(obj, f.name), saved)
            for f in dataclasses.fields(obj) if f.init
        })
    return obj
