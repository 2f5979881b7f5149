"""The batched path (small trainable sets: all points of a step in one forward over S copies) measures
what the drift-safe path measures, point by point, for dense and factored directions."""

import pytest
import torch

import zotune
from conftest import SHARED_DATA, needs_shared_data, tiny_bert, tiny_llama, tiny_opt
from test_virtual import per_copy_lm_closure
from zotune.adapters import LorettaAdpConfig, inject
from zotune.optim.batched import Batched


def ids_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (4, 10), generator=g)


def grads(model, make_optimizer, execution, steps=3):
    ids = ids_for(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], execution)
    out = []
    for _ in range(steps):
        opt.step(per_copy_lm_closure(model, ids))
        out.append(opt.last_record.projected_grads)
    return out, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def lora(model):
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():  # B starts at zero in PEFT: give it values, so that A's perturbation shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def norms_only(model):
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    return model


CASES = {
    # dense Gaussian directions over the norms (MeZO on a norms-only set), two queries
    "mezo-norms": (lambda: norms_only(tiny_llama()),
                   lambda params, path: zotune.mezo(params, lr=1e-2, num_queries=2, seed=3, execution=path)),
    # AdaZeta over LoRETTA_adp adapters (TT cores inside adapter modules), three queries
    "adazeta-adapters": (lambda: inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False)),
                         lambda params, path: zotune.mezo(params, lr=1e-3, num_queries=3, seed=5, execution=path)),
    # MeZO over PEFT LoRA (its A and B nn.Linear layers take every copy in one batched product)
    "mezo-lora": (lambda: lora(tiny_llama()),
                  lambda params, path: zotune.mezo(params, lr=1e-2, num_queries=2, seed=2, execution=path)),
    # every parameter of a BERT, whose position embeddings get ids shared by the batch, (1, T)
    "mezo-bert-all": (tiny_bert,
                      lambda params, path: zotune.mezo(params, lr=1e-3, num_queries=2, seed=6, execution=path)),
    # low-rank directions on OPT's norms and adapters with a one-sided base point
    "lozo-one-sided-opt": (lambda: inject(tiny_opt(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=True)),
                           lambda params, path: zotune.lozo(params, lr=1e-3, rank=2, num_queries=2, two_sided=False,
                                                            seed=1, execution=path)),
}


@pytest.mark.parametrize("case", CASES)
def test_batched_measures_what_drift_safe_measures(case):
    build, make_optimizer = CASES[case]
    model_a, model_b = build(), build()
    model_b.load_state_dict(model_a.state_dict())
    reference, weights_a = grads(model_a, make_optimizer, zotune.DriftSafe(model_a))
    batched, weights_b = grads(model_b, make_optimizer, Batched(model_b))
    # Same perturbed values (a copy plus offset·Z on both paths); the frozen layers run on S·B rows
    # instead of B, and TT layers take all copies in batched products, which may round differently in
    # float32 (~1e-7 relative in a loss of ~4, over 2ε = 2e-3 in g): 1e-3 absolute on projected
    # gradients of order 1-100. The weights then differ by at most steps·lr·Δg·|Z| = 3 · 1e-3 · 1e-3 · 4
    # (|Z| < 4 for these few hundred normals, an entry of U Vᵀ included): 2e-5.
    for a, b in zip(reference, batched):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)
    for a, b in zip(weights_a, weights_b):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_copies_per_forward_splits_the_points():
    model = norms_only(tiny_llama())
    calls = []
    ids = ids_for(model)
    closure = per_copy_lm_closure(model, ids)

    def counting(copies=None):
        calls.append(copies)
        return closure(copies)

    opt = zotune.mezo([p for p in model.parameters() if p.requires_grad], lr=1e-2, num_queries=3,
                      execution=Batched(model, copies_per_forward=4))
    opt.step(counting)
    assert calls == [4, 2]  # 6 points: a forward of 4 copies, one of 2


def test_a_closure_without_copies_is_refused():
    model = norms_only(tiny_llama())
    opt = zotune.mezo([p for p in model.parameters() if p.requires_grad], lr=1e-2, execution=Batched(model))
    ids = ids_for(model)[:3]  # 3 rows cannot be 2 copies of a batch
    with pytest.raises(ValueError, match="must repeat the batch copy-major"):
        opt.step(lambda copies=None: model(input_ids=ids).logits.float().mean().reshape(1).repeat(copies or 1))


@needs_shared_data
def test_the_command_line_trains_adazeta_batched(tiny_model_dir, tmp_path):
    from zotune.cli import main

    assert main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA), "--data.n_train",
                 "16", "--data.n_dev", "0", "--data.n_test", "4", "--train.steps", "3", "--train.batch_size", "4",
                 "--optim.method", "adazeta", "--adapter.kind", "adp", "--adapter.bottleneck", "8",
                 "--adapter.tt_rank", "2", "--optim.batched", "true", "--optim.copies_per_forward", "2",
                 "--train.output_dir", str(tmp_path), "--train.run_name", "run", "--train.progress", "false",
                 "--train.zero_shot", "false"]) == 0
    assert (tmp_path / "run" / "results.json").exists()
    assert main(["train", "--optim.batched", "true", "--optim.virtual", "true", "--optim.method", "lozo"]) == 2


@pytest.mark.parametrize("function_preserving", [False, True])
def test_the_fused_up_projection_is_perturbed_on_every_path(function_preserving):
    # LoRETTA_adp runs its up-projection inside TTAdapter.add_to (the residual sum, and the frozen initial
    # adapter's difference, fused into one GEMM), past the module's call: the paths that perturb a
    # module's parameters at its call (drift-safe) or stack them (batched) must still see it perturbed.
    # The in-place path, which writes the perturbation into the weights, is the reference.
    def build():
        torch.manual_seed(0)
        return inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False,
                                                     function_preserving=function_preserving))

    def make(params, path):
        return zotune.mezo(params, lr=1e-3, num_queries=2, seed=5, execution=path)

    reference, _ = grads(build(), make, zotune.InPlace(), steps=2)
    for path in (zotune.DriftSafe, Batched):
        model = build()
        measured, _ = grads(model, make, path(model), steps=2)
        for a, b in zip(reference, measured):
            assert b == pytest.approx(a, rel=1e-3, abs=1e-3), path.__name__


def test_tt_layers_take_all_copies_in_one_call(monkeypatch):
    from zotune.adapters import TTLinear

    calls = []
    original = TTLinear.factors_of_copies
    monkeypatch.setattr(TTLinear, "factors_of_copies", lambda self, core_data: calls.append(core_data.shape[0])
                        or original(self, core_data))
    model = inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False))
    layers = sum(isinstance(m, TTLinear) for m in model.modules()) // 2  # the frozen initial copies excluded
    zotune.mezo([p for p in model.parameters() if p.requires_grad], lr=1e-3, num_queries=3,
                execution=Batched(model)).step(per_copy_lm_closure(model, ids_for(model)))
    assert calls == [6] * layers  # each trainable TT layer: its factors once, for the step's 6 points


def test_linear_copies_is_each_copy_through_its_own_weight():
    from zotune.optim.batched import linear_copies

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(3 * 2, 4, 12, generator=g)  # 3 copies of a batch of 2 sequences of 4
    weights, biases = torch.randn(3, 5, 12, generator=g), torch.randn(3, 5, generator=g)
    for bias in (biases, None):
        out = linear_copies(layer, x, weight=weights, bias=bias)
        expected = torch.cat([torch.nn.functional.linear(x[2 * s:2 * s + 2], weights[s],
                                                         layer.bias if bias is None else bias[s]) for s in range(3)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def tail_closure(model, ids):
    """Per-copy losses through the scoring code's call (left-padded rows, ``logits_to_keep``), the call
    that the training loss makes and that CapturedCausalLM takes."""
    from zotune.eval.scoring import tail_logprobs

    rows = [(tuple(row.tolist()), row.numel() - 2) for row in ids]

    def closure(copies=None):
        logp = tail_logprobs(model, rows * (copies or 1), pad_id=0)  # (S·B, K, vocab)
        targets = ids[:, 2:].repeat(copies or 1, 1).to(logp.device)  # the scored tokens
        losses = -logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(dim=1)
        return losses.mean() if copies is None else losses.view(copies, -1).mean(dim=1)

    return closure


def batched_grads_through(wrap, device, steps=2):
    """Projected gradients of the batched path at q = 1, then at q = 3 (as AdaZeta's schedule raises it:
    the copies move to new stacks), with the loss calling ``wrap(model, path)``."""
    build, _ = CASES["adazeta-adapters"]
    model = build().to(device)
    path = Batched(model)
    closure = tail_closure(wrap(model, path), ids_for(model))
    opt = zotune.mezo([p for p in model.parameters() if p.requires_grad], lr=1e-3, seed=4, execution=path)
    out = []
    for q in (1, 3):
        opt.set_num_queries(q)
        for _ in range(steps):
            opt.step(closure)
            out.append(opt.last_record.projected_grads)
    return out


def test_the_batched_path_runs_through_the_capturable_forward():
    # CapturedCausalLM's computation (bucket padding, its own 4-D mask, one call over S·B rows) with the
    # per-copy layers installed measures what the model itself measures; tolerance as above.
    from zotune.models.captured import CapturedCausalLM

    plain = batched_grads_through(lambda model, path: model, "cpu")
    bucketed = batched_grads_through(
        lambda model, path: CapturedCausalLM(model, capture=False, storage_version=path.storage_version), "cpu")
    for a, b in zip(plain, bucketed):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)


def test_the_batched_path_runs_through_a_compiled_forward():
    # torch.compile traces the forward with the copies' stacks swapped into the TT layers, and traces it
    # again when the stacks grow (q = 1, then 3): its eager backend runs the traced operations, so the
    # projected gradients are the uncompiled ones exactly. (Shapes kept static here, the second trace a
    # plain one, for time: the dynamic-shape trace a run makes is the CUDA test's below.)
    from zotune.models.captured import CapturedCausalLM

    def through(compile):
        return lambda model, path: CapturedCausalLM(model, capture=False, storage_version=path.storage_version,
                                                    compile=compile)

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        compiled = batched_grads_through(through("eager"), "cpu", steps=1)
    assert compiled == batched_grads_through(through(None), "cpu", steps=1)


def test_copy_values_are_theta_plus_each_points_direction_for_every_dtype():
    # The stacks of one device and dtype share a buffer; each row must be exactly what the drift-safe
    # path computes for that point (a copy of θ, then offset·Z added in place), in every dtype, also
    # when a later step uses fewer copies than the stacks hold.
    from zotune.optim.batched import CopyValues
    from zotune.optim.perturbations import DrawKey, Gaussian

    g = torch.Generator().manual_seed(0)
    params = [(0, torch.nn.Parameter(torch.randn(3, 4, generator=g))),
              (1, torch.nn.Parameter(torch.randn(5, generator=g).bfloat16())),
              (2, torch.nn.Parameter(torch.randn(2, 2, 2, generator=g))),
              (3, torch.nn.Parameter(torch.randn((), generator=g)))]
    perturbation, values = Gaussian(), CopyValues()
    for points in ([(1e-3, DrawKey(7, 0, 0)), (-1e-3, DrawKey(7, 0, 0)), (0.0, DrawKey(7, 0, 0)),
                    (2e-3, DrawKey(7, 0, 1))],
                   [(5e-3, DrawKey(7, 1, 0)), (-5e-3, DrawKey(7, 1, 0))]):
        rows = values.fill(params, perturbation, points)
        assert len(rows) == len(points)
        for s, ((offset, key), row) in enumerate(zip(points, rows)):
            for index, p in params:
                expected = p.detach().clone()
                perturbation.add_(expected, index, [(offset, key)])
                assert row[index].dtype == p.dtype and row[index].is_contiguous()
                assert torch.equal(row[index], expected)
                assert torch.equal(values.stacks[index][s], expected)
    assert values.generation == 1  # the second step's two copies fit in the first step's stacks


def test_theta_goes_into_every_row_in_a_fixed_number_of_operators():
    # Putting θ into the copies' rows must not cost one copy per parameter (on a GPU, a launch each:
    # a few hundred a step for a model's adapters): the parameters are concatenated once and the row
    # repeated into one buffer per dtype. Counted by the profiler on the CPU (counts, not times).
    from torch.profiler import ProfilerActivity, profile

    from zotune.optim.batched import CopyValues
    from zotune.optim.perturbations import DrawKey, Gaussian

    model = inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False))
    params = list(enumerate(p for p in model.parameters() if p.requires_grad))
    assert len(params) > 20
    values, points = CopyValues(), [(0.0, DrawKey(1, 0, 0))] * 4  # offset 0: θ alone in every row
    values.fill(params, Gaussian(), points)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        values.fill(params, Gaussian(), points)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::copy_", 0) + counts.get("aten::_foreach_copy_", 0) <= 2


def test_copy_stacks_change_version_only_when_the_copies_outgrow_them():
    model = norms_only(tiny_llama())
    path = Batched(model)
    closure = per_copy_lm_closure(model, ids_for(model))
    opt = zotune.mezo([p for p in model.parameters() if p.requires_grad], lr=1e-2, execution=path)
    versions = [path.storage_version()]
    for q in (1, 1, 3, 2, 3):
        opt.set_num_queries(q)
        opt.step(closure)
        versions.append(path.storage_version())
    # unbound, q = 1 (2 copies: first stacks), again, q = 3 (6 copies: new stacks), q = 2 and 3 (they fit)
    assert versions == [0, 1, 1, 2, 2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_batched_forwards_follow_new_copy_stacks_on_cuda():
    from zotune.models.captured import CapturedCausalLM

    plain = batched_grads_through(lambda model, path: model, "cuda")
    captured = {}

    def wrap(model, path):
        captured["model"] = CapturedCausalLM(model, storage_version=path.storage_version)
        return captured["model"]

    replayed = batched_grads_through(wrap, "cuda")
    assert captured["model"].failure is None
    for a, b in zip(plain, replayed):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_captured_batched_forwards_measure_what_the_model_measures_on_cuda():
    # inductor's fused kernels round differently from the model's own: tolerance as above.
    from zotune.models.captured import CapturedCausalLM

    plain = batched_grads_through(lambda model, path: model, "cuda")
    made = {}

    def wrap(model, path):
        made["model"] = CapturedCausalLM(model, storage_version=path.storage_version, compile="inductor")
        return made["model"]

    compiled = batched_grads_through(wrap, "cuda")
    assert made["model"].failure is None and made["model"].backend == "inductor"
    for a, b in zip(plain, compiled):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)
