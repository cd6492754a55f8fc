"""torchsde 0.2.6's name sets (`torchsde.settings`): method, noise, SDE and Lévy-area names.

Each set is a class whose attributes are the names; `NAMES.all()` lists them sorted and
`name in NAMES` tests membership, as torchsde's tests and user code use them. Which of these
names odegrad serves is in methods.py and brownian.py.
"""

from __future__ import annotations

__all__ = ["METHODS", "NOISE_TYPES", "SDE_TYPES", "LEVY_AREA_APPROXIMATIONS", "METHOD_OPTIONS"]


class _NameSet(type):
    """Metaclass: the class's public attributes form a set of strings."""

    def all(cls) -> list[str]:
        return sorted(value for key, value in vars(cls).items() if not key.startswith("_"))

    def __contains__(cls, item: object) -> bool:
        return item in cls.all()

    def __str__(cls) -> str:
        return str(cls.all())


class METHODS(metaclass=_NameSet):
    euler = "euler"
    milstein = "milstein"
    srk = "srk"
    midpoint = "midpoint"
    reversible_heun = "reversible_heun"
    adjoint_reversible_heun = "adjoint_reversible_heun"
    heun = "heun"
    log_ode_midpoint = "log_ode"
    euler_heun = "euler_heun"


class NOISE_TYPES(metaclass=_NameSet):  # noqa: N801 (torchsde's name)
    general = "general"
    diagonal = "diagonal"
    scalar = "scalar"
    additive = "additive"


class SDE_TYPES(metaclass=_NameSet):  # noqa: N801
    ito = "ito"
    stratonovich = "stratonovich"


class LEVY_AREA_APPROXIMATIONS(metaclass=_NameSet):  # noqa: N801
    none = "none"
    space_time = "space-time"
    davie = "davie"
    foster = "foster"


class METHOD_OPTIONS(metaclass=_NameSet):  # noqa: N801
    grad_free = "grad_free"
