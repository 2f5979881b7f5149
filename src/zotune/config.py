"""Typed run configuration: dataclasses are the source of truth.

YAML files and dotted command-line flags (``--optim.lr 1e-6``) only override fields;
unknown names are rejected with the list of valid ones before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m", "built-in alias (smollm2-135m, minilm-l6), local model folder, or hub id")
    dtype: str = _f("float32", "weights dtype: float32, bfloat16 or float16")
    device: str = _f("cpu", "device for the model, e.g. cpu, cuda, cuda:1")
    device_map: typing.Optional[str] = _f(None, "spread a model too large for one device: auto (accelerate places the layers over the GPUs, then the CPU); replaces model.device")
    max_length: int = _f(256, "longest prompt + candidate in tokens; prompts are cut from the left")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run")


@dataclass
class DataConfig:
    task: str = _f("sst2", "task name (see `zotune tasks`)")
    data_dir: typing.Optional[str] = _f(None, "folder with local task files; default: $ZOTUNE_DATA, ../shared/data, ./data, else the hub")
    n_train: typing.Optional[int] = _f(None, "training examples sampled (default: the task's protocol, 1000)")
    n_dev: typing.Optional[int] = _f(None, "development examples sampled from the training split (default 500; 100 for CB, COPA)")
    n_test: typing.Optional[int] = _f(None, "test examples sampled from the validation split (default 1000, capped by what exists)")
    seed: int = _f(0, "data sampling seed (the protocol's train_set_seed)")
    k_shot: typing.Optional[int] = _f(None, "LM-BFF protocol: k training and k dev examples per class (data seeds 13, 21, 42, 87, 100); the whole test split")
    icl_demos: int = _f(0, "zotune eval: prepend this many training examples with their answers to every test prompt (in-context learning)")


@dataclass
class OptimConfig:
    method: str = _f("mezo", "ZO method (see `zotune methods`), or adamw for the first-order (backprop) baseline")
    lr: float = _f(1e-2, "learning rate η (the default suits the default trainable set; full fine-tuning needs ~1e-6)")
    eps: float = _f(1e-3, "perturbation scale ε")
    num_queries: int = _f(1, "directions per step q")
    two_sided: bool = _f(True, "central (2 forwards per query) or forward difference")
    weight_decay: float = _f(0.0, "coupled weight decay λ; never applied to norms and biases")
    beta: typing.Optional[float] = _f(None, "momentum β (momentum methods; default: the method's)")
    form: typing.Optional[str] = _f(None, "momentum form: ema or heavy_ball (mezo_momentum)")
    betas: typing.Optional[list] = _f(None, "Adam (β1, β2) (adam methods)")
    rank: typing.Optional[str] = _f(None, "rank r of the directions (lozo*, tezo*: an integer; tezo* also 'auto')")
    nu: typing.Optional[int] = _f(None, "steps per V window ν (lozo*)")
    scale: typing.Optional[float] = _f(None, "κ in ĝ = κ g Z (lozo*, tezo*; 1 matches the published learning rates)")
    r_th: typing.Optional[float] = _f(None, "singular-value threshold of rank='auto' (tezo*)")
    r_max: typing.Optional[int] = _f(None, "rank cap of rank='auto' (tezo*)")
    q_alpha: typing.Optional[float] = _f(None, "query schedule multiplier α in Q_e = min(max(floor(α e^β), 1), Q_max) (adazeta)")
    q_max: typing.Optional[int] = _f(None, "query schedule cap Q_max (adazeta)")
    q_beta: typing.Optional[float] = _f(None, "query schedule exponent β (adazeta; default: derived from q_target and the run's epochs)")
    q_target: typing.Optional[float] = _f(None, "uncapped query count aimed at for the last epoch when β is derived (adazeta)")
    trainable: str = _f("auto", "parameters to tune: auto (the adapters when adapter.kind is set, else the final norm: regex:^model\\.norm\\.weight$), all, norms, adapters, or regex:<pattern> over parameter names")
    drift_safe: typing.Optional[bool] = _f(None, "perturb at use instead of in place (default: on for float16/bfloat16)")
    virtual: bool = _f(False, "measure all ±ε points in one batched forward, never writing the weights (lozo*, tezo*)")
    copies_per_forward: typing.Optional[int] = _f(None, "virtual: at most this many of a step's ±ε copies of the batch per forward (default: all; lower it to bound activation memory)")
    nan_policy: str = _f("raise", "on a NaN/inf loss: raise, or skip the update")


@dataclass
class AdapterConfig:
    kind: str = _f("none", "adapters to insert: none, adp (LoRETTA_adp / AdaZeta), rep (LoRETTA_rep) or lora (PEFT LoRA, needs peft)")
    tt_rank: int = _f(5, "inner tensor-train rank")
    bottleneck: int = _f(64, "adp: adapter width b")
    nonlinearity: str = _f("relu", "adp: activation between the two TT maps")
    function_preserving: bool = _f(False, "adp: subtract the initial adapter's output so the model starts unchanged")
    r: int = _f(8, "rep and lora: rank r (rep: the width between TT_A and TT_B)")
    alpha: float = _f(16.0, "rep and lora: scale s = alpha / r")
    dropout: float = _f(0.0, "rep and lora: dropout on the adapter input")
    train_norms: typing.Optional[bool] = _f(None, "also train the norm layers (default: true for adp as LoRETTA, false for rep; AdaZeta uses false)")
    target_modules: typing.Optional[list] = _f(None, "module names to adapt (default: the architecture's table)")
    seed: int = _f(0, "seed of the adapters' initialisation")


@dataclass
class TrainConfig:
    steps: int = _f(150, "ZO steps")
    batch_size: int = _f(16, "examples per step")
    eval_every: int = _f(0, "evaluate on dev every this many steps (0: never during training)")
    keep_best: bool = _f(True, "with dev evaluations: test (and save) the weights of the best one, as the MeZO protocol does")
    eval_batch_size: int = _f(32, "examples per evaluation forward")
    zero_shot: bool = _f(True, "measure test accuracy before training too")
    seed: int = _f(0, "run seed: data order and every ZO direction derive from it")
    output_dir: str = _f("runs", "where run folders are written")
    run_name: typing.Optional[str] = _f(None, "run folder name (default: task-method-timestamp)")
    guard_spike: float = _f(0.0, "divergence guard: reject a step whose loss exceeds this factor times the running median (0: off; NaN/inf steps are then skipped, not raised)")
    guard_window: int = _f(50, "divergence guard: accepted losses in the running median")
    guard_action: str = _f("skip", "divergence guard: skip the suspect update, or rollback the ones before it too")
    guard_rollback_steps: int = _f(1, "divergence guard: updates undone by a rollback (SGD-type methods)")
    guard_lr_factor: float = _f(1.0, "divergence guard: multiply every learning rate by this after an event")
    checkpoint_every: int = _f(100, "save a checkpoint every this many steps (0: only when interrupted); also on SIGTERM/SIGINT")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    resume: bool = _f(False, "continue the run in output_dir/run_name from its last complete checkpoint")
    progress: bool = _f(True, "show progress bars")
    tensorboard: bool = _f(False, "also log to TensorBoard in the run folder (needs the tensorboard package)")
    threads: typing.Optional[int] = _f(None, "torch CPU threads (default: torch's choice)")
    query_parallel: int = _f(1, "under torchrun: ranks that split each step's queries (the others split the batch); must divide the world size")
    dist_timeout: float = _f(1800.0, "under torchrun: seconds a rank waits for the others (a dead rank fails the job after this); must exceed an evaluation's duration")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type, or a contradiction in a configuration."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is list or origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def fields_of(config: Any, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Every leaf field as dotted name -> (annotation, help, current value)."""
    out = {}
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(fields_of(value, name + "."))
        else:
            out[name] = (hints[f.name], f.metadata.get("help", ""), value)
    return out


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set dotted keys on (a copy of) ``config``; unknown keys fail with the valid ones."""
    known = fields_of(config)
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    result = dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section)) for section in ("model", "data", "optim", "adapter", "train")
    })
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        setattr(getattr(result, section), name, _coerce(value, known[key][0], key))
    return result


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_yaml(path: str | Path, config: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, optim, adapter, train)")
    try:
        return apply_overrides(config or RunConfig(), flatten(tree))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
