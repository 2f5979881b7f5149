"""Typed run configuration: dataclasses are the source of truth.

YAML files and dotted command-line flags (``--optim.lr 1e-6``) only override fields;
unknown names are rejected with the list of valid ones before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    device_map: typing.Optional[str] = _f(None, "spread a model too large for one device: auto (accelerate places "
                                                "the layers over the GPUs, then the CPU); replaces model.device")
    max_length: int = _f(256, "longest prompt + candidate in tokens; prompts are cut from the left")
    offload: typing.Optional[str] = _f(None, "cpu: keep the repeated blocks' weights in CPU memory and upload each "
                                             "once per step to model.device (a model larger than the GPU; mezo, "
                                             "adazeta, no weight decay)")
    tf32: bool = _f(True, "on CUDA, float32 matrix products run on TF32 tensor cores (float32 accumulation; "
                          "what PyTorch calls 'high' precision); false: exact float32 products, several times "
                          "slower")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run")


@dataclass
class DataConfig:
    task: str = _f("sst2", "task name (see `zotune tasks`)")
    data_dir: typing.Optional[str] = _f(None, "folder with local task files; default: $ZOTUNE_DATA, ../shared/data, "
                                              "./data, else the hub")
    n_train: typing.Optional[int] = _f(None, "training examples sampled (default: the task's protocol, 1000)")
    n_dev: typing.Optional[int] = _f(None, "development examples sampled from the training split (default 500; 100 "
                                           "for CB, COPA)")
    n_test: typing.Optional[int] = _f(None, "test examples sampled from the validation split (default 1000, capped "
                                            "by what exists)")
    seed: int = _f(0, "data sampling seed (the protocol's train_set_seed)")
    k_shot: typing.Optional[int] = _f(None, "LM-BFF protocol: k training and k dev examples per class (data seeds "
                                            "13, 21, 42, 87, 100); the whole test split")
    icl_demos: int = _f(0, "zotune eval: prepend this many training examples with their answers to every test prompt "
                           "(in-context learning)")


@dataclass
class OptimConfig:
    """The options every method shares; a method's own options (``optim.rank``, ``optim.beta``...)
    come from its spec in :mod:`zotune.optim.registry` and live in :attr:`options`."""

    method: str = _f("mezo", "ZO method (see `zotune methods`), or adamw for the first-order (backprop) baseline")
    lr: typing.Optional[float] = _f(None, "learning rate η (default: the method's for the kind of trainable set, "
                                          "see docs/methods.md)")
    eps: float = _f(1e-3, "perturbation scale ε")
    num_queries: int = _f(1, "directions per step q")
    two_sided: bool = _f(True, "central (2 forwards per query) or forward difference")
    weight_decay: float = _f(0.0, "coupled weight decay λ; never applied to norms and biases")
    trainable: typing.Optional[str] = _f(None, "parameters to tune: auto (the adapters when adapter.kind is set, "
                                               "else all: full fine-tuning, the papers' setting), all, final_norm "
                                               "(the model family's), norms, adapters, or regex:<pattern> over "
                                               "parameter names; unset: the built-in demo's choice, the adapters "
                                               "when adapter.kind is set, else final_norm")
    drift_safe: typing.Optional[bool] = _f(None, "perturb at use instead of in place (default: on for "
                                                 "float16/bfloat16)")
    virtual: bool = _f(False, "measure all ±ε points in one batched forward, never writing the weights (methods "
                              "with factored directions: lozo*, tezo*)")
    batched: bool = _f(False, "small trainable sets (adapters, LoRA, norms): measure all points of a step in one "
                              "forward over copies of the batch, the trainable modules run once per copy with "
                              "their perturbed parameters (any ZO method)")
    copies_per_forward: typing.Optional[int] = _f(None, "virtual, batched: at most this many of a step's copies of the "
                                                        "batch per forward (default: all; lower it to bound "
                                                        "activation memory)")
    nan_policy: str = _f("raise", "on a NaN/inf loss: raise, or skip the update")
    # The chosen method's own options by name (set as optim.<name>; checked against its spec).
    options: dict = field(default_factory=dict, metadata={"method_options": True})


@dataclass
class AdapterConfig:
    kind: str = _f("none", "adapters to insert: none, adp (LoRETTA_adp / AdaZeta), rep (LoRETTA_rep) or lora (PEFT "
                           "LoRA, needs peft)")
    tt_rank: int = _f(5, "inner tensor-train rank")
    bottleneck: int = _f(64, "adp: adapter width b")
    nonlinearity: str = _f("relu", "adp: activation between the two TT maps")
    function_preserving: bool = _f(True, "adp: subtract the initial adapter's output so the model starts unchanged "
                                         "(false: the paper's start, the adapters as random maps)")
    r: int = _f(8, "rep and lora: rank r (rep: the width between TT_A and TT_B)")
    alpha: float = _f(16.0, "rep and lora: scale s = alpha / r")
    dropout: float = _f(0.0, "rep and lora: dropout on the adapter input")
    train_norms: typing.Optional[bool] = _f(None, "also train the norm layers (default: true for adp as LoRETTA, "
                                                  "false for rep; AdaZeta uses false)")
    target_modules: typing.Optional[list] = _f(None, "module names to adapt (default: the architecture's table)")
    seed: int = _f(0, "seed of the adapters' initialisation")


@dataclass
class TrainConfig:
    steps: int = _f(150, "ZO steps")
    batch_size: int = _f(16, "examples per step")
    eval_every: typing.Optional[int] = _f(None, "evaluate on dev every this many steps (default: 5 times a run, "
                                                "every steps/5; 0: never during training)")
    keep_best: bool = _f(True, "with dev evaluations: test (and save) the weights of the best one, as the MeZO "
                               "protocol does")
    eval_batch_size: int = _f(32, "examples per evaluation forward")
    zero_shot: bool = _f(True, "measure test accuracy before training too")
    seed: int = _f(0, "run seed: data order and every ZO direction derive from it")
    output_dir: str = _f("runs", "where run folders are written")
    run_name: typing.Optional[str] = _f(None, "run folder name (default: task-method-timestamp)")
    lr_schedule: str = _f("constant", "learning rate over the run: constant (the papers' ZO runs), linear (down to 0 "
                                      "at the last step) or cosine")
    warmup_steps: int = _f(0, "steps of linear learning-rate warm-up before the schedule")
    guard_spike: typing.Optional[float] = _f(None, "divergence guard: skip a step with a NaN/inf loss or a loss "
                                                   "above this factor times the running median, and say so "
                                                   "(default: 5 for ZO methods, off for adamw; 0: off, and a "
                                                   "NaN/inf loss then stops the run)")
    guard_window: int = _f(50, "divergence guard: accepted losses in the running median")
    guard_action: str = _f("skip", "divergence guard: skip the suspect update, or rollback the ones before it too")
    guard_rollback_steps: int = _f(1, "divergence guard: updates undone by a rollback (SGD-type methods)")
    guard_lr_factor: float = _f(1.0, "divergence guard: multiply every learning rate by this after an event")
    checkpoint_every: int = _f(100, "save a checkpoint every this many steps (0: only when interrupted); also on "
                                    "SIGTERM/SIGINT")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    checkpoint: typing.Optional[str] = _f(None, "what a checkpoint holds: weights (the trainable weights and the "
                                                "optimizer state) or trajectory (the optimizer state only; a resume "
                                                "replays the trajectory log onto the base model; ZO methods). "
                                                "Default: trajectory for SGD-type ZO methods training over 1B "
                                                "parameters, else weights")
    resume: bool = _f(False, "continue the run in output_dir/run_name from its last complete checkpoint")
    progress: bool = _f(True, "show progress bars")
    report_to: list[str] = _f([], "also send the log's numbers to these: tensorboard (a tensorboard/ folder in the "
                                  "run folder), wandb (Weights & Biases; WANDB_PROJECT, WANDB_MODE apply); "
                                  "e.g. tensorboard,wandb")
    cuda_graphs: bool = _f(True, "on CUDA, replay the training forwards of the in-place and batched paths from CUDA "
                                 "graphs (sequence lengths padded to multiples of 8, coarser above 32 tokens: at most "
                                 "a quarter longer); falls back to eager forwards, with a warning, where capture fails")
    compile: bool = _f(False, "with cuda_graphs: compile the training forward with torch.compile (inductor) before "
                              "capturing it, which fuses the network's elementwise kernels; each new shape costs "
                              "a compilation (tens of seconds) at its first step; falls back, with a warning, to "
                              "the uncompiled forward where compilation fails")
    threads: typing.Optional[int] = _f(None, "torch CPU threads (default: torch's choice)")
    sharding: str = _f("none", "under torchrun: fsdp shards every parameter over the ranks with FSDP2 (each rank "
                               "perturbs and updates its shard, the forward gathers; every ZO method; checkpoints "
                               "are trajectories); none: every rank holds the whole model")
    query_parallel: int = _f(1, "under torchrun: ranks that split each step's queries (the others split the batch); "
                                "must divide the world size")
    dist_timeout: float = _f(1800.0, "under torchrun: seconds a rank waits for the others (a dead rank fails the job "
                                     "after this); must exceed an evaluation's duration")


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
            if len(options) < len(typing.get_args(annotation)):
                return None
            raise ConfigError(f"{key}: a value is required")
        for i, option in enumerate(options):  # the first member that takes the value (int before str: 4, auto)
            try:
                return _coerce(value, option, key)
            except ConfigError:
                if i == len(options) - 1:
                    raise
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
    if origin is tuple:
        items = _coerce(value, list, key)
        members = typing.get_args(annotation)
        if len(members) != len(items):
            raise ConfigError(f"{key}: expected {len(members)} values such as [0.9, 0.999], got {value!r}")
        return tuple(_coerce(item, member, key) for item, member in zip(items, members))
    if annotation is list or origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}") from None
            if isinstance(value, str):  # a, or a,b: the command line's short forms
                value = [item.strip() for item in value.split(",") if item.strip()]
            elif value is None:
                value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def fields_of(config: Any, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Every leaf field as dotted name -> (annotation, help, current value).

    The method options of ``optim`` are the chosen method's, from its spec.
    """
    out = {}
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if f.metadata.get("method_options"):
            for option, (annotation, text, default) in method_option_fields(config.method).items():
                out[f"{prefix}{option}"] = (annotation, text, value.get(option, default))
        elif dataclasses.is_dataclass(value):
            out.update(fields_of(value, name + "."))
        else:
            out[name] = (hints[f.name], f.metadata.get("help", ""), value)
    return out


def method_option_fields(method: str) -> dict[str, tuple[Any, str, Any]]:
    """The options of ``method`` as name -> (annotation, help, default); none for an unknown method
    (reported by the run's checks with the valid names)."""
    from .optim.registry import METHODS  # the registry imports torch: only when a config is resolved

    spec = METHODS.get(method)
    if spec is None:
        return {}
    hints = typing.get_type_hints(spec.options)
    return {f.name: (hints[f.name], f.metadata.get("help", ""), f.default) for f in dataclasses.fields(spec.options)}


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    """The error for an unknown key: the nearest valid one first, or whose option it is."""
    from .optim.registry import METHODS

    owners = [name for name in METHODS if key.startswith("optim.") and key[6:] in method_option_fields(name)]
    if owners:
        return ConfigError(f"{key} is not an option of the chosen method; it belongs to {', '.join(owners)} "
                           "(set optim.method first)")
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return ConfigError(f"unknown config key {key}; {hint}valid keys: {', '.join(known)}")


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set dotted keys on (a copy of) ``config``; unknown keys fail with the nearest valid one.

    ``optim.method`` is applied first, since the method decides which ``optim.<option>`` keys exist;
    options already set that the final method does not take are an error.
    """
    result = dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section))
        for section in ("model", "data", "optim", "adapter", "train")
    })
    result.optim.options = dict(config.optim.options)
    ordered = sorted(overrides.items(), key=lambda item: item[0] != "optim.method")
    for key, value in ordered:
        known = fields_of(result)
        if key not in known or key == "optim.options":
            raise _unknown_key(key, [k for k in known if k != "optim.options"])
        section, name = key.split(".", 1)
        value = _coerce(value, known[key][0], key)
        if section == "optim" and name in method_option_fields(result.optim.method):
            result.optim.options[name] = value
        else:
            setattr(getattr(result, section), name, value)
    from .optim.registry import METHODS  # (an unknown method is reported by the run's checks, with the valid names)

    stray = [name for name in result.optim.options if name not in method_option_fields(result.optim.method)]
    if stray and result.optim.method in METHODS:
        raise ConfigError(f"method {result.optim.method!r} takes no option "
                          f"{', '.join('optim.' + name for name in stray)}")
    return result


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # <method>/<model>/<task>.yaml: the papers' settings


def shipped_configs() -> dict[str, Path]:
    """The paper configs installed with the package, by name (``mezo/opt-13b/rte``)."""
    return {path.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix(): path
            for path in sorted(SHIPPED_CONFIGS.glob("*/*/*.yaml"))}


def config_file(name: str | Path) -> Path:
    """The YAML file ``--config`` names: a file, or else a shipped config's name (``mezo/opt-13b/rte``; a
    ``.yaml`` suffix and a leading ``configs/``, as the repository's paths read, are allowed)."""
    path = Path(name)
    if path.is_file():
        return path
    key = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = shipped_configs()
    if key in shipped:
        return shipped[key]
    close = difflib.get_close_matches(key, shipped, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `zotune configs` lists the shipped ones"
    raise FileNotFoundError(f"config file not found: {name} (no such file, nor a shipped config of that name{hint})")


def load_yaml(path: str | Path, config: RunConfig | None = None) -> RunConfig:
    """``config`` (the defaults if None) overridden by the YAML file ``path`` (a file, or a shipped config's
    name: :func:`config_file`)."""
    path = config_file(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # the parser's own reason, at the file's line and column
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {reason}") from None
    sections = [field.name for field in dataclasses.fields(RunConfig)]
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(sections)})")
    for name, section in tree.items():
        if name in sections and not isinstance(section, dict):
            raise ConfigError(f"{path}: section {name} must be a mapping of its fields (`{name}:` then indented "
                              f"`field: value` lines), got {section!r}")
    try:
        return apply_overrides(config or RunConfig(), flatten(tree))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def from_dict(tree: dict) -> RunConfig:
    """The configuration a :func:`to_dict` tree (a run's record) describes; null leaves keep their defaults."""
    return apply_overrides(RunConfig(), {key: value for key, value in flatten(tree).items() if value is not None})


def to_dict(config: RunConfig) -> dict:
    """The configuration as nested plain data, method options inline in ``optim`` (as a YAML file writes them)."""
    tree = dataclasses.asdict(config)
    options = tree["optim"].pop("options")
    tree["optim"].update({name: list(v) if isinstance(v, tuple) else v for name, v in options.items()})
    return tree
