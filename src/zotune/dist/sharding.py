"""Sharded ZO over FSDP2: each rank perturbs and updates the shard of every parameter it owns.

A ZO step needs no gradients, so FSDP2's only job is the forward's all-gather; the perturbation
and the update touch the local shards (``DTensor.to_local()``), and the Gaussian directions are
addressed by each element's position in its whole parameter (the Philox stream,
:mod:`zotune.optim.philox`), so a sharded run perturbs and updates exactly what an unsharded one
does, whatever the number of ranks. The losses are averaged over the ranks' data shards by
:class:`~zotune.dist.parallel.Distributed`, the only extra traffic of a step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..optim.offload import repeated_blocks

# The oldest torch whose FSDP2 does what a ZO step needs of it (the sharded tests, gloo on CPUs): torch 2.6
# cannot gather CPU shards (its all-gather records a stream event a CPU stream lacks), and with 2.7 some
# parameters were plain tensors, not shards, after the steps' forwards (no backward ever runs).
FSDP_MIN_TORCH = (2, 8)
FSDP_NEEDS = f"sharding (FSDP2) needs torch {'.'.join(map(str, FSDP_MIN_TORCH))} or newer"


def fsdp_supported() -> bool:
    """Whether this torch is FSDP_MIN_TORCH or newer."""
    return torch.__version__ >= FSDP_MIN_TORCH


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model`` with FSDP2 for ZO training: each repeated block (every member of an
    ``nn.ModuleList`` of two or more modules with parameters: the decoder layers) is one unit, the
    rest (embeddings, final norm, head) the root's.

    The root reshards after its forward as well (FSDP2 keeps a root unsharded after the forward by
    default, for the backward that a ZO step never runs): the optimizer writes the shards between
    forwards, and the next forward must gather them again. Call it after
    ``torch.distributed.init_process_group`` on every rank, then build the optimizer over
    ``model.parameters()`` with ``execution=Distributed(InPlace(), Layout(world, rank))``.
    """
    if not fsdp_supported():
        raise RuntimeError(f"{FSDP_NEEDS}; this is torch {torch.__version__}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model
