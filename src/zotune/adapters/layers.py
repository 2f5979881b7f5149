"""The LoRETTA layers: wrappers around a frozen linear layer (PEFT's config / layer / model trio: the layer).

Every trainable tensor a layer adds lives under a name that starts with ``loretta_``, which is how
:mod:`zotune.adapters.model` finds, saves and loads them. Adapters compute in float32 and cast back
to the base layer's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .tt import TTLinear, factorize

PREFIX = "loretta_"

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_transposed) of a Linear or GPT-2-style Conv1D (weight in x out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None and layer.weight.dim() == 2:
        return layer.weight.shape[0], layer.weight.shape[1], True
    raise TypeError(f"LoRETTA adapts nn.Linear and Conv1D layers, not {type(layer).__name__}")


def _tt(n_in: int, n_out: int, rank: int, max_mode: int, bias: bool, generator: torch.Generator, device) -> TTLinear:
    return TTLinear(n_in, n_out, rank, in_modes=factorize(n_in, max_mode), out_modes=factorize(n_out, max_mode),
                    bias=bias, generator=generator, device=device)


class TTAdapter(nn.Module):
    """h -> s·TT_up(act(TT_down(h))): a tensorized bottleneck (width b), computed in float32."""

    def __init__(self, hidden: int, bottleneck: int, rank: int, nonlinearity: str, scale: float, max_mode: int,
                 generator: torch.Generator, device=None) -> None:
        super().__init__()
        self.down = _tt(hidden, bottleneck, rank, max_mode, True, generator, device)
        self.up = _tt(bottleneck, hidden, rank, max_mode, True, generator, device)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * self.up(self.act(self.down(h.float())))  # (..., H) -> (..., b) -> (..., H)

    def add_to(self, h: Tensor) -> Tensor:
        """h + forward(h), the sum fused into the up-projection's GEMM (for float32 h).

        The fused GEMM goes past the up-projection's call; where something intercepts that call (the
        drift-safe and batched paths swap perturbed parameters in there, by hook or by an instance
        ``forward``), the sum goes through it instead."""
        up = self.up
        if "forward" in up.__dict__ or up._forward_pre_hooks or up._forward_hooks:
            return h + self(h)
        return up.forward_add(h, self.act(self.down(h.float())), self.scale)


class LorettaAdpLayer(nn.Module):
    """A frozen layer with a tensorized adapter on its input ("pre") or its output ("post")."""

    def __init__(self, base_layer: nn.Module, size: int, position: str, bottleneck: int, rank: int,
                 nonlinearity: str, scale: float, max_mode: int, function_preserving: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        device = next(base_layer.parameters()).device
        self.base_layer = base_layer
        self.position = position
        self.loretta_adapter = TTAdapter(size, bottleneck, rank, nonlinearity, scale, max_mode, generator, device)
        # A frozen copy of the initial adapter whose output is subtracted: identity at init, no zero core.
        self.initial_adapter = None
        self.enabled = True  # False: the base layer alone (`adapters.disabled(model)`, e.g. for a zero-shot score)
        if function_preserving:
            self.initial_adapter = copy.deepcopy(self.loretta_adapter).requires_grad_(False)

    def _adapt(self, h: Tensor) -> Tensor:
        if self.initial_adapter is None and h.dtype == torch.float32:
            return self.loretta_adapter.add_to(h)
        # Function-preserving: the two adapters' outputs are subtracted first, so that at
        # initialisation the difference is exactly zero and h comes back bit-identical.
        delta = self.loretta_adapter(h)
        if self.initial_adapter is not None:
            delta = delta - self.initial_adapter(h)
        return h + delta.to(h.dtype)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        if self.position == "pre":
            return self.base_layer(self._adapt(x), *args, **kwargs)
        return self._adapt(self.base_layer(x, *args, **kwargs))


class LorettaRepLayer(nn.Module):
    """y = base(x) + s·TT_B(TT_A(dropout(x))): a tensor-train ΔW (in x out, rank <= r) beside a frozen weight."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, rank: int, dropout: float, max_mode: int,
                 compensate: bool, generator: torch.Generator) -> None:
        super().__init__()
        n_in, n_out, self._transposed = linear_shape(base_layer)
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.loretta_A = _tt(n_in, r, rank, max_mode, False, generator, device)
        self.loretta_B = _tt(r, n_out, rank, max_mode, False, generator, device)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if compensate:
            self._fold(-1.0)  # W0 <- W0 − ΔW_0: the function is unchanged, every core stays non-zero

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """ΔW = s·A B in float32, laid out as x @ ΔW (in x out)."""
        return self.scaling * (self.loretta_A.to_dense() @ self.loretta_B.to_dense())

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight()
        delta = delta if self._transposed else delta.T  # nn.Linear stores (out x in)
        weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))

    def merged(self) -> nn.Module:
        """The base layer with ΔW folded into its weight (the wrapper is no longer needed)."""
        self._fold(+1.0)
        return self.base_layer

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        delta = self.loretta_B(self.loretta_A(self.dropout(x).float()))  # (..., in) -> (..., r) -> (..., out)
        return y + (self.scaling * delta).to(y.dtype)
