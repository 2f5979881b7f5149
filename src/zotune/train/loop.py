"""``fit``: the one training loop (set up, step, log, evaluate, checkpoint, save)."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, apply_overrides, to_dict
from ..dist.context import DistContext, start
from ..dist.parallel import Layout, parallelize
from ..eval.evaluate import evaluate_task
from ..eval.scoring import encode
from ..optim import METHODS, ZOOptimizer
from ..tasks import get_task
from . import trajectory
from .checkpoint import latest_checkpoint, load_checkpoint, load_trainable, save_checkpoint, trainable_state
from .losses import LOSSES
from .plots import plot_run
from .run_folder import RunFolder
from .setup import (FIRST_ORDER, adapter_config, build_guard, build_optimizer, load_configured_model, method_options,
                    prepare_trainable, task_splits)


BEST = "best.safetensors"  # trainable weights at the best dev evaluation so far (train.keep_best)


class EpochSampler:
    """Batches of indices, reshuffled every epoch from (seed, epoch): a pure function of the step."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("no training examples")
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch_size

    def batch(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()


class DistributedRunError(RuntimeError):
    """A rank of a torchrun job failed or stopped answering (the collective timed out)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was written at ``step``."""

    def __init__(self, step: int, path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved in {path}")
        self.step, self.path = step, path


@contextmanager
def _stop_requests():
    """Turn SIGTERM/SIGINT into a flag checked between steps (restored afterwards)."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def validate(cfg: RunConfig) -> None:
    """Fail on bad names and contradictions before anything heavy is loaded."""
    get_task(cfg.data.task)
    method_options(cfg.optim)
    adapter_config(cfg.adapter)
    t = cfg.train
    if t.steps < 0 or t.batch_size < 1 or t.checkpoint_every < 0 or t.eval_every < 0:
        raise ConfigError("train.steps, train.eval_every and train.checkpoint_every must be >= 0, train.batch_size >= 1")
    if t.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints must be >= 1")
    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.data.icl_demos:
        raise ConfigError("data.icl_demos is the in-context baseline of `zotune eval`; training uses no demonstrations")
    if not (cfg.optim.lr >= 0 and cfg.optim.eps > 0 and cfg.optim.num_queries >= 1 and cfg.optim.weight_decay >= 0):
        raise ConfigError("need optim.lr >= 0, optim.eps > 0, optim.num_queries >= 1, optim.weight_decay >= 0")
    guard = build_guard(cfg)  # validates the guard's own fields
    if guard is not None and t.guard_action == "rollback":
        if cfg.optim.method in FIRST_ORDER:
            raise ConfigError("train.guard_action=rollback undoes ZO updates; use guard_action=skip with adamw")
        probe = METHODS[cfg.optim.method]([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.0, **method_options(cfg.optim))
        if not probe.rule.linear:
            raise ConfigError(
                f"train.guard_action=rollback undoes SGD-type updates; {cfg.optim.method!r} keeps moments "
                "(use mezo, lozo or tezo, or guard_action=skip)"
            )


def fit(cfg: RunConfig, say: Callable[[str], None] = print) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data.task`` with a ZO method; returns the results dict.

    Interrupted by SIGTERM/SIGINT, it writes a checkpoint and raises :class:`Interrupted`; the
    same command with ``--train.resume true`` continues bit-identically. Launched by ``torchrun``
    with several processes it runs data/query parallel (:mod:`zotune.dist`).
    """
    validate(cfg)
    ctx = start(cfg.model.device, cfg.train.dist_timeout)
    try:
        return _fit(cfg, ctx, say if ctx.is_main else (lambda _: None))
    except RuntimeError as err:
        if not ctx.enabled:
            raise
        # torch.distributed reports a dead or silent peer as a RuntimeError (DistBackendError)
        raise DistributedRunError(
            f"rank {ctx.rank} of {ctx.world_size}: the distributed run failed ({str(err).splitlines()[0][:200]}); "
            "a rank may have died or timed out. Continue from the last checkpoint with the same command and "
            "--train.resume true"
        ) from err
    finally:
        ctx.close()


def _fit(cfg: RunConfig, ctx: DistContext, say: Callable[[str], None]) -> dict:
    if ctx.enabled and cfg.model.device.startswith("cuda"):  # one GPU per process
        cfg = apply_overrides(cfg, {"model.device": f"cuda:{ctx.local_rank}"})
    if ctx.enabled and cfg.train.query_parallel > 1 and not cfg.optim.virtual:
        cfg = apply_overrides(cfg, {"optim.drift_safe": True})  # query shards must not write while measuring
    run_path = RunFolder.check(cfg) if ctx.is_main else None  # a bad run folder fails before anything is loaded
    run_path = ctx.broadcast(run_path)  # a default name holds rank 0's timestamp
    progress = cfg.train.progress and ctx.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task, splits, masked = task_splits(cfg)
    for note in splits.notes:
        say(f"note: {note}")
    model, tokenizer = load_configured_model(cfg.model)
    n_trainable = prepare_trainable(model, cfg)
    train_set, dev_set, test_set = (encode(tokenizer, s, cfg.model.max_length, masked)
                                    for s in (splits.train, splits.dev, splits.test))
    pad_id = tokenizer.pad_token_id
    loss_fn = LOSSES[task.train_as]
    guard = build_guard(cfg)
    # With the guard on, a NaN/inf step is one of its events (skipped), not an exception.
    optimizer = build_optimizer(cfg.optim, model, cfg.train.seed, nan_policy="skip" if guard else None)
    layout = Layout(ctx.world_size, ctx.rank, cfg.train.query_parallel)
    if ctx.enabled:
        if not isinstance(optimizer, ZOOptimizer):
            raise ConfigError(f"{cfg.optim.method} is first-order: distributed runs are for the ZO methods")
        parallelize(optimizer, layout)
    run = RunFolder.create(run_path, cfg, writer=ctx.is_main)

    metric = task.metric
    examples_of = {"dev": (splits.dev, dev_set), "test": (splits.test, test_set)}

    def evaluate(split, desc) -> dict[str, float]:  # rank 0 evaluates; the weights are identical on every rank
        if not ctx.is_main:
            return {metric: float("nan")}
        examples, encoded = examples_of[split]
        return evaluate_task(model, tokenizer, task, examples, encoded, cfg.train.eval_batch_size,
                             cfg.model.max_length, progress, desc)

    results: dict = {"task": task.name, "model": cfg.model.name, "method": cfg.optim.method,
                     "trainable_parameters": n_trainable, "test_examples": len(test_set), "notes": splits.notes}
    start_step = 0
    checkpoint = latest_checkpoint(run.path) if cfg.train.resume else None
    if checkpoint is not None:
        manifest = load_checkpoint(checkpoint, model, optimizer)
        start_step = manifest["step"]
        results.update(manifest["extra"].get("results", {}))
        if guard is not None:
            guard.load_state_dict(manifest["extra"].get("guard", {}))
        run.truncate_log(start_step)
        if ctx.is_main:
            trajectory.truncate(run.path, start_step)
        say(f"resumed {run.path} from step {start_step}")
    say(
        f"{cfg.model.name} on {task.name} ({splits.source}): {len(train_set)} train / {len(dev_set)} dev / "
        f"{len(test_set)} test; {cfg.optim.method}, {n_trainable:,} trainable parameters ({cfg.optim.trainable}); "
        f"run folder {run.path}"
    )
    if cfg.train.zero_shot and f"zero_shot_{metric}" not in results:
        results.update({f"zero_shot_{k}": v for k, v in evaluate("test", "zero-shot eval").items()})
        say(f"zero-shot {metric}: {100 * results[f'zero_shot_{metric}']:.1f}%")

    log = None  # the trajectory log of a ZO run (a first-order run cannot be replayed from scalars)
    if isinstance(optimizer, ZOOptimizer) and ctx.is_main:
        estimator = optimizer.estimator
        points = len(estimator.offsets) * optimizer.max_num_queries + estimator.needs_base_loss
        log = trajectory.TrajectoryWriter(
            run.path, {"config": to_dict(cfg), "trainable_names": list(trainable_state(model))}, points,
            len(optimizer.param_groups),
        )
    sampler = EpochSampler(len(train_set), cfg.train.batch_size, cfg.train.seed)
    total_epochs = cfg.train.steps / sampler.steps_per_epoch
    smoothed = math.nan
    clock = time.perf_counter()

    def checkpoint_now(step: int):
        if not ctx.is_main:
            return run.path
        extra = {
            "config": to_dict(cfg),  # the resolved configuration the run was started with
            "data": {"next_step": step, "seed": cfg.train.seed, "batch_size": sampler.batch_size,
                     "epoch": step // sampler.steps_per_epoch},  # the order is a function of these
            "results": results,
            "guard": guard.state_dict() if guard else {},
        }
        return save_checkpoint(run.path, step, model, optimizer, extra, cfg.train.keep_checkpoints)

    with _stop_requests() as stop, tqdm(total=cfg.train.steps, initial=start_step, desc="train",
                                        disable=not progress, unit="step") as bar:
        note = bar.write if ctx.is_main else (lambda _: None)
        for step in range(start_step, cfg.train.steps):
            batch = layout.shard_batch([train_set[i] for i in sampler.batch(step)])
            lrs = [group["lr"] for group in optimizer.param_groups]
            optimizer.start_epoch(step // sampler.steps_per_epoch, total_epochs)  # AdaZeta's query schedule
            t0 = time.perf_counter()
            loss = optimizer.step(lambda copies=None: loss_fn(model, batch, pad_id, copies),
                                  accept=guard.accept if guard else None)
            record = optimizer.last_record
            event = guard.after_step(optimizer, record, lrs) if guard else None
            if log is not None:
                log.append(step, record.losses, lrs, rejected=event is not None and event.kind == "spike",
                           rolled_back=event.rolled_back if event else 0)
            if event is not None:
                run.log(step=step + 1, event=event.kind, event_loss=event.loss, running_median=event.median,
                        rolled_back=event.rolled_back, lr_factor=event.lr_factor)
                note(f"step {step + 1}: divergence guard: {event.kind} (loss {event.loss:.4g}); "
                          f"rolled back {event.rolled_back}, lr x{event.lr_factor}")
            smoothed = loss if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss
            run.log(step=step + 1, loss=loss, lr=lrs[0], queries=len(record.projected_grads),
                    projected_grads=list(record.projected_grads), skipped=record.skipped,
                    seconds=round(time.perf_counter() - t0, 4))
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update()
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and dev_set:
                dev_score = evaluate("dev", "dev eval")[metric]
                run.log(step=step + 1, **{f"dev_{metric}": dev_score})
                note(f"step {step + 1}: dev {metric} {100 * dev_score:.1f}%")
                if cfg.train.keep_best and ctx.is_main and dev_score > results.get(f"best_dev_{metric}", -1.0):
                    results.update({f"best_dev_{metric}": dev_score, "best_step": step + 1})
                    save_file(trainable_state(model), str(run.path / BEST))
            if ctx.any(stop["stop"]):  # every rank stops after the same step
                if log is not None:
                    log.close()
                raise Interrupted(step + 1, checkpoint_now(step + 1))
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                checkpoint_now(step + 1)
    if log is not None:
        log.close()
    results["train_seconds"] = round(time.perf_counter() - clock, 1)
    results["steps"] = cfg.train.steps
    results["skipped_steps"] = optimizer.num_skipped

    if ctx.is_main:  # the final weights (replay rebuilds exactly these)
        save_file(trainable_state(model), str(run.path / "trainable.safetensors"))
    if "best_step" in results and ctx.is_main:  # the protocol tests the checkpoint with the best dev metric
        load_trainable(model, run.path / BEST)
        say(f"testing the weights of step {results['best_step']} (best dev {metric} "
            f"{100 * results[f'best_dev_{metric}']:.1f}%)")
    results.update(evaluate("test", "final eval"))
    if f"zero_shot_{metric}" in results:
        say(f"zero-shot {metric}: {100 * results[f'zero_shot_{metric}']:.1f}%  ->  fine-tuned {metric}: "
            f"{100 * results[metric]:.1f}%  ({len(test_set)} {task.name} test examples)")
    else:
        say(f"fine-tuned {metric}: {100 * results[metric]:.1f}% ({len(test_set)} test examples)")
    if ctx.is_main:
        plot_run(run.path)
    run.finish(results)
    return results
