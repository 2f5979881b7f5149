"""Counter-based Gaussian directions: Philox4x32-10 and Box-Muller, addressed by element.

The fused CUDA kernel (:mod:`zotune.optim.fused`) and this pure-torch version compute the same
direction, so the kernel's logic can be checked anywhere. Element ``e`` of parameter ``index``
under a draw whose 64-bit key is ``seed``:

* elements come in blocks of ``BLOCK = 4 · QUADS`` (4,096): element ``e`` is in block
  ``b = e // BLOCK``, quarter ``j = (e % BLOCK) // QUADS``, lane ``l = e % QUADS``;
* ``(x0, x1, x2, x3) = Philox4x32-10(key = (seed_lo, seed_hi), counter = (c_lo, c_hi, index, 0))``
  with ``c = QUADS · b + l`` (Salmon et al., SC 2011; the rounds and constants of Random123,
  which Triton's ``tl.philox`` implements);
* each word becomes a uniform in [0, 1): its int32 reading, complemented if negative, times
  4.6566127342e-10 (so 2³¹ − 1 maps just below 1);
* two Box-Muller pairs, ``(x0, x1) -> (n0, n1)`` and ``(x2, x3) -> (n2, n3)``:
  ``r = sqrt(-2 log max(u_a, 1e-7))`` (so |z| <= 5.68), ``θ = 2π u_b − π``, ``(r cos θ, r sin θ)``;
  element ``e`` takes ``n_j``.

One Philox call yields four normals, so a pass over a weight costs a quarter of the rounds of
drawing each element separately; the quarters are contiguous, so the kernel reads and writes
each as one coalesced run. The integer words are bit-identical here and in the kernel;
the normals agree to float32 rounding of log, sqrt, cos and sin, which differ between CPU and
GPU math libraries (the CUDA kernel uses the hardware's approximate log, sin and cos: a few ulps
on [-π, π], which is why θ is centred). That is why a run's directions are tied to the kind of device that drew them.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUNDS = 10
# Philox calls per block. 1,024 rather than 256, with the kernel's 16-byte accesses: a pass over 1 GiB of
# 16-bit weights takes 0.84 ms instead of 0.98 ms (H200, benchmarks/perturb_pass.py; copying: 0.56 ms).
QUADS = 1024
BLOCK = 4 * QUADS
STREAM = f"philox4x32-{ROUNDS}/box-muller/block-{BLOCK}"  # names the stream in trajectory logs
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
UNIFORM_SCALE = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``b``
    (held in int64). The high word is assembled from 16-bit partial products, which int64 holds
    without overflow; the low word is the wrapped product's low bits."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    high = a_hi * b_hi + ((a_hi * b_lo + a_lo * b_hi + (low >> 16)) >> 16)
    return high & _U32, (a * b) & _U32


def philox4x32(seed: int, counter: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four uint32 words (as int64) for each counter value (int64 tensor, < 2⁶³)."""
    return philox_rounds(seed & _U32, (seed >> 32) & _U32, counter & _U32, (counter >> 32) & _U32,
                         torch.full_like(counter, index & _U32), torch.zeros_like(counter))


def philox_rounds(k0: int, k1: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on uint32 words held in int64 tensors."""
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _U32, (k1 + KEY_B) & _U32
    return c0, c1, c2, c3


def _uniform(word: Tensor) -> Tensor:
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)  # the int32 reading
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x: the complement maps negatives onto [0, 2³¹)
    return signed.to(torch.float32) * UNIFORM_SCALE


def _box_muller(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(_uniform(first), min=MIN_UNIFORM)))
    angle = 6.283185307179586 * _uniform(second) - 3.141592653589793
    return radius * torch.cos(angle), radius * torch.sin(angle)


def normals(seed: int, index: int, start: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Elements ``start .. start + numel - 1`` of the direction (float32)."""
    if start < 0 or numel < 0:
        raise ValueError(f"start and numel must be >= 0, got {start} and {numel}")
    skip = start % BLOCK  # the stream is drawn by whole blocks: from the block holding ``start``
    if skip:
        return normals(seed, index, start - skip, numel + skip, device)[skip:]
    blocks = -(-numel // BLOCK)
    counters = torch.arange(start // 4, start // 4 + blocks * QUADS, device=device, dtype=torch.int64)
    x0, x1, x2, x3 = philox4x32(seed, counters, index)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    quarters = torch.stack([n.view(blocks, QUADS) for n in (n0, n1, n2, n3)], dim=1)  # (blocks, 4, QUADS)
    return quarters.view(-1)[:numel]
