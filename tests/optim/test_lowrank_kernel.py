"""The low-rank kernel (W_t += α L_t R_tᵀ over many matrices in one launch) against addmm_."""

import pytest
import torch

import zotune
from conftest import needs_triton, run_interpreted


# Run through Triton's interpreter in a fresh process (TRITON_INTERPRET is read when triton is imported).
# For each case: the largest |kernel − reference| over the bound of its rounding, where the reference is
# addmm_ in float64 and the bound per element is (r + 2) float32 epsilons of |W| + |α| Σ_k |L_ik R_jk|
# (r products summed, one multiply-add with W, in float32), plus, for a 16-bit W, the one rounding of the
# result to its dtype.
KERNEL_CHECK = r"""
import json
import torch
from zotune.optim import lowrank_kernel as K

g = torch.Generator().manual_seed(0)
out = {}
for name, m, n, r, dtype in [("f32", 70, 130, 2, torch.float32), ("f32-rank32", 33, 64, 32, torch.float32),
                             ("f16", 40, 96, 2, torch.float16), ("bf16", 40, 96, 2, torch.bfloat16),
                             ("tiny", 5, 7, 1, torch.float32)]:
    triples, expected = [], []
    for copy in range(2):  # two matrices per launch
        w = torch.randn(m, n, generator=g).to(dtype)
        ut = torch.randn(r, m, generator=g).to(dtype)  # drawn transposed, as LOZO's U: L = Uᵀ.T, strided
        v = torch.randn(n, r, generator=g).to(dtype)
        triples.append((w, ut.T, v.T))
        exact = w.double() - 0.3 * (ut.T.double() @ v.double().T)
        size = w.double().abs() + 0.3 * (ut.T.double().abs() @ v.double().abs().T)
        bound = (r + 2) * torch.finfo(torch.float32).eps * size
        if dtype != torch.float32:  # one rounding to the weights' dtype (the interpreter converts to bfloat16
            # by truncation, up to a whole ulp; float16, as the GPU does, to nearest: half an ulp)
            ulps = 1.0 if dtype == torch.bfloat16 else 0.5
            bound = bound + ulps * torch.finfo(dtype).eps * exact.abs() + torch.finfo(dtype).tiny
        expected.append((exact, bound))
    K.add_(K.tables(triples), -0.3)
    out[name] = max(float(((w.double() - exact).abs() / bound).max()) for (w, _, _), (exact, bound)
                    in zip(triples, expected))
print(json.dumps(out))
"""


@needs_triton
def test_the_kernel_adds_the_low_rank_products_through_the_interpreter():
    report = run_interpreted(KERNEL_CHECK)
    assert set(report) == {"f32", "f32-rank32", "f16", "bf16", "tiny"}
    for case, error in report.items():
        assert error <= 1, (case, error)


@needs_triton
def test_tile_tables_list_every_tile_of_every_matrix_once_row_major():
    from zotune.optim import lowrank_kernel as K

    shapes = [(70, 130), (5, 7), (32, 64), (33, 65), (1, 200)]  # whole tiles and partial ones at both edges
    owner, row, col = K.tile_tables(shapes, torch.device("cpu"))
    expected = [(t, i * K.BM, j * K.BN) for t, (m, n) in enumerate(shapes)
                for i in range(-(-m // K.BM)) for j in range(-(-n // K.BN))]
    assert list(zip(owner.tolist(), row.tolist(), col.tolist())) == expected


@needs_triton
def test_tables_promise_16_byte_accesses_only_where_every_matrix_allows_them():
    # The kernel tells the compiler that W's starts, row strides and widths are multiples of `align`
    # elements; a promise that does not hold would make it read and write the wrong elements on a GPU.
    from zotune.optim import lowrank_kernel as K

    def align(*matrices):
        return K.tables([(w, torch.zeros(w.shape[0], 2, dtype=w.dtype), torch.zeros(2, w.shape[1], dtype=w.dtype))
                         for w in matrices]).align

    flat = torch.zeros(8 * 64 + 1)
    assert align(torch.zeros(8, 64), torch.zeros(16, 32)) == 4  # float32: 4 elements in 16 bytes
    assert align(torch.zeros(8, 64, dtype=torch.bfloat16)) == 8
    assert align(torch.zeros(8, 64), torch.zeros(8, 68)[:, :66]) == 1  # a width that is not a multiple of 4
    assert align(torch.zeros(8, 64), torch.zeros(8, 130)[:, :64]) == 1  # a row stride that is not
    assert align(torch.zeros(8, 64), flat[1:].view(8, 64)) == 1  # a start 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="one rank"):
        K.tables([(torch.zeros(8, 64), torch.zeros(8, r), torch.zeros(r, 64)) for r in (2, 3)])


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lozo_on_cuda_takes_the_kernel_and_moves_the_weights_as_addmm_does(monkeypatch):
    import zotune.optim.perturbations as perturbations

    def run(kernel: bool):
        monkeypatch.setattr(perturbations, "_triton_installed", lambda: kernel)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 200, device="cuda")) for _ in range(3)]
        # lr small enough that the steps move the weights by ~1e-2 and the loss stays near its start: the two
        # runs then differ by their passes' rounding (a few float32 ulps each), not by a diverging trajectory
        # that amplifies it (at lr = 1e-3 the loss grows 1e5-fold in 7 steps)
        opt = zotune.lozo(params, lr=1e-5, rank=2, nu=5, seed=1)
        for _ in range(7):
            opt.step(lambda: float(sum((p.double() ** 2).sum() for p in params)))
        groups = next(iter(opt.perturbation._plans.values()))[2][0]  # the plan's kernel groups
        if kernel:  # 7 steps span windows 0 and 1 (nu = 5): the new window's plan kept the tile tables
            tiles = list(opt.perturbation._tiles.values())
            assert len(tiles) == 1 and groups[0][0].tile_row is tiles[0][1]
        return [p.detach().clone() for p in params], bool(groups) and opt.perturbation._kernel_works

    with_kernel, used = run(True)
    with_addmm, unused = run(False)
    assert used and not unused
    for a, b in zip(with_kernel, with_addmm):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
def test_a_kernel_that_cannot_build_falls_back_to_addmm(monkeypatch):
    import zotune.optim.factored as factored
    from zotune.optim import lowrank_kernel

    def run():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(30, 20)) for _ in range(3)]
        opt = zotune.lozo(params, lr=1e-2, rank=2, nu=2, seed=1)
        for _ in range(4):
            opt.step(lambda: float(sum((p.double() ** 2).sum() for p in params)))
        return [p.detach().clone() for p in params]

    reference = run()  # on the CPU: addmm_ throughout
    # as if on a GPU whose Triton cannot build the kernel: every group offered to it, every launch failing
    monkeypatch.setattr(factored, "_kernel_groups", lambda matrices, tiles: ([(None, matrices)], []))

    def fails(tables, alpha):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(lowrank_kernel, "add_", fails)
    with pytest.warns(RuntimeWarning, match="low-rank Triton kernel failed"):
        fallen_back = run()
    for a, b in zip(reference, fallen_back):
        assert torch.equal(a, b)
