"""``ZOTrainer``: a ``transformers.Trainer`` whose steps are zeroth-order.

Swap ``Trainer`` for ``ZOTrainer`` and name the method::

    trainer = ZOTrainer(model=model, args=TrainingArguments(...), train_dataset=data, method="lozo",
                        method_options={"rank": 2}, eps=1e-3)
    trainer.train()

``TrainingArguments`` keep their meaning: ``learning_rate`` with its scheduler and warmup,
``max_steps`` / ``num_train_epochs``, ``gradient_accumulation_steps`` (the micro-batches of one ZO
step, measured with the same directions), ``weight_decay`` (coupled, none on norms and biases),
``seed`` (the run seed of the directions), logging, evaluation, ``save_steps`` and
``resume_from_checkpoint`` (the optimizer's state dict is the ZO state: a resumed run continues
bit-identically), ``report_to`` (the logs carry ``projected_grad``, the mean |g| since the previous log,
in place of ``grad_norm``). Dropout is off while the losses are measured (the model is put in
eval mode, as MeZO's trainer does). Works on PEFT models and on models with zotune's adapters
(only parameters that require grad are perturbed).

How it fits the Trainer's loop: each micro-batch's ``training_step`` keeps its inputs; the last
micro-batch of a step (the Trainer's sync point) runs the ZO step over all of them and returns its
loss. The optimizer the Trainer holds is a facade whose ``step()`` has nothing left to do and whose
state is the ZO optimizer's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .optim import Batched, DriftSafe, InPlace, Virtual, get_method, param_groups


class _SteppedByTrainingStep(torch.optim.Optimizer):
    """What the Trainer (and its scheduler and checkpoints) see: the ZO optimizer's param groups and
    state; ``step()`` is empty because ``ZOTrainer.training_step`` has taken the step."""

    def __init__(self, zo: torch.optim.Optimizer) -> None:  # no super().__init__: everything is the ZO one's
        self.zo = zo
        self.defaults = zo.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self):  # the scheduler writes the lr here, where the ZO step reads it
        return self.zo.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.zo.param_groups = groups

    @property
    def state(self):
        return self.zo.state

    @state.setter
    def state(self, state) -> None:
        self.zo.state = state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # no gradients are ever made

    def state_dict(self) -> dict:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.zo.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zotune method (see the module docstring).

    Args:
        method: a zeroth-order method of ``zotune.METHODS`` (``mezo``, ``lozo``, ``tezo``, ...).
        method_options: the method's own options (``{"rank": 2, "nu": 50}``; ``zotune train --help``).
        eps, num_queries, two_sided: the SPSA estimator's ε, q and difference.
        execution: ``"in_place"`` (default), ``"drift_safe"`` (weights never written while measuring;
            the default for half-precision weights), ``"virtual"`` (every ±ε point in one batched
            forward; factored methods and causal LMs with ``labels``) or ``"batched"`` (the same for
            small trainable sets, PEFT LoRA or adapters, with any method; causal LMs with ``labels``).
        Other arguments are the Trainer's.
    """

    def __init__(self, *args: Any, method: str = "mezo", method_options: dict | None = None, eps: float = 1e-3,
                 num_queries: int = 1, two_sided: bool = True, execution: str | None = None, **kwargs: Any) -> None:
        spec = get_method(method)
        if not spec.zeroth_order:
            raise ValueError(f"ZOTrainer trains with zeroth-order methods; {method!r} is first-order (use Trainer)")
        if execution not in (None, "in_place", "drift_safe", "virtual", "batched"):
            raise ValueError(f"execution must be in_place, drift_safe, virtual or batched, got {execution!r}")
        if execution == "virtual" and not spec.virtual:
            raise ValueError(f"the virtual path needs a method with factored directions, not {method!r}")
        self.zo_spec, self.zo_options = spec, spec.check_options(method_options or {})
        self.zo_estimator = dict(eps=eps, num_queries=num_queries, two_sided=two_sided)
        self.zo_execution = execution
        self.zo_optimizer = None
        self._pending: list[dict] = []  # the inputs of this step's micro-batches
        self._projected = [0.0, 0]  # sum of |g| over the steps since the last log, and their count
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            model = model or self.model
            execution = self.zo_execution
            if execution is None:
                half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters() if p.requires_grad)
                execution = "drift_safe" if half else "in_place"
            path = {"in_place": InPlace, "drift_safe": lambda: DriftSafe(model), "virtual": lambda: Virtual(model),
                    "batched": lambda: Batched(model)}
            self.zo_optimizer = self.zo_spec(param_groups(model, self.args.weight_decay), lr=self.args.learning_rate,
                                             seed=self.args.seed, execution=path[execution](), **self.zo_estimator,
                                             **self.zo_options)
            self.optimizer = _SteppedByTrainingStep(self.zo_optimizer)
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.eval()  # dropout off while measuring
        self._pending.append(self._prepare_inputs(inputs))
        if not self.accelerator.gradient_state.sync_gradients:  # not the last micro-batch of this step
            return torch.zeros((), device=self.args.device)
        closures = [self._closure(model, batch) for batch in self._pending]
        self._pending = []
        loss = self.zo_optimizer.step(closures if len(closures) > 1 else closures[0])
        record = self.zo_optimizer.last_record
        if not record.skipped:
            self._projected[0] += sum(abs(g) for g in record.projected_grads) / len(record.projected_grads)
            self._projected[1] += 1
        return torch.tensor(loss, device=self.args.device)  # the step's loss, once (the others gave 0)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the ZO step's measure in place of ``grad_norm`` (which the Trainer takes
        over gradients a ZO step never makes, so it would always be 0): ``projected_grad``, the mean |g| of
        the steps since the last log."""
        if "loss" in logs:  # a training log
            logs.pop("grad_norm", None)
            total, count = self._projected
            if count:
                logs["projected_grad"] = total / count
            self._projected = [0.0, 0]
        super().log(logs, *args, **kwargs)

    def _closure(self, model: nn.Module, inputs: dict):
        def closure(copies: int | None = None):
            with torch.no_grad():
                if copies is None:  # a fresh dict each time: compute_loss may pop "labels" from it
                    return self.compute_loss(model, dict(inputs))
                return per_copy_causal_lm_loss(model, inputs, copies)

        return closure


def per_copy_causal_lm_loss(model: nn.Module, inputs: dict, copies: int) -> torch.Tensor:
    """The causal-LM loss of each of ``copies`` copies of the batch (copy-major), as the virtual path needs."""
    repeated = {k: v.repeat(copies, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in inputs.items()}
    labels = repeated.pop("labels")
    logits = model(**repeated).logits[:, :-1]
    targets = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none",
                                               ignore_index=-100)
    counted = (targets != -100).float().view(copies, -1).sum(1)
    return tokens.view(copies, -1).sum(1) / counted
