"""torchdiffeq 0.2.5's method names and the odegrad schemes that serve them."""

from __future__ import annotations

from ...errors import UnknownNameError
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
    "explicit_adams": ("AdamsBashforth", "adams", None),
    "implicit_adams": ("AdamsBashforthMoulton", "adams", None),
    "fixed_adams": ("AdamsBashforthMoulton", "adams", None),
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
MISSING = {
    "explicit_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
    "implicit_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
    "fixed_adams": "odegrad has no Adams multistep methods (one-step schemes only)",
}


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
