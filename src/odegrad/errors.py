"""The exceptions odegrad raises; each message names what was wrong and where."""

from __future__ import annotations

__all__ = [
    "OdegradError",
    "InvalidInputError",
    "UnknownNameError",
    "UnsupportedCombinationError",
    "NonFiniteError",
    "StepSizeUnderflowError",
    "MaxStepsExceededError",
    "NewtonConvergenceError",
    "InstabilityError",
    "ReversibleDriftWarning",
]


class OdegradError(Exception):
    """Base class of every odegrad error."""


class InvalidInputError(OdegradError, ValueError):
    """A bad argument: t not strictly monotonic, wrong shape, dtype or device mismatch, ..."""


class UnknownNameError(InvalidInputError):
    """An unknown method, gradient, option or checkpoint policy; the message lists valid names."""


class UnsupportedCombinationError(InvalidInputError):
    """A gradient the method cannot serve (e.g. `reversible` with an implicit method)."""


class NonFiniteError(OdegradError, FloatingPointError):
    """y0 or f's output holds inf or nan; the message names the time."""


class StepSizeUnderflowError(OdegradError, RuntimeError):
    """The adaptive step size fell below the resolution of t; the message names t and h."""


class MaxStepsExceededError(OdegradError, RuntimeError):
    """More than `max_steps` steps were attempted; the message names the time reached."""


class NewtonConvergenceError(OdegradError, RuntimeError):
    """An implicit stage equation could not be solved; the message names t and h."""


class InstabilityError(OdegradError, RuntimeError):
    """A reversible scheme's parasitic mode grew on a dissipative problem until it spoilt the
    solution; the message names the step, the estimated rate, the coupling and the remedy."""


class ReversibleDriftWarning(UserWarning):
    """gradient="reversible": the backward pass reconstructed an initial state that is off by
    more than the tolerance, so the gradient is inaccurate; the message names the drift."""
