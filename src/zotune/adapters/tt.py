"""Tensor-train (TT) linear maps: the building block of LoRETTA and AdaZeta.

A map y = x W (W of shape N_in x N_out) is stored as d cores G_i of shape (r_{i-1}, k_i, r_i),
r_0 = r_d = 1, with modes k_1..k_m multiplying to N_in and k_{m+1}..k_d to N_out (input modes
first, row-major): W[(a_1..a_m), (a_{m+1}..a_d)] = G_1[:, a_1, :] ... G_d[:, a_d, :]
(LoRETTA, Yang et al., NAACL 2024, §3.1).

The forward never builds W ("fast forward", AdaZeta §3): the input-side cores merge into a thin
A (N_in x r_m) and the output-side cores into B (r_m x N_out), so x W = (x A) B costs
O(r_m (N_in + N_out)) per token instead of O(N_in N_out). The split m is where the input modes
end, computed from the shapes (splitting at d/2, as the reference code does, is wrong for
shapes such as [4,8,8,8,8,8]).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.copies import per_copy_linear


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, max_mode: int = 16) -> list[int]:
    """Modes k_1..k_j with product ``n``, as balanced as the prime factors allow, each <= ``max_mode``
    unless a prime factor is larger (a large prime stays one mode: it costs r² k parameters, no more).

    The number of modes is the fewest that can hold the small primes under ``max_mode``; primes go,
    largest first, to the mode with the smallest product so far (e.g. 4096 -> [16, 16, 16],
    768 -> [12, 8, 8], 64 -> [8, 8], 4098 = 2·3·683 -> [6, 683]).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"a TT mode size must be a positive integer, got {n}")
    if max_mode < 2:
        raise ValueError(f"max_mode must be >= 2, got {max_mode}")
    if n == 1:
        return [1]
    primes = _prime_factors(int(n))
    large = [p for p in primes if p > max_mode]
    small = sorted((p for p in primes if p <= max_mode), reverse=True)
    small_product = math.prod(small)
    modes = [1] * max(1, math.ceil(math.log(small_product) / math.log(max_mode) - 1e-9)) if small else []
    for p in small:
        fits = [i for i, m in enumerate(modes) if m * p <= max_mode]
        if fits:
            i = min(fits, key=lambda i: modes[i])
        else:  # the greedy packing needs one more mode
            modes.append(1)
            i = len(modes) - 1
        modes[i] *= p
    return sorted(modes, reverse=True) + sorted(large)


def _host_layout(device: torch.device) -> bool:
    """Whether to arrange the thin GEMMs for a CPU BLAS (True) or for a GPU (False).

    On a CPU the layout decides the speed: a contiguous long dimension, and the bias folded into
    the GEMM instead of a second pass over the output. On a GPU these maps are bound by kernel
    launches, and the copies that arrange the layout would be launches of their own.
    """
    return device.type == "cpu"


def _input_side(x: Tensor, a: Tensor) -> Tensor:
    """x A for the thin A (N_in x r_m): (..., N_in) -> (..., r_m)."""
    if _host_layout(x.device):
        # F.linear takes (out, in) weights: with A given as (r_m, N_in) the GEMM's long dimension
        # is contiguous, about 3x faster on a CPU than x @ A with A (N_in, r_m).
        return F.linear(x, a.T.contiguous())
    return x @ a


# Below this many output elements the oneDNN primitive's fixed cost (about 30 µs) outweighs its
# faster thin GEMM (2-core AMD EPYC, K = 6: even near 256 x 1024 outputs, 1.3x-2x faster from
# 2048 x 2048 up).
_ONEDNN_MIN_OUTPUT = 1 << 18


@functools.cache
def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _output_side(hidden: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """hidden B + bias for the thin B (r_m x N_out): (..., r_m) -> (..., N_out).

    With K = r_m (about 5) the GEMM does almost no arithmetic, and its speed is how fast the
    kernel writes the output: at 2048 x 3072 MKL's sgemm (behind ``F.linear``) took 2.4 ms where
    filling the same output takes 0.5 ms and oneDNN's matmul (the operator PyTorch's CPU compiler
    emits) 1.6 ms. That operator has no backward, so it serves forwards without autograd (a ZO
    step, evaluation); training by backprop takes ``F.linear``.
    """
    wide = hidden.numel() // hidden.shape[-1] * b.shape[1] >= _ONEDNN_MIN_OUTPUT
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, b, bias))
    if (wide and not differentiable and _host_layout(hidden.device) and hidden.dtype == torch.float32
            and torch.backends.mkldnn.enabled and _onednn_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(hidden, b.T, bias, "none", [], "")
    return F.linear(hidden, b.T, bias)


def tt_numel(modes: list[int], rank: int) -> int:
    """Σ_i r_{i-1} k_i r_i with r_0 = r_d = 1 and every inner rank equal to ``rank``."""
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(modes))


class TTLinear(nn.Module):
    """y = x W + b with W (in_features x out_features) in tensor-train form.

    Args:
        in_features, out_features: N_in, N_out.
        rank: inner TT rank r (every r_i for 0 < i < d).
        in_modes, out_modes: the mode factorisations; default :func:`factorize` of each size.
        bias: add a bias, initialised U(−1/√N_out, 1/√N_out) as the reference code does.
        generator: the ``torch.Generator`` of the initialisation (the global RNG is never used).

    Init: G_i ~ N(0, 1)/√r_i · σ^{1/d} with σ = √(1/(N_in + N_out)), so the entries of W have
    standard deviation ≈ σ. Parameters: ``core_data``, all cores in one flat tensor (``cores`` are
    views of it: one tensor per layer to perturb, draw and update instead of d), and ``bias``.
    """

    #: The batched execution path may swap in parameters with a leading copies dimension (see :meth:`copies`).
    stacked_parameters = True

    def __init__(self, in_features: int, out_features: int, rank: int = 5, *, in_modes: list[int] | None = None,
                 out_modes: list[int] | None = None, bias: bool = True, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if int(rank) != rank or rank < 1:
            raise ValueError(f"TT rank must be a positive integer, got {rank}")
        self.in_modes = list(in_modes) if in_modes is not None else factorize(in_features)
        self.out_modes = list(out_modes) if out_modes is not None else factorize(out_features)
        for name, modes, size in (("in_modes", self.in_modes, in_features),
                                  ("out_modes", self.out_modes, out_features)):
            if math.prod(modes) != size:
                raise ValueError(f"{name} {modes} multiply to {math.prod(modes)}, not {size}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        modes = self.in_modes + self.out_modes
        ranks = [1] + [rank] * (len(modes) - 1) + [1]
        sigma = math.sqrt(1.0 / (in_features + out_features)) ** (1.0 / len(modes))
        self.core_shapes = [(ranks[i], k, ranks[i + 1]) for i, k in enumerate(modes)]
        cores = [torch.randn(shape, generator=generator, dtype=dtype) * (sigma / math.sqrt(shape[2]))
                 for shape in self.core_shapes]
        self.core_data = nn.Parameter(torch.cat([c.flatten() for c in cores]).to(device))
        if bias:
            bound = 1.0 / math.sqrt(out_features)
            b = torch.rand(out_features, generator=generator, dtype=dtype) * (2 * bound) - bound
            self.bias = nn.Parameter(b.to(device))
        else:
            self.register_parameter("bias", None)

    @property
    def cores(self) -> list[Tensor]:
        """G_1..G_d, each (r_{i-1}, k_i, r_i): views of ``core_data``."""
        out, start = [], 0
        for shape in self.core_shapes:
            size = math.prod(shape)
            out.append(self.core_data[start : start + size].view(shape))
            start += size
        return out

    def copies(self) -> int | None:
        """S when the parameters carry a leading copies dimension, else None. The batched execution path
        swaps in (S, numel) cores and (S, N_out) biases, one row per measuring point of a step; the layer
        then maps copy s's rows of its input (copy-major) through copy s's parameters, all in one call."""
        for tensor in (self.core_data, self.bias):
            if tensor is not None and tensor.dim() == 2:
                return tensor.shape[0]
        return None

    def factors(self) -> tuple[Tensor, Tensor]:
        """A (N_in x r_m) from the input cores and B (r_m x N_out) from the output cores; W = A B.
        With copies (:meth:`copies`): A (S, N_in, r_m) and B (S, r_m, N_out)."""
        copies = self.copies()
        if copies is not None:
            core_data = self.core_data
            return self.factors_of_copies(core_data if core_data.dim() == 2 else core_data.expand(copies, -1))
        m, cores = len(self.in_modes), self.cores
        a = cores[0].reshape(cores[0].shape[1], -1)  # (k_1, r_1)
        for core in cores[1:m]:
            r_prev, k, r = core.shape
            a = (a @ core.reshape(r_prev, k * r)).reshape(-1, r)  # (k_1..k_i, r_i), row-major
        last = cores[-1]
        b = last.reshape(last.shape[0], -1)  # (r_{d-1}, k_d)
        for core in reversed(cores[m:-1]):
            r_prev, k, r = core.shape
            b = (core.reshape(r_prev * k, r) @ b).reshape(r_prev, -1)  # (r_{i-1}, k_i..k_d)
        return a, b

    def factors_of_copies(self, core_data: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`factors` of S sets of cores at once: ``core_data`` (S, numel) -> A (S, N_in, r_m), B (S, r_m, N_out),
        a few batched products instead of S times as many small ones."""
        copies, m, start, cores = core_data.shape[0], len(self.in_modes), 0, []
        for shape in self.core_shapes:
            size = math.prod(shape)
            cores.append(core_data[:, start : start + size].view(copies, *shape))
            start += size
        a = cores[0].reshape(copies, cores[0].shape[2], -1)  # (S, k_1, r_1)
        for core in cores[1:m]:
            _, r_prev, k, r = core.shape
            a = torch.bmm(a, core.reshape(copies, r_prev, k * r)).reshape(copies, -1, r)
        last = cores[-1]
        b = last.reshape(copies, last.shape[1], -1)  # (S, r_{d-1}, k_d)
        for core in reversed(cores[m:-1]):
            _, r_prev, k, r = core.shape
            b = torch.bmm(core.reshape(copies, r_prev * k, r), b).reshape(copies, r_prev, -1)
        return a, b

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x A, B): the thin input-side product (..., r_m) and the output-side factor B, so that
        ``self(x) = (x A) B + bias``; with copies, B is (S, r_m, N_out) and each copy's rows went through its A."""
        a, b = self.factors()
        if a.dim() == 3:
            return per_copy_linear(x.to(a.dtype), a), b
        return _input_side(x.to(a.dtype), a), b

    def forward(self, x: Tensor) -> Tensor:
        hidden, b = self.split(x)  # (..., N_in) -> (..., r_m)
        if b.dim() == 2:
            return _output_side(hidden, b, self.bias)  # (..., r_m) -> (..., N_out), bias fused
        return per_copy_linear(hidden, b, self.bias)  # bias (S, N_out) one per copy, or (N_out) shared

    def to_dense(self) -> Tensor:
        """W (N_in x N_out), for tests and for folding ΔW into a base weight."""
        a, b = self.factors()
        return a @ b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"modes={self.in_modes}|{self.out_modes}, bias={self.bias is not None}")
