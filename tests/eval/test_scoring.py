"""Batched, left-padded candidate scoring equals scoring each sequence on its own."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama, tiny_opt
from zotune.eval.scoring import Encoded, candidate_scores, gold_lm_loss


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def unpadded_logprob(model, prompt, candidate):
    ids = torch.tensor([list(prompt) + list(candidate)])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    k = len(candidate)
    positions = range(len(prompt) - 1, len(prompt) - 1 + k)
    return torch.stack([logp[pos, tok] for pos, tok in zip(positions, candidate)])


EXAMPLES = [
    Encoded((1, 5, 9, 3), ((7,), (11,)), 0),  # single-token candidates: shared prompt
    Encoded((2, 4), ((7, 8, 9), (10,), (12, 13)), 2),  # multi-token candidates
    Encoded((3, 3, 3, 3, 3, 3, 3), ((20, 21), (22,)), 1),
]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_batched_scores_match_unpadded(make):
    model = make()
    with torch.no_grad():
        scores = candidate_scores(model, EXAMPLES, pad_id=0)
    for i, ex in enumerate(EXAMPLES):
        for j, cand in enumerate(ex.candidates):
            expected = unpadded_logprob(model, ex.prompt, cand).mean()
            torch.testing.assert_close(scores[i, j], expected, rtol=1e-4, atol=1e-5)
    assert scores[0, 2] == float("-inf")  # fewer candidates than the widest example


def test_gold_lm_loss_is_token_mean_over_gold_candidates():
    model = tiny_llama()
    with torch.no_grad():
        loss = gold_lm_loss(model, EXAMPLES, pad_id=0)
    logps = torch.cat([unpadded_logprob(model, ex.prompt, ex.candidates[ex.label]) for ex in EXAMPLES])
    torch.testing.assert_close(loss, -logps.mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_scoring_builds_no_key_value_cache(make):
    # Training and scoring never decode; a cache would hold keys and values of every layer.
    model = make()
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        gold_lm_loss(model, EXAMPLES, pad_id=0)
    assert outputs and all(out.past_key_values is None for out in outputs)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_frozen_head_multiplies_one_contiguous_block(make):
    # With its weight frozen (every ZO run), a head fed a strided slice of the hidden states is
    # multiplied as a batched product that reads the weight once per row; the scoring code's kept
    # positions reach it as one contiguous (rows, keep, H) block instead, with the same scores.
    model = make().requires_grad_(False)
    head_inputs = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    with torch.no_grad():
        loss = gold_lm_loss(model, EXAMPLES, pad_id=0)
    keep = max(len(ex.candidates[ex.label]) for ex in EXAMPLES) + 1  # the longest gold span, plus one
    assert [x.shape[:2] for x in head_inputs] == [(len(EXAMPLES), keep)]
    assert head_inputs[0].is_contiguous()
    logps = torch.cat([unpadded_logprob(model, ex.prompt, ex.candidates[ex.label]) for ex in EXAMPLES])
    torch.testing.assert_close(loss, -logps.mean(), rtol=1e-4, atol=1e-5)


def test_copies_score_the_batch_repeated():
    # The batched and virtual paths score S copies of a step's batch in one forward; the inputs are
    # built once and repeated as tensors. Each copy must score (and lose) exactly what the batch
    # repeated S times as a list does: same rows, same forward, so equal up to the rows' rounding.
    model = tiny_llama()
    with torch.no_grad():
        repeated = candidate_scores(model, EXAMPLES * 3, pad_id=0)
        copies = candidate_scores(model, EXAMPLES, pad_id=0, copies=3)
        torch.testing.assert_close(copies, repeated, rtol=1e-6, atol=1e-6)
        assert torch.isinf(copies[3 + 0, 2]) and torch.isfinite(copies[3 + 1, 2])  # padding slots stay -inf
        losses = gold_lm_loss(model, EXAMPLES, pad_id=0, copies=3)
        single = gold_lm_loss(model, EXAMPLES, pad_id=0)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, single.expand(3), rtol=1e-6, atol=1e-6)
