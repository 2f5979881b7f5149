"""What a ZO step reports: its record, and the error it raises on a non-finite measurement."""

from __future__ import annotations

from dataclasses import dataclass


class NonFiniteLossError(FloatingPointError):
    """A ZO step measured a NaN/inf loss or projected gradient (weights were restored first)."""


@dataclass(frozen=True)
class StepRecord:
    """What one step measured: enough to replay its update from the initial weights."""

    step: int
    projected_grads: tuple[float, ...]  # g_1..g_q
    losses: tuple[float, ...]  # every loss measured, in order
    skipped: bool
