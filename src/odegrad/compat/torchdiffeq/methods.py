"""torchdiffeq 0.2.5's method names and the odegrad schemes that serve them."""

from __future__ import annotations

import warnings

from ...errors import InvalidInputError, UnknownNameError
from ...solvers import SOLVERS

# torchdiffeq 0.2.5's methods: (its solver class, family, odegrad's method for the same scheme).
METHODS = {
    "dopri8": ("Dopri8Solver", "adaptive", "dopri8"),
    "dopri5": ("Dopri5Solver", "adaptive", "dopri5"),
    "bosh3": ("Bosh3Solver", "adaptive", "bosh3"),
    "fehlberg2": ("Fehlberg2", "adaptive", "fehlberg2"),
    "adaptive_heun": ("AdaptiveHeunSolver", "adaptive", "heun"),
    "euler": ("Euler", "fixed", "euler"),
    "midpoint": ("Midpoint", "fixed", "midpoint"),
    "heun2": ("Heun2", "fixed", "heun"),  # Heun's method; odegrad's "heun" with fixed steps
    "heun3": ("Heun3", "fixed", "heun3"),
    "rk4": ("RK4", "fixed", "rk4_38"),  # Kutta's 3/8 rule, not odegrad's classical "rk4"
    # fixed-step Adams (solvers/adams.py); options translated by adams_method
    "explicit_adams": ("AdamsBashforth", "adams", "adams_bashforth"),
    "implicit_adams": ("AdamsBashforthMoulton", "adams", "adams_bashforth_moulton"),
    "fixed_adams": ("AdamsBashforthMoulton", "adams", "adams_bashforth_moulton"),
    "scipy_solver": ("ScipyWrapperODESolver", "scipy", None),
}
# The Butcher tableaus (c, a, b, |b - b_hat|) of torchdiffeq's schemes that odegrad gained under
# its own names (rk_common.rk4_alt_step_func, fixed_grid.Heun3, fehlberg2.py); tests/test_compat.py
# checks the odegrad tableaus of METHODS against them.
TORCHDIFFEQ_TABLEAUS = {
    "rk4": ([0, 1 / 3, 2 / 3, 1], [[1 / 3], [-1 / 3, 1], [1, -1, 1]],
            [1 / 8, 3 / 8, 3 / 8, 1 / 8], None),
    "heun3": ([0, 1 / 3, 2 / 3], [[1 / 3], [0, 2 / 3]], [1 / 4, 0, 3 / 4], None),
    "fehlberg2": ([0, 1 / 2, 1], [[1 / 2], [1 / 256, 255 / 256]], [1 / 512, 255 / 256, 1 / 512],
                  [1 / 512, 0, 1 / 512]),
}
MISSING: dict[str, str] = {}
# torchdiffeq 0.2.5's AdamsBashforthMoulton defaults (_impl/fixed_adams.py).
ADAMS_MAX_ORDER, ADAMS_MIN_ORDER, ADAMS_MAX_ITERS = 12, 4, 4


def resolve(name, keyword):
    """(torchdiffeq solver class, family, odegrad method, run with fixed steps) of a method."""
    if not isinstance(name, str) or name not in METHODS:
        raise UnknownNameError(
            f"{keyword}={name!r}: invalid method for torchdiffeq 0.2.5; must be one of "
            f"{', '.join(METHODS)} (odegrad's other schemes: odegrad.odeint)"
        )
    cls, family, og_method = METHODS[name]
    if family == "scipy":  # scipy.integrate.solve_ivp (scipy_solver.py), not an odegrad scheme
        return cls, family, None, False
    if og_method is None or og_method not in SOLVERS:
        raise UnknownNameError(
            f"{keyword}={name!r} (torchdiffeq) is not available in odegrad: {MISSING[name]}"
        )
    fixed_mode = family == "fixed" and SOLVERS[og_method]().adaptive
    return cls, family, og_method, fixed_mode


def adams_method(name: str, options: dict, where: str = "options") -> tuple[str, dict]:
    """odegrad's method and method options for torchdiffeq's Adams `name` and its options.

    torchdiffeq's max_order m (default 12) caps its Adams–Bashforth at order m − 1 and, with
    `implicit` (default True; explicit_adams takes no `implicit`), its Adams–Moulton corrector
    at order m; below m = 4 it warns and takes RK4 (3/8 rule) steps only. `max_iters` (default
    4) bounds the corrector's iterations; explicit steps take no corrector, so there it has no
    effect, in torchdiffeq too.
    """
    if name == "explicit_adams" and "implicit" in options:
        raise TypeError("AdamsBashforth.__init__() got multiple values for keyword argument "
                        "'implicit' (torchdiffeq's explicit_adams is never implicit)")
    implicit = options.get("implicit", name != "explicit_adams")
    max_iters = options.get("max_iters", ADAMS_MAX_ITERS)
    max_order = options.get("max_order", ADAMS_MAX_ORDER)
    if max_order > ADAMS_MAX_ORDER:
        raise AssertionError(f"max_order must be at most {ADAMS_MAX_ORDER}")
    try:
        max_order, max_iters = int(max_order), int(max_iters)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{where}['max_order'] and {where}['max_iters'] must be ints, got "
            f"{options.get('max_order')!r}, {options.get('max_iters')!r}") from None
    if max_order < 2:
        raise InvalidInputError(
            f"{where}['max_order']={max_order}: torchdiffeq keeps max_order − 1 past values and "
            "fails below 2; give max_order from 2 to 12")
    if implicit and max_iters < 1:
        raise InvalidInputError(
            f"{where}['max_iters']={max_iters}: the corrector needs at least one iteration "
            "(torchdiffeq fails with max_iters < 1)")
    if max_order < ADAMS_MIN_ORDER:
        warnings.warn(f"max_order is below {ADAMS_MIN_ORDER}, so the solver reduces to `rk4`.",
                      stacklevel=4)
        return "rk4_38", {}
    if not implicit:
        return "adams_bashforth", {"max_order": max_order - 1}
    return "adams_bashforth_moulton", {"max_order": max_order, "max_iters": max_iters}
