"""Estimators: where the loss is measured and how the projected gradient g comes out of it.

SPSA (Spall, 1992) as used by MeZO (Malladi et al., 2023, Eq. 1):

* two-sided: ``g_i = [L(θ + εZ_i) − L(θ − εZ_i)] / (2ε)``
* one-sided: ``g_i = [L(θ + εZ_i) − L(θ)] / ε``   (one shared L(θ) per step)

with ``q`` queries Z_1..Z_q all measured at the same θ on the same batch, and
``ĝ = (1/q) Σ_i g_i Z_i``. Only the scalars g_i and the draw keys are kept, which is what
makes gradient accumulation (average scalars over micro-batches), query parallelism and
data parallelism a matter of exchanging a few floats.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SPSA:
    """Simultaneous-perturbation estimator.

    Args:
        eps: perturbation scale ε (> 0).
        num_queries: q, the number of directions per step (>= 1).
        two_sided: central difference (2 forwards per query) or forward difference
            (1 forward per query plus one shared unperturbed forward).
    """

    eps: float = 1e-3
    num_queries: int = 1
    two_sided: bool = True

    def __post_init__(self) -> None:
        if not (self.eps > 0.0):  # also rejects NaN
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if int(self.num_queries) != self.num_queries or self.num_queries < 1:
            raise ValueError(f"num_queries must be a positive integer, got {self.num_queries}")

    @property
    def offsets(self) -> tuple[float, ...]:
        """The multiples of Z at which each query measures the loss, in order."""
        return (self.eps, -self.eps) if self.two_sided else (self.eps,)

    @property
    def needs_base_loss(self) -> bool:
        return not self.two_sided

    def projected_gradient(self, losses: list[float], base_loss: float | None) -> float:
        """g for one query from its losses at :attr:`offsets` (and L(θ) when one-sided)."""
        if self.two_sided:
            return (losses[0] - losses[1]) / (2.0 * self.eps)
        assert base_loss is not None
        return (losses[0] - base_loss) / self.eps
