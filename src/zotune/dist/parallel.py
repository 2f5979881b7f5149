"""Data- and query-parallel ZO over ``torch.distributed``: a step exchanges a few floats.

Every rank holds the same weights and draws the same directions (they are functions of
(seed, step, query, parameter)). A world of W ranks is laid out as D data shards x P query
shards (W = D·P; rank = data_shard·P + query_shard):

* data parallel: each data shard measures the loss of its own part of the batch;
* query parallel: each query shard measures the points of queries i with i mod P = its shard.

Each rank writes its losses into a vector of all 2q (+1) measuring points, with a count of 1
where it measured; one all-reduce (sum) of [losses, counts] gives every rank the mean loss at
every point, so every rank computes the same projected gradients and applies the identical
update. With equal shards of the batch the mean over data shards is the loss of the whole
batch, so the run equals a single-process run with the same global batch and seeds (up to the
order of float additions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..optim.estimators import Point
from ..optim.execution import Closure, ExecutionPath


@dataclass(frozen=True)
class Layout:
    """Where a rank sits in the D x P grid."""

    world_size: int
    rank: int
    query_shards: int = 1

    def __post_init__(self) -> None:
        if self.query_shards < 1 or self.world_size % self.query_shards:
            raise ValueError(f"query_parallel={self.query_shards} must divide the world size {self.world_size}")

    @property
    def data_shards(self) -> int:
        return self.world_size // self.query_shards

    @property
    def data_shard(self) -> int:
        return self.rank // self.query_shards

    @property
    def query_shard(self) -> int:
        return self.rank % self.query_shards

    def shard_batch(self, items: list) -> list:
        """This rank's equal share of a global batch (data parallel)."""
        if len(items) % self.data_shards:
            raise ValueError(f"a batch of {len(items)} does not split into {self.data_shards} equal data shards")
        share = len(items) // self.data_shards
        return items[self.data_shard * share : (self.data_shard + 1) * share]


class Distributed(ExecutionPath):
    """An execution path that measures this rank's share of the points and all-reduces the losses.

    Args:
        inner: how this rank measures its points (``InPlace()``, ``DriftSafe(model)``, ``Virtual(model)``).
            Query shards need a path that never writes the weights while measuring.
        layout: this rank's place in the grid of data x query shards.
        group: the process group (default: the world).

    Create it after ``torch.distributed.init_process_group`` on every rank, with the same seed, and
    pass it to the optimizer as ``execution=``.
    """

    def __init__(self, inner: ExecutionPath, layout: Layout, group=None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Distributed needs torch.distributed.init_process_group() to have run on every rank")
        if layout.query_shards > 1 and inner.writes_weights:
            # Ranks visiting different points would restore the weights with different roundings and
            # drift apart; measuring without writing the weights keeps them bit-identical.
            raise ValueError("query parallelism needs an execution path that never writes the weights while "
                             "measuring: DriftSafe(model) or Virtual(model)")
        self.inner, self.layout, self.group = inner, layout, group
        self.writes_weights = inner.writes_weights
        self.bytes_last_step = 0

    def bind(self, params, perturbation, estimator) -> None:
        super().bind(params, perturbation, estimator)
        self.inner.bind(params, perturbation, estimator)

    def _mine(self, n_points: int) -> list[int]:
        """Indices of the points this rank measures: the shared base point, then its queries' points."""
        shards, shard = self.layout.query_shards, self.layout.query_shard
        queries = (self.estimator.query_of(i) for i in range(n_points))
        return [i for i, query in enumerate(queries) if query is None or query % shards == shard]

    def measure_points(self, points: Sequence[Point], closures: Sequence[Closure]) -> list[float]:
        mine = self._mine(len(points))
        # A query shard with no query this step (q < P) measures nothing but still joins the all-reduce.
        measured = []
        if mine:
            measured = self.inner.measure_points([points[i] for i in mine], closures)
        sums = torch.zeros(2 * len(points), dtype=torch.float64)  # [losses | counts]
        for i, loss in zip(mine, measured):
            sums[i] += loss
            sums[len(points) + i] += 1.0
        device = _collective_device(self.group)
        reduced = sums.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_last_step = reduced.numel() * reduced.element_size()
        reduced = reduced.cpu()
        return (reduced[: len(points)] / reduced[len(points):]).tolist()

    def take_restore_terms(self):
        return self.inner.take_restore_terms()

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
