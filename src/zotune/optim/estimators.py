"""Estimators: where the loss is measured and how the projected gradient g comes out of it.

SPSA (Spall, 1992) as used by MeZO (Malladi et al., 2023, Eq. 1):

* two-sided: ``g_i = [L(θ + εZ_i) − L(θ − εZ_i)] / (2ε)``
* one-sided: ``g_i = [L(θ + εZ_i) − L(θ)] / ε``   (one shared L(θ) per step)

with ``q`` queries Z_1..Z_q all measured at the same θ on the same batch, and
``ĝ = (1/q) Σ_i g_i Z_i``. Only the scalars g_i and the draw keys are kept, which is what
makes gradient accumulation (average scalars over micro-batches), query parallelism and
data parallelism a matter of exchanging a few floats.

The estimator alone knows the layout of a step's measuring points: the shared base point
first (one-sided only), then each query's points at :attr:`SPSA.offsets`, query by query.
Everything that walks a step's losses (the optimizer, the query-parallel path, the trajectory
log, replay) asks it through :meth:`SPSA.points`, :meth:`SPSA.query_of`,
:meth:`SPSA.num_points` and :meth:`SPSA.queries_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .perturbations import DrawKey

# A measuring point θ + offset · Z(key); offset 0 is θ itself.
Point = tuple[float, DrawKey]


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

    @property
    def base_points(self) -> int:
        """Points before the first query's: 1 (the shared L(θ)) when one-sided, else 0."""
        return int(self.needs_base_loss)

    # ------------------------------------------------------------ the layout of a step's points
    def points(self, keys: Sequence[DrawKey]) -> list[Point]:
        """Every point of a step with these query keys, in measuring order (base, then query by query)."""
        base = [(0.0, keys[0])] if self.needs_base_loss else []
        return base + [(offset, key) for key in keys for offset in self.offsets]

    def num_points(self, num_queries: int) -> int:
        """How many losses a step of ``num_queries`` queries measures (2q, or q + 1)."""
        return self.base_points + len(self.offsets) * num_queries

    def query_of(self, point: int) -> int | None:
        """The query that point number ``point`` belongs to; None for the shared base point."""
        if point < self.base_points:
            return None
        return (point - self.base_points) // len(self.offsets)

    def queries_for(self, num_points: int) -> int:
        """The q of a step that measured ``num_points`` losses (the inverse of :meth:`num_points`)."""
        queries, rest = divmod(num_points - self.base_points, len(self.offsets))
        if rest or queries < 1:
            raise ValueError(f"{num_points} losses do not make whole queries of {len(self.offsets)} points"
                             f"{' after the base point' if self.base_points else ''}")
        return queries

    # ------------------------------------------------------------ the estimate
    @property
    def denominator(self) -> float:
        """g_i = (L(first point) − L(second point)) / denominator: 2ε two-sided, ε one-sided."""
        return 2.0 * self.eps if self.two_sided else self.eps

    def differences(self, num_points: int) -> list[tuple[int, int]]:
        """For each query, the positions (a, b) of the two losses whose difference is its g:
        ``g_i = (L[a] − L[b]) / denominator`` (two-sided: its ±ε points; one-sided: its point and L(θ))."""
        per, first = len(self.offsets), self.base_points
        return [(first + i * per, first + i * per + 1) if self.two_sided else (first + i, 0)
                for i in range(self.queries_for(num_points))]

    def projected_gradients(self, losses: Sequence[float]) -> list[float]:
        """g_1..g_q from the losses of every point of a step, in the order of :meth:`points`."""
        return [(losses[a] - losses[b]) / self.denominator for a, b in self.differences(len(losses))]
