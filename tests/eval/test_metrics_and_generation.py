"""SQuAD-normalised F1 / exact match, and greedy generation that stops at a newline."""

import pytest
import torch

from conftest import byte_tokenizer
from zotune.eval.generate import f1_and_exact_match, generate_answers
from zotune.eval.metrics import exact_match, f1, normalize_answer
from zotune.tasks.templates import Example


def test_normalisation_and_metrics():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert f1("a big red dog", "the red dog") == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))  # P 2/3, R 1
    assert f1("blue", "red dog") == 0.0
    assert f1("", "") == 1.0 and f1("x", "") == 0.0
    scores = f1_and_exact_match(["red dog", "cat"], [Example("", (" x",), 0, ("the red dog",)),
                                                    Example("", (" x",), 0, ("dog", "a cat"))])
    assert scores == {"f1": 1.0, "exact_match": 1.0}


def test_generation_is_greedy_and_stops_at_newline(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    script = [tokenizer(ch, add_special_tokens=False).input_ids[0] for ch in "ok\nmore"]
    position = {"generated": 0}

    def scripted(module, args, logits):  # the model "wants" to write "ok", a newline, then more
        logits = torch.full_like(logits, -1e4)
        logits[:, -1, script[min(position["generated"], len(script) - 1)]] = 0.0
        position["generated"] += 1
        return logits

    model.lm_head.register_forward_hook(scripted)
    answers = generate_answers(model, tokenizer, [Example("Question: 1+1?\nAnswer:", (" 2",), 0, ("2",))])
    assert answers == ["ok"]  # cut at the newline
    assert position["generated"] <= 4  # and generation stopped there, not after 50 tokens


def test_generation_is_deterministic_and_bounded():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id)).eval()
    examples = [Example("abc", (" x",), 0, ("x",)), Example("a much longer prompt here", (" y",), 0, ("y",))]
    first = generate_answers(model, tokenizer, examples, max_new_tokens=7, batch_size=2)
    alone = [generate_answers(model, tokenizer, [ex], max_new_tokens=7)[0] for ex in examples]
    assert first == alone  # left padding does not change a greedy continuation
    one = generate_answers(model, tokenizer, examples, max_new_tokens=1, batch_size=2)
    assert all(len(a) <= 1 for a in one)  # one byte token decodes to at most one character
