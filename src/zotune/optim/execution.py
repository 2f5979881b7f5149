"""Execution paths: how the loss is measured at θ + offset·Z without storing Z.

``InPlace`` writes the perturbation into the weights and moves them from one measuring
point to the next, so that a two-sided query costs three passes over the weights
(+ε, −2ε, then restore folded into the update pass) instead of the reference's four.
It works for every parameter and dtype, but in float16/bfloat16 each add rounds, so the
restored weights drift by a few ulps per step.

``AtUse`` never writes the weights while measuring: a forward pre-hook on each module that
owns a trainable parameter swaps in a temporary ``param + offset·Z`` for the duration of
that module's forward. The weights are written only by the update, so a step with lr=0
leaves them bit-identical in any dtype (the drift-safe mode). It costs one transient
tensor the size of the module's weight while the module runs, and needs the model.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .perturbations import DrawKey, Perturbation, Term

# A measuring point θ + offset · Z(key); offset 0 is θ itself.
Point = tuple[float, DrawKey]
IndexedParams = Sequence[tuple[int, Tensor]]
Closure = Callable[..., "Tensor | float"]


def _scalar(value: object) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"the closure must return the batch loss as a scalar; got a tensor of shape {tuple(value.shape)}"
            )
        return float(value.detach().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"the closure must return the batch loss as a scalar (a Python number or a one-element tensor); "
        f"got {type(value).__name__}"
    )


def mean_loss(closures: Sequence[Closure]) -> float:
    """Average of the micro-batch losses (gradient accumulation averages projected gradients)."""
    return sum(_scalar(c()) for c in closures) / len(closures)


class ExecutionPath(Protocol):
    def measure_points(
        self, params: IndexedParams, perturbation: Perturbation, points: Sequence[Point], closures: Sequence[Closure]
    ) -> list[float]:
        """The loss at every point, in order."""

    def take_restore_terms(self) -> list[Term]:
        """Terms that return the weights to θ; the optimizer folds them into its update pass."""


class _OnePointAtATime:
    def measure_points(self, params, perturbation, points, closures):
        return [self.measure(params, perturbation, point, lambda: mean_loss(closures)) for point in points]


class InPlace(_OnePointAtATime):
    """Perturb the weights in place (MeZO's seed trick, with the restore fused into the update)."""

    def __init__(self) -> None:
        self._applied: list[Term] = []  # what is currently added to θ

    def measure(self, params, perturbation, point, evaluate):
        offset, key = point
        # One pass moves from the current point to the next: undo the other keys' offsets and
        # bring this key's offset to its new value (e.g. +ε → −ε is one pass of −2ε).
        terms = [(-alpha, k) for alpha, k in self._applied if k != key]
        already = sum(alpha for alpha, k in self._applied if k == key)
        terms.append((offset - already, key))
        for index, param in params:
            perturbation.add_(param, index, terms)
        self._applied = [(offset, key)]
        return evaluate()

    def take_restore_terms(self) -> list[Term]:
        terms = [(-alpha, key) for alpha, key in self._applied]
        self._applied = []
        return terms


class AtUse(_OnePointAtATime):
    """Perturb each weight only while its module runs (drift-safe in any precision)."""

    def __init__(self, model: nn.Module, params: IndexedParams) -> None:
        index_of = {id(p): i for i, p in params}
        # module -> [(attribute name, param index, the Parameter)]
        self._owned: list[tuple[nn.Module, list[tuple[str, int, Tensor]]]] = []
        found: set[int] = set()
        for module in model.modules():
            mine = [
                (name, index_of[id(p)], p)
                for name, p in module._parameters.items()
                if p is not None and id(p) in index_of
            ]
            if mine:
                self._owned.append((module, mine))
                found.update(id(p) for _, _, p in mine)
        missing = [i for i, p in params if id(p) not in found]
        if missing:
            raise ValueError(
                f"drift-safe (at-use) perturbation needs every trainable parameter to belong to a module "
                f"of the given model; parameters at indices {missing[:5]} do not"
            )

    def measure(self, params, perturbation, point, evaluate):
        offset, key = point
        if offset == 0.0:
            return evaluate()
        handles = []

        def swap_in(module: nn.Module, owned, _args) -> None:
            for name, index, param in owned:
                perturbed = param.detach().clone(memory_format=torch.contiguous_format)
                perturbation.add_(perturbed, index, [(offset, key)])
                module._parameters[name] = perturbed  # plain tensor: no autograd, no registration

        def swap_out(module: nn.Module, owned) -> None:
            for name, _, param in owned:
                module._parameters[name] = param

        try:
            for module, owned in self._owned:
                handles.append(module.register_forward_pre_hook(lambda m, a, o=owned: swap_in(m, o, a)))
                handles.append(
                    module.register_forward_hook(lambda m, a, out, o=owned: swap_out(m, o), always_call=True)
                )
            return evaluate()
        finally:
            for handle in handles:
                handle.remove()
            for module, owned in self._owned:
                swap_out(module, owned)

    def take_restore_terms(self) -> list[Term]:
        return []
