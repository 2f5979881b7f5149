"""Command line: ``zotune train | eval | bench | replay | export | methods | tasks | configs``.

Configuration flags are dotted field names (``--optim.lr 1e-6`` or ``--optim.lr=1e-6``),
applied on top of an optional ``--config FILE.yaml`` (or a shipped paper config's name) and the built-in
defaults.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .config import ConfigError, RunConfig, apply_overrides, fields_of, load_yaml


USAGE = """usage: zotune COMMAND [--config FILE.yaml | --config NAME] [--section.field VALUE ...]
       zotune --version

commands:
  train     fine-tune a model with a ZO method (default: smollm2-135m on SST-2)
  eval      the test metric of a model on a task (zero-shot, or in-context with --data.icl_demos K)
  bench     step time and peak memory of the configured method against inference and backprop (AdamW)
  replay    zotune replay BASE_MODEL RUN_DIR [OUTPUT]: rebuild a run's weights from its trajectory log
  export    zotune export RUN_DIR OUT_DIR [--base-model NAME] [--trajectory]: the fine-tuned model as a
            folder that transformers loads (LoRA and LoRETTA_rep merged)
  methods   list the registered ZO methods
  tasks     list the tasks
  configs   list the shipped paper configs (--config takes their names, e.g. mezo/opt-13b/rte)

`zotune train --help` lists every configuration field.
"""


def _help_fields(config: RunConfig) -> str:
    """Every field of ``config``, then the options of every method (the chosen method's are the valid ones)."""
    from .config import method_option_fields
    from .optim import METHODS

    lines = ["configuration fields (override with --section.field VALUE):"]
    for name, (_, text, default) in fields_of(config).items():
        lines.append(f"  --{name:<24} {text} [default: {default}]")
    lines.append("\nmethod options (--optim.NAME; each method takes only its own, set with --optim.method):")
    for method in METHODS:
        options = method_option_fields(method)
        lines.append(f"  {method}: " + ("none" if not options else ""))
        for name, (_, text, default) in options.items():
            lines.append(f"    --optim.{name:<17} {text} [default: {default}]")
    return "\n".join(lines)


def _versions() -> str:
    """``zotune 0.1.0 (torch 2.11.0+cu130, transformers 5.17.0)``: what a bug report needs. torch's own
    version string (its package metadata lacks the build's CUDA tag); transformers' metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__

    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "not installed"
    return f"zotune {__version__} (torch {torch.__version__}, transformers {transformers})"


def _first_comment(path) -> str:
    """A shipped config's first line (``# MeZO, full-parameter, OPT-13B, rte.``), without the ``#``."""
    with open(path, encoding="utf-8") as file:
        return file.readline().removeprefix("#").strip()


def parse_config(argv: list[str]) -> RunConfig:
    overrides: dict[str, str] = {}
    config_path = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --optim.lr 1e-6")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
    config = load_yaml(config_path) if config_path else RunConfig()
    return apply_overrides(config, overrides)


def _list_methods(rest: list[str]) -> int:
    from .optim import METHODS

    for name, spec in METHODS.items():
        paths = "in place, drift-safe" + (", virtual" if spec.virtual else "") if spec.zeroth_order else "backprop"
        print(f"{name:<14} {spec.summary} [{paths}]")
    return 0


def _list_tasks(rest: list[str]) -> int:
    from .tasks import TASKS
    from .tasks.data import find_data_dir

    for name, task in sorted(TASKS.items()):
        local = find_data_dir(task)  # what a run from this folder reads (--data.data_dir aside)
        source = f"local {local / task.local_dir}" if local else "hub " + "/".join(filter(None, task.hub))
        print(f"{name:<10} {source}, trained as {task.train_as}")
    return 0


def _list_configs(rest: list[str]) -> int:
    from .config import shipped_configs

    for name, path in shipped_configs().items():
        print(f"{name:<28} {_first_comment(path)}")
    return 0


def _replay(rest: list[str]) -> int:
    from .train.replay import replay

    if len(rest) not in (2, 3):
        raise ConfigError("usage: zotune replay BASE_MODEL RUN_DIR [OUTPUT.safetensors]")
    replay(*rest)
    return 0


def _export(rest: list[str]) -> int:
    from .train.export import export

    options = {"--base-model": None, "--trajectory": False}
    paths = []
    args = iter(rest)
    for arg in args:
        if arg == "--trajectory":
            options[arg] = True
        elif arg == "--base-model":
            options[arg] = next(args, None)
            if options[arg] is None:
                raise ConfigError("--base-model needs a model name")
        else:
            paths.append(arg)
    if len(paths) != 2:
        raise ConfigError("usage: zotune export RUN_DIR OUT_DIR [--base-model NAME] [--trajectory]")
    export(*paths, base_model=options["--base-model"], from_trajectory=options["--trajectory"])
    return 0


def _train(rest: list[str]) -> int:
    from .train import loop

    config = parse_config(rest)
    try:
        loop.fit(config)
    except loop.Interrupted as stop:
        print(f"zotune: {stop}; continue with the same command and --train.resume true", file=sys.stderr)
        return 130
    except loop.DistributedRunError as err:
        print(f"zotune: error: {err}", file=sys.stderr)
        return 3
    return 0


def _eval(rest: list[str]) -> int:
    from .train.evaluate_only import evaluate_only

    evaluate_only(parse_config(rest))
    return 0


def _bench(rest: list[str]) -> int:
    from .bench.run import bench

    bench(parse_config(rest))
    return 0


# command -> what runs it, given the arguments after the command; returns the exit status
COMMANDS = {"train": _train, "eval": _eval, "bench": _bench, "replay": _replay, "export": _export,
            "methods": _list_methods, "tasks": _list_tasks, "configs": _list_configs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(_versions())
        return 0
    command, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("train", argv)
    if "-h" in rest or "--help" in rest or command in ("-h", "--help", "help"):
        print(USAGE + "\n" + _help_fields(RunConfig()))
        return 0
    try:
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
        return COMMANDS[command](rest)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"zotune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130


def entry(argv: list[str] | None = None) -> NoReturn:
    """The ``zotune`` console script and ``python -m zotune``: :func:`main`, then exit with its status.

    A rank of a ``torchrun`` job ends without the interpreter's teardown, which can abort a process
    that used gloo after it finished (:func:`zotune.dist.end_rank`).
    """
    try:
        code = main(argv)
    except BrokenPipeError:  # the reader left early (`zotune methods | head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        code = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .dist import end_rank

        end_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
