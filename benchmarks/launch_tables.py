"""Host time to build the fused kernel's launch tables for one Llama-2-7B block (nine tensors, 202M
elements), built afresh against found in the perturber's layout cache: what a pass over an offloaded
block's freshly uploaded weights costs the host before its launch (CPU tensors: no pinned copy).

    python benchmarks/launch_tables.py
"""

from __future__ import annotations

import statistics
import time

import torch

from zotune.optim.fused import FusedPerturber

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)] + [(4096,)] * 2


def main() -> None:
    tensors = [(i, torch.empty(shape, dtype=torch.bfloat16)) for i, shape in enumerate(SHAPES)]
    for label, cached in (("built afresh", False), ("layout cached", True)):
        perturber, times = FusedPerturber(), []
        perturber.tables(tensors)
        for _ in range(20):
            if not cached:
                perturber = FusedPerturber()
            began = time.perf_counter()
            perturber.tables(tensors)
            times.append(time.perf_counter() - began)
        print(f"{label}: {1000 * statistics.median(times):.3f} ms per set of tables (median of 20)")


if __name__ == "__main__":
    main()
