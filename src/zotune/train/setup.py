"""From a configuration to the objects a run needs: trainable parameters and the optimizer."""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError, ModelConfig, OptimConfig, RunConfig
from ..optim import METHODS, param_groups
from ..optim.groups import is_norm_module, trainable_numel
from .first_order import FirstOrder

FIRST_ORDER = ("adamw",)
FINAL_NORM = r"regex:^model\.norm\.weight$"  # the default trainable set without adapters (LLaMA family)
# optim.<field> options passed to the method factory that accepts a keyword of the same name
_OPTIONS = ("beta", "form", "betas", "rank", "nu", "scale", "r_th", "r_max", "q_alpha", "q_max", "q_beta", "q_target")


def load_configured_model(cfg: ModelConfig, name: str | None = None):
    """(model, tokenizer) as ``cfg`` describes; ``name`` overrides ``cfg.name`` (replay's base model)."""
    from ..models.loading import load_model

    return load_model(name or cfg.name, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                      trust_remote_code=cfg.trust_remote_code)


def task_splits(cfg: RunConfig, n_train: int | None = None, n_dev: int | None = None, n_test: int | None = None):
    """(task, splits, masked) of the configured task, with the prompts of the configured model's kind.

    The kind comes from the model's config (no weights are read), so data errors surface before
    a large model is loaded. Sizes default to the data config's.
    """
    from ..models.loading import model_kind
    from ..tasks import get_task, load_splits

    task = get_task(cfg.data.task)
    kind = model_kind(cfg.model.name, cfg.model.trust_remote_code)
    if kind == "encoder":
        raise ConfigError(f"{cfg.model.name} has no language-model head (an encoder): prompts need a causal or "
                          "masked LM")
    d = cfg.data
    pick = lambda given, configured: configured if given is None else given  # noqa: E731
    try:
        splits = load_splits(task, d.data_dir, pick(n_train, d.n_train), pick(n_dev, d.n_dev),
                             pick(n_test, d.n_test), d.seed, masked=kind == "masked", k_shot=d.k_shot)
    except ValueError as err:
        if "has no prompt" in str(err):
            raise ConfigError(str(err)) from None
        raise
    return task, splits, kind == "masked"


def adapter_config(cfg: AdapterConfig):
    """The LoRETTA config that ``cfg`` describes, or None for ``kind: none``."""
    from ..adapters import LorettaAdpConfig, LorettaRepConfig

    common = dict(tt_rank=cfg.tt_rank, target_modules=cfg.target_modules, seed=cfg.seed)
    if cfg.train_norms is not None:
        common["train_norms"] = cfg.train_norms
    try:
        if cfg.kind == "adp":
            return LorettaAdpConfig(bottleneck=cfg.bottleneck, nonlinearity=cfg.nonlinearity,
                                    function_preserving=cfg.function_preserving, **common)
        if cfg.kind == "rep":
            return LorettaRepConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, **common)
    except ValueError as err:
        raise ConfigError(f"adapter: {err}") from None
    if cfg.kind not in ("none", "lora"):
        raise ConfigError(f"adapter.kind: unknown kind {cfg.kind!r}; valid: none, adp, rep, lora")
    return None


def inject_lora(model: nn.Module, cfg: AdapterConfig) -> None:
    """PEFT LoRA (r, alpha, dropout; targets: the query/value projections of the architecture) in place.

    LoRA's A matrices are re-initialised from a generator seeded by ``adapter.seed`` (PEFT draws
    them from the global RNG), so a run, its resume and its replay start from the same A; B starts
    at zero as in PEFT.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("adapter.kind=lora needs the peft package: pip install peft") from None
    from ..adapters.targets import REP_TARGETS, default_targets

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = cfg.target_modules or default_targets(REP_TARGETS, model_type, "LoRA")
    inject_adapter_in_model(LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                       target_modules=list(targets)), model)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:  # kaiming-uniform bound with a = sqrt(5), as nn.Linear and PEFT use
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


def prepare_trainable(model: nn.Module, cfg: RunConfig) -> int:
    """Insert the configured adapters, then choose the trainable parameters; returns their count."""
    from ..adapters import inject

    kind = cfg.adapter.kind
    if kind == "lora":
        inject_lora(model, cfg.adapter)
    elif kind != "none":
        inject(model, adapter_config(cfg.adapter))
    spec = cfg.optim.trainable
    if spec == "auto":
        spec = "adapters" if kind != "none" else FINAL_NORM
    if spec == "adapters":
        if kind == "none":
            raise ConfigError("optim.trainable=adapters needs adapter.kind adp, rep or lora")
        return trainable_numel(model)  # what the injection left trainable
    return select_trainable(model, spec)


def select_trainable(model: nn.Module, spec: str) -> int:
    """Freeze everything except ``spec`` (``all``, ``norms``, ``regex:<pattern>``); return the count."""
    for p in model.parameters():
        p.requires_grad_(False)
    if spec == "all":
        chosen = list(model.parameters())
    elif spec == "norms":
        chosen = [p for m in model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)]
    elif spec.startswith("regex:"):
        pattern = re.compile(spec[len("regex:"):])
        chosen = [p for name, p in model.named_parameters() if pattern.search(name)]
    else:
        raise ConfigError(f"optim.trainable: unknown selection {spec!r}; valid: auto, all, norms, adapters, regex:<pattern>")
    if not chosen:
        raise ConfigError(f"optim.trainable={spec!r} selects no parameter of this model")
    for p in chosen:
        p.requires_grad_(True)
    return trainable_numel(model)


def method_options(cfg: OptimConfig) -> dict:
    """The method-specific keyword arguments of ``cfg``, checked against the method's factory.

    Cheap and model-free: the loop calls it before loading anything, so a contradiction fails first.
    """
    if cfg.method not in METHODS and cfg.method not in FIRST_ORDER:
        raise ConfigError(f"unknown method {cfg.method!r}; valid: {', '.join(sorted(METHODS) + list(FIRST_ORDER))}")
    factory = METHODS[cfg.method] if cfg.method in METHODS else FirstOrder
    accepted = set(inspect.signature(factory).parameters)
    options = {}
    for name in _OPTIONS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in accepted:
            raise ConfigError(f"method {cfg.method!r} takes no option optim.{name}")
        if name == "betas":
            value = tuple(value)
        elif name == "rank" and value != "auto":
            if not str(value).isdigit():
                raise ConfigError(f"optim.rank must be a positive integer or 'auto', got {value!r}")
            value = int(value)
        options[name] = value
    if cfg.method in FIRST_ORDER and (cfg.virtual or cfg.drift_safe or cfg.num_queries != 1):
        raise ConfigError(f"{cfg.method} is first-order: optim.virtual, drift_safe and num_queries do not apply")
    if cfg.virtual and "rank" not in accepted:
        raise ConfigError(f"optim.virtual needs a low-rank method (lozo*, tezo*), not {cfg.method!r}")
    if cfg.virtual and cfg.drift_safe:
        raise ConfigError("optim.virtual and optim.drift_safe exclude each other (virtual never writes the weights)")
    if cfg.copies_per_forward is not None and not cfg.virtual:
        raise ConfigError("optim.copies_per_forward applies to the virtual path: set optim.virtual true as well")
    if cfg.copies_per_forward is not None and cfg.copies_per_forward < 1:
        raise ConfigError(f"optim.copies_per_forward must be a positive integer, got {cfg.copies_per_forward}")
    if cfg.nan_policy not in ("raise", "skip"):
        raise ConfigError(f"optim.nan_policy must be raise or skip, got {cfg.nan_policy!r}")
    return options


def build_optimizer(cfg: OptimConfig, model: nn.Module, seed: int, nan_policy: str | None = None):
    """The configured method over the model's trainable parameters (``nan_policy`` overrides the config's).

    A :class:`ZOOptimizer`, or :class:`FirstOrder` for ``adamw`` (which skips non-finite steps).
    """
    options = method_options(cfg)
    if cfg.method in FIRST_ORDER:
        return FirstOrder(param_groups(model, cfg.weight_decay), lr=cfg.lr, **options)
    drift_safe = cfg.drift_safe
    if drift_safe is None:  # the virtual path never writes the weights while measuring either
        drift_safe = not cfg.virtual and any(
            p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters() if p.requires_grad
        )
    return METHODS[cfg.method](
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        eps=cfg.eps,
        num_queries=cfg.num_queries,
        two_sided=cfg.two_sided,
        seed=seed,
        nan_policy=nan_policy or cfg.nan_policy,
        drift_safe=drift_safe,
        virtual=cfg.virtual,
        copies_per_forward=cfg.copies_per_forward,
        model=model,
        **options,
    )


def build_guard(cfg: RunConfig):
    """The divergence guard, or None when ``train.guard_spike`` is 0."""
    from .guard import DivergenceGuard

    t = cfg.train
    if not t.guard_spike:
        return None
    return DivergenceGuard(t.guard_spike, t.guard_window, t.guard_action, t.guard_rollback_steps, t.guard_lr_factor)
