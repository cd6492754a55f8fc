"""odegrad: neural ODEs whose centre is the gradient."""

from . import paths
from .api import Solution, odeint, solve
from .brownian import BrownianInterval
from .cde import cdeint, solve_cde
from .errors import (
    InstabilityError,
    InvalidInputError,
    MaxStepsExceededError,
    NewtonConvergenceError,
    NonFiniteError,
    OdegradError,
    ReversibleDriftWarning,
    StepSizeUnderflowError,
    UnknownNameError,
    UnsupportedCombinationError,
)
from .gradients import available_gradients
from .sde import SDE_METHODS, sdeint, solve_sde
from .solvers import SOLVERS

__version__ = "0.1.0"

METHODS = tuple(sorted(SOLVERS))
GRADIENTS = tuple(available_gradients())

__all__ = [
    "odeint",
    "solve",
    "sdeint",
    "solve_sde",
    "SDE_METHODS",
    "BrownianInterval",
    "cdeint",
    "solve_cde",
    "paths",
    "Solution",
    "METHODS",
    "GRADIENTS",
    "OdegradError",
    "InvalidInputError",
    "UnknownNameError",
    "UnsupportedCombinationError",
    "NonFiniteError",
    "StepSizeUnderflowError",
    "MaxStepsExceededError",
    "InstabilityError",
    "NewtonConvergenceError",
    "ReversibleDriftWarning",
]
