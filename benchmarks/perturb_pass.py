"""Bandwidth of one perturbation pass on CUDA: the fused Philox kernel against the memory floor.

    python benchmarks/perturb_pass.py                   # float16 and bfloat16, one 1 GiB tensor and
                                                        # SmolLM2-135M's 272 tensors (float32)
    python benchmarks/perturb_pass.py --sweep           # the kernel's block size and warps, 1 GiB
                                                        # float16 and float32
    python benchmarks/perturb_pass.py --lowrank         # the low-rank kernel's tile shapes (LOZO's
                                                        # passes), ms per GiB beside the fused kernel

A pass reads and writes every weight once, so its floor is an in-place add of a constant over the
same tensors: ``torch._foreach_add_``, and for one tensor a Triton kernel doing only that in blocks
of 4,096 elements (the fused kernel's blocks), which runs nearer the memory's bandwidth. Printed:
milliseconds per pass (median of 20, CUDA events), the bytes moved per second (2 x the tensors'
bytes / time) and the ratio to the first row, beside the torch-generator path (draw z into a chunk
buffer, then add: the path before the fused kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model  # noqa: E402

from zotune.optim.fused import FusedPerturber  # noqa: E402
from zotune.optim.perturbations import DrawKey, Gaussian  # noqa: E402


@triton.jit
def _add_constant(pointer, numel, value, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    x = tl.load(pointer + offsets, mask=inside)
    tl.store(pointer + offsets, (x.to(tl.float32) + value).to(x.dtype), mask=inside)


def add_constant(tensor: torch.Tensor, value: float) -> None:
    _add_constant[(triton.cdiv(tensor.numel(), 4096),)](tensor, tensor.numel(), value, BLOCK=4096, num_warps=4)


def timed_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, tensors: list[torch.Tensor], repeats: int) -> None:
    indexed = list(enumerate(tensors))
    moved = 2 * sum(t.numel() * t.element_size() for t in tensors)
    key = DrawKey(0, 0, 0)
    torch_generator = Gaussian(generator="torch")
    four, eight = FusedPerturber(4), FusedPerturber(8)  # 4: the default
    tables = four.tables(indexed)  # built once, as the Gaussian perturbation keeps them
    variants = {}
    if len(tensors) == 1:
        variants["in-place add, Triton (floor)"] = lambda: add_constant(tensors[0], 1e-3)
    variants.update({
        "in-place add, torch._foreach_add_": lambda: torch._foreach_add_(tensors, 1e-3),
        "fused, 1 term, 4 warps (the default)": lambda: four.add_(tables, [(1e-3, 1)]),
        "fused, 1 term, 8 warps": lambda: eight.add_(tables, [(1e-3, 1)]),
        "fused, 2 terms, 4 warps": lambda: four.add_(tables, [(1e-3, 1), (-1e-3, 2)]),
        "torch generator, 1 term": lambda: torch_generator.add_each_(indexed, [(1e-3, key)], ()),
    })
    print(f"\n{name}: {len(tensors)} tensors, {moved / 2 / 2**20:.0f} MiB")
    print("| variant | ms / pass | GB/s | vs first row |\n|---|---|---|---|")
    floor = None
    for label, fn in variants.items():
        ms = timed_ms(fn, repeats)
        floor = floor or ms
        print(f"| {label} | {ms:.3f} | {moved / ms / 1e6:.0f} | {ms / floor:.2f}x |")


def sweep(repeats: int) -> None:
    """The fused kernel at other block sizes (``LANES``, patched for the sweep: another block size draws
    other normals, which a speed test does not mind) and warps, on one 1 GiB tensor."""
    import zotune.optim.fused as fused

    kept = fused.LANES
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tensor = torch.zeros((1 << 30) // dtype.itemsize, device="cuda", dtype=dtype)
        floor = timed_ms(lambda: add_constant(tensor, 1e-3), repeats)
        print(f"\none 1 GiB {dtype} tensor: Triton add (floor) {floor:.3f} ms")
        print("| block (elements) | warps | 1 term (ms) | 2 terms (ms) |\n|---|---|---|---|")
        for lanes in (128, 256, 512, 1024):
            fused.LANES = lanes
            for warps in (2, 4, 8):
                perturber = fused.FusedPerturber(warps)
                tables = perturber.tables([(0, tensor)])
                one, two = (timed_ms(lambda: perturber.add_(tables, [(1e-3, 1), (-1e-3, 2)][:terms]), repeats)
                            for terms in (1, 2))
                print(f"| {8 * lanes} | {warps} | {one:.3f} | {two:.3f} |")
        fused.LANES = kept


def lowrank_sweep(repeats: int) -> None:
    """The low-rank kernel (W += α L Rᵀ, rank 2, the factors laid out as LOZO's: L = Uᵀ.T from U drawn
    transposed, Rᵀ = V.T of a contiguous V (n, 2)) at tile shapes (``BM``, ``BN``, patched for the sweep) and
    warps, over the matrices of four Llama-2-7B blocks and of SmolLM2-135M, in ms per GiB of weights,
    beside the fused Gaussian pass and ``torch._foreach_add_`` over the same tensors."""
    from zotune.optim import lowrank_kernel

    block_7b = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    block_smollm2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    kept = lowrank_kernel.BM, lowrank_kernel.BN
    for name, shapes, dtype in (("four Llama-2-7B blocks", block_7b * 4, torch.bfloat16),
                                ("four Llama-2-7B blocks", block_7b * 4, torch.float32),
                                ("SmolLM2-135M's matrices", block_smollm2 * 30, torch.float32)):
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(shape, device="cuda", dtype=dtype, generator=g) for shape in shapes]
        triples = [(w, torch.randn(2, w.shape[0], device="cuda", dtype=dtype, generator=g).T,
                    torch.randn(w.shape[1], 2, device="cuda", dtype=dtype, generator=g).T) for w in weights]
        gib = sum(w.numel() * w.element_size() for w in weights) / 2**30
        fused = FusedPerturber()
        tables = fused.tables(list(enumerate(weights)))
        print(f"\n{name}, {dtype} ({gib:.2f} GiB): fused Gaussian pass "
              f"{timed_ms(lambda: fused.add_(tables, [(1e-4, 1)]), repeats) / gib:.3f} ms per GiB, "
              f"torch._foreach_add_ {timed_ms(lambda: torch._foreach_add_(weights, 1e-4), repeats) / gib:.3f}")
        print("| tile (rows x columns) | warps | ms per GiB |\n|---|---|---|")
        for bm, bn in ((32, 64), (32, 256), (16, 512), (8, 512), (4, 1024), (2, 1024), (2, 2048)):
            lowrank_kernel.BM, lowrank_kernel.BN = bm, bn
            low_rank = lowrank_kernel.tables(triples)
            for warps in (4, 8):
                ms = timed_ms(lambda: lowrank_kernel.add_(low_rank, 1e-4, num_warps=warps), repeats)
                print(f"| {bm} x {bn} | {warps} | {ms / gib:.3f} |")
        lowrank_kernel.BM, lowrank_kernel.BN = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="the kernel's block size and warps instead")
    parser.add_argument("--lowrank", action="store_true", help="the low-rank kernel's tile shapes instead")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.repeats)
    if args.lowrank:
        return lowrank_sweep(args.repeats)
    for dtype in (torch.float16, torch.bfloat16):
        measure(f"one tensor, {dtype}", [torch.zeros(1 << 29, device="cuda", dtype=dtype)], args.repeats)
    model = build_model("smollm2-135m", "cuda", torch.float32).requires_grad_(False)
    measure("SmolLM2-135M's parameters, float32", list(model.parameters()), args.repeats)


if __name__ == "__main__":
    main()
