"""Models spread over devices with accelerate's device maps: every method steps as on one device.

This machine has no second device, so the map splits the model in two on the CPU and
``force_hooks=True`` makes accelerate attach its device-alignment hooks as it would across
GPUs: the perturbation hooks, the per-device generators and the in-place updates must work
through them and give the same weights as the undispatched model.
"""

import pytest
import torch

import zotune
from conftest import lm_closure, tiny_llama

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.norm": "cpu", "lm_head": "cpu"}


def dispatched():
    from accelerate import dispatch_model

    model = dispatch_model(tiny_llama(tie=False), SPLIT, main_device="cpu", force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook")  # accelerate's hooks are in place
    return model


def run(model, method, batch, **kw):
    opt = zotune.METHODS[method](zotune.param_groups(model, 0.0), lr=1e-2, seed=5, **kw)
    for _ in range(3):
        opt.step(lm_closure(model, batch))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", sorted(n for n, spec in zotune.METHODS.items() if spec.zeroth_order))
def test_every_method_through_a_device_map(method, batch):
    plain, spread = tiny_llama(tie=False), dispatched()
    for a, b in zip(run(plain, method, batch), run(spread, method, batch)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["drift_safe", "virtual"])
def test_measuring_paths_through_a_device_map(path, batch):
    def closure_of(model):
        def closure(copies=None):
            ids = batch.repeat(copies or 1, 1)
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            losses = torch.nn.functional.cross_entropy(
                model(input_ids=ids, position_ids=positions).logits[:, :-1].transpose(1, 2), ids[:, 1:],
                reduction="none").mean(1)
            return losses.mean() if copies is None else losses.view(copies, -1).mean(1)
        return closure

    results = []
    for model in (tiny_llama(tie=False), dispatched()):
        if path == "virtual":  # the virtual path perturbs Linear and Embedding weights
            for name, p in model.named_parameters():
                p.requires_grad_("norm" not in name)
        execution = zotune.Virtual(model) if path == "virtual" else zotune.DriftSafe(model)
        opt = zotune.lozo([p for p in model.parameters() if p.requires_grad], lr=1e-2, seed=5, execution=execution)
        for _ in range(3):
            opt.step(closure_of(model))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_load_model_with_a_device_map(tiny_model_dir, batch):
    model, _ = zotune.load_model(str(tiny_model_dir), device_map={"model": "cpu", "lm_head": "cpu"})
    before = model.lm_head.weight.detach().clone()
    zotune.mezo(model.parameters(), lr=1e-2).step(lm_closure(model, batch))
    assert not torch.equal(model.lm_head.weight, before)
