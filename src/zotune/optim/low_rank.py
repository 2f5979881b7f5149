"""LOZO's perturbation: Z = U Vᵀ per matrix, U fresh every step and query, V drawn once per window."""

from __future__ import annotations

import torch
from torch import Tensor

from .factored import _TAG_V, _Factored
from .perturbations import DrawKey
from .shards import matrix_shape


class LowRank(_Factored):
    """LOZO (Chen et al., *Enhancing Zeroth-Order Fine-Tuning for Language Models with
    Low-Rank Structures*, ICLR 2025): Z = U Vᵀ per matrix, U ∈ R^{m×r} fresh every step and
    query, V ∈ R^{n×r} drawn once per window of ``nu`` steps.

    V comes from its own stream (run seed, window, parameter), so the U of an update is always
    the U of its measurement (the reference code draws V from the same stream as U on window
    starts, shifting every later U). V is cached for its window (Σ n r numbers).

    Args:
        rank: r.
        nu: ν, steps per V window.
        scale: κ in ĝ = κ g U Vᵀ. 1 (default) matches the official code and its learning
            rates; 1/r makes the estimator unbiased over fresh U and V.
        unit_variance: draw V scaled by 1/√r, so that Z = U Vᵀ has E[Z_ij²] = 1 like MeZO's
            directions and MeZO's learning rates are a safe start (default); False is the
            official code's raw U Vᵀ (E[Z_ij²] = r), which its published learning rates assume.
    Coordinates of a matrix are U-space: ĝ = (κ Σ_i g_i/q U_i) Vᵀ, an m×r matrix.
    """

    def __init__(self, rank: int = 2, nu: int = 50, scale: float = 1.0, unit_variance: bool = True) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if int(nu) != nu or nu < 1:
            raise ValueError(f"nu must be a positive integer, got {nu}")
        super().__init__(scale, unit_variance)
        self.rank, self.nu = int(rank), int(nu)
        self.changes_basis = True  # V changes every nu steps: moments must be re-projected
        self._v_cache: dict[int, tuple[int, int, Tensor, Tensor]] = {}  # index -> (seed, window, V, Vᵀ)

    def persistent_numel(self) -> int:
        return sum(v.numel() for _, _, v, _ in self._v_cache.values())

    def window(self, step: int) -> int:
        return step // self.nu

    def _fresh_shape(self, param, index):
        # U is drawn as Uᵀ (r, m): each copy's factor is then one contiguous block of the draw,
        # and a Linear's bias z (m,), next in the layout, extends it to [Uᵀ; zᵀ] (see virtual.py).
        return (self.rank, param.shape[0]) if param.dim() >= 2 else super()._fresh_shape(param, index)

    def u(self, param: Tensor, index: int, key: DrawKey) -> Tensor:
        """U (m, r) of query ``key`` (a copy)."""
        return self._fresh(param, index, key, transposed=True).clone()

    def v(self, param: Tensor, index: int, run_seed: int, window: int) -> Tensor:
        return self._v_and_t(param, index, run_seed, window)[0]

    def _v_and_t(self, param: Tensor, index: int, run_seed: int, window: int) -> tuple[Tensor, Tensor]:
        cached = self._v_cache.get(index)
        if cached is not None and cached[:2] == (run_seed, window) and cached[2].dtype == param.dtype:
            return cached[2], cached[3]
        v = self._randn((matrix_shape(param)[1], self.rank), param.device, param.dtype,
                        run_seed, _TAG_V, window, index)
        if self.unit_variance:
            v.mul_(self._right_scale(self.rank))
        self._v_cache[index] = (run_seed, window, v, v.T)
        return v, v.T

    def _right(self, param, index, key):
        return self._v_and_t(param, index, key.run_seed, self.window(key.step))[0]

    def _right_t(self, param, index, key):
        return self._v_and_t(param, index, key.run_seed, self.window(key.step))[1]

    def _left_right(self, param, index, terms):
        if len(terms) == 1:  # the common case: U Vᵀ scaled by α inside addmm_
            alpha, key = terms[0]
            return self._fresh(param, index, key, transposed=True), self._right_t(param, index, key), alpha
        if len({self.window(key.step) for _, key in terms}) == 1:  # one V: Σ α_k U_k Vᵀ = (Σ α_k U_k) Vᵀ
            return self._matrix_coords(param, index, terms), self._right_t(param, index, terms[0][1]), 1.0
        lefts = [self._fresh(param, index, key, transposed=True) * alpha for alpha, key in terms]
        rights = [self._right(param, index, key) for _, key in terms]
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=1).T, 1.0

    def _matrix_coords(self, param, index, terms):
        windows = {self.window(key.step) for _, key in terms}
        assert len(windows) == 1, "coordinates of one call must share a V window"
        return sum(self._fresh(param, index, key, transposed=True) * alpha for alpha, key in terms)

    def _expand(self, param, index, coords, key):
        return coords, self._right(param, index, key)

    def _point_left_t(self, param, index, fresh, key):
        return fresh  # (S, r, m): offset_s U_sᵀ, drawn transposed

    def _reuse_key(self, points):
        key = points[0][1]
        return key.run_seed, self.window(key.step)  # U views are fixed; V changes with the window

    def transport(self, coords: Tensor, param: Tensor, index: int, old: DrawKey, new: DrawKey) -> Tensor:
        """LOZO-M's projection N ← N (V_oldᵀ V_new) / n onto the new window's row space (V unscaled: with
        unit variance the drawn V are V/√r, so the product is divided by n/r)."""
        if param.dim() < 2 or self.window(old.step) == self.window(new.step):
            return coords
        v_old = self.v(param, index, old.run_seed, self.window(old.step)).to(coords.dtype)
        v_new = self.v(param, index, new.run_seed, self.window(new.step)).to(coords.dtype)
        return coords @ (v_old.T @ v_new) / (v_new.shape[0] * self._right_scale(self.rank) ** 2)
