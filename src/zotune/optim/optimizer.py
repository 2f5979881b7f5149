"""``ZOOptimizer``: one zeroth-order step = Estimator x Perturbation x UpdateRule.

The optimizer is a ``torch.optim.Optimizer``: param groups carry ``lr`` and
``weight_decay``, stock ``torch.optim.lr_scheduler`` schedulers work on it, and
``state_dict()`` holds everything a bit-identical resume needs (the step counter, the run
seed and the moments; the directions themselves are regenerated from counter-based seeds,
so there is no generator state to save).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .estimators import SPSA
from .execution import AtUse, ExecutionPath, InPlace
from .perturbations import DrawKey, Gaussian, Perturbation
from .rules import SGD, UpdateRule

Closure = Callable[[], "Tensor | float"]
_STATE_KEY = "zotune"  # global (non-parameter) entry of ``self.state``


class NonFiniteLossError(FloatingPointError):
    """A ZO step measured a NaN/inf loss or projected gradient (weights were restored first)."""


@dataclass(frozen=True)
class StepRecord:
    """What one step measured: enough to replay its update from the initial weights."""

    step: int
    projected_grads: tuple[float, ...]  # g_1..g_q
    losses: tuple[float, ...]  # every loss measured, in order
    skipped: bool


def _scalar(value: object) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"the closure must return the batch loss as a scalar; got a tensor of shape {tuple(value.shape)}"
            )
        return float(value.detach().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"the closure must return the batch loss as a scalar (a Python number or a one-element tensor); "
        f"got {type(value).__name__}"
    )


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
        drift_safe: measure with the perturbation applied at use (module hooks) instead of
            written into the weights, so that a step with lr=0 leaves the weights
            bit-identical in any dtype. Needs ``model``. Recommended for float16/bfloat16.
        model: the module owning the parameters (only needed for ``drift_safe``).
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
        drift_safe: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        if not (lr >= 0.0):
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.perturbation: Perturbation = perturbation if perturbation is not None else Gaussian()
        self.estimator = estimator if estimator is not None else SPSA()
        self.rule: UpdateRule = rule if rule is not None else SGD()
        self.nan_policy = nan_policy
        self.last_record: StepRecord | None = None

        # Stable global index of every trainable parameter: part of its directions' address.
        self._indexed = [
            (index, p)
            for index, p in enumerate(p for group in self.param_groups for p in group["params"])
            if p.requires_grad
        ]
        if not self._indexed:
            raise ValueError(
                "no trainable parameters: every tensor given has requires_grad=False "
                "(unfreeze the parameters to tune, or pass the ones that require grad)"
            )
        if drift_safe:
            if model is None:
                raise ValueError("drift_safe=True needs model= (the module that owns the parameters)")
            self.execution: ExecutionPath = AtUse(model, self._indexed)
        else:
            self.execution = InPlace()
        self.state[_STATE_KEY] = {"step": 0, "seed": int(seed), "skipped": 0}

    def add_param_group(self, param_group: dict) -> None:
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

    def draw_keys(self, step: int) -> list[DrawKey]:
        seed = self.state[_STATE_KEY]["seed"]
        return [DrawKey(seed, step, query) for query in range(self.estimator.num_queries)]

    def _groups(self):
        """(lr, weight_decay, [(index, param)]) per group, trainable parameters only."""
        trainable = dict((id(p), i) for i, p in self._indexed)
        for group in self.param_groups:
            members = [(trainable[id(p)], p) for p in group["params"] if id(p) in trainable]
            yield group["lr"], group["weight_decay"], members

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Closure | Sequence[Closure]) -> float:  # type: ignore[override]
        """One ZO step.

        Args:
            closure: returns the current batch's loss (a scalar) and does no backward. A
                list of closures is gradient accumulation: each is one micro-batch of the
                same step, measured with the same directions, and the projected gradients
                are averaged over them (K equal micro-batches of size B equal one batch of KB).

        Returns:
            The loss measured first: L(θ + εZ_1) for two-sided SPSA (MeZO's convention),
            L(θ) for one-sided.
        """
        closures = [closure] if callable(closure) else list(closure)
        if not closures or not all(callable(c) for c in closures):
            raise TypeError("step() needs a closure (or a non-empty list of closures) returning the batch loss")

        def evaluate() -> float:
            return sum(_scalar(c()) for c in closures) / len(closures)

        global_state = self.state[_STATE_KEY]
        step = global_state["step"]
        keys = self.draw_keys(step)
        losses: list[float] = []
        grads: list[float] = []
        base = evaluate() if self.estimator.needs_base_loss else None
        if base is not None:
            losses.append(base)
        finite = base is None or math.isfinite(base)
        for key in keys:
            if not finite:
                break
            query_losses = [
                self.execution.measure(self._indexed, self.perturbation, (offset, key), evaluate)
                for offset in self.estimator.offsets
            ]
            losses.extend(query_losses)
            grads.append(self.estimator.projected_gradient(query_losses, base))
            finite = all(math.isfinite(v) for v in query_losses) and math.isfinite(grads[-1])

        skipped = not finite
        if skipped:
            self._restore()
            self.state[_STATE_KEY] = {**global_state, "step": step + 1, "skipped": global_state["skipped"] + 1}
            self.last_record = StepRecord(step, tuple(grads), tuple(losses), skipped=True)
            if self.nan_policy == "raise":
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or projected gradient (losses={losses}, g={grads}); "
                    "the weights were restored and not updated. Lower lr/eps, check the data, or use "
                    "nan_policy='skip'."
                )
            return losses[0] if losses else float("nan")

        self._update(step, keys, grads)
        self.state[_STATE_KEY] = {**global_state, "step": step + 1}
        self.last_record = StepRecord(step, tuple(grads), tuple(losses), skipped=False)
        return losses[0]

    def _restore(self) -> None:
        restore = self.execution.take_restore_terms()
        if restore:
            for index, p in self._indexed:
                self.perturbation.add_(p, index, restore)

    def _update(self, step: int, keys: list[DrawKey], grads: list[float]) -> None:
        """Restore the weights (in-place path) and apply θ ← θ − η(direction(ĝ) + λθ), one pass per tensor."""
        restore = self.execution.take_restore_terms()
        q = len(keys)
        estimate_terms = [(g / q, key) for g, key in zip(grads, keys)]  # ĝ = Σ_i (g_i/q) Z_i
        for lr, weight_decay, members in self._groups():
            decay = 1.0 - lr * weight_decay
            # Scaling the perturbed weights by `decay` also scales the offset still in them,
            # so the restore terms are scaled to match: (θ + εZ)·d − εd·Z = θ·d.
            restore_terms = [(alpha * decay, key) for alpha, key in restore]
            for index, p in members:
                if decay != 1.0:
                    p.mul_(decay)
                if self.rule.linear:
                    self.perturbation.add_(p, index, restore_terms + [(-lr * a, key) for a, key in estimate_terms])
                    continue
                if restore_terms:
                    self.perturbation.add_(p, index, restore_terms)
                coords = self.perturbation.coordinates(p, index, estimate_terms)
                state = self.state[p]
                if not state:
                    state.update(self.rule.init_state(coords))
                direction = self.rule.direction(coords, state, step + 1)
                if lr != 0.0:
                    self.perturbation.add_coordinates_(p, index, direction, -lr)

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Moments are restored in the dtype they were saved in (float32), not cast to the
        parameter's dtype as ``torch.optim.Optimizer`` would: casting them to half precision
        would break a bit-identical resume.
        """
        saved = state_dict["state"]
        if _STATE_KEY not in saved:
            raise ValueError("not a ZOOptimizer state dict (no 'zotune' entry in its state)")
        stripped = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
        super().load_state_dict(stripped)
        params = [p for group in self.param_groups for p in group["params"]]
        for key, value in saved.items():
            if key == _STATE_KEY:
                self.state[_STATE_KEY] = dict(value)
            else:
                p = params[key]
                self.state[p] = {name: t.detach().clone().to(p.device) for name, t in value.items()}
