"""Gradient methods, by name: each module exposes `solve(problem, **options) -> Tensor`.

A module may also expose `check(problem)`, raising UnsupportedCombinationError when it cannot
serve the problem's solver, `OPTIONS`, the option names it takes, and `options_for(names)`, the
subset it takes next to a method whose own options are `names` (default: all of OPTIONS), and
`solver_for(problem, **options)`, the scheme it solves when that is not the problem's own.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

# name -> module path. Only names whose module exists are offered.
GRADIENT_MODULES: dict[str, str] = {
    "direct": "odegrad.gradients.direct",
    "discrete": "odegrad.gradients.discrete",
    "backsolve": "odegrad.gradients.backsolve",
    "interpolated": "odegrad.gradients.interpolated",
    "reversible": "odegrad.gradients.reversible",
}


def available_gradients() -> list[str]:
    """The gradient names whose implementation is present (looked up once: a module search
    on the file system costs ~0.1 ms a name, and every solve asks)."""
    return list(_present())


@functools.cache
def _present() -> tuple[str, ...]:
    return tuple(name for name, path in GRADIENT_MODULES.items()
                 if importlib.util.find_spec(path) is not None)


def load_gradient(name: str) -> ModuleType:
    from ..errors import UnknownNameError

    valid = available_gradients()
    if name not in valid:
        raise UnknownNameError(f"unknown gradient {name!r}; valid gradients: {', '.join(valid)}")
    return importlib.import_module(GRADIENT_MODULES[name])


def gradient_options(module: ModuleType, method_options: set[str]) -> tuple[str, ...]:
    """The option names gradient `module` consumes next to a method taking `method_options`."""
    options_for = getattr(module, "options_for", None)
    if options_for is not None:
        return tuple(options_for(method_options))
    return tuple(getattr(module, "OPTIONS", ()))
