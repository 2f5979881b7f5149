"""The fused perturbation kernel: ``p += Σ_k α_k Z_k`` over many tensors in one launch (Triton).

Each program takes one block of 4·QUADS elements of one tensor, loads it once, adds every term's
direction, generated in registers from its Philox key (:mod:`zotune.optim.philox` defines the
stream; nothing of Z is ever stored), and stores it once, rounding once from float32. A pass over
the trainable weights is then one launch per (device, dtype) that reads and writes each weight
once: bound by memory bandwidth, not by the host launching two kernels per tensor and term.

Imported only where it runs: on CUDA, or on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests check the kernel against the pure-torch stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .philox import MIN_UNIFORM, UNIFORM_SCALE

MAX_TERMS = 4  # terms fused in one launch (a pass with more runs in several)
QUADS = 256  # Philox calls per program: blocks of 1,024 elements
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _uniform(word):
    signed = word.to(tl.int32, bitcast=True)
    signed = tl.where(signed < 0, ~signed, signed)
    return signed.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def _box_muller(first, second):
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(first), MIN_UNIFORM)))
    angle = 6.283185307179586 * _uniform(second)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _direction(seed, counter, index):
    """4·QUADS normals: element 4c + j of the block is word j's normal of counter c."""
    low = counter.to(tl.uint32)
    zero = low * 0
    x0, x1, x2, x3 = tl.philox(seed, low, (counter >> 32).to(tl.uint32), zero + index.to(tl.uint32), zero)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2", "seed3", "alpha0", "alpha1", "alpha2", "alpha3"])
def _perturb_kernel(addresses, numels, indices, block_tensor, block_start,
                    seed0, seed1, seed2, seed3, alpha0, alpha1, alpha2, alpha3,
                    TERMS: tl.constexpr, QUADS: tl.constexpr, DTYPE: tl.constexpr):
    program = tl.program_id(0)
    tensor = tl.load(block_tensor + program)
    start = tl.load(block_start + program)  # a multiple of 4·QUADS
    numel = tl.load(numels + tensor)
    index = tl.load(indices + tensor)  # the optimizer's parameter index: part of the Philox counter
    pointer = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
    offsets = start + tl.arange(0, 4 * QUADS)
    inside = offsets < numel
    x = tl.load(pointer + offsets, mask=inside).to(tl.float32)
    counter = start // 4 + tl.arange(0, QUADS)
    x += alpha0 * _direction(seed0, counter, index)
    if TERMS > 1:
        x += alpha1 * _direction(seed1, counter, index)
    if TERMS > 2:
        x += alpha2 * _direction(seed2, counter, index)
    if TERMS > 3:
        x += alpha3 * _direction(seed3, counter, index)
    tl.store(pointer + offsets, x.to(DTYPE), mask=inside)


@dataclass
class _Tables:
    """Where each program works: built once per set of tensors (weights do not move)."""

    addresses: Tensor  # (tensors,) int64 data pointers
    numels: Tensor  # (tensors,) int64
    indices: Tensor  # (tensors,) int64 parameter indices
    block_tensor: Tensor  # (blocks,) int32: which tensor a program works on
    block_start: Tensor  # (blocks,) int64: its first element
    dtype: tl.dtype


class FusedPerturber:
    """Applies Σ α_k Z_k to groups of same-device, same-dtype contiguous tensors."""

    def __init__(self) -> None:
        self._tables: dict[tuple, _Tables] = {}

    @staticmethod
    def supports(param: Tensor) -> bool:
        return param.dtype in _DTYPES and param.is_contiguous()

    def _tables_for(self, tensors: Sequence[tuple[int, Tensor]]) -> _Tables:
        key = tuple((index, t.data_ptr(), t.numel()) for index, t in tensors)
        tables = self._tables.get(key)
        if tables is None:
            device = tensors[0][1].device
            block = 4 * QUADS
            owner = [i for i, (_, t) in enumerate(tensors) for _ in range(0, t.numel(), block)]
            starts = [s for _, t in tensors for s in range(0, t.numel(), block)]

            def table(values, dtype):
                return torch.tensor(values, dtype=dtype, device=device)

            tables = _Tables(table([t.data_ptr() for _, t in tensors], torch.int64),
                             table([t.numel() for _, t in tensors], torch.int64),
                             table([index for index, _ in tensors], torch.int64),
                             table(owner, torch.int32), table(starts, torch.int64), _DTYPES[tensors[0][1].dtype])
            self._tables[key] = tables
        return tables

    def add_(self, tensors: Sequence[tuple[int, Tensor]], terms: Sequence[tuple[float, int]]) -> None:
        """``t += Σ α_k Z(seed_k, index)`` for every ``(index, t)``; terms are (α, 64-bit key)."""
        if not tensors or not terms:
            return
        tables = self._tables_for(tensors)
        for first in range(0, len(terms), MAX_TERMS):
            chunk = list(terms[first:first + MAX_TERMS])
            padded = chunk + [(0.0, 0)] * (MAX_TERMS - len(chunk))
            alphas = [float(alpha) for alpha, _ in padded]
            seeds = [int(seed) for _, seed in padded]
            _perturb_kernel[(tables.block_tensor.numel(),)](
                tables.addresses, tables.numels, tables.indices, tables.block_tensor, tables.block_start,
                *seeds, *alphas, TERMS=len(chunk), QUADS=QUADS, DTYPE=tables.dtype)
