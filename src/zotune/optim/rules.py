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

from .shards import held
from .temporal_cp import TemporalCP


class UpdateRule(Protocol):
    #: True when ``direction(g) == g``: the optimizer then replays the directions into the
    #: weights (buffer-free) instead of materialising ĝ.
    linear: bool
    #: State entries that are linear in the estimate (first moments): these can be carried to
    #: a new basis when the perturbation changes its subspace (LOZO's V windows).
    linear_state: tuple[str, ...]

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        """Zero state for a parameter whose estimate looks like ``coords``."""

    def check(self, perturbation) -> None:
        """Raise ValueError if this rule cannot follow ``perturbation``'s directions (at construction)."""

    def update_(self, param: Tensor, index: int, perturbation, coords: Tensor, state: dict, step: int,
                lr: float, key) -> None:
        """Update ``state`` with estimate ``coords`` at 1-based ``step`` and apply θ −= η · direction."""


class _CoordinateRule:
    """Rules whose direction lives in the perturbation's coordinates, like the estimate."""

    def check(self, perturbation) -> None:
        # Only first moments can be carried to a new subspace (LOZO's V windows) by `transport`.
        state_names = set(self.init_state(torch.zeros(1)))
        if perturbation.changes_basis and not state_names <= set(self.linear_state):
            raise ValueError(
                f"{type(self).__name__} keeps state {sorted(state_names - set(self.linear_state))} that cannot "
                f"follow {type(perturbation).__name__}'s changes of subspace; use SGD or Momentum with it"
            )

    def update_(self, param, index, perturbation, coords, state, step, lr, key) -> None:
        direction = self.direction(coords, state, step)
        if lr != 0.0:
            perturbation.add_coordinates_(param, index, direction, -lr, key)


@dataclass(frozen=True)
class SGD(_CoordinateRule):
    """Plain ZO-SGD: direction = ĝ (MeZO)."""

    linear: bool = True
    linear_state: tuple[str, ...] = ()

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        return {}

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        return grad


@dataclass(frozen=True)
class Momentum(_CoordinateRule):
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
    linear_state: tuple[str, ...] = ("momentum",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {self.beta}")
        if self.form not in ("ema", "heavy_ball"):
            raise ValueError(f"momentum form must be 'ema' or 'heavy_ball', got {self.form!r}")

    def init_state(self, coords: Tensor) -> dict[str, Tensor]:
        return {"momentum": torch.zeros_like(coords)}

    def direction(self, grad: Tensor, state: dict[str, Tensor], step: int) -> Tensor:
        return self.direction_each([grad], [state], step)[0]

    def direction_each(self, grads: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        """The direction of many tensors at once (multi-tensor kernels: a few launches, not a few per tensor)."""
        ms = [state["momentum"] for state in states]
        if self.form == "heavy_ball":
            torch._foreach_mul_(ms, self.beta)
            torch._foreach_add_(ms, grads)
        elif step == 1:
            for m, grad in zip(ms, grads):  # (once; DTensor has no multi-tensor copy)
                m.copy_(grad)
        else:
            torch._foreach_mul_(ms, self.beta)
            torch._foreach_add_(ms, grads, alpha=1.0 - self.beta)
        return ms


@dataclass(frozen=True)
class Adam(_CoordinateRule):
    """ZO-Adam (Kingma & Ba, 2015, Alg. 1, with bias correction) on the ZO estimate."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    linear: bool = False
    linear_state: tuple[str, ...] = ("exp_avg",)

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
        return self.direction_each([grad], [state], step)[0]

    def direction_each(self, grads: list[Tensor], states: list[dict[str, Tensor]], step: int) -> list[Tensor]:
        """The direction of many tensors at once, in multi-tensor kernels (with bias correction)."""
        ms, vs = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(ms, self.beta1)
        torch._foreach_add_(ms, grads, alpha=1.0 - self.beta1)
        torch._foreach_mul_(vs, self.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - self.beta2)
        denom = torch._foreach_div(vs, 1.0 - self.beta2**step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        directions = torch._foreach_div(ms, 1.0 - self.beta1**step)
        torch._foreach_div_(directions, denom)
        return directions



@dataclass(frozen=True)
class SeparableAdam(Adam):
    """TeZO-Adam: Adam with r-vector moments for matrices under a TemporalCP perturbation.

    With coordinates c = κ Σ_i (g_i/q) τ_i (an r-vector per matrix):
      m ← β1 m + (1 − β1) c                 (exact: the EMA of U diag(c) Vᵀ is U diag(m) Vᵀ)
      w ← β2 w + (1 − β2) c ∘ c             (separable approximation of the second moment:
                                             (U diag(c) Vᵀ)^∘2 ≈ (U∘U) diag(c∘c) (V∘V)ᵀ)
      W ← W − η · [U diag(m̂) Vᵀ] ⊘ (sqrt((U∘U) diag(ŵ) (V∘V)ᵀ) + δ)
    The update forms two m×n temporaries, one matrix at a time. The exact cross terms of the
    square are dropped, as in the paper's Eq. 8 as reconstructed in the project's spec (§3.6).
    One-dimensional parameters use plain Adam.
    """

    def check(self, perturbation) -> None:
        if not isinstance(perturbation, TemporalCP):
            raise ValueError(
                f"SeparableAdam (TeZO-Adam) keeps r-vector moments of U diag(τ) Vᵀ directions and needs a TemporalCP "
                f"perturbation, not {type(perturbation).__name__}; use Adam (mezo_adam) with other directions"
            )

    def update_(self, param, index, perturbation, coords, state, step, lr, key) -> None:
        if param.dim() < 2:
            return super().update_(param, index, perturbation, coords, state, step, lr, key)
        m, w = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(coords, alpha=1.0 - self.beta1)
        w.mul_(self.beta2).addcmul_(coords, coords, value=1.0 - self.beta2)
        if lr == 0.0:
            return
        numerator = perturbation.expand_dense(param, index, m / (1.0 - self.beta1**step), key)
        second = perturbation.expand_dense(param, index, w / (1.0 - self.beta2**step), key, squared=True)
        denominator = second.clamp_(min=0.0).sqrt_().add_(self.eps)
        held(param).addcdiv_(numerator.to(param.dtype), denominator.to(param.dtype), value=-lr)  # a shard: its rows
