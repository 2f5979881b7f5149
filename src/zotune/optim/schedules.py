"""Query-count schedules: how many directions q a ZO step uses, per data epoch.

AdaZeta (Yang et al., EMNLP 2024, §3.3; released ``trainer_adazeta.py``) grows q sublinearly
with the epoch and caps it: Q_e = min(max(floor(α e^β), 1), Q_max), e = 0, 1, 2, ... When β is
not given it is chosen so the uncapped schedule reaches a target count at the last epoch:
β = ln(target / α) / ln(E_total), E_total = steps / (steps per epoch). With the reference LLaMA
settings (α = 0.85, target 20, Q_max 15, E_total = 160) β ≈ 0.62: q = 1 until epoch 3 and 15 from
about epoch 101.

A schedule is a plain object; any :class:`~zotune.optim.optimizer.ZOOptimizer` takes one
(``query_schedule=``) and the training loop tells it the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QuerySchedule:
    """Q_e = min(max(floor(α e^β), 1), Q_max).

    Args:
        alpha: α, the multiplier (``shrink_factor`` in the reference scripts).
        q_max: Q_max, the cap.
        beta: β, the exponent; None: derived from ``target`` and the run's number of epochs.
        target: the uncapped count aimed at for the last epoch when β is derived (``NUM``).
    """

    alpha: float = 0.85
    q_max: int = 15
    beta: float | None = None
    target: float = 20.0

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"query schedule alpha must be > 0, got {self.alpha}")
        if isinstance(self.q_max, bool) or int(self.q_max) != self.q_max or self.q_max < 1:
            raise ValueError(f"query schedule q_max must be a positive integer, got {self.q_max}")
        if self.beta is not None and not self.beta >= 0:
            raise ValueError(f"query schedule beta must be >= 0, got {self.beta}")
        if self.beta is None and not self.target > 0:
            raise ValueError(f"query schedule target must be > 0, got {self.target}")

    def exponent(self, total_epochs: float | None) -> float:
        if self.beta is not None:
            return self.beta
        if total_epochs is None or total_epochs <= 1:
            raise ValueError("the query schedule derives β from the run's number of epochs (> 1); give beta= "
                             f"or run more than one epoch (got {total_epochs})")
        return math.log(self.target / self.alpha) / math.log(total_epochs)

    def queries(self, epoch: int, total_epochs: float | None = None) -> int:
        """Q_e for data epoch ``epoch`` (0-based) of a run of ``total_epochs`` epochs."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch == 0:  # α·0^β = 0 for any β: one query (and a run of <= 1 epoch needs no β)
            return 1
        return min(max(math.floor(self.alpha * epoch ** self.exponent(total_epochs)), 1), int(self.q_max))
