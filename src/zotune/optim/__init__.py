"""Zeroth-order optimisation: perturbations, estimators, update rules and the optimizer."""

from .aliases import METHODS, mezo, mezo_adam, mezo_momentum
from .estimators import SPSA
from .groups import param_groups
from .optimizer import NonFiniteLossError, StepRecord, ZOOptimizer
from .perturbations import DrawKey, Gaussian
from .rules import SGD, Adam, Momentum

__all__ = [
    "METHODS", "SPSA", "SGD", "Adam", "DrawKey", "Gaussian", "Momentum", "NonFiniteLossError",
    "StepRecord", "ZOOptimizer", "mezo", "mezo_adam", "mezo_momentum", "param_groups",
]
