"""``zotune eval``: the test metric of a model under the task's prompt, without training."""

from __future__ import annotations

from typing import Callable

from ..config import ConfigError, RunConfig
from ..eval.evaluate import evaluate_task
from ..models.loading import model_kind
from ..tasks.templates import with_demonstrations
from .recipe import setup


def evaluate_only(cfg: RunConfig, say: Callable[[str], None] = print) -> float:
    k = cfg.data.icl_demos
    if k < 0:
        raise ConfigError(f"data.icl_demos must be >= 0, got {k}")
    if k and model_kind(cfg.model.name, cfg.model.trust_remote_code) == "masked":
        raise ConfigError(f"data.icl_demos: in-context demonstrations are prepended to causal-LM prompts; "
                          f"{cfg.model.name} is a masked LM, whose prompt holds one mask (evaluate it zero-shot)")
    pieces = setup(cfg, sizes=(k, 0, None), trainable=False, say=say)
    task, splits = pieces.task, pieces.splits
    test_examples = splits.test
    if k:  # the same k demonstrations, sampled from the training split, before every test prompt
        if len(splits.train) < k:
            raise ConfigError(f"data.icl_demos={k} but only {len(splits.train)} training examples exist")
        test_examples = [with_demonstrations(ex, splits.train[:k]) for ex in splits.test]
    test_set = pieces.encode(test_examples)
    scores = evaluate_task(pieces.model, pieces.tokenizer, task, test_examples, test_set, cfg.train.eval_batch_size,
                           cfg.model.max_length, cfg.train.progress, f"eval {task.name}")
    extra = "".join(f", {name.replace('_', ' ')} {100 * v:.1f}%" for name, v in scores.items() if name != task.metric)
    setting = f"in-context ({k} demonstrations)" if k else "zero-shot"
    say(f"{cfg.model.name} {setting} {task.metric} on {task.name} ({len(test_set)} test examples from "
        f"{splits.source}): {100 * scores[task.metric]:.1f}%{extra}")
    return scores[task.metric]
