"""Every model family of the table (src/zotune/models/families.py) on a tiny model built from its config:
the default trainable set, both adapters' default targets, a step of every ZO method, and the virtual path."""

import pytest
import torch

import zotune
from zotune.config import RunConfig, apply_overrides
from zotune.models.families import FAMILIES
from zotune.train.setup import prepare_trainable

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, **IDS)


def build(name):
    import transformers as t

    decoder = dict(SMALL, num_key_value_heads=2)
    configs = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, decoder),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, decoder),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, decoder), "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, decoder),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, dict(decoder, head_dim=8)),
        "phi": (t.PhiConfig, t.PhiForCausalLM, SMALL), "phi3": (t.Phi3Config, t.Phi3ForCausalLM, SMALL),
        "opt": (t.OPTConfig, t.OPTForCausalLM, dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64,
                                                     word_embed_proj_dim=32, **IDS)),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel,
                 dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS)),
        "gpt_neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM, SMALL),
        "bert": (t.BertConfig, t.BertForMaskedLM, SMALL), "roberta": (t.RobertaConfig, t.RobertaForMaskedLM, SMALL),
    }
    config_class, model_class, options = configs[name]
    torch.manual_seed(0)
    return model_class(config_class(**options)).eval()


NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "opt", "gpt2", "gpt_neox", "bert", "roberta"]
ZO_METHODS = sorted(n for n, spec in zotune.METHODS.items() if spec.zeroth_order)


def test_every_tested_model_type_is_in_the_table():
    listed = {model_type for family in FAMILIES for model_type in family.model_types}
    assert set(NAMES) <= listed


def loss_of(model, copies=None):
    ids = torch.arange(24).view(2, 12) % 60 + 2
    batch = ids.repeat(copies or 1, 1)
    positions = torch.arange(batch.shape[1]).expand_as(batch)  # per row, as the virtual path needs
    kwargs = {} if model.config.model_type in ("bert", "roberta", "opt") else {"position_ids": positions}
    logits = model(input_ids=batch, **kwargs).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)
    return losses.mean() if copies is None else losses.view(copies, -1).mean(1)


@pytest.mark.parametrize("name", NAMES)
def test_the_default_trainable_set_and_adapter_targets(name):
    model = build(name)
    assert prepare_trainable(model, RunConfig()) > 0  # the family's final norm
    chosen = [n for n, p in model.named_parameters() if p.requires_grad]
    assert chosen and all("norm" in n.lower() or "ln_f" in n for n in chosen), chosen
    for kind in ("adp", "rep"):
        model = build(name)
        count = prepare_trainable(model, apply_overrides(RunConfig(), {"adapter.kind": kind}))
        assert count > 0 and any("loretta_" in n for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            assert torch.isfinite(loss_of(model))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_takes_a_step(name):
    for method in ZO_METHODS:
        model = build(name)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = zotune.METHODS[method](model.parameters(), lr=1e-3, seed=1)
        opt.step(lambda m=model: loss_of(m))
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), method


@pytest.mark.parametrize("name", NAMES)
def test_the_virtual_path_where_it_applies(name):
    # The virtual path perturbs Linear, Embedding, Conv1D and LayerNorm parameters; RMSNorm scales and
    # learned positions (which receive inputs shared by the batch) are frozen, as docs/architecture.md says.
    results = {}
    for virtual in (False, True):
        model = build(name)
        for n, p in model.named_parameters():
            p.requires_grad_(not any(s in n for s in ("norm", "position", "wpe", "embed_positions", "ln_f")))
        params = [p for p in model.parameters() if p.requires_grad]
        execution = zotune.Virtual(model) if virtual else zotune.InPlace()
        opt = zotune.lozo(params, lr=0.0, eps=1e-2, seed=2, num_queries=2, execution=execution)
        opt.step(lambda copies=None, m=model: loss_of(m, copies))
        results[virtual] = torch.tensor(opt.last_record.projected_grads)
    # float32: the two paths reach the same ±ε points by different roundings (in place: θ + εZ − 2εZ)
    torch.testing.assert_close(results[True], results[False], rtol=2e-3, atol=2e-3)
