"""Distributed ZO: data and query parallelism over ``torch.distributed`` (a step exchanges a few floats),
and sharded parameters over FSDP2 (:func:`shard`)."""

from .context import end_rank
from .parallel import Distributed, Layout
from .sharding import shard

__all__ = ["Distributed", "Layout", "end_rank", "shard"]
