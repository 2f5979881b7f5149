"""Perturbation directions Z and how to apply them.

A perturbation regenerates its direction ``Z`` for one parameter from a :class:`DrawKey`
and the parameter's index; it never stores Z. The optimizer only talks to it through the
:class:`Perturbation` contract below, which is what lets the low-rank and tensor
perturbations plug into the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from .seeding import DeviceGenerators


@dataclass(frozen=True)
class DrawKey:
    """Address of one query's direction: ``Z`` for parameter ``p`` is a function of (key, p)."""

    run_seed: int
    step: int
    query: int


# One term of a linear combination  sum_k alpha_k * Z(key_k).
Term = tuple[float, DrawKey]


def merge_terms(terms: Sequence[Term]) -> list[Term]:
    """Sum the coefficients of equal keys and drop zeros: each direction is drawn once.

    (The update pass of a one-query step is restore + update of the same key: one draw, not two.)
    """
    merged: dict[DrawKey, float] = {}
    for alpha, key in terms:
        merged[key] = merged.get(key, 0.0) + alpha
    return [(alpha, key) for key, alpha in merged.items() if alpha != 0.0]


class Perturbation(ABC):
    """What the optimizer needs from a family of directions: three methods to write, the rest
    have defaults that fit a perturbation with one fixed basis and nothing to save."""

    #: True when the coordinates' basis changes between steps (LOZO's V windows): moments must
    #: then be carried over with :meth:`transport`.
    changes_basis: bool = False

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

    Z is drawn in the parameter's dtype and device, in flat chunks, each chunk from its own
    counter-based seed. The transient memory of a perturbation pass is therefore one chunk,
    not one copy of the largest parameter as in the reference implementation. Chunks hold
    ``chunk_numel`` elements: by default 2²² on the CPU (16 MiB in float32) and 2²⁶ on a GPU
    (128 MiB in float16; fewer, larger draws keep the launch overhead off the critical path).
    Z depends on the chunk size, so a run must be resumed with the same one.

    Coordinates are the full-size tensor (so moments are full-size, as in MeZO-Adam).
    """

    def __init__(self, chunk_numel: int | None = None) -> None:
        if chunk_numel is not None and chunk_numel < 1:
            raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
        self.chunk_numel = chunk_numel
        self._generators = DeviceGenerators()
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

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

    @staticmethod
    def _flat(param: Tensor) -> Tensor:
        if not param.is_contiguous():
            raise ValueError("Gaussian perturbation needs contiguous parameters")
        return param.view(-1)

    def add_(self, param: Tensor, index: int, terms: Sequence[Term]) -> None:
        terms = merge_terms(terms)
        if not terms:
            return
        for chunk_index, chunk in self._chunks(self._flat(param)):
            for alpha, key in terms:
                chunk.add_(self._draw(chunk, index, key, chunk_index), alpha=alpha)

    def coordinates(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        # float32 at least (half-precision moments underflow), float64 kept as is.
        out = torch.zeros(param.shape, device=param.device, dtype=torch.promote_types(param.dtype, torch.float32))
        out_flat = out.view(-1)
        size = self._chunk_numel(param.device)
        for chunk_index, chunk in self._chunks(self._flat(param)):
            start = chunk_index * size
            target = out_flat[start : start + chunk.numel()]
            for alpha, key in terms:
                target.add_(self._draw(chunk, index, key, chunk_index), alpha=alpha)
        return out

    def add_coordinates_(self, param: Tensor, index: int, coords: Tensor, alpha: float, key: DrawKey) -> None:
        param.add_(coords.to(param.dtype), alpha=alpha)

    def scratch_numel(self) -> int:
        return sum(buf.numel() for buf in self._scratch.values())
