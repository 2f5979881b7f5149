"""The virtual batched path measures the same projected gradients as the in-place path."""

import pytest
import torch
import torch.nn.functional as F

import zotune
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt


def per_copy_lm_closure(model, ids):
    """Loss of the batch, or with copies=S the S losses of the batch repeated S times."""

    def closure(copies=None):
        batch = ids.repeat(copies or 1, 1)
        logits = model(input_ids=batch).logits
        if "MaskedLM" in type(model).__name__:
            targets = batch  # masked-LM head: reconstruct every token
        else:
            logits, targets = logits[:, :-1], batch[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)
        return losses.mean() if copies is None else losses.view(copies, -1).mean(dim=1)

    return closure


def trainable(model, skip=()):
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in skip))


def path(virtual, model):
    """The execution path of a comparison: virtual, or the default in-place one."""
    return zotune.Virtual(model) if virtual else zotune.InPlace()


def opt_grads_both_paths(make_optimizer, batch, steps, before_step=lambda step, model: None):
    """Projected gradients (steps, q) on a tiny OPT, in place then virtual: same seeds, so same directions."""
    records = []
    for virtual in (False, True):
        model = tiny_opt()
        trainable(model, ("embed_positions",))
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], model, virtual)
        grads = []
        for step in range(steps):
            before_step(step, model)
            opt.step(per_copy_lm_closure(model, batch))
            grads.append(opt.last_record.projected_grads)
        records.append(torch.tensor(grads))
    return records


@pytest.mark.parametrize("make,skip", [
    (tiny_llama, ("norm",)),  # LLaMA's RMSNorm is not a torch LayerNorm: frozen
    (tiny_opt, ("embed_positions",)),  # OPT's learned positions take a mask, not ids: frozen
    (tiny_gpt2, ()),  # all trained: position ids of shape (1, T), shared by the batch, are expanded per row
    (tiny_bert, ()),  # the same for BERT's position embeddings
])
@pytest.mark.parametrize("method", ["lozo", "tezo"])
@pytest.mark.parametrize("two_sided", [True, False])
def test_same_projected_gradients_as_in_place(make, skip, method, two_sided, batch):
    records = []
    for virtual in (False, True):
        model = make()
        trainable(model, skip)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = zotune.METHODS[method](params, lr=1e-3, eps=1e-2, num_queries=2, two_sided=two_sided, seed=4,
                                     rank=2, execution=path(virtual, model))
        for _ in range(2):
            opt.step(per_copy_lm_closure(model, batch))
            records.append(opt.last_record.projected_grads)
    in_place, virtual = records[:2], records[2:]
    for a, b in zip(in_place, virtual):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=2e-3, atol=2e-3)


def test_virtual_half_precision_lr0_is_bit_identical(batch):
    model = tiny_gpt2().to(torch.bfloat16)
    trainable(model, skip=("wpe",))
    before = [p.detach().clone() for p in model.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = zotune.lozo(params, lr=0.0, eps=1e-2, execution=zotune.Virtual(model))
    for _ in range(2):
        opt.step(per_copy_lm_closure(model, batch))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_unsupported_parameters_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"input_layernorm.weight \(LlamaRMSNorm\)"):
        zotune.lozo(model.parameters(), lr=1e-3, execution=zotune.Virtual(model))
    with pytest.raises(ValueError, match="factored perturbation"):
        zotune.mezo([p for n, p in model.named_parameters() if "norm" not in n], lr=1e-3,
                    execution=zotune.Virtual(model))


def test_closure_must_return_per_copy_losses(batch):
    model = tiny_gpt2()
    opt = zotune.lozo(model.parameters(), lr=1e-3, execution=zotune.Virtual(model))
    with pytest.raises(TypeError, match=r"closure\(copies=2\).*got shape \(\)"):
        opt.step(lambda copies=None: torch.tensor(1.0))
    # a closure written for the in-place path is told what the path needs, not "unexpected keyword argument"
    with pytest.raises(TypeError, match=r"closure\(copies=2\).*takes no 'copies' argument"):
        opt.step(lambda: torch.tensor(1.0))

    def failing(copies=None):  # a TypeError inside a closure that takes copies is its own
        raise TypeError("inside the closure")

    with pytest.raises(TypeError, match="^inside the closure$"):
        opt.step(failing)


class SharedRowModel(torch.nn.Module):
    """Tokens plus a Linear of a learned (1, T, d) tensor that the whole batch shares."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 8)
        self.shared = torch.nn.Parameter(torch.randn(1, 16, 8), requires_grad=False)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 64)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids) + self.mix(self.shared[:, : input_ids.shape[1]]))


def test_a_module_given_rows_the_batch_shares_is_reported(batch):
    # Ids of one row reaching a perturbed embedding are expanded per row (the parametrised test above: GPT-2,
    # BERT); any other module given a single row for the whole batch cannot be perturbed per copy.
    model = SharedRowModel()
    opt = zotune.lozo([model.mix.weight], lr=1e-3, execution=zotune.Virtual(model))

    def closure(copies=None):
        logits = model(batch.repeat(copies or 1, 1))[:, :-1]
        targets = batch.repeat(copies or 1, 1)[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
        return losses.mean() if copies is None else losses.view(copies, -1).mean(1)

    with pytest.raises(ValueError, match="without the repeated batch dimension"):
        opt.step(closure)


def test_shared_position_ids_reach_the_embedding_per_row_only_while_measuring(batch):
    model = tiny_gpt2()
    seen = []
    model.transformer.wpe.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[:2])))
    opt = zotune.lozo(model.parameters(), lr=1e-3, num_queries=2, execution=zotune.Virtual(model))
    opt.step(per_copy_lm_closure(model, batch))
    model(input_ids=batch)  # outside a step: the model's own (1, T) ids, the hooks removed
    assert seen == [(4 * len(batch), batch.shape[1]), (1, batch.shape[1])]


def test_linear_bias_rides_in_the_low_rank_product(batch, monkeypatch):
    # LOZO lays each Linear's Uᵀ and its bias's z out next to each other, so the virtual hook adds
    # the bias perturbation inside the same batched product. It must fire on OPT's biased
    # Linears and measure what the separate bias addition measures.
    from zotune.optim import virtual_hooks as virtual_module

    fused_calls = []
    original = virtual_module._with_bias_row

    def spy(left_t, bias_z):
        fused = original(left_t, bias_z)
        fused_calls.append(fused is not None)
        return fused

    losses = {}
    for mode in ("fused", "separate"):
        monkeypatch.setattr(virtual_module, "_with_bias_row", spy if mode == "fused" else lambda *a: None)
        model = tiny_opt().double()
        trainable(model, ("embed_positions",))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = zotune.lozo(params, lr=1e-3, eps=1e-2, num_queries=2, seed=3, execution=zotune.Virtual(model))
        opt.step(per_copy_lm_closure(model, batch))
        losses[mode] = torch.tensor(opt.last_record.losses)
    linears_with_bias = sum(1 for m in tiny_opt().modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert fused_calls.count(True) == linears_with_bias > 0
    torch.testing.assert_close(losses["fused"], losses["separate"], rtol=1e-12, atol=1e-12)


def test_sibling_linears_reading_one_input_share_one_product(batch, monkeypatch):
    # LLaMA's q, k, v read the same hidden states, and so do gate and up: their x R products
    # come from one GEMM. Same losses as one product per module, and 3 GEMMs fewer per layer.
    import torch.nn.functional as functional

    linear = functional.linear
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(functional, "linear", counting)
    results = {}
    for mode in ("shared", "apart"):
        model = tiny_llama().double()
        trainable(model, ("norm",))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = zotune.lozo(params, lr=1e-3, eps=1e-2, seed=5, execution=zotune.Virtual(model))
        if mode == "apart":
            opt.execution._groups = []
        calls["n"] = 0
        opt.step(per_copy_lm_closure(model, batch))
        results[mode] = (torch.tensor(opt.last_record.losses), calls["n"])
    torch.testing.assert_close(results["shared"][0], results["apart"][0], rtol=1e-12, atol=1e-12)
    layers = tiny_llama().config.num_hidden_layers
    assert results["apart"][1] - results["shared"][1] == 3 * layers  # k, v and up reuse q's and gate's GEMM


@pytest.mark.parametrize("nu", [1, 2])
def test_virtual_follows_the_v_windows(nu, batch):
    # Within a V window the virtual path reuses its factor views and hooks; across windows it
    # must rebuild them. Same projected gradients as in place over several windows.
    in_place, virtual = opt_grads_both_paths(
        lambda params, model, virtual: zotune.lozo(params, lr=1e-2, eps=1e-2, nu=nu, seed=2,
                                                   execution=path(virtual, model)), batch, steps=5)
    torch.testing.assert_close(virtual, in_place, rtol=2e-3, atol=2e-3)


def test_hooks_wrap_an_instance_forward_and_put_everything_back(batch):
    # The perturbation is installed as an instance `forward` for the step only. A module that
    # already had one (as accelerate gives it) keeps it: it runs inside the wrapper during the
    # step, with the repeated batch, and is the module's forward again afterwards, also when
    # the closure fails.
    model = tiny_llama()
    trainable(model, ("norm",))
    proj = model.model.layers[0].mlp.down_proj
    seen = []

    def own_forward(x):
        seen.append(x.shape[0])
        return F.linear(x, proj.weight, proj.bias)

    proj.forward = own_forward
    opt = zotune.lozo([p for p in model.parameters() if p.requires_grad], lr=1e-3, seed=0,
                      execution=zotune.Virtual(model))
    opt.step(per_copy_lm_closure(model, batch))
    assert seen == [2 * batch.shape[0]]  # two copies (±ε) of the batch went through it
    assert proj.__dict__["forward"] is own_forward
    others = [name for name, m in model.named_modules() if "forward" in m.__dict__ and m is not proj]
    assert others == []

    def failing(copies=None):
        model(input_ids=batch.repeat(copies or 1, 1))
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert proj.__dict__["forward"] is own_forward
    assert [name for name, m in model.named_modules() if "forward" in m.__dict__ and m is not proj] == []
    with torch.no_grad():  # and the model computes its plain function again
        reference = per_copy_lm_closure(model, batch)()
        del proj.forward
        assert torch.equal(per_copy_lm_closure(model, batch)(), reference)


@pytest.mark.parametrize("method", ["lozo", "tezo"])
@pytest.mark.parametrize("per", [1, 3])
def test_copies_split_over_forwards_measure_what_one_forward_does(method, per, batch):
    # copies_per_forward=k runs the S = 2q = 4 copies as forwards of at most k copies (k=3: 3 then
    # 1, so a pass's factor slices start mid-buffer). In float64 the losses agree with one
    # forward to rounding, over two steps (the second reuses the cached passes).
    results = {}
    for split in (None, per):
        model = tiny_opt().double()
        trainable(model, ("embed_positions",))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = zotune.METHODS[method](params, lr=1e-2, eps=1e-2, num_queries=2, seed=6, rank=2,
                                     execution=zotune.Virtual(model, copies_per_forward=split))
        closure = per_copy_lm_closure(model, batch)
        sizes = []

        def recording(copies=None):
            sizes.append(copies)
            return closure(copies)

        losses = []
        for _ in range(2):
            opt.step(recording)
            losses.append(opt.last_record.losses)
        results[split] = (torch.tensor(losses), sizes)
    torch.testing.assert_close(results[per][0], results[None][0], rtol=1e-10, atol=1e-12)
    assert results[None][1] == [4, 4]
    assert results[per][1] == ([1, 1, 1, 1] * 2 if per == 1 else [3, 1] * 2)


def test_copies_per_forward_is_checked():
    model = tiny_gpt2()
    with pytest.raises(TypeError, match="copies_per_forward"):  # a Virtual path's setting, not the optimizer's
        zotune.lozo(model.parameters(), lr=1e-3, copies_per_forward=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            zotune.lozo(model.parameters(), lr=1e-3, execution=zotune.Virtual(model, copies_per_forward=bad))


@pytest.mark.parametrize("method", ["lozo", "tezo"])
def test_a_dtype_change_between_steps_is_followed(method, batch):
    # The virtual path keeps its factors and hooks across steps (a LOZO window, a TeZO run);
    # module.double() gives the parameters new storage, and the kept float32 factors must not
    # meet float64 outputs (this failed with a dtype error in baddbmm_).
    def double_at_step_2(step, model):
        if step == 2:
            model.double()

    in_place, virtual = opt_grads_both_paths(
        lambda params, model, virtual: zotune.METHODS[method](params, lr=1e-3, eps=1e-2, rank=2, seed=7,
                                                              execution=path(virtual, model)),
        batch, steps=4, before_step=double_at_step_2)
    torch.testing.assert_close(virtual, in_place, rtol=2e-3, atol=2e-3)


def test_a_tied_weight_used_by_an_unsupported_module_is_refused():
    # The weight of an embedding with its own forward, tied to a Linear head: the head's hook alone would
    # perturb one of its two uses, and the measurement would be silently wrong.
    class Doubled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = Doubled(16, 8), torch.nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied()
    with pytest.raises(ValueError, match=r"embed.weight \(Doubled\)"):
        zotune.lozo(model.parameters(), lr=1e-3, execution=zotune.Virtual(model))
