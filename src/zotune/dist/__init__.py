"""Distributed ZO: data and query parallelism over ``torch.distributed`` (a step exchanges a few floats)."""

from .parallel import Distributed, Layout

__all__ = ["Distributed", "Layout"]
