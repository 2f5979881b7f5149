"""Greedy generation for the generation tasks (SQuAD, DROP): at most 50 new tokens, stop at a newline."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..tasks.templates import Example
from .metrics import best_over_answers, exact_match, f1


def generate_answers(model: nn.Module, tokenizer, examples: list[Example], max_new_tokens: int = 50,
                     max_length: int = 2048, batch_size: int = 8, progress: bool = False,
                     desc: str = "generate") -> list[str]:
    """Greedy continuations of each prompt, cut at the first newline, stripped."""
    pad_id = tokenizer.pad_token_id
    prompts = [tuple(tokenizer(ex.prompt).input_ids)[-(max_length - max_new_tokens):] for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
                chunk = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, stop_strings=["\n"], tokenizer=tokenizer,
                                     pad_token_id=pad_id)
                for row, i in enumerate(chunk):
                    text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                    answers[i] = text.split("\n", 1)[0].strip()
    finally:
        model.train(was_training)
    return answers


def f1_and_exact_match(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    if not examples:
        raise ValueError("no examples to evaluate")
    n = len(examples)
    return {
        "f1": sum(best_over_answers(f1, p, ex.answers) for p, ex in zip(predictions, examples)) / n,
        "exact_match": sum(best_over_answers(exact_match, p, ex.answers) for p, ex in zip(predictions, examples)) / n,
    }
