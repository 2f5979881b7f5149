"""A step with lr = 0 must give the weights back.

In-place float32: the weights go θ → fl(θ + εz) → fl(· − 2εz) → fl(· + εz). With unit
roundoff u = 2⁻²⁴ and the same εz in each pass, the first-order error is
    |Δθ| ≤ u (|θ + εz| + |θ − εz| + |θ|) ≤ u (3|θ| + 2ε|z|)
(a few ulps of θ). The documented bound is checked element-wise.
Drift-safe mode (perturbation applied at use): the weights are never written, so they come
back bit-identical in every dtype.
"""

import pytest
import torch

import zotune
from conftest import lm_closure, tiny_llama, tiny_opt


def test_inplace_float32_restores_within_bound(batch):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zotune.mezo(model.parameters(), lr=0.0, eps=1e-3, seed=5)
    opt.step(lm_closure(model, batch))
    (key,) = opt.draw_keys(0)
    u = 2.0**-24
    for index, (name, p) in enumerate(model.named_parameters()):
        z = opt.perturbation.coordinates(p, index, [(1.0, key)])
        bound = u * (3 * before[name].abs() + 2 * 1e-3 * z.abs())
        err = (p.detach() - before[name]).abs()
        assert torch.all(err <= bound * 1.0001), f"{name}: max err/bound {(err / bound).max():.3f}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("method", ["mezo", "mezo_momentum", "mezo_adam"])
def test_drift_safe_lr0_is_bit_identical(dtype, make, method, batch):
    model = make(dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zotune.METHODS[method](model.parameters(), lr=0.0, eps=1e-3, execution=zotune.DriftSafe(model))
    for _ in range(3):
        opt.step(lm_closure(model, batch))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_inplace_half_precision_drifts(batch):
    # Why drift-safe mode exists: the in-place path does not return float16 weights exactly.
    model = tiny_llama(dtype=torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.mezo(model.parameters(), lr=0.0, eps=1e-3)
    for _ in range(3):
        opt.step(lm_closure(model, batch))
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_drift_safe_measures_the_same_gradient(make, batch):
    # Both paths measure L at θ ± εZ for the same Z, so in float32 the projected gradients
    # agree to rounding (the in-place path reaches θ − εZ through θ + εZ − 2εZ).
    grads = []
    for drift_safe in (False, True):
        model = make()
        opt = zotune.mezo(model.parameters(), lr=1e-3, eps=1e-2, num_queries=2, seed=9,
                          execution=zotune.DriftSafe(model) if drift_safe else None)
        opt.step(lm_closure(model, batch))
        grads.append(opt.last_record.projected_grads)
    for a, b in zip(*grads):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), grads
