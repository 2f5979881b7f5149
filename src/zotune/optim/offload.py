"""The offload path: a model's blocks live in CPU memory and visit the GPU one at a time.

A ZO step needs no gradients and no optimizer state for SGD, so a model larger than the GPU's
memory can be fine-tuned on it if each block is on the GPU only while it runs (ZO2, Wang et al.
2025, streams OPT-175B through an 18 GB GPU this way). Here:

* the repeated blocks (every member of an ``nn.ModuleList`` of two or more: the decoder layers)
  keep their parameters in CPU memory (pinned when the device is CUDA); every other module
  (embeddings, final norm, head) lives on the device;
* all points of a step are measured in one forward over copies of the batch (the closure is
  called as ``closure(copies=S)``, as on the batched path), so each block is uploaded **once per
  step**: its weights are copied to the device, the update of the previous step is applied there
  (and written back to CPU memory), and the block runs once per copy with that copy's offset·Z
  added in place to the uploaded weights, in one pass per copy;
* on CUDA the transfers overlap compute: while block i runs, block i+1's weights are copied in on a
  stream of their own, and block i's updated weights are written back on a third (into pinned memory);
* the optimizer's updates to offloaded parameters are not applied in CPU memory: the Gaussian
  perturbation defers them (:meth:`~zotune.optim.perturbations.Gaussian.defer`) and the next
  upload applies them on the device. :meth:`Offload.flush` applies what is pending (the training
  loop calls it before reading the weights: checkpoints, the final weights); any forward, an
  evaluation included, applies a block's pending update before using it.

Every parameter keeps its index and its directions, so the points measured are those of the
in-place path up to rounding (the batched path's values exactly for the first copy). Dense
directions and an SGD rule (MeZO, AdaZeta) without weight decay in this version.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batched import CopyValues, measure_on_copies, per_copy_units, split_by_copies
from .execution import CopiesOfTheBatch, replace_forward, restore_forward, swapped
from .perturbations import Gaussian


#: The attribute :func:`place` sets on a model it placed (as accelerate sets ``hf_device_map``).
OFFLOAD_ATTRIBUTE = "zotune_offload_device"


def place(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Put everything but the repeated blocks' parameters on ``device`` (the blocks' buffers too: they are
    small); the blocks' parameters stay in CPU memory for :class:`Offload` to upload. Loads nothing."""
    device = torch.device(device)
    held = {id(p) for block in repeated_blocks(model) for p in block.parameters()}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in held:
                p.data = p.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    setattr(model, OFFLOAD_ATTRIBUTE, device)
    return model


def offload_device(model: nn.Module) -> torch.device | None:
    """Where :func:`place` put the model's resident part, or None if it did not place it."""
    return getattr(model, OFFLOAD_ATTRIBUTE, None)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Members of every ``nn.ModuleList`` of two or more modules with parameters (the decoder layers)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 1
            for block in module if any(True for _ in block.parameters())]


class Offload(CopiesOfTheBatch):
    """Measure a step's points with the model's blocks in CPU memory, each uploaded once per step.

    Args:
        model: the module owning the optimizer's parameters; its blocks stay where they are (the CPU),
            the rest must already be on ``device``.
        device: where the forward runs.
        copies_per_forward: at most this many copies per forward (each forward uploads every block once).
    """

    def __init__(self, model: nn.Module, device: str | torch.device, copies_per_forward: int | None = None) -> None:
        super().__init__(model, copies_per_forward)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current device, as place() puts it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._points: list | None = None  # the (offset, key) of each copy while a step is measured
        self._pending: dict[int, list] = {}  # id(offloaded trainable parameter) -> deferred update terms
        self._arriving: dict[int, tuple] = {}  # block index -> (weights on the device by id, CUDA event or None)
        self._written: dict[int, object] = {}  # block index -> CUDA event of its last write-back
        self._computed: dict[int, object] = {}  # block index -> CUDA event after its forward's kernels
        self._side_streams: dict = {}  # CUDA: "copy" (uploads) and "write" (write-backs)

    def bind(self, params, perturbation, estimator) -> None:
        if type(perturbation) is not Gaussian:
            raise ValueError(f"the offload path takes dense Gaussian directions (mezo, adazeta), not "
                             f"{type(perturbation).__name__}")
        super().bind(params, perturbation, estimator)
        index_of = {id(p): i for i, p in params}
        # (block, [(owning module, attribute, param index or None if frozen, Parameter)], its own forward)
        self._blocks = []
        for block in repeated_blocks(self.model):
            held = [(m, attr, index_of.get(id(p)), p) for m in block.modules() for attr, p in m._parameters.items()
                    if p is not None]
            for _, _, _, p in held:
                if self.device.type == "cuda" and not p.is_pinned():
                    p.data = p.data.pin_memory()  # uploads can then overlap the device's work
            index = len(self._blocks)
            self._blocks.append((block, held, replace_forward(block, self._streamed(index, block, held))))
        offloaded = [p for _, held, _ in self._blocks for _, _, index, p in held if index is not None]
        perturbation.defer(offloaded, self._pending)
        resident = [(i, p) for i, p in params if id(p) not in self._pending]
        if any(p.device != self.device for _, p in resident):
            raise ValueError(f"parameters outside the model's repeated blocks must be on {self.device}")
        self._resident = resident
        self._units = per_copy_units(self.model, resident) if resident else []
        self._values = CopyValues()  # the resident parameters' perturbed values, per copy

    def measure_points(self, points, closures) -> list[float]:
        per = self.copies_per_forward or len(points)
        losses = []
        for start in range(0, len(points), per):
            self._points = list(points[start : start + per])
            try:
                losses += measure_on_copies(self._units, self._resident, self.perturbation, self._points, closures,
                                            self._values)
            finally:
                self._points = None
        return losses

    def flush(self) -> None:
        """Apply every deferred update to the weights in CPU memory (before reading them)."""
        self._arriving.clear()  # a copy started by a forward that did not finish
        self._computed.clear()
        for i, (_, held, _) in enumerate(self._blocks):
            if any(self._pending.get(id(p)) for _, _, _, p in held):
                self._upload(i)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the write-backs are asynchronous

    def close(self) -> None:
        """Flush, and give the blocks their own forward back (the optimizer is done with them)."""
        self.flush()
        for block, _, previous in self._blocks:
            restore_forward(block, previous)
        self._blocks = []

    def _copy_in(self, i: int) -> None:
        """Start copying block ``i``'s weights to the device. On CUDA the copy runs on a stream of its
        own, after the block's last write-back, so it overlaps the blocks computing before it."""
        held = self._blocks[i][1]
        if self.device.type != "cuda":
            self._arriving[i] = ({id(p): p.detach().to(self.device, copy=True) for _, _, _, p in held}, None)
            return
        # The host issues a forward's kernels far ahead of the device. Unchecked, it would start the copies
        # of every block at once: their memory outgrows a capped device, and the allocator then frees its
        # cache with a device-wide synchronisation at each block, undoing the overlap. So block i's copy
        # starts once block i - 2 has computed: at most three blocks on the device.
        if (done := self._computed.pop(i - 2, None)) is not None:
            done.synchronize()
        streams = self._streams()
        with torch.cuda.stream(streams["copy"]):
            if i in self._written:
                streams["copy"].wait_event(self._written.pop(i))
            values = {id(p): p.detach().to(self.device, non_blocking=True, copy=True) for _, _, _, p in held}
            arrived = torch.cuda.Event()
            arrived.record()
        self._arriving[i] = (values, arrived)

    def _upload(self, i: int) -> dict[int, Tensor]:
        """Block ``i``'s weights on the device, by id of their parameter, with the pending updates applied
        there and written back to CPU memory (on CUDA by a stream of its own, overlapping what follows)."""
        if i not in self._arriving:
            self._copy_in(i)
        on_device, arrived = self._arriving.pop(i)
        if arrived is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(arrived)
            for value in on_device.values():
                value.record_stream(compute)  # allocated on the copy stream, used (and freed) on this one
        # The block's deferred updates, one pass per distinct list of terms (every parameter of one group
        # shares the step's terms): one launch for the block, not one a tensor.
        updated, by_terms = [], {}
        for _, _, index, p in self._blocks[i][1]:
            terms = self._pending.get(id(p)) if index is not None else None
            if terms:
                by_terms.setdefault(tuple(terms), []).append((index, on_device[id(p)]))
                self._pending[id(p)] = []
                updated.append(p)
        for terms, members in by_terms.items():
            self.perturbation.add_each_(members, list(terms), ())
        if updated and arrived is None:
            for p in updated:
                p.data.copy_(on_device[id(p)])  # the update lands in CPU memory once
        elif updated:
            # The block's forward goes on to add each copy's offset·Z to these very tensors: the write-back
            # reads a snapshot of the updated weights (a device copy, far cheaper than the bus).
            snapshots = [(p, on_device[id(p)].clone()) for p in updated]
            streams = self._streams()
            streams["write"].wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(streams["write"]):
                for p, snapshot in snapshots:
                    snapshot.record_stream(streams["write"])
                    p.data.copy_(snapshot, non_blocking=True)  # into pinned memory: asynchronous
                written = torch.cuda.Event()
                written.record()
            self._written[i] = written  # the next copy of this block waits for it
        return on_device

    def _streams(self) -> dict:
        if not self._side_streams:
            self._side_streams = {"copy": torch.cuda.Stream(self.device), "write": torch.cuda.Stream(self.device)}
        return self._side_streams

    def _streamed(self, i: int, block: nn.Module, held):
        def make(inner):
            def forward(*args, **kwargs):
                on_device = self._upload(i)
                if i + 1 < len(self._blocks):  # (on the CPU stand-in too, so that the tests follow this order)
                    self._copy_in(i + 1)  # the next block's weights travel while this one computes
                points = self._points or [(0.0, None)]  # outside a step (an evaluation): the weights as they are
                trainable = [(index, on_device[id(p)]) for _, _, index, p in held if index is not None]
                applied: list = []  # the offset·Z the uploaded weights hold now

                def run(s, *part_args, **part_kwargs):
                    offset, key = points[s]
                    wanted = [(offset, key)] if offset != 0.0 else []
                    terms = [(-alpha, k) for alpha, k in applied] + wanted  # from the last copy's point to this one
                    if terms:
                        self.perturbation.add_each_(trainable, terms, ())
                    applied[:] = wanted
                    with swapped([(owner, attr, on_device[id(p)], p) for owner, attr, _, p in held]):
                        return inner(*part_args, **part_kwargs)

                out = split_by_copies(block, len(points), run, args, kwargs)
                if self.device.type == "cuda":
                    self._computed[i] = torch.cuda.Event()
                    self._computed[i].record()
                return out
            return forward
        return make
