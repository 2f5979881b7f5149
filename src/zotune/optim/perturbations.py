"""Perturbation directions Z and how to apply them.

A perturbation regenerates its direction ``Z`` for one parameter from a :class:`DrawKey`
and the parameter's index; it never stores Z. The optimizer only talks to it through the
:class:`Perturbation` contract below, which is what lets the low-rank and tensor
perturbations plug into the same step.
"""

from __future__ import annotations

import functools
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from . import philox
from .seeding import DeviceGenerators, derive_seed
from .shards import is_sharded, local_shard


@dataclass(frozen=True)
class DrawKey:
    """Address of one query's direction: ``Z`` for parameter ``p`` is a function of (key, p)."""

    run_seed: int
    step: int
    query: int


# One term of a linear combination  sum_k alpha_k * Z(key_k) (alpha a float; in an enqueued update, a
# float64 scalar on the GPU: see merge_terms).
Term = tuple["float | Tensor", DrawKey]


def merge_terms(terms: Sequence[Term]) -> list[Term]:
    """Sum the coefficients of equal keys and drop zeros: each direction is drawn once.

    (The update pass of a one-query step is restore + update of the same key: one draw, not two.)
    A coefficient may be a float64 scalar on a GPU (:mod:`zotune.optim.enqueued`): it is summed there
    and kept even when zero (reading it would wait for the GPU); its term then adds nothing.
    """
    merged: dict[DrawKey, float | Tensor] = {}
    for alpha, key in terms:
        merged[key] = merged.get(key, 0.0) + alpha
    return [(alpha, key) for key, alpha in merged.items() if isinstance(alpha, Tensor) or alpha != 0.0]


class Perturbation(ABC):
    """What the optimizer needs from a family of directions: three methods to write, the rest
    have defaults that fit a perturbation with one fixed basis and nothing to save."""

    #: True when the coordinates' basis changes between steps (LOZO's V windows): moments must
    #: then be carried over with :meth:`transport`.
    changes_basis: bool = False
    #: True when the coordinates of a sharded (FSDP2) parameter are sharded like it (dense directions);
    #: False when they are the whole parameter's, the same on every rank (the factored ones: U-space, τ).
    sharded_coordinates: bool = False

    @abstractmethod
    def add_(self, param: Tensor, index: int, terms: Sequence[Term]) -> None:
        """``param += sum_k alpha_k Z(key_k)`` in place, in one pass over ``param``."""

    @abstractmethod
    def coordinates(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        """``sum_k alpha_k Z(key_k)`` in the perturbation's own coordinates (float32 or wider).

        Update rules with state (momentum, Adam) keep their moments in these coordinates.
        All keys of one call belong to the same step.
        """

    @abstractmethod
    def add_coordinates_(self, param: Tensor, index: int, coords: Tensor, alpha: float, key: DrawKey) -> None:
        """``param += alpha * expand(coords)`` in place, in the basis of ``key``'s step."""

    def scale(self, param: Tensor) -> float:
        """κ in ĝ = κ · g · Z for this parameter (1 unless the method normalises)."""
        return 1.0

    def add_each_(self, params: Sequence[tuple[int, Tensor]], terms: Sequence[Term], scaled: Sequence[Term]) -> None:
        """For every ``(index, p)``: ``p += Σ terms + scale(p) · Σ scaled`` in one pass (the update pass)."""
        for index, p in params:
            kappa = self.scale(p)
            self.add_(p, index, [*terms, *((kappa * alpha, key) for alpha, key in scaled)])

    def transport(self, coords: Tensor, param: Tensor, index: int, old: DrawKey, new: DrawKey) -> Tensor:
        """Coordinates in the basis of step ``old.step`` re-expressed in the basis of ``new.step``."""
        return coords

    def prepare(self, params: Sequence[tuple[int, Tensor]]) -> None:
        """Called once with the initial trainable parameters (e.g. to choose per-layer ranks)."""

    def persistent_numel(self) -> int:
        """Numbers the perturbation holds between steps (cached factors)."""
        return 0

    def scratch_numel(self) -> int:
        """Numbers in reusable draw buffers (refilled every step, never saved)."""
        return 0

    def state_dict(self) -> dict:
        """What must be saved to regenerate the same directions after a resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FactoredPerturbation(Perturbation):
    """A perturbation whose matrix directions are thin products offset·Z = L Rᵀ: what the
    virtual path (:class:`~zotune.optim.virtual.Virtual`) needs to add them to layer outputs
    instead of writing them into the weights."""

    @abstractmethod
    def point_factors(self, params: Sequence[tuple[int, Tensor]],
                      points: Sequence[Term]) -> dict[int, tuple[Tensor, ...]]:
        """Every point's offset·Z of every parameter, by parameter index.

        ``(Lᵀ (S, r, m), R (n, r))`` for a matrix (offset_s Z_s = L_s Rᵀ; all points belong to one
        step, so they share R), or ``(Z (S, d),)`` for a 1-D parameter. The same dict (same tensor
        objects, refilled) may be returned for later steps, so callers can keep what they built on it.
        """


class Gaussian(Perturbation):
    """Dense i.i.d. N(0, 1) directions, as in MeZO (Malladi et al., 2023, Alg. 1).

    Two generators draw them (``generator``):

    * ``"philox"``: element e of parameter i is a pure function of (draw key, i, e)
      (:mod:`zotune.optim.philox`). On CUDA with Triton installed a fused kernel
      (:mod:`zotune.optim.fused`) generates Z in registers while it adds Σ α_k Z_k to every
      trainable tensor of a dtype in one launch: one read and one write of each weight per pass,
      nothing of Z stored. Elsewhere the same stream is computed in torch (slower; the normals
      agree with the kernel's to float32 rounding).
    * ``"torch"``: a ``torch.Generator`` seeded per flat chunk of ``chunk_numel`` elements
      (2²² on the CPU, 2²⁶ on a GPU), Z drawn into a chunk-sized scratch buffer and added term
      by term. Z depends on the chunk size, so a run must be resumed with the same one.

    ``"auto"`` (the default) is ``"philox"`` for CUDA parameters when Triton is installed and for
    sharded (FSDP2) parameters, whose shards draw from their elements' positions in the whole
    parameter, and ``"torch"`` otherwise. The two give different directions, and so do torch's CPU and CUDA
    generators: a run resumes and replays bit-identically on the kind of device it ran on.

    Coordinates are the full-size tensor (so moments are full-size, as in MeZO-Adam).
    """

    GENERATORS = ("auto", "philox", "torch")

    sharded_coordinates = True  # the coordinates are Z itself, a tensor like the parameter

    def __init__(self, chunk_numel: int | None = None, generator: str = "auto") -> None:
        if chunk_numel is not None and chunk_numel < 1:
            raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
        if generator not in self.GENERATORS:
            raise ValueError(f"generator must be one of {self.GENERATORS}, got {generator!r}")
        self.chunk_numel, self.generator = chunk_numel, generator
        self._generators = DeviceGenerators()
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._fused = None  # the Triton kernel's launcher, made on first CUDA use
        self._plans: dict[tuple, _Plan] = {}
        self._deferred: dict[int, list] | None = None  # id(param) -> terms not yet applied (see defer)

    # ------------------------------------------------------------ which generator
    def uses_philox(self, param: Tensor) -> bool:
        if self.generator == "auto":  # a shard's directions must be its parameter's, wherever it lives
            return (param.is_cuda and _triton_installed()) or is_sharded(param)
        return self.generator == "philox"

    def _kernel_for(self, param: Tensor):
        """The fused launcher if it serves ``param`` (CUDA, Triton, a float dtype), else None."""
        if not (param.is_cuda and _triton_installed()):
            return None
        if self._fused is None:
            from .fused import FusedPerturber

            self._fused = FusedPerturber()
        return self._fused if self._fused.supports(param) else None

    @staticmethod
    def philox_key(key: DrawKey) -> int:
        return derive_seed(key.run_seed, key.step, key.query)

    def defer(self, params: Sequence[Tensor], pending: dict[int, list]) -> None:
        """From now on, terms added to these parameters are appended to ``pending[id(param)]`` instead
        of being applied: whoever holds the parameters (the offload path, which keeps them in CPU
        memory) applies them where the weights are next used. Only additive updates (an SGD rule)."""
        self._deferred = pending
        for p in params:
            pending.setdefault(id(p), [])

    def all_fused(self, params: Sequence[tuple[int, Tensor]]) -> bool:
        """Whether every pass over ``params`` runs in the fused kernel (none deferred, none drawn by torch):
        then its coefficients may be scalars on the GPU."""
        plan = self._plan(params)
        return self._deferred is None and not plan.torch and not plan.philox_in_torch

    # ------------------------------------------------------------ the Perturbation contract
    def add_(self, param: Tensor, index: int, terms: Sequence[Term]) -> None:
        self.add_each_([(index, param)], terms, ())

    def add_each_(self, params, terms, scaled) -> None:
        terms = merge_terms([*terms, *scaled])  # κ = 1
        if not terms:
            return
        if self._deferred is not None:
            pending = self._deferred
            for _, p in params:
                if id(p) in pending:
                    pending[id(p)] = merge_terms([*pending[id(p)], *terms])
            params = [(index, p) for index, p in params if id(p) not in pending]
        plan = self._plan(params)
        if (plan.torch or plan.philox_in_torch) and any(isinstance(alpha, Tensor) for alpha, _ in terms):
            raise ValueError("coefficients on the GPU serve the fused kernel's passes only (see all_fused)")
        for index, flat in plan.torch:
            self._torch_add(flat, index, terms)
        keyed = [(alpha, self.philox_key(key)) for alpha, key in terms]
        if plan.philox_in_torch:
            self._philox_torch_add(plan.philox_in_torch, keyed)
        for tables in plan.kernel_groups:
            self._fused.add_(tables, keyed)

    def coordinates(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        return self.coordinates_each([(index, param)], terms)[0]

    def add_coordinates_(self, param: Tensor, index: int, coords: Tensor, alpha: float, key: DrawKey) -> None:
        self.add_coordinates_each_([(index, param)], [coords], alpha)

    def coordinates_each(self, params: Sequence[tuple[int, Tensor]], terms: Sequence[Term]) -> list[Tensor]:
        """:meth:`coordinates` of many parameters at once: one pass over all of them (fresh tensors: their
        plan is not kept)."""
        out = [_zero_coordinates(p) for _, p in params]
        self.add_each_([(index, o) for (index, _), o in zip(params, out)], terms, ())
        return out

    def add_coordinates_each_(self, params: Sequence[tuple[int, Tensor]], coords: Sequence[Tensor],
                              alpha: float) -> None:
        """``param += alpha * coords`` for every parameter, in multi-tensor kernels."""
        if self._deferred is not None and any(id(p) in self._deferred for _, p in params):
            raise ValueError("offloaded parameters take SGD updates only in this version (mezo, adazeta)")
        torch._foreach_add_([p for _, p in params], [c.to(p.dtype) for (_, p), c in zip(params, coords)], alpha=alpha)

    def scratch_numel(self) -> int:
        return sum(buf.numel() for buf in self._scratch.values())

    # ------------------------------------------------------------ which tensors go where
    def _plan(self, params: Sequence[tuple[int, Tensor]]) -> "_Plan":
        """How a pass over ``params`` runs: which tensors the torch generator serves, which the Philox
        stream in torch, and the kernel's launch tables per (device, dtype). Kept per parameter list
        (a pass over the same weights is planned once), unless the list is a one-off."""
        # Keyed by the tensors, and valid while they keep their storage (the kernel's tables hold its
        # addresses). Every pass looks its plan up, and on a GPU the host's time before a step's first pass
        # and between its losses' read-back and its update pass is time the device waits: so C-level maps
        # over the list (0.17 µs a tensor on this project's CPU, against 0.30 µs for a Python loop).
        tensors = [p for _, p in params]
        key = tuple(map(id, tensors))
        plan = self._plans.get(key)
        if plan is not None and plan.addresses == _addresses(tensors, plan.sharded):
            return plan
        shards = [local_shard(p) for _, p in params]  # (flat local tensor, the parameter element it starts at)
        sharded = any(map(is_sharded, tensors))
        plan = _Plan([], [], [], _addresses(tensors, sharded), sharded)
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor, int]]] = {}
        for (index, p), (flat, base) in zip(params, shards):
            if not self.uses_philox(p):
                plan.torch.append((index, flat))
            elif self._kernel_for(flat) is not None:
                groups.setdefault((flat.device, flat.dtype), []).append((index, flat, base))
            else:
                plan.philox_in_torch.append((index, flat, base))
        plan.kernel_groups = [self._fused.tables([(i, t) for i, t, _ in group], [b for _, _, b in group])
                              for group in groups.values()]
        if all(isinstance(p, nn.Parameter) for _, p in params):  # the optimizer's weights: passes repeat
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------ philox
    def _philox_torch_add(self, entries: Sequence[tuple[int, Tensor, int]], keyed: Sequence[tuple[float, int]]
                          ) -> None:
        """Σ α_k Z_k into every ``(index, flat, base)`` from the pure-torch Philox stream, in batches of up to
        a chunk's worth of elements: a large tensor in several, small ones together, so that a pass over a
        model's many small tensors evaluates the stream once per term, not once per tensor and term.
        Accumulated in float32 (float64 for float64) and rounded once, as the kernel does."""
        for batch in self._philox_batches(entries):
            device = batch[0][1].device
            totals = [piece.to(torch.promote_types(piece.dtype, torch.float32)) for _, piece, _ in batch]
            for alpha, seed in keyed:
                zs = philox.normals_each(seed, [(index, base, piece.numel()) for index, piece, base in batch], device)
                torch._foreach_add_(totals, [z.to(total.dtype) for z, total in zip(zs, totals)], alpha=alpha)
            for (_, piece, _), total in zip(batch, totals):
                if total is not piece:
                    piece.copy_(total)

    def _philox_batches(self, entries: Sequence[tuple[int, Tensor, int]]):
        """Lists of ``(index, piece, the parameter element it starts at)``, one device each, each holding up
        to a chunk's worth of elements (whole blocks of the stream) and no piece longer than that."""
        batches: dict[torch.device, list] = {}  # device -> the pieces of its open batch
        filled: dict[torch.device, int] = {}  # device -> the elements they hold
        for index, flat, base in entries:
            device = flat.device
            size = max(self._chunk_numel(device) // philox.BLOCK, 1) * philox.BLOCK
            for start in range(0, flat.numel(), size):
                piece = flat[start:start + size]
                if device in batches and filled[device] + piece.numel() > size:
                    yield batches.pop(device)
                if device not in batches:
                    batches[device], filled[device] = [], 0
                batches[device].append((index, piece, base + start))
                filled[device] += piece.numel()
        yield from batches.values()

    # ------------------------------------------------------------ torch.Generator
    def _chunk_numel(self, device: torch.device) -> int:
        if self.chunk_numel is not None:
            return self.chunk_numel
        return 1 << 22 if device.type == "cpu" else 1 << 26

    def _chunks(self, flat: Tensor):
        size = self._chunk_numel(flat.device)
        for chunk_index, start in enumerate(range(0, flat.numel(), size)):
            yield chunk_index, flat[start : start + size]

    def _draw(self, like: Tensor, index: int, key: DrawKey, chunk_index: int) -> Tensor:
        """The chunk ``chunk_index`` of Z(key) for parameter ``index``, shaped like ``like``
        (a flat view), in a scratch buffer that the next draw overwrites."""
        slot = (like.device, like.dtype)
        buf = self._scratch.get(slot)
        if buf is None or buf.numel() < like.numel():  # like.numel() <= chunk_numel
            buf = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
            self._scratch[slot] = buf
        gen = self._generators.seeded(like.device, key.run_seed, key.step, key.query, index, chunk_index)
        return buf[: like.numel()].normal_(generator=gen)

    def _torch_add(self, flat: Tensor, index: int, terms: Sequence[Term]) -> None:
        for chunk_index, chunk in self._chunks(flat):
            for alpha, key in terms:
                chunk.add_(self._draw(chunk, index, key, chunk_index), alpha=alpha)


def _zero_coordinates(param: Tensor) -> Tensor:
    """Zeros shaped like ``param`` in float32 at least (half-precision moments underflow; float64 kept);
    of a sharded parameter, sharded like it (the rule's moments are then sharded too)."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    if not is_sharded(param):
        return torch.zeros(param.shape, device=param.device, dtype=dtype)
    from torch.distributed.tensor import DTensor

    local = torch.zeros(param.to_local().shape, device=param.device, dtype=dtype)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


@dataclass
class _Plan:
    torch: list  # (index, flat tensor) drawn with torch.Generator chunks
    philox_in_torch: list  # (index, flat tensor, base) drawn from the Philox stream by torch ops
    kernel_groups: list  # launch tables of the fused kernel, one per (device, dtype)
    addresses: list  # each tensor's storage address (a shard's local one) when the plan was made
    sharded: bool  # any DTensor among them (their addresses take the slower to_local())


def _addresses(tensors: Sequence[Tensor], sharded: bool) -> list[int]:
    if sharded:
        return [(p.to_local() if is_sharded(p) else p).data_ptr() for p in tensors]
    return list(map(Tensor.data_ptr, tensors))


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
