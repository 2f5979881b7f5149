"""Checks of a run's configuration that fail before anything heavy is loaded."""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..optim import MethodSpec
from ..tasks import get_task
from .reporters import check_reporters
from .schedule import SCHEDULES
from .setup import adapter_config, build_guard, check_device, check_optim


def _dense_sgd(spec: MethodSpec) -> bool:
    """Dense Gaussian directions with an SGD rule (mezo, adazeta): what offload takes."""
    return spec.zeroth_order and spec.linear and not spec.virtual


def validate(cfg: RunConfig) -> None:
    """Fail on bad names and contradictions before anything heavy is loaded."""
    get_task(cfg.data.task)
    check_device(cfg.model)
    spec = check_optim(cfg.optim)
    adapter_config(cfg.adapter)
    t = cfg.train
    if t.steps < 0 or t.batch_size < 1 or t.checkpoint_every < 0 or (t.eval_every or 0) < 0:
        raise ConfigError("train.steps, train.eval_every and train.checkpoint_every must be >= 0, "
                          "train.batch_size >= 1")
    if t.lr_schedule not in SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, got {t.lr_schedule!r}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints must be >= 1")
    if t.checkpoint not in (None, "weights", "trajectory"):
        raise ConfigError(f"train.checkpoint must be weights or trajectory, got {t.checkpoint!r}")
    if t.sharding not in ("none", "fsdp"):
        raise ConfigError(f"train.sharding must be none or fsdp, got {t.sharding!r}")
    o = cfg.optim
    if t.sharding == "fsdp":
        if not spec.zeroth_order or o.options.get("generator") == "torch":
            raise ConfigError(f"train.sharding=fsdp trains ZO methods with directions drawn by each element's place in "
                              f"its parameter: not {o.method!r} with generator torch (use auto or philox)"
                              if spec.zeroth_order else f"train.sharding=fsdp trains ZO methods, not {o.method!r}")
        if o.virtual or o.batched or o.drift_safe or t.query_parallel != 1 or t.checkpoint == "weights":
            raise ConfigError("train.sharding=fsdp runs the in-place path with data parallelism and trajectory "
                              "checkpoints: drop optim.virtual, optim.batched, optim.drift_safe, "
                              "train.query_parallel and train.checkpoint=weights")
    if cfg.model.offload not in (None, "cpu"):
        raise ConfigError(f"model.offload must be cpu or unset, got {cfg.model.offload!r}")
    if cfg.model.offload:
        if not _dense_sgd(spec) or o.weight_decay:
            raise ConfigError(f"model.offload=cpu defers SGD updates of dense directions in this version: optim.method "
                              f"mezo or adazeta (not {o.method!r}) without weight decay")
        if o.virtual or o.batched or o.drift_safe or cfg.model.device_map or t.sharding != "none":
            raise ConfigError("model.offload=cpu is its own execution path: drop optim.virtual, optim.batched, "
                              "optim.drift_safe, model.device_map and train.sharding")
    if t.checkpoint == "trajectory" and not spec.zeroth_order:
        raise ConfigError(f"train.checkpoint=trajectory rebuilds weights from a ZO run's log; {cfg.optim.method!r} "
                          "is first-order: use train.checkpoint=weights")
    check_reporters(t.report_to)
    if cfg.data.icl_demos:
        raise ConfigError("data.icl_demos is the in-context baseline of `zotune eval`; training uses no demonstrations")
    guard = build_guard(cfg)  # validates the guard's own fields
    if guard is not None and t.guard_action == "rollback" and not spec.linear:
        kind = "first-order" if not spec.zeroth_order else "keeps moments"
        raise ConfigError(f"train.guard_action=rollback undoes SGD-type ZO updates; {cfg.optim.method!r} {kind} "
                          "(use mezo, lozo, tezo or adazeta, or guard_action=skip)")


def validate_launch(cfg: RunConfig, distributed: bool) -> None:
    """What depends on how the run was launched (under torchrun or not)."""
    if cfg.train.sharding == "fsdp" and not distributed:
        raise ConfigError("train.sharding=fsdp shards over the ranks of a torchrun job: launch with torchrun")
    if cfg.model.offload and distributed:
        raise ConfigError("model.offload=cpu runs in one process in this version (not under torchrun)")
