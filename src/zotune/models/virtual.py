"""The virtual batched perturbation path: all ±ε points of a step in one forward pass.

For a factored perturbation (LOZO's U Vᵀ, TeZO's U diag(τ) Vᵀ) the perturbed layers never
need the perturbed weights. The batch is repeated S times (S = 2q, plus one copy for the
one-sided base point) and forward hooks add each copy's own perturbation to the outputs:

* ``nn.Linear`` (W: m×n, offset·Z = L_s Rᵀ):   y_s = x_s Wᵀ + (x_s R) L_sᵀ
  (x R is computed once for all copies; TeZO's copies share L up to a diagonal)
* ``nn.Embedding`` (W: vocab×d):                y_s = W[ids_s] + L_s[ids_s] Rᵀ
* ``transformers`` ``Conv1D`` (W: n×m, y = x W): y_s = x_s W + (x_s L_s) Rᵀ
* 1-D parameters (dense Gaussian z_s): ``bias`` of a Linear / Conv1D adds z_s to y_s;
  ``nn.LayerNorm``'s weight and bias add x̂_s ∘ z_s and z_s.

The weights are read once per step for all 2q evaluations and written only by the update,
so half precision does not drift. It works on stock ``transformers`` models through hooks;
trainable parameters owned by other kinds of module are rejected with a clear message
(freeze them, or use the in-place path).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.execution import Closure, IndexedParams, Point


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _supported(module: nn.Module, name: str, param: Tensor) -> bool:
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return (name == "weight" and param.dim() == 2) or name == "bias"
    if isinstance(module, nn.Embedding):
        return name == "weight" and type(module).forward is nn.Embedding.forward
    if isinstance(module, nn.LayerNorm):
        return name in ("weight", "bias")
    return False


def per_copy_losses(closures: Sequence[Closure], copies: int) -> list[float]:
    total = None
    for closure in closures:
        out = closure(copies=copies)
        if not isinstance(out, Tensor) or out.shape != (copies,):
            raise TypeError(
                f"with virtual=True the closure is called as closure(copies={copies}) and must return a tensor of "
                f"shape ({copies},): the loss of each copy of the batch repeated {copies} times"
            )
        out = out.detach().double()
        total = out if total is None else total + out
    return (total / len(closures)).tolist()


class Virtual:
    """Execution path that measures every point of a step in one batched forward."""

    def __init__(self, model: nn.Module, params: IndexedParams, perturbation) -> None:
        if not hasattr(perturbation, "slice_factors"):
            raise ValueError(
                f"the virtual path needs a factored perturbation (LOZO, TeZO); {type(perturbation).__name__} "
                "directions are full-rank: use the in-place or drift-safe path"
            )
        index_of = {id(p): i for i, p in params}
        self._owned: list[tuple[nn.Module, list[tuple[str, int]]]] = []
        found, unsupported = set(), {}
        for module_name, module in model.named_modules():
            mine = []
            for name, p in module._parameters.items():
                if p is None or id(p) not in index_of:
                    continue
                if not _supported(module, name, p):
                    unsupported.setdefault(id(p), f"{module_name}.{name} ({type(module).__name__})")
                    continue
                mine.append((name, index_of[id(p)]))
                found.add(id(p))
            if mine:
                self._owned.append((module, mine))
        # A tied parameter is fine when one of its owners is supported (BERT's decoder bias is
        # registered on both the prediction head and its decoder Linear, which is what uses it).
        unsupported = [where for pid, where in unsupported.items() if pid not in found]
        if unsupported:
            raise ValueError(
                "the virtual path cannot perturb these trainable parameters without writing them: "
                f"{', '.join(unsupported[:6])}{' ...' if len(unsupported) > 6 else ''}. It supports Linear, "
                "Embedding and Conv1D weights, Linear/Conv1D biases and LayerNorm; freeze the others "
                "(e.g. optim.trainable) or use the in-place path"
            )
        missing = [i for i, p in params if id(p) not in found]
        if missing:
            raise ValueError(f"parameters at indices {missing[:5]} do not belong to a module of the model")
        self.perturbation = perturbation

    def take_restore_terms(self) -> list:
        return []

    def _factors(self, params: IndexedParams, points: Sequence[Point]) -> dict[int, tuple[Tensor, ...]]:
        """Per parameter: (L (S, m, r), R (n, r)) for matrices, (Z (S, d),) for 1-D parameters."""
        out = {}
        for index, p in params:
            if p.dim() >= 2:
                out[index] = self.perturbation.slice_factors(p, index, points)
            else:  # one dense draw per query, scaled for each of its points
                unit = {key: self.perturbation.dense.coordinates(p, index, [(1.0, key)]) for _, key in points}
                out[index] = (torch.stack([unit[key] * offset for offset, key in points]).to(p.dtype),)
        return out

    def measure_points(self, params, perturbation, points, closures) -> list[float]:
        copies = len(points)
        factors = self._factors(params, points)
        handles = []
        try:
            for module, owned in self._owned:
                hook = _make_hook(module, [(name, factors[index]) for name, index in owned], copies)
                handles.append(module.register_forward_hook(hook))
            return per_copy_losses(closures, copies)
        finally:
            for handle in handles:
                handle.remove()


def _make_hook(module: nn.Module, owned: list[tuple[str, tuple[Tensor, ...]]], copies: int) -> Callable:
    """Forward hook adding every copy's perturbation of ``module``'s parameters to its output."""
    by_name = dict(owned)

    def hook(mod, args, output):
        x = args[0]
        if output.shape[0] % copies:
            raise ValueError(
                f"{type(mod).__name__} received inputs without the repeated batch dimension (shape "
                f"{tuple(x.shape)} for {copies} copies), e.g. position ids shared across the batch; pass them "
                "per row (position_ids of shape (batch, length)) or freeze this module's parameters"
            )
        out = output.reshape(copies, -1, output.shape[-1])  # (S, N, out_features), N = B·T
        deltas = []
        if "weight" in by_name and isinstance(mod, nn.Embedding):
            left, right = by_name["weight"]  # (S, vocab, r), (d, r)
            ids = x.reshape(copies, -1)  # (S, N)
            rows = torch.gather(left, 1, ids.unsqueeze(-1).expand(-1, -1, left.shape[-1]))  # (S, N, r)
            deltas.append(rows @ right.T)
        elif "weight" in by_name and isinstance(mod, nn.Linear):
            left, right = by_name["weight"]  # (S, m, r), (n, r)
            xr = x.reshape(copies, -1, x.shape[-1]) @ right  # (S, N, r)
            deltas.append(torch.bmm(xr, left.transpose(1, 2)))
        elif "weight" in by_name and _is_conv1d(mod):
            left, right = by_name["weight"]  # W is (n_in, n_out): L (S, n_in, r), R (n_out, r)
            xl = torch.bmm(x.reshape(copies, -1, x.shape[-1]), left)  # (S, N, r)
            deltas.append(xl @ right.T)
        if isinstance(mod, nn.LayerNorm):
            normalized = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps).reshape(out.shape)
            if "weight" in by_name:
                deltas.append(normalized * by_name["weight"][0].unsqueeze(1))
            if "bias" in by_name:
                deltas.append(by_name["bias"][0].unsqueeze(1))
        elif "bias" in by_name:
            deltas.append(by_name["bias"][0].unsqueeze(1))  # (S, 1, m)
        for delta in deltas:
            out = out + delta
        return out.view(output.shape)

    return hook
