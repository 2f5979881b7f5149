"""Matrix-factored perturbations: LOZO's U Vᵀ and TeZO's U diag(τ) Vᵀ.

Every parameter with two or more dimensions is treated as a matrix W ∈ R^{m×n}
(m = size(0), n = the other dimensions flattened), as LOZO's code does (embeddings included).
One-dimensional parameters (norms, biases) get dense Gaussian directions.

A matrix direction is always applied as ``W.addmm_(L, Rᵀ)`` with thin factors: no m×n
temporary is ever formed. A list of terms Σ_k α_k Z_k folds into one product of rank
r·K (LOZO) or r (TeZO, whose terms share U and V).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .perturbations import DrawKey, Gaussian, Perturbation, Term, merge_terms
from .seeding import DeviceGenerators

# Domain tags keep the factor streams apart from each other and from Gaussian chunks.
_TAG_U, _TAG_V, _TAG_TAU, _TAG_CP_U, _TAG_CP_V = 101, 102, 103, 104, 105


def as_matrix(param: Tensor) -> Tensor:
    return param.view(param.shape[0], -1)


class _Factored(Perturbation):
    """Shared machinery; subclasses say how the factors of one term are drawn."""

    def __init__(self, scale: float, chunk_numel: int | None) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.kappa = float(scale)
        self.dense = Gaussian(chunk_numel)
        self._generators = DeviceGenerators()

    def _randn(self, shape: tuple[int, ...], like: Tensor, *address: int) -> Tensor:
        gen = self._generators.seeded(like.device, *address)
        return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)

    # Subclasses provide: _left_right(param, index, terms) -> (L (m, k), R (n, k)) with Σ α Z = L Rᵀ;
    # _coords(param, index, terms); _expand(param, index, coords, key) -> (L, R).

    def add_(self, param: Tensor, index: int, terms: Sequence[Term]) -> None:
        terms = merge_terms(terms)
        if not terms:
            return
        if param.dim() < 2:
            return self.dense.add_(param, index, terms)
        left, right = self._left_right(param, index, terms)
        as_matrix(param).addmm_(left, right.T)

    def coordinates(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        if param.dim() < 2:
            return self.dense.coordinates(param, index, terms)
        return self._coords(param, index, terms).to(torch.promote_types(param.dtype, torch.float32))

    def add_coordinates_(self, param: Tensor, index: int, coords: Tensor, alpha: float, key: DrawKey) -> None:
        if param.dim() < 2:
            return self.dense.add_coordinates_(param, index, coords, alpha, key)
        left, right = self._expand(param, index, coords.to(param.dtype), key)
        as_matrix(param).addmm_(left, right.T, alpha=alpha)

    def scale(self, param: Tensor) -> float:
        return self.kappa if param.dim() >= 2 else 1.0

    def slice_factors(self, param: Tensor, index: int, points: Sequence[Term]) -> tuple[Tensor, Tensor]:
        """Per-point factors for the virtual path: ``(L (S, m, r), R (n, r))`` with offset_s Z_s = L_s Rᵀ.

        All points belong to one step, so they share R. Each query's factors are drawn once and
        scaled for each of its points (±ε).
        """
        unit: dict[DrawKey, tuple[Tensor, Tensor]] = {}  # key -> (L, R) of Z(key) itself
        lefts, right = [], None
        for offset, key in points:
            if key not in unit:
                unit[key] = self._left_right(param, index, [(1.0, key)])
            left, right = unit[key]
            lefts.append(left * offset)
        return torch.stack(lefts), right


class LowRank(_Factored):
    """LOZO (Chen et al., *Enhancing Zeroth-Order Fine-Tuning for Language Models with
    Low-Rank Structures*, ICLR 2025): Z = U Vᵀ per matrix, U ∈ R^{m×r} fresh every step and
    query, V ∈ R^{n×r} drawn once per window of ``nu`` steps.

    V comes from its own stream (run seed, window, parameter), so the U of an update is always
    the U of its measurement (the reference code draws V from the same stream as U on window
    starts, shifting every later U). V is regenerated, not stored: O(n r) RNG per use.

    Args:
        rank: r.
        nu: ν, steps per V window.
        scale: κ in ĝ = κ g U Vᵀ. 1 (default) matches the official code and its learning
            rates; 1/r makes the estimator unbiased over fresh U and V.
    Coordinates of a matrix are U-space: ĝ = (κ Σ_i g_i/q U_i) Vᵀ, an m×r matrix.
    """

    def __init__(self, rank: int = 2, nu: int = 50, scale: float = 1.0, chunk_numel: int | None = None) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if int(nu) != nu or nu < 1:
            raise ValueError(f"nu must be a positive integer, got {nu}")
        super().__init__(scale, chunk_numel)
        self.rank, self.nu = int(rank), int(nu)
        self.changes_basis = True  # V changes every nu steps: moments must be re-projected
        self._v_cache: dict[int, tuple[int, int, Tensor]] = {}  # index -> (seed, window, V)

    def persistent_numel(self) -> int:
        return sum(v.numel() for _, _, v in self._v_cache.values())

    def window(self, step: int) -> int:
        return step // self.nu

    def u(self, param: Tensor, index: int, key: DrawKey) -> Tensor:
        return self._randn((param.shape[0], self.rank), param, key.run_seed, _TAG_U, key.step, key.query, index)

    def v(self, param: Tensor, index: int, run_seed: int, window: int) -> Tensor:
        cached = self._v_cache.get(index)
        if cached is not None and cached[:2] == (run_seed, window) and cached[2].dtype == param.dtype:
            return cached[2]
        v = self._randn((as_matrix(param).shape[1], self.rank), param, run_seed, _TAG_V, window, index)
        self._v_cache[index] = (run_seed, window, v)
        return v

    def _left_right(self, param, index, terms):
        lefts = [self.u(param, index, key).mul_(alpha) for alpha, key in terms]
        rights = [self.v(param, index, key.run_seed, self.window(key.step)) for _, key in terms]
        if len(terms) == 1:  # the common case: no concatenation (a copy) needed
            return lefts[0], rights[0]
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=1)

    def _coords(self, param, index, terms):
        windows = {self.window(key.step) for _, key in terms}
        assert len(windows) == 1, "coordinates of one call must share a V window"
        return sum(self.u(param, index, key) * alpha for alpha, key in terms)

    def _expand(self, param, index, coords, key):
        return coords, self.v(param, index, key.run_seed, self.window(key.step))

    def transport(self, coords: Tensor, param: Tensor, index: int, old: DrawKey, new: DrawKey) -> Tensor:
        """LOZO-M's projection N ← N (V_oldᵀ V_new) / n onto the new window's row space."""
        if param.dim() < 2 or self.window(old.step) == self.window(new.step):
            return coords
        v_old = self.v(param, index, old.run_seed, self.window(old.step)).to(coords.dtype)
        v_new = self.v(param, index, new.run_seed, self.window(new.step)).to(coords.dtype)
        return coords @ (v_old.T @ v_new) / v_new.shape[0]
