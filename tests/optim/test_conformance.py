"""Properties every registered ZO method must have (one parametrised test per property)."""

import io
import random

import numpy as np
import pytest
import torch

import zotune
from conftest import lm_closure, tiny_llama

METHODS = sorted(n for n, spec in zotune.METHODS.items() if spec.zeroth_order)


def make(method, model, **kw):
    lr = 1e-4 if method == "mezo_adam" else 1e-2
    return zotune.METHODS[method](zotune.param_groups(model, weight_decay=0.01), lr=lr, eps=1e-3, seed=17, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_queries", [1, 3])
def test_resume_is_bit_identical(method, num_queries, batch):
    def closure_of(model):
        return lm_closure(model, batch)
    # Uninterrupted run: 6 steps.
    straight = tiny_llama()
    opt = make(method, straight, num_queries=num_queries)
    for _ in range(6):
        opt.step(closure_of(straight))

    # Interrupted run: 3 steps, save through bytes (weights_only load), fresh objects, 3 steps.
    first = tiny_llama()
    opt = make(method, first, num_queries=num_queries)
    for _ in range(3):
        opt.step(closure_of(first))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny_llama(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = make(method, resumed, num_queries=num_queries)
    opt.load_state_dict(saved["optim"])
    assert opt.num_steps == 3
    for _ in range(3):
        opt.step(closure_of(resumed))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", METHODS)
def test_global_rng_untouched(method, batch):
    model = tiny_llama()
    opt = make(method, model, num_queries=2)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for _ in range(2):
        opt.step(lm_closure(model, batch))
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


@pytest.mark.parametrize("method", METHODS)
def test_step_changes_weights_and_returns_loss(method, batch):
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(method, model)
    loss = opt.step(lm_closure(model, batch))
    assert isinstance(loss, float) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("method", METHODS)
def test_directions_regenerate_identically(method):
    p = torch.nn.Parameter(torch.zeros(3, 5))
    a = zotune.METHODS[method]([p], lr=0.1, seed=4)
    b = zotune.METHODS[method]([p], lr=0.1, seed=4)
    c = zotune.METHODS[method]([p], lr=0.1, seed=5)
    (ka,), (kb,), (kc,) = a.draw_keys(2), b.draw_keys(2), c.draw_keys(2)
    za = a.perturbation.coordinates(p, 0, [(1.0, ka)])
    assert torch.equal(za, a.perturbation.coordinates(p, 0, [(1.0, ka)]))
    assert torch.equal(za, b.perturbation.coordinates(p, 0, [(1.0, kb)]))
    assert not torch.equal(za, c.perturbation.coordinates(p, 0, [(1.0, kc)]))
    assert not torch.equal(za, a.perturbation.coordinates(p, 0, [(1.0, a.draw_keys(3)[0])]))


def test_gaussian_chunks_are_consistent():
    # A parameter spanning several chunks (and a last, shorter one): add_ must apply exactly
    # the coordinates' tensor, and different chunks must get different numbers.
    from zotune.optim import DrawKey, Gaussian

    pert = Gaussian(chunk_numel=5)
    p = torch.zeros(3, 4, dtype=torch.float64)
    key = DrawKey(1, 2, 0)
    z = pert.coordinates(p, 0, [(1.0, key)])
    pert.add_(p, 0, [(0.5, key)])
    torch.testing.assert_close(p, 0.5 * z, rtol=0, atol=0)
    flat = z.view(-1)
    assert not torch.equal(flat[:5], flat[5:10])
    with pytest.raises(ValueError, match="chunk_numel"):
        Gaussian(chunk_numel=0)


@pytest.mark.parametrize("name", sorted(zotune.METHODS))
def test_spec_tells_the_truth(name):
    """What a method's registry entry declares holds for the optimizer its factory builds."""
    import dataclasses
    import inspect

    spec = zotune.METHODS[name]
    signature = inspect.signature(spec.factory).parameters
    for field in dataclasses.fields(spec.options):  # every option is a keyword of the factory, same default
        assert signature[field.name].default == field.default, field.name
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    if not spec.zeroth_order:
        assert not spec.virtual and not spec.linear
        return
    assert spec(model.parameters(), lr=1e-3).rule.linear == spec.linear
    if spec.virtual:
        spec(model.parameters(), lr=1e-3, execution=zotune.Virtual(model))
    else:
        with pytest.raises(ValueError, match="factored perturbation"):
            spec(model.parameters(), lr=1e-3, execution=zotune.Virtual(model))


@pytest.mark.parametrize("method", ["mezo_adam", "mezo_momentum"])
def test_multi_tensor_rule_update_equals_the_per_tensor_one(method, batch, monkeypatch):
    # Stateful rules over dense directions update chunks of tensors in multi-tensor kernels; the
    # arithmetic is the per-tensor update's, so weights and moments agree bit for bit. Chunks of
    # 5,000 elements split the tiny model's tensors into many chunks (some tensors larger than one).
    from zotune.optim import optimizer

    def run():
        model = tiny_llama()
        opt = make(method, model, num_queries=2)
        for _ in range(3):
            opt.step(lm_closure(model, batch))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    monkeypatch.setattr(optimizer, "_CHUNK_NUMEL", 5000)
    chunked_weights, chunked_state = run()
    monkeypatch.setattr(optimizer.ZOOptimizer, "_many_at_once", lambda self, members: False)
    weights, state = run()
    assert all(torch.equal(a, b) for a, b in zip(chunked_weights, weights))
    for a, b in zip(chunked_state["state"].values(), state["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a)
