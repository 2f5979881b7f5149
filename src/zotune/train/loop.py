"""``fit``: the one training loop (set up, step, log, evaluate, save)."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import RunConfig
from ..eval.evaluate import accuracy
from ..eval.scoring import encode
from ..models.loading import load_model
from ..optim import METHODS
from ..tasks import get_task, load_splits
from .losses import LOSSES
from .run_folder import RunFolder
from .setup import build_optimizer, select_trainable


class EpochSampler:
    """Batches of indices, reshuffled every epoch from (seed, epoch): resumable by position."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("no training examples")
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed

    def batch(self, step: int) -> list[int]:
        per_epoch = self.size // self.batch_size
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()


def _validate(cfg: RunConfig) -> None:
    """Fail on bad names before anything heavy is loaded."""
    get_task(cfg.data.task)
    if cfg.optim.method not in METHODS:
        raise ValueError(f"unknown method {cfg.optim.method!r}; valid: {', '.join(sorted(METHODS))}")
    if cfg.train.steps < 0 or cfg.train.batch_size < 1:
        raise ValueError("train.steps must be >= 0 and train.batch_size >= 1")


def fit(cfg: RunConfig, say: Callable[[str], None] = print) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data.task`` with a ZO method; returns the results dict."""
    _validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = get_task(cfg.data.task)
    splits = load_splits(task, cfg.data.data_dir, cfg.data.n_train, cfg.data.n_dev, cfg.data.n_test, cfg.data.seed)
    for note in splits.notes:
        say(f"note: {note}")
    model, tokenizer = load_model(
        cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code
    )
    n_trainable = select_trainable(model, cfg.optim.trainable)
    train_set, dev_set, test_set = (encode(tokenizer, s, cfg.model.max_length) for s in (splits.train, splits.dev, splits.test))
    pad_id = tokenizer.pad_token_id
    loss_fn = LOSSES[task.train_as]
    run = RunFolder.create(cfg)
    say(
        f"{cfg.model.name} on {task.name} ({splits.source}): {len(train_set)} train / {len(dev_set)} dev / "
        f"{len(test_set)} test; {cfg.optim.method}, {n_trainable:,} trainable parameters ({cfg.optim.trainable}); "
        f"run folder {run.path}"
    )

    def evaluate(examples, desc):
        return accuracy(model, examples, pad_id, cfg.train.eval_batch_size, progress=cfg.train.progress, desc=desc)

    results: dict = {"task": task.name, "model": cfg.model.name, "method": cfg.optim.method,
                     "trainable_parameters": n_trainable, "test_examples": len(test_set), "notes": splits.notes}
    if cfg.train.zero_shot:
        results["zero_shot_accuracy"] = evaluate(test_set, "zero-shot eval")
        say(f"zero-shot accuracy: {100 * results['zero_shot_accuracy']:.1f}%")

    optimizer = build_optimizer(cfg.optim, model, cfg.train.seed)
    sampler = EpochSampler(len(train_set), cfg.train.batch_size, cfg.train.seed)
    smoothed = math.nan
    start = time.perf_counter()
    with tqdm(total=cfg.train.steps, desc="train", disable=not cfg.train.progress, unit="step") as bar:
        for step in range(cfg.train.steps):
            batch = [train_set[i] for i in sampler.batch(step)]
            t0 = time.perf_counter()
            loss = optimizer.step(lambda copies=None: loss_fn(model, batch, pad_id, copies))
            record = optimizer.last_record
            smoothed = loss if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss
            run.log(step=step + 1, loss=loss, lr=optimizer.param_groups[0]["lr"], queries=len(record.projected_grads),
                    projected_grads=list(record.projected_grads), skipped=record.skipped,
                    seconds=round(time.perf_counter() - t0, 4))
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update()
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and dev_set:
                dev_accuracy = evaluate(dev_set, "dev eval")
                run.log(step=step + 1, dev_accuracy=dev_accuracy)
                bar.write(f"step {step + 1}: dev accuracy {100 * dev_accuracy:.1f}%")
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["steps"] = cfg.train.steps
    results["skipped_steps"] = optimizer.num_skipped

    results["accuracy"] = evaluate(test_set, "final eval")
    if "zero_shot_accuracy" in results:
        say(f"zero-shot accuracy: {100 * results['zero_shot_accuracy']:.1f}%  ->  fine-tuned accuracy: "
            f"{100 * results['accuracy']:.1f}%  ({len(test_set)} {task.name} test examples)")
    else:
        say(f"fine-tuned accuracy: {100 * results['accuracy']:.1f}% ({len(test_set)} test examples)")
    trained = {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(run.path / "trainable.safetensors"))
    run.finish(results)
    return results
