"""Divergence guard: skip, or roll back, updates whose measurements look like a divergence.

A step is suspect when its loss or projected gradient is not finite (the optimizer, with
``nan_policy="skip"``, has then already restored the weights and skipped it), or when its loss
exceeds ``spike_factor`` times the median of the last ``window`` accepted losses. The guard
rejects a spiking step before its update is applied; with ``action="rollback"`` it also undoes
the ``rollback_steps`` updates before it (replayed with the opposite sign), and with
``lr_factor < 1`` it multiplies every learning rate by that factor (and keeps the product in
``lr_scale``, which the training loop applies on top of its schedule). The loop logs every event.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass

from ..optim import StepRecord


@dataclass
class GuardEvent:
    step: int
    kind: str  # "non_finite" or "spike"
    loss: float
    median: float | None
    rolled_back: int
    lr_factor: float


class DivergenceGuard:
    def __init__(self, spike_factor: float, window: int = 50, action: str = "skip", rollback_steps: int = 1,
                 lr_factor: float = 1.0, min_history: int = 10) -> None:
        if action not in ("skip", "rollback"):
            raise ValueError(f"guard action must be 'skip' or 'rollback', got {action!r}")
        if spike_factor < 0 or window < 1 or not 0 <= rollback_steps <= 255 or not 0 < lr_factor <= 1:
            raise ValueError("need spike_factor >= 0, window >= 1, 0 <= rollback_steps <= 255, 0 < lr_factor <= 1")
        self.spike_factor, self.action, self.rollback_steps = spike_factor, action, rollback_steps
        self.lr_factor, self.min_history = lr_factor, min_history
        self.lr_scale = 1.0  # the product of the lr factors of the events so far
        self.losses: deque[float] = deque(maxlen=window)  # accepted losses
        self.applied: deque[tuple[dict, list[float]]] = deque(maxlen=max(rollback_steps, 1))  # for rollback
        self._spike = False

    def accept(self, record: StepRecord) -> bool:
        """Called by the optimizer before an update with finite measurements."""
        loss = record.losses[0]
        self._spike = (
            self.spike_factor > 0
            and len(self.losses) >= self.min_history
            and loss > self.spike_factor * statistics.median(self.losses)
        )
        return not self._spike

    def after_step(self, optimizer, record: StepRecord, lrs: list[float]) -> GuardEvent | None:
        """Book-keeping after the step; acts and returns an event when the step was suspect."""
        non_finite = record.skipped and not all(math.isfinite(v) for v in record.losses + record.projected_grads)
        if not (non_finite or self._spike):
            if not record.skipped:
                self.losses.append(record.losses[0])
                self.applied.append((asdict(record), list(lrs)))
            return None
        median = statistics.median(self.losses) if self.losses else None
        rolled_back = 0
        if self.action == "rollback" and self.rollback_steps:
            undo = list(self.applied)[-self.rollback_steps :]
            optimizer.rollback([(StepRecord(**record), lrs) for record, lrs in undo])
            rolled_back = len(undo)
            for _ in range(rolled_back):
                self.applied.pop()
                if self.losses:
                    self.losses.pop()
        if self.lr_factor != 1.0:
            self.lr_scale *= self.lr_factor
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_factor
        self._spike = False
        return GuardEvent(record.step, "non_finite" if non_finite else "spike", record.losses[0], median,
                          rolled_back, self.lr_factor)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "applied": list(self.applied), "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state.get("losses", []))
        self.lr_scale = state.get("lr_scale", 1.0)
        self.applied.extend((record, lrs) for record, lrs in state.get("applied", []))
