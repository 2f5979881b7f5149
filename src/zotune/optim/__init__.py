"""Zeroth-order optimisation: perturbations, estimators, update rules and the optimizer."""

from .aliases import METHODS, adazeta, lozo, lozo_m, mezo, mezo_adam, mezo_momentum, tezo, tezo_adam, tezo_m
from .estimators import SPSA
from .groups import param_groups
from .optimizer import NonFiniteLossError, StepRecord, ZOOptimizer
from .perturbations import DrawKey, Gaussian
from .factored import LowRank
from .rules import SGD, Adam, Momentum, SeparableAdam
from .schedules import QuerySchedule
from .temporal_cp import TemporalCP

__all__ = [
    "METHODS", "SPSA", "SGD", "Adam", "DrawKey", "Gaussian", "LowRank", "Momentum", "NonFiniteLossError",
    "QuerySchedule", "SeparableAdam", "StepRecord", "TemporalCP", "ZOOptimizer", "adazeta", "lozo", "lozo_m", "mezo", "mezo_adam",
    "mezo_momentum", "param_groups", "tezo", "tezo_adam", "tezo_m",
]
