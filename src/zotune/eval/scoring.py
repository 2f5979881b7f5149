"""Candidate scoring for causal LMs: mean log-likelihood per candidate token.

Sequences are left-padded so that every row ends at the same position; the model then only
needs logits for the last few positions (``logits_to_keep``), not for every token, which
saves the vocabulary projection over the prompt (the positions go as an index tensor:
see :func:`last_positions`). When all candidates of an example are
single tokens, one forward over the prompt scores them all from its last position.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks.templates import Example
from ..transfer import to_device


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    label: int

    @property
    def shared_prompt(self) -> bool:
        """All candidates are one token: one forward over the prompt scores them all."""
        return all(len(c) == 1 for c in self.candidates)


def encode(tokenizer, examples: list[Example], max_length: int = 512, masked: bool = False) -> list[Encoded]:
    """Token ids of prompts (with the tokenizer's special tokens) and candidates (without).

    Over-long prompts are cut from the left: the end of a prompt holds the question.
    ``masked``: prompts for a masked LM (see :func:`zotune.eval.masked.encode_masked`).
    """
    if masked:
        from .masked import encode_masked

        return encode_masked(tokenizer, examples, max_length)
    encoded = []
    for ex in examples:
        candidates = tuple(tuple(tokenizer(c, add_special_tokens=False).input_ids) for c in ex.candidates)
        if any(len(c) == 0 for c in candidates):
            raise ValueError(f"a candidate of {ex.candidates} encodes to no tokens")
        prompt = tuple(tokenizer(ex.prompt).input_ids)
        if not prompt:  # an empty prompt (WinoGrande): condition the candidates on the BOS (or EOS) token
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            prompt = (start,)
        room = max_length - max(len(c) for c in candidates)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for the prompt")
        encoded.append(Encoded(prompt[-room:], candidates, ex.label))
    return encoded


def _forward_kwargs(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def last_positions(length: int, keep: int, device) -> Tensor:
    """``logits_to_keep`` for the last ``keep`` of ``length`` positions, as ``(keep,)`` indices.

    With an int, transformers slices the hidden states to a strided ``(B, keep, H)`` view. For a
    head whose weight does not require grad (every ZO run: nothing is backpropagated), torch
    multiplies such a view as a batched product against the weight expanded B times, which reads the
    whole ``(vocab, H)`` weight once per row (SmolLM2: 113 MB a row; on CUDA a batched matrix-vector
    kernel). An index tensor gathers the rows into one contiguous block, which the head multiplies
    in a single matrix product: the same values up to rounding.
    """
    return torch.arange(length - keep, length, device=device)


def tail_logprobs(model: nn.Module, rows: list[tuple[tuple[int, ...], int]], pad_id: int, copies: int = 1) -> Tensor:
    """Log-probabilities of the next token at the last ``k + 1`` positions of each row.

    Args:
        rows: (token ids, k) pairs: k = number of trailing tokens to score (0 = score only
            the token after the sequence).
        copies: run the rows this many times over (copy-major), as the batched and virtual
            paths measure a step's points: the inputs are built once and repeated as tensors.

    Returns:
        ``(copies · rows, K, vocab)`` float32 log-probabilities, K = max k + 1, aligned to the
        end: ``out[r, -1]`` predicts the token after row r, ``out[r, -1 - k + j]`` predicts the
        row's j-th scored token (0-based) for j < k.
    """
    device = next(model.parameters()).device
    length = max(len(ids) for ids, _ in rows)
    keep = max(k for _, k in rows) + 1
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        input_ids[r, length - len(ids) :] = torch.tensor(ids)
        mask[r, length - len(ids) :] = 1
    if copies > 1:
        input_ids, mask = input_ids.repeat(copies, 1), mask.repeat(copies, 1)
    kwargs = {"input_ids": to_device(input_ids, device), "attention_mask": to_device(mask, device)}
    accepted = _forward_kwargs(model)
    if "position_ids" in accepted:  # left padding: real tokens count positions from 0
        kwargs["position_ids"] = to_device((mask.cumsum(-1) - 1).clamp(min=0), device)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = last_positions(length, keep, device)
    if "use_cache" in accepted:  # scoring and training never decode: a key/value cache is wasted memory
        kwargs["use_cache"] = False
    logits = model(**kwargs).logits[:, -keep:]  # (rows, K, vocab)
    return F.log_softmax(logits.float(), dim=-1)


def _gathered(logp: Tensor, spans: list[tuple[int, list[int], int]], copies: int = 1) -> tuple[Tensor, Tensor]:
    """Log-probabilities of scored tokens, gathered in one indexing op.

    ``spans[n] = (row, tokens, end)``: the span's tokens are predicted at the positions ending
    ``end`` from the last (``end = 0``: the last token predicts the span's last one, i.e. the span
    follows the row; ``end = 1``: the span is the row's own last tokens). With ``copies``, ``logp``
    holds that many copies of the rows (copy-major) and the spans are gathered from each. Returns
    ``(values, mask)``, both ``(copies · spans, longest span)``, padding entries masked out.
    """
    longest = max(len(tokens) for _, tokens, _ in spans)
    last = logp.shape[1] - 1
    rows, positions, picked, mask = [], [], [], []
    for row, tokens, end in spans:
        pad = longest - len(tokens)
        rows += [row] * longest
        positions += [last - end - len(tokens) + 1 + t for t in range(len(tokens))] + [0] * pad
        picked += list(tokens) + [0] * pad
        mask += [1.0] * len(tokens) + [0.0] * pad
    index, mask = torch.tensor([rows, positions, picked]), torch.tensor(mask)
    if copies > 1:  # copy c's rows are c · (rows of a copy) further on
        index, mask = index.repeat(1, copies), mask.repeat(copies)
        index[0] += torch.arange(copies).repeat_interleave(len(rows)) * (logp.shape[0] // copies)
    index = to_device(index, logp.device)  # one transfer for the whole batch
    values = logp[index[0], index[1], index[2]].view(copies * len(spans), longest)
    return values, to_device(mask, logp.device).view(copies * len(spans), longest)


def candidate_scores(model: nn.Module, batch: list[Encoded], pad_id: int, copies: int = 1) -> Tensor:
    """``(B, C)`` mean log-likelihood per token of each candidate given its prompt; with ``copies``,
    ``(copies · B, C)``: the batch scored that many times over in one forward (copy-major).

    Masked-LM examples (:class:`~zotune.eval.masked.MaskedEncoded`) are scored at their mask instead.
    """
    from .masked import MaskedEncoded, masked_scores

    if batch and isinstance(batch[0], MaskedEncoded):
        return masked_scores(model, batch * copies, pad_id)
    rows: list[tuple[tuple[int, ...], int]] = []
    spans: list[tuple[int, list[int], int]] = []  # per (example, candidate): what it scores (see _gathered)
    slots: list[tuple[int, int]] = []
    for i, ex in enumerate(batch):
        if ex.shared_prompt:  # one row; each candidate is its first token after the prompt
            rows.append((ex.prompt, 0))
            spans += [(len(rows) - 1, [cand[0]], 0) for cand in ex.candidates]
        else:
            for cand in ex.candidates:
                rows.append((ex.prompt + cand, len(cand)))
                spans.append((len(rows) - 1, list(cand), 1))
        slots += [(i, j) for j in range(len(ex.candidates))]
    logp = tail_logprobs(model, rows, pad_id, copies)  # (copies · rows, K, vocab)
    values, mask = _gathered(logp, spans, copies)
    means = (values * mask).sum(-1) / mask.sum(-1)  # (copies · candidates of the batch,)
    num_candidates = max(len(ex.candidates) for ex in batch)
    scores = torch.full((copies * len(batch), num_candidates), float("-inf"), device=logp.device)
    where = torch.tensor(slots).repeat(copies, 1)  # (example, candidate), copy c's examples c · B further on
    where[:, 0] += torch.arange(copies).repeat_interleave(len(slots)) * len(batch)
    where = to_device(where, logp.device)
    scores[where[:, 0], where[:, 1]] = means
    return scores


def gold_lm_loss(model: nn.Module, batch: list[Encoded], pad_id: int, copies: int | None = None) -> Tensor:
    """LM loss on the gold candidate's tokens only (prompt tokens are not in the loss).

    A token mean over the batch (a 0-d tensor); with ``copies`` given (one included) the batch is
    run that many times over in one forward (copy-major) and the per-copy token means are
    returned, shape ``(copies,)``, as the batched and virtual paths require.
    """
    runs = copies or 1
    rows = [(ex.prompt + ex.candidates[ex.label], len(ex.candidates[ex.label])) for ex in batch]
    logp = tail_logprobs(model, rows, pad_id, runs)
    values, mask = _gathered(logp, [(r, list(ex.candidates[ex.label]), 1) for r, ex in enumerate(batch)], runs)
    sums, counts = -(values * mask).sum(-1), mask.sum(-1)  # (runs · B,)
    per_copy = sums.view(runs, -1).sum(1) / counts.view(runs, -1).sum(1)
    return per_copy[0] if copies is None else per_copy
