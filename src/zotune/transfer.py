"""Host tensors sent to a device without stopping the host.

A copy to the GPU from pageable memory first waits for the device's stream to drain: the host stops
until the GPU has caught up, and nothing it would queue next can overlap the work before. From pinned
memory (torch's caching host allocator, which keeps the block until the copy is done) the copy is
queued like a kernel. The training step sends a few small tensors per forward (the batch's ids, mask
and positions, the scored positions) and the fused kernels their launch tables; each would otherwise
be a stall of the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` (a CPU tensor) on ``device``, queued behind the device's work where that is CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
