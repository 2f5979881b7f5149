"""Execution paths: how a step's losses are measured at θ + offset·Z without storing Z.

An execution path is an object the user (or :func:`zotune.train.setup.build_execution`)
creates and passes to the optimizer as ``execution=``; the optimizer binds it once to its
indexed parameters, perturbation and estimator (:meth:`ExecutionPath.bind`). Four exist:

* :class:`InPlace` (the default) writes the perturbation into the weights and moves them from
  one measuring point to the next, so that a two-sided query costs three passes over the
  weights (+ε, −2ε, then restore folded into the update pass) instead of the reference's four.
  It works for every parameter and dtype, but in float16/bfloat16 each add rounds, so the
  restored weights drift by a few ulps per step.
* :class:`DriftSafe` never writes the weights while measuring: a forward pre-hook on each
  module that owns a trainable parameter swaps in a temporary ``param + offset·Z`` for the
  duration of that module's forward. The weights are written only by the update, so a step
  with lr=0 leaves them bit-identical in any dtype. It costs one transient tensor the size of
  the module's weight while the module runs.
* :class:`~zotune.optim.virtual.Virtual` measures every point in one batched forward (factored
  perturbations only).
* :class:`~zotune.dist.parallel.Distributed` wraps any of them across ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .estimators import SPSA, Point
from .perturbations import Perturbation, Term

IndexedParams = Sequence[tuple[int, Tensor]]
Closure = Callable[..., "Tensor | float"]


def _pending(value: object) -> "Tensor | float":
    """A closure's loss, checked, and not yet read back: a one-element tensor becomes a copy of itself
    on its device (a snapshot, in case the closure's next call overwrites its output)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"the closure must return the batch loss as a scalar; got a tensor of shape {tuple(value.shape)}"
            )
        return value.detach().reshape(()).clone()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"the closure must return the batch loss as a scalar (a Python number or a one-element tensor); "
        f"got {type(value).__name__}"
    )


def start_read_back(values: Sequence["Tensor | float"]) -> Callable[[], list[float]]:
    """Queue the copies of :func:`_pending` losses to the host now, one per device (and dtype), into pinned
    memory from a GPU, and return what waits for them and gives the Python floats: a step whose forwards
    run on a GPU waits once, not once a forward, and work queued on the device in between (the enqueued
    update) does not delay the copies."""
    floats = list(values)
    together: dict[tuple, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, Tensor):
            together.setdefault((value.device, value.dtype), []).append(i)
    copies = []  # (positions, host tensor, CUDA event after its copy or None)
    for positions in together.values():
        stacked = torch.stack([values[i] for i in positions])
        if not stacked.is_cuda:
            copies.append((positions, stacked, None))
            continue
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(stacked.device))
        copies.append((positions, host, arrived))

    def wait() -> list[float]:
        for positions, host, arrived in copies:
            if arrived is not None:
                arrived.synchronize()
            for i, number in zip(positions, host.tolist()):
                floats[i] = number
        return floats

    return wait


def mean_losses(measured: Sequence[Sequence["Tensor | float"]]) -> list[float]:
    """The mean micro-batch loss of each point, from each point's :func:`_pending` losses (gradient
    accumulation averages the micro-batches' projected gradients)."""
    return start_mean_losses(measured)()


def start_mean_losses(measured: Sequence[Sequence["Tensor | float"]]) -> Callable[[], list[float]]:
    """:func:`mean_losses`, its copies queued now (:func:`start_read_back`)."""
    arriving = start_read_back([value for values in measured for value in values])

    def wait() -> list[float]:
        numbers = iter(arriving())
        return [sum(next(numbers) for _ in values) / len(values) for values in measured]

    return wait


def owners(model: nn.Module, params: IndexedParams) -> list[tuple[str, nn.Module, list[tuple[str, int, Tensor]]]]:
    """(module name, module, [(attribute, param index, the Parameter)]) of every module owning trainable ones."""
    index_of = {id(p): i for i, p in params}
    owned = []
    for module_name, module in model.named_modules():
        mine = [(name, index_of[id(p)], p) for name, p in module._parameters.items()
                if p is not None and id(p) in index_of]
        if mine:
            owned.append((module_name, module, mine))
    return owned


class ExecutionPath(ABC):
    """How the optimizer's measuring points become losses."""

    #: True when measuring writes the perturbation into the weights (ranks that measure
    #: different points would then restore with different roundings).
    writes_weights: bool = False

    def __init__(self) -> None:
        self._bound = False

    def bind(self, params: IndexedParams, perturbation: Perturbation, estimator: SPSA) -> None:
        """Called once by the optimizer with its trainable ``(index, param)`` pairs."""
        if self._bound:
            raise ValueError(f"this {type(self).__name__} execution path already serves an optimizer; "
                             "create one per optimizer")
        self._bound = True
        self.params, self.perturbation, self.estimator = params, perturbation, estimator

    @abstractmethod
    def measure_points(self, points: Sequence[Point], closures: Sequence[Closure]) -> list[float]:
        """The loss at every point, in order."""

    def take_restore_terms(self) -> list[Term]:
        """Terms that return the weights to θ; the optimizer folds them into its update pass."""
        return []

    def flush(self) -> None:
        """Apply to the weights whatever this path deferred (nothing but for the offload path): call it
        before reading the weights (checkpoints, the final weights)."""

    def close(self) -> None:
        """Flush, and undo what the path installed on the model (the offload path's block wrappers)."""
        self.flush()


class CopiesOfTheBatch(ExecutionPath):
    """A path that measures a step's points on copies of the batch: the closure is called as
    ``closure(copies=k)`` and returns the k losses of the batch repeated k times (copy-major).

    Args:
        model: the module owning the optimizer's parameters.
        copies_per_forward: at most this many copies per forward (bounds activation memory);
            default all of a step's points in one.
    """

    def __init__(self, model: nn.Module, copies_per_forward: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}(model) needs the nn.Module owning the parameters, got "
                            f"{type(model).__name__}")
        if copies_per_forward is not None and (isinstance(copies_per_forward, bool)
                                               or int(copies_per_forward) != copies_per_forward
                                               or copies_per_forward < 1):
            raise ValueError(f"copies_per_forward must be a positive integer or None, got {copies_per_forward!r}")
        self.model = model
        self.copies_per_forward = None if copies_per_forward is None else int(copies_per_forward)

    def bind(self, params, perturbation, estimator) -> None:
        super().bind(params, perturbation, estimator)
        # A model may index a perturbed embedding with ids its whole batch shares (BERT's and GPT-2's default
        # position ids, (1, T)) and broadcast the (1, T, d) output over the rows: no rows to give each copy.
        self._embeddings = [m for _, m, _ in owners(self.model, params) if isinstance(m, nn.Embedding)]

    @contextmanager
    def shared_ids_expanded(self):
        """While open, ids of one row that reach a perturbed ``nn.Embedding`` while the model runs on R > 1
        rows are expanded to R rows (a view): the values the broadcast would give, in rows that the paths
        can split by copies. The model's call gives R (its ``input_ids``, ``inputs_embeds`` or first tensor)."""
        if not self._embeddings:
            yield
            return
        rows = [0]

        def note_rows(module, args, kwargs) -> None:
            batch = next((t for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args)
                          if isinstance(t, Tensor)), None)
            rows[0] = batch.shape[0] if batch is not None and batch.dim() > 1 else 0

        def expand(module, args):
            if args and isinstance(args[0], Tensor) and args[0].dim() == 2 and args[0].shape[0] == 1 < rows[0]:
                return (args[0].expand(rows[0], -1), *args[1:])
            return None

        handles = [self.model.register_forward_pre_hook(note_rows, with_kwargs=True)]
        handles += [module.register_forward_pre_hook(expand) for module in self._embeddings]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class InPlace(ExecutionPath):
    """Perturb the weights in place (MeZO's seed trick, with the restore fused into the update)."""

    writes_weights = True

    def __init__(self) -> None:
        super().__init__()
        self._applied: list[Term] = []  # what is currently added to θ

    def measure_points(self, points, closures):
        return mean_losses(self.measure_pending(points, closures))

    def measure_pending(self, points: Sequence[Point], closures: Sequence[Closure]) -> list[list["Tensor | float"]]:
        """Each point's micro-batch losses, not yet read back (read them once, after the last forward: the
        GPU then waits once a step; the optimizer may enqueue the update first, :mod:`zotune.optim.enqueued`)."""
        measured = []
        for offset, key in points:
            # One pass moves from the current point to the next: undo the other keys' offsets and
            # bring this key's offset to its new value (e.g. +ε → −ε is one pass of −2ε).
            terms = [(-alpha, k) for alpha, k in self._applied if k != key]
            already = sum(alpha for alpha, k in self._applied if k == key)
            terms.append((offset - already, key))
            self.perturbation.add_each_(self.params, terms, ())
            self._applied = [(offset, key)]
            measured.append([_pending(c()) for c in closures])
        return measured

    def take_restore_terms(self) -> list[Term]:
        terms = [(-alpha, key) for alpha, key in self._applied]
        self._applied = []
        return terms


class DriftSafe(ExecutionPath):
    """Perturb each weight only while its module runs (bit-identical restore in any precision).

    Args:
        model: the module that owns the optimizer's parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"DriftSafe(model) needs the nn.Module owning the parameters, got {type(model).__name__}")
        self.model = model

    def bind(self, params, perturbation, estimator) -> None:
        super().bind(params, perturbation, estimator)
        self._owned = [(module, mine) for _, module, mine in owners(self.model, params)]
        found = {id(p) for _, mine in self._owned for _, _, p in mine}
        missing = [i for i, p in params if id(p) not in found]
        if missing:
            raise ValueError(
                f"drift-safe (at-use) perturbation needs every trainable parameter to belong to a module "
                f"of the given model; parameters at indices {missing[:5]} do not"
            )

    def measure_points(self, points, closures):  # read back after the last forward, as InPlace does
        return mean_losses([self._measure(offset, key, closures) for offset, key in points])

    def _measure(self, offset, key, closures) -> list:
        """The point's micro-batch losses, not yet read back."""
        if offset == 0.0:
            return [_pending(c()) for c in closures]
        handles = []
        perturbation = self.perturbation

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
            return [_pending(c()) for c in closures]
        finally:
            for handle in handles:
                handle.remove()
            for module, owned in self._owned:
                swap_out(module, owned)


@contextmanager
def swapped(entries):
    """Within the block, ``owner.<attr>`` is the plain tensor given instead of its parameter.

    ``entries``: (owning module, attribute, tensor, the Parameter to put back). A plain tensor in
    ``_parameters`` is used by the module's forward as is: no autograd, no registration.
    """
    for owner, attr, tensor, _ in entries:
        owner._parameters[attr] = tensor
    try:
        yield
    finally:
        for owner, attr, _, param in entries:
            owner._parameters[attr] = param


_NONE = object()


def replace_forward(module: nn.Module, make: Callable[[Callable], Callable]) -> object:
    """Set the instance attribute ``forward`` to ``make(current forward)`` until :func:`restore_forward`.

    An instance attribute rather than a forward hook: ``Module.__call__`` then keeps its hook-free
    fast path, which saves a few microseconds of host time per module and call (what bounds a
    small-batch step on a GPU). Whatever ``forward`` the instance had (accelerate's device hooks)
    is wrapped and put back. Returns that previous attribute, or a sentinel when there was none.
    """
    previous = module.__dict__.get("forward", _NONE)
    module.__dict__["forward"] = make(module.forward)
    return previous


def restore_forward(module: nn.Module, previous: object) -> None:
    if previous is _NONE:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = previous
