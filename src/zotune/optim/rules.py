"""Update rules: what direction to step along, given the ZO gradient estimate.

Each rule works on tensors in the perturbation's coordinates (full-size for Gaussian
directions), so the same code serves every perturbation. The optimizer computes

    θ ← θ − η · (direction(ĝ) + λ θ)

where ``direction`` is the rule below and the weight decay λ is applied to θ outside the
moments (as the reference ZO implementations do). Moments have the dtype of the
coordinates, float32 at least whatever the parameter dtype: half-precision second moments
underflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class UpdateRule(Protocol):
    #: True when ``direction(g) == g``: the optimizer then replays the directions into the
    #: weights (buffer-free) instead of materialising ĝ.
    linear: bool

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        """Zero state for a parameter whose estimate looks like ``coords``."""

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        """The step direction (before −η) for estimate ``grad`` at 1-based ``step``; updates ``state``."""


@dataclass(frozen=True)
class SGD:
    """Plain ZO-SGD: direction = ĝ (MeZO)."""

    linear: bool = True

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        return {}

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        return grad


@dataclass(frozen=True)
class Momentum:
    """ZO-SGD with momentum, in one of two documented forms.

    * ``"ema"``: m ← β m + (1 − β) ĝ, direction = m; the first step sets m = ĝ.
      This is the form of LOZO-M and TeZO-m; the steady-state step is ≈ η ‖ĝ‖.
    * ``"heavy_ball"``: m ← β m + ĝ, direction = m (``torch.optim.SGD`` with dampening 0,
      as in the ZO-Bench "ZO-SGD-MMT" baseline); the steady-state step is ≈ η/(1 − β),
      i.e. 10x the EMA form at β = 0.9, so tune η separately.
    """

    beta: float = 0.9
    form: str = "ema"
    linear: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {self.beta}")
        if self.form not in ("ema", "heavy_ball"):
            raise ValueError(f"momentum form must be 'ema' or 'heavy_ball', got {self.form!r}")

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        return {"momentum": torch.zeros_like(coords)}

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        m = state["momentum"]
        if self.form == "heavy_ball":
            m.mul_(self.beta).add_(grad)
        elif step == 1:
            m.copy_(grad)
        else:
            m.mul_(self.beta).add_(grad, alpha=1.0 - self.beta)
        return m


@dataclass(frozen=True)
class Adam:
    """ZO-Adam (Kingma & Ba, 2015, Alg. 1, with bias correction) on the ZO estimate."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    linear: bool = False

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"adam {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0.0:
            raise ValueError(f"adam eps must be > 0, got {self.eps}")

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros_like(coords),
            "exp_avg_sq": torch.zeros_like(coords),
        }

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(grad, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)
        bias1 = 1.0 - self.beta1**step
        bias2 = 1.0 - self.beta2**step
        denom = (v / bias2).sqrt_().add_(self.eps)
        return (m / bias1).div_(denom)

