"""``ZOOptimizer``: one zeroth-order step = Estimator x Perturbation x UpdateRule.

The optimizer is a ``torch.optim.Optimizer``: param groups carry ``lr`` and
``weight_decay``, stock ``torch.optim.lr_scheduler`` schedulers work on it, and
``state_dict()`` holds everything a bit-identical resume needs (the step counter, the run
seed and the moments; the directions themselves are regenerated from counter-based seeds,
so there is no generator state to save).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import enqueued
from .estimators import SPSA
from .execution import ExecutionPath, InPlace, start_mean_losses
from .perturbations import DrawKey, Gaussian, Perturbation
from .records import NonFiniteLossError, StepRecord
from .shards import is_sharded
from .rules import SGD, UpdateRule
from .schedules import QuerySchedule
from .trainable import TrainableSet

Closure = Callable[..., "Tensor | float"]
_STATE_KEY = "zotune"  # global (non-parameter) entry of ``self.state``
# Elements per chunk of a stateful rule's multi-tensor update: 2^22 float32 coordinates are 16 MiB (a tensor
# larger than that is a chunk of its own, as it was its own update before).
_CHUNK_NUMEL = 1 << 22


def _chunks(members: list, budget: int) -> Iterable[list]:
    """Consecutive runs of ``(index, param)`` of about ``budget`` elements in all."""
    chunk, numel = [], 0
    for member in members:
        if chunk and numel + member[1].numel() > budget:
            yield chunk
            chunk, numel = [], 0
        chunk.append(member)
        numel += member[1].numel()
    if chunk:
        yield chunk


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order optimizer driven by forward passes only.

    Args:
        params: parameters or param groups (dicts with ``params`` and optionally ``lr``,
            ``weight_decay``). Parameters with ``requires_grad=False`` are left alone.
        lr: learning rate η.
        perturbation: family of directions Z (default: dense Gaussian, as MeZO).
        estimator: how g is measured (default: two-sided SPSA, ε = 1e-3, one query).
        rule: update rule on the estimate ĝ (default: SGD).
        weight_decay: coupled weight decay λ: θ ← θ − η(direction + λθ).
        seed: run seed; every direction is a function of (seed, step, query, parameter index).
        nan_policy: ``"raise"`` raises :class:`NonFiniteLossError` on a NaN/inf loss or
            projected gradient; ``"skip"`` skips that update and counts it. The weights are
            restored before either, and never updated with a non-finite value.
        execution: how the losses are measured (:mod:`zotune.optim.execution`): ``InPlace()``
            (the default: the perturbation is written into the weights), ``DriftSafe(model)``
            (applied at use by module hooks, so a step with lr=0 leaves the weights bit-identical
            in any dtype; recommended for float16/bfloat16), ``Virtual(model, copies_per_forward)``
            (every ±ε point in one batched forward, factored perturbations only; the closure is
            then called as ``closure(copies=S)`` and returns the S losses of the batch repeated S
            times, copy-major), or ``zotune.dist.Distributed(inner, layout)`` across ranks. An
            execution path serves one optimizer.
        query_schedule: a :class:`~zotune.optim.schedules.QuerySchedule` setting q per data
            epoch (AdaZeta); the training loop calls :meth:`start_epoch`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        *,
        perturbation: Perturbation | None = None,
        estimator: SPSA | None = None,
        rule: UpdateRule | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        nan_policy: str = "raise",
        execution: ExecutionPath | None = None,
        query_schedule: QuerySchedule | None = None,
    ) -> None:
        if not (lr >= 0.0):
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Real) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.perturbation: Perturbation = perturbation if perturbation is not None else Gaussian()
        self.estimator = estimator if estimator is not None else SPSA()
        self.rule: UpdateRule = rule if rule is not None else SGD()
        self.nan_policy = nan_policy
        self.query_schedule = query_schedule
        self.last_record: StepRecord | None = None

        # Stable global index of every trainable parameter: part of its directions' address.
        self.trainable = TrainableSet([p for group in self.param_groups for p in group["params"]])
        if execution is not None and not isinstance(execution, ExecutionPath):
            raise TypeError(f"execution must be an execution path (InPlace(), DriftSafe(model), Virtual(model), ...), "
                            f"got {type(execution).__name__}")
        self.rule.check(self.perturbation)  # a rule that cannot follow these directions fails here, not at step 1
        if any(is_sharded(p) for _, p in self.trainable.indexed):  # FSDP2's DTensor shards
            if execution is not None and not isinstance(getattr(execution, "inner", execution), InPlace):
                raise ValueError("sharded (FSDP2) parameters are trained on the in-place path (zotune.dist.shard: "
                                 "execution=Distributed(InPlace(), layout))")
        self.execution: ExecutionPath = execution if execution is not None else InPlace()
        self.execution.bind(self.trainable.indexed, self.perturbation, self.estimator)
        self.perturbation.prepare(self.trainable.indexed)
        self.state[_STATE_KEY] = {"step": 0, "seed": int(seed), "skipped": 0}

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "trainable"):  # torch's __init__ adds the first groups; a later call would be ignored
            raise ValueError("a ZO optimizer's parameters are fixed when it is built (each direction is addressed "
                             "by its parameter's index, and the execution path lays out its work over them): "
                             "build a new optimizer with every group instead of add_param_group")
        for key in ("lr", "weight_decay"):
            value = param_group.get(key, self.defaults.get(key, 0.0))
            if not (value >= 0.0):
                raise ValueError(f"param group {key} must be >= 0, got {value}")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- bookkeeping
    @property
    def num_steps(self) -> int:
        """Steps taken so far (skipped ones included)."""
        return self.state[_STATE_KEY]["step"]

    @property
    def num_skipped(self) -> int:
        return self.state[_STATE_KEY]["skipped"]

    def set_num_queries(self, num_queries: int) -> None:
        """Use q directions from the next step on (q is not part of the saved state: a schedule sets it)."""
        # (the execution path keeps the estimator it was bound with: the layout of points does not depend on q)
        self.estimator = dataclasses.replace(self.estimator, num_queries=num_queries)

    def start_epoch(self, epoch: int, total_epochs: float | None = None) -> int:
        """Tell the optimizer which data epoch its next steps belong to; returns the q they will use."""
        if self.query_schedule is not None:
            self.set_num_queries(self.query_schedule.queries(epoch, total_epochs))
        return self.estimator.num_queries

    @property
    def max_num_queries(self) -> int:
        """The most directions a step can use (the schedule's cap, or the fixed q)."""
        return self.query_schedule.q_max if self.query_schedule is not None else self.estimator.num_queries

    def draw_keys(self, step: int) -> list[DrawKey]:
        seed = self.state[_STATE_KEY]["seed"]
        return [DrawKey(seed, step, query) for query in range(self.estimator.num_queries)]

    def _groups(self):
        """(lr, weight_decay, [(index, param)]) per group, trainable parameters only."""
        trainable = self.trainable.index_of
        for group in self.param_groups:
            members = [(trainable[id(p)], p) for p in group["params"] if id(p) in trainable]
            yield group["lr"], group["weight_decay"], members

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Closure | Sequence[Closure], accept: Callable[[StepRecord], bool] | None = None) -> float:  # type: ignore[override]
        """One ZO step.

        Args:
            closure: returns the current batch's loss (a scalar) and does no backward. A
                list of closures is gradient accumulation: each is one micro-batch of the
                same step, measured with the same directions, and the projected gradients
                are averaged over them (K equal micro-batches of size B equal one batch of KB).
            accept: optional check of the finite measurements before the update (e.g. a loss-spike
                guard); when it returns False the weights are restored and the step is skipped.

        Returns:
            The loss measured first: L(θ + εZ_1) for two-sided SPSA (MeZO's convention),
            L(θ) for one-sided.
        """
        closures = [closure] if callable(closure) else list(closure)
        if not closures or not all(callable(c) for c in closures):
            raise TypeError("step() needs a closure (or a non-empty list of closures) returning the batch loss")

        self.trainable.check_unchanged()
        global_state = self.state[_STATE_KEY]
        step = global_state["step"]
        keys = self.draw_keys(step)
        points = self.estimator.points(keys)
        update_enqueued = False  # whether the update is already on the GPU's queue (see _enqueue_update)
        if accept is None and type(self.execution) is InPlace:
            measured = self.execution.measure_pending(points, closures)
            arriving = start_mean_losses(measured)  # queued before the update, the copies do not wait for it
            update_enqueued = self._enqueue_update(keys, measured)
            losses = arriving()
        else:
            losses = self.execution.measure_points(points, closures)
        grads = self.estimator.projected_gradients(losses)

        if not all(math.isfinite(v) for v in losses + grads):
            if not update_enqueued:  # (an enqueued update of a non-finite step is a restore only)
                self._restore()
            self.state[_STATE_KEY] = {**global_state, "step": step + 1, "skipped": global_state["skipped"] + 1}
            self.last_record = StepRecord(step, tuple(grads), tuple(losses), skipped=True)
            if self.nan_policy == "raise":
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or projected gradient (losses={losses}, g={grads}); "
                    "the weights were restored and not updated. Lower lr/eps, check the data, or use "
                    "nan_policy='skip'."
                )
            return losses[0]

        record = StepRecord(step, tuple(grads), tuple(losses), skipped=False)
        if accept is not None and not accept(record):
            self._restore()
            self.state[_STATE_KEY] = {**global_state, "step": step + 1, "skipped": global_state["skipped"] + 1}
            self.last_record = StepRecord(step, tuple(grads), tuple(losses), skipped=True)
            return losses[0]
        if not update_enqueued:
            self._update(step, keys, grads)
        self.state[_STATE_KEY] = {**global_state, "step": step + 1}
        self.last_record = record
        return losses[0]

    @torch.no_grad()
    def rollback(self, steps: Sequence[tuple[StepRecord, Sequence[float]]]) -> None:
        """Undo applied updates, newest first, by replaying them with the opposite sign.

        ``steps`` holds each update's record and the learning rate of every param group at
        that step. Exact up to rounding for linear rules (SGD); rules with moments cannot be
        undone this way (their state has moved on) and are refused.
        """
        if not self.rule.linear:
            raise ValueError(f"rollback needs a linear update rule (SGD); {type(self.rule).__name__} keeps moments")
        for record, lrs in reversed(list(steps)):
            if record.skipped:
                continue
            keys = self.draw_keys(record.step)
            q = len(keys)
            for (_, weight_decay, members), lr in zip(self._groups(), lrs):
                decay = 1.0 - lr * weight_decay
                undo = [(lr * g / q, key) for g, key in zip(record.projected_grads, keys)]
                self.perturbation.add_each_(members, [], undo)
                if decay != 1.0 and members:
                    torch._foreach_div_([p for _, p in members], decay)

    def _may_enqueue_update(self) -> bool:
        """An in-place SGD step without weight decay over weights that the fused kernel alone perturbs: its
        update can be computed and launched on the GPU before the losses are read back."""
        return self.rule.linear and type(self.perturbation) is Gaussian \
            and all(group["weight_decay"] == 0.0 for group in self.param_groups) \
            and self.perturbation.all_fused(self.trainable.indexed)

    def _enqueue_update(self, keys: list[DrawKey], measured: list[list]) -> bool:
        """Restore and update in one pass whose coefficients the GPU computes from the losses it holds
        (:mod:`zotune.optim.enqueued`: the numbers ``_update`` would use), launched behind the last forward;
        False, with nothing done, when a loss is not a CUDA tensor (nothing to gain) or the step is not one
        :meth:`_may_enqueue_update` allows (it then updates after the read-back, in ``_update``)."""
        if not all(isinstance(v, Tensor) and v.is_cuda for values in measured for v in values) \
                or not self._may_enqueue_update():
            return False
        restore = self.execution.take_restore_terms()
        grads = enqueued.projected_gradients(measured, self.estimator)
        for lr, _, members in self._groups():
            self.perturbation.add_each_(members, restore, enqueued.update_terms(grads, keys, lr))
        return True

    def _restore(self) -> None:
        restore = self.execution.take_restore_terms()
        if restore:
            self.perturbation.add_each_(self.trainable.indexed, restore, ())

    def _update(self, step: int, keys: list[DrawKey], grads: list[float]) -> None:
        """Restore the weights (in-place path) and apply θ ← θ − η(direction(ĝ) + λθ), one pass per tensor."""
        restore = self.execution.take_restore_terms()
        q = len(keys)
        basis = keys[0]
        for lr, weight_decay, members in self._groups():
            decay = 1.0 - lr * weight_decay
            # Scaling the perturbed weights by `decay` also scales the offset still in them,
            # so the restore terms are scaled to match: (θ + εZ)·d − εd·Z = θ·d.
            restore_terms = [(alpha * decay, key) for alpha, key in restore]
            if decay != 1.0 and members:
                torch._foreach_mul_([p for _, p in members], decay)
            if self.rule.linear:  # θ += restore − η ĝ, ĝ = κ Σ_i (g_i/q) Z_i
                self.perturbation.add_each_(members, restore_terms, [(-lr * g / q, key) for g, key in zip(grads, keys)])
                continue
            if self._many_at_once(members):
                self._update_many(members, restore_terms, [(g / q, key) for g, key in zip(grads, keys)], step, lr)
                continue
            for index, p in members:
                kappa = self.perturbation.scale(p)
                estimate_terms = [(kappa * g / q, key) for g, key in zip(grads, keys)]
                if restore_terms:
                    self.perturbation.add_(p, index, restore_terms)
                coords = self.perturbation.coordinates(p, index, estimate_terms)
                state = self.state[p]
                if not state:
                    state.update(self.rule.init_state(coords))
                    state["basis_step"] = step
                elif state["basis_step"] != step:
                    old = DrawKey(basis.run_seed, state["basis_step"], 0)
                    for name in self.rule.linear_state:
                        state[name] = self.perturbation.transport(state[name], p, index, old, basis)
                    state["basis_step"] = step
                self.rule.update_(p, index, self.perturbation, coords, state, step + 1, lr, basis)

    def _many_at_once(self, members) -> bool:
        """Dense Gaussian coordinates (κ = 1, one basis) and a rule with multi-tensor kernels, unsharded."""
        return type(self.perturbation) is Gaussian and hasattr(self.rule, "direction_each") and \
            not any(is_sharded(p) for _, p in members)

    def _update_many(self, members, restore_terms, estimate_terms, step: int, lr: float) -> None:
        """The stateful rule's update over many tensors at once, in chunks of about ``_CHUNK_NUMEL`` elements
        (their coordinates and the rule's temporaries exist for one chunk at a time): a few launches a
        chunk instead of a few a tensor, the same arithmetic as the per-tensor update."""
        if restore_terms:
            self.perturbation.add_each_(members, restore_terms, ())
        for chunk in _chunks(members, _CHUNK_NUMEL):
            coords = self.perturbation.coordinates_each(chunk, estimate_terms)
            states = [self.state[p] for _, p in chunk]
            for state, c in zip(states, coords):
                if not state:
                    state.update(self.rule.init_state(c))
                state["basis_step"] = step
            directions = self.rule.direction_each(coords, states, step + 1)
            if lr != 0.0:
                self.perturbation.add_coordinates_each_(chunk, directions, -lr)

    def state_numel(self) -> dict[str, int]:
        """Numbers held beyond the weights: the rule's moments, the perturbation's cached factors,
        and its reusable draw buffers (scratch)."""
        moments = sum(
            t.numel() for key, st in self.state.items() if key != _STATE_KEY
            for t in st.values() if isinstance(t, Tensor)
        )
        return {"moments": moments, "factors": self.perturbation.persistent_numel(),
                "scratch": self.perturbation.scratch_numel()}

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Moments are restored in the dtype they were saved in (float32), not cast to the
        parameter's dtype as ``torch.optim.Optimizer`` would: casting them to half precision
        would break a bit-identical resume.
        """
        saved = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict) or _STATE_KEY not in saved:
            raise ValueError("not a ZOOptimizer state dict (no 'zotune' entry in its state)")
        kind, mine = saved[_STATE_KEY].get("kind"), self._kind()
        if kind is not None and kind != mine:  # (states saved before the kind was recorded: not checked)
            raise ValueError(f"the state was saved by an optimizer with {kind['perturbation']} directions and the "
                             f"{kind['rule']} rule; this one has {mine['perturbation']} and {mine['rule']}: build "
                             "the optimizer of the saved run")
        stripped = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
        super().load_state_dict(stripped)
        params = self.trainable.given  # (the same tensors, in the same order, as the loaded groups')
        for key, value in saved.items():
            if key == _STATE_KEY:
                self.state[_STATE_KEY] = dict(value)
                self.perturbation.load_state_dict(value.get("perturbation", {}))
            else:
                p = params[key]
                self.state[p] = {
                    name: t.detach().clone().to(p.device) if isinstance(t, Tensor) else t for name, t in value.items()
                }

    def state_dict(self) -> dict:
        self.state[_STATE_KEY] = {**self.state[_STATE_KEY], "perturbation": self.perturbation.state_dict(),
                                  "kind": self._kind()}
        return super().state_dict()

    def _kind(self) -> dict[str, str]:
        """What a saved state fits: the directions' and the rule's types (a method's composition)."""
        return {"perturbation": type(self.perturbation).__name__, "rule": type(self.rule).__name__}
