"""Prompt-based masked-LM scoring (LM-BFF) and the k-shot protocol, on a tiny BERT with a word-level tokenizer."""

import pytest
import torch

from conftest import SHARED_DATA, needs_shared_data
from zotune.eval.masked import encode_masked, label_word_id
from zotune.eval.scoring import candidate_scores
from zotune.tasks import get_task, load_splits, templates

WORDS = ["terrible", "great", "it", "was", ".", "good", "film", "bad", "Yes", "No", "?", ",", "It", ":", "Expression",
         "Entity", "Description", "Human", "Location", "Number", "What", "is", "the", "How", "Who"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_mlm(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)).eval()


def test_label_words_are_scored_at_the_mask():
    tokenizer = word_tokenizer()
    model = tiny_mlm(tokenizer)
    examples = [templates.sst2_mlm({"sentence": "good film"}, 1), templates.sst2_mlm({"sentence": "bad"}, 0)]
    encoded = encode_masked(tokenizer, examples)
    assert encoded[0].ids[encoded[0].mask_index] == tokenizer.mask_token_id
    assert encoded[0].candidates == ((label_word_id(tokenizer, "terrible"),), (label_word_id(tokenizer, "great"),))
    scores = candidate_scores(model, encoded, tokenizer.pad_token_id)
    with torch.no_grad():  # the same numbers from one unpadded forward per example
        for row, ex in enumerate(encoded):
            logits = model(input_ids=torch.tensor([ex.ids])).logits[0, ex.mask_index]
            expected = torch.log_softmax(logits, -1)[[c[0] for c in ex.candidates]]
            torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-5)


def test_label_words_must_be_single_tokens():
    with pytest.raises(ValueError, match="not a single token"):
        label_word_id(word_tokenizer(), "magnificent")


@needs_shared_data
@pytest.mark.parametrize("seed", [13, 21, 42, 87, 100])
def test_k_shot_sampling_per_class(seed):
    trec = get_task("trec")
    splits = load_splits(trec, SHARED_DATA, masked=True, k_shot=16, seed=seed)
    assert sorted(ex.label for ex in splits.train) == sorted(list(range(6)) * 16)
    assert sorted(ex.label for ex in splits.dev) == sorted(list(range(6)) * 16)
    assert len(splits.test) == 500  # the whole test file
    assert not {ex.prompt for ex in splits.train} & {ex.prompt for ex in splits.dev}
    again = load_splits(trec, SHARED_DATA, masked=True, k_shot=16, seed=seed)
    assert [ex.prompt for ex in again.train] == [ex.prompt for ex in splits.train]  # a function of the seed


@needs_shared_data
def test_trec_prompt_and_causal_refusal():
    splits = load_splits(get_task("trec"), SHARED_DATA, masked=True, k_shot=4, seed=13)
    assert all(ex.prompt.startswith("<mask> : ") for ex in splits.test)
    assert splits.test[0].candidates == ("Expression", "Entity", "Description", "Human", "Location", "Number")
    with pytest.raises(ValueError, match="no prompt for causal LMs"):
        load_splits(get_task("trec"), SHARED_DATA)


@needs_shared_data
@pytest.mark.parametrize("path", [(), ("--optim.method", "lozo", "--optim.virtual", "true"),
                                  ("--optim.batched", "true")], ids=["in-place", "virtual", "batched"])
def test_masked_lm_trains_through_the_cli(tmp_path, capsys, path):
    # every parameter trained, BERT's position embeddings too: on the virtual and batched paths their ids,
    # which the model shares across the batch, reach them per row
    import json

    from zotune.cli import main

    tokenizer = word_tokenizer()
    model = tiny_mlm(tokenizer)
    model.config.architectures = ["BertForMaskedLM"]
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    assert main(["train", "--model.name", str(tmp_path / "bert"), "--data.data_dir", str(SHARED_DATA),
                 "--data.task", "trec", "--data.k_shot", "4", "--data.seed", "13", "--data.n_test", "20",
                 "--train.steps", "3", "--train.batch_size", "8", "--optim.trainable", "all", "--optim.lr", "1e-3",
                 "--train.output_dir", str(tmp_path), "--train.run_name", "run", "--train.progress", "false",
                 *path]) == 0
    out = capsys.readouterr().out
    assert "4-shot, data seed 13: 24 train / 24 dev" in out and "fine-tuned accuracy" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_examples"] == 20 and 0 <= results["accuracy"] <= 1


def test_classification_loss_on_masked_examples_is_cross_entropy_over_label_words():
    from zotune.train.losses import classification_loss

    tokenizer = word_tokenizer()
    model = tiny_mlm(tokenizer)
    examples = [templates.sst2_mlm({"sentence": "good film"}, 1), templates.sst2_mlm({"sentence": "bad"}, 0)]
    batch = encode_masked(tokenizer, examples)
    with torch.no_grad():
        loss = classification_loss(model, batch, tokenizer.pad_token_id)
        per_copy = classification_loss(model, batch, tokenizer.pad_token_id, copies=3)
        scores = candidate_scores(model, batch, tokenizer.pad_token_id)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0]))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_copy, expected.repeat(3), rtol=1e-5, atol=1e-6)  # copies for the virtual path


def tiny_masked_lm(architecture: str, vocab_size: int):
    import transformers

    torch.manual_seed(0)
    if architecture == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=64)
        return transformers.DistilBertForMaskedLM(config).eval()
    shape = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=80)
    if architecture == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(pad_token_id=0, **shape)).eval()
    return transformers.BertForMaskedLM(transformers.BertConfig(**shape)).eval()


@pytest.mark.parametrize("architecture", ["bert", "roberta", "distilbert"])
def test_the_head_runs_at_the_mask_only(architecture):
    # The scores need the mask's logits alone: the head sees one hidden state per row, and the
    # scores equal those read off every position's logits of an unpadded forward per example.
    tokenizer = word_tokenizer()
    model = tiny_masked_lm(architecture, len(tokenizer))
    examples = [templates.sst2_mlm({"sentence": "good film"}, 1), templates.sst2_mlm({"sentence": "bad"}, 0)]
    encoded = encode_masked(tokenizer, examples)
    head_inputs = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: head_inputs.append(args[0].shape))
    with torch.no_grad():
        scores = candidate_scores(model, encoded, tokenizer.pad_token_id)
    hook.remove()
    assert head_inputs == [torch.Size([len(encoded), 1, model.get_output_embeddings().in_features])]
    assert_unpadded_scores(model, encoded, scores)


def assert_unpadded_scores(model, encoded, scores):
    with torch.no_grad():  # no hook left behind: every position's logits
        for row, ex in enumerate(encoded):
            logits = model(input_ids=torch.tensor([ex.ids])).logits
            assert logits.shape[1] == len(ex.ids)
            expected = torch.log_softmax(logits[0, ex.mask_index], -1)[[c[0] for c in ex.candidates]]
            torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-5)


def test_a_wrapped_masked_lm_is_scored_from_every_position():
    # PEFT's wrapper's ``base_model`` is its LoRA model, which its forward goes around (it calls the
    # masked LM inside): the hook is never reached, the head runs everywhere and the mask's row is read.
    from peft import LoraConfig, get_peft_model

    tokenizer = word_tokenizer()
    model = get_peft_model(tiny_masked_lm("bert", len(tokenizer)), LoraConfig(r=2, target_modules=["query"]))
    examples = [templates.sst2_mlm({"sentence": "good film"}, 1), templates.sst2_mlm({"sentence": "bad"}, 0)]
    encoded = encode_masked(tokenizer, examples)
    with torch.no_grad():
        scores = candidate_scores(model.eval(), encoded, tokenizer.pad_token_id)
    assert_unpadded_scores(model, encoded, scores)
