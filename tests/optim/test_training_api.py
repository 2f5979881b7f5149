"""Param groups, schedulers, gradient accumulation and plain convergence."""

import torch
import torch.nn.functional as F

import zotune
from conftest import lm_closure, tiny_llama, tiny_opt


def test_param_groups_by_module_type():
    for model in (tiny_llama(), tiny_opt()):
        decay, no_decay = zotune.param_groups(model, weight_decay=0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        for p in no_decay["params"]:
            assert "norm" in names[id(p)] or "bias" in names[id(p)], names[id(p)]
        for p in decay["params"]:
            assert p.dim() == 2, names[id(p)]
        n_unique = len({id(p) for p in model.parameters()})
        assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_group_learning_rates_and_scheduler(batch):
    model = tiny_llama()
    frozen_lr = [p for n, p in model.named_parameters() if "layers.0." in n]
    others = [p for n, p in model.named_parameters() if "layers.0." not in n]
    before = [p.detach().clone() for p in frozen_lr]
    opt = zotune.mezo([{"params": frozen_lr, "lr": 0.0}, {"params": others}], lr=1e-2,
                      execution=zotune.DriftSafe(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        opt.step(lm_closure(model, batch))
        sched.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(frozen_lr, before))
    assert opt.param_groups[1]["lr"] == 1e-2 * 0.25


def float64_lm_closure(model, ids):
    # transformers computes its own loss in float32; this one stays in the model's float64.
    def closure():
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return closure


def test_accumulation_equals_one_big_batch(batch):
    # Mean loss over a batch = mean of the two half-batch means, so averaging the half-batch
    # projected gradients must give the full-batch step. In float64 the two reductions differ
    # by ~1e-16 relative, i.e. ~1e-13 in g at eps=1e-3: far below the tolerance below, while a
    # sum instead of a mean, or different directions per micro-batch, would be off by O(lr).
    runs = []
    for micro in (False, True):
        model = tiny_llama(dtype=torch.float64)
        opt = zotune.mezo(model.parameters(), lr=1e-2, eps=1e-3, seed=2)
        for _ in range(3):
            if micro:
                opt.step([float64_lm_closure(model, batch[:2]), float64_lm_closure(model, batch[2:])])
            else:
                opt.step(float64_lm_closure(model, batch))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_loss_of_tiny_transformer_falls(batch):
    model = tiny_llama()
    closure = lm_closure(model, batch)
    with torch.no_grad():
        start = float(closure())
    opt = zotune.mezo(model.parameters(), lr=3e-3, eps=1e-3, seed=0)
    for _ in range(200):
        opt.step(closure)
    with torch.no_grad():
        end = float(closure())
    # A random 64-token model starts near ln(64) = 4.16. Measured with seeds 0 and 1 at this lr:
    # 4.16 -> 3.80 and 3.68 after 200 steps; without learning the loss would stay at 4.16.
    assert end < start - 0.25, (start, end)
