"""Tensor-train adapters: LoRETTA_adp, LoRETTA_rep (and the adapters AdaZeta trains)."""

from .config import LorettaAdpConfig, LorettaRepConfig
from .model import adapter_state, disabled, inject, load, merge, save, trainable_numel
from .tt import TTLinear, factorize, tt_numel

__all__ = [
    "LorettaAdpConfig", "LorettaRepConfig", "TTLinear", "adapter_state", "disabled", "factorize", "inject", "load",
    "merge",
    "save", "trainable_numel", "tt_numel",
]
