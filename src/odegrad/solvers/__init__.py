"""One-step schemes, by name.

Explicit Runge–Kutta schemes come from `tableaus`; the modules named in `_PLUGIN_MODULES`
(implicit, reversible, ...) register their own names through `register_solver` when present.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..tableaus import TABLEAUS
from .base import Solver, Step
from .explicit import ExplicitRungeKutta

__all__ = ["Solver", "Step", "ExplicitRungeKutta", "make_solver", "register_solver", "SOLVERS"]

# name -> factory(**options) -> Solver; a factory's keyword arguments are its method options.
SOLVERS: dict = {}


def register_solver(name: str, factory) -> None:
    """Make `method=name` build `factory(**options)`."""
    SOLVERS[name] = factory


def _explicit_factory(tableau):
    def factory() -> ExplicitRungeKutta:
        return ExplicitRungeKutta(tableau)

    return factory


for _name, _tableau in TABLEAUS.items():
    register_solver(_name, _explicit_factory(_tableau))

_PLUGIN_MODULES = ("implicit", "alf", "reversible", "adams")
for _module in _PLUGIN_MODULES:
    if importlib.util.find_spec(f"{__name__}.{_module}") is not None:
        importlib.import_module(f"{__name__}.{_module}")


def make_solver(name: str, **options) -> Solver:
    """Build the solver registered as `name` with its method options."""
    from ..errors import UnknownNameError

    if name not in SOLVERS:
        raise UnknownNameError(
            f"unknown method {name!r}; valid methods: {', '.join(sorted(SOLVERS))}"
        )
    return SOLVERS[name](**options)
