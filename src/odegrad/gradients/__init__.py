"""Gradient methods, by name: each module exposes `solve(problem, **options) -> Tensor`.

A module may also expose `check(problem)`, raising UnsupportedCombinationError when it cannot
serve the problem's solver, and `OPTIONS`, the option names it takes.
"""

from __future__ import annotations

import importlib
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
    """The gradient names whose implementation is present."""
    names = []
    for name, path in GRADIENT_MODULES.items():
        if importlib.util.find_spec(path) is not None:
            names.append(name)
    return names


def load_gradient(name: str) -> ModuleType:
    from ..errors import UnknownNameError

    valid = available_gradients()
    if name not in valid:
        raise UnknownNameError(f"unknown gradient {name!r}; valid gradients: {', '.join(valid)}")
    return importlib.import_module(GRADIENT_MODULES[name])
