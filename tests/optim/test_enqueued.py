"""The update enqueued on the GPU before the losses are read back (zotune.optim.enqueued): its coefficients
are the host's bit for bit, the kernel reads them from the device as it would take them from the host, and
on CUDA a step so run leaves the weights the host's update leaves, without waiting for the GPU."""

import textwrap

import pytest
import torch

from conftest import needs_triton, run_interpreted
import zotune
from zotune.optim.enqueued import projected_gradients, update_terms
from zotune.optim.estimators import SPSA
from zotune.optim.execution import mean_losses
from zotune.optim.perturbations import DrawKey, merge_terms

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def host_terms(measured, estimator, keys, lr, restore):
    """What the optimizer's host path passes to the update pass: its losses, g and ``-lr * g / q``."""
    losses = mean_losses(measured)
    grads = estimator.projected_gradients(losses)
    update = [(-lr * g / len(keys), key) for g, key in zip(grads, keys)]
    return merge_terms([*restore, *update])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator,queries,micro_batches", [
    (SPSA(eps=1e-3), 1, 1), (SPSA(eps=3e-3, num_queries=3), 3, 3), (SPSA(eps=1e-2, two_sided=False), 2, 7),
])
def test_the_device_coefficients_are_the_hosts_bit_for_bit(device, estimator, queries, micro_batches):
    # Losses of float32 forwards; 200 steps of random values near each other, as ±ε losses are. Exact
    # equality of every coefficient, in float64 and after the rounding to float32 the kernel takes.
    generator = torch.Generator().manual_seed(0)
    keys = [DrawKey(5, 0, i) for i in range(queries)]
    restore = [(estimator.eps, keys[-1])]  # what the in-place path hands back after its last point
    for _ in range(200):
        base = float(torch.rand((), generator=generator)) * 3
        losses = base + 1e-4 * torch.randn(estimator.num_points(queries), micro_batches, generator=generator)
        lr = float(torch.rand((), generator=generator)) * 1e-3
        on_device = [[v.to(device) for v in row] for row in losses]
        got = merge_terms([*restore, *update_terms(projected_gradients(on_device, estimator), keys, lr)])
        want = host_terms([[float(v) for v in row] for row in losses], estimator, keys, lr, restore)
        assert [key for _, key in got] == [key for _, key in want]
        for (alpha, _), (expected, _) in zip(got, want):
            assert alpha.item() == expected
            assert alpha.float().item() == torch.tensor(expected, dtype=torch.float32).item()


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_loss_leaves_the_restore_alone(device):
    keys = [DrawKey(1, 2, 0)]
    measured = [[torch.tensor(1.5, device=device)], [torch.tensor(float("nan"), device=device)]]
    (alpha, key), = merge_terms([(1e-3, keys[0]), *update_terms(projected_gradients(measured, SPSA()), keys, lr=0.1)])
    assert key == keys[0] and alpha.item() == 1e-3


KERNEL_CHECK = textwrap.dedent("""
    import json, torch
    from zotune.optim.fused import FusedPerturber
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = torch.randn(9001, generator=torch.Generator().manual_seed(0)).to(dtype)
        terms = [(0.5, 11), (-1.25, 12345), (1e-3, 7), (2.0, 99), (-0.75, 5)]  # two launches
        from_host, from_device = start.clone(), start.clone()
        FusedPerturber().add_([(3, from_host)], terms)
        FusedPerturber().add_([(3, from_device)], [(torch.tensor(a, dtype=torch.float64), s) for a, s in terms])
        out[str(dtype)] = bool(torch.equal(from_host, from_device)) and not torch.equal(start, from_host)
    print(json.dumps(out))
""")


@needs_triton
def test_the_kernel_reads_its_step_sizes_from_the_device_as_from_the_host():
    assert run_interpreted(KERNEL_CHECK) == {"torch.float32": True, "torch.bfloat16": True}


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_step_enqueued_on_cuda_leaves_the_hosts_weights(dtype):
    torch.manual_seed(0)
    target = torch.randn(3000, device="cuda", dtype=dtype)
    models = [torch.nn.Parameter(torch.zeros(3000, device="cuda", dtype=dtype)) for _ in range(2)]
    optimizers = [zotune.mezo([p], lr=1e-3, eps=1e-2, num_queries=2, seed=7, nan_policy="skip") for p in models]

    def loss(p, step):
        value = ((p.float() - target.float()) ** 2).mean()
        return value * float("nan") if step == 3 else value  # step 3 is skipped on both paths

    for step in range(8):
        for i, (p, opt) in enumerate(zip(models, optimizers)):
            # the host path: a step with an accept check reads its losses back before updating
            opt.step(lambda p=p: loss(p, step), accept=(lambda record: True) if i == 1 else None)
        assert repr(optimizers[0].last_record) == repr(optimizers[1].last_record)  # (NaN != NaN: compare text)
    assert optimizers[0].num_skipped == 1
    assert torch.equal(models[0], models[1]) and not torch.equal(models[0], torch.zeros_like(models[0]))

    # the enqueued update waits for nothing: torch's sync debug mode raises on any wait for the GPU
    opt, p = optimizers[0], models[0]
    keys = opt.draw_keys(opt.num_steps)
    measured = opt.execution.measure_pending(opt.estimator.points(keys), [lambda: loss(p, 0)])
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert opt._enqueue_update(keys, measured)
    finally:
        torch.cuda.set_sync_debug_mode("default")
