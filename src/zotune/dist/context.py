"""Starting and stopping ``torch.distributed`` for a ``torchrun`` launch of ``zotune train``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; when WORLD_SIZE is
above 1 the process group starts with gloo on a CPU run and NCCL on a GPU run, and a timeout,
so that a rank that dies makes the others fail with an error instead of waiting for ever.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (e.g. a stop request)."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, finished: bool = False) -> None:
        """Leave the process group (idempotent). After a run that ``finished`` on every rank, the ranks first
        wait for each other, so that no rank leaves while a peer is still in a collective. After a failure
        no rank waits."""
        if self.enabled and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: str, timeout_s: float) -> DistContext:
    """Join the process group described by torchrun's environment (or return a one-process context)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank)


def end_rank(code: int) -> NoReturn:
    """End this torchrun rank with exit status ``code`` now, without the interpreter's teardown.

    While Python finalizes, any other thread that takes the GIL is stopped with ``pthread_exit``. A gloo
    worker thread takes it when it drops its reference to the tensor of a finished collective (the tensor
    still owns its Python object); stopped inside C++ code that may not unwind, it aborts the whole process
    ("terminate called without an active exception", SIGABRT), and torchrun reports a finished run as
    failed. Call this only once the run has closed what it writes; stdout and stderr are flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
