"""LoRETTA adapters on stock transformers models: targets, trainable set, function preservation, save/load/merge."""

import copy

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt
from zotune.adapters import (LorettaAdpConfig, LorettaRepConfig, adapter_state, inject, load, merge, save,
                             trainable_numel)
from zotune.adapters.layers import LorettaAdpLayer, LorettaRepLayer

BUILDERS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2, "bert": tiny_bert}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


EXPECTED_ADP = {
    "llama": {"model.layers.0.mlp.gate_proj": "pre", "model.layers.0.mlp.up_proj": "pre",
              "model.layers.0.mlp.down_proj": "post"},
    "opt": {"model.decoder.layers.0.fc1": "pre", "model.decoder.layers.0.fc2": "post"},
    "gpt2": {"transformer.h.0.mlp.c_fc": "pre", "transformer.h.0.mlp.c_proj": "post"},
    "bert": {"bert.encoder.layer.0.attention.output.dense": "post", "bert.encoder.layer.0.output.dense": "post"},
}


@pytest.mark.parametrize("arch", BUILDERS)
def test_default_adp_targets_and_trainable_set(arch):
    model = inject(BUILDERS[arch](), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False))
    wrapped = {n: m.position for n, m in model.named_modules() if isinstance(m, LorettaAdpLayer)}
    assert {n: p for n, p in wrapped.items() if ".0." in n} == EXPECTED_ADP[arch]
    assert len(wrapped) == 2 * len(EXPECTED_ADP[arch])  # two layers per tiny model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("loretta_" in n for n in trainable)


@pytest.mark.parametrize("arch", BUILDERS)
def test_rep_is_function_preserving_at_init_without_a_zero_core(arch):
    model = BUILDERS[arch]()
    before = logits(model)
    inject(model, LorettaRepConfig(r=4, alpha=8, tt_rank=3))
    layers = [m for m in model.modules() if isinstance(m, LorettaRepLayer)]
    assert layers
    for layer in layers:
        assert all(core.abs().max() > 0 for core in [*layer.loretta_A.cores, *layer.loretta_B.cores])
        assert layer.delta_weight().abs().max() > 1e-4  # ΔW_0 is far from zero; W0 compensates it
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adp_is_function_preserving_by_default_and_the_papers_init_is_an_option(dtype):
    model = tiny_llama().to(dtype)
    before = logits(model)
    inject(model, LorettaAdpConfig(bottleneck=8, tt_rank=2))
    assert torch.equal(logits(model), before)  # bit-identical: the adapters' difference is an exact zero
    plain = inject(tiny_llama().to(dtype), LorettaAdpConfig(bottleneck=8, tt_rank=2, function_preserving=False))
    assert (logits(plain) - before).abs().max() > 1e-4  # the paper's init: not the identity


@pytest.mark.parametrize("position", ["pre", "post"])
def test_adp_layer_output_is_input_plus_adapter(position):
    # The float32 path fuses the residual sum into the up-projection; it must equal h + adapter(h).
    model = inject(tiny_opt(), LorettaAdpConfig(bottleneck=8, tt_rank=2, function_preserving=False))
    layer = next(m for m in model.modules() if isinstance(m, LorettaAdpLayer) and m.position == position)
    x = torch.randn(2, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if position == "pre":
            expected = layer.base_layer(x + layer.loretta_adapter(x))
        else:
            h = layer.base_layer(x)
            expected = h + layer.loretta_adapter(h)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def _moved_adapter(hidden=24, seed=0):
    """A TTAdapter and its initial copy, the adapter's parameters moved away from the copy's."""
    from zotune.adapters.layers import TTAdapter

    adapter = TTAdapter(hidden, 8, 3, "relu", 0.5, 16, torch.Generator().manual_seed(seed))
    initial = copy.deepcopy(adapter).requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapter, initial


@pytest.mark.parametrize("function_preserving", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_sum_in_one_product_equals_the_plain_sum(function_preserving, dtype):
    # add_to: h + s·[u − u₀, u₀, 1][B; B − B₀; b − b₀] (one GEMM) against h + adapter(h) − initial(h).
    # Tolerance: float32 sums of at most 17 products (bfloat16 h: one rounding to its 8-bit mantissa).
    adapter, initial = _moved_adapter()
    initial = initial if function_preserving else None
    h = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        delta = adapter(h) - (initial(h) if initial is not None else 0)
        expected = h + delta.to(dtype)
        out = adapter.add_to(h, initial)
    assert out.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out, expected, **tolerance)


def test_adapter_sum_with_stacked_parameters_runs_each_copy_through_its_own():
    # The batched path's form: the trainable TT layers' parameters stacked (S = 3), the frozen initial
    # adapter shared; copy s's rows (copy-major) against the adapter with copy s's parameters loaded.
    from zotune.optim.execution import swapped

    adapter, initial = _moved_adapter()
    h = torch.randn(3 * 2, 5, 24, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    params = [(layer, name, p) for layer in (adapter.down, adapter.up) for name, p in layer.named_parameters()]
    stacks = [p.detach() + 0.1 * torch.randn(3, *p.shape, generator=g) for _, _, p in params]
    with torch.no_grad():
        with swapped([(layer, name, stack, p) for (layer, name, p), stack in zip(params, stacks)]):
            out = adapter.add_to(h, initial)
        expected = []
        for s in range(3):
            for (layer, name, p), stack in zip(params, stacks):
                p.copy_(stack[s])
            expected.append(adapter.add_to(h[2 * s:2 * s + 2], initial))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_train_norms_unfreezes_every_norm_and_nothing_else():
    model = inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "loretta_" not in n}
    assert norms == {"model.norm.weight"} | {f"model.layers.{i}.{k}.weight" for i in range(2)
                                             for k in ("input_layernorm", "post_attention_layernorm")}


def test_save_load_round_trip_into_a_fresh_model(tmp_path):
    model = inject(tiny_opt(), LorettaRepConfig(r=4, tt_rank=2, train_norms=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    trained = logits(model)
    path = save(model, tmp_path / "adapters.safetensors")
    assert set(adapter_state(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = load(tiny_opt(), path)
    torch.testing.assert_close(logits(fresh), trained)


def test_merge_folds_delta_into_plain_layers(tmp_path):
    model = inject(tiny_llama(), LorettaRepConfig(r=4, tt_rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    trained = logits(model)
    merge(model)
    assert not any(isinstance(m, LorettaRepLayer) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    torch.testing.assert_close(logits(model), trained, rtol=1e-4, atol=1e-5)


def test_trainable_counts_match_the_closed_form():
    model = inject(tiny_llama(), LorettaRepConfig(r=8, tt_rank=5))
    # each q_proj/v_proj (32 -> 32 and 32 -> 16): A = TT 32->8, B = TT 8->out, no bias
    layers = [m for m in model.modules() if isinstance(m, LorettaRepLayer)]
    expected = sum(sum(c.numel() for c in m.loretta_A.cores) + sum(c.numel() for c in m.loretta_B.cores)
                   for m in layers)
    assert trainable_numel(model) == expected and len(layers) == 4


def test_clear_errors():
    from transformers import T5Config, T5ForConditionalGeneration

    with pytest.raises(ValueError, match="target_modules"):
        inject(T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                   vocab_size=32)), LorettaAdpConfig())
    with pytest.raises(ValueError, match="match no module"):
        inject(tiny_llama(), LorettaRepConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(TypeError, match="nn.Linear and Conv1D"):
        inject(tiny_llama(), LorettaRepConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="positive integer"):
        LorettaAdpConfig(bottleneck=0)
    with pytest.raises(ValueError, match="nonlinearity"):
        LorettaAdpConfig(nonlinearity="swish2")
    with pytest.raises(ValueError, match="pre' or 'post"):
        LorettaAdpConfig(target_modules={"fc1": "middle"})
    model = inject(tiny_llama(), LorettaAdpConfig(bottleneck=4, tt_rank=2))
    with pytest.raises(ValueError, match="already has"):
        inject(model, LorettaAdpConfig())
    with pytest.raises(ValueError, match="non-linear"):
        merge(model)
    with pytest.raises(FileNotFoundError):
        load(tiny_llama(), "/nonexistent/adapters.safetensors")


def test_half_precision_base_with_float32_adapters():
    model = inject(tiny_llama(dtype=torch.bfloat16), LorettaAdpConfig(bottleneck=8, tt_rank=2))
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.loretta_adapter.down.core_data.dtype == torch.float32
    assert logits(model).dtype == torch.bfloat16
