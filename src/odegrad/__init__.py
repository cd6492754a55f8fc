"""odegrad: neural ODEs whose centre is the gradient."""

from .api import Solution, odeint, solve
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
from .solvers import SOLVERS

__version__ = "0.1.0"

METHODS = tuple(sorted(SOLVERS))
GRADIENTS = tuple(available_gradients())

__all__ = [
    "odeint",
    "solve",
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
