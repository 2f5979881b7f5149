"""The batched path for small trainable sets: all points of a step in one forward, any perturbation.

When the trainable parameters are a few small modules (zotune's TT adapters, PEFT LoRA layers,
norms), a step's S measuring points (2q two-sided) need not cost S forwards of the whole
network. The batch is repeated S times (copy-major, as on the virtual path: the closure is
called as ``closure(copies=S)`` and returns S losses). Every module outside the trainable ones
runs once over all S·B rows; each module that owns trainable parameters runs once per copy, on
that copy's B rows, with that copy's parameters ``θ + offset_s·Z_s`` swapped in (materialised:
S copies of a small set). AdaZeta's q = 10 is then one forward of the frozen network over 20
copies of the batch, plus 20 small forwards of each adapter.

Unlike :class:`~zotune.optim.virtual.Virtual` it works for any perturbation (dense Gaussian
included) and any module type, because it perturbs parameters, not outputs; it suits small
trainable sets only (full fine-tuning would materialise S copies of the model). The weights are
written only by the update, as on the drift-safe path, and the perturbed values are computed the
same way (a copy plus offset·Z), so the two paths measure the same points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .execution import CopiesOfTheBatch, owners, replace_forward, restore_forward
from .virtual import per_copy_losses


class Batched(CopiesOfTheBatch):
    """Measure every point of a step in one forward over S copies of the batch (or k copies at a time).

    Args:
        model: the module owning the optimizer's parameters.
        copies_per_forward: at most this many copies per forward (bounds activation memory);
            default all S in one.
    """

    def bind(self, params, perturbation, estimator) -> None:
        super().bind(params, perturbation, estimator)
        owned = owners(self.model, params)
        found = {id(p) for _, _, mine in owned for _, _, p in mine}
        missing = [i for i, p in params if id(p) not in found]
        if missing:
            raise ValueError(f"parameters at indices {missing[:5]} do not belong to a module of the model")
        # Only the outermost owners run per copy; an owner inside one (a norm inside an adapter) has
        # its parameters swapped by the outer one's per-copy call.
        names = [name for name, _, _ in owned]
        outer = [(name, module) for name, module, _ in owned
                 if not any(name != other and name.startswith(other + ".") for other in names if other)]
        self._units = []  # (outer module, [(owning module, attribute, param index, Parameter)])
        for name, module in outer:
            inside = [(m, attr, index, p) for n, m, mine in owned if n == name or n.startswith(name + ".")
                      for attr, index, p in mine]
            self._units.append((module, inside))

    def measure_points(self, points, closures) -> list[float]:
        per = self.copies_per_forward or len(points)
        losses = []
        for start in range(0, len(points), per):
            group = points[start : start + per]
            values = [self._perturbed(offset, key) for offset, key in group]  # [copy][param index] -> tensor
            installed = [(module, replace_forward(module, _per_copy(module, inside, values)))
                         for module, inside in self._units]
            try:
                losses += per_copy_losses(closures, len(group))
            finally:
                for module, previous in installed:
                    restore_forward(module, previous)
        return losses

    def _perturbed(self, offset: float, key) -> dict[int, Tensor]:
        values = {}
        for index, param in self.params:
            value = param.detach().clone(memory_format=torch.contiguous_format)
            if offset != 0.0:
                self.perturbation.add_(value, index, [(offset, key)])
            values[index] = value
        return values


def _per_copy(module: nn.Module, inside: list, values: list[dict[int, Tensor]]):
    """``module``'s forward split by copies: copy s runs on its rows with copy s's parameters."""
    copies = len(values)

    def make(inner):
        return lambda *args, **kwargs: forward(inner, *args, **kwargs)

    def forward(inner, *args, **kwargs):
        rows = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
        if rows is None or rows % copies:
            raise ValueError(f"the batched path runs {type(module).__name__} once per copy, but its input has "
                             f"{rows} rows for {copies} copies: the closure must repeat the batch copy-major")
        size = rows // copies
        outputs = []
        for s, copy in enumerate(values):
            def part(x, s=s):
                return x[s * size:(s + 1) * size] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == rows \
                    else x
            for owner, attr, index, _ in inside:
                owner._parameters[attr] = copy[index]  # a plain tensor for this call: no autograd, no registration
            try:
                outputs.append(inner(*(part(a) for a in args), **{k: part(v) for k, v in kwargs.items()}))
            finally:
                for owner, attr, _, param in inside:
                    owner._parameters[attr] = param
        return _concatenate(outputs)

    return make


def _concatenate(outputs: list[Any]):
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate([o[i] for o in outputs]) for i in range(len(first)))
    if first is None:
        return None
    raise TypeError(f"the batched path cannot join outputs of type {type(first).__name__} across copies")
