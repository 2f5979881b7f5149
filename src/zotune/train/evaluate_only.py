"""``zotune eval``: test accuracy of a model under the task's prompt, without training."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import RunConfig
from ..eval.evaluate import accuracy
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
    result = accuracy(model, test_set, tokenizer.pad_token_id, cfg.train.eval_batch_size,
                      progress=cfg.train.progress, desc=f"eval {task.name}")
    say(f"{cfg.model.name} zero-shot accuracy on {task.name} ({len(test_set)} test examples from "
        f"{splits.source}): {100 * result:.1f}%")
    return result
