"""Many low-rank updates in one launch: ``W_t += α · L_t R_tᵀ`` for every matrix t of a group (Triton).

LOZO applies one direction U Vᵀ to every weight matrix three times a step (+εZ, −2εZ, and the
restore fused with the update). As one ``addmm_`` per matrix that is three launches per matrix and
step (630 for SmolLM2-135M's 210 matrices), which the host issues more slowly than the GPU runs
them. Here each program takes a BM x BN tile of one matrix, forms its part of L Rᵀ in registers from
the thin factors (rank r: r outer products, accumulated in float32), and reads and writes the tile
once, rounding once: a pass is one launch per (device, dtype) group.

Imported only where it runs: on CUDA, or on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests check it against ``addmm_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..transfer import to_device

# A tile: 8 rows of 512 contiguous elements. On an H200 (benchmarks/perturb_pass.py --lowrank, rank 2) a pass
# over bfloat16 Llama-2-7B matrices took 0.62 ms per GiB (the fused Gaussian pass: 0.59), float32 0.55
# (0.54); tiles of 32 x 64 took 2.09 and 1.14 before the accesses were vectorised (see the kernel), and
# tiles from 2 x 2048 to 32 x 256 are now within 10% of 8 x 512.
BM, BN = 8, 512
_FIELDS = 10  # numbers per matrix in the table
FIELDS = tl.constexpr(_FIELDS)  # (a global the kernel reads must be a constexpr)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["alpha"])
def _lowrank_kernel(anchor, table, tile_tensor, tile_row, tile_col, alpha,
                    BM: tl.constexpr, BN: tl.constexpr, RANK: tl.constexpr, ALIGN: tl.constexpr):
    """One BM x BN tile of one matrix += alpha · (its rows of L)(its columns of R)ᵀ.

    Every address is an offset in elements from ``anchor`` (the group's first W; L and R share its dtype).
    ALIGN: what the host found every W's start, row stride and width to be multiples of (16 bytes' worth
    of elements, or 1). Told so, the compiler reads and writes W in 16-byte vectors: on an H200 a pass over
    bfloat16 Llama-2-7B matrices took 0.60-0.62 ms per GiB against 0.95 without (2-byte accesses), float32
    0.55 against 0.63. RANK is a constant so that every factor load is issued before the first product."""
    program = tl.program_id(0)
    t = tl.load(tile_tensor + program)
    row0 = tl.load(tile_row + program)
    col0 = tl.multiple_of(tl.load(tile_col + program), BN)  # tiles start every BN columns
    entry = table + t * FIELDS  # per matrix: W's, L's, R's offsets; m, n; W's row stride; L's, R's two strides
    w_at = tl.multiple_of(tl.load(entry + 0), ALIGN)
    left, right = anchor + tl.load(entry + 1), anchor + tl.load(entry + 2)
    m, n = tl.load(entry + 3), tl.multiple_of(tl.load(entry + 4), ALIGN)
    w_row = tl.multiple_of(tl.load(entry + 5), ALIGN)
    l_row, l_rank, r_row, r_rank = tl.load(entry + 6), tl.load(entry + 7), tl.load(entry + 8), tl.load(entry + 9)
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    in_rows, in_cols = rows < m, cols < n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.static_range(RANK):  # (L Rᵀ)_ij = Σ_k L_ik R_jk, the rank a handful (LOZO's r = 2)
        l_col = tl.load(left + rows * l_row + k * l_rank, mask=in_rows, other=0.0).to(tl.float32)
        r_col = tl.load(right + cols * r_row + k * r_rank, mask=in_cols, other=0.0).to(tl.float32)
        acc += l_col[:, None] * r_col[None, :]
    pointers = anchor + w_at + rows[:, None] * w_row + cols[None, :]
    mask = in_rows[:, None] & in_cols[None, :]
    x = tl.load(pointers, mask=mask).to(tl.float32)
    tl.store(pointers, (x + alpha * acc).to(anchor.dtype.element_ty), mask=mask)


@dataclass
class LowRankTables:
    """Where each program works, built once per set of (W, L, R) (valid while they keep their storage)."""

    anchor: Tensor  # the first W: every address in the table is an offset in elements from its first element
    table: Tensor  # (matrices * FIELDS,) int64: see the kernel
    tile_tensor: Tensor  # (tiles,) int64
    tile_row: Tensor  # (tiles,) int64
    tile_col: Tensor  # (tiles,) int64
    rank: int  # every L's columns
    align: int  # see the kernel's ALIGN


def supports(matrix: Tensor, left: Tensor, right_t: Tensor) -> bool:
    """A CUDA matrix with contiguous rows, and factors of its dtype (any strides)."""
    return matrix.dtype in _DTYPES and matrix.dim() == 2 and matrix.stride(1) == 1 and \
        left.dtype == right_t.dtype == matrix.dtype


def tile_tables(shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(owner, first row, first column) of every BM x BN tile of matrices of these (m, n) shapes, row-major
    within a matrix, on ``device``: three (tiles,) int64 tensors. They depend on the shapes alone, so a
    caller keeps them while only the factors change (LOZO's new V every window); a new set is vectorised
    work, not a Python loop over the tiles (3.3 million at the Llama-2-7B shape)."""
    m, n = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2).unbind(1)
    grid_cols = -(-n // BN)
    counts = -(-m // BM) * grid_cols  # tiles per matrix
    owner = torch.repeat_interleave(torch.arange(len(shapes)), counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    columns = grid_cols[owner]
    packed = to_device(torch.cat([owner, within // columns * BM, within % columns * BN]), device)  # one transfer
    return tuple(packed.view(3, -1).unbind(0))


def tables(triples: Sequence[tuple[Tensor, Tensor, Tensor]], tiles: tuple[Tensor, Tensor, Tensor] | None = None
           ) -> LowRankTables:
    """The launch tables of same-device, same-dtype ``(W (m, n), L (m, r), Rᵀ (r, n))`` of one rank r;
    ``tiles``: what :func:`tile_tables` gives for their shapes, where the caller kept it (built here otherwise)."""
    anchor = triples[0][0]
    size = anchor.element_size()
    rows = []
    for w, left, right_t in triples:
        right = right_t.T  # (n, r)
        # (same-dtype allocations start a whole number of elements apart)
        rows.append([(t.data_ptr() - anchor.data_ptr()) // size for t in (w, left, right)] +
                    [*w.shape, w.stride(0), *left.stride(), *right.stride()])
    ranks = {left.shape[1] for _, left, _ in triples}
    if len(ranks) != 1:
        raise ValueError(f"one launch takes factors of one rank, got ranks {sorted(ranks)}")
    vector = 16 // size
    aligned = all(w.data_ptr() % 16 == 0 and w.stride(0) % vector == 0 and w.shape[1] % vector == 0
                  for w, _, _ in triples)
    if tiles is None:
        tiles = tile_tables([tuple(w.shape) for w, _, _ in triples], anchor.device)
    table = to_device(torch.tensor(rows, dtype=torch.int64).flatten(), anchor.device)
    return LowRankTables(anchor, table, *tiles, ranks.pop(), vector if aligned else 1)


def add_(tables_: LowRankTables, alpha: float, num_warps: int = 4) -> None:
    """``W_t += alpha · L_t R_tᵀ`` for every matrix of the tables, in one launch."""
    _lowrank_kernel[(tables_.tile_tensor.numel(),)](
        tables_.anchor, tables_.table, tables_.tile_tensor, tables_.tile_row, tables_.tile_col, float(alpha),
        BM=BM, BN=BN, RANK=tables_.rank, ALIGN=tables_.align, num_warps=num_warps)
