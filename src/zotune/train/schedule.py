"""Learning-rate schedules: the multiplier of every param group's base learning rate at a step.

A schedule is a pure function of the step, so a resumed run takes up exactly where it stopped and
the trajectory log (which records each step's learning rates) replays it without knowing of it.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor on the base lr for 0-based ``step`` of ``total_steps``: a linear warm-up from 1/warmup
    to 1 over the first ``warmup_steps``, then ``constant`` (1), ``linear`` (down to 0 at the last
    step's end) or ``cosine`` (half a cosine, from 1 to 0)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decaying = max(total_steps - warmup_steps, 1)
    done = min(step - warmup_steps, decaying) / decaying  # in [0, 1]: the step's place in the decay (1 past the end)
    return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
