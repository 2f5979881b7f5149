"""The batched path for small trainable sets: all points of a step in one forward, any perturbation.

When the trainable parameters are a few small modules (zotune's TT adapters, PEFT LoRA layers,
norms), a step's S measuring points (2q two-sided) need not cost S forwards of the whole
network. The batch is repeated S times (copy-major, as on the virtual path: the closure is
called as ``closure(copies=S)`` and returns S losses). Every module outside the trainable ones
runs once over all S·B rows; each module that owns trainable parameters runs once per copy, on
that copy's B rows, with that copy's parameters ``θ + offset_s·Z_s`` swapped in (materialised:
S copies of a small set). Layers that know copies take them all in one call instead: a TT layer
(:class:`~zotune.adapters.TTLinear`) gets its parameters stacked, (S, ...), for the whole forward,
and an ``nn.Linear`` runs as one batched product (:func:`linear_copies`). AdaZeta's q = 10 is then
one forward of the frozen network over 20 copies of the batch, with the adapters' products batched.

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

from .copies import per_copy_linear
from .execution import CopiesOfTheBatch, owners, replace_forward, restore_forward, swapped
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
        self._units = per_copy_units(self.model, params)
        self._values = CopyValues()

    def storage_version(self) -> int:
        """Changes when the copies' values move to new storage: forwards captured in CUDA graphs
        (``train.cuda_graphs``) read the old storage and must be captured again."""
        return self._values.generation if hasattr(self, "_values") else 0

    def measure_points(self, points, closures) -> list[float]:
        per = self.copies_per_forward or len(points)
        losses = []
        for start in range(0, len(points), per):
            group = points[start : start + per]
            with self.shared_ids_expanded():
                losses += measure_on_copies(self._units, self.params, self.perturbation, group, closures,
                                            self._values)
        return losses


def per_copy_units(model: nn.Module, params) -> list[tuple[nn.Module, list]]:
    """The outermost modules owning ``params``, each with [(owning module, attribute, param index, Parameter)]
    of every parameter in it: an owner inside one (a norm inside an adapter) has its parameters swapped by
    the outer one's per-copy call."""
    owned = owners(model, params)
    found = {id(p) for _, _, mine in owned for _, _, p in mine}
    missing = [i for i, p in params if id(p) not in found]
    if missing:
        raise ValueError(f"parameters at indices {missing[:5]} do not belong to a module of the model")
    names = [name for name, _, _ in owned]
    outer = [(name, module) for name, module, _ in owned
             if not any(name != other and name.startswith(other + ".") for other in names if other)]
    return [(module, [(m, attr, index, p) for n, m, mine in owned if n == name or n.startswith(name + ".")
                      for attr, index, p in mine]) for name, module in outer]


class CopyValues:
    """The perturbed values of a step's copies, kept across steps: per parameter an (S, *shape) stack whose
    row s is copy s's value. Reused, the rows keep the perturbation's pass plans (one fused launch per copy
    on CUDA, where fresh tensors cost a plan and a launch each); stacked, they feed copy-aware layers
    (stacked parameters, ``linear_copies``) whole.

    The stacks of the parameters of one device and dtype are column blocks of one (S, Σ numel) buffer, so
    that putting θ in every row is two operations (the parameters concatenated, the row repeated) rather
    than one copy per parameter: on a GPU, where a step of a small trainable set is bound by the host's
    launches, a few hundred fewer a step."""

    def __init__(self) -> None:
        self.stacks: dict[int, Tensor] = {}  # param index -> (capacity, *shape), a view of a buffer
        self.rows: list[dict[int, Tensor]] = []  # [copy][param index] -> row view (a Parameter without grad)
        self.buffers: list[tuple[Tensor, list[Tensor]]] = []  # (capacity, Σ numel) buffer, its parameters in order
        self.generation = 0  # counts the allocations of ``stacks``

    def fill(self, params, perturbation, points) -> list[dict[int, Tensor]]:
        """``θ + offset·Z(key)`` of every parameter for each point ``(offset, key)``: [copy][param index]."""
        copies = len(points)
        if copies > len(self.rows):  # grown (AdaZeta's query count rises): new stacks, new plans, once
            self._allocate(params, copies)
        for buffer, group in self.buffers:  # θ in every row
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            buffer[:copies].copy_(flat.expand(copies, -1))
        for (offset, key), values in zip(points, self.rows):
            if offset != 0.0:
                perturbation.add_each_(list(values.items()), [(offset, key)], ())
        return self.rows[:copies]

    def _allocate(self, params, copies: int) -> None:
        groups: dict[tuple, list[tuple[int, Tensor]]] = {}
        for index, p in params:
            groups.setdefault((p.device, p.dtype), []).append((index, p))
        self.stacks, self.buffers = {}, []
        for (device, dtype), group in groups.items():
            buffer = torch.empty((copies, sum(p.numel() for _, p in group)), dtype=dtype, device=device)
            start = 0
            for index, p in group:  # copy s's value of p: buffer[s, start:start + numel], contiguous
                self.stacks[index] = buffer[:, start:start + p.numel()].view(copies, *p.shape)
                start += p.numel()
            self.buffers.append((buffer, [p for _, p in group]))
        self.generation += 1
        # Parameters: the perturbation keeps pass plans for Parameters only
        self.rows = [{index: nn.Parameter(stack[s], requires_grad=False) for index, stack in self.stacks.items()}
                     for s in range(copies)]


def measure_on_copies(units, params, perturbation, points, closures, values: CopyValues) -> list[float]:
    """The losses at ``points``, one copy of the batch each, ``units`` running per copy with their values
    (computed into ``values``, kept by the caller across steps)."""
    rows = values.fill(params, perturbation, points)
    copies = len(points)
    # Modules that take stacked parameters get them for the whole forward: each call (and whatever reads
    # their parameters past the call, as the adapters' fused sums do) then runs every copy at once.
    stacked = [(owner, attr, values.stacks[index][:copies], param)
               for module, inside in units if takes_stacked_parameters(module, inside)
               for owner, attr, index, param in inside]
    installed = [(module, replace_forward(module, _per_copy(module, inside, rows, values.stacks)))
                 for module, inside in units if not takes_stacked_parameters(module, inside)]
    try:
        with swapped(stacked):
            return per_copy_losses(closures, copies)
    finally:
        for module, previous in installed:
            restore_forward(module, previous)


def takes_stacked_parameters(module: nn.Module, inside: list) -> bool:
    """Whether ``module`` owns all of the unit's parameters and runs S copies when they carry a leading
    copies dimension (``stacked_parameters``, e.g. :class:`~zotune.adapters.TTLinear`)."""
    return getattr(module, "stacked_parameters", False) and all(owner is module for owner, _, _, _ in inside)


def _per_copy(module: nn.Module, inside: list, values: list[dict[int, Tensor]], stacks: dict[int, Tensor]):
    """``module``'s forward split by copies: copy s runs on its rows with copy s's parameters. An
    ``nn.Linear`` owning all of them (PEFT LoRA's A and B, a norm-free adapter's projections) takes every
    copy in one call instead, through :func:`linear_copies` with its parameters stacked."""
    copies = len(values)
    if type(module) is nn.Linear and all(owner is module for owner, _, _, _ in inside):
        stacked = {attr: stacks[index][:copies] for _, attr, index, _ in inside}

        def make_copy_aware(inner):
            def forward(x):
                return linear_copies(module, x, **stacked)
            return forward

        return make_copy_aware

    def make(inner):
        def forward(*args, **kwargs):
            def run(s, *part_args, **part_kwargs):
                with swapped([(owner, attr, values[s][index], param) for owner, attr, index, param in inside]):
                    return inner(*part_args, **part_kwargs)
            return split_by_copies(module, copies, run, args, kwargs)
        return forward

    return make


def linear_copies(module: nn.Linear, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``nn.Linear`` for S copies at once: copy s's rows of ``x`` (copy-major) times copy s's ``weight``
    (S, out, in), plus its ``bias`` (S, out); one not given is the layer's own (PEFT LoRA's A and B, a
    norm-free adapter's projections: one batched product instead of S)."""
    copies = (weight if weight is not None else bias).shape[0]
    weight = weight if weight is not None else module.weight.expand(copies, -1, -1)
    return per_copy_linear(x, weight.transpose(1, 2), bias if bias is not None else module.bias)


def split_by_copies(module: nn.Module, copies: int, run, args: tuple, kwargs: dict):
    """``run(s, *args_s, **kwargs_s)`` for each copy s, on that copy's rows of every batch-sized tensor
    argument; the outputs joined along the rows again."""
    if any(type(v).__name__.endswith("Cache") for v in (*args, *kwargs.values())):
        raise ValueError(f"{type(module).__name__} runs once per copy, and a key/value cache would join the copies' "
                         "keys: call the model with use_cache=False")
    rows = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
    if rows is None or rows % copies:
        raise ValueError(f"{type(module).__name__} runs once per copy, but its input has {rows} rows for {copies} "
                         "copies: the closure must repeat the batch copy-major")
    size = rows // copies

    def part(x, s):  # this copy's rows of a batch-sized tensor, also inside tuples (a layer's (cos, sin))
        if isinstance(x, (tuple, list)):
            return type(x)(part(item, s) for item in x)
        return x[s * size:(s + 1) * size] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == rows else x

    return _concatenate([run(s, *(part(a, s) for a in args), **{k: part(v, s) for k, v in kwargs.items()})
                         for s in range(copies)])


def _concatenate(outputs: list[Any]):
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate([o[i] for o in outputs]) for i in range(len(first)))
    if first is None:
        return None
    raise TypeError(f"the batched path cannot join outputs of type {type(first).__name__} across copies")
