"""The counter-based Gaussian stream (zotune.optim.philox), the fused Triton kernel that draws it
(checked through Triton's interpreter on the CPU, and on CUDA where there is one), and the Gaussian
perturbation's philox generator."""

import textwrap

import pytest
import torch

from conftest import needs_triton, run_interpreted
from zotune.optim import ZOOptimizer
from zotune.optim.estimators import SPSA
from zotune.optim.perturbations import DrawKey, Gaussian
from zotune.optim.philox import BLOCK, LANES, normals, philox_rounds



@pytest.mark.parametrize("key,counter,expected", [
    # Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_published_known_answers(key, counter, expected):
    words = philox_rounds(*key, *(torch.tensor([c]) for c in counter))
    assert tuple(int(w) for w in words) == expected


def test_the_stream_is_addressed_by_element():
    whole = normals(seed=123, index=7, start=0, numel=3 * BLOCK)
    assert torch.equal(normals(123, 7, BLOCK, 100), whole[BLOCK:BLOCK + 100])  # any window is the same numbers
    assert not torch.equal(normals(123, 8, 0, 100), whole[:100])  # another parameter, another stream
    across = slice(BLOCK - 300, BLOCK + 400)  # a window across a block boundary
    assert torch.equal(normals(123, 7, across.start, 700), whole[across])


N = 1 << 20


def test_directions_are_standard_normal_and_uncorrelated():
    # Fixed seeds. For n = 2^20 i.i.d. N(0, 1): the mean has sd 1/sqrt(n) ~ 0.001, the variance
    # sd sqrt(2/n) ~ 0.0014, a sample correlation of independent streams sd 1/sqrt(n); bounds at
    # 5 sd fail a correct generator with probability below 1e-6 each.
    bound = 5 / N ** 0.5
    z = normals(seed=2024, index=0, start=0, numel=N).double()
    assert abs(z.mean()) < bound
    assert abs(z.var() - 1) < 5 * (2 / N) ** 0.5
    assert abs((z.abs() > 1.96).double().mean() - 0.05) < 5 * (0.05 * 0.95 / N) ** 0.5  # the tails too
    assert abs((z ** 4).mean() - 3) < 5 * (96 / N) ** 0.5  # E z⁴ = 3, Var z⁴ = E z⁸ − 9 = 96
    # 16-bit uniforms: the radius is at most sqrt(-2 log 2⁻¹⁷) = 4.854
    assert z.abs().max() <= (-2 * torch.log(torch.tensor(2.0 ** -17, dtype=torch.float64))).sqrt() + 1e-6
    others = {
        "next element": z.roll(1),
        "the same word's other normal (sin beside cos)": z.roll(LANES),
        "the same Philox call's next word": z.roll(2 * LANES),
        "parameter": normals(2024, 1, 0, N),
        "step or query (another key)": normals(2025, 0, 0, N),
    }
    for what, other in others.items():
        corr = torch.corrcoef(torch.stack([z, other.double()]))[0, 1]
        assert abs(corr) < bound, what


KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch
    from zotune.optim.fused import FusedPerturber, MAX_TERMS
    from zotune.optim.philox import normals
    out = {}

    def rounded(x, dtype):  # the interpreter casts float32 to bfloat16 by truncation (GPUs round to nearest)
        if dtype == torch.bfloat16:
            return (x.view(torch.int32) & -65536).view(torch.float32)
        return x.to(dtype).float()

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sizes = [(9001,), (70, 130), (5,)]  # a whole block and a partial one each, a tensor under one block
        tensors = [(i * 3 + 2, torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype))
                   for i, s in enumerate(sizes)]
        terms = [(0.5, 11), (-1.25, 2**62 + 12345), (1e-3, 7), (2.0, 99), (-0.75, 5)]  # two launches
        before = [t.clone() for _, t in tensors]
        FusedPerturber().add_(tensors, terms)
        errors = []
        for (index, t), b in zip(tensors, before):
            want, spread, flips = b.float().view(-1), 0, 0
            for launch in (terms[:4], terms[4:]):  # the kernel rounds once per launch of up to 4 terms
                for alpha, seed in launch:
                    z = normals(seed, index, 0, t.numel())
                    want, spread = want + alpha * z, spread + abs(alpha) * z.abs()
                want = rounded(want, dtype)
                # a float32 sum a few ulps off the reference's may round to the neighbouring value: one ulp
                # of the launch's result, carried on by the later launches
                flips = flips + torch.finfo(dtype).eps * want.abs().clamp(min=1)
            # those roundings, plus 8 float32 ulps of each term for the math libraries
            tolerance = flips + 8 * torch.finfo(torch.float32).eps * spread
            errors.append(float(((t.view(-1).float() - want).abs() / tolerance).max()))
        out[str(dtype)] = max(errors)
    # a shard: a tensor holding elements 7000.. of its parameter (across the first block's end) draws the
    # parameter's stream from there
    shard = torch.zeros(3001)
    perturber = FusedPerturber()
    perturber.add_(perturber.tables([(4, shard)], bases=[7000]), [(1.0, 11)])
    out["shard"] = float((shard - normals(11, 4, 7000, 3001)).abs().max() / (8 * torch.finfo(torch.float32).eps * 5))
    # one-off tensors of one layout, in other storage each pass (an offloaded block's uploads): the cached
    # layout serves them all, and each pass lands in its own tensors
    passes = [[(2, torch.zeros(700)), (9, torch.zeros(40, 30))] for _ in range(3)]
    for held in passes:
        perturber.add_(held, [(0.5, 21)])
    out["one-off"] = max(float((t.view(-1) - 0.5 * normals(21, index, 0, t.numel())).abs().max()
                               / (8 * torch.finfo(torch.float32).eps * 3)) for held in passes for index, t in held)
    print(json.dumps({"max_error_over_tolerance": out, "max_terms": MAX_TERMS,
                      "layouts_kept": len(perturber._layouts)}))
""")


@needs_triton
def test_the_kernel_draws_the_reference_stream_through_the_interpreter():
    # The interpreter runs the kernel's code on the CPU with numpy: Philox's integer words are exact
    # there, and log/sqrt/cos/sin differ from torch's by float32 rounding. A wrong word would change a
    # normal by O(1), millions of float32 ulps; agreement within a few ulps means every word agrees.
    report = run_interpreted(KERNEL_CHECK)
    assert report["max_terms"] == 4
    assert report["layouts_kept"] == 2  # the shard's, and the one the three passes of one-off tensors shared
    for dtype, error in report["max_error_over_tolerance"].items():
        assert error <= 1, (dtype, error)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_kernel_on_cuda_draws_the_reference_stream():
    from zotune.optim.fused import FusedPerturber

    perturber = FusedPerturber()
    t = torch.zeros(1 << 20, device="cuda")
    perturber.add_([(3, t)], [(1.0, 42)])
    want = normals(42, 3, 0, t.numel(), "cuda")  # torch on CUDA, the same formulas with precise math
    # The kernel's approximate log, sin and cos on CUDA: absolute errors of about 2^-21 in each, times |z| <= 5.7.
    assert torch.allclose(t, want, atol=1e-4, rtol=1e-5)
    # Tensors starting 16-byte aligned take the kernel's 16-byte accesses, others not: views into one buffer
    # at aligned and odd offsets, in 16-bit, each checked against its stream (one rounding to bfloat16).
    for offsets in ((0, 3 * BLOCK + 64), (1, 3 * BLOCK + 7)):
        buffer = torch.zeros(8 * BLOCK, device="cuda", dtype=torch.bfloat16)
        views = [(5, buffer[offsets[0]:offsets[0] + 2 * BLOCK + 9]), (6, buffer[offsets[1]:offsets[1] + 2 * BLOCK])]
        tables = perturber.tables(views)
        assert tables.align == (8 if offsets[0] == 0 else 1)
        perturber.add_(tables, [(1.0, 7)])
        for index, view in views:
            want = normals(7, index, 0, view.numel(), "cuda")
            assert torch.allclose(view.float(), want, atol=1e-4, rtol=2 ** -8)
        untouched = torch.ones(buffer.numel(), dtype=torch.bool, device="cuda")
        for start, (_, view) in zip(offsets, views):
            untouched[start:start + view.numel()] = False
        assert (buffer[untouched] == 0).all()  # nothing outside the tensors written


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pass_over_one_off_tensors_on_cuda_does_not_wait_for_the_gpu():
    # A one-off tensor's launch tables are built for its pass; sent from pageable memory they would make
    # the host wait for the stream (torch's sync debug mode raises on that), from pinned memory they queue.
    perturbation = Gaussian(generator="philox")
    fresh = [(i, torch.zeros(1000 + i, device="cuda")) for i in range(3)]  # plain tensors: no kept plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        perturbation.add_each_(fresh, [(1.0, DrawKey(0, 1, 0))], ())
        coords = perturbation.coordinates(torch.nn.Parameter(torch.zeros(512, device="cuda")), 7,
                                          [(0.5, DrawKey(0, 1, 0))])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.abs().sum() > 0 for _, t in fresh) and coords.abs().sum() > 0


def test_philox_generator_gives_the_same_estimate_as_its_stream():
    # One MeZO step on f(θ) = ½|θ|² with the philox generator (torch stream on the CPU): the projected
    # gradient is (f(θ+εz) − f(θ−εz)) / 2ε = θ·z exactly for a quadratic, and the update θ − lr·g·z.
    theta = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    start = theta.detach().clone()
    opt = ZOOptimizer([theta], lr=0.1, perturbation=Gaussian(generator="philox"), estimator=SPSA(eps=1e-3), seed=5)
    opt.step(lambda: 0.5 * float((theta.double() ** 2).sum()))
    z = normals(Gaussian.philox_key(DrawKey(5, 0, 0)), 0, 0, 1000)
    g = float(start.double() @ z.double())
    assert opt.last_record.projected_grads[0] == pytest.approx(g, rel=1e-4)
    assert torch.allclose(theta.detach(), start - 0.1 * opt.last_record.projected_grads[0] * z, atol=1e-5)


def test_an_lr_zero_step_restores_float32_within_the_documented_bound():
    # In place, float32: +εz, −2εz, +εz each round once; |θ| ~ 1, |εz| <= 1e-3 · 5.7, so the restored
    # weights are within a few float32 ulps of θ (3 roundings, each at most half an ulp of ~|θ|+6e-3).
    theta = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(1)))
    start = theta.detach().clone()
    opt = ZOOptimizer([theta], lr=0.0, perturbation=Gaussian(generator="philox"), estimator=SPSA(eps=1e-3))
    opt.step(lambda: float(theta.sum()))
    ulp = torch.finfo(torch.float32).eps * start.abs().clamp(min=1)
    assert ((theta.detach() - start).abs() / ulp).max() <= 2


def test_generator_names_are_checked():
    with pytest.raises(ValueError, match="generator must be one of"):
        Gaussian(generator="mt19937")


def test_a_parameter_given_new_storage_is_perturbed_there():
    # A pass's plan keeps flat views of the weights (and on CUDA the kernel's tables keep their addresses);
    # giving a parameter new storage (as module.to() does) between steps must move the passes there too.
    def run(swap: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        opt = ZOOptimizer([weight], lr=0.1, perturbation=Gaussian(generator="philox"), estimator=SPSA(eps=1e-3),
                          seed=2)
        for step in range(4):
            if swap and step == 2:
                weight.data = weight.data.clone()
            opt.step(lambda: 0.5 * (weight ** 2).sum())
        return weight.detach()

    assert torch.equal(run(swap=True), run(swap=False))
