"""Named ZO methods as small compositions of Perturbation x Estimator x UpdateRule.

Each factory returns a :class:`~zotune.optim.optimizer.ZOOptimizer`. Defaults follow the
methods' published code (see ``docs/methods.md`` for sources).
"""

from __future__ import annotations

from typing import Any, Iterable

from .estimators import SPSA
from .factored import LowRank
from .optimizer import ZOOptimizer
from .perturbations import Gaussian
from .rules import SGD, Adam, Momentum, SeparableAdam
from .schedules import QuerySchedule
from .temporal_cp import TemporalCP


def _compose(params, lr, perturbation, rule, eps, num_queries, two_sided, kwargs) -> ZOOptimizer:
    estimator = SPSA(eps, num_queries, two_sided)
    return ZOOptimizer(params, lr, perturbation=perturbation, estimator=estimator, rule=rule, **kwargs)


def mezo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """MeZO: ZO-SGD with dense Gaussian directions (Malladi et al., NeurIPS 2023, Alg. 1).

    Defaults from the paper's OPT runs: ε = 1e-3 (lr 1e-6 / 1e-7 for full fine-tuning).
    ``num_queries > 1`` is n-SPSA, applied buffer-free (the (seed, g) pairs are replayed).
    Other keyword arguments go to :class:`ZOOptimizer` (``weight_decay``, ``seed``,
    ``nan_policy``, ``drift_safe``, ``model``).
    """
    return _compose(params, lr, Gaussian(), SGD(), eps, num_queries, two_sided, kwargs)


def mezo_momentum(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    beta: float = 0.9,
    form: str = "ema",
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """ZO-SGD with momentum (ZO-Bench "ZO-SGD-MMT", Zhang et al., ICML 2024).

    ``form="heavy_ball"`` reproduces ZO-Bench (``torch.optim.SGD`` momentum 0.9, a step
    ≈ 10x larger at steady state); ``form="ema"`` is the (1 − β)-damped form used by LOZO-M
    and TeZO-m. See :class:`~zotune.optim.rules.Momentum`. One float32 buffer per parameter.
    """
    return _compose(params, lr, Gaussian(), Momentum(beta, form), eps, num_queries, two_sided, kwargs)


def mezo_adam(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """ZO-Adam (ZO-Bench "ZO-Adam", Zhang et al., ICML 2024): Adam on the ZO estimate.

    Defaults as ``torch.optim.Adam`` (β = (0.9, 0.999), 1e-8), which ZO-Bench uses.
    Two float32 moments per parameter (+2d memory).
    """
    rule = Adam(betas[0], betas[1], adam_eps)
    return _compose(params, lr, Gaussian(), rule, eps, num_queries, two_sided, kwargs)


def lozo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int = 2,
    nu: int = 50,
    scale: float = 1.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """LOZO: ZO-SGD with low-rank directions U Vᵀ, V kept for ν steps (Chen et al., ICLR 2025).

    Defaults from the official code (``run_lozo.py``): r = 2, ν = 50, κ = 1 (the published
    learning rates, lr 1e-6 / 1e-7 on OPT-13B, assume κ = 1; κ = 1/r is the unbiased scaling).
    One-dimensional parameters get dense Gaussian directions. See :class:`~zotune.optim.factored.LowRank`.
    """
    return _compose(params, lr, LowRank(rank, nu, scale), SGD(), eps, num_queries, two_sided, kwargs)


def lozo_m(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int = 2,
    nu: int = 50,
    beta: float = 0.9,
    scale: float = 1.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """LOZO-M: LOZO with EMA momentum kept in U-space (an m×r matrix N per matrix).

    When V is resampled the momentum is carried over as N ← β N (V_oldᵀ V_new)/n + (1 − β) g U
    (official ``LOZOtrainer.py``, ``lowrank_zo_update_momentum``); V_old is regenerated from its
    seed, not stored. β = 0.9 as the official ``lozo.sh`` passes it.
    """
    rule = Momentum(beta, "ema")
    return _compose(params, lr, LowRank(rank, nu, scale), rule, eps, num_queries, two_sided, kwargs)


def tezo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = 32,
    r_th: float = 0.5,
    r_max: int = 64,
    scale: float = 1.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO: ZO-SGD with Z_t = U diag(τ_t) Vᵀ, U and V fixed for the run (Sun et al., arXiv 2501.19057).

    No official code exists; r = 32 approximates the average rank ≈ 31.5 the paper reports on
    OPT-13B, and ``rank="auto"`` chooses a rank per matrix from its spectrum
    (see :class:`~zotune.optim.temporal_cp.TemporalCP`). ε = 1e-3 follows the MeZO protocol.
    """
    return _compose(params, lr, TemporalCP(rank, r_th, r_max, scale), SGD(), eps, num_queries, two_sided, kwargs)


def tezo_m(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = 32,
    beta: float = 0.9,
    r_th: float = 0.5,
    r_max: int = 64,
    scale: float = 1.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO-m: TeZO with EMA momentum kept as one r-vector per matrix (exact, U and V being fixed)."""
    perturbation = TemporalCP(rank, r_th, r_max, scale)
    return _compose(params, lr, perturbation, Momentum(beta, "ema"), eps, num_queries, two_sided, kwargs)


def tezo_adam(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = 32,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    r_th: float = 0.5,
    r_max: int = 64,
    scale: float = 1.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO-Adam: two r-vector moments per matrix, second moment by the separable approximation
    (U∘U) diag(w) (V∘V)ᵀ (see :class:`~zotune.optim.rules.SeparableAdam`)."""
    rule = SeparableAdam(betas[0], betas[1], adam_eps)
    return _compose(params, lr, TemporalCP(rank, r_th, r_max, scale), rule, eps, num_queries, two_sided, kwargs)


def adazeta(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    q_alpha: float = 0.85,
    q_max: int = 15,
    q_beta: float | None = None,
    q_target: float = 20.0,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """AdaZeta: multi-query two-sided ZO-SGD with a sublinearly growing query count
    (Yang et al., EMNLP 2024), meant for tensorized adapters (:mod:`zotune.adapters`).

    q per data epoch follows :class:`~zotune.optim.schedules.QuerySchedule` with α = ``q_alpha`` (0.85),
    Q_max = ``q_max`` (15) and β = ``q_beta``, by default derived from a target of ``q_target`` (20)
    queries at the last epoch (the released LLaMA scripts); the
    training loop tells the optimizer the epoch. ĝ = (1/q) Σ_i g_i Z_i is applied buffer-free.
    Reference settings: lr 1e-4, ε = 1e-3, weight decay 0.01, batch 16. ``num_queries`` is q
    until :meth:`~zotune.optim.optimizer.ZOOptimizer.start_epoch` is first called; the reference
    estimator is two-sided.
    """
    schedule = QuerySchedule(q_alpha, q_max, q_beta, q_target)
    return _compose(params, lr, Gaussian(), SGD(), eps, num_queries, two_sided, {**kwargs, "query_schedule": schedule})


# Registry of named methods (a plain dict, filled at import with no side effects).
METHODS = {
    "mezo": mezo,
    "mezo_momentum": mezo_momentum,
    "mezo_adam": mezo_adam,
    "lozo": lozo,
    "lozo_m": lozo_m,
    "tezo": tezo,
    "tezo_m": tezo_m,
    "tezo_adam": tezo_adam,
    "adazeta": adazeta,
}
