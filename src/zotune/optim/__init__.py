"""Zeroth-order optimisation: perturbations, estimators, update rules, execution paths and the optimizer."""

from .batched import Batched
from .aliases import adazeta, lozo, lozo_m, mezo, mezo_adam, mezo_momentum, tezo, tezo_adam, tezo_m
from .estimators import SPSA
from .execution import DriftSafe, ExecutionPath, InPlace
from .low_rank import LowRank
from .first_order import FirstOrder, adamw
from .groups import param_groups
from .optimizer import ZOOptimizer
from .records import NonFiniteLossError, StepRecord
from .perturbations import DrawKey, FactoredPerturbation, Gaussian
from .registry import METHODS, MethodSpec, get_method
from .rules import SGD, Adam, Momentum, SeparableAdam
from .schedules import QuerySchedule
from .temporal_cp import TemporalCP
from .virtual import Virtual

__all__ = [
    "METHODS", "SPSA", "SGD", "Adam", "Batched", "DrawKey", "DriftSafe", "ExecutionPath", "FactoredPerturbation",
    "FirstOrder", "Gaussian", "InPlace", "LowRank", "MethodSpec", "Momentum", "NonFiniteLossError", "QuerySchedule",
    "SeparableAdam", "StepRecord", "TemporalCP", "Virtual", "ZOOptimizer", "adamw", "adazeta", "get_method", "lozo",
    "lozo_m", "mezo", "mezo_adam", "mezo_momentum", "param_groups", "tezo", "tezo_adam", "tezo_m",
]
