"""Data- and query-parallel ZO over ``torch.distributed`` (see :mod:`zotune.dist.parallel`)."""

from .parallel import Layout, parallelize

__all__ = ["Layout", "parallelize"]
