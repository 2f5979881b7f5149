"""Named ZO methods as small compositions of Perturbation x Estimator x UpdateRule.

Each factory returns a :class:`~zotune.optim.optimizer.ZOOptimizer`. Beside each factory, a
frozen dataclass lists the method's own options (what the command line offers as
``optim.<name>``) and is the one place their defaults are written; the factories' keyword
defaults read them. Defaults follow the methods' published code (see ``docs/methods.md`` for
sources). The registry of methods is :mod:`zotune.optim.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from .estimators import SPSA
from .low_rank import LowRank
from .optimizer import ZOOptimizer
from .perturbations import Gaussian
from .rules import SGD, Adam, Momentum, SeparableAdam
from .schedules import QuerySchedule
from .temporal_cp import TemporalCP


def option(default: Any, help: str):
    """A method option: its default and the help text the command line shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MezoOptions:
    generator: str = option("auto", "dense directions from: auto (philox on CUDA with Triton and for sharded "
                                    "parameters, else torch), philox (the counter-based stream, any device), or torch "
                                    "(torch.Generator chunks)")


@dataclass(frozen=True)
class MomentumOptions(MezoOptions):
    beta: float = option(0.9, "momentum β")
    form: str = option("ema", "momentum form: ema ((1 − β)-damped) or heavy_ball (ZO-Bench's torch.optim.SGD)")


@dataclass(frozen=True)
class AdamOptions(MezoOptions):
    betas: tuple[float, float] = option((0.9, 0.999), "Adam (β1, β2)")
    adam_eps: float = option(1e-8, "Adam's δ in the denominator")


@dataclass(frozen=True)
class LowRankOptions:
    rank: int = option(2, "rank r of the directions U Vᵀ")
    nu: int = option(50, "steps per V window ν")
    scale: float = option(1.0, "κ in ĝ = κ g Z (1 matches the published learning rates)")
    unit_variance: bool = option(True, "Z = U Vᵀ/√r, one per entry like MeZO's (false: the paper's raw U Vᵀ, "
                                       "which its published learning rates assume)")


@dataclass(frozen=True)
class LowRankMomentumOptions(LowRankOptions):
    beta: float = option(0.9, "momentum β (EMA, kept in U-space)")


@dataclass(frozen=True)
class TemporalCPOptions:
    rank: Union[int, str] = option(32, "rank r of U diag(τ) Vᵀ: an integer, or auto (a rank per matrix)")
    r_th: float = option(0.5, "singular-value threshold of rank=auto")
    r_max: int = option(64, "rank cap of rank=auto")
    scale: float = option(1.0, "κ in ĝ = κ g Z (1 matches the published learning rates)")
    unit_variance: bool = option(True, "Z = U diag(τ) Vᵀ/√r, one per entry like MeZO's (false: the paper's "
                                       "raw scaling)")


@dataclass(frozen=True)
class TemporalCPMomentumOptions(TemporalCPOptions):
    beta: float = option(0.9, "momentum β (EMA, an r-vector per matrix)")


@dataclass(frozen=True)
class TemporalCPAdamOptions(TemporalCPOptions):
    betas: tuple[float, float] = option((0.9, 0.999), "Adam (β1, β2), r-vector moments")
    adam_eps: float = option(1e-8, "Adam's δ in the denominator")


@dataclass(frozen=True)
class QueryScheduleOptions(MezoOptions):
    q_alpha: float = option(0.85, "query schedule multiplier α in Q_e = min(max(floor(α e^β), 1), Q_max)")
    q_max: int = option(15, "query schedule cap Q_max")
    q_beta: Union[float, None] = option(None, "query schedule exponent β (default: derived from q_target and the "
                                              "run's epochs)")
    q_target: float = option(20.0, "uncapped query count aimed at for the last epoch when β is derived")


def _compose(params, lr, perturbation, rule, eps, num_queries, two_sided, kwargs) -> ZOOptimizer:
    estimator = SPSA(eps, num_queries, two_sided)
    return ZOOptimizer(params, lr, perturbation=perturbation, estimator=estimator, rule=rule, **kwargs)


def mezo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    generator: str = MezoOptions.generator,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """MeZO: ZO-SGD with dense Gaussian directions (Malladi et al., NeurIPS 2023, Alg. 1).

    Defaults from the paper's OPT runs: ε = 1e-3 (lr 1e-6 / 1e-7 for full fine-tuning).
    ``num_queries > 1`` is n-SPSA, applied buffer-free (the (seed, g) pairs are replayed).
    Other keyword arguments go to :class:`ZOOptimizer` (``weight_decay``, ``seed``,
    ``nan_policy``, ``execution``, ``query_schedule``).
    """
    return _compose(params, lr, Gaussian(generator=generator), SGD(), eps, num_queries, two_sided, kwargs)


def mezo_momentum(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    beta: float = MomentumOptions.beta,
    form: str = MomentumOptions.form,
    generator: str = MezoOptions.generator,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """ZO-SGD with momentum (ZO-Bench "ZO-SGD-MMT", Zhang et al., ICML 2024).

    ``form="heavy_ball"`` reproduces ZO-Bench (``torch.optim.SGD`` momentum 0.9, a step
    ≈ 10x larger at steady state); ``form="ema"`` is the (1 − β)-damped form used by LOZO-M
    and TeZO-m. See :class:`~zotune.optim.rules.Momentum`. One float32 buffer per parameter.
    """
    return _compose(params, lr, Gaussian(generator=generator), Momentum(beta, form), eps, num_queries, two_sided,
                    kwargs)


def mezo_adam(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    betas: tuple[float, float] = AdamOptions.betas,
    adam_eps: float = AdamOptions.adam_eps,
    generator: str = MezoOptions.generator,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """ZO-Adam (ZO-Bench "ZO-Adam", Zhang et al., ICML 2024): Adam on the ZO estimate.

    Defaults as ``torch.optim.Adam`` (β = (0.9, 0.999), 1e-8), which ZO-Bench uses.
    Two float32 moments per parameter (+2d memory).
    """
    rule = Adam(betas[0], betas[1], adam_eps)
    return _compose(params, lr, Gaussian(generator=generator), rule, eps, num_queries, two_sided, kwargs)


def lozo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int = LowRankOptions.rank,
    nu: int = LowRankOptions.nu,
    scale: float = LowRankOptions.scale,
    unit_variance: bool = LowRankOptions.unit_variance,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """LOZO: ZO-SGD with low-rank directions U Vᵀ, V kept for ν steps (Chen et al., ICLR 2025).

    Defaults from the official code (``run_lozo.py``): r = 2, ν = 50, κ = 1 (the published
    learning rates, lr 1e-6 / 1e-7 on OPT-13B, assume κ = 1; κ = 1/r is the unbiased scaling).
    By default Z = U Vᵀ/√r has one per entry, as MeZO's Z, so one learning rate means one step
    size across methods; ``unit_variance=False`` is the official code's raw U Vᵀ, which its
    published learning rates assume (the shipped paper configs set it).
    One-dimensional parameters get dense Gaussian directions. See :class:`~zotune.optim.low_rank.LowRank`.
    """
    return _compose(params, lr, LowRank(rank, nu, scale, unit_variance), SGD(), eps, num_queries, two_sided, kwargs)


def lozo_m(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int = LowRankMomentumOptions.rank,
    nu: int = LowRankMomentumOptions.nu,
    beta: float = LowRankMomentumOptions.beta,
    scale: float = LowRankMomentumOptions.scale,
    unit_variance: bool = LowRankMomentumOptions.unit_variance,
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
    return _compose(params, lr, LowRank(rank, nu, scale, unit_variance), rule, eps, num_queries, two_sided, kwargs)


def tezo(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = TemporalCPOptions.rank,
    r_th: float = TemporalCPOptions.r_th,
    r_max: int = TemporalCPOptions.r_max,
    scale: float = TemporalCPOptions.scale,
    unit_variance: bool = TemporalCPOptions.unit_variance,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO: ZO-SGD with Z_t = U diag(τ_t) Vᵀ, U and V fixed for the run (Sun et al., arXiv 2501.19057).

    No official code exists; r = 32 approximates the average rank ≈ 31.5 the paper reports on
    OPT-13B, and ``rank="auto"`` chooses a rank per matrix from its spectrum
    (see :class:`~zotune.optim.temporal_cp.TemporalCP`). ε = 1e-3 follows the MeZO protocol.
    By default Z is scaled to one per entry (V/√r); ``unit_variance=False`` is the paper's raw scaling.
    """
    perturbation = TemporalCP(rank, r_th, r_max, scale, unit_variance)
    return _compose(params, lr, perturbation, SGD(), eps, num_queries, two_sided, kwargs)


def tezo_m(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = TemporalCPMomentumOptions.rank,
    beta: float = TemporalCPMomentumOptions.beta,
    r_th: float = TemporalCPMomentumOptions.r_th,
    r_max: int = TemporalCPMomentumOptions.r_max,
    scale: float = TemporalCPMomentumOptions.scale,
    unit_variance: bool = TemporalCPMomentumOptions.unit_variance,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO-m: TeZO with EMA momentum kept as one r-vector per matrix (exact, U and V being fixed)."""
    perturbation = TemporalCP(rank, r_th, r_max, scale, unit_variance)
    return _compose(params, lr, perturbation, Momentum(beta, "ema"), eps, num_queries, two_sided, kwargs)


def tezo_adam(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    rank: int | str = TemporalCPAdamOptions.rank,
    betas: tuple[float, float] = TemporalCPAdamOptions.betas,
    adam_eps: float = TemporalCPAdamOptions.adam_eps,
    r_th: float = TemporalCPAdamOptions.r_th,
    r_max: int = TemporalCPAdamOptions.r_max,
    scale: float = TemporalCPAdamOptions.scale,
    unit_variance: bool = TemporalCPAdamOptions.unit_variance,
    num_queries: int = 1,
    two_sided: bool = True,
    **kwargs: Any,
) -> ZOOptimizer:
    """TeZO-Adam: two r-vector moments per matrix, second moment by the separable approximation
    (U∘U) diag(w) (V∘V)ᵀ (see :class:`~zotune.optim.rules.SeparableAdam`)."""
    rule = SeparableAdam(betas[0], betas[1], adam_eps)
    perturbation = TemporalCP(rank, r_th, r_max, scale, unit_variance)
    return _compose(params, lr, perturbation, rule, eps, num_queries, two_sided, kwargs)


def adazeta(
    params: Iterable[Any],
    lr: float,
    eps: float = 1e-3,
    *,
    q_alpha: float = QueryScheduleOptions.q_alpha,
    q_max: int = QueryScheduleOptions.q_max,
    q_beta: float | None = QueryScheduleOptions.q_beta,
    q_target: float = QueryScheduleOptions.q_target,
    generator: str = MezoOptions.generator,
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
    return _compose(params, lr, Gaussian(generator=generator), SGD(), eps, num_queries, two_sided,
                    {**kwargs, "query_schedule": schedule})
