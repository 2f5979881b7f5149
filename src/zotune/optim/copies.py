"""Products over copy-major rows with one matrix per copy: the batched path's layers run every copy in one call."""

from __future__ import annotations

import torch
from torch import Tensor


def per_copy_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w[s] (+ bias) for copy s's rows of ``x``.

    ``x``: (..., K), its rows copy-major (S equal blocks); ``w``: (S, K, N); ``bias``: (S, N), one
    per copy, or (N), shared. Returns (..., N).
    """
    rows = x.reshape(w.shape[0], -1, x.shape[-1])  # (S, rows of a copy, K)
    out = torch.bmm(rows, w)  # (S, rows, N)
    if bias is not None:
        out = out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
    return out.reshape(*x.shape[:-1], w.shape[-1])
