"""TTLinear: the fast forward equals x @ to_dense(), shapes factorise, parameter counts match the closed form."""

import math

import pytest
import torch

from zotune.adapters import TTLinear, factorize, tt_numel
from zotune.adapters import tt as tt_module

SIZES = [576, 1536, 2048, 3072, 4096, 5120, 64, 8, 4098, 5155, 7919]


@pytest.mark.parametrize("n", SIZES)
def test_factorize_covers_the_size_with_small_modes(n):
    modes = factorize(n)
    assert math.prod(modes) == n
    largest_prime = max(p for p in range(2, n + 1) if n % p == 0 and all(p % q for q in range(2, int(p**0.5) + 1)))
    assert max(modes) <= max(16, largest_prime)
    if largest_prime <= 16:  # only primes too large to share a mode may exceed the cap
        assert max(modes) <= 16


def test_factorize_examples():
    assert factorize(4096) == [16, 16, 16]
    assert factorize(64) == [8, 8]
    assert factorize(5155) == [5, 1031]  # a large prime factor stays a mode of its own
    with pytest.raises(ValueError, match="positive integer"):
        factorize(0)


@pytest.mark.parametrize("seed", range(6))
def test_fast_forward_equals_dense_product(seed):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = [int(v) for v in torch.randint(2, 300, (2,), generator=g)]
    rank = int(torch.randint(1, 7, (1,), generator=g))
    layer = TTLinear(n_in, n_out, rank, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, n_in, generator=g, dtype=torch.float64)
    expected = x @ layer.to_dense() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    assert layer.core_data.numel() == tt_numel(layer.in_modes + layer.out_modes, rank)
    assert sum(c.numel() for c in layer.cores) == layer.core_data.numel()
    assert [n for n, _ in layer.named_parameters()] == ["core_data", "bias"]  # one tensor for all cores


@pytest.fixture(params=["cpu layout", "gpu layout"])
def layout(request, monkeypatch):
    """Both arrangements of the thin GEMMs, on the CPU: the GPU one is chosen by the device alone,
    so the test switches that choice (the arithmetic that runs is the real one either way)."""
    if request.param == "gpu layout":
        monkeypatch.setattr(tt_module, "_host_layout", lambda device: False)
    return request.param


@pytest.mark.parametrize("bias", [True, False])
def test_both_layouts_compute_the_same_map(layout, bias):
    g = torch.Generator().manual_seed(3)
    layer = TTLinear(48, 160, 4, bias=bias, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 48, generator=g, dtype=torch.float64)
    dense = x @ layer.to_dense() + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), dense, rtol=1e-10, atol=1e-12)
    hidden, b = layer.split(x)  # the thin product and the output side, as the adapters' fused sums take them
    assert hidden.shape == (2, 7, b.shape[0])
    torch.testing.assert_close(hidden @ b + (layer.bias if bias else 0), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_forwards_without_and_with_autograd_compute_the_same_map(bias, monkeypatch):
    """On a CPU a float32 forward without autograd (a ZO step) writes its output through oneDNN, one
    with autograd through F.linear; the threshold is lowered so a small map takes the first path.
    Tolerance: float32 sums of 40 products, against a float64 reference."""
    monkeypatch.setattr(tt_module, "_ONEDNN_MIN_OUTPUT", 0)
    g = torch.Generator().manual_seed(11)
    layer = TTLinear(40, 300, 5, bias=bias, generator=g)
    x = torch.randn(3, 7, 40, generator=g)
    dense = layer.to_dense().double()
    expected = x.double() @ dense + (layer.bias.double() if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
    out = layer(x)  # with autograd: the gradient reaches the cores
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    reference = TTLinear(40, 300, 5, bias=bias, generator=torch.Generator().manual_seed(0))
    reference.load_state_dict(layer.state_dict())
    (x @ reference.to_dense() + (reference.bias if bias else 0)).square().sum().backward()
    torch.testing.assert_close(layer.core_data.grad, reference.core_data.grad, rtol=1e-4, atol=1e-5)


def test_to_dense_matches_the_entry_formula():
    """W[(a_1..a_m), (a_{m+1}..a_d)] = G_1[:, a_1, :] ... G_d[:, a_d, :], input modes first, row-major."""
    g = torch.Generator().manual_seed(3)
    layer = TTLinear(6, 10, 3, in_modes=[2, 3], out_modes=[5, 2], bias=False, generator=g, dtype=torch.float64)
    dense = layer.to_dense()
    for a1 in range(2):
        for a2 in range(3):
            for a3 in range(5):
                for a4 in range(2):
                    cores = layer.cores
                    value = cores[0][:, a1, :] @ cores[1][:, a2, :] @ cores[2][:, a3, :] @ cores[3][:, a4, :]
                    assert torch.allclose(dense[a1 * 3 + a2, a3 * 2 + a4], value.squeeze())


def test_closed_form_parameter_count():
    # 768 x 64 at rank 5 with modes [12, 8, 8 | 8, 8]: 1·12·5 + 5·8·5 + 5·8·5 + 5·8·5 + 5·8·1
    layer = TTLinear(768, 64, 5, bias=False)
    assert layer.in_modes + layer.out_modes == [12, 8, 8, 8, 8]
    assert sum(p.numel() for p in layer.parameters()) == 60 + 200 + 200 + 200 + 40


def test_initial_entries_have_the_target_spread():
    """E W_ij² = r^{d-1} Π_i (σ^{2/d} / r_i) = σ² with σ² = 1/(N_in + N_out) (the r_i multiply to r^{d-1}).

    Each layer's mean square is one draw of a heavy-tailed product; over 200 independent layers
    the relative standard error of their average is about 2.6% (the per-layer relative spread,
    0.37, over √200), so a 10% tolerance is about four standard errors.
    """
    g = torch.Generator().manual_seed(0)
    per_layer = torch.stack([TTLinear(256, 64, 4, generator=g, dtype=torch.float64).to_dense().pow(2).mean()
                             for _ in range(200)])
    assert per_layer.mean().item() == pytest.approx(1 / (256 + 64), rel=0.1)


def test_bad_modes_are_rejected():
    with pytest.raises(ValueError, match="multiply to"):
        TTLinear(64, 8, 2, in_modes=[4, 4])
    with pytest.raises(ValueError, match="rank"):
        TTLinear(64, 8, 0)


@pytest.mark.parametrize("shared_bias", [False, True])
def test_stacked_parameters_run_each_copy_through_its_own(shared_bias):
    # The batched path swaps in (S, numel) cores (and (S, N_out) biases): S = 3 copies of a batch
    # (copy-major), copy s through core_data[s] and bias[s], against the layer run once per copy with
    # that copy's parameters loaded. Tolerance: float32 sums of at most 48 products.
    from zotune.optim.execution import swapped

    g = torch.Generator().manual_seed(0)
    layer = TTLinear(48, 20, rank=3, bias=True, generator=g)
    x = torch.randn(3 * 2, 5, 48, generator=g)  # 3 copies of a batch of 2 sequences of 5
    cores = layer.core_data.detach() + 0.1 * torch.randn(3, layer.core_data.numel(), generator=g)
    biases = layer.bias.detach() + 0.1 * torch.randn(3, 20, generator=g)
    entries = [(layer, "core_data", cores, layer.core_data)] + \
        ([] if shared_bias else [(layer, "bias", biases, layer.bias)])
    with torch.no_grad():
        with swapped(entries):
            assert layer.copies() == 3
            out = layer(x)
        assert layer.copies() is None
        expected = []
        for s in range(3):
            copy = TTLinear(48, 20, rank=3, bias=True, generator=torch.Generator().manual_seed(0))
            copy.core_data.copy_(cores[s])
            copy.bias.copy_(layer.bias if shared_bias else biases[s])
            expected.append(copy(x[2 * s:2 * (s + 1)]))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-6)


