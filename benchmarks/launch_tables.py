"""Host time to build the kernels' launch tables (CPU tensors: no pinned copy).

    python benchmarks/launch_tables.py

The fused Gaussian kernel's, for one Llama-2-7B block (nine tensors, 202M elements), built afresh
against found in the perturber's layout cache: what a pass over an offloaded block's freshly uploaded
weights costs the host before its launch. The low-rank kernel's (LOZO), for the 226 matrices of the
Llama-2-7B shape and SmolLM2-135M's 210, built afresh and with the tile tables kept (what a new V
window rebuilds since the tile tables outlive it; a version without ``tile_tables`` times afresh only).
"""

from __future__ import annotations

import statistics
import time

import torch

from zotune.optim.fused import FusedPerturber

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)] + [(4096,)] * 2
MATRICES = {"Llama-2-7B": [(4096, 4096)] * 4 * 32 + [(11008, 4096), (11008, 4096), (4096, 11008)] * 32
            + [(32000, 4096)] * 2,
            "SmolLM2-135M": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                             (576, 1536)] * 30}


def low_rank() -> None:
    from zotune.optim import lowrank_kernel

    for name, shapes in MATRICES.items():  # meta tensors: shapes and strides without memory
        triples = [(torch.empty(shape, device="meta", dtype=torch.bfloat16),
                    torch.empty(shape[0], 2, device="meta", dtype=torch.bfloat16),
                    torch.empty(2, shape[1], device="meta", dtype=torch.bfloat16)) for shape in shapes]
        kept = (lowrank_kernel.tile_tables(shapes, torch.device("cpu"))
                if hasattr(lowrank_kernel, "tile_tables") else None)
        for label, tiles in (("built afresh", None), ("tile tables kept", kept)):
            if label != "built afresh" and tiles is None:
                continue
            times = []
            for _ in range(5):
                began = time.perf_counter()
                lowrank_kernel.tables(triples, tiles) if tiles is not None else lowrank_kernel.tables(triples)
                times.append(time.perf_counter() - began)
            print(f"low-rank kernel, {name}'s {len(shapes)} matrices, {label}: "
                  f"{1000 * statistics.median(times):.3f} ms (median of 5)")


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
    low_rank()


if __name__ == "__main__":
    main()
