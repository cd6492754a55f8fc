"""Neural ODE models: an ODE block, an ODE-Net classifier, a FFJORD-style CNF, a latent ODE."""

from .classifier import ConcatConv2d, ConvField, ODENetClassifier
from .cnf import CNF, AugmentedDynamics, CNFField, ConcatSquashLinear, standard_normal_log_prob
from .latent import ENCODERS, GRUEncoder, HiddenStateField, LatentField, LatentODE, ODERNNEncoder
from .odeblock import ODEBlock

__all__ = [
    "ODEBlock",
    "ODENetClassifier",
    "ConvField",
    "ConcatConv2d",
    "CNF",
    "CNFField",
    "AugmentedDynamics",
    "ConcatSquashLinear",
    "standard_normal_log_prob",
    "LatentODE",
    "GRUEncoder",
    "ODERNNEncoder",
    "HiddenStateField",
    "ENCODERS",
    "LatentField",
]
