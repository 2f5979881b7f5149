"""``zotune bench``: step time and peak memory of the configured run against inference and backprop.

Three phases on the configured model, trainable set and task (one real training batch of
``train.batch_size`` examples), each in a fresh process so that one phase's memory cannot hide in
another's peak:

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

from ..config import RunConfig, apply_overrides, flatten, to_dict
from .memory import peak_read, peak_reset, synchronize

PHASES = ("inference", "zo", "backprop")


def _phase(config: dict, phase: str, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of ``phase``; runs in a child process."""
    from ..eval.scoring import encode
    from ..train.losses import LOSSES
    from ..train.setup import build_optimizer, load_configured_model, prepare_trainable, task_splits

    cfg = apply_overrides(RunConfig(), flatten(config))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task, splits, masked = task_splits(cfg, n_train=cfg.train.batch_size, n_dev=0, n_test=0)
    model, tokenizer = load_configured_model(cfg.model)
    prepare_trainable(model, cfg)
    batch = encode(tokenizer, splits.train[: cfg.train.batch_size], cfg.model.max_length, masked)
    loss_fn = LOSSES[task.train_as]
    closure = lambda copies=None: loss_fn(model, batch, tokenizer.pad_token_id, copies)  # noqa: E731
    if phase == "inference":
        def step():
            with torch.no_grad():
                closure()
    else:
        optim = cfg.optim if phase == "zo" else apply_overrides(cfg, {"optim.method": "adamw"}).optim
        optimizer = build_optimizer(optim, model, cfg.train.seed)
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


def bench(cfg: RunConfig, repeats: int = 3, say: Callable[[str], None] = print) -> dict:
    """Measure the three phases and print a table; returns {phase: {"seconds", "peak_mib"}}."""
    from ..train.loop import validate

    validate(cfg)
    if cfg.optim.method == "adamw":
        from ..config import ConfigError

        raise ConfigError("zotune bench compares a ZO method with backprop: set optim.method to a ZO method")
    context = multiprocessing.get_context("spawn")
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
