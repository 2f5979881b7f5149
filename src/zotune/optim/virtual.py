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
the module types it perturbs, and how, are the table ``HOOKS`` of
:mod:`zotune.optim.virtual_hooks` (one entry per type, the first that matches a module wins, as
PEFT dispatches its layers); trainable parameters owned by other kinds of module are rejected
with a clear message (freeze them, or use the in-place path).

``copies_per_forward=k`` splits the S copies over ceil(S / k) forwards of at most k copies
each, for the same losses: a forward's activations grow with its copies, and once it has
enough rows to keep the device busy (a CPU at batch 16 x 64 tokens) one forward over S·B
rows is no faster than S forwards over B.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

from torch import Tensor, nn

from .execution import Closure, CopiesOfTheBatch, owners, replace_forward, restore_forward
from .perturbations import FactoredPerturbation
from .virtual_hooks import HOOKS, LINEAR, HookKind, SharedInput, hook_kind, linear_product


def per_copy_losses(closures: Sequence[Closure], copies: int) -> list[float]:
    """The mean over ``closures`` of each copy's loss (the virtual and batched paths' measurement)."""
    total = None
    for closure in closures:
        try:
            out = closure(copies=copies)
        except TypeError:
            if not _takes_copies(closure):  # (a TypeError from inside a closure that does take it is its own)
                raise TypeError(_contract(copies, "this closure takes no 'copies' argument")) from None
            raise
        if not isinstance(out, Tensor) or out.shape != (copies,):
            raise TypeError(_contract(copies, f"got shape {tuple(out.shape)}" if isinstance(out, Tensor)
                                      else f"got {type(out).__name__}"))
        out = out.detach().double()
        total = out if total is None else total + out
    return (total / len(closures)).tolist()


def _contract(copies: int, found: str) -> str:
    return (f"the virtual and batched paths call the closure as closure(copies={copies}), and it must return a "
            f"tensor of shape ({copies},): the loss of each copy of the batch repeated {copies} times; {found}")


def _takes_copies(closure: Callable) -> bool:
    try:
        inspect.signature(closure).bind(copies=1)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): the call's own error stands
        return True
    return True


class Virtual(CopiesOfTheBatch):
    """Execution path that measures every point of a step in one batched forward (or k copies at a time).

    Args:
        model: the module owning the optimizer's parameters; hooks go on its submodules.
        copies_per_forward: at most this many of the S copies per forward (the closure is then
            called once per group of copies: with S = 4 and 2, as ``closure(copies=2)`` twice);
            bounds the activation memory. Default: all S in one forward.
    """

    def bind(self, params, perturbation, estimator) -> None:
        if not isinstance(perturbation, FactoredPerturbation):
            raise ValueError(
                f"the virtual path needs a factored perturbation (LOZO, TeZO); {type(perturbation).__name__} "
                "directions are full-rank: use the in-place or drift-safe path"
            )
        super().bind(params, perturbation, estimator)
        self._owned: list[tuple[nn.Module, HookKind, list[tuple[str, int]]]] = []
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
                "the in-place path, or for a small trainable set such as adapters the batched one (optim.batched)"
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
                with self.shared_ids_expanded():
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
                products[id(module)] = linear_product(owned_factors[id(module)])
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


def _install(module: nn.Module, hook: Callable) -> object:
    """Run ``hook(module, args, output)`` after each call of ``module`` until :func:`_uninstall`."""
    def make(inner):
        return lambda *args, **kwargs: hook(module, args, inner(*args, **kwargs))

    return replace_forward(module, make)


_uninstall = restore_forward
