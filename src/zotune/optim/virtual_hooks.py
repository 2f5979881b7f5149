"""The virtual path's hooks, by module type: what each adds to its module's output.

``HOOKS`` is the table (the first entry that matches a module wins, as PEFT dispatches its
layers): which parameters of a module type the virtual path can perturb and the builder of the
hook that does it. A builder returns ``hook(module, args, output)``, which adds every copy's
perturbation of the module's parameters to its output in place. ``SharedInput`` and
``linear_product`` prepare the products of Linears (sibling Linears reading one input share one
GEMM; a bias drawn next to its weight's Uᵀ rides in the same product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _by_copy(output: Tensor, copies: int, x: Tensor) -> Tensor:
    """``output`` as a (S, N, features) view: the hooks add to it in place."""
    if output.shape[0] % copies:
        raise ValueError(
            f"a perturbed module received inputs without the repeated batch dimension (shape {tuple(x.shape)} "
            f"for {copies} copies), e.g. a tensor the model shares across its batch; give it one row per example "
            "or freeze this module's parameters"
        )
    return output.view(copies, -1, output.shape[-1])


def _with_bias_row(left_t: Tensor, bias_z: Tensor) -> Tensor | None:
    """[L_sᵀ; z_sᵀ] (S, r+1, m) as a view, when the draw laid z (S, m) right after Lᵀ (S, r, m).

    LOZO draws a Linear's Uᵀ and its bias's z next to each other (parameters in index
    order), so the bias perturbation needs no kernel of its own; otherwise None. (Adjacent
    addresses inside one storage: ``as_strided`` refuses to reach past the storage's end.)
    """
    copies, rank, m = left_t.shape
    row = left_t.stride(0)
    if (
        bias_z.shape != (copies, m)
        or left_t.stride() != (row, m, 1)
        or bias_z.stride() != (row, 1)
        or bias_z.data_ptr() != left_t.data_ptr() + rank * m * left_t.element_size()
        or bias_z.dtype != left_t.dtype
    ):
        return None
    try:
        return left_t.as_strided((copies, rank + 1, m), (row, m, 1))
    except RuntimeError:  # a different storage that merely ends where z begins
        return None


def _fused_bias(left_t: Tensor, right: Tensor, bias_z: Tensor | None):
    """(``[L_sᵀ; z_sᵀ]``, ``[R | 0]`` (n, r+1), e_{r+1}) when the bias can ride in the product, else Nones.

    addmm(e, x, [R | 0]) = [x R, 1].
    """
    fused = None if bias_z is None else _with_bias_row(left_t, bias_z)
    if fused is None:
        return None, None, None
    ones = torch.zeros(right.shape[1] + 1, device=right.device, dtype=right.dtype)
    ones[-1] = 1
    return fused, F.pad(right, (0, 1)), ones


class SharedInput:
    """One GEMM x [R_1 | R_2 | ...] for sibling Linears reading the same tensor x (q, k, v).

    Member i's columns are ``x R_i`` (with a ones column when its bias rides in its product).
    The first member called with a new x computes all members' columns; the others reuse them
    while x is the same object. A member called with another tensor (an output projection)
    recomputes: a few extra columns, never a wrong result.
    """

    def __init__(self, rights: tuple[tuple[Tensor, Tensor | None], ...]) -> None:
        # rights, per member: (Rᵀ (w_i, n), bias of the product (w_i,) or None)
        self.weight = torch.cat([right_t for right_t, _ in rights])  # (Σ w_i, n)
        self.bias = None
        if any(ones is not None for _, ones in rights):
            self.bias = torch.cat([ones if ones is not None else right_t.new_zeros(right_t.shape[0])
                                   for right_t, ones in rights])
        ends = torch.tensor([right_t.shape[0] for right_t, _ in rights]).cumsum(0).tolist()
        self._spans = list(zip([0] + ends[:-1], ends))
        self._x: Tensor | None = None
        self._xr: Tensor | None = None

    def reader(self, i: int) -> Callable[[Tensor], Tensor]:
        start, end = self._spans[i]

        def read(x: Tensor) -> Tensor:
            if x is not self._x:
                self._x, self._xr = x, F.linear(x, self.weight, self.bias)
            return self._xr[..., start:end]

        return read

    def forget(self) -> None:
        self._x = self._xr = None


def linear_product(owned: dict[str, tuple[Tensor, ...]]):
    """(Lᵀ (S, r[+1], m), (Rᵀ (r[+1], n), e or None), the bias's z (S, 1, m) if it is added apart)."""
    left_t, right = owned["weight"]  # (S, r, m), (n, r)
    bias = owned.get("bias")
    fused, right_padded, ones = _fused_bias(left_t, right, None if bias is None else bias[0])
    if fused is not None:  # [x R, 1] [L_s, z_s]ᵀ = (x R) L_sᵀ + z_s: the bias rides in the product
        return fused, (right_padded.T, ones), None
    return left_t, (right.T, None), None if bias is None else bias[0].unsqueeze(1)


def _gemm_ready(right_t: Tensor) -> Tensor:
    """Rᵀ (r, n) contiguous on a CPU, where ``F.linear(x, Rᵀ)`` runs on MKL's sgemm.

    With R stored row-major (n, r), that GEMM reads it as (n, r) and is about 5x slower at
    r <= 8 than with Rᵀ row-major (x of 1024 x 1536, r = 2: 1.03 against 0.20 ms); the copy
    is r·n elements once per set of factors. On a GPU it would be one more launch per Linear.
    Only for a Linear's own product: :class:`SharedInput` concatenates its members' Rᵀ anyway.
    """
    return right_t.contiguous() if right_t.device.type == "cpu" else right_t


# ---------------------------------------------------------------- hooks by module type
# Each builder returns hook(module, args, output), which adds every copy's perturbation of the
# module's parameters to its output. Hooks run under ``no_grad`` (inside the optimizer's step)
# and add in place to the module's fresh, contiguous output: two or three kernels per module
# whatever the number of copies. Everything that does not depend on the input is prepared by
# the builder, once per set of factors. A matrix's factors come as (Lᵀ (S, r, m), R (n, r)):
# offset_s Z_s = L_s Rᵀ; a 1-D parameter's as (z (S, d),).


def _layer_norm_hook(module, owned, copies, product) -> Callable:
    weight, bias = owned.get("weight"), owned.get("bias")
    weight_z = None if weight is None else weight[0].unsqueeze(1)  # (S, 1, d)
    bias_z = None if bias is None else bias[0].unsqueeze(1)  # (S, 1, d)

    def hook(mod, args, output):
        out = _by_copy(output, copies, args[0])
        if weight_z is not None:
            normalized = F.layer_norm(args[0], mod.normalized_shape, None, None, mod.eps).view(out.shape)
            out.addcmul_(normalized, weight_z)  # x̂_s ∘ z_s
        if bias_z is not None:
            out.add_(bias_z)
        return output

    return hook


def _embedding_hook(module, owned, copies, product) -> Callable:
    weight = owned["weight"]
    left, right = weight[0].transpose(1, 2), weight[1]  # (S, vocab, r), (d, r)
    right_t = right.T.expand(copies, -1, -1)  # (S, r, d)
    # Scaled embeddings (Gemma's W[ids]·c): the perturbation is scaled with the rows, c (L_s[ids] Rᵀ).
    scale = getattr(module, "embed_scale", None)
    alpha = 1.0 if scale is None else float(scale)  # read once per set of factors, not per call (a GPU sync)

    def hook(mod, args, output):
        out = _by_copy(output, copies, args[0])
        ids = args[0].reshape(copies, -1, 1).expand(-1, -1, left.shape[-1])  # (S, N, r)
        out.baddbmm_(torch.gather(left, 1, ids), right_t, alpha=alpha)  # += c L_s[ids_s] Rᵀ
        return output

    return hook


def _conv1d_hook(module, owned, copies, product) -> Callable:
    """GPT-2's Conv1D: W n_in×n_out, y = x W; L (S, n_in, r), R (n_out, r)."""
    weight, bias = owned.get("weight"), owned.get("bias")
    bias_z = None if bias is None else bias[0].unsqueeze(1)  # (S, 1, n_out)
    if weight is not None:
        left, right = weight[0].transpose(1, 2), weight[1]
        right_t = right.T.expand(copies, -1, -1)  # (S, r, n_out)

    def hook(mod, args, output):
        out = _by_copy(output, copies, args[0])
        if weight is not None:  # += (x_s L_s) Rᵀ
            out.baddbmm_(torch.bmm(args[0].reshape(copies, -1, args[0].shape[-1]), left), right_t)
        if bias_z is not None:
            out.add_(bias_z)
        return output

    return hook


def _linear_hook(module, owned, copies, product) -> Callable:
    """nn.Linear, W: m×n, y = x Wᵀ; ``product`` = (Lᵀ, x -> [x R, (1)] or (Rᵀ, e), separate bias z)."""
    weight, bias = owned.get("weight"), owned.get("bias")
    bias_z = None if bias is None else bias[0].unsqueeze(1)  # (S, 1, m)
    if weight is not None:
        left_t, read, bias_z = product
        if not callable(read):  # (Rᵀ, e): F.linear(x, Rᵀ, e) = [x R, (1)]
            right_t, ones = _gemm_ready(read[0]), read[1]  # (siblings read a concatenated, contiguous Rᵀ)
            read = lambda x: F.linear(x, right_t, ones)  # noqa: E731

    def hook(mod, args, output):
        out = _by_copy(output, copies, args[0])
        if weight is not None:  # += (x_s R) L_sᵀ, x R shared by all copies
            xr = read(args[0])  # (..., r[+1])
            out.baddbmm_(xr.view(copies, -1, xr.shape[-1]), left_t)
        if bias_z is not None:
            out.add_(bias_z)
        return output

    return hook


@dataclass(frozen=True)
class HookKind:
    """A module type the virtual path can perturb: which of its parameters, and the hook that does it."""

    supports: str  # what it covers, for error messages
    matches: Callable[[nn.Module], bool]
    perturbs: Callable[[nn.Module, str, Tensor], bool]  # (module, attribute, parameter)
    build: Callable[..., Callable]  # (module, owned factors, copies, Linear product) -> hook


def _is_scaled_embedding(module: nn.Module) -> bool:  # transformers' ...ScaledWordEmbedding: W[ids] * embed_scale
    return type(module).__name__.endswith("ScaledWordEmbedding") and getattr(module, "embed_scale", None) is not None


def _is_conv1d(module: nn.Module) -> bool:  # transformers' Conv1D, recognised without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _matrix_weight_or_bias(module, name, p) -> bool:
    return (name == "weight" and p.dim() == 2) or name == "bias"


LINEAR = HookKind("Linear weights and biases", lambda m: isinstance(m, nn.Linear), _matrix_weight_or_bias,
                   _linear_hook)
HOOKS: tuple[HookKind, ...] = (
    LINEAR,
    HookKind("GPT-2 Conv1D weights and biases", _is_conv1d, _matrix_weight_or_bias, _conv1d_hook),
    # A subclass that overrides forward computes something else, except the scaled embedding
    # W[ids]·c (Gemma), whose scale the hook applies.
    HookKind("Embedding weights", lambda m: isinstance(m, nn.Embedding) and (
        type(m).forward is nn.Embedding.forward or _is_scaled_embedding(m)), lambda m, name, p: name == "weight",
        _embedding_hook),
    HookKind("LayerNorm", lambda m: isinstance(m, nn.LayerNorm), lambda m, name, p: name in ("weight", "bias"),
              _layer_norm_hook),
)


def hook_kind(module: nn.Module) -> HookKind | None:
    """The entry of :data:`HOOKS` that handles ``module`` (the first that matches), or None."""
    return next((kind for kind in HOOKS if kind.matches(module)), None)
