"""torchsde's method names and the odegrad SDE schemes that serve them.

    torchsde        odegrad scheme (odegrad/solvers/sde.py, sde_reversible.py)   calculus
    euler           euler (Euler–Maruyama)                                        Itô
    milstein        milstein (options grad_free -> derivative_free)               either
    euler_heun      euler_heun                                                    Stratonovich
    heun            heun                                                          Stratonovich
    midpoint        midpoint                                                      Stratonovich
    reversible_heun reversible_heun                                               Stratonovich
    srk             srk (Rößler SRI2 / SRA1, sde_srk.py; not general noise)       Itô

The same updates as torchsde's schemes, step for step, except derivative-free Milstein for a
Stratonovich SDE: odegrad's auxiliary point is y + f h + g √h, torchsde's y + g √h (both strong
order 1). srk reads the space-time Lévy area: the shim's own Brownian motion carries it for
Itô SDEs, a given bm needs levy_area_approximation other than "none" (as in torchsde).
torchsde refuses a scheme of the other calculus and so does the shim (odegrad would
convert the drift). Refused, naming what exists: log_ode (the scheme is not implemented; the
Davie and Foster Lévy areas it reads are), and
adjoint_reversible_heun as a forward method (torchsde refuses it too).
"""

from __future__ import annotations

from ...errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError
from .settings import METHOD_OPTIONS, METHODS, NOISE_TYPES, SDE_TYPES

__all__ = ["SERVED", "select_method", "default_adjoint_method"]

# torchsde name -> (odegrad name, the calculus it needs: None for either)
SERVED = {
    METHODS.euler: ("euler", SDE_TYPES.ito),
    METHODS.milstein: ("milstein", None),
    METHODS.euler_heun: ("euler_heun", SDE_TYPES.stratonovich),
    METHODS.heun: ("heun", SDE_TYPES.stratonovich),
    METHODS.midpoint: ("midpoint", SDE_TYPES.stratonovich),
    METHODS.reversible_heun: ("reversible_heun", SDE_TYPES.stratonovich),
    METHODS.srk: ("srk", SDE_TYPES.ito),
}
# served methods without general noise
_NOT_GENERAL = (METHODS.milstein, METHODS.srk)
_MISSING = {
    METHODS.log_ode_midpoint: "the log-ODE scheme 'log_ode' is not implemented in odegrad "
                              "(its Davie/Foster Lévy areas are: BrownianInterval)",
}


def _served_for(sde_type: str, noise_type: str) -> list[str]:
    return sorted(name for name, (_, calculus) in SERVED.items()
                  if calculus in (None, sde_type)
                  and not (name in _NOT_GENERAL and noise_type == NOISE_TYPES.general))


def default_method(sde_type: str, noise_type: str) -> str:
    """torchsde's default: srk for Itô (euler for general noise), midpoint for Stratonovich."""
    if sde_type == SDE_TYPES.stratonovich:
        return METHODS.midpoint
    return METHODS.euler if noise_type == NOISE_TYPES.general else METHODS.srk


def select_method(method: str | None, sde_type: str, noise_type: str,
                  options: dict | None) -> tuple[str, dict]:
    """(odegrad method name, its options) for torchsde's `method` and `options`."""
    chosen = default_method(sde_type, noise_type) if method is None else method
    served = ", ".join(repr(n) for n in _served_for(sde_type, noise_type))
    if chosen not in METHODS:
        raise UnknownNameError(f"Expected method in {METHODS}, but found {chosen}.")
    if chosen == METHODS.adjoint_reversible_heun:
        raise InvalidInputError(
            f"{METHODS.adjoint_reversible_heun} can only be used for adjoint_method.")
    if chosen in _MISSING:
        default = " (torchsde's default for this SDE)" if method is None else ""
        raise UnsupportedCombinationError(
            f"method={chosen!r}{default}: {_MISSING[chosen]}; methods for a {sde_type} SDE with "
            f"{noise_type} noise: {served}")
    name, calculus = SERVED[chosen]
    if calculus is not None and calculus != sde_type:
        raise UnsupportedCombinationError(
            f"SDE is of type {sde_type} but solver {chosen!r} is for type {calculus}; methods "
            f"for a {sde_type} SDE with {noise_type} noise: {served}")
    if chosen in _NOT_GENERAL and noise_type == NOISE_TYPES.general:
        raise UnsupportedCombinationError(
            f"SDE has noise type general but solver {chosen!r} only supports noise types "
            f"additive, diagonal, scalar; methods for a {sde_type} SDE with general noise: "
            f"{served}")
    return name, _method_options(chosen, options)


def _method_options(method: str, options: dict | None) -> dict:
    options = {} if options is None else dict(options)
    if method == METHODS.milstein:
        unknown = sorted(set(options) - {METHOD_OPTIONS.grad_free})
        if not unknown:
            return {"derivative_free": bool(options.get(METHOD_OPTIONS.grad_free, False))}
    else:
        unknown = sorted(options)
    if unknown:
        takes = "grad_free" if method == METHODS.milstein else "no options"
        raise UnknownNameError(
            f"options {unknown} are not options of method {method!r} (it takes {takes}); "
            "torchsde would ignore them")
    return {}


def default_adjoint_method(method: str, sde_type: str, noise_type: str) -> str:
    """torchsde's default adjoint_method (for Itô SDEs the shim takes midpoint instead:
    sdeint.py `_adjoint_gradient`)."""
    if method == METHODS.reversible_heun:
        return METHODS.adjoint_reversible_heun
    if sde_type == SDE_TYPES.stratonovich:
        return METHODS.midpoint
    return METHODS.milstein if noise_type == NOISE_TYPES.diagonal else METHODS.euler
