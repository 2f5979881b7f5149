"""Matrix-factored perturbations, the machinery LOZO's U Vᵀ (``low_rank.py``) and TeZO's
U diag(τ) Vᵀ (``temporal_cp.py``) share.

Every parameter with two or more dimensions is treated as a matrix W ∈ R^{m×n}
(m = size(0), n = the other dimensions flattened), as LOZO's code does (embeddings included).
One-dimensional parameters (norms, biases) get dense Gaussian directions.

A matrix direction is always applied as ``W.addmm_(L, Rᵀ)`` with thin factors: no m×n
temporary is ever formed. A list of terms Σ_k α_k Z_k of one V window folds into one
product of rank r.

The numbers a query draws fresh (LOZO's U, TeZO's τ, the dense z of a 1-D parameter) are
drawn for all parameters at once: one ``randn`` per (device, dtype) group and query, laid
out in parameter-index order when the optimizer calls :meth:`prepare`, each parameter
reading its slice. A step then costs a handful of RNG launches instead of one per
parameter, which is what bounds small and medium models on a GPU. The draws are still a
pure function of (run seed, step, query, parameter layout): resume and replay regenerate
them exactly. A parameter outside the prepared layout draws its own numbers.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor

from abc import abstractmethod

from .perturbations import DrawKey, FactoredPerturbation, Term, merge_terms
from .seeding import DeviceGenerators
from .shards import held, is_sharded, local_part

# Domain tags keep the streams apart from each other and from Gaussian chunks.
_TAG_V, _TAG_CP_U, _TAG_CP_V, _TAG_FRESH, _TAG_PACK = 102, 104, 105, 106, 107


def as_matrix(param: Tensor) -> Tensor:
    return param.view(param.shape[0], -1)


def _held(param: Tensor, left: Tensor) -> tuple[Tensor, Tensor]:
    """(what this process holds of ``param``, as a matrix for 2-D and more; the rows of ``left`` that go
    with it). Sharded (FSDP2, rows split over the ranks): Z's rows [a, a+h) are L[a:a+h] Rᵀ, so each
    rank slices the left factor (or a 1-D z) drawn for the whole parameter and the update equals the
    unsharded one's rows."""
    if not is_sharded(param):
        return (param if param.dim() < 3 else as_matrix(param)), left
    local, first, rows = local_part(param)
    return (local if local.dim() < 3 else local.view(rows, -1)), left[first:first + rows]


def _kernel_groups(matrices: list, tiles: dict) -> tuple[list, list]:
    """([(the low-rank kernel's tables, their (matrix, L, Rᵀ))], one per (device, dtype, rank) group of the CUDA
    matrices it takes; the other (matrix, L, Rᵀ), left to ``addmm_``). ``tiles``: the kernel's tile tables
    by (device, shapes), kept by the caller across calls and filled here."""
    from .perturbations import _triton_installed

    if not any(matrix.is_cuda for matrix, _, _ in matrices) or not _triton_installed():
        return [], matrices
    from . import lowrank_kernel

    groups: dict[tuple, list] = {}
    rest = []
    for triple in matrices:
        if triple[0].is_cuda and lowrank_kernel.supports(*triple):
            groups.setdefault((triple[0].device, triple[0].dtype, triple[1].shape[1]), []).append(triple)
        else:
            rest.append(triple)
    kernel_groups = []
    for (device, _, _), group in groups.items():
        shapes = tuple(tuple(w.shape) for w, _, _ in group)
        if (device, shapes) not in tiles:
            tiles[device, shapes] = lowrank_kernel.tile_tables(shapes, device)
        kernel_groups.append((lowrank_kernel.tables(group, tiles[device, shapes]), group))
    return kernel_groups, rest


class _Factored(FactoredPerturbation):
    """Shared machinery; subclasses say what a query draws fresh and how it becomes factors."""

    def __init__(self, scale: float, unit_variance: bool) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.kappa = float(scale)
        self.unit_variance = bool(unit_variance)
        self._generators = DeviceGenerators()
        self._prepared: list[tuple[int, Tensor]] = []  # the parameters the per-query draw covers
        # index -> (group, start, shape) in the per-query draw; group = (device, dtype)
        self._layout: dict[int, tuple[tuple[torch.device, torch.dtype], int, tuple[int, ...]]] = {}
        self._groups: dict[tuple[torch.device, torch.dtype], tuple[int, int]] = {}  # group -> (first index, numel)
        # Buffers refilled in place, so that views into them are made once: a step's Python work
        # does not grow with the number of parameters. A view is valid until its query's next draw.
        self._packs: dict[tuple[int, tuple], Tensor] = {}  # (query, group) -> flat draw
        self._packs_of: dict[tuple[int, tuple], tuple[int, int]] = {}  # (query, group) -> (run seed, step) held
        self._views: dict[tuple[int, int, bool], Tensor] = {}  # (query, index, transposed) -> view of the pack
        self._points: dict[int, tuple[dict, dict]] = {}  # S -> ({group: (S, numel)}, {index: (S, *shape) view})
        self._offsets: dict[tuple, Tensor] = {}  # (offsets, device, dtype) -> (S, 1) tensor
        self._last_factors: dict[int, tuple] = {}  # S -> (reuse key, params, factors, data pointers) of the last call
        # (params, query) -> (reuse key, groups, one-direction plan, the parameters' storage addresses)
        self._plans: dict[tuple, tuple] = {}
        # (device, matrix shapes) -> the low-rank kernel's tile tables: they outlive the plans, which a
        # new V window rebuilds (3.3 million tiles at the 7B shape)
        self._tiles: dict[tuple, tuple] = {}
        self._kernel_works = True  # False once the low-rank kernel failed to build here (then addmm_)

    def _randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, *address: int) -> Tensor:
        gen = self._generators.seeded(device, *address)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    # ------------------------------------------------------------ what a subclass defines
    # (for matrices; 1-D parameters are handled here). `_fresh_shape` too, for matrices.
    @abstractmethod
    def _left_right(self, param: Tensor, index: int, terms: Sequence[Term]) -> tuple[Tensor, Tensor, float]:
        """(L (m, k), Rᵀ (k, n), α) with Σ_k α_k Z_k = α L Rᵀ: one ``addmm_`` applies the terms."""

    @abstractmethod
    def _matrix_coords(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        """Σ_k α_k Z_k in the perturbation's coordinates (LOZO: m×r; TeZO: an r-vector)."""

    @abstractmethod
    def _expand(self, param: Tensor, index: int, coords: Tensor, key: DrawKey) -> tuple[Tensor, Tensor]:
        """(L (m, k), R (n, k)) with expand(coords) = L Rᵀ in the basis of ``key``'s step."""

    @abstractmethod
    def _point_left_t(self, param: Tensor, index: int, fresh: Tensor, key: DrawKey) -> Tensor:
        """Lᵀ (S, r, m) from the points' scaled fresh numbers ``fresh`` (S, *fresh shape)."""

    @abstractmethod
    def _right(self, param: Tensor, index: int, key: DrawKey) -> Tensor:
        """R (n, r) of ``key``'s step."""

    # ------------------------------------------------------------ fresh numbers of a query
    def prepare(self, params) -> None:
        """Lay out the per-query draw over ``params`` (once: the optimizer's first call fixes it)."""
        if not self._prepared:
            self._prepared = sorted(params, key=lambda item: item[0])
            self._build_layout()

    def _build_layout(self) -> None:
        for cache in (self._layout, self._groups, self._packs, self._packs_of, self._views, self._points,
                      self._last_factors, self._plans, self._tiles):
            cache.clear()
        for index, p in self._prepared:
            group = (p.device, p.dtype)
            first, start = self._groups.get(group, (index, 0))
            shape = self._fresh_shape(p, index)
            self._layout[index] = (group, start, shape)
            self._groups[group] = (first, start + math.prod(shape))

    def _pack(self, key: DrawKey, group) -> Tensor:
        """Query ``key``'s draw for one (device, dtype) group: one RNG launch, refilled in place."""
        slot = (key.query, group)
        flat = self._packs.get(slot)
        if flat is None:
            flat = self._packs[slot] = torch.empty(self._groups[group][1], device=group[0], dtype=group[1])
        if self._packs_of.get(slot) != (key.run_seed, key.step):
            first = self._groups[group][0]
            gen = self._generators.seeded(group[0], key.run_seed, _TAG_PACK, key.step, key.query, first)
            flat.normal_(generator=gen)
            self._packs_of[slot] = (key.run_seed, key.step)
        return flat

    def _fresh(self, param: Tensor, index: int, key: DrawKey, transposed: bool = False) -> Tensor:
        """What query ``key`` draws fresh for this parameter: Uᵀ (LOZO), τ (TeZO), z (1-D);
        with ``transposed``, its transpose (U for LOZO).

        A view, valid until this query's next draw (callers use it within the step)."""
        slot = self._layout.get(index)
        if slot is None:
            shape = self._fresh_shape(param, index)
            fresh = self._randn(shape, param.device, param.dtype, key.run_seed, _TAG_FRESH, key.step, key.query, index)
            return fresh.T if transposed else fresh
        group, start, shape = slot
        flat = self._pack(key, group)
        view = self._views.get((key.query, index, transposed))
        if view is None:
            view = flat[start : start + math.prod(shape)].view(shape)
            view = self._views[(key.query, index, transposed)] = view.T if transposed else view
        return view if view.dtype == param.dtype else view.to(param.dtype)  # (dtype changed after prepare)

    def _fresh_shape(self, param: Tensor, index: int) -> tuple[int, ...]:
        return tuple(param.shape)  # 1-D parameters: a dense z; subclasses handle matrices

    # ------------------------------------------------------------ the Perturbation contract
    def add_(self, param: Tensor, index: int, terms: Sequence[Term]) -> None:
        self.add_each_([(index, param)], terms, ())

    def add_each_(self, params, terms, scaled) -> None:
        # κ scales matrices only, so every matrix gets the same merged terms and every 1-D
        # parameter the same others; the 1-D ones move together in one foreach kernel per term.
        matrix_terms = merge_terms([*terms, *((self.kappa * alpha, key) for alpha, key in scaled)])
        vector_terms = merge_terms([*terms, *scaled])
        plan = None
        if len(matrix_terms) == 1 and [key for _, key in vector_terms] == [matrix_terms[0][1]]:
            plan = self._one_term_plan(params, matrix_terms[0][1])
        if plan is not None:  # one direction (LOZO's SGD update with q = 1): a kernel per group, or addmm_
            kernel_groups, matrices, vectors, zs = plan
            for tables, triples in kernel_groups:
                if not self._launch(tables, matrix_terms[0][0]):
                    matrices = [*matrices, *triples]
            for matrix, left, right_t in matrices:
                matrix.addmm_(left, right_t, alpha=matrix_terms[0][0])
            if vectors:
                torch._foreach_add_(vectors, zs, alpha=vector_terms[0][0])
            return
        vectors = []
        for index, p in params:
            if p.dim() < 2:
                vectors.append((index, p))
            elif matrix_terms:
                left, right_t, alpha = self._left_right(p, index, matrix_terms)
                matrix, left = _held(p, left)
                matrix.addmm_(left, right_t, alpha=alpha)
        if vectors:
            for alpha, key in vector_terms:
                parts = [_held(p, self._fresh(p, index, key)) for index, p in vectors]
                torch._foreach_add_([t for t, _ in parts], [z for _, z in parts], alpha=alpha)

    def _one_term_plan(self, params, key: DrawKey):
        """(launch tables of the CUDA matrices, [(matrix, L, Rᵀ)] of the others, 1-D tensors, their z) of
        direction ``key``, kept while they stay valid. On CUDA with Triton, a group's matrices take one
        launch of :mod:`~zotune.optim.lowrank_kernel` per pass instead of one ``addmm_`` each.

        The factors are views of the refilled draw buffers and of cached right factors, so
        while the reuse key holds (LOZO: one V window) the same plan serves every step: the
        Python work of an update no longer grows with the number of parameters. None when a
        factor is computed per step (TeZO's U diag(τ)) or a parameter is outside the layout.
        """
        reuse = self._reuse_key([(1.0, key)])
        if reuse is None:
            return None
        slot = (tuple((index, id(p)) for index, p in params), key.query)
        hit = self._plans.get(slot)
        # A parameter given new storage (module.to()) would leave the plan's matrix views on the old one.
        if hit is None or hit[0] != reuse or any(held(p).data_ptr() != ptr for (_, p), ptr in zip(params, hit[3])):
            self._plans.pop(slot, None)  # a stale plan would keep the old storage alive
            if any(index not in self._layout or self._layout[index][0][1] != p.dtype for index, p in params):
                return None
            matrices, vectors, zs = [], [], []
            for index, p in params:
                if p.dim() < 2:
                    vector, z = _held(p, self._fresh(p, index, key))
                    vectors.append(vector)
                    zs.append(z)
                else:
                    left, right_t, _ = self._left_right(p, index, [(1.0, key)])
                    matrix, left = _held(p, left)
                    matrices.append((matrix, left, right_t))
            groups = {self._layout[index][0] for index, _ in params}
            pointers = [held(p).data_ptr() for _, p in params]
            kernel_groups, matrices = _kernel_groups(matrices, self._tiles) if self._kernel_works else ([], matrices)
            hit = self._plans[slot] = (reuse, groups, (kernel_groups, matrices, vectors, zs), pointers)
        for group in hit[1]:
            self._pack(key, group)  # this step's numbers into the buffers the plan's views read
        return hit[2]

    def _launch(self, tables, alpha: float) -> bool:
        """One launch of the low-rank kernel; False (and a warning, once) where it cannot compile or run:
        the plans then use ``addmm_``, which the caller applies to the group instead."""
        from . import lowrank_kernel

        if self._kernel_works:
            try:
                lowrank_kernel.add_(tables, alpha)
                return True
            except Exception as err:  # a Triton that cannot build it: the same step, by addmm_
                warnings.warn(f"the low-rank Triton kernel failed ({type(err).__name__}: {str(err)[:200]}); "
                              "low-rank passes use addmm_ from here on", RuntimeWarning, stacklevel=3)
                self._kernel_works = False
                self._plans.clear()
                self._tiles.clear()  # no kernel will read them: their device memory goes too
        return False

    def coordinates(self, param: Tensor, index: int, terms: Sequence[Term]) -> Tensor:
        dtype = torch.promote_types(param.dtype, torch.float32)
        if param.dim() < 2:
            return sum(self._fresh(param, index, key).to(dtype) * alpha for alpha, key in terms)
        return self._matrix_coords(param, index, terms).to(dtype)

    def add_coordinates_(self, param: Tensor, index: int, coords: Tensor, alpha: float, key: DrawKey) -> None:
        # coordinates are the whole parameter's (LOZO: m×r, TeZO: r, a 1-D z: m), the same on every rank
        if param.dim() < 2:
            vector, z = _held(param, coords.to(param.dtype))
            vector.add_(z, alpha=alpha)
            return
        left, right = self._expand(param, index, coords.to(param.dtype), key)
        matrix, left = _held(param, left)
        matrix.addmm_(left, right.T, alpha=alpha)

    def scale(self, param: Tensor) -> float:
        return self.kappa if param.dim() >= 2 else 1.0

    def _right_scale(self, rank: int) -> float:
        """What the right factor is multiplied by when drawn: 1/√r makes every entry of a rank-r product
        L Rᵀ (r terms, each a product of two unit normals) have variance 1, as MeZO's Z does; 1 keeps the
        papers' raw scaling (variance r per entry)."""
        return rank ** -0.5 if self.unit_variance else 1.0

    def scratch_numel(self) -> int:
        # One draw per query (q x the layout), and the virtual path's S scaled copies.
        points = sum(buf.numel() for scaled, _ in self._points.values() for buf in scaled.values())
        return sum(buf.numel() for buf in self._packs.values()) + points

    # ------------------------------------------------------------ the virtual path
    def point_factors(self, params, points: Sequence[Term]) -> dict[int, tuple[Tensor, ...]]:
        """See :meth:`FactoredPerturbation.point_factors`.

        The scaling by each point's offset is one multiplication per parameter group. The factors
        are views of buffers refilled at every call; while nothing else changes (LOZO within a V
        window) the same dict is returned, so that callers can keep what they derived from it.
        """
        copies = len(points)
        if copies not in self._points:
            scaled = {group: torch.empty(copies, numel, device=group[0], dtype=group[1])
                      for group, (_, numel) in self._groups.items()}
            views = {index: scaled[group][:, start : start + math.prod(shape)].view(copies, *shape)
                     for index, (group, start, shape) in self._layout.items()}
            self._points[copies] = (scaled, views)
        scaled, views = self._points[copies]
        for group, buffer in scaled.items():  # row s = offset_s · draw(key_s)
            torch.stack([self._pack(key, group) for _, key in points], out=buffer)
            buffer.mul_(self._offset_column(points, buffer))
        reuse = self._point_reuse_key(points)
        last = self._last_factors.get(copies)
        # New storage (module.to() with another dtype or device) voids the kept factors, as in _one_term_plan.
        pointers = [p.data_ptr() for _, p in params]
        if reuse is not None and last is not None and last[0] == reuse and last[1] is params and last[3] == pointers:
            self._refresh_point_factors(params, points, views, last[2])
            return last[2]
        out, static = {}, True
        for index, p in params:
            fresh = views.get(index)
            if fresh is None or fresh.dtype != p.dtype:
                static = False
            if fresh is None:
                fresh = torch.stack([self._fresh(p, index, key) * offset for offset, key in points])
            elif fresh.dtype != p.dtype:
                fresh = fresh.to(p.dtype)
            if p.dim() < 2:
                out[index] = (fresh,)
            else:
                key = points[0][1]
                out[index] = (self._point_left_t(p, index, fresh, key), self._right(p, index, key))
        self._last_factors[copies] = (reuse if static else None, params, out, pointers)
        return out

    def _reuse_key(self, points) -> object:
        """What, besides the refilled buffers, this step's factors depend on; None: rebuilt every step."""
        return None

    def _point_reuse_key(self, points) -> object:
        """Like :meth:`_reuse_key`, for the virtual path's factors, which may be refreshed in place."""
        return self._reuse_key(points)

    def _refresh_point_factors(self, params, points, views, factors) -> None:
        """Recompute in place the kept point factors that are not views of the refilled buffers (none here)."""

    def _offset_column(self, points, like: Tensor) -> Tensor:
        slot = (tuple(offset for offset, _ in points), like.device, like.dtype)
        column = self._offsets.get(slot)
        if column is None:
            column = self._offsets[slot] = torch.tensor(slot[0], dtype=like.dtype).view(-1, 1).to(like.device)
        return column
