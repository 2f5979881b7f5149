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
        if not hasattr(perturbation, "point_factors"):
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
        self._cache: dict[int, tuple] = {}  # id(module) -> what its hook derived from this step's factors

    def take_restore_terms(self) -> list:
        return []

    def measure_points(self, params, perturbation, points, closures) -> list[float]:
        copies = len(points)
        factors = self.perturbation.point_factors(params, points)
        handles = []
        try:
            for module, owned in self._owned:
                hook = _make_hook(module, {name: factors[index] for name, index in owned}, copies, self._cache)
                handles.append(module.register_forward_hook(hook))
            return per_copy_losses(closures, copies)
        finally:
            for handle in handles:
                handle.remove()


def _by_copy(output: Tensor, copies: int, x: Tensor) -> Tensor:
    """``output`` as a (S, N, features) view: the hooks add to it in place."""
    if output.shape[0] % copies:
        raise ValueError(
            f"a perturbed module received inputs without the repeated batch dimension (shape {tuple(x.shape)} "
            f"for {copies} copies), e.g. position ids shared across the batch; pass them per row "
            "(position_ids of shape (batch, length)) or freeze this module's parameters"
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


def _fused_bias(left_t: Tensor, right: Tensor, bias_z: Tensor | None, cache: dict, slot: int):
    """(``[L_sᵀ; z_sᵀ]``, ``[R | 0]`` (n, r+1), e_{r+1}) when the bias can ride in the product, else Nones.

    addmm(e, x, [R | 0]) = [x R, 1]. The factors are views of buffers the perturbation reuses,
    so the result is kept while they are the same tensors (R changes with LOZO's V window).
    """
    hit = cache.get(slot)
    if hit is not None and hit[0] is left_t and hit[1] is right and hit[2] is bias_z:
        return hit[3:]
    fused = None if bias_z is None else _with_bias_row(left_t, bias_z)
    padded = ones = None
    if fused is not None:
        padded = F.pad(right, (0, 1))
        ones = torch.zeros(right.shape[1] + 1, device=right.device, dtype=right.dtype)
        ones[-1] = 1
    cache[slot] = (left_t, right, bias_z, fused, padded, ones)
    return fused, padded, ones


def _make_hook(module: nn.Module, owned: dict[str, tuple[Tensor, ...]], copies: int, cache: dict) -> Callable:
    """Forward hook adding every copy's perturbation of ``module``'s parameters to its output.

    Runs under ``no_grad`` (inside the optimizer's step) and adds in place to the module's
    fresh, contiguous output: two or three kernels per module whatever the number of copies.
    Everything that does not depend on the input is prepared here, once per step.
    """
    weight, bias = owned.get("weight"), owned.get("bias")
    bias_z = None if bias is None else bias[0].unsqueeze(1)  # (S, 1, m)
    # A matrix's factors come as (Lᵀ (S, r, m), R (n, r)): offset_s Z_s = L_s Rᵀ.

    if isinstance(module, nn.LayerNorm):
        weight_z = None if weight is None else weight[0].unsqueeze(1)  # (S, 1, d)

        def hook(mod, args, output):
            out = _by_copy(output, copies, args[0])
            if weight_z is not None:
                normalized = F.layer_norm(args[0], mod.normalized_shape, None, None, mod.eps).view(out.shape)
                out.addcmul_(normalized, weight_z)  # x̂_s ∘ z_s
            if bias_z is not None:
                out.add_(bias_z)
            return output

    elif isinstance(module, nn.Embedding):
        left, right = weight[0].transpose(1, 2), weight[1]  # (S, vocab, r), (d, r)
        right_t = right.T.expand(copies, -1, -1)  # (S, r, d)

        def hook(mod, args, output):
            out = _by_copy(output, copies, args[0])
            ids = args[0].reshape(copies, -1, 1).expand(-1, -1, left.shape[-1])  # (S, N, r)
            out.baddbmm_(torch.gather(left, 1, ids), right_t)  # += L_s[ids_s] Rᵀ
            return output

    elif _is_conv1d(module):  # W: n_in×n_out, y = x W; L (S, n_in, r), R (n_out, r)
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

    else:  # nn.Linear, W: m×n, y = x Wᵀ; L (S, m, r), R (n, r)
        if weight is not None:
            left_t, right = weight  # (S, r, m), (n, r)
            fused, right_padded, ones = _fused_bias(left_t, right, None if bias is None else bias[0], cache, id(module))
            if fused is not None:  # [x R, 1] [L_s, z_s]ᵀ = (x R) L_sᵀ + z_s: the bias rides in the product
                left_t, right, bias_z = fused, right_padded, None
            right_t = right.T  # (r[+1], n): F.linear(x, Rᵀ, e) = [x R, 1]

        def hook(mod, args, output):
            out = _by_copy(output, copies, args[0])
            if weight is not None:  # += (x_s R) L_sᵀ, x R shared by all copies
                xr = F.linear(args[0], right_t, ones)  # (..., r[+1])
                out.baddbmm_(xr.view(copies, -1, xr.shape[-1]), left_t)
            if bias_z is not None:
                out.add_(bias_z)
            return output

    return hook
