"""The fused perturbation kernel: ``p += Σ_k α_k Z_k`` over many tensors in one launch (Triton).

Each program takes one block of 8·LANES elements of one tensor, loads it once, adds every term's
direction, generated in registers from its Philox key (:mod:`zotune.optim.philox` defines the
stream; nothing of Z is ever stored), and stores it once, rounding once from float32. A pass over
the trainable weights is then one launch per (device, dtype), two where some tensor holds part of a
block (those blocks, masked, in the second), that reads and writes each weight once:
bound by memory bandwidth, not by the host launching two kernels per tensor and term.

Imported only where it runs: on CUDA, or on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests check the kernel against the pure-torch stream).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..transfer import to_device
from .philox import LANES

MAX_TERMS = 4  # terms fused in one launch (a pass with more runs in several)
_LAYOUTS_KEPT = 64  # layout tables kept per perturber (distinct sets of one-off tensors)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import, as here
_HALF_OFFSET = tl.constexpr(1.0 - 2.0 ** -17)  # globals a kernel reads are constexpr
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _half_uniform(bits):
    """``(h + ½) · 2⁻¹⁶`` for the 16-bit half ``h`` held in bits 7..22 of ``bits`` (uint32), bit for bit the
    reference's: the float with those mantissa bits is ``1 + h · 2⁻¹⁶``, and subtracting ``1 − 2⁻¹⁷`` from it
    is exact (Sterbenz). Two integer operations and a subtraction, no integer-to-float conversion."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True) - _HALF_OFFSET


@triton.jit
def _box_muller_pair(word, FAST: tl.constexpr):
    # FAST: the hardware's approximate log, sin and cos (a few ulps off on [-π, π]; the precise ones
    # made a pass over 16-bit weights compute-bound). The interpreter only has the precise ones.
    uniform = _half_uniform((word >> 16) << 7)
    angle = 6.283185307179586 * _half_uniform((word << 7) & 0x7FFF80) - 3.141592653589793
    if FAST:
        radius = tl.sqrt(-2.0 * libdevice.fast_logf(uniform))
        return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)
    radius = tl.sqrt(-2.0 * tl.log(uniform))
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _load_run(first, run: tl.constexpr, within, numel, LANES: tl.constexpr, MASKED: tl.constexpr):
    """Run ``run`` of the block at ``first`` (LANES pointers) in float32; MASKED: only the elements the
    tensor holds (``within``: run 0's offsets in the tensor)."""
    if MASKED:
        at = within + run * LANES
        return tl.load(first + run * LANES, mask=(at >= 0) & (at < numel)).to(tl.float32)
    return tl.load(first + run * LANES).to(tl.float32)


@triton.jit
def _store_run(first, run: tl.constexpr, x, within, numel, LANES: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        at = within + run * LANES
        tl.store(first + run * LANES, x.to(first.dtype.element_ty), mask=(at >= 0) & (at < numel))
    else:
        tl.store(first + run * LANES, x.to(first.dtype.element_ty))


@triton.jit
def _perturb_block(first, within, numel, counter, index, seed0, seed1, seed2, seed3, alpha0, alpha1, alpha2,
                   alpha3, LANES: tl.constexpr, TERMS: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr):
    """The eight runs at ``first`` (LANES pointers) += Σ α_k Z_k, each element read once, rounded once
    from float32 and written once."""
    x0 = _load_run(first, 0, within, numel, LANES, MASKED)
    x1 = _load_run(first, 1, within, numel, LANES, MASKED)
    x2 = _load_run(first, 2, within, numel, LANES, MASKED)
    x3 = _load_run(first, 3, within, numel, LANES, MASKED)
    x4 = _load_run(first, 4, within, numel, LANES, MASKED)
    x5 = _load_run(first, 5, within, numel, LANES, MASKED)
    x6 = _load_run(first, 6, within, numel, LANES, MASKED)
    x7 = _load_run(first, 7, within, numel, LANES, MASKED)
    low = counter.to(tl.uint32)
    high = (counter >> 32).to(tl.uint32)
    zero = low * 0
    for term in tl.static_range(TERMS):  # unrolled: the term's key and step size are scalars
        seed = seed0 if term == 0 else seed1 if term == 1 else seed2 if term == 2 else seed3
        alpha = alpha0 if term == 0 else alpha1 if term == 1 else alpha2 if term == 2 else alpha3
        w0, w1, w2, w3 = tl.philox(seed, low, high, zero + index.to(tl.uint32), zero)  # one call: 8 normals
        c, s = _box_muller_pair(w0, FAST)
        x0, x1 = x0 + alpha * c, x1 + alpha * s
        c, s = _box_muller_pair(w1, FAST)
        x2, x3 = x2 + alpha * c, x3 + alpha * s
        c, s = _box_muller_pair(w2, FAST)
        x4, x5 = x4 + alpha * c, x5 + alpha * s
        c, s = _box_muller_pair(w3, FAST)
        x6, x7 = x6 + alpha * c, x7 + alpha * s
    _store_run(first, 0, x0, within, numel, LANES, MASKED)
    _store_run(first, 1, x1, within, numel, LANES, MASKED)
    _store_run(first, 2, x2, within, numel, LANES, MASKED)
    _store_run(first, 3, x3, within, numel, LANES, MASKED)
    _store_run(first, 4, x4, within, numel, LANES, MASKED)
    _store_run(first, 5, x5, within, numel, LANES, MASKED)
    _store_run(first, 6, x6, within, numel, LANES, MASKED)
    _store_run(first, 7, x7, within, numel, LANES, MASKED)


@triton.jit
def _step_sizes(alpha0, alpha1, alpha2, alpha3, alpha_table, TERMS: tl.constexpr, ALPHAS_IN_TABLE: tl.constexpr):
    """The terms' α: the scalars given, or read from the device ((TERMS,) float32, computed there)."""
    if ALPHAS_IN_TABLE:
        alpha0 = tl.load(alpha_table)
        if TERMS > 1:
            alpha1 = tl.load(alpha_table + 1)
        if TERMS > 2:
            alpha2 = tl.load(alpha_table + 2)
        if TERMS > 3:
            alpha3 = tl.load(alpha_table + 3)
    return alpha0, alpha1, alpha2, alpha3


_UNSPECIALIZED = ["seed0", "seed1", "seed2", "seed3", "alpha0", "alpha1", "alpha2", "alpha3"]


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _perturb_inside(anchor, block_at, block_key, seed0, seed1, seed2, seed3, alpha0, alpha1, alpha2, alpha3,
                    alpha_table, TERMS: tl.constexpr, LANES: tl.constexpr, ALIGN: tl.constexpr, FAST: tl.constexpr,
                    ALPHAS_IN_TABLE: tl.constexpr):
    """Blocks their tensors hold whole: read and written unmasked, from an address the compiler knows to be a
    multiple of ALIGN elements (16 bytes where the host found it so): vectorised accesses.

    Two independent loads say where the block is and what it draws (see _Tables), so its data loads wait for
    one memory latency, not for a chain of lookups: on an H200 a pass over 1 GiB of float16 went from 0.649 to
    0.609 ms (benchmarks/perturb_pass.py). A branch to the masked code in this kernel, or these lines moved
    into a helper function, made it slower than the chain."""
    alpha0, alpha1, alpha2, alpha3 = _step_sizes(alpha0, alpha1, alpha2, alpha3, alpha_table, TERMS, ALPHAS_IN_TABLE)
    program = tl.program_id(0)
    at = tl.load(block_at + program)  # the block's first element, in elements from the anchor's
    key = tl.load(block_key + program)  # index << 40 | start (its first element in its parameter)
    lanes = tl.arange(0, LANES)
    _perturb_block(anchor + tl.multiple_of(at, ALIGN) + lanes, lanes, 0, (key & 0xFFFFFFFFFF) // 8 + lanes, key >> 40,
                   seed0, seed1, seed2, seed3, alpha0, alpha1, alpha2, alpha3, LANES, TERMS, FAST, False)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _perturb_edges(anchor, block_at, block_key, edge_within, edge_numel, seed0, seed1, seed2, seed3,
                   alpha0, alpha1, alpha2, alpha3, alpha_table, TERMS: tl.constexpr, LANES: tl.constexpr,
                   FAST: tl.constexpr, ALPHAS_IN_TABLE: tl.constexpr):
    """Blocks at a tensor's ends: the elements of each that the tensor holds (a shard may hold one in part)."""
    alpha0, alpha1, alpha2, alpha3 = _step_sizes(alpha0, alpha1, alpha2, alpha3, alpha_table, TERMS, ALPHAS_IN_TABLE)
    program = tl.program_id(0)
    at = tl.load(block_at + program)
    key = tl.load(block_key + program)
    lanes = tl.arange(0, LANES)
    within = tl.load(edge_within + program) + lanes  # run 0's elements, as offsets in the tensor
    numel = tl.load(edge_numel + program)
    _perturb_block(anchor + at + lanes, within, numel, (key & 0xFFFFFFFFFF) // 8 + lanes, key >> 40,
                   seed0, seed1, seed2, seed3, alpha0, alpha1, alpha2, alpha3, LANES, TERMS, FAST, True)


@dataclass
class _Tables:
    """Where each program works: built once per set of tensors (weights do not move). Programs work on
    blocks of 8·LANES elements of a tensor: one launch on those the tensors hold whole, one on those at a
    tensor's ends, which it may hold in part (none where every size is a multiple of 8·LANES)."""

    anchor: Tensor  # the first tensor: the kernel addresses every tensor's elements from its first element
    align: int  # every tensor's start is a multiple of this many elements from the anchor's (16 bytes, or 1)
    block_at: Tensor  # (whole blocks,) int64: the block's first element, in elements from the anchor's first
    block_key: Tensor  # (whole blocks,) int64: index << 40 | start: the parameter's index, and the block's
    #                    first element in the parameter
    edge_at: Tensor  # (end blocks,) int64: the same of the blocks at the tensors' ends
    edge_key: Tensor  # (end blocks,) int64
    edge_within: Tensor  # (end blocks,) int64: the block's first element, in elements from its tensor's
    edge_numel: Tensor  # (end blocks,) int64: the elements its tensor holds


def _recent(cache: OrderedDict, key: tuple, keep: int, build):
    """``cache[key]``, built on a miss; beyond ``keep`` entries the least recently used is dropped."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = build()
    if len(cache) > keep:
        cache.popitem(last=False)
    return value


def _layout(numels: Sequence[int], bases: Sequence[int], device: torch.device) -> tuple:
    """What depends only on the tensors' sizes: (inside, owner, start, edge_within, edge_numel), owner and
    start (each block's tensor and first element in its parameter, whole blocks first) kept in host memory
    for :func:`_head`, the end blocks' tables on ``device``. A tensor holding elements b .. b + n - 1 of
    its parameter (b = 0 but for shards) holds blocks ceil(b / B) .. (b + n) // B - 1 whole; the one
    before and the one after, where it holds part of them, are end blocks."""
    block = 8 * LANES  # read here, not imported as BLOCK: benchmarks/perturb_pass.py --sweep patches LANES
    counts, firsts, edge_owner, edge_start = [], [], [], []
    for tensor, (numel, base) in enumerate(zip(numels, bases)):
        low, high = -(-base // block), (base + numel) // block  # its whole blocks: low .. high - 1
        if high > low:
            ends = ([low - 1] if base % block else []) + ([high] if (base + numel) % block else [])
        else:  # under a block's worth: every block it touches
            ends = list(range(base // block, -(-(base + numel) // block)))
        counts.append(max(high - low, 0))
        firsts.append(low)
        edge_owner += [tensor] * len(ends)
        edge_start += [b * block for b in ends]
    count = torch.tensor(counts, dtype=torch.int64)
    inside = int(count.sum())
    first_program = torch.cumsum(count, 0) - count
    owner = torch.repeat_interleave(torch.arange(len(numels)), count)
    starts = (torch.arange(inside) + torch.repeat_interleave(torch.tensor(firsts) - first_program, count)) * block
    edge_owner, edge_start = torch.tensor(edge_owner, dtype=torch.int64), torch.tensor(edge_start, dtype=torch.int64)
    edge_within = edge_start - torch.tensor(bases, dtype=torch.int64)[edge_owner]
    edge_numel = torch.tensor(numels, dtype=torch.int64)[edge_owner]
    edge_within, edge_numel = to_device(torch.stack([edge_within, edge_numel]), device)
    return inside, torch.cat([owner, edge_owner]), torch.cat([starts, edge_start]), edge_within, edge_numel


def _head(addresses: Sequence[int], indices: Sequence[int], bases: Sequence[int], element_size: int,
          inside: int, owner: Tensor, starts: Tensor, device: torch.device) -> tuple[Tensor, ...]:
    """(block_at, block_key, edge_at, edge_key) of ``_Tables`` on ``device``, in one transfer, from each
    tensor's start in elements from the first's (same-dtype allocations start a whole number of elements
    apart)."""
    if max(indices) >= 1 << 23:
        raise ValueError(f"the fused kernel takes parameter indices below 2**23, got {max(indices)}")
    offsets = torch.tensor([(a - addresses[0]) // element_size - b for a, b in zip(addresses, bases)])
    at, key = to_device(torch.stack([offsets[owner] + starts, torch.tensor(indices)[owner] << 40 | starts]), device)
    return at[:inside], key[:inside], at[inside:], key[inside:]


class FusedPerturber:
    """Applies Σ α_k Z_k to groups of same-device, same-dtype contiguous tensors (one launch per group
    and up to MAX_TERMS terms, two where some tensor holds part of a block)."""

    # 4 warps: 16 elements a thread a block. On an H200 the fastest for one term on float16: 0.609 ms a GiB
    # against 0.684 at 8 warps (benchmarks/perturb_pass.py); the version before also at 2 warps (--sweep: 0.71).
    def __init__(self, num_warps: int = 4) -> None:
        self.num_warps = num_warps
        # The tables of the tensor sets seen last: the layout (what _layout returns) by (device, numels,
        # bases), shared by every set of those sizes (the decoder blocks of a model); block_at and block_key
        # (16 bytes a block on the device) by the addresses and indices too, computed from the layout in host
        # memory. One-off tensors of a recurring layout (an offloaded block's uploaded weights, a rule's
        # coordinates) then cost one transfer of those, or nothing when their addresses recur.
        self._layouts: OrderedDict[tuple, tuple] = OrderedDict()
        self._heads: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()  # -> what _head returns

    @staticmethod
    def supports(param: Tensor) -> bool:
        return param.dtype in _DTYPES and param.is_contiguous()

    def tables(self, tensors: Sequence[tuple], bases: Sequence[int] | None = None) -> _Tables:
        """The launch tables of same-device, same-dtype contiguous ``(index, tensor)`` pairs (keep them:
        they stay valid while the tensors keep their storage). ``bases[t]``: the parameter element a
        shard's first element is (its direction is the parameter's from there on); 0 by default."""
        device = tensors[0][1].device
        bases = tuple(bases) if bases is not None else (0,) * len(tensors)
        numels = tuple(t.numel() for _, t in tensors)
        inside, owner, starts, edge_within, edge_numel = _recent(
            self._layouts, (device, numels, bases), _LAYOUTS_KEPT, lambda: _layout(numels, bases, device))
        # (the allocator hands recurring one-off tensors the same blocks, so their addresses recur too)
        element_size = tensors[0][1].element_size()
        addresses, indices = tuple(t.data_ptr() for _, t in tensors), tuple(index for index, _ in tensors)
        head = _recent(self._heads, (device, addresses, indices, numels, bases), 4 * _LAYOUTS_KEPT,
                       lambda: _head(addresses, indices, bases, element_size, inside, owner, starts, device))
        # vectorised accesses need every block's first element 16-byte aligned: the tensors' starts (a block
        # starts a multiple of 8·LANES elements into its parameter, which a shard's base shifts)
        vector = 16 // element_size
        aligned = all(a % 16 == 0 for a in addresses) and all(b % vector == 0 for b in bases)
        return _Tables(tensors[0][1], vector if aligned else 1, *head, edge_within, edge_numel)

    def add_(self, tensors: Sequence[tuple[int, Tensor]] | _Tables, terms: Sequence[tuple[float | Tensor, int]]
             ) -> None:
        """``t += Σ α_k Z(seed_k, index)`` for every ``(index, t)`` (or the tensors of prebuilt tables);
        terms are (α, 64-bit key), α a float or a scalar tensor on the tensors' device (read there, in
        float32 as a float would be passed: the host never waits for it)."""
        if not tensors or not terms:
            return
        tables = tensors if isinstance(tensors, _Tables) else self.tables(tensors)
        in_table = any(isinstance(alpha, Tensor) for alpha, _ in terms)
        if in_table:
            device = tables.anchor.device
            table = torch.stack([torch.full((), alpha, dtype=torch.float64, device=device)
                                 if not isinstance(alpha, Tensor) else alpha.to(device, torch.float64)
                                 for alpha, _ in terms]).to(torch.float32)
        for first in range(0, len(terms), MAX_TERMS):
            chunk = list(terms[first:first + MAX_TERMS])
            padded = chunk + [(0.0, 0)] * (MAX_TERMS - len(chunk))
            alphas = [0.0 if in_table else float(alpha) for alpha, _ in padded]
            seeds = [int(seed) for _, seed in padded]
            terms_args = (*seeds, *alphas, table[first:] if in_table else tables.block_at)  # (block_at: never read)
            shared = dict(TERMS=len(chunk), LANES=LANES, FAST=not _INTERPRETED, ALPHAS_IN_TABLE=in_table,
                          num_warps=self.num_warps)
            if tables.block_key.numel():
                _perturb_inside[(tables.block_key.numel(),)](tables.anchor, tables.block_at, tables.block_key,
                                                             *terms_args, ALIGN=tables.align, **shared)
            if tables.edge_key.numel():
                _perturb_edges[(tables.edge_key.numel(),)](tables.anchor, tables.edge_at, tables.edge_key,
                                                           tables.edge_within, tables.edge_numel, *terms_args, **shared)
