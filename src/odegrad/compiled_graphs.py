"""The compiled functions of the custom gradients (compile=True, issue 16): a cache keyed on
the user's f, one fresh code object per entry, and the call that names a torch.compile failure.

The per-step backward functions of gradient="reversible" (compiled_reversible.py) and the
augmented dynamics of gradient="backsolve" (compiled_adjoint.py) take a vector-Jacobian product
inside the compiled region: `torch.autograd.grad` there is traced by dynamo
(torch._dynamo.config.trace_autograd_ops, set for the duration of each call only, so the
user's own torch.compile is left as it is) and AOTAutograd compiles the backward graph of f
into the same function. Called without grad, each is one inference graph: its outputs carry no
graph, so no double backward is ever built.

Like odegrad.compiled's step, every function is compiled once per (f, scheme, kind, shapes,
dtype, device, grad mode) with dynamic=False, its times and step sizes entering as 0-dim
tensors (new values do not recompile), and reused for every step and call.
"""

from __future__ import annotations

import itertools
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import compiled
from .compiled import CompilationError, _is_compile_error
from .errors import OdegradError

# id(owner) -> (owner, {key: compiled function, or the augmented dynamics of compiled_adjoint})
# for the compiled.MAX_FIELDS most recently used fields.
_CACHE: OrderedDict = OrderedDict()
_serial = itertools.count()


def cached(owner: Any, key: Hashable, build: Callable[[], Callable], device: str) -> Callable:
    """The compiled function of `owner` (the user's f) under `key`, from the cache or built
    now with `build()` (the plain function) and torch.compile (lazily, at its first call).
    On the CPU, compiled.CPU_OPTIONS (inductor's C++ wrapper), as odegrad.compiled's step has
    it."""
    entries = held(owner)
    full_key = ("compiled", key, compiled.BACKEND, device)
    function = entries.get(full_key)
    if function is None:
        cpp = compiled.BACKEND == "inductor" and device == "cpu"
        function = entries[full_key] = torch.compile(
            fresh(build()), backend=compiled.BACKEND, dynamic=False, fullgraph=True,
            options=dict(compiled.CPU_OPTIONS) if cpp else None,
        )
    return function


def held(owner: Any) -> dict:
    """The entries kept for `owner` (the user's f), made most recently used; the entry holds
    owner itself, so its id cannot be reused while it is cached."""
    entry = _CACHE.get(id(owner))
    if entry is None:
        entry = _CACHE[id(owner)] = (owner, {})
        while len(_CACHE) > compiled.MAX_FIELDS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(id(owner))
    return entry[1]


def fresh(function: Callable) -> Callable:
    """`function` with its own code object, so that dynamo's per-code cache (and its limit on
    recompilations) holds this entry's graphs only."""
    code = function.__code__.replace(co_name=f"odegrad_compiled_{next(_serial)}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__,
                              function.__closure__)


@contextmanager
def autograd_traced() -> Iterator[None]:
    """torch._dynamo.config.trace_autograd_ops on for the block (5 µs, against 25 µs for
    config.patch; the graphs are traced, at their first call, inside it)."""
    config = torch._dynamo.config
    before = config.trace_autograd_ops
    config.trace_autograd_ops = True
    try:
        yield
    finally:
        config.trace_autograd_ops = before


def call(function: Callable, what: str, *args: Any, autograd: bool = True) -> Any:
    """function(*args), with torch.autograd.grad traceable when `autograd` (a function that
    takes no VJP skips that, ~10 µs a call); torch.compile's own failures raise
    CompilationError naming `what` and torch's reason."""
    try:
        if not autograd:
            return function(*args)
        with autograd_traced():
            return function(*args)
    except OdegradError:
        raise
    except Exception as error:  # dynamo, inductor
        if not _is_compile_error(error):
            raise
        raise CompilationError(
            f"torch.compile failed on {what}: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0]}. Pass compile=False to solve eagerly"
        ) from error
