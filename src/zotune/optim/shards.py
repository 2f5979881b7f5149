"""Parameters sharded by FSDP2 (DTensors): what a process holds of them and where it sits.

FSDP2 lays a parameter out as ``Shard(0)`` over a 1-D mesh: rank r holds rows [r·c, (r+1)·c)
with c = ceil(rows / ranks) (``torch.chunk``'s split). The Gaussian perturbation draws a shard's
directions from the element's position in the whole parameter, and checkpoints copy the shard's
rows of a full tensor into it.
"""

from __future__ import annotations

from torch import Tensor


def is_sharded(param: Tensor) -> bool:
    return getattr(param, "placements", None) is not None  # a DTensor


def local_rows(param: Tensor) -> tuple[int, int]:
    """(first row, number of rows) of the parameter this process holds."""
    from torch.distributed.tensor import Shard

    placements = param.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"sharded parameters are supported as FSDP2 lays them out (Shard(0) over a 1-D mesh); got "
                         f"{placements}")
    rows = param.shape[0]
    per_rank = -(-rows // param.device_mesh.size())
    first = min(param.device_mesh.get_local_rank() * per_rank, rows)
    held = min(per_rank, rows - first)
    if param.to_local().shape[0] != held:
        raise ValueError(f"a shard of {tuple(param.shape)} holds {param.to_local().shape[0]} rows from row {first}; "
                         f"FSDP2's even split gives {held}")
    return first, held


def local_shard(param: Tensor) -> tuple[Tensor, int]:
    """The elements this process holds of ``param``, flat, and the parameter element they start at
    (a plain tensor: all of itself, from 0)."""
    local, first, _ = local_part(param)
    return _flat(local), (first * matrix_shape(param)[1] if first else 0)


def local_part(param: Tensor) -> tuple[Tensor, int, int]:
    """(the tensor this process holds, its first row in the whole parameter, its number of rows); a plain
    tensor is all of itself. The factored perturbations slice their left factor (and a 1-D z) by rows."""
    if not is_sharded(param):
        return param, 0, param.shape[0] if param.dim() else 1
    first, rows = local_rows(param)
    return param.to_local(), first, rows


def held(param: Tensor) -> Tensor:
    """What this process holds of ``param``: its local shard, or all of a plain tensor."""
    return param.to_local() if is_sharded(param) else param


def matrix_shape(param: Tensor) -> tuple[int, int]:
    """(m, n): the whole parameter as the m x n matrix the factored perturbations see (dims after the first
    flattened); from the shape alone, so that a sharded parameter needs no collective."""
    return param.shape[0], param.numel() // param.shape[0] if param.shape[0] else 0


def _flat(param: Tensor) -> Tensor:
    if not param.is_contiguous():
        raise ValueError("Gaussian perturbation needs contiguous parameters")
    return param.view(-1)
