"""The LoRETTA layers: wrappers around a frozen linear layer (PEFT's config / layer / model trio: the layer).

Every trainable tensor a layer adds lives under a name that starts with ``loretta_``, which is how
:mod:`zotune.adapters.model` finds, saves and loads them. Adapters compute in float32 and cast back
to the base layer's dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.copies import per_copy_linear
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

    def add_to(self, h: Tensor, initial: TTAdapter | None = None) -> Tensor:
        """h + forward(h) − initial(h), everything as wide as h in one GEMM onto h.

        ``initial``: the frozen copy a function-preserving adapter subtracts (or None). With
        u = act(down h) A_up (..., r) and B_up (r x H), the sum is
        h + s·[u − u₀, u₀, 1] [B; B − B₀; b − b₀]: a product with K = 2r + 1 instead of two
        up-projections, their bias adds and scales, a difference and a sum, each a pass over (..., H).
        At initialisation u = u₀, B = B₀ and b = b₀ bit for bit, so every term is an exact zero and h
        comes back bit-identical. With copies (the batched path's stacked parameters) B is (S, r, H) and
        the product a batched one. Where something intercepts the up-projection's call (the drift-safe
        path's hooks swap perturbed parameters in there), the sum goes through that call instead.
        """
        up = self.up
        if "forward" in up.__dict__ or up._forward_pre_hooks or up._forward_hooks:
            delta = self(h) if initial is None else self(h) - initial(h)
            return h + delta.to(h.dtype)
        u, b = up.split(self.act(self.down(h.float())))  # (..., r), (r, H) or (S, r, H)
        columns, rows, bias = [u], [b], up.bias
        if initial is not None:
            u0, b0 = initial.up.split(initial.act(initial.down(h.float())))
            columns, rows = [u - u0, u0], [b, b - b0]
            bias = None if bias is None else bias - initial.up.bias
        if bias is not None:  # a ones column against the bias as a row: (H) -> (1, H), (S, H) -> (S, 1, H)
            rows.append(bias.unsqueeze(-2))
        product = torch.cat(columns, dim=-1)
        if bias is not None:
            product = F.pad(product, (0, 1), value=1.0)
        return _add_product(h, product, _concat_rows(rows), self.scale)


def _concat_rows(rows: list[Tensor]) -> Tensor:
    """The matrices (K_i, H), some (S, K_i, H) per copy, stacked along K: (K, H), or (S, K, H) if any is per copy."""
    copies = next((r.shape[0] for r in rows if r.dim() == 3), None)
    if copies is None:
        return torch.cat(rows)
    return torch.cat([r if r.dim() == 3 else r.expand(copies, -1, -1) for r in rows], dim=1)


def _add_product(h: Tensor, x: Tensor, w: Tensor, alpha: float) -> Tensor:
    """h + alpha·(x w), written once for float32 h (x: (..., K); w: (K, H), or (S, K, H) for copy-major rows);
    otherwise computed in float32 and added in h's dtype."""
    width = w.shape[-1]
    if h.dtype != torch.float32:
        product = per_copy_linear(x, w) if w.dim() == 3 else x @ w
        return h + (alpha * product).to(h.dtype)
    if w.dim() == 3:
        copies = w.shape[0]
        out = torch.baddbmm(h.reshape(copies, -1, width), x.reshape(copies, -1, x.shape[-1]), w, alpha=alpha)
    else:
        out = torch.addmm(h.reshape(-1, width), x.reshape(-1, x.shape[-1]), w, alpha=alpha)
    return out.view(h.shape)


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
        # Function-preserving: the initial adapter's output is subtracted in the same product (see
        # TTAdapter.add_to), so that at initialisation h comes back bit-identical.
        return self.loretta_adapter.add_to(h, self.initial_adapter)

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
