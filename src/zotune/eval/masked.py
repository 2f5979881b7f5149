"""Prompt-based scoring for masked LMs (LM-BFF, Gao et al., ACL 2021): label words at the mask.

A prompt holds one mask (``templates.MASK``); each candidate is a label word that must be a
single token (with a leading space for byte-level BPE vocabularies such as RoBERTa's). The
score of a candidate is the log-probability of its token at the mask; the classification loss
is the cross-entropy over the candidates' scores (the softmax normaliser cancels, so this is
LM-BFF's cross-entropy over the label words' logits).

Only the mask's logits are used, so the LM head runs at the mask alone (:func:`head_at`): the
head of a masked LM maps every position to the vocabulary (MiniLM's 30,522 x 384 projection costs
about as much per token as its six layers).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def head_at(model: nn.Module, positions: Tensor):
    """While open, ``model``'s base model hands its head the hidden state at one position per row.

    A forward hook on ``model.base_model`` replaces its output's ``(B, T, H)`` hidden states with the
    rows at ``positions`` (``(B,)``), ``(B, 1, H)``; every transformers masked LM applies its head
    position by position to that output, so its logits come out ``(B, 1, V)``: the ones at the
    positions, the same values. A model whose ``base_model`` is itself, returns no hidden states, or
    is not called on the way (PEFT's wrapper) returns every position's logits, ``(B, T, V)``.
    """
    base = getattr(model, "base_model", model)

    def kept(hidden: Tensor) -> Tensor:  # (B, T, H) -> (B, 1, H)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions].unsqueeze(1)

    def keep_positions(module, args, output):
        if isinstance(output, tuple):  # return_dict=False
            return (kept(output[0]), *output[1:])
        if "last_hidden_state" not in output:
            return None
        output["last_hidden_state"] = kept(output["last_hidden_state"])
        return output

    handle = base.register_forward_hook(keep_positions) if base is not model else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def masked_scores(model: nn.Module, batch: list[MaskedEncoded], pad_id: int) -> Tensor:
    """``(B, C)`` log-probability of each label word at its example's mask."""
    device = next(model.parameters()).device
    length = max(len(ex.ids) for ex in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for r, ex in enumerate(batch):  # right padding: encoders use absolute positions from 0
        input_ids[r, : len(ex.ids)] = torch.tensor(ex.ids)
        attention[r, : len(ex.ids)] = 1
    masks = torch.tensor([ex.mask_index for ex in batch], device=device)
    with head_at(model, masks):
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    if logits.shape[1] != 1:  # (B, T, V): the hook did not reach this model's head
        logits = logits[torch.arange(len(batch), device=device), masks].unsqueeze(1)
    at_mask = F.log_softmax(logits[:, 0].float(), -1)  # (B, V)
    num_candidates = max(len(ex.candidates) for ex in batch)
    scores = torch.full((len(batch), num_candidates), float("-inf"), device=device)
    for r, ex in enumerate(batch):
        scores[r, : len(ex.candidates)] = at_mask[r, [c[0] for c in ex.candidates]]
    return scores
