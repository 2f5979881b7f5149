"""Named ZO methods as small compositions of Perturbation x Estimator x UpdateRule.

Each factory returns a :class:`~zotune.optim.optimizer.ZOOptimizer`. Defaults follow the
methods' published code (see ``docs/methods.md`` for sources).
"""

from __future__ import annotations

from typing import Any, Iterable

from .estimators import SPSA
from .optimizer import ZOOptimizer
from .perturbations import Gaussian
from .rules import SGD, Adam, Momentum


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
    return ZOOptimizer(
        params, lr, perturbation=Gaussian(), estimator=SPSA(eps, num_queries, two_sided), rule=SGD(), **kwargs
    )


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
    return ZOOptimizer(
        params,
        lr,
        perturbation=Gaussian(),
        estimator=SPSA(eps, num_queries, two_sided),
        rule=Momentum(beta, form),
        **kwargs,
    )


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
    return ZOOptimizer(
        params,
        lr,
        perturbation=Gaussian(),
        estimator=SPSA(eps, num_queries, two_sided),
        rule=Adam(betas[0], betas[1], adam_eps),
        **kwargs,
    )


# Registry of named methods (a plain dict, filled at import with no side effects).
METHODS = {
    "mezo": mezo,
    "mezo_momentum": mezo_momentum,
    "mezo_adam": mezo_adam,
}
