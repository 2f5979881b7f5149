"""Task metrics: accuracy of candidate scoring, or F1 / exact match of greedy generation."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .scoring import Encoded, candidate_scores


def predictions(model: nn.Module, examples: list[Encoded], pad_id: int, batch_size: int = 32,
                progress: bool = False, desc: str = "eval") -> list[int]:
    """Index of the highest-scoring candidate for every example (in input order)."""
    # Length-sorted batches waste little on padding; results are put back in input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    predicted = [0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
                chunk = order[start : start + batch_size]
                scores = candidate_scores(model, [examples[i] for i in chunk], pad_id)
                for i, best in zip(chunk, scores.argmax(dim=-1).tolist()):
                    predicted[i] = best
    finally:
        model.train(was_training)
    return predicted


def accuracy(model: nn.Module, examples: list[Encoded], pad_id: int, batch_size: int = 32,
             progress: bool = False, desc: str = "eval") -> float:
    if not examples:
        raise ValueError("no examples to evaluate")
    predicted = predictions(model, examples, pad_id, batch_size, progress, desc)
    return sum(p == ex.label for p, ex in zip(predicted, examples)) / len(examples)


def evaluate_task(model: nn.Module, tokenizer, task, examples: list, encoded: list[Encoded], batch_size: int = 32,
                  max_length: int = 2048, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """``{task.metric: value, ...}`` on ``examples`` (``encoded`` is their encoding, for scoring)."""
    if task.metric == "f1":
        from .generate import f1_and_exact_match, generate_answers

        predicted = generate_answers(model, tokenizer, examples, max_length=max_length,
                                     batch_size=max(1, batch_size // 4), progress=progress, desc=desc)
        return f1_and_exact_match(predicted, examples)
    return {"accuracy": accuracy(model, encoded, tokenizer.pad_token_id, batch_size, progress, desc)}
