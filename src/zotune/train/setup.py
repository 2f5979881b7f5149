"""From a configuration to the objects a run needs: model, trainable parameters, execution path, optimizer.

Shared by every command that builds a run's pieces (train, bench, replay, eval); each function
does one job, and the configuration's contradictions are found by :func:`check_optim` before
anything is loaded.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError, ModelConfig, OptimConfig, RunConfig, apply_overrides
from ..models.captured import CapturedCausalLM, capture_unsupported
from ..models.families import family_of, model_type_of
from ..optim.offload import Offload, offload_device, place
from ..optim.shards import is_sharded
from ..optim import (METHODS, Batched, DriftSafe, ExecutionPath, InPlace, MethodSpec, Virtual, get_method,
                     param_groups)
from ..optim.groups import is_norm_module, trainable_numel


def check_device(cfg: ModelConfig) -> None:
    """The configured device and dtype exist on this machine (checked before anything is loaded)."""
    from ..models.loading import DTYPES

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.device_map is not None:
        return  # accelerate places the layers on what exists
    kind, _, index = cfg.device.partition(":")
    fix = "use --model.device cpu (the shipped paper configs set cuda: add --model.device cpu to try one here)"
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise ConfigError(f"model.device={cfg.device}, but this machine has no CUDA device ({why}); {fix}")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"model.device={cfg.device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"model.dtype=bfloat16 is not supported by {torch.cuda.get_device_name()}; "
                              "use float16 or float32")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"model.device={cfg.device}, but this machine has no MPS device; {fix}")
    elif cfg.device != "cpu":
        raise ConfigError(f"model.device: unknown device {cfg.device!r}; valid: cpu, cuda, cuda:N, mps")


def load_configured_model(cfg: ModelConfig, name: str | None = None):
    """(model, tokenizer) as ``cfg`` describes; ``name`` overrides ``cfg.name`` (replay's base model)."""
    from ..models.loading import load_model

    model, tokenizer = load_model(name or cfg.name, dtype=cfg.dtype, device="cpu" if cfg.offload else cfg.device,
                                  device_map=cfg.device_map, trust_remote_code=cfg.trust_remote_code)
    if cfg.offload:  # the blocks stay in CPU memory, the rest goes to the device
        place(model, cfg.device)
    return model, tokenizer


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
    from ..adapters.targets import rep_targets

    targets = cfg.target_modules or rep_targets(model)
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
    if spec is None or spec == "auto":  # the adapters when there are any; else the demo's or the papers' set
        spec = "adapters" if kind != "none" else "final_norm" if spec is None else "all"
    if spec == "final_norm":
        spec = "regex:" + _final_norm(model)
    if spec == "adapters":
        if kind == "none":
            raise ConfigError("optim.trainable=adapters needs adapter.kind adp, rep or lora")
        return trainable_numel(model)  # what the injection left trainable
    return select_trainable(model, spec)


def _final_norm(model: nn.Module) -> str:
    try:
        return family_of(model_type_of(model), "final-norm entry (optim.trainable=final_norm, the default)",
                         "--optim.trainable all (full fine-tuning), norms, or regex:<pattern>").final_norm
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
        raise ConfigError(f"optim.trainable: unknown selection {spec!r}; valid: auto, all, final_norm, norms, "
                          "adapters, regex:<pattern>")
    if not chosen:
        raise ConfigError(f"optim.trainable={spec!r} selects no parameter of this model; --optim.trainable all "
                          "(full fine-tuning) or norms work for every model")
    for p in chosen:
        p.requires_grad_(True)
    return trainable_numel(model)


def selection_kind(trainable: str | None, adapter_kind: str) -> str | None:
    """The trainable kind (:data:`zotune.optim.registry.TRAINABLE_KINDS`) a selection stands for, or None
    when only the selected parameters tell (``regex:``)."""
    if trainable in (None, "auto", "adapters") and adapter_kind != "none":
        return adapter_kind  # adp, rep or lora
    return {None: "norms", "final_norm": "norms", "norms": "norms", "auto": "all", "all": "all"}.get(trainable)


def trainable_kind(model: nn.Module, cfg: RunConfig) -> str:
    """Which default learning rate applies, after :func:`prepare_trainable`: LoRA, the TT adapters,
    norms only, or anything else ("all")."""
    kind = selection_kind(cfg.optim.trainable, cfg.adapter.kind)
    if kind is not None:
        return kind
    norm_params = {id(p) for m in model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return "norms" if trainable and all(id(p) in norm_params for p in trainable) else "all"


def resolve_lr(cfg: RunConfig, model: nn.Module) -> RunConfig:
    """``cfg`` with ``optim.lr`` set: as given, or the method's default for the trainable set's kind."""
    if cfg.optim.lr is not None:
        return cfg
    lr = get_method(cfg.optim.method).default_lr[trainable_kind(model, cfg)]
    return apply_overrides(cfg, {"optim.lr": lr})


def check_optim(cfg: OptimConfig) -> MethodSpec:
    """The method's spec, once the optim section holds no contradiction (model-free: runs before loading)."""
    try:
        spec = get_method(cfg.method)
        spec.check_options(cfg.options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name, bound, ok in (("lr", ">= 0", cfg.lr is None or cfg.lr >= 0), ("eps", "> 0", cfg.eps > 0),
                            ("num_queries", ">= 1", cfg.num_queries >= 1),
                            ("weight_decay", ">= 0", cfg.weight_decay >= 0)):
        if not ok:  # (NaN fails every comparison, so it is refused too)
            raise ConfigError(f"optim.{name} must be {bound}, got {getattr(cfg, name)}")
    if not spec.zeroth_order and (cfg.virtual or cfg.batched or cfg.drift_safe or cfg.num_queries != 1):
        raise ConfigError(f"{cfg.method} is first-order: optim.virtual, batched, drift_safe and num_queries do not "
                          "apply")
    if cfg.virtual and not spec.virtual:
        virtual = ", ".join(name for name, s in METHODS.items() if s.virtual)
        raise ConfigError(f"optim.virtual needs a method with factored directions ({virtual}), not {cfg.method!r}")
    if cfg.virtual and cfg.drift_safe:
        raise ConfigError("optim.virtual and optim.drift_safe exclude each other (virtual never writes the weights)")
    if cfg.batched and (cfg.virtual or cfg.drift_safe):
        raise ConfigError("optim.batched excludes optim.virtual and optim.drift_safe (it is another way to measure "
                          "without writing the weights)")
    if cfg.copies_per_forward is not None and not (cfg.virtual or cfg.batched):
        raise ConfigError("optim.copies_per_forward applies to the virtual and batched paths: set optim.virtual or "
                          "optim.batched true as well")
    if cfg.copies_per_forward is not None and cfg.copies_per_forward < 1:
        raise ConfigError(f"optim.copies_per_forward must be a positive integer, got {cfg.copies_per_forward}")
    if cfg.nan_policy not in ("raise", "skip"):
        raise ConfigError(f"optim.nan_policy must be raise or skip, got {cfg.nan_policy!r}")
    return spec


def build_execution(cfg: OptimConfig, model: nn.Module, layout=None) -> ExecutionPath:
    """The execution path the configuration asks for: the one place that chooses it.

    Offload for a model :func:`~zotune.optim.offload.place` placed; virtual or batched when asked; drift-safe
    when asked, for half-precision weights (unless turned off) and
    for query shards (ranks measuring different points must not write the weights); in place
    otherwise. Under torchrun (``layout``), wrapped in :class:`~zotune.dist.parallel.Distributed`.
    """
    query_shards = layout is not None and layout.query_shards > 1
    if offload_device(model) is not None:
        path: ExecutionPath = Offload(model, offload_device(model), cfg.copies_per_forward)
    elif cfg.virtual:
        path = Virtual(model, cfg.copies_per_forward)
    elif cfg.batched:
        path = Batched(model, cfg.copies_per_forward)
    else:
        drift_safe = cfg.drift_safe
        if drift_safe is None:  # half precision; not for sharded weights (FSDP2 gathers the shards it holds)
            trainable = [p for p in model.parameters() if p.requires_grad]
            drift_safe = any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable) and \
                not any(is_sharded(p) for p in trainable)
        path = DriftSafe(model) if drift_safe or query_shards else InPlace()
    if layout is not None:
        from ..dist.parallel import Distributed

        path = Distributed(path, layout)
    return path


#: Trainable parameters above which an SGD-type ZO run's checkpoints are its trajectory by default (a 13B
#: full fine-tune would write 26 GB of weights every checkpoint_every steps).
TRAJECTORY_CHECKPOINTS_ABOVE = 10**9


def checkpoint_kind(setting: str | None, spec: MethodSpec, n_trainable: int) -> str:
    """``train.checkpoint`` resolved: the setting, else trajectory for big SGD-type ZO runs, else weights."""
    if setting is not None:
        return setting
    big = n_trainable > TRAJECTORY_CHECKPOINTS_ABOVE
    return "trajectory" if spec.zeroth_order and spec.linear and big else "weights"


def training_forward(model: nn.Module, cfg, optimizer, masked: bool, say) -> nn.Module:
    """The model as the training loss calls it: :class:`~zotune.models.captured.CapturedCausalLM` where
    CUDA graphs apply (a ZO method on the in-place or batched path, a causal LM on one GPU), else the
    model itself."""
    path = getattr(optimizer, "execution", None)
    path = getattr(path, "inner", path)  # under torchrun, the path each rank runs
    if not (cfg.train.cuda_graphs and isinstance(path, (InPlace, Batched)) and not masked
            and any(p.is_cuda for p in model.parameters())):
        if cfg.train.compile:
            say("note: train.compile applies to forwards captured in CUDA graphs (train.cuda_graphs, a causal LM on "
                "one GPU, the in-place or batched path); this run's forwards run uncompiled")
        return model
    why = capture_unsupported(model)
    if why is not None:
        say(f"note: training forwards run eagerly, not from CUDA graphs: {why}")
        return model
    return CapturedCausalLM(model, storage_version=path.storage_version if isinstance(path, Batched) else None,
                            compile="inductor" if cfg.train.compile else None)


def build_optimizer(cfg: OptimConfig, model: nn.Module, seed: int, nan_policy: str | None = None, layout=None):
    """The configured method over the model's trainable parameters (``nan_policy`` overrides the config's).

    ``cfg.lr`` must be resolved (:func:`resolve_lr`). A :class:`~zotune.optim.ZOOptimizer`, or the
    first-order baseline (which skips non-finite steps) for a spec that is not zeroth-order.
    """
    spec = check_optim(cfg)
    if cfg.lr is None:
        raise ValueError("build_optimizer needs a resolved optim.lr (see resolve_lr)")
    options = spec.check_options(cfg.options)
    groups = param_groups(model, cfg.weight_decay)
    if not spec.zeroth_order:
        if layout is not None:
            raise ConfigError(f"{cfg.method} is first-order: distributed runs are for the ZO methods")
        return spec(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    return spec(groups, lr=cfg.lr, eps=cfg.eps, num_queries=cfg.num_queries, two_sided=cfg.two_sided, seed=seed,
                nan_policy=nan_policy or cfg.nan_policy, execution=build_execution(cfg, model, layout), **options)
#: The divergence guard's spike factor for ZO runs when ``train.guard_spike`` is not given.
DEFAULT_GUARD_SPIKE = 5.0


def build_guard(cfg: RunConfig):
    """The divergence guard, or None when it is off (``train.guard_spike`` 0, or not given for a first-order run)."""
    from .guard import DivergenceGuard

    t = cfg.train
    spike = t.guard_spike
    if spike is None:
        spike = DEFAULT_GUARD_SPIKE if get_method(cfg.optim.method).zeroth_order else 0.0
    if not spike:
        return None
    return DivergenceGuard(spike, t.guard_window, t.guard_action, t.guard_rollback_steps, t.guard_lr_factor)
