"""Peak memory of a phase of work: CUDA allocations on a GPU, resident set size on the CPU."""

from __future__ import annotations

import re

import torch


def peak_reset(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the peak-RSS counter VmHWM
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_read(device: str) -> float:
    """Peak MiB since the last :func:`peak_reset`."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
