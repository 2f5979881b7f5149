"""``zotune eval``: the test metric of a model under the task's prompt, without training."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import ConfigError, RunConfig
from ..eval.evaluate import evaluate_task
from ..eval.scoring import encode
from ..tasks.templates import with_demonstrations
from .setup import load_configured_model, task_splits


def evaluate_only(cfg: RunConfig, say: Callable[[str], None] = print) -> float:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    k = cfg.data.icl_demos
    if k < 0:
        raise ConfigError(f"data.icl_demos must be >= 0, got {k}")
    task, splits, masked = task_splits(cfg, n_train=k, n_dev=0)
    for note in splits.notes:
        say(f"note: {note}")
    test_examples = splits.test
    if k:  # the same k demonstrations, sampled from the training split, before every test prompt
        if len(splits.train) < k:
            raise ConfigError(f"data.icl_demos={k} but only {len(splits.train)} training examples exist")
        test_examples = [with_demonstrations(ex, splits.train[:k]) for ex in splits.test]
    model, tokenizer = load_configured_model(cfg.model)
    test_set = encode(tokenizer, test_examples, cfg.model.max_length, masked)
    scores = evaluate_task(model, tokenizer, task, test_examples, test_set, cfg.train.eval_batch_size,
                           cfg.model.max_length, cfg.train.progress, f"eval {task.name}")
    extra = "".join(f", {name.replace('_', ' ')} {100 * v:.1f}%" for name, v in scores.items() if name != task.metric)
    setting = f"in-context ({k} demonstrations)" if k else "zero-shot"
    say(f"{cfg.model.name} {setting} {task.metric} on {task.name} ({len(test_set)} test examples from "
        f"{splits.source}): {100 * scores[task.metric]:.1f}%{extra}")
    return scores[task.metric]
