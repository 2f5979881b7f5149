"""TeZO's perturbation: a CP decomposition of the perturbations across time.

Sun, Huang, Ding, Shen, Tao, *TeZO: Empowering the Low-Rankness on the Temporal Dimension in
the Zeroth-Order Optimization for Fine-tuning LLMs* (arXiv 2501.19057).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factored import _TAG_CP_U, _TAG_CP_V, _Factored, _held, as_matrix
from .shards import held, is_sharded, matrix_shape
from .perturbations import DrawKey


class TemporalCP(_Factored):
    """Z_t = U diag(τ_t) Vᵀ per matrix: U ∈ R^{m×r}, V ∈ R^{n×r} drawn once for the whole run,
    τ_t ~ N(0, I_r) drawn every step and query.

    Every update of a matrix stays in span(U) x span(V), and the moments of TeZO-m / TeZO-Adam
    are r-vectors: Σ_k c_k U diag(τ_k) Vᵀ = U diag(Σ_k c_k τ_k) Vᵀ, so the coordinates of a
    matrix are the r-vector Σ_k α_k τ_k. U and V are generated from (run seed, parameter) and
    cached (Σ (m + n) r numbers, as in the paper's memory count).

    Args:
        rank: r for every matrix, or ``"auto"`` for a rank per matrix chosen once from the
            initial weights: r_l = clip(#{i : σ_i ≥ r_th σ_1}, 1, r_max), σ the singular values
            of W_l. The paper's own rule (its Eq. 5-6) was not published in reproducible form;
            this stand-in keeps more directions for matrices whose spectrum decays slowly.
        r_th, r_max: threshold and cap of the ``"auto"`` rule.
        scale: κ in ĝ = κ g Z (1 by default; 1/r makes the estimator unbiased over the initial
            draw of U and V).
        unit_variance: draw V scaled by 1/√r_l, so that E[Z_ij²] = 1 like MeZO's directions
            (default); False is the raw U diag(τ) Vᵀ (E[Z_ij²] = r_l) of the paper.
    """

    def __init__(self, rank: int | str = 32, r_th: float = 0.5, r_max: int = 64, scale: float = 1.0,
                 unit_variance: bool = True) -> None:
        if rank != "auto" and (int(rank) != rank or rank < 1):
            raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}")
        if not 0.0 < r_th <= 1.0 or r_max < 1:
            raise ValueError(f"need 0 < r_th <= 1 and r_max >= 1, got r_th={r_th}, r_max={r_max}")
        super().__init__(scale, unit_variance)
        self.rank, self.r_th, self.r_max = rank, float(r_th), int(r_max)
        self.ranks: dict[int, int] = {}  # parameter index -> r_l (part of the state: chosen once)
        self._factors: dict[int, tuple[int, Tensor, Tensor]] = {}  # index -> (seed, U, V)

    def prepare(self, params) -> None:
        params = list(params)
        for index, p in params:
            if p.dim() >= 2:
                self._rank_of(p, index)
        super().prepare(params)  # the per-query draw holds each matrix's τ

    def _rank_of(self, param: Tensor, index: int) -> int:
        """r_l of a matrix, chosen on first sight (an SVD for ``rank="auto"``) and kept."""
        if index not in self.ranks:
            whole = param.full_tensor() if is_sharded(param) and self.rank == "auto" else param  # the SVD's input
            self.ranks[index] = self._choose_rank(whole, matrix_shape(param))
        return self.ranks[index]

    def _choose_rank(self, param: Tensor, shape: tuple[int, int]) -> int:
        if self.rank == "auto":
            sigma = torch.linalg.svdvals(as_matrix(param.detach()).float())
            chosen = int((sigma >= self.r_th * sigma[0]).sum())
            return max(1, min(chosen, self.r_max, *shape))
        return min(int(self.rank), *shape)

    def persistent_numel(self) -> int:
        return sum(u.numel() + v.numel() for _, u, v in self._factors.values())

    def state_dict(self) -> dict:
        return {"ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict) -> None:
        self.ranks = {int(k): int(v) for k, v in state.get("ranks", {}).items()}
        self._factors.clear()
        self._build_layout()  # the saved ranks size each matrix's τ

    def factors(self, param: Tensor, index: int, run_seed: int) -> tuple[Tensor, Tensor]:
        cached = self._factors.get(index)
        if cached is not None and cached[0] == run_seed and cached[1].dtype == param.dtype:
            return cached[1], cached[2]
        m, n = matrix_shape(param)
        r = self._rank_of(param, index)
        u = self._randn((m, r), param.device, param.dtype, run_seed, _TAG_CP_U, index)
        v = self._randn((n, r), param.device, param.dtype, run_seed, _TAG_CP_V, index)
        if self.unit_variance:
            v.mul_(self._right_scale(r))
        self._factors[index] = (run_seed, u, v)
        return u, v

    def _fresh_shape(self, param, index):
        if param.dim() < 2:
            return super()._fresh_shape(param, index)
        return (self._rank_of(param, index),)

    def tau(self, param: Tensor, index: int, key: DrawKey) -> Tensor:
        """τ (r,) of query ``key`` (a copy)."""
        return self._fresh(param, index, key).clone()

    def _matrix_coords(self, param, index, terms):
        return sum(self._fresh(param, index, key) * alpha for alpha, key in terms)

    def _left_right(self, param, index, terms):
        u, v = self.factors(param, index, terms[0][1].run_seed)
        if len(terms) == 1:  # α U diag(τ) Vᵀ: α rides in the addmm_ (two kernels a matrix, not four)
            alpha, key = terms[0]
            return u * self._fresh(param, index, key), v.T, alpha
        return u * self._matrix_coords(param, index, terms), v.T, 1.0  # (m, r) ⊙ (r,) broadcasts over rows

    def _right(self, param, index, key):
        return self.factors(param, index, key.run_seed)[1]

    def _point_left_t(self, param, index, fresh, key):
        u, _ = self.factors(param, index, key.run_seed)
        return u.T * fresh.unsqueeze(2)  # (r, m) ⊙ (S, r, 1) -> (S, r, m): offset_s (U diag(τ_s))ᵀ

    def _point_reuse_key(self, points):
        # U and V belong to the run: the virtual path's factors are kept and only their
        # U diag(τ_s) parts recomputed, so its hooks too are built once per run.
        return points[0][1].run_seed

    def _refresh_point_factors(self, params, points, views, factors):
        run_seed = points[0][1].run_seed
        for index, p in params:
            if p.dim() >= 2:
                u, _ = self.factors(p, index, run_seed)
                torch.mul(u.T, views[index].unsqueeze(2), out=factors[index][0])  # this call's τ_s

    def _expand(self, param, index, coords, key):
        u, v = self.factors(param, index, key.run_seed)
        return u * coords, v

    def transport(self, coords: Tensor, param: Tensor, index: int, old: DrawKey, new: DrawKey) -> Tensor:
        return coords  # U and V never change: no re-projection, ever

    def expand_dense(self, param: Tensor, index: int, coords: Tensor, key: DrawKey, squared: bool = False) -> Tensor:
        """The m×n matrix U diag(c) Vᵀ, or (U∘U) diag(c) (V∘V)ᵀ with ``squared`` (TeZO-Adam), shaped like the
        parameter; of a sharded parameter, the rows this process holds (shaped like its shard)."""
        u, v = self.factors(param, index, key.run_seed)
        u, v = u.to(coords.dtype), v.to(coords.dtype)
        u = _held(param, u)[1]  # of a shard: its rows
        if squared:
            u, v = u * u, v * v
        return ((u * coords) @ v.T).view(held(param).shape)
