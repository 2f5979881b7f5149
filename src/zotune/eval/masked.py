"""Prompt-based scoring for masked LMs (LM-BFF, Gao et al., ACL 2021): label words at the mask.

A prompt holds one mask (``templates.MASK``); each candidate is a label word that must be a
single token (with a leading space for byte-level BPE vocabularies such as RoBERTa's). The
score of a candidate is the log-probability of its token at the mask; the classification loss
is the cross-entropy over the candidates' scores (the softmax normaliser cancels, so this is
LM-BFF's cross-entropy over the label words' logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks.templates import MASK, Example


@dataclass(frozen=True)
class MaskedEncoded:
    ids: tuple[int, ...]  # the prompt with special tokens; one of them is the mask token
    mask_index: int
    candidates: tuple[tuple[int], ...]  # one token per label word
    label: int

    @property
    def prompt(self) -> tuple[int, ...]:  # length-sorting in evaluation reads it
        return self.ids


def label_word_id(tokenizer, word: str) -> int:
    for text in (" " + word, word):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return ids[0]
    raise ValueError(f"the label word {word!r} is not a single token of this tokenizer")


def encode_masked(tokenizer, examples: list[Example], max_length: int = 512) -> list[MaskedEncoded]:
    """Token ids with the mask token in place of ``MASK``; too-long prompts lose tokens after the first one."""
    if tokenizer.mask_token is None:
        raise ValueError("this tokenizer has no mask token: prompt-based scoring needs a masked LM")
    word_ids: dict[str, int] = {}
    encoded = []
    for ex in examples:
        if ex.prompt.count(MASK) != 1:
            raise ValueError(f"a masked-LM prompt needs exactly one {MASK}: {ex.prompt[:80]!r}")
        ids = tokenizer(ex.prompt.replace(MASK, tokenizer.mask_token)).input_ids
        if len(ids) > max_length:  # keep the leading special token and the end, where LM-BFF keeps the mask
            ids = ids[:1] + ids[len(ids) - max_length + 1 :]
        if tokenizer.mask_token_id not in ids:
            raise ValueError(f"max_length {max_length} cut the mask out of a prompt")
        candidates = tuple((word_ids.setdefault(w, label_word_id(tokenizer, w)),) for w in ex.candidates)
        encoded.append(MaskedEncoded(tuple(ids), ids.index(tokenizer.mask_token_id), candidates, ex.label))
    return encoded


def masked_scores(model: nn.Module, batch: list[MaskedEncoded], pad_id: int) -> Tensor:
    """``(B, C)`` log-probability of each label word at its example's mask."""
    device = next(model.parameters()).device
    length = max(len(ex.ids) for ex in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for r, ex in enumerate(batch):  # right padding: encoders use absolute positions from 0
        input_ids[r, : len(ex.ids)] = torch.tensor(ex.ids)
        attention[r, : len(ex.ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
    rows = torch.arange(len(batch), device=device)
    at_mask = F.log_softmax(logits[rows, torch.tensor([ex.mask_index for ex in batch], device=device)].float(), -1)
    num_candidates = max(len(ex.candidates) for ex in batch)
    scores = torch.full((len(batch), num_candidates), float("-inf"), device=device)
    for r, ex in enumerate(batch):
        scores[r, : len(ex.candidates)] = at_mask[r, [c[0] for c in ex.candidates]]
    return scores
