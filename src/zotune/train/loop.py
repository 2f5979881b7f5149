"""``fit``: the one training loop, as phases (torchtune's recipe shape).

:class:`Training` holds a run's state and offers the phases: ``resume`` (from the newest
checkpoint), ``step`` (one optimizer step, guarded and logged), ``evaluate_and_checkpoint``
(what happens between steps) and ``finish`` (final weights, test metric, plot, results).
:func:`fit` reads as the loop itself. The pieces are built by :func:`zotune.train.recipe.setup`,
shared with bench, replay and eval.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import adapters
from ..config import RunConfig, apply_overrides, to_dict
from ..dist.context import DistContext, start
from ..dist.parallel import Layout
from ..dist.sharding import shard
from ..eval.evaluate import evaluate_task
from ..optim import get_method
from . import trajectory
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_trainable, save_checkpoint,
                         trainable_names, trainable_state, whole_optimizer_state)
from .losses import LOSSES
from .plots import plot_run
from .recipe import setup
from .replay import apply_records
from .run_folder import RunFolder
from .schedule import lr_multiplier
from .setup import build_guard, build_optimizer, checkpoint_kind, training_forward
from .validate import validate, validate_launch

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


def fit(cfg: RunConfig, say: Callable[[str], None] = print) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data.task``; returns the results dict.

    Interrupted by SIGTERM/SIGINT, it writes a checkpoint and raises :class:`Interrupted`; the
    same command with ``--train.resume true`` continues bit-identically. Launched by ``torchrun``
    with several processes it runs data/query parallel (:mod:`zotune.dist`).
    """
    validate(cfg)
    ctx = start(cfg.model.device, cfg.train.dist_timeout)
    validate_launch(cfg, distributed=ctx.enabled)  # before anything loads
    try:
        with Training(cfg, ctx, say if ctx.is_main else (lambda _: None)) as run:
            first = run.resume()
            run.zero_shot()
            with _stop_requests() as stop, run.progress(first) as bar:
                for step in range(first, cfg.train.steps):
                    loss = run.step(step)
                    bar.set_postfix(run.progress_fields(loss))
                    bar.update()
                    run.evaluate_and_checkpoint(step + 1, stop_requested=ctx.any(stop["stop"]))
            results = run.finish()
        # The model goes before the process group: a sharded model's FSDP state holds the group and gloo's
        # pending work, and tearing those down at the interpreter's exit could abort a rank.
        del run
        gc.collect()
        ctx.close(finished=True)
        return results
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


class Training:
    """A training run's state and phases; a context manager that closes its logs however the run ends."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, say: Callable[[str], None]) -> None:
        if ctx.enabled and cfg.model.device.startswith("cuda"):  # one GPU per process
            cfg = apply_overrides(cfg, {"model.device": f"cuda:{ctx.local_rank}"})
        self.ctx, self.say = ctx, say
        changes: dict = {}
        if ctx.is_main:  # a bad run folder, or a resume that contradicts its record, fails before anything loads
            path = RunFolder.check(cfg)
            if cfg.train.resume:
                cfg, changes = RunFolder.resumed_config(cfg, path)
        path, cfg = ctx.broadcast((path if ctx.is_main else None, cfg))  # a default name holds rank 0's timestamp
        self.resume_changes = changes
        pieces = setup(cfg, say=say)
        self.cfg = cfg = pieces.cfg  # the learning rate resolved for the trainable set
        self.sharded = cfg.train.sharding == "fsdp"
        if self.sharded:
            if cfg.optim.options.get("generator", "auto") == "auto":  # recorded, so that replay draws the same
                self.cfg = cfg = apply_overrides(cfg, {"optim.generator": "philox"})
            shard(pieces.model)
        self.model, self.task, self.splits, self.n_trainable = pieces.model, pieces.task, pieces.splits, \
            pieces.n_trainable
        self.train_set, self.dev_set, self.test_set = (pieces.encode(s) for s in
                                                       (pieces.splits.train, pieces.splits.dev, pieces.splits.test))
        self._evaluate_args = (pieces.tokenizer, cfg.train.eval_batch_size, cfg.model.max_length)
        self.pad_id = pieces.tokenizer.pad_token_id
        self.loss_fn = LOSSES[self.task.train_as]
        self.guard = build_guard(cfg)
        self.layout = Layout(ctx.world_size, ctx.rank, cfg.train.query_parallel)
        # With the guard on, a NaN/inf step is one of its events (skipped), not an exception.
        self.optimizer = build_optimizer(cfg.optim, self.model, cfg.train.seed,
                                         nan_policy="skip" if self.guard else None,
                                         layout=self.layout if ctx.enabled else None)
        self.spec = get_method(cfg.optim.method)
        # each group's lr before any schedule or guard event (a resume sets the groups from these again)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.checkpoint_kind = "trajectory" if self.sharded else \
            checkpoint_kind(cfg.train.checkpoint, self.spec, self.n_trainable)
        self.train_model = training_forward(self.model, cfg, self.optimizer, pieces.masked, say)  # CUDA graphs
        self.trainable_name = cfg.optim.trainable or ("adapters" if cfg.adapter.kind != "none" else "final_norm")
        self.run = RunFolder.create(path, cfg, writer=ctx.is_main)
        self.trajectory = None  # the log a ZO run can be rebuilt from (a first-order run cannot)
        self.metric = self.task.metric
        self.sampler = EpochSampler(len(self.train_set), cfg.train.batch_size, cfg.train.seed)
        self.results: dict = {"task": self.task.name, "model": cfg.model.name, "method": cfg.optim.method,
                              "lr": cfg.optim.lr, "trainable_parameters": self.n_trainable,
                              "test_examples": len(self.test_set), "notes": self.splits.notes}
        every = cfg.train.eval_every
        self.eval_every = max(cfg.train.steps // 5, 1) if every is None else every  # 0: no dev evaluation
        self._smoothed = math.nan
        self._clock = time.perf_counter()

    def __enter__(self) -> "Training":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the run's log files (idempotent): on success, interruption or any error."""
        if self.trajectory is not None:
            self.trajectory.close()
        self.run.close()

    # ------------------------------------------------------------ phases
    def resume(self) -> int:
        """Continue from the newest complete checkpoint when asked; returns the first step to run."""
        cfg, run = self.cfg, self.run
        first = 0
        checkpoint = latest_checkpoint(run.path) if cfg.train.resume else None
        if checkpoint is not None:
            manifest = load_checkpoint(checkpoint, self.model, self.optimizer, replay=self._replay_trajectory)
            first = manifest["step"]
            self.results.update(manifest["extra"].get("results", {}))
            if self.guard is not None:
                self.guard.load_state_dict(manifest["extra"].get("guard", {}))
            run.truncate_log(first)
            if self.ctx.is_main:
                trajectory.truncate(run.path, first)
            run.log(step=first, event="resumed", changed=self.resume_changes)
            changed = "".join(f"; {key} {old} -> {new} from here on" for key, (old, new) in self.resume_changes.items())
            self.say(f"resumed {run.path} from step {first}{changed}")
        if self.spec.zeroth_order and self.ctx.is_main:
            estimator = self.optimizer.estimator
            self.trajectory = trajectory.TrajectoryWriter(
                run.path, {"config": to_dict(cfg), "trainable_names": trainable_names(self.model),
                           **trajectory.direction_header(self.optimizer)},
                estimator.num_points(self.optimizer.max_num_queries), len(self.optimizer.param_groups),
            )
        if self.spec.virtual and not any(p.dim() >= 2 for p in self.model.parameters() if p.requires_grad):
            self.say(f"note: {cfg.optim.method} draws low-rank directions for matrices, and the trainable set "
                     f"({self.trainable_name}) has none: every parameter gets dense Gaussian directions, as MeZO's. "
                     "Train matrices with --optim.trainable all (or regex:<pattern>)")
        self.say(
            f"{cfg.model.name} on {self.task.name} ({self.splits.source}): {len(self.train_set)} train / "
            f"{len(self.dev_set)} dev / {len(self.test_set)} test; {cfg.optim.method} at lr {cfg.optim.lr:g}, "
            f"{self.n_trainable:,} trainable parameters ({self.trainable_name}); run folder {run.path}"
        )
        return first

    def zero_shot(self) -> None:
        """The test metric of the unmodified model (inserted LoRETTA_adp adapters bypassed)."""
        if self.cfg.train.zero_shot and f"zero_shot_{self.metric}" not in self.results:
            with adapters.disabled(self.model):
                scores = self.evaluate("test", "zero-shot eval")
            self.results.update({f"zero_shot_{k}": v for k, v in scores.items()})
            self.say(f"zero-shot {self.metric}: {100 * self.results[f'zero_shot_{self.metric}']:.1f}%")

    def progress(self, first: int):
        return tqdm(total=self.cfg.train.steps, initial=first, desc="train", unit="step",
                    disable=not (self.cfg.train.progress and self.ctx.is_main))

    def progress_fields(self, smoothed_loss: float) -> dict:
        """What the progress bar shows: the smoothed loss, the learning rate, and q for a ZO step."""
        fields = {"loss": f"{smoothed_loss:.4f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.3g}"}
        if self.optimizer.last_record.projected_grads:
            fields["q"] = len(self.optimizer.last_record.projected_grads)
        return fields

    def step(self, step: int) -> float:
        """One optimizer step on the step's batch, guarded and logged; returns the smoothed loss."""
        optimizer, guard, run = self.optimizer, self.guard, self.run
        batch = self.layout.shard_batch([self.train_set[i] for i in self.sampler.batch(step)])
        t = self.cfg.train
        scale = lr_multiplier(t.lr_schedule, step, t.steps, t.warmup_steps) * (guard.lr_scale if guard else 1.0)
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
        lrs = [group["lr"] for group in optimizer.param_groups]
        steps_per_epoch = self.sampler.steps_per_epoch
        optimizer.start_epoch(step // steps_per_epoch, self.cfg.train.steps / steps_per_epoch)  # AdaZeta's q
        t0 = time.perf_counter()
        loss = optimizer.step(lambda copies=None: self.loss_fn(self.train_model, batch, self.pad_id, copies),
                              accept=guard.accept if guard else None)
        record = optimizer.last_record
        event = guard.after_step(optimizer, record, lrs) if guard else None
        if self.trajectory is not None:
            self.trajectory.append(step, record.losses, lrs, rejected=event is not None and event.kind == "spike",
                                   rolled_back=event.rolled_back if event else 0)
        if event is not None:
            run.log(step=step + 1, event=event.kind, event_loss=event.loss, running_median=event.median,
                    rolled_back=event.rolled_back, lr_factor=event.lr_factor)
            self.say_between(f"step {step + 1}: divergence guard: {event.kind} (loss {event.loss:.4g}); "
                             f"rolled back {event.rolled_back}, lr x{event.lr_factor}")
        self._smoothed = loss if math.isnan(self._smoothed) else 0.95 * self._smoothed + 0.05 * loss
        run.log(step=step + 1, loss=loss, lr=lrs[0], queries=len(record.projected_grads),
                projected_grads=list(record.projected_grads), skipped=record.skipped,
                seconds=round(time.perf_counter() - t0, 4))
        return self._smoothed

    def evaluate_and_checkpoint(self, done: int, stop_requested: bool = False) -> None:
        """After ``done`` steps: the periodic dev evaluation (keeping the best weights), then a checkpoint
        when one is due or a stop was requested (then :class:`Interrupted` is raised)."""
        cfg, metric = self.cfg, self.metric
        if self.eval_every and done % self.eval_every == 0 and self.dev_set:
            dev_score = self.evaluate("dev", "dev eval")[metric]
            self.run.log(step=done, **{f"dev_{metric}": dev_score})
            self.say_between(f"step {done}: dev {metric} {100 * dev_score:.1f}%")
            if cfg.train.keep_best and (self.ctx.is_main or self.sharded) and \
                    dev_score > self.results.get(f"best_dev_{metric}", -1.0):
                self.results.update({f"best_dev_{metric}": dev_score, "best_step": done})
                self._flush()
                state = trainable_state(self.model)  # sharded: gathers, with every rank taking part
                if self.ctx.is_main:
                    save_file(state, str(self.run.path / BEST))
        if stop_requested:  # every rank stops after the same step
            raise Interrupted(done, self._checkpoint(done))
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            self._checkpoint(done)

    def finish(self) -> dict:
        """Final weights, the test metric (of the best dev weights when kept), the plot and ``results.json``."""
        cfg, metric, results = self.cfg, self.metric, self.results
        self.close()  # the trajectory is complete: replay may read it from here on
        results["train_seconds"] = round(time.perf_counter() - self._clock, 1)
        results["steps"] = cfg.train.steps
        results["skipped_steps"] = self.optimizer.num_skipped
        if self.ctx.is_main or self.sharded:  # the final weights (replay rebuilds exactly these)
            self._flush()
            state = trainable_state(self.model)
            if self.ctx.is_main:
                save_file(state, str(self.run.path / "trainable.safetensors"))
        # the protocol tests the checkpoint with the best dev metric (sharded: every rank loads its shard of it)
        if "best_step" in results and (self.ctx.is_main or self.sharded):
            load_trainable(self.model, self.run.path / BEST)
            self.say(f"testing the weights of step {results['best_step']} (best dev {metric} "
                     f"{100 * results[f'best_dev_{metric}']:.1f}%)")
        results.update(self.evaluate("test", "final eval"))
        baseline = results.get(f"zero_shot_{metric}")
        change = "" if baseline is None else \
            f", {100 * (results[metric] - baseline):+.1f} points from zero-shot {100 * baseline:.1f}%"
        self.say(f"fine-tuned {metric}: {100 * results[metric]:.1f}% ({len(self.test_set)} {self.task.name} test "
                 f"examples{change})")
        if self.ctx.is_main:
            plot_run(self.run.path, results)
        self.run.finish(results)
        return results

    # ------------------------------------------------------------ helpers
    def evaluate(self, split: str, desc: str) -> dict[str, float]:
        """Rank 0 evaluates (the weights are identical on every rank); with sharded weights every rank runs the
        evaluation's forwards (each gathers the shards) and gets the same scores."""
        if not (self.ctx.is_main or self.sharded):
            return {self.metric: float("nan")}
        examples, encoded = {"dev": (self.splits.dev, self.dev_set), "test": (self.splits.test, self.test_set)}[split]
        tokenizer, batch_size, max_length = self._evaluate_args
        return evaluate_task(self.model, tokenizer, self.task, examples, encoded, batch_size, max_length,
                             self.cfg.train.progress and self.ctx.is_main, desc)

    def say_between(self, text: str) -> None:
        """A message printed above the progress bar."""
        if self.ctx.is_main:
            tqdm.write(text)

    def _flush(self) -> None:
        """Deferred updates into the weights before they are read (the offload path defers them)."""
        execution = getattr(self.optimizer, "execution", None)  # (a first-order optimizer has none)
        if execution is not None:
            execution.flush()

    def _checkpoint(self, step: int):
        self._flush()
        # sharded moments (dense directions with momentum or Adam) are gathered by every rank, saved by rank 0
        gathered = whole_optimizer_state(self.optimizer) if self.sharded else None
        if not self.ctx.is_main:
            return self.run.path
        extra = {
            "config": to_dict(self.cfg),  # the resolved configuration the run was started with
            "data": {"next_step": step, "seed": self.cfg.train.seed, "batch_size": self.sampler.batch_size,
                     "epoch": step // self.sampler.steps_per_epoch},  # the order is a function of these
            "results": self.results,
            "guard": self.guard.state_dict() if self.guard else {},
        }
        return save_checkpoint(self.run.path, step, self.model, self.optimizer, extra, self.cfg.train.keep_checkpoints,
                               weights=self.checkpoint_kind == "weights", optimizer_state=gathered)

    def _replay_trajectory(self, step: int) -> None:
        """The weights of ``step`` for a trajectory checkpoint: the base model's (as loaded) with the run's
        first ``step`` trajectory records replayed onto them, by an optimizer of the same configuration."""
        header, records = trajectory.read(self.run.path)
        trajectory.check_devices(header, trajectory.direction_devices(self.optimizer))
        if len(records) < step:
            raise CheckpointError(f"{self.run.path}: the trajectory log holds {len(records)} steps, the checkpoint "
                                  f"{step}: the weights cannot be rebuilt")
        replayer = build_optimizer(self.cfg.optim, self.model, self.cfg.train.seed,
                                   nan_policy="skip" if self.guard else None)
        started = time.perf_counter()
        apply_records(replayer, records[:step], progress=self.cfg.train.progress and self.ctx.is_main)
        replayer.execution.close()
        self.say(f"rebuilt the weights of step {step} from the trajectory log ({time.perf_counter() - started:.1f} s)")
