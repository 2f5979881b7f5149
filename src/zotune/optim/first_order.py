"""The first-order baseline (backprop + AdamW) behind the ZO optimizer's ``step(closure, accept)`` interface.

It lets the one training loop run full fine-tuning, PEFT adapters or LoRETTA with backprop,
for the comparisons the papers report (memory: weights + gradients + two moments + activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .aliases import option
from .records import StepRecord


@dataclass(frozen=True)
class AdamWOptions:
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW (β1, β2)")
    adam_eps: float = option(1e-8, "AdamW's δ in the denominator")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")


class FirstOrder:
    """AdamW driven by a closure that returns the batch loss; the step runs the backward itself.

    Args:
        param_groups: as for ``torch.optim.AdamW`` (``zotune.param_groups`` keeps norms and biases undecayed).
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, as ``torch.optim.AdamW``).
        max_grad_norm: clip the global gradient norm to this (0: no clipping).
    """

    def __init__(self, param_groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0) -> None:
        self.inner = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.last_record: StepRecord | None = None
        self._counters = {"step": 0, "skipped": 0}

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def num_steps(self) -> int:
        return self._counters["step"]

    @property
    def num_skipped(self) -> int:
        return self._counters["skipped"]

    def start_epoch(self, epoch: int, total_epochs: float | None = None) -> int:
        return 1

    def step(self, closure: Callable, accept: Callable[[StepRecord], bool] | None = None) -> float:
        step = self._counters["step"]
        self.inner.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            value = float(loss.detach())
            record = StepRecord(step, (), (value,), skipped=False)
            ok = math.isfinite(value) and (accept is None or accept(record))
            if ok:
                loss.backward()
        self._counters["step"] += 1
        if not ok:  # a NaN/inf loss or a rejected spike: no update
            self._counters["skipped"] += 1
            self.last_record = StepRecord(step, (), (value,), skipped=True)
            return value
        params = [p for group in self.param_groups for p in group["params"]]
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)  # free the gradients between steps
        self.last_record = record
        return value

    def state_dict(self) -> dict:
        return {"adamw": self.inner.state_dict(), "counters": dict(self._counters)}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["adamw"])
        self._counters = dict(state["counters"])


def adamw(params: Iterable[Any], lr: float, *, betas: tuple[float, float] = AdamWOptions.betas,
          adam_eps: float = AdamWOptions.adam_eps, weight_decay: float = 0.0,
          max_grad_norm: float = AdamWOptions.max_grad_norm) -> FirstOrder:
    """AdamW with backprop: the first-order baseline (Loshchilov & Hutter, ICLR 2019), gradient norm clipped to 1."""
    return FirstOrder(params, lr=lr, betas=betas, eps=adam_eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
