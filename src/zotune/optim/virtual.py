"""The virtual batched perturbation path: all ±ε points of a step in one forward pass.

For a factored perturbation (LOZO's U Vᵀ, TeZO's U diag(τ) Vᵀ) the perturbed layers never
need the perturbed weights. The batch is repeated S times (S = 2q two-sided, q + 1 with the
one-sided base point) and hooks (installed as instance ``forward`` wrappers for the step) add
each copy's own perturbation to the outputs:

* ``nn.Linear`` (W: m×n, offset·Z = L_s Rᵀ):   y_s = x_s Wᵀ + (x_s R) L_sᵀ
  (x R is computed once for all copies; TeZO's copies share L up to a diagonal)
* ``nn.Embedding`` (W: vocab×d):                y_s = W[ids_s] + L_s[ids_s] Rᵀ
* ``transformers`` ``Conv1D`` (W: n×m, y = x W): y_s = x_s W + (x_s L_s) Rᵀ
* 1-D parameters (dense Gaussian z_s): ``bias`` of a Linear / Conv1D adds z_s to y_s;
  ``nn.LayerNorm``'s weight and bias add x̂_s ∘ z_s and z_s.

The weights are read once per step for all 2q evaluations and written only by the update,
so half precision does not drift. It works on stock ``transformers`` models through hooks;
the module types it perturbs, and how, are the table :data:`HOOKS` (one entry per type, the
first that matches a module wins, as PEFT dispatches its layers); trainable parameters owned
by other kinds of module are rejected with a clear message (freeze them, or use the in-place
path).

``copies_per_forward=k`` splits the S copies over ceil(S / k) forwards of at most k copies
each, for the same losses: a forward's activations grow with its copies, and once it has
enough rows to keep the device busy (a CPU at batch 16 x 64 tokens) one forward over S·B
rows is no faster than S forwards over B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .execution import Closure, ExecutionPath, owners
from .perturbations import FactoredPerturbation


def per_copy_losses(closures: Sequence[Closure], copies: int) -> list[float]:
    total = None
    for closure in closures:
        out = closure(copies=copies)
        if not isinstance(out, Tensor) or out.shape != (copies,):
            raise TypeError(
                f"with the virtual path the closure is called as closure(copies={copies}) and must return a tensor "
                f"of shape ({copies},): the loss of each copy of the batch repeated {copies} times"
                + (f"; got shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"; got {type(out).__name__}")
            )
        out = out.detach().double()
        total = out if total is None else total + out
    return (total / len(closures)).tolist()


class Virtual(ExecutionPath):
    """Execution path that measures every point of a step in one batched forward (or k copies at a time).

    Args:
        model: the module owning the optimizer's parameters; hooks go on its submodules.
        copies_per_forward: at most this many of the S copies per forward (the closure is then
            called once per group of copies: with S = 4 and 2, as ``closure(copies=2)`` twice);
            bounds the activation memory. Default: all S in one forward.
    """

    def __init__(self, model: nn.Module, copies_per_forward: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Virtual(model) needs the nn.Module owning the parameters, got {type(model).__name__}")
        if copies_per_forward is not None and (isinstance(copies_per_forward, bool)
                                               or int(copies_per_forward) != copies_per_forward
                                               or copies_per_forward < 1):
            raise ValueError(f"copies_per_forward must be a positive integer or None, got {copies_per_forward!r}")
        self.model = model
        self.copies_per_forward = None if copies_per_forward is None else int(copies_per_forward)

    def bind(self, params, perturbation, estimator) -> None:
        if not isinstance(perturbation, FactoredPerturbation):
            raise ValueError(
                f"the virtual path needs a factored perturbation (LOZO, TeZO); {type(perturbation).__name__} "
                "directions are full-rank: use the in-place or drift-safe path"
            )
        super().bind(params, perturbation, estimator)
        self._owned: list[tuple[nn.Module, _HookKind, list[tuple[str, int]]]] = []
        found, unsupported = set(), {}
        siblings: dict[tuple[str, int], list[nn.Module]] = {}
        for module_name, module, mine in owners(self.model, params):
            kind = hook_kind(module)
            supported = []
            for name, index, p in mine:
                if kind is None or not kind.perturbs(module, name, p):
                    unsupported.setdefault(id(p), f"{module_name}.{name} ({type(module).__name__})")
                    continue
                supported.append((name, index))
                found.add(id(p))
            if supported:
                self._owned.append((module, kind, supported))
                if kind is LINEAR and any(name == "weight" for name, _ in supported):
                    siblings.setdefault((module_name.rpartition(".")[0], module.in_features), []).append(module)
        # A tied bias is fine when one of its owners is supported (BERT's decoder bias is registered on
        # both the prediction head and its decoder Linear, which is what uses it); a tied weight used by
        # a module the path cannot perturb (an embedding with its own forward) would be measured wrong.
        unsupported = [where for pid, where in unsupported.items() if pid not in found or not where.split(" ")[0]
                       .endswith(".bias")]
        if unsupported:
            raise ValueError(
                "the virtual path cannot perturb these trainable parameters without writing them: "
                f"{', '.join(unsupported[:6])}{' ...' if len(unsupported) > 6 else ''}. It supports "
                f"{', '.join(kind.supports for kind in HOOKS)}; freeze the others (e.g. optim.trainable) or use "
                "the in-place path"
            )
        missing = [i for i, p in params if id(p) not in found]
        if missing:
            raise ValueError(f"parameters at indices {missing[:5]} do not belong to a module of the model")
        # Linears of one parent with one input width (q, k, v, o): those that read the same tensor
        # get their x R products from one GEMM.
        self._groups = [tuple(group) for group in siblings.values() if len(group) > 1]
        self._passes: tuple | None = None  # (factors, copies, [(copies of a forward, hooks, shared inputs)])

    def measure_points(self, points, closures) -> list[float]:
        copies = len(points)
        factors = self.perturbation.point_factors(self.params, points)
        if self._passes is None or self._passes[0] is not factors or self._passes[1] != copies:
            self._passes = (factors, copies, self._make_passes(factors, copies))
        losses = []
        for size, hooks, shared in self._passes[2]:
            installed = []
            try:
                for module, hook in hooks:
                    installed.append((module, _install(module, hook)))
                losses += per_copy_losses(closures, size)
            finally:
                for module, previous in installed:
                    _uninstall(module, previous)
                for group in shared:
                    group.forget()  # drop the last input held for the identity check
        return losses

    def _make_passes(self, factors, copies):
        """[(k, hooks, shared inputs)] per forward: consecutive runs of at most ``copies_per_forward`` copies.

        Every factor's first tensor has the copies first (Lᵀ (S, r, m), z (S, d)); a pass's hooks
        see the slice [start, start + k) of it, a view.
        """
        per = self.copies_per_forward or copies
        passes = []
        for start in range(0, copies, per):
            size = min(per, copies - start)
            part = factors if size == copies else {
                index: (tensors[0][start : start + size], *tensors[1:]) for index, tensors in factors.items()}
            passes.append((size, *self._make_hooks(part, size)))
        return passes

    def _make_hooks(self, factors, copies):
        """Every owned module's hook for these factors (kept while the factors are the same)."""
        owned_factors = {id(module): {name: factors[index] for name, index in owned}
                         for module, _, owned in self._owned}
        products = {}  # id(Linear) -> its (left_t, x -> [x R, (1)], separate bias or None)
        for module, kind, _ in self._owned:
            if kind is LINEAR and "weight" in owned_factors[id(module)]:
                products[id(module)] = _linear_product(owned_factors[id(module)])
        shared = []
        for group in self._groups:
            rights = tuple(products[id(m)][1] for m in group)
            group_input = SharedInput(rights)
            shared.append(group_input)
            for i, module in enumerate(group):
                left_t, _, bias_z = products[id(module)]
                products[id(module)] = (left_t, group_input.reader(i), bias_z)
        hooks = [(module, kind.build(module, owned_factors[id(module)], copies, products.get(id(module))))
                 for module, kind, _ in self._owned]
        return hooks, shared


_NONE = object()


def _install(module: nn.Module, hook: Callable) -> object:
    """Run ``hook(module, args, output)`` after each call of ``module`` until :func:`_uninstall`.

    An instance attribute ``forward`` wrapping the current one, rather than a forward hook:
    ``Module.__call__`` then keeps its hook-free fast path, which saves a few microseconds of
    host time per module and call (what bounds a small-batch step on a GPU). Whatever
    ``forward`` the instance had (accelerate's device hooks) is wrapped and put back.
    Returns that previous instance attribute, or a sentinel when there was none.
    """
    previous = module.__dict__.get("forward", _NONE)
    inner = module.forward

    def forward(*args, **kwargs):
        return hook(module, args, inner(*args, **kwargs))

    module.__dict__["forward"] = forward
    return previous


def _uninstall(module: nn.Module, previous: object) -> None:
    if previous is _NONE:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = previous


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


def _linear_product(owned: dict[str, tuple[Tensor, ...]]):
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
class _HookKind:
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


LINEAR = _HookKind("Linear weights and biases", lambda m: isinstance(m, nn.Linear), _matrix_weight_or_bias,
                   _linear_hook)
HOOKS: tuple[_HookKind, ...] = (
    LINEAR,
    _HookKind("GPT-2 Conv1D weights and biases", _is_conv1d, _matrix_weight_or_bias, _conv1d_hook),
    # A subclass that overrides forward computes something else, except the scaled embedding
    # W[ids]·c (Gemma), whose scale the hook applies.
    _HookKind("Embedding weights", lambda m: isinstance(m, nn.Embedding) and (
        type(m).forward is nn.Embedding.forward or _is_scaled_embedding(m)), lambda m, name, p: name == "weight",
        _embedding_hook),
    _HookKind("LayerNorm", lambda m: isinstance(m, nn.LayerNorm), lambda m, name, p: name in ("weight", "bias"),
              _layer_norm_hook),
)


def hook_kind(module: nn.Module) -> _HookKind | None:
    """The entry of :data:`HOOKS` that handles ``module`` (the first that matches), or None."""
    return next((kind for kind in HOOKS if kind.matches(module)), None)
