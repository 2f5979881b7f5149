"""``zotune bench``: step time and peak memory of the configured run against inference and backprop.

Three phases on the configured model, trainable set and task (one real training batch of
``train.batch_size`` examples), each in a fresh process (see :func:`_fresh_processes`) so that one
phase's memory cannot hide in another's peak:

* inference: one forward of the batch (the memory floor every method is measured against);
* zo: the configured ZO method's step;
* backprop: an AdamW step over the same trainable parameters (the first-order baseline).

Each phase runs one warm-up step, then ``repeats`` timed steps (median).
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig, from_dict, to_dict
from .memory import peak_read, peak_reset, synchronize

PHASES = ("inference", "zo", "backprop")


def _phase(config: dict, phase: str, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of ``phase``; runs in a child process."""
    from ..train.losses import LOSSES
    from ..train.recipe import setup
    from ..train.setup import build_optimizer

    if phase == "backprop":  # AdamW over the same trainable set, at its own default lr unless one was given
        config = {**config, "optim": {"method": "adamw", "lr": config["optim"]["lr"],
                                      "trainable": config["optim"]["trainable"]}}
    pieces = setup(from_dict(config), sizes=(config["train"]["batch_size"], 0, 0), say=lambda _: None)
    cfg, model = pieces.cfg, pieces.model
    batch = pieces.encode(pieces.splits.train[: cfg.train.batch_size])
    loss_fn = LOSSES[pieces.task.train_as]
    closure = lambda copies=None: loss_fn(model, batch, pieces.tokenizer.pad_token_id, copies)  # noqa: E731
    if phase == "inference":
        def step():
            with torch.no_grad():
                closure()
    else:
        optimizer = build_optimizer(cfg.optim, model, cfg.train.seed)
        step = lambda: optimizer.step(closure)  # noqa: E731
    device = cfg.model.device
    step()  # warm-up: first-step allocations (moments, caches) belong to the steady state
    peak_reset(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_read(device)


def _child(config: dict, phase: str, repeats: int, queue) -> None:
    try:
        queue.put(("ok", _phase(config, phase, repeats)))
    except BaseException as err:  # reported by the parent with the phase's name
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _fresh_processes():
    """A multiprocessing context whose processes hold nothing of this one's memory: forked from a server that
    has imported torch, transformers and the training code once (each phase then starts without those
    seconds of imports), or spawned where the platform has no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["transformers", "zotune.train.recipe", "zotune.train.setup", "zotune.bench.run"])
    return context


def bench(cfg: RunConfig, repeats: int = 3, say: Callable[[str], None] = print) -> dict:
    """Measure the three phases and print a table; returns {phase: {"seconds", "peak_mib"}}."""
    from ..config import ConfigError
    from ..optim import get_method
    from ..train.validate import validate

    validate(cfg)
    if not get_method(cfg.optim.method).zeroth_order:
        raise ConfigError("zotune bench compares a ZO method with backprop: set optim.method to a ZO method")
    context = _fresh_processes()
    results = {}
    for phase in PHASES:
        queue = context.Queue()
        child = context.Process(target=_child, args=(to_dict(cfg), phase, repeats, queue))
        child.start()
        status, value = queue.get()
        child.join()
        if status != "ok":
            raise RuntimeError(f"zotune bench: the {phase} phase failed: {value}")
        results[phase] = {"seconds": value[0], "peak_mib": value[1]}
    base = results["inference"]
    say(f"{cfg.model.name}, {cfg.optim.method}, trainable {cfg.optim.trainable}, adapter {cfg.adapter.kind}, "
        f"{cfg.data.task} batch {cfg.train.batch_size}, {cfg.model.dtype} on {cfg.model.device} (median of {repeats})")
    say("| phase | seconds | vs inference | peak MiB | vs inference |")
    say("|---|---|---|---|---|")
    for phase, row in results.items():
        say(f"| {phase} | {row['seconds']:.3f} | {row['seconds'] / base['seconds']:.2f}x | {row['peak_mib']:.0f} | "
            f"{row['peak_mib'] / base['peak_mib']:.2f}x |")
    out = Path(cfg.train.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": to_dict(cfg), "repeats": repeats, "results": results}, indent=2))
    say(f"written to {out}")
    return results
