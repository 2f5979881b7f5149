"""Counter-based Gaussian directions: Philox4x32-10 and Box-Muller, addressed by element.

The fused CUDA kernel (:mod:`zotune.optim.fused`) and this pure-torch version compute the same
direction, so the kernel's logic can be checked anywhere. Element ``e`` of parameter ``index``
under a draw whose 64-bit key is ``seed``:

* elements come in blocks of ``BLOCK = 8 · LANES`` (2,048): element ``e`` is in block
  ``b = e // BLOCK``, run ``j = (e % BLOCK) // LANES`` (0..7), lane ``l = e % LANES``;
* ``(w0, w1, w2, w3) = Philox4x32-10(key = (seed_lo, seed_hi), counter = (c_lo, c_hi, index, 0))``
  with ``c = LANES · b + l`` (Salmon et al., SC 2011; the rounds and constants of Random123,
  which Triton's ``tl.philox`` implements);
* each word ``w_k`` makes one Box-Muller pair from its two 16-bit halves: the high half ``h`` gives
  ``u = (h + ½) / 2¹⁶`` and the radius ``r = sqrt(-2 log u)`` (so |z| <= 4.85), the low half ``h'``
  gives ``θ = 2π (h' + ½) / 2¹⁶ − π``; run ``2k`` takes ``r cos θ``, run ``2k + 1`` takes ``r sin θ``.

One Philox call yields eight normals. On 16-bit weights the draw's arithmetic, not memory, bounded
the kernel while each call made four (a 32-bit uniform per normal): 0.86 ms a pass over 1 GiB of
float16 on an H200 against 0.56 ms for a plain read and write, 0.65 ms with eight, 0.61 ms with the
kernel's flat launch tables (``benchmarks/perturb_pass.py``, docs/benchmarks.md).
Sixteen bits a uniform make a discrete normal on 2³² points: its mean is exactly 0 (the angles are
symmetric about 0), its variance 1 − 5e-6 (``E[-2 log u]`` by the midpoint rule), its tails cut
at 4.85 (a true normal's beyond that: probability 1.2e-6); nothing a ZO estimate, averaging over
millions of coordinates, can tell apart. The runs are contiguous, so the kernel reads and writes each as one
coalesced run. The uniforms are bit-identical here and in the kernel; the normals agree to float32
rounding of log, sqrt, cos and sin, which differ between CPU and GPU math libraries (the CUDA
kernel uses the hardware's approximate log, sin and cos: a few ulps on [-π, π], which is why θ is
centred). That is why a run's directions are tied to the kind of device that drew them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

ROUNDS = 10
# Philox calls per block (each makes 8 normals). Blocks of 8 x 256 elements: on an H200 a pass over 1 GiB of
# float16 took 0.64 ms, against 0.68-0.85 ms for blocks of 4,096 and 8,192 (benchmarks/perturb_pass.py --sweep).
LANES = 256
BLOCK = 8 * LANES
STREAM = f"philox4x32-{ROUNDS}/box-muller-16/block-{BLOCK}"  # names the stream in trajectory logs
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
HALF_SCALE = 2.0 ** -16  # a 16-bit half h becomes the uniform (h + ½) · 2⁻¹⁶, in (0, 1), exact in float32
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``b``
    (held in int64). The high word comes from ``a`` times each 16-bit half of ``b`` (both below 2⁴⁸,
    which int64 holds): ⌊a·b / 2³²⌋ = ⌊(a·b_hi + ⌊a·b_lo / 2¹⁶⌋) / 2¹⁶⌋; the low word is the wrapped
    product's low bits."""
    return (a * (b >> 16) + ((a * (b & 0xFFFF)) >> 16)) >> 16, (a * b) & _U32


def philox4x32(seed: int, counter: Tensor, index: int | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four uint32 words (as int64) for each counter value (int64 tensor, < 2⁶³) of parameter ``index``
    (or of each element's, an int64 tensor like ``counter``)."""
    index = index & _U32 if isinstance(index, Tensor) else torch.full_like(counter, index & _U32)
    return philox_rounds(seed & _U32, (seed >> 32) & _U32, counter & _U32, (counter >> 32) & _U32, index,
                         torch.zeros_like(counter))


def philox_rounds(k0: int, k1: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on uint32 words held in int64 tensors."""
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _U32, (k1 + KEY_B) & _U32
    return c0, c1, c2, c3


def _half_uniform(half: Tensor) -> Tensor:
    return (half.to(torch.float32) + 0.5) * HALF_SCALE


def _box_muller_pair(word: Tensor) -> tuple[Tensor, Tensor]:
    """The two normals of one Philox word (uint32 held in int64): ``(r cos θ, r sin θ)``."""
    radius = torch.sqrt(-2.0 * torch.log(_half_uniform(word >> 16)))
    angle = 6.283185307179586 * _half_uniform(word & 0xFFFF) - 3.141592653589793
    return radius * torch.cos(angle), radius * torch.sin(angle)


def normals(seed: int, index: int, start: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Elements ``start .. start + numel - 1`` of the direction (float32)."""
    return normals_each(seed, [(index, start, numel)], device)[0]


def normals_each(seed: int, pieces: Sequence[tuple[int, int, int]], device: torch.device | str = "cpu"
                 ) -> list[Tensor]:
    """:func:`normals` of every ``(index, start, numel)``, from one evaluation of the stream over all their
    blocks: a pass over many small tensors costs the ~200 tensor operations of Philox and Box-Muller once,
    not once per tensor."""
    counters, spans = [], []
    for index, start, numel in pieces:
        if start < 0 or numel < 0:
            raise ValueError(f"start and numel must be >= 0, got {start} and {numel}")
        skip = start % BLOCK  # the stream is drawn by whole blocks: from the block holding ``start``
        blocks = -(-(numel + skip) // BLOCK)
        first = start // BLOCK * LANES
        counters.append(torch.arange(first, first + blocks * LANES, device=device, dtype=torch.int64))
        spans.append((index, blocks, skip, numel))
    counter = torch.cat(counters)  # (Σ blocks · LANES,)
    index = torch.repeat_interleave(torch.tensor([i for i, _, _, _ in spans], dtype=torch.int64, device=device),
                                    torch.tensor([b * LANES for _, b, _, _ in spans], device=device))
    runs = [n for word in philox4x32(seed, counter, index) for n in _box_muller_pair(word)]  # 8 x (Σ blocks·LANES,)
    by_block = torch.stack([n.view(-1, LANES) for n in runs], dim=1).view(-1, BLOCK)  # (Σ blocks, 8·LANES)
    out, at = [], 0
    for _, blocks, skip, numel in spans:
        out.append(by_block[at:at + blocks].view(-1)[skip:skip + numel])
        at += blocks
    return out
