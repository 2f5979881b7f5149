"""The offload path (blocks in CPU memory, each uploaded once per step; the CPU stands in for the device
here) measures what the batched path measures and ends at the same weights."""

import pytest
import torch

import zotune
from conftest import SHARED_DATA, needs_shared_data, tiny_llama
from test_virtual import per_copy_lm_closure as with_cache
from zotune.optim.batched import Batched
from zotune.optim.offload import Offload


def per_copy_lm_closure(model, ids):
    """The virtual tests' closure with the key/value cache off: the offload path runs whole decoder layers
    once per copy, and a cache would join the copies' keys (refused, see the last test)."""
    model.config.use_cache = False
    return with_cache(model, ids)


def run(path_for, steps=4, q=2):
    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    path = path_for(model)
    opt = zotune.mezo(model.parameters(), lr=1e-2, num_queries=q, seed=3, execution=path)
    grads = []
    for _ in range(steps):
        opt.step(per_copy_lm_closure(model, ids))
        grads.append(opt.last_record.projected_grads)
    if isinstance(path, Offload):
        assert any(path._pending.values())  # the last update is still deferred ...
        path.flush()  # ... until the weights are read
        assert not any(path._pending.values())
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_offload_measures_and_updates_like_the_batched_path():
    batched, weights_b = run(lambda m: Batched(m))
    offloaded, weights_o = run(lambda m: Offload(m, "cpu"))
    # The first copy's weights are the batched path's exactly; later copies step from the previous copy's
    # point (one more rounding of ~1e-7 relative, over 2ε = 2e-3 in g): 1e-3 on projected gradients.
    for a, b in zip(batched, offloaded):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)
    # The updates differ by lr·Δg/q·z per step (1e-2 · 1e-3 / 2 · |z| <= 5.7 gives 3e-5) over 4 steps.
    for name in weights_b:
        torch.testing.assert_close(weights_o[name], weights_b[name], rtol=0, atol=2e-4, msg=name)


def test_an_evaluation_between_steps_sees_the_deferred_update():
    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    path = Offload(model, "cpu")
    opt = zotune.mezo(model.parameters(), lr=1e-1, seed=3, execution=path)
    opt.step(per_copy_lm_closure(model, ids))
    with torch.no_grad():
        seen = model(input_ids=ids).logits  # the blocks apply their pending update on the way
    path.flush()
    plain = tiny_llama()
    plain.load_state_dict({n: p.detach() for n, p in model.named_parameters()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(seen, plain(input_ids=ids).logits)


def test_a_block_applies_its_deferred_update_in_one_pass(monkeypatch):
    # Every parameter of a block shares the step's update terms: one pass over the block's uploaded weights
    # (on CUDA one fused launch), not one per tensor, whose launch tables the host would build each time.
    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    path = Offload(model, "cpu")
    opt = zotune.mezo(model.parameters(), lr=1e-2, seed=3, execution=path)
    opt.step(per_copy_lm_closure(model, ids))
    passes = []
    original = opt.perturbation.add_each_
    monkeypatch.setattr(opt.perturbation, "add_each_",
                        lambda params, terms, scaled: (passes.append(len(params)), original(params, terms, scaled)))
    path.flush()  # uploads every block with a pending update and applies it
    blocks = len(path._blocks)
    assert blocks > 1 and passes == [len([h for h in held if h[2] is not None]) for _, held, _ in path._blocks]


def test_offload_refuses_what_it_cannot_defer():
    model = tiny_llama()
    opt = zotune.mezo(model.parameters(), lr=1e-3, execution=Offload(model, "cpu"))
    with pytest.raises(ValueError, match="use_cache=False"):
        opt.step(with_cache(model, torch.randint(0, 64, (2, 6))))
    model = tiny_llama()
    with pytest.raises(ValueError, match="dense Gaussian directions"):
        zotune.lozo(model.parameters(), lr=1e-3, rank=2, execution=Offload(model, "cpu"))
    with pytest.raises(ValueError, match="SGD updates only"):
        opt = zotune.mezo_adam(model.parameters(), lr=1e-3, execution=Offload(model, "cpu"))
        opt.step(per_copy_lm_closure(model, torch.randint(0, 64, (2, 6))))


@needs_shared_data
def test_the_command_line_offloads_and_replays_bit_identically(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from zotune.cli import main
    from zotune.train.replay import replay

    def train(name, *extra):
        assert main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                     "--data.n_train", "16", "--data.n_dev", "4", "--data.n_test", "4", "--train.steps", "6",
                     "--train.batch_size", "4", "--train.eval_every", "3", "--optim.trainable", "all",
                     "--optim.lr", "1e-3", "--optim.num_queries", "2", "--train.output_dir", str(tmp_path),
                     "--train.run_name", name, "--train.progress", "false", "--train.zero_shot", "false",
                     *extra]) == 0
        return load_file(str(tmp_path / name / "trainable.safetensors"))

    offloaded = train("offloaded", "--model.offload", "cpu")  # the CPU standing in for the device
    batched = train("batched", "--optim.batched", "true")
    for name, tensor in batched.items():  # same points up to rounding (see above): 6 steps at lr 1e-3
        torch.testing.assert_close(offloaded[name], tensor, rtol=0, atol=1e-4, msg=name)
    said = []
    replay(str(tiny_model_dir), tmp_path / "offloaded", tmp_path / "replayed.safetensors", progress=False,
           say=said.append)
    assert any("bit-identical to the run's final weights" in line for line in said), said
    assert main(["train", "--model.offload", "cpu", "--optim.method", "lozo"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_to_cuda_measures_like_the_batched_path_on_cuda():
    from zotune.optim.offload import place

    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0)).cuda()
    grads = []
    for offload in (False, True):
        model = tiny_llama()
        model = place(model, "cuda") if offload else model.cuda()
        assert all(not p.is_cuda for p in model.model.layers.parameters()) == offload
        path = Offload(model, "cuda") if offload else Batched(model)
        opt = zotune.mezo(model.parameters(), lr=1e-2, num_queries=2, seed=3, execution=path)
        opt.step(per_copy_lm_closure(model, ids))
        grads.append(opt.last_record.projected_grads)
    assert grads[1] == pytest.approx(grads[0], rel=1e-3, abs=1e-3)
