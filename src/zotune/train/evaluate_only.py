"""``zotune eval``: the test metric of a model under the task's prompt, without training."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import RunConfig
from ..eval.evaluate import evaluate_task
from ..eval.scoring import encode
from ..tasks import get_task, load_splits
from .setup import load_configured_model


def evaluate_only(cfg: RunConfig, say: Callable[[str], None] = print) -> float:
    task = get_task(cfg.data.task)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits = load_splits(task, cfg.data.data_dir, 0, 0, cfg.data.n_test, cfg.data.seed)
    for note in splits.notes:
        say(f"note: {note}")
    model, tokenizer = load_configured_model(cfg.model)
    test_set = encode(tokenizer, splits.test, cfg.model.max_length)
    scores = evaluate_task(model, tokenizer, task, splits.test, test_set, cfg.train.eval_batch_size,
                           cfg.model.max_length, cfg.train.progress, f"eval {task.name}")
    extra = "".join(f", {k.replace('_', ' ')} {100 * v:.1f}%" for k, v in scores.items() if k != task.metric)
    say(f"{cfg.model.name} zero-shot {task.metric} on {task.name} ({len(test_set)} test examples from "
        f"{splits.source}): {100 * scores[task.metric]:.1f}%{extra}")
    return scores[task.metric]
